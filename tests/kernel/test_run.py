"""`skillguard run` against the real kernel: every layer, end to end.

Each test launches `python -m agent run` as a subprocess (root) under a
manifest granting `<tmp>/work:rw` and `<tmp>/ref:ro` only, and asserts both
what the skill could do and the JSON-lines events the supervisor wrote.
The state root lives under /var/tmp (outside the skill's private /tmp) so
that "another skill's state dir" is a real directory the skill could name.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require
from launching import Run, launch_command, require_launch_features, run_skill, temp_state_root, write_manifest

AGENT_FILE = str(REPO_ROOT / "agent" / "cli.py")


@pytest.fixture(scope="module", autouse=True)
def _kernel_features():
    require_launch_features()
    require(shutil.which("python3") is not None, "python3 not in PATH")


@pytest.fixture(scope="module")
def state_root():
    with temp_state_root("skillguard-test-") as root:
        yield root


@pytest.fixture
def tree(tmp_path):
    work, ref = tmp_path / "work", tmp_path / "ref"
    work.mkdir()
    ref.mkdir()
    (ref / "r.txt").write_text("reference\n")
    (work / "link-shadow").symlink_to("/etc/shadow")
    (work / "link-agent").symlink_to(AGENT_FILE)
    return tmp_path


def manifest(tmp_path: Path, name: str = "runtest", timeout: str = "20s", pids: int = 64) -> Path:
    return write_manifest(tmp_path, name, [f"{tmp_path}/work:rw", f"{tmp_path}/ref:ro"],
                          resources={"pids": pids, "timeout": timeout})


def skill(tmp_path: Path, state_root: str, argv: list[str], *, m: Path | None = None,
          **options) -> Run:
    """Launch argv under m (default: manifest(tmp_path))."""
    return run_skill(tmp_path, state_root, m or manifest(tmp_path), argv, **options)


PROBE = r"""
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
work, ref, agent_file, other_state = sys.argv[1:5]
out = {}
def probe(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def raw(name, nr, *args):
    def call():
        if libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    probe(name, call)
def read(path):
    with open(path, "rb") as fh:
        fh.read(1)
def write(path):
    with open(path, "w") as fh:
        fh.write("x")
probe("write_work", lambda: write(f"{work}/new.txt"))
probe("read_work", lambda: read(f"{work}/new.txt"))
probe("read_ref", lambda: read(f"{ref}/r.txt"))
probe("write_ref", lambda: write(f"{ref}/new.txt"))
probe("shadow", lambda: read("/etc/shadow"))
probe("agent_file", lambda: read(agent_file))
probe("root_dir", lambda: os.listdir("/root"))
probe("other_state", lambda: os.listdir(other_state))
probe("dotdot_shadow", lambda: read(f"{work}/../../../../../../etc/shadow"))
probe("dotdot_agent", lambda: read(f"{work}/../../../../../..{agent_file}"))
probe("planted_link_shadow", lambda: read(f"{work}/link-shadow"))
probe("planted_link_agent", lambda: read(f"{work}/link-agent"))
def own_link():
    os.symlink("/etc/shadow", f"{work}/own-link")
    read(f"{work}/own-link")
probe("own_link", own_link)
probe("proc_self_root", lambda: read("/proc/self/root/etc/shadow"))
probe("proc_1_root", lambda: read("/proc/1/root/etc/shadow"))
probe("proc_1_environ", lambda: read("/proc/1/environ"))
probe("proc_1_mem", lambda: read("/proc/1/mem"))
def opath_openat():
    fd = os.open("/etc", os.O_PATH)
    os.open("shadow", os.O_RDONLY, dir_fd=fd)
probe("opath_openat", opath_openat)
def opath_agent():
    fd = os.open(os.path.dirname(agent_file), os.O_PATH)
    os.open(os.path.basename(agent_file), os.O_RDONLY, dir_fd=fd)
probe("opath_agent", opath_agent)
probe("af_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
probe("af_inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
probe("af_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
raw("io_uring_setup", 425, 1, 0)
raw("ptrace", 101, 16, 1, 0, 0)          # PTRACE_ATTACH to pid 1 (the init)
raw("process_vm_writev", 311, 1, 0, 0, 0, 0, 0)
raw("unshare", 272, 0x10000000)           # CLONE_NEWUSER
raw("mount", 165, 0, 0, 0, 0, 0)
raw("bpf", 321, 0, 0, 0)
raw("keyctl", 250, 0, 0, 0, 0, 0)
out["ld_preload"] = os.environ.get("LD_PRELOAD")
out["uid"] = os.getresuid()
out["pids"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["caps"] = [status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")]
out["nnp"] = status["NoNewPrivs"].strip()
write("/tmp/private")
out["tmp"] = sorted(os.listdir("/tmp"))
print(json.dumps(out))
"""

DENIED = ("EACCES", "EPERM", "EROFS")


@pytest.fixture(scope="module")
def confined(tmp_path_factory, state_root):
    """One launch running every probe; the tests below assert on its parts."""
    from agent.launch.identity import allocate

    tmp_path = tmp_path_factory.mktemp("confined")
    (tmp_path / "work").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "r.txt").write_text("reference\n")
    (tmp_path / "work" / "link-shadow").symlink_to("/etc/shadow")
    (tmp_path / "work" / "link-agent").symlink_to(AGENT_FILE)
    (tmp_path / "ref" / "probe.py").write_text(PROBE)
    other = allocate("another-skill", root=state_root)
    Path(other.state_dir, "secret").write_text("other skill's data\n")
    run = skill(tmp_path, state_root,
                ["python3", f"{tmp_path}/ref/probe.py", f"{tmp_path}/work", f"{tmp_path}/ref",
                 AGENT_FILE, other.state_dir],
                env={"LD_PRELOAD": "/nonexistent/evil.so"})
    assert run.code == 0, run.stderr
    return tmp_path, run, run.json()


def test_work_is_read_write_and_ref_read_only(confined):
    tmp_path, _, out = confined
    assert out["write_work"] == "ok"
    assert out["read_work"] == "ok"
    assert out["read_ref"] == "ok"
    assert out["write_ref"] in DENIED
    # The idmapped mount writes files with the directory owner's ids on disk.
    assert (tmp_path / "work" / "new.txt").stat().st_uid == (tmp_path / "work").stat().st_uid
    assert not (tmp_path / "ref" / "new.txt").exists()


@pytest.mark.parametrize("probe", [
    "shadow", "agent_file", "root_dir", "other_state", "dotdot_shadow", "dotdot_agent",
    "planted_link_shadow", "planted_link_agent", "own_link", "proc_self_root", "proc_1_root",
    "proc_1_environ", "proc_1_mem", "opath_openat", "opath_agent",
])
def test_filesystem_escapes_are_refused(confined, probe):
    _, _, out = confined
    expected = DENIED
    if "agent" in probe and Path(AGENT_FILE).is_relative_to("/tmp"):
        # A checkout under /tmp is covered by the skill's private /tmp: the
        # agent's files are not there at all, rather than denied by Landlock.
        assert Path(AGENT_FILE).exists()
        expected = DENIED + ("ENOENT",)
    assert out[probe] in expected, f"{probe}: {out[probe]}"


@pytest.mark.parametrize("probe,operation", [
    ("af_inet", "socket(AF_INET)"), ("af_inet6", "socket(AF_INET6)"),
    ("io_uring_setup", "io_uring_setup"), ("ptrace", "ptrace"),
    ("process_vm_writev", "process_vm_writev"), ("unshare", "unshare"), ("mount", "mount"),
    ("bpf", "bpf"), ("keyctl", "keyctl"),
])
def test_denied_syscalls_fail_with_eperm_and_are_reported(confined, probe, operation):
    _, run, out = confined
    assert out[probe] == "EPERM", f"{probe}: {out[probe]}"
    matching = [e for e in run.layer("seccomp") if e["operation"] == operation]
    assert matching, f"no seccomp event for {operation}: {run.events}"
    event = matching[0]
    assert event["decision"] == "denied"
    assert event["skill"] == "runtest" and isinstance(event["pid"], int) and event["rule"]


def test_unix_sockets_still_work(confined):
    assert confined[2]["af_unix"] == "ok"


def test_identity_capabilities_and_namespaces(confined, state_root):
    _, _, out = confined
    uid = out["uid"][0]
    assert uid != 0 and out["uid"] == [uid, uid, uid]
    assert out["caps"] == ["0000000000000000"] * 4
    assert out["nnp"] == "1"
    assert out["pids"] == ["1", "2"]  # the init and the skill: nothing of the host
    table = json.loads(Path(state_root, "uids.json").read_text())["skills"]
    assert table["runtest"] == uid and table["another-skill"] != uid


def test_private_tmp_does_not_reach_the_host(confined):
    _, _, out = confined
    assert "private" in out["tmp"]
    assert not Path("/tmp/private").exists()


def test_ld_preload_is_not_passed_and_is_reported(confined):
    _, run, out = confined
    assert out["ld_preload"] is None
    assert any(e["operation"] == "env LD_PRELOAD" and e["decision"] == "denied"
               for e in run.layer("env"))


def test_uid_is_stable_per_skill(tree, state_root):
    first = skill(tree, state_root, ["python3", "-c", "import os; print(os.getuid())"])
    second = skill(tree, state_root, ["python3", "-c", "import os; print(os.getuid())"])
    assert first.code == second.code == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout


def test_exit_status_is_propagated(tree, state_root):
    assert skill(tree, state_root, ["python3", "-c", "raise SystemExit(7)"]).code == 7
    kill = "import os, signal; os.kill(os.getpid(), signal.SIG{})"
    assert skill(tree, state_root, ["python3", "-c", kill.format("KILL")]).code == 128 + 9
    assert skill(tree, state_root, ["python3", "-c", kill.format("TERM")]).code == 128 + 15


def test_sigterm_to_the_supervisor_reaches_the_skill(tree, state_root):
    m = manifest(tree)
    events = tree / "events.jsonl"
    proc = subprocess.Popen(launch_command(m, events, state_root) + ["sleep", "30"],
                            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + 15
    assert time.monotonic() - started < 5


def test_timeout_kills_the_skill(tree, state_root):
    started = time.monotonic()
    run = skill(tree, state_root, ["sleep", "30"], m=manifest(tree, timeout="1s"))
    assert run.code == 128 + 9
    assert time.monotonic() - started < 10
    (event,) = run.layer("timeout")
    assert event["decision"] == "killed" and "1s" in event["rule"]


FORK_BOMB = """
import os, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print(n, exc.errno, flush=True)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
"""


def test_fork_bomb_stops_at_the_pids_limit(tree, state_root):
    started = time.monotonic()
    run = skill(tree, state_root, ["python3", "-c", FORK_BOMB], m=manifest(tree, pids=24))
    assert run.code == 0, run.stderr
    forked, err = map(int, run.stdout.split())
    assert forked < 24 and err == 11  # EAGAIN
    # The host stays responsive: a process started now runs at once.
    probe_started = time.monotonic()
    subprocess.run(["true"], check=True)
    assert time.monotonic() - probe_started < 1
    assert time.monotonic() - started < 30
    (event,) = run.layer("cgroup")
    assert event["decision"] == "denied" and event["rule"] == "resources.pids: 24"


def test_x32_syscall_kills_the_skill(tree, state_root):
    code = "import ctypes; ctypes.CDLL(None).syscall(39 | 0x40000000); print('survived')"
    run = skill(tree, state_root, ["python3", "-c", code])
    assert run.code == 128 + signal.SIGSYS and "survived" not in run.stdout
    assert any(e["decision"] == "killed" for e in run.layer("seccomp"))


I386_HELPER = r"""
int main(void) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");  /* i386 getpid */
    return ret > 0 ? 0 : 3;
}
"""


def test_i386_syscall_kills_the_skill(tree, state_root):
    require(shutil.which("gcc") is not None, "gcc is needed to build the int 0x80 helper")
    source = tree / "i386.c"
    source.write_text(I386_HELPER)
    binary = tree / "ref" / "i386-getpid"
    subprocess.run(["gcc", "-O0", "-static", "-o", str(binary), str(source)], check=True)
    assert subprocess.run([str(binary)]).returncode == 0  # works unconfined
    run = skill(tree, state_root, [str(binary)])
    assert run.code == 128 + signal.SIGSYS, run.stderr
    assert any(e["decision"] == "killed" for e in run.layer("seccomp"))


def test_audit_mode_allows_and_reports(tree, state_root):
    code = ("import socket, ctypes; socket.socket(socket.AF_INET).close(); "
            "libc = ctypes.CDLL(None, use_errno=True); "
            "print(libc.syscall(101, 0, 0, 0, 0), ctypes.get_errno())")
    run = skill(tree, state_root, ["python3", "-c", code], audit=True)
    assert run.code == 0, run.stderr
    assert run.stdout.split() == ["-1", "1"]  # ptrace: EPERM even in audit mode
    (inet,) = [e for e in run.layer("seccomp") if e["operation"] == "socket(AF_INET)"]
    assert inet["decision"] == "audited"
    (ptrace,) = [e for e in run.layer("seccomp") if e["operation"] == "ptrace"]
    assert ptrace["decision"] == "denied"
    assert "landlock: skipped" in run.stderr


def test_missing_grant_fails_before_start(tree, state_root):
    m = manifest(tree)
    m.write_text(m.read_text().replace(f"{tree}/ref:ro", f"{tree}/missing:ro"))
    marker = tree / "work" / "ran"
    run = skill(tree, state_root, ["python3", "-c", f"open('{marker}', 'w')"], m=m)
    assert run.code == 125 and not marker.exists()
    assert "missing" in run.stderr


def test_git_and_node_run_in_their_working_directory(tree, state_root):
    require(shutil.which("git") is not None, "git not installed")
    work = tree / "work"
    script = (f"cd {work} && git init -q repo && cd repo && echo hi > f && git add f && "
              "git -c user.name=t -c user.email=t@e commit -qm one && git log --oneline | wc -l")
    # The entrypoint (sh) is the launcher's exec; what it runs needs shell rules (issue 7).
    m = manifest(tree)
    m.write_text(m.read_text().replace("resources:", "  shell:\n    allowlist: [\"git **\", \"wc **\"]\n"
                                                     f"    allowed_dirs: [{work}]\nresources:"))
    run = skill(tree, state_root, ["sh", "-c", script], m=m)
    assert run.code == 0 and run.stdout.strip() == "1", run.stderr
    if shutil.which("node"):
        run = skill(tree, state_root, ["node", "-e",
                                       f"require('fs').writeFileSync('{work}/n.txt', 'ok');"
                                       "console.log(process.getuid())"])
        assert run.code == 0, run.stderr
        assert (work / "n.txt").read_text() == "ok"
