"""The launch zygote (agent/daemon/zygote.py): supervisors are forked from a
small process, not from the daemon; a zygote that dies is replaced and
launches go on meanwhile; it dies with the daemon, its supervisors do not."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import require
from sgdaemon import children, zygote_of, DaemonProcess, make_root, manifest_text, read_all, running_daemon, wait_for


def _stat(pid: int) -> list[str]:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rindex(b")") + 2:].decode().split()


def _ppid(pid: int) -> int:
    return int(_stat(pid)[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _launch_sleeper(daemon, name: str) -> dict:
    reply, out = daemon.launch(manifest_text(name, str(daemon.work)), ["/bin/sleep", "60"])
    os.close(out)
    # The skill's init forwards SIGTERM once set up (an init without a handler
    # ignores it: pid_namespaces(7)); `sleep` running under it means it is.
    wait_for(lambda: any(Path(f"/proc/{pid}/comm").read_text() == "sleep\n" for pid in children(reply["pid"])),
             10, what="the skill to run")
    return reply


def _end(daemon, reply: dict) -> dict:
    daemon.call("signal", {"id": reply["id"], "signal": "SIGTERM"})
    return daemon.call("wait", {"id": reply["id"], "timeout": 30})


def _launch_through(daemon, parent: int, name: str) -> dict:
    """A sleeper whose supervisor `parent` forked (the zygote answers once it
    has loaded the launcher; launches before that fork the daemon)."""
    def attempt():
        reply = _launch_sleeper(daemon, name)
        if _ppid(reply["supervisor_pid"]) == parent:
            return reply
        _end(daemon, reply)
        return None

    return wait_for(attempt, 20, 0.1, f"a supervisor forked by pid {parent}")


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon() as d:
        yield d


def test_supervisors_come_from_the_small_zygote_and_are_reaped(daemon):
    zygote = wait_for(lambda: zygote_of(daemon), 10, what="the launch zygote")
    reply = _launch_through(daemon, zygote, "zyg-sleeper")
    supervisor = reply["supervisor_pid"]
    # What makes it worth having: it is a fraction of the daemon's size.
    assert _rss_kib(zygote) * 2 < _rss_kib(daemon.proc.pid), (_rss_kib(zygote), _rss_kib(daemon.proc.pid))
    # Its supervisor is the daemon's as any other: listed, signalled, waited for.
    assert any(s["id"] == reply["id"] and s["state"] == "running" for s in daemon.call("list")["skills"])
    result = _end(daemon, reply)
    assert result["exited"] and result["exit_code"] == 128 + signal.SIGTERM
    # `wait` answers as soon as the exit is reported; the zygote then reaps the supervisor.
    wait_for(lambda: not os.path.exists(f"/proc/{supervisor}"), 10, what="the supervisor to be reaped")

    # stdio passed with SCM_RIGHTS reaches the skill through the zygote.
    reply, out = daemon.launch(manifest_text("zyg-echo", str(daemon.work)),
                               ["/usr/bin/python3", "-c", "print('through the zygote')"])
    result = daemon.call("wait", {"id": reply["id"], "timeout": 30})
    assert result["exit_code"] == 0 and read_all(out) == "through the zygote\n"

    # Fail closed through the zygote too: a layer that fails after the fork
    # (execve of a file that is not executable) ends the launch and is named.
    not_executable = daemon.work / "zyg-not-executable"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    reply, out = daemon.launch(manifest_text("zyg-fail", str(daemon.work)), [str(not_executable)])
    os.close(out)
    result = daemon.call("wait", {"id": reply["id"], "timeout": 30})
    assert result["exit_code"] == 127 and result["error"]["layer"] == "exec" and result["state"] == "failed"


def test_launches_at_once_each_get_a_supervisor(daemon):
    """More launches at once than spares: the rest wait for spares forked on demand."""
    import threading

    from agent.client import Client

    wait_for(lambda: zygote_of(daemon), 10, what="the launch zygote")
    text = manifest_text("zyg-burst", str(daemon.work))
    results: list = []

    def one():
        with Client(daemon.socket, timeout=60) as client:
            reply = client.call("launch", {"manifest": text, "argv": ["/bin/true"]})
            daemon.pids_seen.add(reply["supervisor_pid"])
            results.append((reply["supervisor_pid"], client.call("wait", {"id": reply["id"], "timeout": 30})))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and len({pid for pid, _ in results}) == 8
    assert all(result["exit_code"] == 0 for _, result in results), results
    assert "did not take it" not in daemon.stderr_text()  # none fell back to forking the daemon


def test_a_killed_zygote_is_replaced_and_launches_go_on(daemon):
    zygote = wait_for(lambda: zygote_of(daemon), 10, what="the launch zygote")
    spares = children(zygote)
    os.kill(zygote, signal.SIGKILL)
    # Its spare supervisor sees its end of the socket close and exits.
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in spares | {zygote}), 10,
             what="the zygote and its spare to go")
    # The next launch works (the daemon forks its supervisor) and starts a new zygote...
    reply, out = daemon.launch(manifest_text("zyg-after", str(daemon.work)), ["/bin/true"])
    os.close(out)
    assert daemon.call("wait", {"id": reply["id"], "timeout": 30})["exit_code"] == 0
    assert "launch zygote: it exited" in daemon.stderr_text()
    replacement = wait_for(lambda: zygote_of(daemon), 10, what="a new launch zygote")
    assert replacement != zygote
    # ...which takes the launches from then on.
    reply = _launch_through(daemon, replacement, "zyg-replaced")
    assert _end(daemon, reply)["exit_code"] == 128 + signal.SIGTERM


def test_zygote_off_forks_the_daemon(monkeypatch):
    require(os.geteuid() == 0, "needs root (euid 0)")
    monkeypatch.setenv("SKILLGUARD_LAUNCH_ZYGOTE", "0")
    with running_daemon() as d:
        assert zygote_of(d) is None
        reply = _launch_sleeper(d, "zyg-off")
        assert _ppid(reply["supervisor_pid"]) == d.proc.pid
        assert _end(d, reply)["exit_code"] == 128 + signal.SIGTERM


def test_the_zygote_dies_with_the_daemon_and_its_supervisors_live_on():
    require(os.geteuid() == 0, "needs root (euid 0)")
    root = make_root()
    d = DaemonProcess(root)
    d2 = None
    try:
        d.start()
        zygote = wait_for(lambda: zygote_of(d), 10, what="the launch zygote")
        reply = _launch_through(d, zygote, "zyg-survivor")
        supervisor = reply["supervisor_pid"]
        spares = children(zygote) - {supervisor}
        d.kill9()
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in spares | {zygote}), 10,
                 what="the zygote and its spare to die with the daemon")
        assert os.path.exists(f"/proc/{supervisor}") and _stat(supervisor)[0] != "Z"
        # The next daemon re-adopts the skill and can end it.
        d2 = DaemonProcess(root)
        d2.pids_seen = d.pids_seen
        d2.start()
        listed = {s["id"]: s for s in d2.call("list")["skills"]}
        assert listed[reply["id"]]["adopted"] and listed[reply["id"]]["state"] == "running"
        result = _end(d2, reply)
        assert result["exited"] and result["exit_code"] == 128 + signal.SIGTERM
    finally:
        if d2 is not None:
            d2.tear_down()
        else:
            d.tear_down()
