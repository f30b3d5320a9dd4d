"""Processes as /proc shows them: threads, descendants, identity."""
from __future__ import annotations

import ctypes
import errno
import os
import socket

from agent.enforce.libc import syscall


def read_proc(path: str) -> bytes:
    """A whole /proc file with open/read/close and no Python file object
    (which adds fstat, ioctl and lseek calls): a seq_file read(2) returns
    everything that fits in the buffer (fs/seq_file.c seq_read_iter)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            parts = [data]
            while chunk := os.read(fd, 65536):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def task_cgroups(pid: int) -> dict[str, str]:
    """Where process `pid` is: hierarchy ("" for v2, else its controllers as
    listed, e.g. "memory" or "cpu,cpuacct") -> path in it (cgroups(7)).
    FileNotFoundError or ProcessLookupError when there is no such process."""
    out = {}
    for line in read_proc(f"/proc/{pid}/cgroup").decode("utf-8", "surrogateescape").splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def exists(pid: int) -> bool:
    return os.path.isdir(f"/proc/{pid}")


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def is_kernel_thread(pid: int) -> bool | None:
    """True for a kernel thread, False for a user process, None when there is no process `pid`."""
    # PF_KTHREAD (0x00200000) in field 9 of /proc/PID/stat (proc(5)); the
    # command may hold spaces and ')' so split after the last ')'.
    try:
        rest = read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return bool(int(rest[6]) & 0x00200000)


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (/proc/PID/task/TID/children,
    CONFIG_PROC_CHILDREN), else found by scanning every process's ppid."""
    found: set[int] = set()
    tids = threads(pid)
    if tids and os.path.exists(f"/proc/{pid}/task/{tids[0]}/children"):
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found.update(int(x) for x in f.read().split())
            except FileNotFoundError:
                continue
        return sorted(found)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.add(int(entry))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    seen = {pid}
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                out.append(child)
                todo.append(child)
    return out


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22): with the pid, names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def inet_socket_count(pid: int) -> int:
    """How many sockets of the inet families `pid` holds open.

    Each socket fd is copied into this process with pidfd_getfd(2) (needs
    ptrace access: CAP_SYS_PTRACE) and its family read with SO_DOMAIN;
    /proc/PID/net tables would miss sockets that are not bound yet."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return 0
    sockets = []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets.append(fd)
        except OSError:
            continue  # closed meanwhile
    if not sockets:
        return 0
    try:
        pidfd = os.pidfd_open(pid)
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return 0
    count = 0
    try:
        for fd in sockets:
            try:
                copy = syscall("pidfd_getfd", ctypes.c_int(pidfd), ctypes.c_int(int(fd)), ctypes.c_uint(0))
            except OSError as exc:
                # EBADF: closed meanwhile. Anything else: a socket whose family
                # cannot be read counts as inet (the report errs towards "partial").
                count += exc.errno != errno.EBADF
                continue
            try:
                # fileno= reads the family with SO_DOMAIN; closing closes the copy.
                with socket.socket(fileno=copy) as held:
                    count += held.family in (socket.AF_INET, socket.AF_INET6)
            except OSError:
                os.close(copy)
    finally:
        os.close(pidfd)
    return count
