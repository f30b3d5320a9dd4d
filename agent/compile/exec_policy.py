"""Shell policy -> exec rules, and the decision for one execve (pure).

`permissions.shell` grants commands, not a shell. The launcher compiles the
allowlist once, before the skill starts (`compile_exec_rules`), into the set
of programs each pattern admits; the supervisor then asks `decide` about
every execve/execveat the skill makes after its entrypoint.

How a pattern's first word maps to programs (decided once, at launch):
  * a bare word (`git`) admits every regular executable file named `git` in
    the directories of the skill's PATH (the filtered PATH the skill starts
    with) and in the FHS places for programs' internal executables,
    /usr/lib/*/ and /usr/libexec[/*]/ (git re-executes itself as
    /usr/lib/git-core/git);
  * an absolute word (`/usr/bin/git`) admits that file only;
  * `*` / `**` admit any program (lint warns; Landlock pinning is then off);
  * a relative word with a `/` (`./build.sh`) is an error.
Programs are compared by identity (device and inode after symlinks are
resolved), never by name, so `/tmp/git` that the skill dropped or copied
there does not match `git`; files under any directory the skill can write
are never admitted (their content could change after the check).
argv[0] must name the program (its basename equals the rule word's or the
file's): multi-call binaries pick what to run from it.

Shells (`sh`, `bash`, `dash`, ...) are admitted only by a pattern naming
the shell, and then only as `sh [safe options] -c 'command' [args]`: the
command string is split into words (shlex), refused if it holds an
operator (`&&`, `||`, `;`, `|`, `&`, `>`, `>>`, `<`, `(`, `)`), `$`
(parameter, `$(…)` and arithmetic expansion), backticks or newlines, and
its words must match a non-shell pattern. The variables that make a shell
run other code (BASH_ENV, ENV, BASH_FUNC_*, SHELLOPTS, BASHOPTS, PS4) are
refused in the new environment. Whatever the shell then runs is an execve
of its own and is checked again.

The working directory must lie inside `shell.allowed_dirs`.
"""
from __future__ import annotations

import os
import shlex
import stat as stat_module
import struct
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

from agent.manifest.glob import ANY, ONE, match_command
from agent.manifest.model import ShellPolicy

# Shells whose -c strings are checked (POSIX sh grammar, which shlex follows
# closely enough once every operator and `$` is refused).
POSIX_SHELLS = frozenset({"sh", "dash", "bash", "rbash", "ash", "zsh", "ksh", "ksh93",
                          "mksh", "posh", "yash"})
# Shells with another grammar: their strings are not checked, so they are refused.
OTHER_SHELLS = frozenset({"csh", "tcsh", "fish", "rc", "es", "nu", "xonsh", "elvish"})
SHELL_FLAGS = frozenset("cefuxv")  # -c plus options that only make the shell stricter/louder
SHELL_LONG_OPTIONS = frozenset({"--norc", "--noprofile", "--posix"})
SHELL_O_OPTIONS = frozenset({"errexit", "nounset", "pipefail", "noglob", "xtrace", "verbose",
                             "posix"})
SHELL_CODE_VARIABLES = frozenset({"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4"})
# Characters that are shell syntax; shlex returns runs of them as tokens.
OPERATOR_CHARS = "();<>|&"
REFUSED_ANYWHERE = {"\n": "newline", "\r": "carriage return", "`": "backtick",
                    "$": "'$' (parameter, $(…) or arithmetic expansion)"}
LIBEXEC_PARENTS = ("/usr/lib", "/usr/libexec")
MAX_INTERPRETER_DEPTH = 4  # binfmt handlers nest at most 5 deep (fs/exec.c)


class ExecPolicyError(ValueError):
    """The shell allowlist cannot be compiled into exec rules."""


@dataclass(frozen=True)
class Binary:
    """The file an execve would run: where it is and what it is."""

    path: str  # as the supervisor sees it (for messages)
    dev: int
    ino: int

    @property
    def identity(self) -> tuple[int, int]:
        return (self.dev, self.ino)


@dataclass(frozen=True)
class ExecRule:
    text: str  # the pattern as written
    words: tuple[str, ...]
    word: str  # the first word (a normalised absolute path, a bare name, `*` or `**`)
    paths: tuple[str, ...]  # real paths of the programs it admits (sorted)
    ids: frozenset  # their (st_dev, st_ino)
    shell: bool  # the first word is a POSIX shell

    @property
    def wildcard(self) -> bool:
        return self.word in (ONE, ANY)

    def admits(self, binary: Binary) -> bool:
        return self.wildcard or binary.identity in self.ids


@dataclass(frozen=True)
class ExecRules:
    enabled: bool
    rules: tuple[ExecRule, ...] = ()
    allowed_dirs: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def programs(self) -> tuple[str, ...]:
        """Every program some pattern admits (for Landlock execute rights)."""
        return tuple(sorted({p for rule in self.rules for p in rule.paths}))

    @property
    def any_program(self) -> bool:
        return any(rule.wildcard for rule in self.rules)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str  # the pattern that allowed it, or the manifest field that refused it


# ---------------------------------------------------------------- compile


def _within(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")


def _is_executable_file(st: os.stat_result) -> bool:
    return stat_module.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _list_names(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _candidates(word: str, path_dirs: Sequence[str], list_names) -> list[str]:
    found = [os.path.join(d, word) for d in path_dirs]
    for parent in LIBEXEC_PARENTS:
        found.append(os.path.join(parent, word))
        found.extend(os.path.join(parent, sub, word) for sub in list_names(parent))
    return found


def compile_exec_rules(
    shell: ShellPolicy,
    path_env: str,
    *,
    writable: Iterable[str] = (),
    stat: Callable[[str], os.stat_result] = os.stat,
    realpath: Callable[[str], str] = os.path.realpath,
    list_names: Callable[[str], list[str]] = _list_names,
) -> ExecRules:
    """Resolve every pattern's first word to the programs it admits.

    `path_env` is the PATH the skill starts with; `writable` lists the
    directories the skill may write (its rw grants, state dir, private /tmp):
    nothing under them is admitted.
    """
    if not shell.enabled:
        return ExecRules(False)
    notes: list[str] = []
    writable = tuple(os.path.normpath(w) for w in writable)
    path_dirs = []
    for entry in path_env.split(":"):
        if entry.startswith("/"):
            path_dirs.append(os.path.normpath(entry))
        else:
            notes.append(f"PATH entry {entry!r} is not absolute (it names the working "
                         "directory); no program is admitted through it")
    path_dirs = list(dict.fromkeys(path_dirs))

    rules = []
    for pattern in shell.allowlist:
        word = pattern.words[0]
        if word in (ONE, ANY):
            notes.append(f"'{pattern.text}': the first word admits any program, so execute "
                         "rights cannot be pinned to the allowlist")
            rules.append(ExecRule(pattern.text, pattern.words, word, (), frozenset(), False))
            continue
        if "/" in word and not word.startswith("/"):
            raise ExecPolicyError(f"permissions.shell.allowlist: '{pattern.text}': the program "
                                  f"{word!r} must be a bare name (looked up in PATH) or an "
                                  "absolute path")
        if word.startswith("/"):
            word = os.path.normpath(word)
            candidates = [word]
        else:
            candidates = _candidates(word, path_dirs, list_names)
        paths: dict[str, tuple[int, int]] = {}
        for candidate in candidates:
            try:
                st = stat(candidate)
            except OSError:
                continue
            if not _is_executable_file(st):
                continue
            real = realpath(candidate)
            reached = next((w for w in writable if _within(real, w) or _within(candidate, w)),
                           None)
            if reached is not None:
                notes.append(f"'{pattern.text}': {candidate} is not admitted: the skill can "
                             f"write {reached}")
                continue
            paths[real] = (st.st_dev, st.st_ino)
        if not paths:
            notes.append(f"'{pattern.text}': no executable {word!r} found "
                         f"({'PATH ' + ':'.join(path_dirs) if not word.startswith('/') else 'path'}); "
                         "the pattern admits nothing")
        shell_word = os.path.basename(word) in POSIX_SHELLS or any(
            os.path.basename(p) in POSIX_SHELLS for p in paths)
        rules.append(ExecRule(pattern.text, pattern.words, word, tuple(sorted(paths)),
                              frozenset(paths.values()), shell_word))
    dirs = tuple(dict.fromkeys(os.path.normpath(realpath(d)) for d in shell.allowed_dirs))
    if rules and not dirs:
        notes.append("shell.allowed_dirs is empty: no command can run anywhere")
    return ExecRules(True, tuple(rules), dirs, tuple(notes))


# ------------------------------------------------------- interpreters, pins


def _read_head(path: str, size: int, offset: int = 0) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def interpreter_of(path: str, read: Callable[[str, int, int], bytes] = _read_head) -> Optional[str]:
    """The program the kernel opens to run `path`: an ELF file's PT_INTERP
    (the dynamic loader) or a script's `#!` interpreter; None for neither.

    execve needs Landlock `execute` on that file too: binfmt_elf and
    binfmt_script open it with open_exec() (fs/binfmt_elf.c, binfmt_script.c).
    """
    try:
        head = read(path, 256, 0)
    except OSError:
        return None
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].strip()
        word = line.split()[0] if line.split() else b""
        return os.fsdecode(word) if word.startswith(b"/") else None
    if not head.startswith(b"\x7fELF") or len(head) < 64 or head[5] != 1:  # little-endian only
        return None
    if head[4] == 2:  # ELFCLASS64
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        fmt, type_at, offset_at, size_at = "<IIQQQQQQ", 0, 2, 5
    elif head[4] == 1:  # ELFCLASS32
        phoff, = struct.unpack_from("<I", head, 28)
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        fmt, type_at, offset_at, size_at = "<IIIIIIII", 0, 1, 4
    else:
        return None
    if phentsize < struct.calcsize(fmt) or phnum > 256:
        return None
    try:
        table = read(path, phentsize * phnum, phoff)
    except OSError:
        return None
    for index in range(phnum):
        entry = table[index * phentsize:index * phentsize + struct.calcsize(fmt)]
        if len(entry) < struct.calcsize(fmt):
            return None
        fields = struct.unpack(fmt, entry)
        if fields[type_at] == 3:  # PT_INTERP
            size = fields[size_at]
            if not 1 < size <= 4096:
                return None
            try:
                text = read(path, size, fields[offset_at])
            except OSError:
                return None
            return os.fsdecode(text.split(b"\0", 1)[0]) or None
    return None


def execute_pins(programs: Iterable[str], *, interpreter=interpreter_of,
                 realpath: Callable[[str], str] = os.path.realpath) -> tuple[str, ...]:
    """`programs` plus the interpreters the kernel opens to run them."""
    pinned: dict[str, None] = {}
    for program in programs:
        current: Optional[str] = program
        for _ in range(MAX_INTERPRETER_DEPTH):
            if current is None:
                break
            current = realpath(current)
            if current in pinned:
                break
            pinned[current] = None
            current = interpreter(current)
    return tuple(sorted(pinned))


def pin_execute(artifact, programs: Iterable[str], origin: str = "exec-pin"):
    """`artifact` (a LandlockArtifact) with execute granted on `programs` only.

    The base profile gives whole runtime trees (/usr, /lib, ...) execute;
    here they keep read access and lose execute, and each program gets a
    file rule with execute + read_file. Rules of other origins (the
    launcher's own rule for the entrypoint) stay as they are.
    """
    from agent.compile.landlock import EXECUTE_FILE, PathRule

    rules = []
    for rule in artifact.path_rules:
        if rule.origin != "base" or "execute" not in rule.access:
            rules.append(rule)
            continue
        access = tuple(a for a in rule.access if a != "execute")
        if access:
            rules.append(replace(rule, access=access))
    have = {rule.path for rule in rules if "execute" in rule.access}
    rules.extend(PathRule(p, EXECUTE_FILE, origin) for p in programs if p not in have)
    return replace(artifact, path_rules=tuple(rules))


# ---------------------------------------------------------------- decide


def command_line(argv: Sequence[str], limit: int = 1000) -> str:
    text = shlex.join(argv)
    return text if len(text) <= limit else text[:limit] + f"… ({len(argv)} words)"


def split_shell_command(text: str) -> list[str]:
    """Words of a `sh -c` string; ValueError naming the first refused construct."""
    for char, name in REFUSED_ANYWHERE.items():
        if char in text:
            raise ValueError(f"{name} is not allowed")
    lexer = shlex.shlex(text, posix=True, punctuation_chars=OPERATOR_CHARS)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        words = list(lexer)
    except ValueError as exc:  # unbalanced quotes
        raise ValueError(f"cannot split: {exc}") from None
    for word in words:
        if word and all(c in OPERATOR_CHARS for c in word):
            raise ValueError(f"operator '{word}' is not allowed")
    if not words:
        raise ValueError("the command is empty")
    return words


def _shell_command(argv: Sequence[str]) -> str:
    """The -c string of a shell invocation; ValueError when it is any other form."""
    seen_c = False
    index = 1
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg in SHELL_LONG_OPTIONS:
            index += 1
            continue
        if arg in ("-o", "+o"):
            if index + 1 >= len(argv) or argv[index + 1] not in SHELL_O_OPTIONS:
                shown = argv[index + 1] if index + 1 < len(argv) else ""
                raise ValueError(f"shell option {arg} {shown!r} is not allowed")
            index += 2
            continue
        if len(arg) > 1 and arg[0] in "-+" and not arg.startswith("--"):
            bad = sorted(set(arg[1:]) - SHELL_FLAGS)
            if bad:
                raise ValueError(f"shell option {arg!r} is not allowed")
            seen_c = seen_c or (arg[0] == "-" and "c" in arg)
            index += 1
            continue
        if arg.startswith("-"):
            raise ValueError(f"shell option {arg!r} is not allowed")
        break
    if not seen_c:
        raise ValueError("a shell may only run `-c 'command'` (a script or stdin is not checked)")
    if index >= len(argv):
        raise ValueError("-c without a command string")
    return argv[index]


def _word_names(word: str, rule: ExecRule) -> bool:
    """Does the first word of a -c command name `rule`'s program?"""
    if word == rule.word:
        return True
    return word.startswith("/") and os.path.normpath(word) in rule.paths


def _match_args(rule: ExecRule, argv: Sequence[str]) -> bool:
    if rule.word == ANY:
        return match_command(rule.words, ("<program>", *argv[1:]))
    return match_command(rule.words[1:], argv[1:])


def _argv0_names(rule: ExecRule, binary: Binary, argv0: str) -> bool:
    if rule.wildcard:
        return True
    base = os.path.basename(argv0)
    return base in (os.path.basename(rule.word), os.path.basename(binary.path),
                    *(os.path.basename(p) for p in rule.paths))


def _inner_rule(rules: ExecRules, words: Sequence[str]) -> Optional[ExecRule]:
    for rule in rules.rules:
        if rule.shell:
            continue
        if rule.wildcard or _word_names(words[0], rule):
            if _match_args(rule, words):
                return rule
    return None


def _is_shell(rule: ExecRule, binary: Binary) -> bool:
    return rule.shell or os.path.basename(binary.path) in POSIX_SHELLS


def _check_shell(rules: ExecRules, argv: Sequence[str],
                 env_names: Optional[Iterable[str]]) -> Decision:
    shell = os.path.basename(argv[0]) or "sh"
    if env_names is None:
        return Decision(False, f"{shell}: its environment could not be read", "")
    code_vars = sorted(n for n in env_names
                       if n in SHELL_CODE_VARIABLES or n.startswith("BASH_FUNC_"))
    if code_vars:
        return Decision(False, f"{shell}: environment variable(s) {code_vars} make a shell "
                               "run code of their own", "")
    try:
        command = _shell_command(argv)
        words = split_shell_command(command)
    except ValueError as exc:
        return Decision(False, f"{shell} -c: {exc}", "")
    first = os.path.basename(words[0])
    if first in POSIX_SHELLS or first in OTHER_SHELLS:
        return Decision(False, f"{shell} -c: a nested shell ({words[0]}) is not allowed", "")
    if "=" in words[0] and "/" not in words[0].split("=", 1)[0]:
        return Decision(False, f"{shell} -c: variable assignment {words[0]!r} before the "
                               "command is not allowed", "")
    if "/" in words[0] and not words[0].startswith("/"):
        return Decision(False, f"{shell} -c: relative program path {words[0]!r}", "")
    inner = _inner_rule(rules, words)
    if inner is None:
        return Decision(False, f"{shell} -c: {command_line(words)!s} matches no "
                               "permissions.shell.allowlist pattern", "")
    return Decision(True, f"{shell} -c '{command_line(words)}' matches '{inner.text}'",
                    inner.text)


def decide(rules: ExecRules, binary: Binary, argv: Sequence[str], cwd: str,
           env_names: Optional[Iterable[str]] = None) -> Decision:
    """May the skill exec `binary` with `argv` in `cwd`?

    `env_names` (names in the new environment) matters for shells only; the
    supervisor reads it when the program is a shell.
    """
    if not rules.enabled:
        return Decision(False, "permissions.shell is absent or disabled: the skill may exec "
                               "nothing after its entrypoint", "permissions.shell")
    if not any(_within(cwd, d) for d in rules.allowed_dirs):
        return Decision(False, f"working directory {cwd} is outside permissions.shell."
                               f"allowed_dirs {list(rules.allowed_dirs)}",
                        "permissions.shell.allowed_dirs")
    if not argv:
        return Decision(False, "empty argv", "permissions.shell.allowlist")
    candidates = [rule for rule in rules.rules if rule.admits(binary)]
    if not candidates:
        return Decision(False, f"program {binary.path} is not one that a "
                               "permissions.shell.allowlist pattern admits",
                        "permissions.shell.allowlist")
    if os.path.basename(binary.path) in OTHER_SHELLS:
        return Decision(False, f"{binary.path}: shells other than POSIX sh cannot be checked",
                        "permissions.shell.allowlist")
    refusals = []
    for rule in candidates:
        if not _argv0_names(rule, binary, argv[0]):
            refusals.append(f"argv[0] {argv[0]!r} does not name {binary.path} "
                            f"('{rule.text}')")
            continue
        if not _match_args(rule, argv):
            refusals.append(f"arguments do not match '{rule.text}'")
            continue
        if _is_shell(rule, binary):
            verdict = _check_shell(rules, argv, env_names)
            if verdict.allowed:
                return Decision(True, verdict.reason, f"{rule.text} -> {verdict.rule}")
            refusals.append(verdict.reason)
            continue
        return Decision(True, f"matches '{rule.text}'", rule.text)
    return Decision(False, "; ".join(dict.fromkeys(refusals)), "permissions.shell.allowlist")
