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
# The same function called with the GIL held (ctypes.PyDLL): for clone3, whose
# child must find the interpreter exactly as fork() leaves it.
_raw_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_raw_syscall.restype = ctypes.c_long

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
    "clone3": 435,
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


CLONE_INTO_CGROUP = 0x200000000
SIGCHLD = 17

# struct clone_args (include/uapi/linux/sched.h, CLONE_ARGS_SIZE_VER2 = 88):
# flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
# set_tid, set_tid_size, cgroup; all __aligned_u64.
_CloneArgs = ctypes.c_uint64 * 11


def fork_into(flags: int, cgroup_fd: int | None) -> int:
    """fork(2) through clone3(2): `flags` (CLONE_NEW*) and, with `cgroup_fd`,
    CLONE_INTO_CGROUP so the child starts in that v2 cgroup. Returns the
    child's pid in the parent and 0 in the child, like os.fork().

    CLONE_INTO_CGROUP places the child while fork holds only the read side
    of cgroup_threadgroup_rwsem; moving a process afterwards through
    cgroup.procs takes the write side, which waits for an RCU grace period
    (10-15 ms here) unless cgroup2 is mounted with favordynmods
    (kernel/cgroup/cgroup.c: cgroup_css_set_fork, cgroup_procs_write_start).

    The interpreter's fork bookkeeping runs as for os.fork()
    (PyOS_BeforeFork/AfterFork_*: import lock, threading, at-fork hooks), but
    glibc's does not: in the child, glibc's cached thread id is still the
    parent's, so the child must not use raise(3), abort(3) or pthread_kill(3).
    Call only from a single-threaded process.
    """
    args = _CloneArgs()
    args[0] = flags | (CLONE_INTO_CGROUP if cgroup_fd is not None else 0)
    args[4] = SIGCHLD
    if cgroup_fd is not None:
        args[10] = cgroup_fd
    api = ctypes.pythonapi  # these keep the GIL held, as fork() must
    api.PyOS_BeforeFork()
    pid = _raw_syscall(NR["clone3"], ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno() if pid < 0 else 0
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3: {os.strerror(err)}")
    return pid


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
