"""End to end against a running daemon: launch through the socket, events,
/metrics, `skillguard run` delegation, policies and reload."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import require
from sgdaemon import PYTHON, REPO_ROOT, LineReader, manifest_text, read_all, running_daemon, wait_for

PROBE = """
import os, socket, sys
print("uid", os.getuid(), flush=True)
try:
    open("/etc/shadow")
    print("shadow: READ", flush=True)
except OSError as e:
    print("shadow:", e.strerror, flush=True)
try:
    socket.socket(socket.AF_INET)
    print("inet: OPEN", flush=True)
except OSError as e:
    print("inet:", e.strerror, flush=True)
open(sys.argv[1] + "/out.txt", "w").write("written")
sys.exit(7)
"""


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon(policies=("demo",)) as d:
        yield d


def test_status_and_empty_list(daemon):
    status = daemon.call("status")
    assert status["api_version"] == 1 and status["policies"] == ["demo"]
    assert status["socket"] == daemon.socket and status["caller"]["uid"] == 0
    assert isinstance(daemon.call("list")["skills"], list)


def test_launch_through_the_socket_is_confined_and_reports(daemon):
    work = str(daemon.work)
    events = daemon.client(timeout=30)
    events.subscribe("e2e-launch")
    reply, out = daemon.launch(manifest_text("e2e-launch", work), ["/usr/bin/python3", "-c", PROBE, work])
    assert reply["skill"] == "e2e-launch" and reply["pid"] > 1 and reply["id"].startswith("l-")
    assert any(s["id"] == reply["id"] for s in daemon.call("list")["skills"])
    result = daemon.call("wait", {"id": reply["id"]})
    output = read_all(out)
    # The skill's own uid, no /etc/shadow, no AF_INET socket, its granted dir writable.
    uid_line = output.splitlines()[0]
    assert uid_line.startswith("uid ") and int(uid_line.split()[1]) >= 1000
    assert "shadow: Permission denied" in output
    assert "inet: Operation not permitted" in output
    assert (daemon.work / "out.txt").read_text() == "written"
    assert result["exit_code"] == 7 and result["state"] == "exited"
    assert any(v["layer"] == "seccomp" and v["operation"] == "socket(AF_INET)" for v in result["violations"])

    # The same violation arrived on the `events` stream, with the launch id...
    streamed = []
    for event in events.stream():
        streamed.append(event)
        if event["layer"] == "seccomp":
            break
    events.close()
    assert streamed[-1]["skill_id"] == reply["id"] and streamed[-1]["operation"] == "socket(AF_INET)"
    # ...in the JSON-lines log...
    wait_for(lambda: reply["id"] in daemon.log.read_text(), 5, what="the event in the log")
    logged = [json.loads(line) for line in daemon.log.read_text().splitlines()]
    assert any(r["skill_id"] == reply["id"] and r["layer"] == "seccomp" for r in logged)
    # ...and in /metrics.
    assert daemon.metric("skillguard_violations_total", skill="e2e-launch", layer="seccomp",
                         decision="denied") >= 1
    assert daemon.metric("skillguard_launch_duration_seconds_count") >= 1
    # Ended and cleaned up: gone from the list and its cgroup removed.
    assert all(s["id"] != reply["id"] for s in daemon.call("list")["skills"])
    detail = daemon.call("inspect", {"id": reply["id"]})
    assert detail["state"] == "exited"
    assert all(not os.path.exists(p) for p in detail["cgroup_paths"])


def test_launch_by_policy_name_and_signal(daemon):
    null = os.open("/dev/null", os.O_RDWR)
    r, w = os.pipe()
    try:
        reply = daemon.call("launch", {"skill": "demo", "stdio": True,
                                       "argv": ["/usr/bin/python3", "-c",
                                                "import time; print('up', flush=True); time.sleep(120)"]},
                            fds=[null, w, w])
    finally:
        os.close(null)
        os.close(w)
    daemon.pids_seen.add(reply["supervisor_pid"])
    reader = LineReader(r)
    assert reader.readline() == "up"
    daemon.call("signal", {"id": reply["id"], "signal": "SIGTERM"})
    result = daemon.call("wait", {"id": reply["id"], "timeout": 30})
    reader.close()
    assert result["exited"] and result["exit_code"] == 128 + signal.SIGTERM


def test_launch_refusals_change_nothing(daemon):
    from agent.client import RpcError

    before = daemon.call("list")["skills"]
    with pytest.raises(RpcError) as info:
        daemon.call("launch", {"skill": "no-such-skill"})
    assert info.value.code == -32002
    with pytest.raises(RpcError) as info:
        daemon.call("launch", {"manifest": "name: [broken\n"})
    assert info.value.code == -32004 and info.value.data["errors"]
    with pytest.raises(RpcError) as info:
        daemon.call("launch", {"manifest": manifest_text("x", "/tmp"), "skill": "demo"})
    assert info.value.code == -32602
    with pytest.raises(RpcError, match="send exactly 3 file descriptors"):
        daemon.call("launch", {"skill": "demo", "stdio": True})
    with pytest.raises(RpcError) as info:  # refused before fork: the layer is named
        daemon.call("launch", {"skill": "demo", "argv": ["no-such-program-anywhere"]})
    assert info.value.code == -32005 and info.value.data["layer"] == "exec"
    assert daemon.call("list")["skills"] == before
    # A failure after fork (here: execve) ends the launch; `wait` names the layer.
    not_executable = daemon.work / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    null = os.open("/dev/null", os.O_RDWR)
    try:
        reply = daemon.call("launch", {"skill": "demo", "argv": [str(not_executable)], "stdio": True},
                            fds=[null, null, null])
    finally:
        os.close(null)
    daemon.pids_seen.add(reply["supervisor_pid"])
    result = daemon.call("wait", {"id": reply["id"]})
    assert result["exit_code"] == 127 and result["error"]["layer"] == "exec"
    assert str(not_executable) in result["error"]["reason"] and result["state"] == "failed"
    assert daemon.call("list")["skills"] == before


def test_run_delegates_to_the_daemon(daemon):
    work = daemon.work
    manifest = daemon.root / "delegated.yaml"
    manifest.write_text(manifest_text("delegated", str(work)))
    launches = daemon.metric("skillguard_api_requests_total", method="launch", outcome="ok")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SKILLGUARD_SOCKET=daemon.socket)
    env.pop("SKILLGUARD_RUN_LOCAL", None)
    proc = subprocess.run([PYTHON, "-m", "agent", "run", "--manifest", str(manifest), "--",
                           "/usr/bin/python3", "-c", PROBE, str(work)],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert "shadow: Permission denied" in proc.stdout and "inet: Operation not permitted" in proc.stdout
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(r["layer"] == "seccomp" and r["skill"] == "delegated" for r in records)
    assert daemon.metric("skillguard_api_requests_total", method="launch", outcome="ok") == launches + 1
    # --local runs without the daemon.
    proc = subprocess.run([PYTHON, "-m", "agent", "run", "--local", "--manifest", str(manifest), "--",
                           "/usr/bin/python3", "-c", "print('local')"],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "local\n", proc.stderr
    assert daemon.metric("skillguard_api_requests_total", method="launch", outcome="ok") == launches + 1


def test_reload_rejects_an_invalid_policy_and_keeps_the_previous(daemon):
    policy = daemon.policies / "demo.yaml"
    good = policy.read_text()
    errors_before = daemon.metric("skillguard_policy_compile_errors_total")
    try:
        policy.write_text(good.replace("pids: 64", "pids: lots"))
        report = daemon.call("reload")
        assert report["kept_previous"] == ["demo"]
        assert any("pids" in line for line in report["rejected"][str(policy)])
        assert daemon.call("status")["policies"] == ["demo"]
        assert daemon.metric("skillguard_policy_compile_errors_total") == errors_before + 1
        # The previous version still launches.
        null = os.open("/dev/null", os.O_RDWR)
        try:
            reply = daemon.call("launch", {"skill": "demo", "argv": ["/bin/true"], "stdio": True},
                                fds=[null, null, null])
        finally:
            os.close(null)
        daemon.pids_seen.add(reply["supervisor_pid"])
        assert daemon.call("wait", {"id": reply["id"]})["exit_code"] == 0
        # SIGHUP reloads too: a new valid policy appears.
        (daemon.policies / "extra.yaml").write_text(manifest_text("extra", str(daemon.work)))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "extra" in daemon.call("status")["policies"], 10, what="SIGHUP reload")
    finally:
        policy.write_text(good)
        (daemon.policies / "extra.yaml").unlink(missing_ok=True)
        daemon.call("reload")
