"""Register running processes through the daemon, and SIGKILL of the daemon
during activity: every live skill (registered and launched) is re-adopted
and still confined.

Network checks use loopback only: two TCP servers on 127.0.0.1, one port
granted by the manifest and one not.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import require
from sgdaemon import DaemonProcess, LineReader, make_root, manifest_text, register_daemon, wait_for

# A process started outside skillguard: one JSON command per line in, one JSON line out.
TARGET = r'''
import json, os, socket, sys
def do(cmd):
    try:
        if cmd["op"] == "tcp":
            with socket.socket() as s:
                s.settimeout(3)
                s.connect(("127.0.0.1", cmd["port"]))
                return {"ok": s.recv(10).decode()}
        if cmd["op"] == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", ("127.0.0.1", cmd["port"]))
                return {"ok": "sent"}
        if cmd["op"] == "open":
            open(cmd["path"]).close()
            return {"ok": "opened"}
        if cmd["op"] == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    with socket.socket() as s:
                        s.settimeout(3)
                        s.connect(("127.0.0.1", cmd["port"]))
                    os._exit(0)
                except OSError as e:
                    os._exit(e.errno)
            return {"child_exit": os.waitpid(pid, 0)[1] >> 8}
    except OSError as e:
        return {"errno": e.errno}
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    print(json.dumps(do(json.loads(line))), flush=True)
'''


class Target:
    def __init__(self, cwd=None):
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd)
        self.pid = json.loads(self.proc.stdout.readline())["ready"]

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("the target exited")
        return json.loads(line)

    def end(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Server:
    """A TCP server on 127.0.0.1 that answers "hi" to every connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hi")

    def close(self):
        self.sock.close()


EPERM = 1


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            out.extend(int(x) for x in fh.read().split())
    return out


def register_manifest(root, granted_port: int, on_violation: str = "report", name: str = "reg") -> str:
    (root / "allowed").mkdir(exist_ok=True)
    (root / "allowed" / "ok.txt").write_text("ok")
    (root / "secret.txt").write_text("secret")
    return textwrap.dedent(f"""\
        name: {name}
        version: "1"
        permissions:
          tcp:
            allowlist: ["127.0.0.1:{granted_port}"]
          fs:
            dirs: ["{root}/allowed:ro"]
            on_violation: {on_violation}
        """)


@pytest.fixture(scope="module")
def daemon():
    with register_daemon() as d:
        yield d


@pytest.fixture
def servers():
    allowed, denied = Server(), Server()
    yield allowed, denied
    allowed.close()
    denied.close()


def test_register_confines_network_and_reports_opens(daemon, servers):
    allowed, denied = servers
    target = Target()
    try:
        # Before: everything reachable.
        assert target.ask(op="tcp", port=denied.port) == {"ok": "hi"}
        events = daemon.client()
        events.subscribe("reg")
        reply = daemon.call("register", {"pids": [target.pid],
                                         "manifest": register_manifest(daemon.root, allowed.port)})
        assert reply["pids"] == [target.pid] and reply["layers"]["bpf-connect"] == "active"
        assert reply["layers"]["seccomp"].startswith("needs launch")
        assert daemon.metric("skillguard_skills_registered") == 1
        assert daemon.metric("skillguard_attach_duration_seconds_count") >= 1
        # Network: the granted port only; UDP refused too; children too.
        assert target.ask(op="tcp", port=allowed.port) == {"ok": "hi"}
        assert target.ask(op="tcp", port=denied.port) == {"errno": EPERM}
        assert target.ask(op="udp", port=denied.port) == {"errno": EPERM}
        assert target.ask(op="fork", port=denied.port) == {"child_exit": EPERM}
        # Opens outside the grant are reported with the resolved path.
        assert target.ask(op="open", path=str(daemon.root / "secret.txt")) == {"ok": "opened"}
        seen = []
        for event in events.stream():
            seen.append(event)
            if event["layer"] == "fs" and event["operation"] == str(daemon.root / "secret.txt"):
                break
        events.close()
        assert {e["skill_id"] for e in seen} == {reply["id"]}
        assert any(e["layer"] == "network" for e in seen)
        assert daemon.metric("skillguard_violations_total", skill="reg", layer="fs") >= 1
        assert daemon.metric("skillguard_network_connections_total", skill="reg", verdict="dropped") >= 1
        # Unregister: the process leaves the subtree and gets its access back.
        daemon.call("unregister", {"id": reply["id"]})
        assert target.ask(op="tcp", port=denied.port) == {"ok": "hi"}
        cgroup = open(f"/proc/{target.pid}/cgroup").read()
        assert daemon.subtree not in cgroup
        assert daemon.metric("skillguard_skills_registered") == 0
    finally:
        target.end()


def test_register_refusals_change_nothing(daemon, servers):
    from agent.client import RpcError

    target = Target()
    try:
        manifest = register_manifest(daemon.root, servers[0].port)
        with pytest.raises(RpcError) as info:
            daemon.call("register", {"pids": [target.pid], "manifest": manifest, "require": ["seccomp"]})
        assert info.value.code == -32003 and "seccomp" in info.value.message
        with pytest.raises(RpcError) as info:
            daemon.call("register", {"pids": [target.pid], "manifest": manifest, "require": ["bogus"]})
        assert info.value.code == -32602
        with pytest.raises(RpcError) as info:
            daemon.call("register", {"pids": [4_000_000], "manifest": manifest})
        assert info.value.code == -32602 or info.value.code == -32002
        assert daemon.subtree not in open(f"/proc/{target.pid}/cgroup").read()
        assert target.ask(op="tcp", port=servers[1].port) == {"ok": "hi"}
        assert daemon.call("list")["skills"] == []
    finally:
        target.end()


def test_registrations_sent_at_once_are_each_confined_and_recorded_before_their_answer(daemon, servers):
    """Requests written on several connections before any answer is read are
    attached together (one nftables transaction, one journal write); each
    answer still comes only once its process is confined and recorded, a
    request refused by the kernel is refused alone, and a pid named by two
    requests at once is registered once."""
    allowed, denied = servers
    targets = [Target() for _ in range(5)]
    bad = 'name: reg-bad\nversion: "1"\npermissions:\n  tcp:\n    allowlist: ["10.0.0.0/8:1", "10.1.0.0/16:*"]\n'
    good = register_manifest(daemon.root, allowed.port, name="reg-many")
    pids = [t.pid for t in targets]
    asks = [(pids[0], good), (pids[1], bad), (pids[2], good), (pids[3], good), (pids[3], good), (pids[4], good)]
    conns = []
    try:
        for _ in asks:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(daemon.socket)
            conns.append(conn)
        for number, (conn, (pid, text)) in enumerate(zip(conns, asks)):
            conn.sendall(json.dumps({"jsonrpc": "2.0", "id": number, "method": "register",
                                     "params": {"pids": [pid], "manifest": text}}).encode() + b"\n")
        answers = []
        for conn in conns:
            with conn.makefile("rb") as lines:
                answers.append(json.loads(lines.readline()))
        assert answers[1]["error"]["code"] == -32003
        assert answers[1]["error"]["data"] == {"layer": "nftables-cgroup"}
        assert daemon.subtree not in open(f"/proc/{pids[1]}/cgroup").read()
        assert targets[1].ask(op="tcp", port=denied.port) == {"ok": "hi"}
        twice = [answers[3], answers[4]]
        assert sorted("result" in a for a in twice) == [False, True]
        assert next(a for a in twice if "error" in a)["error"]["code"] == -32010
        registered = {a["result"]["id"]: a["result"]["pids"] for a in answers if "result" in a}
        assert sorted(p for ps in registered.values() for p in ps) == sorted([pids[0], pids[2], pids[3], pids[4]])
        records = {r["id"]: r for r in daemon.registry_records()}
        for skill_id, skill_pids in registered.items():
            assert records[skill_id]["pids"] == skill_pids
        for t in (targets[0], targets[2], targets[3], targets[4]):
            assert t.ask(op="tcp", port=denied.port) == {"errno": EPERM}
            assert t.ask(op="tcp", port=allowed.port) == {"ok": "hi"}
        for skill_id in registered:
            daemon.call("unregister", {"id": skill_id})
    finally:
        for conn in conns:
            conn.close()
        for t in targets:
            t.end()


def test_exited_registered_skill_is_cleaned_up(daemon, servers):
    target = Target()
    reply = daemon.call("register", {"pids": [target.pid], "manifest": register_manifest(
        daemon.root, servers[0].port, on_violation="kill", name="reg-kill")})
    cgroup = reply["cgroup"]
    assert os.path.isdir(cgroup)
    # A disallowed absolute open under fs.on_violation: kill ends the process in the kernel...
    with pytest.raises(EOFError):
        target.ask(op="open", path=str(daemon.root / "secret.txt"))
    assert target.proc.wait(10) == -signal.SIGKILL
    # ...and the daemon then removes the skill: list, cgroup, metrics.
    wait_for(lambda: not os.path.isdir(cgroup), 5, what="the cgroup to be removed")
    assert all(s["id"] != reply["id"] for s in daemon.call("list")["skills"])
    assert daemon.call("inspect", {"id": reply["id"]})["state"] == "exited"
    # The kill's event comes through the BPF ring asynchronously: it may be
    # read after the skill was already removed, but it must not be lost.
    wait_for(lambda: daemon.metric("skillguard_violations_total", skill="reg-kill", layer="fs",
                                   decision="killed") >= 1, 5, what="the fs kill to be counted")


def test_sigkill_of_the_daemon_during_activity_and_readoption(servers):
    """Launched and registered skills are busy when the daemon is SIGKILLed;
    the next daemon finds them, they were confined all along, and their
    events reach the new daemon."""
    require(os.geteuid() == 0, "needs root (euid 0)")
    allowed, denied = servers
    root = make_root()
    d = DaemonProcess(root).start()
    target = Target()
    readers = []
    try:
        require(d.call("status")["register"] == "available", "register unavailable")
        reg = d.call("register", {"pids": [target.pid],
                                  "manifest": register_manifest(root, allowed.port, name="busy-reg")})
        loop = ("import socket, time, sys\n"
                "while True:\n"
                "    try:\n"
                "        open('/etc/shadow')\n"
                "        print('shadow READ', flush=True)\n"
                "    except OSError as e:\n"
                "        print('shadow', e.strerror, flush=True)\n"
                "    try:\n"
                "        socket.socket(socket.AF_INET)\n"
                "        print('inet OPEN', flush=True)\n"
                "    except OSError as e:\n"
                "        print('inet', e.strerror, flush=True)\n"
                "    time.sleep(0.05)\n")
        launched = []
        for i in range(2):
            reply, out = d.launch(manifest_text(f"busy-{i}", str(d.work)), ["/usr/bin/python3", "-c", loop])
            launched.append(reply)
            readers.append(LineReader(out))
        for reader in readers:
            assert reader.readline() == "shadow Permission denied"
        # Activity at the moment of the kill: a client mid-request and a stream.
        stream = d.client()
        stream.subscribe()
        partial = socket.socket(socket.AF_UNIX)
        partial.connect(d.socket)
        partial.sendall(b'{"jsonrpc":"2.0","id":1,"method":"li')
        # The cgroup pool's helper (a child that is no supervisor) has made spares beside the skill's cgroup.
        skill_dir = Path(reg["cgroup"]).parent
        wait_for(lambda: len(list(skill_dir.glob("reg-*"))) > 1, 10, what="spare cgroups")
        # So has the launch zygote, with a spare supervisor (agent/daemon/zygote.py).
        supervisors = {r["supervisor_pid"] for r in launched}
        helpers = set(_children(d.proc.pid)) - supervisors
        zygotes = {pid for pid in helpers if b"agent.daemon.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(zygotes) == 1 and len(helpers) == 2, helpers
        helpers |= set(_children(*zygotes)) - supervisors
        d.kill9()
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in helpers), 10,
                 what="the pool helper and the launch zygote (and its spare) to die with the daemon")
        # While no daemon runs: still confined.
        for reader in readers:
            for _ in range(5):
                assert reader.readline() in ("shadow Permission denied", "inet Operation not permitted")
        assert target.ask(op="tcp", port=denied.port) == {"errno": EPERM}
        assert target.ask(op="tcp", port=allowed.port) == {"ok": "hi"}
        stream.close()
        partial.close()
        # A journal line torn by the crash (simulated) is reported, not trusted.
        journal = d.state / "registry" / "journal"
        torn_line = len(journal.read_bytes().splitlines()) + 1
        with open(journal, "ab") as fh:
            fh.write(b'{"format":1,"op":"put","sha256":"00","rec')

        d2 = DaemonProcess(root)
        d2.start()
        d2.pids_seen = d.pids_seen
        try:
            listed = {s["id"]: s for s in d2.call("list")["skills"]}
            for reply in launched:
                assert listed[reply["id"]]["adopted"] and listed[reply["id"]]["state"] == "running"
            assert listed[reg["id"]]["adopted"] and listed[reg["id"]]["pids"] == [target.pid]
            # The spares the killed daemon's helper made are gone; the skill's own cgroup stays.
            assert [p.name for p in skill_dir.glob("reg-*")] == [Path(reg["cgroup"]).name]
            status = d2.call("status")
            assert [p["file"] for p in status["registry_problems"]] == [f"journal line {torn_line}"]
            assert d2.metric("skillguard_registry_corrupt_records_total") == 1
            assert d2.metric("skillguard_readoptions_total", outcome="adopted") == 3
            # Still confined, and the supervisors' events reach the new daemon.
            assert target.ask(op="tcp", port=denied.port) == {"errno": EPERM}
            events = d2.client()
            events.subscribe("busy-0")
            first = next(events.stream())
            events.close()
            assert first["skill_id"] == launched[0]["id"] and first["layer"] == "seccomp", (first, launched)
            # The new daemon can end them: a launched one through its supervisor...
            d2.call("signal", {"id": launched[0]["id"], "signal": "SIGTERM"})
            result = d2.call("wait", {"id": launched[0]["id"], "timeout": 30})
            assert result["exited"] and result["exit_code"] == 128 + signal.SIGTERM
            # ...a registered one by unregistering it.
            d2.call("unregister", {"id": reg["id"]})
            assert target.ask(op="tcp", port=denied.port) == {"ok": "hi"}
            # A skill that ends while the daemon is down is dropped at the next start.
            d2.kill9()
            os.kill(launched[1]["supervisor_pid"], signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{launched[1]['supervisor_pid']}"), 10,
                     what="the supervisor to exit")
            d3 = DaemonProcess(root)
            d3.start()
            try:
                assert d3.call("list")["skills"] == []
                detail = d3.call("inspect", {"id": launched[1]["id"]})
                assert detail["state"] == "exited"
                assert d3.metric("skillguard_readoptions_total", outcome="dropped") == 1
            finally:
                d3.stop()
        finally:
            if d2.alive():
                d2.stop()
    finally:
        for reader in readers:
            try:
                reader.close()
            except OSError:
                pass
        target.end()
        d.tear_down()


def test_spare_cgroups_go_when_the_daemon_stops(servers):
    """A registration asks the pool's helper for spare cgroups of its skill;
    a daemon that stops removes those it did not use (the registered skill's
    own cgroup stays, still confining it)."""
    require(os.geteuid() == 0, "needs root (euid 0)")
    allowed, denied = servers
    root = make_root()
    d = DaemonProcess(root).start()
    target = Target()
    try:
        require(d.call("status")["register"] == "available", "register unavailable")
        manifest = register_manifest(root, allowed.port, name="spares")
        first = d.call("register", {"pids": [target.pid], "manifest": manifest})
        skill_dir = Path(first["cgroup"]).parent
        wait_for(lambda: len(list(skill_dir.glob("reg-*"))) > 1, 10, what="spare cgroups")
        other = Target()
        try:
            second = d.call("register", {"pids": [other.pid], "manifest": manifest})
            assert Path(second["cgroup"]).parent == skill_dir
            assert other.ask(op="tcp", port=denied.port) == {"errno": EPERM}
        finally:
            other.end()
        wait_for(lambda: second["id"] not in {s["id"] for s in d.call("list")["skills"]}, 10,
                 what="the exited skill to be dropped")
        assert d.stop() == 0
        assert [p.name for p in skill_dir.glob("reg-*")] == [Path(first["cgroup"]).name]
        assert target.ask(op="tcp", port=denied.port) == {"errno": EPERM}
    finally:
        target.end()
        d.tear_down()


def test_cli_register_ps_events_unregister(daemon, servers, tmp_path):
    from sgdaemon import PYTHON, REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SKILLGUARD_SOCKET=daemon.socket)
    manifest = tmp_path / "cli.yaml"
    manifest.write_text(register_manifest(daemon.root, servers[0].port, name="cli-reg"))
    target = Target()
    events = subprocess.Popen([PYTHON, "-m", "agent", "events", "--skill", "cli-reg"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        run = lambda *args: subprocess.run([PYTHON, "-m", "agent", *args], env=env, capture_output=True,
                                           text=True, timeout=60)
        wait_for(lambda: daemon.call("status")["events"]["subscribers"] >= 1, 20,
                 what="`skillguard events` to subscribe")
        reg = run("register", "--manifest", str(manifest), "--pid", str(target.pid), "--json")
        assert reg.returncode == 0, reg.stderr
        skill_id = json.loads(reg.stdout)["id"]
        ps = run("ps")
        assert ps.returncode == 0 and skill_id in ps.stdout and "cli-reg" in ps.stdout
        assert target.ask(op="tcp", port=servers[1].port) == {"errno": EPERM}
        import select

        assert select.select([events.stdout], [], [], 15)[0], "no event from `skillguard events`"
        event = json.loads(events.stdout.readline())
        assert event["skill_id"] == skill_id and event["layer"] == "network"
        refused = run("register", "--manifest", str(manifest), "--pid", str(target.pid))
        assert refused.returncode == 1 and "already confined" in refused.stderr
        out = run("unregister", skill_id)
        assert out.returncode == 0 and "unregistered" in out.stdout
        status = run("status")
        assert status.returncode == 0 and "register   available" in status.stdout
    finally:
        events.kill()
        events.wait()
        target.end()
