"""Raw system calls that the C library does not wrap (x86_64 numbers).

Every caller raises OSError with the kernel's errno, so a layer that cannot
be applied says why.

Built on `_ctypes`, the C half of the `ctypes` package, without the package
itself: `import ctypes` costs ~4 ms of a launch here (it defines some hundred
types at import), `_ctypes` ~0.6 ms. The types below are the only ones
its callers need. Arguments may be Python ints (passed as C long), bytes
(passed as `const char *`: structures the kernel only reads are packed with
`struct`), None (NULL) or any ctypes object (other callers pass those).
"""
import _ctypes
from posix import strerror


class c_long(_ctypes._SimpleCData):
    _type_ = "l"


class c_char(_ctypes._SimpleCData):
    _type_ = "c"


class _Function(_ctypes.CFuncPtr):
    # Called with the GIL released; errno saved for get_errno().
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = c_long


class _Process:
    """The running program and the libraries it loaded (dlopen(NULL)), as
    CFuncPtr((name, library)) looks symbols up."""
    _handle = _ctypes.dlopen(None, 0x2)  # RTLD_NOW


_syscall = _Function(("syscall", _Process))
get_errno = _ctypes.get_errno
addressof = _ctypes.addressof


def buffer(data: bytes):
    """A writable C copy of `data` (an array of char); `addressof()` gives its address."""
    return (c_char * len(data)).from_buffer_copy(data)


def _longs(args) -> list:
    # ctypes passes a Python int as a C int, which libffi sign-extends into
    # the 64-bit register (ffi64.c): right for anything in int range, and
    # cheaper than a c_long object; larger ints would be truncated.
    return [c_long(a) if a.__class__ is int and not -0x80000000 <= a < 0x80000000 else a
            for a in args]


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
    "prctl": 157,
    "prlimit64": 302,
    "setns": 308,
}


def syscall(name: str, *args) -> int:
    """Call syscall `name`; return its result or raise OSError(errno)."""
    res = _syscall(NR[name], *_longs(args))
    if res < 0:
        err = get_errno()
        raise OSError(err, f"{name}: {strerror(err)}")
    return res


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = _syscall(NR["prctl"], *_longs((option, arg2, arg3, arg4, arg5)))
    if res < 0:
        err = get_errno()
        raise OSError(err, f"prctl({option}): {strerror(err)}")
    return res


PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only exists from Python 3.12."""
    if _syscall(NR["unshare"], *_longs((flags,))) != 0:
        err = get_errno()
        raise OSError(err, f"unshare({flags:#x}): {strerror(err)}")


CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


SIGCHLD = 17


CLONE_VM = 0x00000100
CLONE_VFORK = 0x00004000
_clone = _Function(("clone", _Process))
_EXIT = _ctypes.dlsym(_Process._handle, "_exit")
_CHILD_STACK = 16384


def clone_exiting(flags: int) -> int:
    """A child cloned with `flags` (CLONE_NEW*) whose only code is _exit(0):
    its pid, for whatever the caller needs of its namespaces (the caller
    reaps it). No copy of this process is made.

    glibc's clone(3) runs `fn` on the stack it is given: `fn` is _exit
    itself, on a buffer of ours. CLONE_VM shares our memory instead of
    copying the page tables (a fork of a Python process is ~1.5 ms here, of
    the daemon more); CLONE_VFORK suspends us until the child has released
    it, i.e. is exiting. Every signal is blocked meanwhile, so no handler of
    ours can run in the child."""
    import _signal

    stack = (c_char * _CHILD_STACK)()
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        pid = _clone(c_long(_EXIT), c_long(addressof(stack) + _CHILD_STACK),
                     flags | CLONE_VM | CLONE_VFORK | SIGCHLD, None)
        err = get_errno() if pid < 0 else 0
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    if pid < 0:
        raise OSError(err, f"clone: {strerror(err)}")
    return pid
