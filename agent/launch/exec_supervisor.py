"""Exec supervision: the supervisor's answer to each execve/execveat.

The launch filter sends execve and execveat to the supervisor (seccomp user
notification). For each one the supervisor reads what the target asked for
(path, argv, for shells the environment's names) from /proc/<pid>/mem, the
target's working directory from /proc/<pid>/cwd, opens the file the kernel
would execute inside the target's root, then checks the notification is
still valid (SECCOMP_IOCTL_NOTIF_ID_VALID: the pid may have died and been
reused while we read) and asks `agent.compile.exec_policy.decide`.
Allowed: the syscall continues (SECCOMP_USER_NOTIF_FLAG_CONTINUE). Refused:
EPERM and an `exec` Violation naming the command line, cwd and reason.

CONTINUE lets the kernel read the path and argv again after we looked
(seccomp_unotify(2), "Caveats"): a second thread of the target can rewrite
them in between. The binary is pinned by Landlock (only admitted programs
and their loaders have `execute`), so a swap of the path gains at most a
different admitted program; the arguments can still change. See
docs/threat-model.md.

Pids in notifications are in the supervisor's PID namespace (the skill runs
in a child namespace), which is the namespace of the /proc mounted here.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from agent.compile.exec_policy import (POSIX_SHELLS, Binary, ExecRules, command_line,
                                       decide)
from agent.enforce.libc import NR

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
# include/uapi/linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
PATH_MAX = 4096
MAX_ARGS = 16384  # more words than this are refused, not read
MAX_ARG_BYTES = 1 << 20
EXEC_SYSCALLS = ("execve", "execveat")
# Errors that mean "nothing to execute here": relayed as the kernel would
# give them, without an event, so that execvp's PATH search goes on.
RELAYED = (errno.ENOENT, errno.ENOTDIR)


class Unreadable(Exception):
    """The target's arguments could not be read (bad pointer, too large)."""

    def __init__(self, errno_: int, reason: str):
        super().__init__(reason)
        self.errno = errno_


# struct open_how: flags, mode, resolve (u64 each)
_OPEN_HOW = struct.Struct("=3Q")


@dataclass(frozen=True)
class ExecCall:
    path: str  # as passed; "" with AT_EMPTY_PATH
    dirfd: int  # AT_FDCWD for execve
    flags: int
    argv: tuple[str, ...]
    envp: int  # address of the environment pointer array


class TargetMemory:
    """Reads from another process's memory through /proc/<pid>/mem."""

    def __init__(self, pid: int):
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self.budget = MAX_ARG_BYTES

    def close(self) -> None:
        os.close(self.fd)

    def _read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, addr)
        except (OSError, OverflowError):
            data = b""
        if not data:
            raise Unreadable(errno.EFAULT, f"cannot read the target's memory at {addr:#x}")
        return data

    def string(self, addr: int, limit: int) -> bytes:
        out = bytearray()
        chunk = 256
        while True:
            data = self._read(addr + len(out), min(chunk, limit + 1 - len(out)))
            nul = data.find(0)
            if nul >= 0:
                out += data[:nul]
                break
            out += data
            if len(out) > limit:
                raise Unreadable(errno.E2BIG, f"a string longer than {limit} bytes")
            chunk = 4096
        self.budget -= len(out) + 1
        if self.budget < 0:
            raise Unreadable(errno.E2BIG, f"arguments larger than {MAX_ARG_BYTES} bytes")
        return bytes(out)

    def pointers(self, addr: int) -> list[int]:
        """A NULL-terminated array of pointers (argv/envp); [] for a NULL array."""
        if addr == 0:
            return []
        found: list[int] = []
        while True:
            data = self._read(addr + 8 * len(found), 512)
            whole = len(data) // 8 * 8
            if not whole:
                raise Unreadable(errno.EFAULT, "a pointer array crosses unreadable memory")
            for (value,) in struct.iter_unpack("=Q", data[:whole]):
                if value == 0:
                    return found
                found.append(value)
                if len(found) > MAX_ARGS:
                    raise Unreadable(errno.E2BIG, f"more than {MAX_ARGS} arguments")

    def strings(self, addr: int) -> list[bytes]:
        return [self.string(p, PATH_MAX * 32) for p in self.pointers(addr)]


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def read_call(memory: TargetMemory, execveat: bool, args) -> ExecCall:
    if execveat:
        dirfd, path_addr, argv_addr, envp, flags = (_signed32(args[0]), args[1], args[2],
                                                    args[3], args[4] & 0xFFFFFFFF)
    else:
        dirfd, path_addr, argv_addr, envp, flags = AT_FDCWD, args[0], args[1], args[2], 0
    path = memory.string(path_addr, PATH_MAX)
    argv = tuple(os.fsdecode(word) for word in memory.strings(argv_addr))
    return ExecCall(os.fsdecode(path), dirfd, flags, argv, envp)


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    from agent.enforce.libc import syscall

    return syscall("openat2", dirfd, os.fsencode(path), _OPEN_HOW.pack(flags, 0, resolve),
                   _OPEN_HOW.size)


def _target_path(pid: int, link: str) -> str:
    """A /proc/<pid>/{cwd,fd/N} link as the path the target sees."""
    text = os.readlink(f"/proc/{pid}/{link}")
    if not text.startswith("/") or text.endswith(" (deleted)"):
        raise OSError(errno.ENOENT, f"{link} is {text!r}")
    return text


def open_binary(pid: int, call: ExecCall, cwd: str) -> int:
    """An O_PATH fd on the file the kernel would execute for `call`, resolved
    in the target's root and working directory. Raises OSError."""
    nofollow = os.O_NOFOLLOW if call.flags & AT_SYMLINK_NOFOLLOW else 0
    if call.path == "":
        if not call.flags & AT_EMPTY_PATH:
            raise OSError(errno.ENOENT, "empty path")
        # /proc/<pid>/fd/N opens the very file the target holds.
        return os.open(f"/proc/{pid}/fd/{call.dirfd}", os.O_PATH | os.O_CLOEXEC)
    if call.path.startswith("/"):
        path = call.path
    elif call.dirfd == AT_FDCWD:
        path = os.path.join(cwd, call.path)
    else:
        path = os.path.join(_target_path(pid, f"fd/{call.dirfd}"), call.path)
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # RESOLVE_IN_ROOT: `..` and absolute symlinks stay inside the target's
        # root, as they do for the target (openat2(2)).
        return _openat2(root, path, os.O_PATH | os.O_CLOEXEC | nofollow,
                        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class ExecSupervisor:
    """Answers the execve/execveat notifications of one launched skill."""

    def __init__(self, rules: ExecRules, *, audit: bool,
                 emit: Callable[..., None]):
        self.rules = rules
        self.audit = audit
        self.emit = emit  # emit(pid=, operation=, decision=, rule=, detail=)

    def handle(self, listener: int, request) -> None:
        """Answer one exec by the skill. The launcher's own exec of the
        entrypoint never gets here: the supervisor answers it (supervisor.py
        `_on_exec`)."""
        from agent.launch import notify

        execveat = request.nr == NR["execveat"]  # the filter is x86_64-only
        operation, cwd, program = "exec", "?", "?"
        fd = None
        try:
            memory = TargetMemory(request.pid)
            try:
                call = read_call(memory, execveat, request.args)
                operation = command_line(call.argv) or repr(call.path)
                cwd = _target_path(request.pid, "cwd")
                try:
                    fd = open_binary(request.pid, call, cwd)
                except OSError as exc:
                    if exc.errno in RELAYED:
                        self._answer(listener, request, error=exc.errno)
                        return
                    raise Unreadable(exc.errno or errno.EPERM,
                                     f"cannot resolve {call.path!r}: {exc.strerror or exc}")
                st = os.fstat(fd)
                binary = Binary(_describe_fd(fd), st.st_dev, st.st_ino)
                program = binary.path
                env_names = None
                if self._may_be_shell(binary):
                    env_names = [os.fsdecode(s.split(b"=", 1)[0]) for s in memory.strings(call.envp)]
            finally:
                memory.close()
        except Unreadable as exc:
            if notify.id_valid(listener, request.id):
                self._refuse(listener, request, operation, cwd, program,
                             f"not checked: {exc}", "exec supervision", exc.errno)
            return
        except OSError as exc:  # the target vanished under us (/proc entries gone)
            if notify.id_valid(listener, request.id):
                self._refuse(listener, request, operation, cwd, program,
                             f"not checked: {exc.strerror or exc}", "exec supervision", errno.EPERM)
            return
        finally:
            if fd is not None:
                os.close(fd)
        # Everything read above is only about this target if the notification
        # still waits: a dead target's pid may already name another process.
        if not notify.id_valid(listener, request.id):
            return
        if not stat.S_ISREG(st.st_mode):
            self._answer(listener, request, error=errno.EACCES)  # what execve(2) says
            return
        verdict = decide(self.rules, binary, call.argv, cwd, env_names)
        if verdict.allowed:
            self._answer(listener, request, resume=True)
            return
        self._refuse(listener, request, operation, cwd, program, verdict.reason,
                     verdict.rule, errno.EPERM)

    def _may_be_shell(self, binary: Binary) -> bool:
        if os.path.basename(binary.path) in POSIX_SHELLS:
            return True
        return any(rule.shell and rule.admits(binary) for rule in self.rules.rules)

    @staticmethod
    def _answer(listener: int, request, *, error: int = 0, resume: bool = False) -> None:
        from agent.launch import notify

        notify.respond(listener, request.id, error=error, resume=resume)

    def _refuse(self, listener, request, operation, cwd, program, reason, rule, error) -> None:
        self._answer(listener, request, error=error, resume=self.audit)
        self.emit(pid=request.pid, operation=operation,
                  decision="audited" if self.audit else "denied",
                  rule=reason if rule in reason else f"{reason} ({rule})",
                  detail=f"cwd: {cwd}; program: {program}")
