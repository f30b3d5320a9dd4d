"""Seccomp user notifications: receive a trapped syscall, answer it.

Structures and ioctl numbers follow include/uapi/linux/seccomp.h:

    struct seccomp_data       { int nr; __u32 arch; __u64 ip; __u64 args[6]; }   64 bytes
    struct seccomp_notif      { __u64 id; __u32 pid; __u32 flags; seccomp_data } 80 bytes
    struct seccomp_notif_resp { __u64 id; __s64 val; __s32 error; __u32 flags; }  24 bytes

    SECCOMP_IOCTL_NOTIF_RECV     = _IOWR('!', 0, struct seccomp_notif)
    SECCOMP_IOCTL_NOTIF_SEND     = _IOWR('!', 1, struct seccomp_notif_resp)
    SECCOMP_IOCTL_NOTIF_ID_VALID = _IOW('!', 2, __u64)

The listener fd is pollable: POLLIN when a notification waits, POLLHUP once
every task using the filter is gone (seccomp_notify_poll in kernel/seccomp.c).
"""
import errno
import fcntl
import _struct as struct  # the C module `struct` re-exports: one import less

AUDIT_ARCH_X86_64 = 0xC000003E  # include/uapi/linux/audit.h (agent.compile.bpf has the same)


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | number


_IOC_WRITE, _IOC_READ = 1, 2
NOTIF_SIZE = 80
RESP_SIZE = 24
IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, NOTIF_SIZE)
IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, RESP_SIZE)
IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)

# The target resumes the syscall as if no filter had trapped it. Not a
# security decision on pointer arguments: the target can change the memory
# they point to between our look and the kernel's (seccomp_unotify(2)).
USER_NOTIF_FLAG_CONTINUE = 1

_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")
assert _NOTIF.size == NOTIF_SIZE and _RESP.size == RESP_SIZE


class Notification:
    __slots__ = ("id", "pid", "nr", "arch", "args")

    def __init__(self, id: int, pid: int, nr: int, arch: int, args: tuple):
        self.id = id
        self.pid = pid  # in the receiver's PID namespace
        self.nr = nr
        self.arch = arch
        self.args = args


def receive(listener_fd: int) -> Notification | None:
    """Read one pending notification; None when it vanished before we read it.

    The kernel demands a zeroed buffer (EINVAL otherwise). ENOENT means the
    target was killed or its syscall interrupted between poll and receive.
    """
    buffer = bytearray(NOTIF_SIZE)
    try:
        fcntl.ioctl(listener_fd, IOCTL_NOTIF_RECV, buffer, True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buffer)
    return Notification(nid, pid, nr, arch, tuple(args))


def respond(listener_fd: int, notification_id: int, *, error: int = 0, value: int = 0,
            resume: bool = False) -> bool:
    """Answer a notification: fail it with `error` (a positive errno), return
    `value`, or let the syscall run (`resume`). False when the target is gone."""
    flags = USER_NOTIF_FLAG_CONTINUE if resume else 0
    if resume:
        error, value = 0, 0
    buffer = bytearray(_RESP.pack(notification_id, value, -error if error else 0, flags))
    try:
        fcntl.ioctl(listener_fd, IOCTL_NOTIF_SEND, buffer, True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # target died or was interrupted meanwhile
            return False
        raise
    return True


def id_valid(listener_fd: int, notification_id: int) -> bool:
    """True while the notification's target still waits in that syscall.

    Call it after reading the target's memory (/proc/<pid>/mem) and before
    acting on what was read: the pid may have been reused meanwhile.
    """
    buffer = bytearray(struct.pack("=Q", notification_id))
    try:
        fcntl.ioctl(listener_fd, IOCTL_NOTIF_ID_VALID, buffer, False)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


_names: dict[int, str] = {}


def syscall_name(nr: int, arch: int = AUDIT_ARCH_X86_64, known: dict | None = None) -> str:
    """libseccomp's name for syscall `nr` (x86_64), or "syscall_<nr>".
    `known`: a {number: name} table made earlier (the launch plan's)."""
    if known is not None and arch == AUDIT_ARCH_X86_64:
        return known.get(nr, f"syscall_{nr}")
    if nr in _names:
        return _names[nr]
    name = f"syscall_{nr}"
    if arch == AUDIT_ARCH_X86_64:
        from agent.enforce.libc import NR

        # The numbers skillguard itself uses (execve, execveat, ...) need no
        # libseccomp: its import costs ~10 ms on the launch path.
        known = next((n for n, number in NR.items() if number == nr), None)
        if known is not None:
            _names[nr] = known
            return known
        import pyseccomp  # lazy: only once a denial of another syscall happens

        try:
            resolved = pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, nr)
            if resolved:
                name = resolved.decode() if isinstance(resolved, bytes) else str(resolved)
        except (ValueError, OSError):
            pass
    _names[nr] = name
    return name
