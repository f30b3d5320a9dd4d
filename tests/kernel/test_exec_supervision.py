"""Exec supervision on the real kernel (issue 7): `permissions.shell` enforced
at execve through seccomp user notification, binaries pinned by Landlock.

Every case launches `python -m agent run` (root) with a manifest that grants
`git **` in `allowed_dirs: [<repo>]` (plus what the case adds) and asserts
what the skill saw and the `exec` events the supervisor wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require
from launching import (PYTHON, Run, launch_command, require_launch_features, run_skill,
                       temp_state_root, write_manifest)

GIT = shutil.which("git")


@pytest.fixture(scope="module", autouse=True)
def _kernel_features():
    require_launch_features()
    require(GIT is not None, "git is not installed")


@pytest.fixture(scope="module")
def state_root():
    with temp_state_root("skillguard-exec-") as root:
        yield root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """<tmp>/work (rw) holding a git repo; <tmp>/ref (ro) holding scripts and a git copy."""
    tmp = tmp_path_factory.mktemp("exec")
    work, ref = tmp / "work", tmp / "ref"
    work.mkdir()
    ref.mkdir()
    repo = work / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f.txt").write_text("hello\n")
    subprocess.run(["git", "-C", str(repo), "add", "f.txt"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e",
                    "commit", "-qm", "first"], check=True)
    # The skill runs as its own uid; git refuses repositories owned by others
    # unless told they are safe, and the idmapped mount shows them as the skill's.
    shutil.copy2(GIT, ref / "git")  # "a copied binary named git elsewhere"
    shutil.copy2(GIT, work / "git")
    return tmp


def manifest(tree: Path, name: str, shell: str | None = None) -> Path:
    return write_manifest(tree, name, [f"{tree}/work:rw", f"{tree}/ref:ro"],
                          permissions=textwrap.indent(shell or "", "  "))


def git_shell(tree: Path, *extra: str) -> str:
    allow = ", ".join(f'"{p}"' for p in ("git **", *extra))
    return f"shell:\n  allowlist: [{allow}]\n  allowed_dirs: [{tree}/work/repo]\n"


# Skill-side code shared by the scripts below: run child() in a fork with its
# stdout and stderr on a pipe (child must exec or _exit); return the wait
# status and what it wrote.
CAPTURED = r"""
import os
def captured(child):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        try:
            child()
        finally:
            os._exit(127)
    os.close(w)
    text = b""
    while chunk := os.read(r, 65536):
        text += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, text
"""

# A probe run inside the skill: each case execs a command in a fork (so the
# probe survives) and records how it ended.
PROBE = CAPTURED + r"""
import ctypes, errno, json, os, sys
cases = json.loads(sys.argv[1])
out = {}
def run_case(case):
    try:
        os.chdir(case["cwd"])
        if case.get("fd"):
            fd = os.open(case["path"], os.O_PATH)
            os.execve(fd, case["argv"], dict(os.environ))
        elif case.get("memfd"):
            fd = os.memfd_create("x")
            os.write(fd, open(case["path"], "rb").read())
            os.execve(fd, case["argv"], dict(os.environ))
        elif "/" in case["path"]:
            os.execv(case["path"], case["argv"])
        else:
            os.execvp(case["path"], case["argv"])
    except OSError as exc:
        os.write(1, f"EXEC-FAILED {errno.errorcode.get(exc.errno, exc.errno)}".encode())
for name, case in cases.items():
    status, text = captured(lambda: run_case(case))
    out[name] = {"code": os.waitstatus_to_exitcode(status), "out": text.decode(errors="replace")}
print(json.dumps(out))
"""


def probe(tree: Path, state_root: str, m: Path, cases: dict) -> tuple[Run, dict]:
    script = tree / "ref" / "probe.py"
    script.write_text(PROBE)
    run = run_skill(tree, state_root, m, ["python3", str(script), json.dumps(cases)])
    assert run.code == 0, run.stderr
    return run, run.json()


def case(path: str, argv: list[str], cwd: str, **extra) -> dict:
    return {"path": path, "argv": argv, "cwd": cwd, **extra}


def refused(result: dict) -> bool:
    return result["code"] == 127 and result["out"].startswith("EXEC-FAILED EPERM")


def event_for(run: Run, operation: str) -> dict:
    matching = [e for e in run.layer("exec") if e["operation"] == operation]
    assert matching, f"no exec event for {operation!r}: {run.layer('exec')}"
    return matching[0]


@pytest.fixture(scope="module")
def git_only(tree, state_root):
    """One launch under `git **` in <repo>, running most of the issue's cases."""
    repo = f"{tree}/work/repo"
    m = manifest(tree, "exec-git", git_shell(tree))
    cases = {
        "git_status_repo": case("git", ["git", "status", "--short", "--branch"], repo),
        "git_status_tmp": case("git", ["git", "status"], "/tmp"),
        "ls": case("ls", ["ls"], repo),
        "sh_and": case("sh", ["sh", "-c", "git status && id"], repo),
        "copy_ro": case(f"{tree}/ref/git", ["git", "status"], repo),
        "copy_rw": case(f"{tree}/work/git", ["git", "status"], repo),
        "env_git": case("env", ["env", "git", "status"], repo),
        "git_fd": case(GIT, ["git", "--version"], repo, fd=True),
        "id_fd": case("/usr/bin/id", ["id"], repo, fd=True),
        "git_memfd": case(GIT, ["git", "--version"], repo, memfd=True),
        "argv0_dispatch": case("git", ["git-upload-pack", "--help"], repo),
    }
    run, out = probe(tree, state_root, m, cases)
    return tree, run, out


def test_git_status_in_the_repo_works(git_only):
    _, run, out = git_only
    result = out["git_status_repo"]
    assert result["code"] == 0, result
    assert result["out"].startswith("## ")  # the branch line of `git status --branch`
    assert not [e for e in run.layer("exec") if e["operation"].startswith("git status --short")]


def test_git_status_outside_allowed_dirs_is_refused(git_only):
    _, run, out = git_only
    assert refused(out["git_status_tmp"]), out["git_status_tmp"]
    event = event_for(run, "git status")
    assert event["decision"] == "denied"
    assert "cwd: /tmp" in event["detail"] and "allowed_dirs" in event["rule"]


@pytest.mark.parametrize("name,operation,why", [
    ("ls", "ls", "not one that a permissions.shell.allowlist pattern admits"),
    ("sh_and", "sh -c 'git status && id'", "not one that"),
    ("env_git", "env git status", "not one that"),
    ("id_fd", "id", "not one that"),
    ("argv0_dispatch", "git-upload-pack --help", "argv[0]"),
])
def test_refused_commands_are_events(git_only, name, operation, why):
    tree, run, out = git_only
    assert refused(out[name]), out[name]
    event = event_for(run, operation)
    assert event["decision"] == "denied" and why in event["rule"], event
    assert f"cwd: {tree}/work/repo" in event["detail"]
    assert isinstance(event["pid"], int) and event["skill"] == "exec-git"


@pytest.mark.parametrize("name", ["copy_ro", "copy_rw"])
def test_a_copied_git_elsewhere_is_refused(git_only, name):
    tree, run, out = git_only
    assert refused(out[name]), out[name]
    where = "ref" if name == "copy_ro" else "work"
    assert any(f"program: {tree}/{where}/git" in e["detail"] for e in run.layer("exec"))


def test_exec_of_an_admitted_binary_by_fd_works(git_only):
    _, _, out = git_only
    assert out["git_fd"]["code"] == 0 and out["git_fd"]["out"].startswith("git version")


def test_exec_of_a_memfd_copy_is_refused(git_only):
    _, _, out = git_only
    assert refused(out["git_memfd"]), out["git_memfd"]


def test_shell_disabled_means_no_exec_after_the_entrypoint(tree, state_root):
    for name, shell in (("exec-none", None),
                        ("exec-off", f"shell:\n  enabled: false\n  allowlist: [\"git **\"]\n"
                                     f"  allowed_dirs: [{tree}/work/repo]\n")):
        m = manifest(tree, name, shell)
        run, out = probe(tree, state_root, m, {
            "git": case("git", ["git", "--version"], f"{tree}/work/repo"),
            "true": case("/usr/bin/true", ["true"], "/")})
        assert refused(out["git"]) and refused(out["true"]), out
        event = event_for(run, "git --version")
        assert "nothing after its entrypoint" in event["rule"]


def test_python_execv_to_a_disallowed_binary_is_refused(tree, state_root):
    m = manifest(tree, "exec-py", git_shell(tree))
    code = ("import os\n"
            f"os.chdir('{tree}/work/repo')\n"
            "try:\n"
            "    os.execv('/usr/bin/id', ['id'])\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno)\n")
    run = run_skill(tree, state_root, m, ["python3", "-c", code])
    assert run.code == 0 and run.stdout.split() == ["refused", "1"], run.stdout + run.stderr
    event = event_for(run, "id")
    assert event["decision"] == "denied" and "/usr/bin/id" in event["detail"]


def test_env_and_sh_c_work_only_when_allowed(tree, state_root):
    repo = f"{tree}/work/repo"
    m = manifest(tree, "exec-env-sh", git_shell(tree, "env **", "sh **"))
    run, out = probe(tree, state_root, m, {
        "env_git": case("env", ["env", "git", "rev-parse", "--is-inside-work-tree"], repo),
        "sh_git": case("sh", ["sh", "-c", "git rev-parse --is-inside-work-tree"], repo),
        "sh_and": case("sh", ["sh", "-c", "git status && id"], repo),
        "sh_pipe": case("sh", ["sh", "-c", "git log | id"], repo),
        "sh_subst": case("sh", ["sh", "-c", "git log $(id)"], repo),
        "sh_redirect": case("sh", ["sh", "-c", "git log > out"], repo),
        "env_id": case("env", ["env", "id"], repo),
    })
    assert out["env_git"]["code"] == 0 and out["env_git"]["out"].strip() == "true", out["env_git"]
    assert out["sh_git"]["code"] == 0 and out["sh_git"]["out"].strip() == "true", out["sh_git"]
    for name, why in (("sh_and", "'&&'"), ("sh_pipe", "'|'"), ("sh_subst", "'$'"),
                      ("sh_redirect", "'>'")):
        assert refused(out[name]), (name, out[name])
        assert any(why in e["rule"] for e in run.layer("exec")), (name, run.layer("exec"))
    # env itself is allowed; the id it then execs is refused on its own.
    assert out["env_id"]["code"] != 0 and "Operation not permitted" in out["env_id"]["out"]
    assert any(e["operation"] == "id" and "/usr/bin/id" in e["detail"] for e in run.layer("exec"))


GIT_TOOL = r"""
import json, subprocess, sys
repo = sys.argv[1]
def git(*args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout
with open(f"{repo}/tool.txt", "w") as fh:
    fh.write("written by the tool\n")
git("add", "tool.txt")
git("-c", "user.name=tool", "-c", "user.email=tool@example", "commit", "-qm", "from the tool")
print(json.dumps({"log": git("log", "--format=%s").splitlines(),
                  "status": git("status", "--porcelain")}))
"""


def test_a_program_spawning_git_works_under_its_manifest(tree, state_root):
    repo = tree / "work" / "tool-repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a").write_text("a\n")
    subprocess.run(["git", "-C", str(repo), "add", "a"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e",
                    "commit", "-qm", "first"], check=True)
    script = tree / "ref" / "git_tool.py"
    script.write_text(GIT_TOOL)
    m = manifest(tree, "exec-tool", f"shell:\n  allowlist: [\"git **\"]\n"
                                    f"  allowed_dirs: [{repo}]\n")
    run = run_skill(tree, state_root, m, ["python3", str(script), str(repo)])
    assert run.code == 0, run.stderr
    assert run.json() == {"log": ["from the tool", "first"], "status": ""}
    # `git commit` runs /usr/lib/git-core/git maintenance: admitted as git's companion.
    assert run.layer("exec") == [], run.layer("exec")


RACE = CAPTURED + r"""
import ctypes, json, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
allowed, other, cwd, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
os.chdir(cwd)
size = max(len(allowed), len(other)) + 1
counts = {}
def swapped_execve():
    path = ctypes.create_string_buffer(allowed.encode(), size)
    words = [b"git", b"--version"]
    argv = (ctypes.c_char_p * 3)(*words, None)
    a, b = allowed.encode().ljust(size, b"\0"), other.encode().ljust(size, b"\0")
    def flip():
        while True:
            ctypes.memmove(path, b, size)
            ctypes.memmove(path, a, size)
    threading.Thread(target=flip, daemon=True).start()
    libc.execve(path, argv, None)
    os.write(1, f"FAILED {ctypes.get_errno()}".encode())
for _ in range(rounds):
    _, text = captured(swapped_execve)
    key = "git" if text.startswith(b"git version") else text.decode(errors="replace")[:40]
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"""


def test_a_path_swapped_after_the_check_gains_nothing(tree, state_root):
    """A second thread flips the path between git (allowed) and id while
    execve runs: whatever the supervisor saw, id never runs, because only
    admitted programs have Landlock execute rights (EACCES = 13)."""
    script = tree / "ref" / "race.py"
    script.write_text(RACE)
    m = manifest(tree, "exec-race", git_shell(tree))
    run = run_skill(tree, state_root, m, ["python3", str(script), GIT, "/usr/bin/id",
                                      f"{tree}/work/repo", "150"], timeout=120)
    assert run.code == 0, run.stderr
    counts = run.json()
    assert not any("uid=" in key for key in counts), counts
    # git ran, or the supervisor refused id (EPERM), or the kernel refused id
    # (EACCES: Landlock), or a torn path named nothing (ENOENT).
    assert set(counts) <= {"git", "FAILED 1", "FAILED 13", "FAILED 2"}, counts
    assert sum(counts.values()) == 150


def test_landlock_execute_is_pinned_to_admitted_programs(tree):
    """The Landlock ruleset a launch applies (compile_landlock + pin_execute, as
    `prepare` builds it), applied on the real kernel with no supervisor in the
    way: admitted git and the entrypoint run, anything else under /usr gets
    EACCES. The ELF loader needs execute (binfmt_elf opens PT_INTERP with
    open_exec) and, run directly, loads any readable ELF: that is why the
    argv race is documented as bounded by the other layers, not closed."""
    from agent.compile.exec_policy import compile_exec_rules, execute_pins, pin_execute
    from agent.compile.landlock import compile_landlock
    from agent.enforce.landlock import apply
    from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, prctl
    from agent.manifest import load_text

    loaded = load_text(manifest(tree, "exec-pin", git_shell(tree)).read_text(), "m.yaml")
    assert loaded.ok, loaded.errors
    python = os.path.realpath("/usr/bin/python3")
    artifact = compile_landlock(loaded.policy, exec_paths=(python,))
    rules = compile_exec_rules(loaded.policy.shell, "/usr/local/bin:/usr/bin:/bin",
                               writable=[f"{tree}/work", "/tmp"])
    pins = execute_pins(rules.programs + (python,))
    artifact = pin_execute(artifact, pins)
    loader = execute_pins([GIT])
    assert len(loader) == 2  # git and its PT_INTERP
    loader = next(p for p in loader if p != os.path.realpath(GIT))
    attempts = {"git": [GIT, "--version"], "python": [python, "-c", "pass"],
                "id": ["/usr/bin/id"], "sh": ["/bin/sh", "-c", "true"],
                "copy": [f"{tree}/ref/git", "--version"], "loader_id": [loader, "/usr/bin/id"]}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        results = {}
        try:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            apply(artifact)
            for name, argv in attempts.items():
                child = os.fork()
                if child == 0:
                    devnull = os.open("/dev/null", os.O_WRONLY)
                    os.dup2(devnull, 1)
                    try:
                        os.execv(argv[0], argv)
                    except OSError as exc:
                        os._exit(100 + exc.errno)
                results[name] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        finally:
            os.write(w, json.dumps(results).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    import errno

    assert json.loads(data) == {"git": 0, "python": 0, "id": 100 + errno.EACCES,
                                "sh": 100 + errno.EACCES, "copy": 100 + errno.EACCES,
                                "loader_id": 0}


def test_exec_stays_denied_when_the_listener_holder_dies(tree):
    """The mechanism under "the skill stays confined if its supervisor dies":
    a process under the launch filter keeps running after the process holding
    its notification fd is SIGKILLed, and its execve then fails with ENOSYS
    (seccomp_unotify(2)); before that, the same exec was allowed."""
    from agent.compile.exec_policy import compile_exec_rules
    from agent.enforce.seccomp_load import install_filter
    from agent.launch.exec_supervisor import ExecSupervisor
    from agent.launch.plan import _seccomp_for_launch
    from agent.manifest import load_text

    repo = f"{tree}/work/repo"
    loaded = load_text(manifest(tree, "exec-holder", git_shell(tree)).read_text(), "m.yaml")
    assert loaded.ok, loaded.errors
    bpf = _seccomp_for_launch(loaded.policy)["bpf"]
    rules = compile_exec_rules(loaded.policy.shell, os.environ["PATH"])

    target_sock, test_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    target = os.fork()
    if target == 0:  # the confined process: exec git, wait, exec git again
        test_sock.close()
        try:
            from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, prctl

            prctl(PR_SET_NO_NEW_PRIVS, 1)
            listener = install_filter(bpf, listener=True)
            socket.send_fds(target_sock, [b"fd"], [listener])
            os.close(listener)
            results = []
            for _ in range(2):
                target_sock.recv(16)  # "go"
                pid = os.fork()
                if pid == 0:
                    os.chdir(repo)
                    devnull = os.open("/dev/null", os.O_WRONLY)
                    os.dup2(devnull, 1)
                    try:
                        os.execv(GIT, ["git", "--version"])
                    except OSError as exc:
                        os._exit(100 + exc.errno)
                results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                target_sock.send(json.dumps(results).encode())
        finally:
            os._exit(0)
    target_sock.close()
    holder = None
    try:
        _, fds, _, _ = socket.recv_fds(test_sock, 16, 1)
        listener = fds[0]
        holder = os.fork()
        if holder == 0:  # the supervisor stand-in: answers with the real handler
            import select

            events = []
            handler = ExecSupervisor(rules, audit=False,
                                     emit=lambda **f: events.append(f))
            from agent.launch import notify

            poller = select.poll()
            poller.register(listener, select.POLLIN)
            while True:
                poller.poll()
                request = notify.receive(listener)
                if request is None:
                    continue
                if notify.syscall_name(request.nr) in ("execve", "execveat"):
                    handler.handle(listener, request)
                else:
                    notify.respond(listener, request.id, error=1)
        os.close(listener)
        test_sock.send(b"go")
        assert json.loads(test_sock.recv(64)) == [0]  # allowed while the holder lives
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        holder = None
        test_sock.send(b"go")
        results = json.loads(test_sock.recv(64))
        import errno

        assert results == [0, 100 + errno.ENOSYS]  # the target lives on; exec is denied
    finally:
        if holder is not None:
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
        test_sock.close()
        os.waitpid(target, 0)


WAITER = r"""
import os, subprocess, sys, time
repo, marker = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(f"{repo}/go"):
    time.sleep(0.02)
try:
    subprocess.run(["git", "status"], cwd=repo, capture_output=True)
    result = "exec allowed"
except OSError as exc:
    result = f"exec failed {exc.errno}"
with open(marker, "w") as fh:
    fh.write(result)
"""


def test_exec_after_the_supervisor_is_sigkilled_is_refused(tree, state_root):
    """SIGKILL the real `skillguard run` supervisor, then let the skill try
    `git status` (allowed while supervised): it must not run. The skill dies
    with its supervisor: the kernel clears the init's PR_SET_PDEATHSIG when
    it changes its uid (prctl(2)), and skillguard-init sets it again after
    (`rearm_parent_death`); the init's death ends its PID namespace. Were the
    skill to live on, its execve would fail with ENOSYS, the listener being
    closed (seccomp_unotify(2)): that is asserted too, never "allowed"."""
    import errno

    repo = tree / "work" / "repo"
    marker = tree / "work" / "after-kill"
    (repo / "go").unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    script = tree / "ref" / "waiter.py"
    script.write_text(WAITER)
    m = manifest(tree, "exec-kill", git_shell(tree))
    events = tree / "events-kill.jsonl"
    token = f"waiter-{time.monotonic_ns()}"
    proc = subprocess.Popen(launch_command(m, events, state_root)
                            + ["python3", str(script), str(repo), str(marker), token],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait(timeout=10)
        (repo / "go").write_text("")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pids_with(token) and not marker.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        if marker.exists():
            assert marker.read_text() == f"exec failed {errno.ENOSYS}"
        assert not _pids_with(token), "the skill outlived its supervisor"
        assert not marker.exists(), "the skill lived on after its supervisor died"
    finally:
        for pid in _pids_with(token):
            os.kill(pid, signal.SIGKILL)
        (repo / "go").unlink(missing_ok=True)
        _remove_leftover_cgroups("exec-kill", f"run-{proc.pid}")


def _remove_leftover_cgroups(skill_name: str, instance: str) -> None:
    """The killed supervisor could not remove its skill's cgroups."""
    from agent.enforce.cgroup import ROOT_NAME, _rmdir_retrying, safe_name
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    tops = [mounts.v2] if mounts.v2 else []
    tops += list(mounts.v1.values()) + list(getattr(mounts, "named", {}).values())
    for top in tops:
        path = Path(top) / ROOT_NAME / safe_name(skill_name) / safe_name(instance)
        if path.is_dir():
            try:
                _rmdir_retrying(path, timeout=5)
                os.rmdir(path.parent)
            except OSError:
                pass


def _pids_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if token.encode() in fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_the_daemon_supervises_exec_the_same_way(tmp_path):
    """`skillguard run` delegated to a running daemon: the daemon's forked
    supervisor is the same `Supervisor`, so the same rules and events hold."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
    from sgdaemon import running_daemon

    with running_daemon() as daemon:
        root = daemon.root
        repo = root / "work" / "repo"
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        m = root / "exec-daemon.yaml"
        m.write_text(textwrap.dedent(f"""\
            name: exec-daemon
            version: "1"
            permissions:
              fs:
                dirs: ["{root}/work:rw"]
              shell:
                allowlist: ["git **"]
                allowed_dirs: ["{repo}"]
            resources:
              timeout: 30s
            """))
        code = ("import subprocess\n"
                f"print(subprocess.run(['git', 'rev-parse', '--is-inside-work-tree'], cwd='{repo}',"
                " capture_output=True, text=True).stdout.strip())\n"
                "try:\n"
                f"    subprocess.run(['ls'], cwd='{repo}')\n"
                "except OSError as exc:\n"
                "    print('ls', exc.errno)\n")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), SKILLGUARD_SOCKET=daemon.socket)
        env.pop("SKILLGUARD_RUN_LOCAL", None)
        launches = daemon.metric("skillguard_api_requests_total", method="launch", outcome="ok")
        proc = subprocess.run([PYTHON, "-m", "agent", "run", "--manifest", str(m), "--",
                               "/usr/bin/python3", "-c", code],
                              cwd=str(root / "work"), env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["true", "ls", "1"], proc.stdout + proc.stderr
        records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        refused = [r for r in records if r["layer"] == "exec"]
        assert refused and all(r["operation"] == "ls" and r["decision"] == "denied"
                               for r in refused), records
        assert "not one that a permissions.shell.allowlist pattern admits" in refused[0]["rule"]
        # It went through the daemon, not a local supervisor.
        assert daemon.metric("skillguard_api_requests_total", method="launch",
                             outcome="ok") == launches + 1
