"""Hand a compiled seccomp program to the kernel for the calling thread.

Irreversible: call it in the child between fork and exec (or in a test's
forked child), never in the daemon.
"""
import errno
import _struct as struct  # the C module `struct` re-exports: one import less

from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, addressof, buffer, prctl, syscall

# linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_INSN_SIZE = 8
_MAX_INSNS = 4096  # BPF_MAXINSNS


# linux/filter.h: struct sock_fprog { unsigned short len; struct sock_filter *filter; }
_SOCK_FPROG = struct.Struct("@HP")


def install_filter(bpf: bytes, *, listener: bool = False) -> int | None:
    """Set no_new_privs and install `bpf` (struct sock_filter[]) on this thread.

    Returns the user-notification listener fd when `listener` is true
    (SECCOMP_FILTER_FLAG_NEW_LISTENER), else None. Raises OSError naming the
    seccomp layer and the kernel's reason.
    """
    count, rest = divmod(len(bpf), _INSN_SIZE)
    if rest or not 0 < count <= _MAX_INSNS:
        raise ValueError(f"seccomp: program of {len(bpf)} bytes is not 1..{_MAX_INSNS} "
                         "8-byte instructions")
    # seccomp(2): without CAP_SYS_ADMIN in the user namespace the kernel
    # demands no_new_privs (EACCES); set it always so a filter can never be
    # shed through a set-uid exec.
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    program = buffer(bytes(bpf))  # kept alive until the call returns
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    try:
        result = syscall("seccomp", SECCOMP_SET_MODE_FILTER, flags,
                         _SOCK_FPROG.pack(count, addressof(program)))
    except OSError as exc:
        why = {
            errno.EINVAL: "the kernel rejected the program or a flag",
            errno.EACCES: "no_new_privs is not set and the caller lacks CAP_SYS_ADMIN",
            errno.EBUSY: "another filter in this process already has a listener",
            errno.ENOMEM: "filter too large for the kernel's limit",
            errno.EFAULT: "bad program address",
        }.get(exc.errno, exc.strerror)
        raise OSError(exc.errno, f"seccomp: cannot install filter: {why}") from None
    return result if listener else None
