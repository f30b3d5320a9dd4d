"""Raw system calls that the C library does not wrap (x86_64 numbers).

Every caller raises OSError with the kernel's errno, so a layer that cannot
be applied says why.
"""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# arch/x86/entry/syscalls/syscall_64.tbl
NR = {
    "execve": 59,
    "seccomp": 317,
    "pidfd_open": 434,
    "pidfd_send_signal": 424,
    "pidfd_getfd": 438,
    "landlock_create_ruleset": 444,
    "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    "bpf": 321,
    "perf_event_open": 298,
    "io_uring_setup": 425,
    "getppid": 110,
    "mount": 165,
    "unshare": 272,
    "umount2": 166,
    "capget": 125,
    "open_tree": 428,
    "move_mount": 429,
    "mount_setattr": 442,
    "openat2": 437,
    "execveat": 322,
}


def syscall(name: str, *args) -> int:
    """Call syscall `name`; return its result or raise OSError(errno)."""
    res = _syscall(ctypes.c_long(NR[name]), *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return res


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                      ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return res


PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only exists from Python 3.12."""
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


AT_EMPTY_PATH = 0x1000


def execveat_fd(fd: int, argv, env) -> None:
    """execveat(fd, "", argv, env, AT_EMPTY_PATH): execute the open file `fd` itself.

    Returns only by raising OSError. The kernel runs the inode behind `fd`,
    whatever its path names now (execveat(2)). A script cannot be run this way
    when `fd` is close-on-exec: its interpreter would be handed /dev/fd/N,
    which is gone by then (ENOENT; fexecve(3)).
    """
    def block(strings):
        array = (ctypes.c_char_p * (len(strings) + 1))()
        array[:-1] = [os.fsencode(s) for s in strings]
        array[-1] = None
        return array

    env_list = [f"{k}={v}" for k, v in env.items()]
    syscall("execveat", ctypes.c_int(fd), ctypes.c_char_p(b""), block(list(argv)),
            block(env_list), ctypes.c_int(AT_EMPTY_PATH))
    raise OSError(0, "execveat returned")  # unreachable: success does not return
