"""`Hooks.attach` / `skillguard attach` on the real kernel: processes started
outside skillguard are confined by cgroup BPF hooks, nftables socket cgroupv2
rules, cgroup limits and observed by syscall tracepoints.

Every process of these tests runs in the simulated host namespace of a
NetLab (tests/kernel/netlab.py): the test process enters it for this module,
so the nftables table lands there and the "internet" (198.51.100.0/24,
203.0.113.0/24, 2001:db8::/32) is reachable from it. Pins, the cgroup
subtree and the nft table have names unique to this run, and everything is
unloaded at the end.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, is_root, require
from tests.kernel import netlab

pytestmark = pytest.mark.root

WWW, WWW2, OTHER, V6, DNS = netlab.WWW, netlab.WWW2, netlab.OTHER, netlab.V6, netlab.DNS_SERVER
TAG = f"{os.getpid()}"
PIN_DIR = f"/sys/fs/bpf/sgt-attach-{TAG}"
SUBTREE = f"sgt-attach-{TAG}"
NFT_TABLE = f"sgt_attach_{TAG}"

# A process "started outside skillguard": it reads one JSON command per line
# and answers one JSON line. "fork" runs the command in a child process.
TARGET = r'''
import json, os, socket, sys, threading, time
threading.Thread(target=lambda: time.sleep(3600), daemon=True).start()  # a second thread
def do(cmd):
    op = cmd["op"]
    if op == "fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, json.dumps(do(cmd["cmd"])).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        return json.loads(data)
    if op == "spawn":  # a child that stays, for --tree
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        return {"pid": pid}
    try:
        if op in ("tcp", "tcp6"):
            fam = socket.AF_INET6 if ":" in cmd["host"] else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((cmd["host"], cmd["port"]))
                return {"ok": s.recv(100).decode()}
        if op == "udp":
            fam = socket.AF_INET6 if ":" in cmd["host"] else socket.AF_INET
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.sendto(cmd.get("data", "x").encode(), (cmd["host"], cmd["port"]))
                return {"ok": "sent"}
        if op == "open":
            with open(cmd["path"], cmd.get("mode", "r")) as f:
                return {"ok": "opened"}
        if op == "opens":
            for _ in range(cmd["n"]):
                try:
                    os.close(os.open(cmd["path"], os.O_RDONLY))
                except OSError:
                    pass
            return {"ok": "done"}
        if op == "connect_loop":
            wins = 0
            end = time.monotonic() + cmd["seconds"]
            n = 0
            while time.monotonic() < end:
                n += 1
                with socket.socket() as s:
                    s.settimeout(2)
                    try:
                        s.connect((cmd["host"], cmd["port"]))
                        wins += 1
                    except OSError:
                        pass
            return {"ok": wins, "tries": n}
        if op == "chdir":
            os.chdir(cmd["path"])
            return {"ok": os.getcwd()}
        if op == "hold_udp":  # a socket kept open across the attach
            HELD.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            return {"ok": len(HELD)}
    except OSError as e:
        return {"errno": e.errno}
    return {"error": "unknown op"}
HELD = []
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    print(json.dumps(do(json.loads(line))), flush=True)
'''


class Target:
    """A long-running process that skillguard did not start."""

    def __init__(self, cwd: Path | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd)
        ready = json.loads(self.proc.stdout.readline())
        self.pid = ready["ready"]

    def ask(self, timeout: float = 15.0, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"target did not answer {cmd}")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"target exited ({self.proc.wait()}) on {cmd}")
        return json.loads(line)

    def tcp(self, host: str, port: int) -> dict:
        return self.ask(op="tcp", host=host, port=port)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


EPERM = {"errno": 1}


def _ok(answer: dict) -> bool:
    return "ok" in answer


def _setns(path: str) -> int:
    """Enter the net namespace at `path`; return an fd of the one we left."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    return home


def _rmdir_subtree(name: str) -> None:
    from agent.attach.hooks import remove_subtree

    remove_subtree(name)


def _bcc_works() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return Path(f"/lib/modules/{os.uname().release}/build").exists()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require(is_root(), "needs root (euid 0)")
    require(_bcc_works(), "bcc (python3-bpfcc) and kernel headers are needed")
    lab = netlab.NetLab.create(tmp_path_factory.mktemp("attachlab"))
    home = _setns(lab.host_netns_path)
    try:
        yield lab
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(home, 0x40000000)
        os.close(home)
        lab.close()


@pytest.fixture(scope="module")
def hooks(lab):
    from agent.attach import Hooks

    events: list = []
    hooks = Hooks.load(pin_dir=PIN_DIR, subtree=SUBTREE, nft_table=NFT_TABLE, resolvers=[DNS],
                       emit=events.append)
    hooks.test_events = events
    try:
        yield hooks
    finally:
        hooks.close(unload=True)
        assert not os.path.exists(PIN_DIR)


@pytest.fixture
def events(hooks):
    hooks.poll(0)
    hooks.test_events.clear()
    return hooks.test_events


@pytest.fixture
def target(tmp_path):
    made = []

    def make(cwd=None):
        t = Target(cwd)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


def manifest(tmp_path: Path, extra: str = "", on_violation: str = "report", mode: str = "enforce"):
    from agent.manifest import load_text

    (tmp_path / "allowed").mkdir(exist_ok=True)
    (tmp_path / "allowed" / "ok.txt").write_text("ok")
    (tmp_path / "secret.txt").write_text("secret")
    text = f"""
name: attach-test
version: "1"
mode: {mode}
permissions:
  tcp:
    allowlist: ["{WWW}:8080", "[{V6}]:8080"{extra}]
  fs:
    dirs: ["{tmp_path}/allowed:ro"]
    on_violation: {on_violation}
"""
    result = load_text(text, "attach-test.yaml")
    assert result.ok, result.errors
    return result.policy


def _drain(hooks, events, want, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hooks.poll(50)
        if want(events):
            return events
    return events


# ------------------------------------------------------------------ network

def test_attached_process_reaches_only_its_grants(hooks, events, target, tmp_path, lab):
    t = target()
    assert _ok(t.tcp(WWW, 8081)), "before attach the lab host must be reachable"
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        assert attachment.layers["bpf-connect"] == "active"
        assert attachment.layers["nftables-cgroup"] == "active"
        assert t.tcp(WWW, 8080) == {"ok": f"hello ::ffff:{WWW} 8080\n"}  # dual-stack server
        assert t.tcp(WWW, 8081) == EPERM                      # same host, other port
        assert t.tcp(OTHER, 8080) == EPERM                    # other host
        assert _ok(t.tcp(V6, 8080))                           # IPv6 grant
        assert t.tcp(V6, 8081) == EPERM
        assert _ok(t.ask(op="tcp", host=f"::ffff:{WWW}", port=8080))   # IPv4-mapped -> v4 grant
        assert t.ask(op="tcp", host=f"::ffff:{OTHER}", port=8080) == EPERM
        assert t.ask(op="udp", host=WWW, port=9999, data="leak4") == EPERM
        assert t.ask(op="udp", host=V6, port=9999, data="leak6") == EPERM
        assert t.ask(op="udp", host=f"::ffff:{WWW}", port=9999, data="leakm") == EPERM
        assert t.ask(op="udp", host=DNS, port=53) == EPERM    # no host names: no DNS at all
        time.sleep(0.2)
        assert not [r for r in lab.received() if r.get("kind") == "udp" and r["data"].startswith("leak")]
        _drain(hooks, events, lambda ev: len([e for e in ev if e.layer == "network"]) >= 8)
        ops = {e.operation for e in events if e.layer == "network" and e.pid == t.pid}
        assert f"connect tcp {WWW}:8081" in ops
        assert f"connect tcp [{V6}]:8081" in ops
        assert f"connect tcp [::ffff:{OTHER}]:8080" in ops
        assert f"send udp {WWW}:9999" in ops
        assert all(e.decision == "denied" and e.skill == "attach-test" for e in events
                   if e.layer == "network")
        assert hooks.counters(attachment.skill_id)["net_denied"] >= 8
    finally:
        hooks.detach(attachment.skill_id)


def test_dns_only_to_the_resolver_for_named_hosts(hooks, events, target, tmp_path):
    t = target()
    attachment = hooks.attach(manifest(tmp_path, extra=', "www.example.test:8080"'), [t.pid])
    try:
        assert attachment.layers["network-names"].startswith("needs launch: ")
        assert _ok(t.ask(op="udp", host=DNS, port=53))        # the resolver
        assert t.ask(op="udp", host=OTHER, port=53) == EPERM  # any other DNS server
        assert t.tcp(WWW, 8081) == EPERM
    finally:
        hooks.detach(attachment.skill_id)


def test_nftables_layer_rejects_on_its_own(hooks, target, tmp_path):
    """Take the BPF verdict out of the way (skill entry removed from the map):
    the socket cgroupv2 chain alone still rejects ungranted destinations.
    Exact grants live in hash sets written over netlink, prefix and any-port
    grants in interval sets written by libnftables: both are checked."""
    from agent.enforce.bpf_maps import skill_key

    t = target()
    other = target()
    # WWW2 is in the /28 (inside the /24), V6 in the /64: nested prefixes in the interval sets
    prefixes = ', "198.51.100.16/28:*", "198.51.100.0/24:8082", "[2001:db8::/64]:8081"'
    attachment = hooks.attach(manifest(tmp_path, extra=prefixes), [t.pid])
    bystander = hooks.attach(manifest(tmp_path), [other.pid])  # a second skill's elements stay apart
    try:
        saved = hooks.maps.maps["skills"].lookup(skill_key(attachment.cgroup_id))
        hooks.maps.maps["skills"].delete(skill_key(attachment.cgroup_id))
        try:
            assert _ok(t.tcp(WWW, 8080))                 # exact (hash set)
            assert t.tcp(WWW, 8081) == {"errno": 113}    # EHOSTUNREACH: icmpx admin-prohibited
            assert _ok(t.tcp(WWW2, 8081))                # prefix, any port (interval set)
            assert _ok(t.tcp(V6, 8080))                  # exact IPv6
            assert _ok(t.tcp(V6, 8081))                  # IPv6 prefix
            assert t.tcp(OTHER, 8080) == {"errno": 113}
            assert hooks.counters(attachment.skill_id)["nft_rejected_all_skills"] >= 2
        finally:
            hooks.maps.maps["skills"].update(skill_key(attachment.cgroup_id), saved)
    finally:
        hooks.detach(attachment.skill_id)
    try:
        assert _ok(t.tcp(WWW, 8081))                     # its elements are gone with it
        assert hooks.nft.exists()                        # the other skill keeps the table
    finally:
        hooks.detach(bystander.skill_id)
    assert not hooks.nft.exists()                        # the last skill takes it away


# ------------------------------------------------------------------ processes

def test_threads_and_later_children_are_confined(hooks, target, tmp_path):
    t = target()
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        tids = os.listdir(f"/proc/{t.pid}/task")
        assert len(tids) >= 2
        rel = "/" + str(Path(attachment.cgroup_path).relative_to(hooks.v2_mount))
        for tid in tids:
            lines = Path(f"/proc/{t.pid}/task/{tid}/cgroup").read_text().splitlines()
            assert f"0::{rel}" in lines
            assert any(line.split(":")[1] == "pids" and line.endswith(rel) for line in lines)
        # a child forked after the attach is born in the cgroup, so it is confined too
        assert t.ask(op="fork", cmd={"op": "tcp", "host": WWW, "port": 8081}) == EPERM
        assert _ok(t.ask(op="fork", cmd={"op": "tcp", "host": WWW, "port": 8080}))
    finally:
        hooks.detach(attachment.skill_id)


def test_tree_moves_existing_descendants(hooks, target, tmp_path):
    t = target()
    child = t.ask(op="spawn")["pid"]
    plain = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        assert plain.pids == (t.pid,)
        assert child not in hooks.members(plain.skill_id)
    finally:
        hooks.detach(plain.skill_id)
    tree = hooks.attach(manifest(tmp_path), [t.pid], tree=True)
    try:
        assert set(tree.pids) == {t.pid, child}
        assert set(hooks.members(tree.skill_id)) == {t.pid, child}
    finally:
        hooks.detach(tree.skill_id)
    os.kill(child, signal.SIGKILL)


def test_resource_limits_apply(hooks, target, tmp_path):
    from agent.manifest import load_text

    policy = load_text('name: lim\nversion: "1"\nresources: {pids: 7, memory: 64M}\n', "lim.yaml").policy
    t = target()
    attachment = hooks.attach(policy, [t.pid])
    try:
        where = dict(line.split(":", 2)[1:] for line in
                     Path(f"/proc/{t.pid}/cgroup").read_text().splitlines())
        from agent.enforce.cgroupfs import cgroup_mounts

        mounts = cgroup_mounts()
        if "pids" in mounts.v1:
            assert (mounts.v1["pids"] / where["pids"].lstrip("/") / "pids.max").read_text().strip() == "7"
        else:
            assert (Path(attachment.cgroup_path) / "pids.max").read_text().strip() == "7"
    finally:
        hooks.detach(attachment.skill_id)


def test_detach_restores_access_and_removes_everything(hooks, target, tmp_path):
    from agent.enforce.bpf_maps import skill_key

    t = target()
    before = Path(f"/proc/{t.pid}/cgroup").read_text()
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    assert t.tcp(WWW, 8081) == EPERM
    hooks.detach(attachment.skill_id)
    assert _ok(t.tcp(WWW, 8081))
    assert _ok(t.ask(op="udp", host=WWW, port=9999))
    assert Path(f"/proc/{t.pid}/cgroup").read_text() == before
    assert not Path(attachment.cgroup_path).exists()
    assert hooks.maps.maps["skills"].lookup(skill_key(attachment.cgroup_id)) is None
    assert not [k for k in hooks.maps.maps["allow4"].keys()
                if int.from_bytes(k[4:12], "little") == attachment.cgroup_id]
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert NFT_TABLE not in out  # the last skill went: the table went with it


def test_unattached_process_sees_no_difference_and_no_events(hooks, events, target, tmp_path, lab):
    confined = target()
    free = target()
    attachment = hooks.attach(manifest(tmp_path), [confined.pid])
    try:
        assert confined.tcp(WWW, 8081) == EPERM
        assert _ok(free.tcp(WWW, 8081))
        assert _ok(free.tcp(OTHER, 8080))
        assert _ok(free.ask(op="udp", host=WWW, port=9999, data="free"))
        assert _ok(free.ask(op="open", path=str(tmp_path / "secret.txt")))
        _drain(hooks, events, lambda ev: False, timeout=0.5)
        assert [e for e in events if e.pid == free.pid] == []
        assert [e for e in events if e.pid == confined.pid]
    finally:
        hooks.detach(attachment.skill_id)


def test_require_refuses_and_changes_nothing(hooks, target, tmp_path):
    from agent.attach import AttachError

    t = target()
    before = Path(f"/proc/{t.pid}/cgroup").read_text()
    skills_before = hooks.maps.skills()
    for required, words in ((["seccomp"], "seccomp (needs launch"),
                            (["landlock", "bpf-connect"], "landlock (needs launch"),
                            (["no-such-layer"], "unknown layer")):
        with pytest.raises(AttachError) as info:
            hooks.attach(manifest(tmp_path), [t.pid], require=required)
        assert words in str(info.value)
    assert Path(f"/proc/{t.pid}/cgroup").read_text() == before
    assert hooks.maps.skills() == skills_before
    assert not any((hooks.v2_mount / SUBTREE).glob("*/*"))
    ok = hooks.attach(manifest(tmp_path), [t.pid], require=["bpf-connect", "nftables-cgroup", "cgroup"])
    hooks.detach(ok.skill_id)


def test_sockets_held_before_the_attach_are_reported_and_refused_when_required(hooks, target, tmp_path):
    from agent.attach import AttachError

    t = target()
    assert _ok(t.ask(op="hold_udp"))
    before = Path(f"/proc/{t.pid}/cgroup").read_text()
    with pytest.raises(AttachError) as info:
        hooks.attach(manifest(tmp_path), [t.pid], require=["bpf-connect"])
    assert "1 inet socket(s) opened before the attach" in str(info.value)
    assert Path(f"/proc/{t.pid}/cgroup").read_text() == before
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        assert attachment.layers["bpf-connect"].startswith("partial: 1 inet socket(s)")
        assert attachment.layers["cgroup"] == "active"
    finally:
        hooks.detach(attachment.skill_id)
    fresh = target()
    attachment = hooks.attach(manifest(tmp_path), [fresh.pid])
    try:
        assert attachment.layers["bpf-connect"] == "active"
    finally:
        hooks.detach(attachment.skill_id)


# ------------------------------------------------------------------ files

def test_opens_of_disallowed_paths_are_events_with_resolved_paths(hooks, events, target, tmp_path):
    t = target(cwd=tmp_path)
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        assert attachment.layers["fs-observe"] == "active"
        assert _ok(t.ask(op="open", path=str(tmp_path / "allowed" / "ok.txt")))
        assert _ok(t.ask(op="open", path=str(tmp_path / "secret.txt")))
        assert _ok(t.ask(op="open", path="secret.txt"))                # relative to the cwd
        assert _ok(t.ask(op="open", path="allowed/../secret.txt"))     # '..' resolved
        assert _ok(t.ask(op="open", path=str(tmp_path / "allowed" / "new.txt"), mode="w"))  # ro grant
        want = {str(tmp_path / "secret.txt"), str(tmp_path / "allowed" / "new.txt")}
        _drain(hooks, events, lambda ev: len([e for e in ev if e.layer == "fs"]) >= 4)
        fs = [e for e in events if e.layer == "fs" and e.pid == t.pid]
        assert {e.operation for e in fs} >= want
        given = {e.detail.split("'")[1] for e in fs if e.operation == str(tmp_path / "secret.txt")}
        assert given >= {str(tmp_path / "secret.txt"), "secret.txt", "allowed/../secret.txt"}
        assert all(e.decision == "audited" for e in fs)
        assert not [e for e in fs if e.operation == str(tmp_path / "allowed" / "ok.txt")]
        assert [e for e in fs if e.operation.endswith("new.txt") and "write_file" in e.rule]
    finally:
        hooks.detach(attachment.skill_id)


def test_kill_on_violation_kills_the_process(hooks, events, target, tmp_path):
    t = target()
    attachment = hooks.attach(manifest(tmp_path, on_violation="kill"), [t.pid])
    try:
        assert attachment.layers["fs-kill"] == "active"
        assert _ok(t.ask(op="open", path=str(tmp_path / "allowed" / "ok.txt")))
        assert _ok(t.ask(op="open", path="/usr/lib/os-release"))  # base profile
        with pytest.raises(EOFError):
            t.ask(op="open", path="/var/lib/dpkg/status")
        assert t.proc.wait(5) == -signal.SIGKILL
        _drain(hooks, events, lambda ev: any(e.decision == "killed" for e in ev))
        killed = [e for e in events if e.decision == "killed"]
        assert killed and killed[0].operation == "/var/lib/dpkg/status" and killed[0].pid == t.pid
        assert hooks.counters(attachment.skill_id)["fs_killed"] == 1
    finally:
        hooks.detach(attachment.skill_id)


def test_a_kill_read_after_the_process_is_gone_still_names_its_skill(hooks, events, target, tmp_path):
    """The daemon detaches a skill when its cgroup empties (inotify); the
    kill's event may still wait in the ring buffer then. detach() reads the
    ring first, so the event is reported for the skill, not for a bare
    cgroup id."""
    t = target()
    attachment = hooks.attach(manifest(tmp_path, on_violation="kill"), [t.pid])
    events.clear()
    with pytest.raises(EOFError):
        t.ask(op="open", path="/var/lib/dpkg/status")
    assert t.proc.wait(5) == -signal.SIGKILL
    hooks.detach(attachment.skill_id)  # no poll before it: the event is still in the ring
    _drain(hooks, events, lambda ev: any(e.decision == "killed" for e in ev))
    killed = [e for e in events if e.decision == "killed"]
    assert killed and killed[0].skill == attachment.name and killed[0].pid == t.pid


def test_tracepoints_only_while_a_skill_needs_them(hooks, target, tmp_path):
    from agent.enforce import bpf_hooks

    assert not bpf_hooks.tracepoints_attached(hooks.loaded)
    t = target()
    quiet = hooks.attach(manifest(tmp_path), [t.pid], observe_fs=False)
    assert quiet.layers["fs-observe"] == "off"
    assert not bpf_hooks.tracepoints_attached(hooks.loaded)
    u = target()
    loud = hooks.attach(manifest(tmp_path), [u.pid])
    assert bpf_hooks.tracepoints_attached(hooks.loaded)
    hooks.detach(loud.skill_id)
    assert not bpf_hooks.tracepoints_attached(hooks.loaded)
    hooks.detach(quiet.skill_id)


def test_tracepoints_attach_again_at_once_after_a_detach(hooks):
    # A perf-event link leaves its tracepoint from a kernel workqueue after
    # the unpin; attaching the same program before that gave EEXIST.
    from agent.enforce import bpf_hooks

    assert not bpf_hooks.tracepoints_attached(hooks.loaded)
    try:
        for _ in range(100):
            bpf_hooks.attach_tracepoints(hooks.loaded)
            assert bpf_hooks.tracepoints_attached(hooks.loaded)
            bpf_hooks.detach_tracepoints(hooks.loaded)
    finally:
        bpf_hooks.detach_tracepoints(hooks.loaded)
    assert not bpf_hooks.tracepoints_attached(hooks.loaded)


def test_an_observing_skill_right_after_the_last_one_left_is_observed_once(hooks, events, target, tmp_path):
    t = target(cwd=tmp_path)
    for _ in range(10):
        attachment = hooks.attach(manifest(tmp_path), [t.pid])
        assert attachment.layers["fs-observe"] == "active"
        hooks.detach(attachment.skill_id)
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        hooks.poll(0)
        events.clear()
        assert _ok(t.ask(op="open", path=str(tmp_path / "secret.txt")))
        _drain(hooks, events, lambda ev: any(e.layer == "fs" for e in ev))
        hooks.poll(200)  # a second program on the tracepoint would add a second event
        fs = [e for e in events if e.layer == "fs" and e.pid == t.pid]
        assert [e.operation for e in fs] == [str(tmp_path / "secret.txt")]
    finally:
        hooks.detach(attachment.skill_id)


def test_a_half_attached_set_of_tracepoints_is_completed(hooks):
    # An agent killed half-way through attaching leaves some links pinned;
    # the next one must not take them for the whole set.
    from agent.enforce import bpf_hooks

    bpf_hooks.attach_tracepoints(hooks.loaded)
    try:
        first = f"link_tp_{bpf_hooks.TRACEPOINT_PROGRAMS[0][1]}"
        bpf_hooks._drop_link(hooks.loaded, first)
        assert not bpf_hooks.tracepoints_attached(hooks.loaded)
        bpf_hooks.attach_tracepoints(hooks.loaded)
        assert bpf_hooks.tracepoints_attached(hooks.loaded)
    finally:
        bpf_hooks.detach_tracepoints(hooks.loaded)


def test_lost_events_are_counted(hooks, target, tmp_path):
    t = target()
    attachment = hooks.attach(manifest(tmp_path), [t.pid])
    try:
        before = hooks.lost_events()
        # ~5,000 events fill the 1 MiB ring while nobody reads it
        assert _ok(t.ask(op="opens", path=str(tmp_path / "nope"), n=8000))
        assert hooks.lost_events() > before
    finally:
        hooks.poll(0)
        hooks.detach(attachment.skill_id)


def test_a_thousand_skills_with_one_policy_share_one_prefix_set(hooks, tmp_path):
    """1,050 live skills with the base profile fit (one prefix set per distinct
    policy, not per skill); the set goes when the last of its skills detaches."""
    from agent.enforce.bpf_maps import SKILL, PolicyMaps, path_entry, skill_key

    policy = manifest(tmp_path, on_violation="kill")
    prefixes = hooks.prepare(policy).fs_prefixes
    assert len(prefixes) > 60  # the base profile's prefixes: 1,050 copies would not fit in 65,536
    sleepers, attached = [], []

    def set_keys(fs_id):
        return [k for k in hooks.maps.maps["fs_prefixes"].keys() if path_entry(k)[0] == fs_id]
    try:
        for _ in range(1050):
            sleepers.append(subprocess.Popen(["sleep", "600"]))
            attached.append(hooks.attach(policy, [sleepers[-1].pid]))
        fs_ids = {SKILL.unpack(hooks.maps.maps["skills"].lookup(skill_key(a.cgroup_id)))[1]
                  for a in attached}
        assert len(fs_ids) == 1 and 0 not in fs_ids
        fs_id = fs_ids.pop()
        assert sorted(path_entry(k)[1] for k in set_keys(fs_id)) == sorted(prefixes)
        assert len(hooks.maps.maps["fs_prefixes"].keys()) == len(prefixes)  # no other copy
        # A restarted agent rebuilds the user counts from the pinned maps.
        assert PolicyMaps(hooks.loaded.map_fds).prefix_sets.users == {fs_id: 1050}
        for a in attached[:-1]:
            hooks.detach(a.skill_id)
        assert len(set_keys(fs_id)) == len(prefixes)  # one user left: the set stays
        hooks.detach(attached[-1].skill_id)
        attached.clear()
        assert set_keys(fs_id) == [] and hooks.maps.prefix_sets.users == {}
    finally:
        for a in attached:
            try:
                hooks.detach(a.skill_id)
            except Exception:  # noqa: BLE001 - already detached
                pass
        for p in sleepers:
            p.kill()
            p.wait()


def test_a_pin_dir_of_another_map_layout_is_refused(hooks):
    from agent.enforce import bpf_hooks, bpf_sys

    old = f"{PIN_DIR}-oldlayout"
    os.makedirs(old)
    try:
        bpf_sys.obj_pin(hooks.loaded.map_fds["skills"], f"{old}/skills")  # maps, no `layout` pin
        with pytest.raises(bpf_hooks.BpfError, match="layout .* this agent uses layout 2"):
            bpf_hooks.load(Path("/nonexistent"), old)
        assert os.listdir(old) == ["skills"]  # refused before anything was created
    finally:
        for name in os.listdir(old):
            os.unlink(f"{old}/{name}")
        os.rmdir(old)


# ------------------------------------------------------------------ the agent dies

def test_enforcement_survives_sigkill_of_the_agent_and_a_restart_takes_over(tmp_path, target, lab):
    from agent.attach import Hooks
    from agent.enforce import bpf_sys

    pin, subtree, table = PIN_DIR + "-k", SUBTREE + "-k", NFT_TABLE + "_k"
    path = tmp_path / "m.yaml"
    path.write_text(f'name: survivor\nversion: "1"\npermissions:\n  tcp:\n    allowlist: ["{WWW}:8080"]\n')
    t = target()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "attach", "--manifest", str(path), "--pid", str(t.pid),
         "--pin-dir", pin, "--subtree", subtree, "--nft-table", table, "--resolver", DNS],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    restarted = None
    try:
        line = agent.stdout.readline()
        assert line.startswith('{"attached"'), line + agent.stderr.read()
        assert t.tcp(WWW, 8081) == EPERM
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        assert t.tcp(WWW, 8081) == EPERM                   # pinned links keep enforcing
        assert _ok(t.tcp(WWW, 8080))
        old_links = {name: bpf_sys.obj_get(f"{pin}/{name}") for name in os.listdir(pin)
                     if name.startswith("link_connect")}
        old_progs = {n: bpf_sys.link_prog_id(fd) for n, fd in old_links.items()}
        # A restarted agent replaces the programs while the process keeps trying:
        # not one connect may slip through during the swap.
        t.proc.stdin.write(json.dumps({"op": "connect_loop", "host": WWW, "port": 8081,
                                       "seconds": 2.5}) + "\n")
        t.proc.stdin.flush()
        restarted = Hooks.load(pin_dir=pin, subtree=subtree, nft_table=table, resolvers=[DNS])
        loop = json.loads(t.proc.stdout.readline())
        assert loop["ok"] == 0 and loop["tries"] > 10, loop
        assert restarted.restarted
        for name, fd in old_links.items():
            assert bpf_sys.link_prog_id(fd) != old_progs[name]   # same link, new program
            os.close(fd)
        orphans = [a for a in restarted.attachments() if a.name == "survivor"]
        assert [a.pids for a in orphans] == [(t.pid,)]
        assert t.tcp(WWW, 8081) == EPERM
        restarted.detach(orphans[0].skill_id)
        assert _ok(t.tcp(WWW, 8081))
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if restarted is None:
            restarted = Hooks.load(pin_dir=pin, subtree=subtree, nft_table=table, resolvers=[DNS])
        restarted.close(unload=True)
    assert not os.path.exists(pin)


def test_cli_attach_prints_events_and_detaches_on_sigterm(tmp_path, target, lab):
    pin, subtree, table = PIN_DIR + "-c", SUBTREE + "-c", NFT_TABLE + "_c"
    path = tmp_path / "m.yaml"
    path.write_text(f'name: clitest\nversion: "1"\npermissions:\n  tcp:\n    allowlist: ["{WWW}:8080"]\n')
    t = target()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "attach", "--manifest", str(path), "--pid", str(t.pid),
         "--pin-dir", pin, "--subtree", subtree, "--nft-table", table, "--require", "bpf-connect"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        attached = json.loads(agent.stdout.readline())["attached"]
        assert attached["pids"] == [t.pid]
        assert t.tcp(OTHER, 8080) == EPERM
        event = json.loads(agent.stdout.readline())
        assert event["layer"] == "network" and event["operation"] == f"connect tcp {OTHER}:8080"
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=20)
        assert agent.returncode == 0
        assert '"detached"' in out
        assert _ok(t.tcp(OTHER, 8080))
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        from agent.enforce import bpf_hooks

        bpf_hooks.remove_pins(pin)  # the CLI leaves programs pinned (cheap, no skill = allow)
        _rmdir_subtree(subtree)


def test_cli_attach_require_refuses(tmp_path, target, lab):
    path = tmp_path / "m.yaml"
    path.write_text('name: clireq\nversion: "1"\n')
    t = target()
    pin = PIN_DIR + "-r"
    done = subprocess.run(
        [sys.executable, "-m", "agent", "attach", "--manifest", str(path), "--pid", str(t.pid),
         "--pin-dir", pin, "--subtree", SUBTREE + "-r", "--nft-table", NFT_TABLE + "_r",
         "--require", "seccomp"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    from agent.enforce import bpf_hooks

    bpf_hooks.remove_pins(pin)
    _rmdir_subtree(SUBTREE + "-r")
    assert done.returncode == 1
    assert "seccomp (needs launch: a seccomp filter can only be installed by the process itself)" \
        in done.stderr
    assert "nothing was changed" in done.stderr


# ------------------------------------------------------------------ several at once

def test_attach_many_writes_one_transaction_and_refuses_only_the_one_at_fault(hooks, target, tmp_path):
    """Hooks.attach_many: the nft elements of every request go in one
    transaction; when the kernel refuses it, each request's are written alone,
    so the request at fault is refused (nothing of it left, its process where
    it was) and the others are attached and confined."""
    from agent.attach.hooks import AttachError, AttachRequest
    from agent.manifest import load_text

    # Nested prefixes whose port ranges meet: nf_tables refuses the interval
    # element (EEXIST), so the batch holding it fails as a whole.
    bad = load_text('name: attach-bad\nversion: "1"\npermissions:\n  tcp:\n'
                    '    allowlist: ["10.0.0.0/8:1", "10.1.0.0/16:*"]\n', "bad.yaml").policy
    good = manifest(tmp_path)
    first, middle, last = target(), target(), target()
    before = open(f"/proc/{middle.pid}/cgroup").read()
    results = hooks.attach_many([AttachRequest(good, (first.pid,)), AttachRequest(bad, (middle.pid,)),
                                 AttachRequest(good, (last.pid,))])
    try:
        assert isinstance(results[1], AttachError) and results[1].layer == "nftables-cgroup"
        assert open(f"/proc/{middle.pid}/cgroup").read() == before
        assert "attach-bad" not in {a.name for a in hooks.attachments()}
        assert _ok(middle.tcp(WWW, 8081))
        for t, attachment in ((first, results[0]), (last, results[2])):
            assert attachment.pids == (t.pid,) and attachment.layers["nftables-cgroup"] == "active"
            assert hooks.members(attachment.skill_id) == [t.pid]
            assert t.tcp(WWW, 8081) == EPERM
            assert _ok(t.tcp(WWW, 8080))
        assert results[0].cgroup_id != results[2].cgroup_id
    finally:
        for result in results:
            if not isinstance(result, BaseException):
                hooks.detach(result.skill_id)


def test_attach_many_refusal_in_one_request_leaves_the_others(hooks, target, tmp_path):
    from agent.attach.hooks import AttachError, AttachRequest

    policy = manifest(tmp_path)
    alive, other = target(), target()
    results = hooks.attach_many([AttachRequest(policy, (4_000_000,)), AttachRequest(policy, (alive.pid,)),
                                 AttachRequest(policy, (other.pid,), require=("seccomp",))])
    try:
        assert isinstance(results[0], AttachError) and results[0].layer == "pids"
        assert isinstance(results[2], AttachError) and results[2].layer == "require"
        assert results[1].pids == (alive.pid,) and alive.tcp(WWW, 8081) == EPERM
        assert _ok(other.tcp(WWW, 8081))
    finally:
        if not isinstance(results[1], BaseException):
            hooks.detach(results[1].skill_id)


# ------------------------------------------------------------------ cgroup pool

def _spares(pool, name: str) -> list:
    return [c for (skill, _limits), queue in pool.spares.items() if skill == name for c in queue]


def _wait_for_spares(pool, name: str, timeout: float = 10.0, at_least: int = 1) -> list:
    deadline = time.monotonic() + timeout
    while len(_spares(pool, name)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"no spare cgroups for {name} (helper: {pool.problem})")
        select.select([pool.fileno()], [], [], 0.2)
        pool.on_readable()
    return _spares(pool, name)


def test_pool_spares_carry_the_limits_and_confine_like_cgroups_made_on_the_spot(hooks, target, tmp_path):
    from agent.enforce.cgroupfs import cgroup_mounts
    from agent.manifest import load_text

    policy = load_text(f'name: pooled\nversion: "1"\nresources: {{pids: 7, memory: 64M}}\n'
                       f'permissions:\n  tcp:\n    allowlist: ["{WWW}:8080"]\n', "pooled.yaml").policy
    pool = hooks.start_pool()
    first = second = None
    try:
        first = hooks.attach(policy, [target().pid])  # no spare yet: made here, and more asked for
        spares = _wait_for_spares(pool, "pooled", at_least=2)  # one is taken below, one must be left
        helper_made = {c.v2 for c in spares}
        assert all(os.path.basename(p).startswith("reg-") for p in helper_made)
        t = target()
        second = hooks.attach(policy, [t.pid])
        assert second.cgroup_path in helper_made               # a spare was taken...
        assert second.cgroup_path not in {c.v2 for c in _spares(pool, "pooled")}
        where = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{t.pid}/cgroup").read_text().splitlines())
        assert "/" + os.path.relpath(second.cgroup_path, cgroup_mounts().v2) == where[""]
        mounts = cgroup_mounts()
        if "pids" in mounts.v1:                                # ...with the limits written by the helper
            assert (mounts.v1["pids"] / where["pids"].lstrip("/") / "pids.max").read_text().strip() == "7"
        assert t.tcp(WWW, 8081) == EPERM                       # and it confines
        assert _ok(t.tcp(WWW, 8080))
        left = [c.v2 for c in _spares(pool, "pooled")]
        assert left and all(os.path.isdir(p) for p in left)
    finally:
        for attachment in (first, second):
            if attachment is not None:
                hooks.detach(attachment.skill_id)
        hooks.pool.close()
        hooks.pool = None
    assert not any(os.path.exists(p) for p in left)          # spares go with the pool
    assert not pool.pid


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_pool_spares_come_with_their_cgroup_procs_fds_which_the_move_uses_and_closes(hooks, target, tmp_path):
    from agent.manifest import load_text

    policy = load_text('name: pooledfds\nversion: "1"\n', "pooledfds.yaml").policy
    before = _open_fds()
    pool = hooks.start_pool()
    attachment = None
    try:
        pool.take("pooledfds", hooks._plan(policy, True)[2])   # asks the helper for spares
        spare = _wait_for_spares(pool, "pooledfds")[0]
        files = spare._procs_files
        assert spare.held_fds == len(files) >= 2              # one write fd per hierarchy (v2 and v1)
        for fd, path in zip(spare._procs_fds, files):          # each is that spare's cgroup.procs, for writing
            assert os.readlink(f"/proc/self/fd/{fd}") == path
            assert os.get_inheritable(fd) is False and os.stat(fd).st_ino == os.stat(path).st_ino
        assert pool.held == sum(c.held_fds for c in _spares(pool, "pooledfds"))
        t = target()
        attachment = hooks.attach(policy, [t.pid])
        assert attachment.cgroup_path == spare.v2              # the spare was taken...
        lines = Path(f"/proc/{t.pid}/cgroup").read_text().splitlines()
        where = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
        for path in files:                                     # ...the process is in every hierarchy of it...
            assert str(t.pid) in Path(path).read_text().split()
        assert where[""].endswith(os.path.basename(spare.v2))
        assert spare.held_fds == 0                             # ...and its fds are closed after the move
        assert pool.held == sum(c.held_fds for c in _spares(pool, "pooledfds"))
    finally:
        if attachment is not None:
            hooks.detach(attachment.skill_id)
        hooks.pool.close()
        hooks.pool = None
    assert pool.held == 0
    left_open = [os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - before
                 if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [t for t in left_open if t.endswith("cgroup.procs") or t.startswith("socket:")]  # the pool's are closed


def test_pool_falls_back_to_making_cgroups_when_its_helper_is_gone(hooks, target, tmp_path):
    from agent.manifest import load_text

    policy = load_text('name: poolgone\nversion: "1"\n', "poolgone.yaml").policy
    pool = hooks.start_pool()
    try:
        os.kill(pool.pid, signal.SIGKILL)
        os.waitpid(pool.pid, 0)
        pool.pid = 0
        attachment = hooks.attach(policy, [target().pid])  # made here; asking the helper fails...
        pool.on_readable()
        assert pool.sock is None and pool.problem              # ...and the pool stops asking
        assert os.path.isdir(attachment.cgroup_path)
        assert hooks.attach(policy, [target().pid]).cgroup_path != attachment.cgroup_path
    finally:
        for a in hooks.attachments():
            if a.name == "poolgone":
                hooks.detach(a.skill_id)
        hooks.pool.close()
        hooks.pool = None


def test_spares_left_by_a_killed_agent_are_removed_and_nothing_else(lab):
    from agent.attach.cgroup_pool import remove_stale_spares
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    subtree = SUBTREE + "-spares"
    v2 = mounts.v2 / subtree / "sk"
    stale, kept_in_use, populated, launched = (v2 / "reg-aaaa", v2 / "reg-bbbb", v2 / "reg-cccc", v2 / "run-1")
    v1_stale = [m / subtree / "sk" / "reg-aaaa" for c, m in mounts.v1.items() if c in ("memory", "pids", "cpu")]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for d in (stale, kept_in_use, populated, launched, *v1_stale):
            d.mkdir(parents=True)
        (populated / "cgroup.procs").write_text(str(sleeper.pid))
        removed = remove_stale_spares(mounts.v2, mounts.v1, subtree, {os.stat(kept_in_use).st_ino})
        assert removed == 1
        assert not stale.exists() and not any(p.exists() for p in v1_stale)
        assert kept_in_use.is_dir() and populated.is_dir() and launched.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in (populated, kept_in_use, launched, stale, *v1_stale):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        for top in [mounts.v2] + [m for c, m in mounts.v1.items() if c in ("memory", "pids", "cpu")]:
            for d in (top / subtree / "sk", top / subtree):
                try:
                    d.rmdir()
                except OSError:
                    pass
