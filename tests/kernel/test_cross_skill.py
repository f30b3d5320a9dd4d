"""Two skills running at the same time cannot reach each other.

Skill B (`xskill-b`) starts under `skillguard run`, listens on an abstract
unix socket, writes a secret into its own state dir, and waits. While it
runs, skill A (`xskill-a`) is launched and tries every way across: signals,
pidfd, ptrace, /proc, B's abstract socket, B's state dir. Then B reports
whether anything reached it. One test per item.

The launched skills are kept apart by several layers at once (own PID and
network namespaces, own uid, seccomp, Landlock scopes). The last tests take
the namespaces away and show that each of the other layers refuses on its
own: a different uid stops signals (but not abstract sockets: those have no
owner), and Landlock's scopes stop both, even between processes of the same
uid.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require
from launching import launch_command, read_events, write_manifest

SKILL_B = r"""
import json, os, signal, socket, sys, time
shared, token = sys.argv[1:3]
got = []
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, lambda n, f: got.append(n))
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\0" + token)
server.listen(8)
server.setblocking(False)
home = os.environ["HOME"]
with open(os.path.join(home, "secret"), "w") as fh:
    fh.write("b's secret\n")
with open(f"{shared}/b-ready.tmp", "w") as fh:
    json.dump({"uid": os.getuid(), "home": home}, fh)
os.rename(f"{shared}/b-ready.tmp", f"{shared}/b-ready")
accepted = 0
deadline = time.monotonic() + 40
while not os.path.exists(f"{shared}/a-done") and time.monotonic() < deadline:
    try:
        conn, _ = server.accept()
        accepted += 1
        conn.close()
    except BlockingIOError:
        time.sleep(0.02)
with open(f"{shared}/b-report", "w") as fh:
    json.dump({"accepted": accepted, "signals": got}, fh)
"""

SKILL_A = r"""
import ctypes, errno, json, os, signal, socket, sys
shared, token, b_pid, b_state = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def raw(nr, *args):
    if libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def connect():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("\0" + token)
def read(path):
    with open(path, "rb") as fh:
        fh.read()
def write(path):
    with open(path, "w") as fh:
        fh.write("planted")
out = {"uid": os.getuid()}
out["kill_term"] = attempt(lambda: os.kill(b_pid, signal.SIGTERM))
out["kill_usr1"] = attempt(lambda: os.kill(b_pid, signal.SIGUSR1))
out["kill_probe"] = attempt(lambda: os.kill(b_pid, 0))
out["pidfd_open"] = attempt(lambda: raw(434, b_pid, 0))
out["ptrace_attach"] = attempt(lambda: raw(101, 16, b_pid, 0, 0))       # PTRACE_ATTACH
out["ptrace_seize"] = attempt(lambda: raw(101, 0x4206, b_pid, 0, 0))    # PTRACE_SEIZE
out["process_vm_readv"] = attempt(lambda: raw(310, b_pid, 0, 0, 0, 0, 0))
out["proc_mem"] = attempt(lambda: read(f"/proc/{b_pid}/mem"))
out["abstract_connect"] = attempt(connect)
out["state_list"] = attempt(lambda: os.listdir(b_state))
out["state_read"] = attempt(lambda: read(f"{b_state}/secret"))
out["state_write"] = attempt(lambda: write(f"{b_state}/planted"))
out["state_root_list"] = attempt(lambda: os.listdir(os.path.dirname(b_state)))
print(json.dumps(out))
"""

DENIED = ("EACCES", "EPERM", "EROFS")


@pytest.fixture(scope="module", autouse=True)
def _kernel_features():
    require(os.geteuid() == 0, "needs root (euid 0)")
    from agent.enforce.landlock import abi_version

    require(abi_version() >= 1, "Landlock is not available")


def _launch(area: Path, name: str, argv: list[str], **popen) -> subprocess.Popen:
    m = write_manifest(area, name, [f"{area}/shared:rw", f"{area}/code:ro"],
                       resources={"timeout": "45s"})
    cmd = launch_command(m, area / f"{name}.events", area / "state")
    return subprocess.Popen(cmd + argv, cwd=REPO_ROOT, **popen)


def _host_pid_of(uid: int, script: Path) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        if int(uids[0]) == uid and len(argv) > 1 and argv[1] == os.fsencode(script):
            return int(entry)
    raise AssertionError(f"no process of uid {uid} runs {script}")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"skill exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_skills():
    area = Path(tempfile.mkdtemp(prefix="skillguard-xskill-", dir="/var/tmp"))
    area.chmod(0o755)
    try:
        (area / "shared").mkdir(mode=0o777)
        (area / "shared").chmod(0o777)
        (area / "code").mkdir()
        (area / "state").mkdir(mode=0o711)
        script_a, script_b = area / "code" / "a.py", area / "code" / "b.py"
        script_a.write_text(SKILL_A)
        script_b.write_text(SKILL_B)
        token = f"skillguard-xskill-{uuid.uuid4().hex}"
        shared = area / "shared"
        b = _launch(area, "xskill-b", ["python3", str(script_b), str(shared), token],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(shared / "b-ready", b)
            ready = json.loads((shared / "b-ready").read_text())
            b_pid = _host_pid_of(ready["uid"], script_b)
            a = _launch(area, "xskill-a", ["python3", str(script_a), str(shared), token, str(b_pid),
                                           ready["home"]],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            a_out, a_err = a.communicate(timeout=60)
            assert a.returncode == 0, a_err
            # B ran through all of A's attempts: it is still there, as itself.
            b_still_running = b.poll() is None and Path(f"/proc/{b_pid}").exists()
            (shared / "a-done").write_text("")
            b.communicate(timeout=30)
            assert b.returncode == 0
            report = json.loads((shared / "b-report").read_text())
        finally:
            if b.poll() is None:
                b.kill()
                b.wait()
        events = read_events(area / "xskill-a.events")
        yield {"a": json.loads(a_out.strip().splitlines()[-1]), "b": ready, "b_report": report,
               "b_running": b_still_running, "a_events": events, "b_state": ready["home"]}
    finally:
        shutil.rmtree(area, ignore_errors=True)


# ------------------------------------------------------------------ two launched skills


def test_the_two_skills_have_different_uids(two_skills):
    a_uid, b_uid = two_skills["a"]["uid"], two_skills["b"]["uid"]
    assert a_uid != b_uid and 0 not in (a_uid, b_uid)
    assert two_skills["b_running"], "B must be running while A tries to reach it"


def test_a_cannot_signal_b(two_skills):
    a = two_skills["a"]
    # B's pid does not exist in A's PID namespace (ESRCH); with it named
    # anyway, uid and Landlock's signal scope answer EPERM (tests below).
    for probe in ("kill_term", "kill_usr1", "kill_probe", "pidfd_open"):
        assert a[probe] in ("ESRCH", "EPERM"), f"{probe}: {a[probe]}"
    assert two_skills["b_report"]["signals"] == []
    assert two_skills["b_running"]


def test_a_cannot_ptrace_or_read_b(two_skills):
    a = two_skills["a"]
    assert a["ptrace_attach"] == "EPERM" and a["ptrace_seize"] == "EPERM"  # seccomp
    assert a["process_vm_readv"] == "EPERM"  # seccomp
    assert a["proc_mem"] in ("ENOENT",) + DENIED  # A's /proc shows only its own PID namespace
    seccomp = {e["operation"] for e in two_skills["a_events"] if e["layer"] == "seccomp"}
    assert {"ptrace", "process_vm_readv"} <= seccomp, seccomp


def test_a_cannot_connect_to_bs_abstract_unix_socket(two_skills):
    # Each launched skill has its own network namespace, and abstract socket
    # names live per network namespace (unix(7)): B's name does not exist for
    # A (ECONNREFUSED). Landlock's scope would answer EPERM on its own.
    assert two_skills["a"]["abstract_connect"] in ("ECONNREFUSED", "EPERM")
    assert two_skills["b_report"]["accepted"] == 0


def test_a_cannot_touch_bs_state_dir(two_skills):
    a = two_skills["a"]
    for probe in ("state_list", "state_read", "state_write", "state_root_list"):
        assert a[probe] in DENIED, f"{probe}: {a[probe]}"
    assert not Path(two_skills["b_state"], "planted").exists()


# ------------------------------------------------------------------ each layer on its own



def _skill_policy(name: str):
    from agent.manifest import load_text

    result = load_text(f"name: {name}\nversion: '1'\n", f"{name}.yaml")
    assert result.ok
    return result.policy


def _confine(uid: int | None, landlock_for: str | None) -> None:
    """In a forked child: optionally a skill's Landlock domain, then optionally a uid."""
    from agent.compile.landlock import compile_landlock
    from agent.enforce.landlock import apply
    from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, prctl

    if landlock_for is not None:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        apply(compile_landlock(_skill_policy(landlock_for)))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def _pair(b_uid, b_domain, a_uid, a_domain) -> dict:
    """B listens on an abstract socket and waits; A (same namespaces) tries kill and connect."""
    token = f"\0skillguard-layer-{uuid.uuid4().hex}"
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    b_pid = os.fork()
    if b_pid == 0:
        try:
            os.close(ready_r)
            _confine(b_uid, b_domain)
            signal.signal(signal.SIGUSR1, lambda *_: os._exit(42))  # reached: exit 42
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(token)
            server.listen(1)
            os.write(ready_w, b"r")
            time.sleep(20)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        a_pid = os.fork()
        if a_pid == 0:
            out = {}
            try:
                _confine(a_uid, a_domain)
                # connect first: a delivered signal ends B (and its socket).
                for name, fn in (("connect", lambda: socket.socket(socket.AF_UNIX).connect(token)),
                                 ("kill", lambda: os.kill(b_pid, signal.SIGUSR1))):
                    try:
                        fn()
                        out[name] = "ok"
                    except OSError as exc:
                        out[name] = errno.errorcode[exc.errno]
                os.write(result_w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.waitpid(a_pid, 0)
        out = json.loads(os.read(result_r, 4096))
        if out["kill"] == "ok":
            # Delivered: B's handler exits 42 (B would otherwise sleep 20 s).
            _, status = os.waitpid(b_pid, 0)
            out["b_alive"] = False
            out["b_exit"] = os.waitstatus_to_exitcode(status)
        else:
            out["b_alive"] = os.waitpid(b_pid, os.WNOHANG) == (0, 0)
        return out
    finally:
        try:
            os.kill(b_pid, signal.SIGKILL)
            os.waitpid(b_pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass
        for fd in (ready_r, result_r, result_w):
            os.close(fd)


def _two_uids() -> tuple[int, int]:
    from agent.launch.identity import allocate

    root = tempfile.mkdtemp(prefix="skillguard-xlayer-", dir="/var/tmp")
    try:
        return allocate("xlayer-a", root=root).uid, allocate("xlayer-b", root=root).uid
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_control_without_any_layer_the_two_reach_each_other():
    # The same probes with nothing in between: both get through, so the
    # refusals below are the layers' doing.
    out = _pair(None, None, None, None)
    assert out == {"kill": "ok", "connect": "ok", "b_alive": False, "b_exit": 42}


def test_different_uids_alone_stop_signals_but_not_abstract_sockets():
    a_uid, b_uid = _two_uids()
    out = _pair(b_uid, None, a_uid, None)
    assert out["kill"] == "EPERM" and out["b_alive"]
    assert out["connect"] == "ok"  # abstract sockets have no owner: why the scope matters


def test_landlock_scopes_alone_stop_signals_and_abstract_sockets_even_for_the_same_uid():
    # Two skills' Landlock domains, same uid, same namespaces:
    # security/landlock/task.c refuses both with EPERM.
    from agent.enforce.landlock import abi_version

    require(abi_version() >= 6, "Landlock scopes (abstract unix sockets, signals) need ABI 6")
    out = _pair(None, "xlayer-b", None, "xlayer-a")
    assert out == {"kill": "EPERM", "connect": "EPERM", "b_alive": True}
