"""The pure exec decision: rule compilation, argv/cwd/shell checks, Landlock pins."""
from __future__ import annotations

import os
import struct

import pytest

from agent.compile import exec_policy as E
from agent.compile.landlock import LandlockArtifact, PathRule
from agent.manifest.model import CommandPattern, ShellPolicy

PATH = "/usr/local/bin:/usr/bin:/bin"
REPO = "/data/repo"


class FakeFs:
    """Executable files by path; symlinks by path -> target."""

    def __init__(self, files: dict[str, int], links: dict[str, str] | None = None,
                 dirs: dict[str, list[str]] | None = None):
        self.files = files  # path -> inode
        self.links = links or {}
        self.dirs = dirs or {"/usr/lib": ["git-core", "x86_64-linux-gnu"], "/usr/libexec": []}

    def realpath(self, path: str) -> str:
        return self.links.get(path, path)

    def stat(self, path: str) -> os.stat_result:
        real = self.realpath(path)
        if real not in self.files:
            raise FileNotFoundError(path)
        mode = 0o100755 if self.files[real] > 0 else 0o040755
        return os.stat_result((mode, abs(self.files[real]), 1, 1, 0, 0, 0, 0, 0, 0))

    def list_names(self, path: str) -> list[str]:
        return self.dirs.get(path, [])

    def binary(self, path: str) -> E.Binary:
        st = self.stat(path)
        return E.Binary(self.realpath(path), st.st_dev, st.st_ino)


FS = FakeFs(
    files={"/usr/bin/git": 10, "/usr/lib/git-core/git": 11, "/usr/bin/ls": 12, "/usr/bin/env": 13,
           "/usr/bin/dash": 14, "/usr/bin/bash": 15, "/usr/bin/go": 16, "/tmp/git": 17,
           "/data/repo/git": 18, "/usr/bin/fish": 19, "/usr/bin/python3.11": 20,
           "/usr/local/bin/tool": 21, "/usr/bin": -1},
    links={"/bin/sh": "/usr/bin/dash", "/usr/bin/sh": "/usr/bin/dash", "/bin/git": "/usr/bin/git",
           "/bin/bash": "/usr/bin/bash", "/usr/bin/python3": "/usr/bin/python3.11"},
)


def policy(*patterns: str, dirs=(REPO,), enabled=True) -> ShellPolicy:
    return ShellPolicy(enabled, tuple(CommandPattern(tuple(p.split()), p) for p in patterns),
                       tuple(dirs))


def rules(*patterns: str, dirs=(REPO,), enabled=True, writable=("/tmp", "/data/repo"),
          path=PATH) -> E.ExecRules:
    return E.compile_exec_rules(policy(*patterns, dirs=dirs, enabled=enabled), path,
                                writable=writable, stat=FS.stat, realpath=FS.realpath,
                                list_names=FS.list_names)


def decide(r: E.ExecRules, program: str, argv, cwd=REPO, env=()) -> E.Decision:
    return E.decide(r, FS.binary(program), list(argv), cwd, env)


# ---------------------------------------------------------------- compile

def test_bare_word_admits_path_matches_and_libexec_companions():
    (rule,) = rules("git **").rules
    assert rule.paths == ("/usr/bin/git", "/usr/lib/git-core/git")
    assert not rule.shell and not rule.wildcard


def test_absolute_word_admits_that_file_only():
    (rule,) = rules("/usr/bin/git status").rules
    assert rule.paths == ("/usr/bin/git",)


def test_files_the_skill_can_write_are_never_admitted():
    r = rules("git **", path="/data/repo:/usr/bin")
    assert r.rules[0].paths == ("/usr/bin/git", "/usr/lib/git-core/git")
    assert any("/data/repo/git is not admitted" in n for n in r.notes)


def test_relative_program_path_is_an_error():
    with pytest.raises(E.ExecPolicyError, match="bare name"):
        rules("./build.sh **")


def test_missing_program_admits_nothing_and_says_so():
    r = rules("cargo build")
    assert r.rules[0].paths == () and "admits nothing" in r.notes[0]


def test_relative_path_entries_are_ignored_with_a_note():
    r = rules("git **", path=".:/usr/bin")
    assert any("not absolute" in n for n in r.notes)


def test_disabled_shell_compiles_to_no_rules():
    r = rules("git **", enabled=False)
    assert not r.enabled and r.rules == ()


def test_shell_word_is_recognised_through_symlinks():
    (rule,) = rules("sh -c **").rules
    assert rule.shell and rule.paths == ("/usr/bin/dash",)


def test_allowed_dirs_are_resolved():
    fs_links = FakeFs(FS.files, {**FS.links, "/link": "/data/repo"})
    r = E.compile_exec_rules(policy("git **", dirs=("/link",)), PATH, stat=fs_links.stat,
                             realpath=fs_links.realpath, list_names=fs_links.list_names)
    assert r.allowed_dirs == ("/data/repo",)


def test_compile_is_deterministic():
    assert rules("git **", "go build **") == rules("git **", "go build **")


# ---------------------------------------------------------------- decide

GIT = rules("git **", "go build **")


@pytest.mark.parametrize("program,argv,cwd", [
    ("/usr/bin/git", ["git", "status"], REPO),
    ("/usr/bin/git", ["git"], REPO),
    ("/usr/bin/git", ["git", "log", "-1"], f"{REPO}/sub/dir"),
    ("/usr/bin/git", ["/usr/bin/git", "status"], REPO),
    ("/bin/git", ["git", "status"], REPO),  # same file through the /bin link
    ("/usr/lib/git-core/git", ["/usr/lib/git-core/git", "maintenance", "run", "--auto"], REPO),
    ("/usr/bin/go", ["go", "build", "./..."], REPO),
])
def test_allowed(program, argv, cwd):
    verdict = decide(GIT, program, argv, cwd)
    assert verdict.allowed, verdict.reason


@pytest.mark.parametrize("program,argv,cwd,why", [
    ("/usr/bin/git", ["git", "status"], "/tmp", "outside permissions.shell.allowed_dirs"),
    ("/usr/bin/git", ["git", "status"], "/data/repository", "outside"),  # prefix, not a parent
    ("/usr/bin/ls", ["ls"], REPO, "not one that a permissions.shell.allowlist pattern admits"),
    ("/tmp/git", ["git", "status"], REPO, "not one that"),  # a dropped copy named git
    ("/data/repo/git", ["git", "status"], REPO, "not one that"),
    ("/usr/bin/env", ["env", "git", "status"], REPO, "not one that"),
    ("/usr/bin/go", ["go", "run", "x.go"], REPO, "do not match 'go build **'"),
    ("/usr/bin/go", ["go"], REPO, "do not match"),
    ("/usr/bin/git", ["git-upload-pack", "."], REPO, "argv[0]"),  # multi-call dispatch
    ("/usr/bin/git", [], REPO, "empty argv"),
    ("/usr/bin/dash", ["sh", "-c", "git status"], REPO, "not one that"),  # shell not allowed
])
def test_refused(program, argv, cwd, why):
    verdict = decide(GIT, program, argv, cwd)
    assert not verdict.allowed
    assert why in verdict.reason
    assert verdict.rule.startswith("permissions.shell")


def test_disabled_shell_refuses_everything():
    for r in (rules("git **", enabled=False), E.ExecRules(False)):
        verdict = decide(r, "/usr/bin/git", ["git", "status"])
        assert not verdict.allowed and "nothing after its entrypoint" in verdict.reason


def test_env_is_allowed_only_with_its_own_rule():
    r = rules("git **", "env **")
    assert decide(r, "/usr/bin/env", ["env", "git", "status"]).allowed


def test_empty_allowed_dirs_refuse_everywhere():
    r = rules("git **", dirs=())
    assert any("no command can run anywhere" in n for n in r.notes)
    assert not decide(r, "/usr/bin/git", ["git"], "/").allowed


def test_wildcard_first_word_admits_any_program_with_matching_arguments():
    r = rules("* --version")
    assert decide(r, "/usr/bin/ls", ["ls", "--version"]).allowed
    assert not decide(r, "/usr/bin/ls", ["ls", "-la"]).allowed
    assert r.any_program


# ---------------------------------------------------------------- shells

SH = rules("git **", "sh **", "bash **", "env **")


@pytest.mark.parametrize("program,argv", [
    ("/bin/sh", ["sh", "-c", "git status"]),
    ("/bin/sh", ["sh", "-ec", "git log -1 --format=%h"]),
    ("/bin/sh", ["sh", "-c", "git commit -m 'a; b && c'"]),  # quoted: one word
    ("/bin/sh", ["sh", "-c", "git status", "name", "arg"]),
    ("/bin/bash", ["bash", "--norc", "-o", "pipefail", "-c", "/usr/bin/git status"]),
    ("/bin/bash", ["bash", "-c", "env git status"]),
])
def test_shell_command_allowed(program, argv):
    verdict = decide(SH, program, argv)
    assert verdict.allowed, verdict.reason


@pytest.mark.parametrize("command,why", [
    ("git status && id", "'&&'"),
    ("git status || id", "'||'"),
    ("git status; id", "';'"),
    ("git status | id", "'|'"),
    ("git status > out", "'>'"),
    ("git status >> out", "'>>'"),
    ("git status < in", "'<'"),
    ("git status &", "'&'"),
    ("git $(id)", "'$'"),
    ("git `id`", "backtick"),
    ("git status\nid", "newline"),
    ("git log $HOME", "'$'"),
    ("(git status)", "'('"),
    ("id", "matches no"),
    ("GIT_DIR=/x git status", "variable assignment"),
    ("./git status", "relative program path"),
    ("sh -c 'git status'", "nested shell"),
    ("eval git status", "matches no"),
    ("git 'unterminated", "cannot split"),
    ("", "empty"),
])
def test_shell_command_refused(command, why):
    verdict = decide(SH, "/bin/sh", ["sh", "-c", command])
    assert not verdict.allowed
    assert why in verdict.reason, verdict.reason


@pytest.mark.parametrize("argv,why", [
    (["sh"], "only run `-c"),  # commands from stdin
    (["sh", "script.sh"], "only run `-c"),
    (["sh", "-c"], "without a command"),
    (["bash", "-l", "-c", "git status"], "'-l'"),  # reads the profile: code of its own
    (["bash", "-i", "-c", "git status"], "'-i'"),
    (["bash", "--rcfile", "x", "-c", "git status"], "'--rcfile'"),
    (["bash", "-o", "history", "-c", "git status"], "-o 'history'"),
])
def test_shell_invocation_forms_refused(argv, why):
    verdict = decide(SH, "/bin/sh" if argv[0] == "sh" else "/bin/bash", argv)
    assert not verdict.allowed and why in verdict.reason, verdict.reason


@pytest.mark.parametrize("name", ["BASH_ENV", "ENV", "BASH_FUNC_git%%", "SHELLOPTS", "PS4"])
def test_shell_code_variables_refused(name):
    verdict = decide(SH, "/bin/bash", ["bash", "-c", "git status"], env=["PATH", name])
    assert not verdict.allowed and name in verdict.reason


def test_shell_environment_must_be_known():
    verdict = E.decide(SH, FS.binary("/bin/sh"), ["sh", "-c", "git status"], REPO, None)
    assert not verdict.allowed and "environment could not be read" in verdict.reason


def test_shell_pattern_still_applies_to_the_shell_argv():
    r = rules("git **", "sh -e -c **")
    assert not decide(r, "/bin/sh", ["sh", "-c", "git status"]).allowed
    assert decide(r, "/bin/sh", ["sh", "-e", "-c", "git status"]).allowed


def test_shell_inner_command_does_not_match_the_shell_rule_itself():
    r = rules("sh **")  # a shell alone admits no command
    assert not decide(r, "/bin/sh", ["sh", "-c", "ls"]).allowed


def test_other_shells_are_refused():
    r = rules("fish **")
    verdict = decide(r, "/usr/bin/fish", ["fish", "-c", "ls"])
    assert not verdict.allowed and "cannot be checked" in verdict.reason


def test_split_shell_command_words():
    assert E.split_shell_command("git  commit -m \"x y\"\t'z'") == ["git", "commit", "-m", "x y", "z"]


def test_command_line_quotes_and_truncates():
    assert E.command_line(["git", "commit", "-m", "a b"]) == "git commit -m 'a b'"
    assert E.command_line(["x"] * 1000, limit=20).endswith("(1000 words)")


# ---------------------------------------------------------------- pins


def _elf64(interp: bytes) -> bytes:
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, 2)  # e_phentsize, e_phnum
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0)
    interp_off = 64 + 2 * 56
    pt_interp = struct.pack("<IIQQQQQQ", 3, 4, interp_off, 0, 0, len(interp) + 1, 0, 0)
    return bytes(header) + load + pt_interp + interp + b"\0"


FILES = {
    "/usr/bin/git": _elf64(b"/lib64/ld-linux-x86-64.so.2"),
    "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": b"\x7fELF\x02\x01" + b"\0" * 58,
    "/opt/s/run.sh": b"#!/usr/bin/python3 -u\nprint(1)\n",
    "/usr/bin/python3.11": _elf64(b"/lib64/ld-linux-x86-64.so.2"),
    "/usr/bin/static": b"\x7fELF\x02\x01" + b"\0" * 58,
}
LINKS = {"/lib64/ld-linux-x86-64.so.2": "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
         "/usr/bin/python3": "/usr/bin/python3.11"}


def _read(path, size, offset):
    data = FILES[LINKS.get(path, path)]
    return data[offset:offset + size]


def test_interpreter_of_elf_script_and_static():
    assert E.interpreter_of("/usr/bin/git", _read) == "/lib64/ld-linux-x86-64.so.2"
    assert E.interpreter_of("/opt/s/run.sh", _read) == "/usr/bin/python3"
    assert E.interpreter_of("/usr/bin/static", _read) is None


def test_interpreter_of_real_python():
    # The running interpreter is a dynamically linked ELF on every supported host.
    import sys

    interp = E.interpreter_of(os.path.realpath(sys.executable))
    assert interp and os.path.basename(interp).startswith("ld-")


def test_execute_pins_follow_interpreters():
    pins = E.execute_pins(["/opt/s/run.sh", "/usr/bin/git"],
                          interpreter=lambda p: E.interpreter_of(p, _read),
                          realpath=lambda p: LINKS.get(p, p))
    assert pins == ("/opt/s/run.sh", "/usr/bin/git", "/usr/bin/python3.11",
                    "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")


def test_pin_execute_removes_execute_from_base_trees_only():
    rx = ("execute", "read_file", "read_dir")
    artifact = LandlockArtifact(7, rx, (
        PathRule("/usr", rx, "base"),
        PathRule("/usr/bin/python3", ("execute", "read_file"), "exec"),
        PathRule("/proc/self/fd/5", ("execute", "read_file"), "entrypoint-pinned"),
        PathRule("/data", ("read_file", "read_dir"), "manifest:/data:ro"),
    ), (), (), (), ())
    pinned = E.pin_execute(artifact, ["/usr/bin/git", "/usr/bin/python3"])
    by_path = {r.path: r for r in pinned.path_rules}
    assert by_path["/usr"].access == ("read_file", "read_dir")
    assert by_path["/usr/bin/python3"].origin == "exec"  # kept, not duplicated
    assert by_path["/proc/self/fd/5"].access == ("execute", "read_file")
    assert by_path["/usr/bin/git"].access == ("execute", "read_file")
    assert [r.path for r in pinned.path_rules if "execute" in r.access] == [
        "/usr/bin/python3", "/proc/self/fd/5", "/usr/bin/git"]


# ---------------------------------------------------------------- seccomp routing


@pytest.mark.parametrize("deny_action", ["errno", "notify", "log"])
def test_exec_syscalls_always_reach_the_supervisor(deny_action):
    from agent.compile import bpf as B
    from agent.compile import seccomp as S
    from agent.manifest.model import Policy, SyscallOverrides

    for policy in (Policy(name="t", version="1"),
                   Policy(name="t", version="1", syscalls=SyscallOverrides(allow=("execve",)))):
        art = S.compile_seccomp(policy, deny_action=deny_action, notify=("execve", "execveat"))
        sim = B.Simulator(art.bpf)
        for name in ("execve", "execveat"):
            assert sim(S.syscall_number(name)) == B.SECCOMP_RET_USER_NOTIF, (deny_action, name)
        assert sim(S.syscall_number("getpid")) == B.SECCOMP_RET_ALLOW
        assert art.notified == ("execve", "execveat") and "execve" not in art.allowed


def test_manifest_deny_wins_over_exec_routing():
    from agent.compile import bpf as B
    from agent.compile import seccomp as S
    from agent.manifest.model import Policy, SyscallOverrides

    policy = Policy(name="t", version="1", syscalls=SyscallOverrides(deny=("execveat",)))
    art = S.compile_seccomp(policy, notify=("execve", "execveat"))
    sim = B.Simulator(art.bpf)
    assert sim(S.syscall_number("execveat")) == B.SECCOMP_RET_ERRNO | 1
    assert art.notified == ("execve",)


def test_launch_filter_routes_exec_to_the_supervisor():
    from agent.compile import bpf as B
    from agent.compile import seccomp as S
    from agent.launch.plan import _seccomp_for_launch
    from agent.manifest.model import Policy

    filter_ = _seccomp_for_launch(Policy(name="t", version="1"))
    sim = B.Simulator(filter_["bpf"])
    assert sim(S.syscall_number("execve")) == B.SECCOMP_RET_USER_NOTIF
    assert sim(S.syscall_number("execveat")) == B.SECCOMP_RET_USER_NOTIF


# ---------------------------------------------------------------- reading argv


def _c_argv(words: list[bytes]):
    import ctypes

    strings = [ctypes.create_string_buffer(w) for w in words]
    array = (ctypes.c_void_p * (len(words) + 1))(*[ctypes.addressof(s) for s in strings], None)
    return strings, array


def test_read_call_reads_path_argv_and_env_of_a_process():
    import ctypes

    from agent.launch.exec_supervisor import AT_FDCWD, TargetMemory, read_call

    path = ctypes.create_string_buffer(b"/usr/bin/git")
    keep_argv, argv = _c_argv([b"git", b"commit", b"-m", "é ü".encode(), b""])
    keep_env, envp = _c_argv([b"PATH=/usr/bin", b"BASH_ENV=x"])
    memory = TargetMemory(os.getpid())  # our own memory: no privilege needed
    try:
        call = read_call(memory, False, (ctypes.addressof(path), ctypes.addressof(argv),
                                         ctypes.addressof(envp), 0, 0, 0))
        assert call.path == "/usr/bin/git" and call.dirfd == AT_FDCWD
        assert call.argv == ("git", "commit", "-m", "é ü", "")
        assert [s.split(b"=")[0] for s in memory.strings(call.envp)] == [b"PATH", b"BASH_ENV"]
        at = read_call(memory, True, ((-100) & 0xFFFFFFFF, ctypes.addressof(path),
                                      ctypes.addressof(argv), 0, 0x1000, 0))
        assert at.dirfd == -100 and at.flags == 0x1000 and at.envp == 0
        assert memory.strings(0) == []
    finally:
        memory.close()


def test_read_call_refuses_bad_pointers_and_huge_arguments():
    import ctypes

    from agent.launch import exec_supervisor as X

    path = ctypes.create_string_buffer(b"/usr/bin/git")
    memory = X.TargetMemory(os.getpid())
    try:
        with pytest.raises(X.Unreadable) as bad:
            X.read_call(memory, False, (8, 0, 0, 0, 0, 0))  # page 0 is never mapped
        assert bad.value.errno == 14  # EFAULT
        with pytest.raises(X.Unreadable):
            X.read_call(memory, False, (1 << 63, 0, 0, 0, 0, 0))  # not a user address
        long = ctypes.create_string_buffer(b"a" * (X.PATH_MAX + 10))
        with pytest.raises(X.Unreadable) as big:
            X.read_call(memory, False, (ctypes.addressof(long), 0, 0, 0, 0, 0))
        assert big.value.errno == 7  # E2BIG
        keep, argv = _c_argv([b"x"] * (X.MAX_ARGS + 1))
        with pytest.raises(X.Unreadable):
            X.read_call(memory, False, (ctypes.addressof(path), ctypes.addressof(argv), 0, 0, 0, 0))
    finally:
        memory.close()
