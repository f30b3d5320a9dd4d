"""The contract of the skill's init, init/skillguard-init.c, on the real kernel.

Every launch goes through the init, so the launch tests cover what it sets
up; these cover what it promises on its own:

- the skill starts with every signal disposition at its default and an
  empty signal mask, whatever its Python supervisor ignored or blocked
  (execve keeps SIG_IGN and the mask: signal(7), execve(2));
- no fd of the supervisor reaches the skill (the init closes every fd it
  was not meant to get, closes its socket and cgroup directory, and the
  plan's fds come close-on-exec);
- an init binary (or its directory) that others may write, or that is not
  root's, or that is missing, is refused before anything is cloned;
- a plan of another format, or a truncated or malformed one, is refused by
  the init with layer "launch" and exit 125, and the skill never runs;
- started by hand with bad arguments it prints its usage and exits 2.

A driver process runs one Supervisor (one launch per process), with the
supervisor's module globals patched where a test needs another init binary
or a mangled plan message. The skills are `/bin/sh -c` scripts using only
builtins: the manifests grant no shell, so any further exec would fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.launch import init_wire
from conftest import REPO_ROOT, require
from launching import launch_area, require_launch_features

PYTHON = sys.executable
INIT = REPO_ROOT / "build" / "skillguard-init"
USAGE_START = "skillguard-init: started by the skillguard supervisor only (SOCK_FD ERR_FD "

# argv: manifest, state root, mode, mode argument. Prints the skill's output
# (it shares our stdout), then one JSON line: the run's exit code, the init's
# own exit code (None if no init was cloned), and the LaunchError if any.
DRIVER = r"""
import json, os, signal, sys
import _struct as struct
import agent.launch.init_wire as init_wire
import agent.launch.supervisor as supervisor
from agent.launch.supervisor import LaunchError, RunOptions, Supervisor
from agent.manifest import load_manifest

manifest, state_root, mode, arg = sys.argv[1:5]
result = load_manifest(manifest)
assert result.ok, result.errors
U64 = struct.Struct("<Q")


def mangle(message):
    # The layout of init_wire.encode: u64 format, u64 flags, then the
    # executable as (u64 size with its NUL, bytes), then argv's count...
    size = U64.unpack_from(message, 16)[0]
    name = message[24:24 + size]
    assert name.endswith(b"\0") and len(name) > 2, name
    if arg == "half":
        return message[:len(message) // 2]
    if arg == "one-byte-short":
        return message[:-1]
    if arg == "trailing-bytes":
        return message + bytes(8)
    if arg == "empty":
        return b""
    if arg == "string-without-nul":
        return message[:16] + U64.pack(size - 1) + name[:-1] + message[24 + size:]
    if arg == "nul-inside-string":
        return message[:24] + name[:1] + b"\0" + name[2:] + message[24 + size:]
    if arg == "huge-list":
        return message[:24 + size] + U64.pack(1 << 62) + message[32 + size:]
    if arg == "fd-out-of-range":  # the last u64: the pinned entrypoint's fd index
        return message[:-8] + U64.pack(7)
    if arg == "fd-negative":  # -1 is "none"; -2 - N the Nth user namespace the init made
        return message[:-8] + U64.pack((1 << 64) - 1000)
    raise SystemExit(f"unknown mangle {arg}")


if mode == "signals":
    # Python already ignores SIGPIPE and SIGXFSZ; ignore and block more.
    for signum in (signal.SIGUSR2, signal.SIGALRM, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGWINCH, signal.SIGCONT})
elif mode == "leak-fd":
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, int(arg))
    os.close(fd)
    os.set_inheritable(int(arg), True)
elif mode == "init":
    supervisor.INIT = arg
elif mode == "format":
    init_wire.FORMAT = int(arg)
    encode = supervisor.encode
    def checked(*args):
        message = encode(*args)
        assert U64.unpack_from(message, 0)[0] == int(arg), "encode() ignored init_wire.FORMAT"
        return message
    supervisor.encode = checked
elif mode == "mangle":
    encode = supervisor.encode
    supervisor.encode = lambda *args: mangle(encode(*args))
else:
    assert mode == "plain", mode


class Recording(Supervisor):
    init_exit = None

    def _supervise(self, *args):
        outcome = super()._supervise(*args)
        self.init_exit = os.waitstatus_to_exitcode(outcome[0])
        return outcome


run = Recording(result.policy, RunOptions(state_root=state_root), lambda v: None, lambda t: None)
report = {"exit": None, "error": None}
try:
    report["exit"] = run.run().exit_code
except LaunchError as exc:
    report["error"] = {"layer": exc.layer, "reason": exc.reason}
report["init_exit"] = run.init_exit
print(json.dumps(report), flush=True)
"""

# Reads its own /proc/self/status with builtins only.
SIGNAL_PROBE = ('while read -r key value; do case $key in SigBlk:|SigIgn:|SigCgt:) '
                'echo "$key $value";; esac; done < /proc/self/status')
FD_PROBE = 'for f in /proc/self/fd/*; do echo "$f"; done'


@pytest.fixture(scope="module", autouse=True)
def _features():
    require_launch_features()
    require(INIT.is_file(), f"{INIT} is missing: run `sudo make setup`")


@pytest.fixture
def area():
    with launch_area("skillguard-init-test-") as root:
        yield root


def marker_script(area: Path) -> str:
    """A skill that only creates area/work/ran (a builtin redirection)."""
    return f": > {area}/work/ran"


def launch(area: Path, script: str, mode: str = "plain", arg: str = "", *,
           pin: bool = False) -> tuple[dict, list[str]]:
    """Run `/bin/sh -c script` through the driver: (report, the skill's output lines)."""
    manifest = area / "m.yaml"
    text = (f"name: init-test-{os.getpid()}\n"
            'version: "1"\n'
            f"entrypoint: {json.dumps(['/bin/sh', '-c', script])}\n"
            "permissions:\n"
            "  fs:\n"
            f'    dirs: ["{area}/work:rw"]\n'
            "resources:\n"
            "  timeout: 20s\n")
    if pin:
        text += f"entrypoint_sha256: {hashlib.sha256(Path('/bin/sh').read_bytes()).hexdigest()}\n"
    manifest.write_text(text)
    proc = subprocess.run([PYTHON, "-c", DRIVER, str(manifest), str(area / "state"), mode, arg],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def status_fields(lines: list[str]) -> dict:
    return dict(line.split() for line in lines)


def refused(report: dict, layer: str = "launch") -> str:
    """The LaunchError's reason, after checking its layer."""
    assert report["error"] is not None, report
    assert report["error"]["layer"] == layer, report
    return report["error"]["reason"]


# ------------------------------------------------------------------ signals


def test_probe_sees_an_inherited_ignore():
    # The control: the same probe started by Python without restoring
    # signals shows SIGPIPE (13) and SIGXFSZ (25) ignored, as execve keeps
    # SIG_IGN; so an all-zero SigIgn below means the init reset them.
    plain = subprocess.run(["/bin/sh", "-c", SIGNAL_PROBE], capture_output=True, text=True,
                           restore_signals=False, check=True)
    ignored = int(status_fields(plain.stdout.splitlines())["SigIgn:"], 16)
    assert ignored & (1 << (13 - 1)) and ignored & (1 << (25 - 1)), plain.stdout


def test_skill_starts_with_default_dispositions_and_an_empty_mask(area):
    report, lines = launch(area, SIGNAL_PROBE, "signals")
    assert report == {"exit": 0, "error": None, "init_exit": 0}, report
    fields = status_fields(lines)
    assert int(fields["SigIgn:"], 16) == 0, lines
    assert int(fields["SigBlk:"], 16) == 0, lines
    # Caught: only what the shell itself handles, exactly as when it is started
    # with every signal at its default (handlers never survive execve).
    baseline = subprocess.run(["/bin/sh", "-c", SIGNAL_PROBE], capture_output=True, text=True,
                              check=True)
    assert fields["SigCgt:"] == status_fields(baseline.stdout.splitlines())["SigCgt:"]


# ------------------------------------------------------------------ fds


@pytest.mark.parametrize("pin", [False, True], ids=["by-path", "pinned-entrypoint-fd"])
def test_no_supervisor_fd_reaches_the_skill(area, pin):
    report, lines = launch(area, FD_PROBE, "leak-fd", "50", pin=pin)
    assert report == {"exit": 0, "error": None, "init_exit": 0}, report
    # 3 is the directory the listing itself opens: with any other fd open,
    # the listing would either show it or get a number above 3.
    assert lines == [f"/proc/self/fd/{fd}" for fd in (0, 1, 2, 3)], lines


# ------------------------------------------------------------------ the init binary


def init_copy(area: Path, dir_mode: int = 0o755, file_mode: int = 0o755,
              owner: int = 0) -> Path:
    directory = area / "init"
    directory.mkdir()
    copy = directory / "skillguard-init"
    shutil.copyfile(INIT, copy)
    copy.chmod(file_mode)
    os.chown(copy, owner, owner)
    directory.chmod(dir_mode)  # chmod, not mkdir's mode: the umask would mask it
    return copy


def test_a_root_owned_copy_of_the_init_runs_the_skill(area):
    # The control for the refusals below: the copy itself works.
    report, _ = launch(area, marker_script(area), "init", str(init_copy(area)))
    assert report == {"exit": 0, "error": None, "init_exit": 0}, report
    assert (area / "work" / "ran").exists()


@pytest.mark.parametrize("dir_mode, file_mode, owner, what", [
    (0o755, 0o777, 0, "file"),
    (0o755, 0o775, 0, "file"),
    (0o755, 0o755, 65534, "file"),
    (0o777, 0o755, 0, "directory"),
    (0o775, 0o755, 0, "directory"),
], ids=["file-world-writable", "file-group-writable", "file-not-roots",
        "dir-world-writable", "dir-group-writable"])
def test_an_init_others_may_write_is_refused(area, dir_mode, file_mode, owner, what):
    copy = init_copy(area, dir_mode, file_mode, owner)
    report, lines = launch(area, marker_script(area), "init", str(copy))
    reason = refused(report)
    checked = copy if what == "file" else copy.parent
    assert reason.startswith(f"{checked}: not a {what} of root's"), reason
    assert report["init_exit"] is None  # nothing was cloned
    assert not (area / "work" / "ran").exists()
    assert lines == []


def test_a_directory_not_roots_is_refused(area):
    copy = init_copy(area)
    os.chown(copy.parent, 65534, 65534)
    report, _ = launch(area, marker_script(area), "init", str(copy))
    assert refused(report).startswith(f"{copy.parent}: not a directory of root's"), report
    assert not (area / "work" / "ran").exists()


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_missing_init_is_refused_naming_make_setup(area, where):
    if where == "directory":
        missing = area / "no-such-dir" / "skillguard-init"
    else:
        missing = init_copy(area)
        missing.unlink()
    report, _ = launch(area, marker_script(area), "init", str(missing))
    reason = refused(report)
    assert str(missing) in reason and "make setup" in reason, reason
    assert not (area / "work" / "ran").exists()


# ------------------------------------------------------------------ the plan


def test_a_plan_of_another_format_is_refused_with_rebuild(area):
    report, lines = launch(area, marker_script(area), "format", "99")
    reason = refused(report)
    assert "rebuild" in reason and "make setup" in reason, reason
    assert f"plan format {init_wire.FORMAT} " in reason, reason  # the C's WIRE_FORMAT is ours
    assert report["init_exit"] == 125
    assert not (area / "work" / "ran").exists()
    assert lines == []


def test_the_unmangled_plan_runs_the_skill(area):
    # The control for the mangled plans: the same driver, the plan as encoded.
    report, _ = launch(area, marker_script(area))
    assert report == {"exit": 0, "error": None, "init_exit": 0}, report
    assert (area / "work" / "ran").exists()


@pytest.mark.parametrize("how, said", [
    ("half", "the plan message is truncated"),
    ("one-byte-short", "the plan message is truncated"),
    ("trailing-bytes", "the plan message has 8 bytes past its end"),
    ("empty", "the supervisor did not send the plan"),
    ("string-without-nul", "the plan holds a malformed string"),
    ("nul-inside-string", "the plan holds a malformed string"),
    ("huge-list", "the plan holds a malformed list"),
    ("fd-out-of-range", r"the plan names fd 7 of \d+ passed( and \d+ made)?"),
    ("fd-negative", r"the plan names fd -1000 of \d+ passed( and \d+ made)?"),
])
def test_a_malformed_plan_is_refused(area, how, said):
    report, lines = launch(area, marker_script(area), "mangle", how)
    assert re.fullmatch(said, refused(report)), report
    assert report["init_exit"] == 125
    assert not (area / "work" / "ran").exists()
    assert lines == []


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("args", [
    [], ["3"], ["3", "4"], ["abc", "4", "-1"], ["3", "x", "-1"], ["", "4", "-1"],
    ["3", "4x", "-1"], ["1", "4", "-1"], ["3", "2", "-1"], ["5", "5", "-1"], ["70000", "4", "-1"],
    ["-3", "4", "-1"], ["-1", "4", "-1"], ["3", "4", "x"], ["3", "4", "-2"], ["3", "4", "2"],
], ids=lambda args: " ".join(repr(arg) for arg in args) or "no-args")
def test_bad_arguments_print_the_usage_and_exit_2(area, args):
    # Cgroup files the init would write "0" into if it went on.
    tasks, procs = area / "work" / "tasks", area / "work" / "cgroup.procs"
    for path in (tasks, procs):
        path.write_text("")
    proc = subprocess.run([str(INIT), *args, f"tasks={tasks}", f"procs={procs}"],
                          capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    usage = proc.stderr.decode()
    assert usage.startswith(USAGE_START) and usage.endswith(")\n") and usage.count("\n") == 1, usage
    assert proc.stdout == b""
    assert tasks.read_text() == "" and procs.read_text() == ""
