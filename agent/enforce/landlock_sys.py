"""The Landlock system calls, on numbers: what the launched child runs.

`agent.enforce.landlock` fits a compiled artifact to the running ABI and
turns rights into bits (`fitted()`); this module only hands those bits to
the kernel, so the child imports nothing but libc.py (see bench/launch).
"""
import errno
import posix
import _struct as struct  # the C module `struct` re-exports: one import less

from agent.enforce.libc import syscall

# include/uapi/linux/landlock.h
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2
ACCESS_NET_CONNECT_TCP = 1 << 1
# Audit flags of landlock_restrict_self(2), ABI 7. By default the kernel logs
# a domain's denials only until the process that created it calls execve(2)
# (security/landlock/audit.c checks cred->domain_exec); LOG_NEW_EXEC_ON keeps
# logging in the programs executed afterwards, which is the skill itself.
RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1
AUDIT_FLAGS_ABI = 7


class LandlockError(RuntimeError):
    """Landlock could not be applied as compiled; the process must not run."""


class LandlockUnsupported(LandlockError):
    def __init__(self, err: int, reason: str):
        super().__init__(f"landlock: unsupported: {reason}")
        self.errno = err


# struct landlock_ruleset_attr: handled_access_fs, handled_access_net, scoped (u64 each)
_RULESET_ATTR = struct.Struct("=3Q")
# struct landlock_path_beneath_attr: allowed_access (u64), parent_fd (s32);
# __attribute__((packed)) in the uapi header: 12 bytes
_PATH_BENEATH_ATTR = struct.Struct("=Qi")
# struct landlock_net_port_attr: allowed_access, port (u64 each)
_NET_PORT_ATTR = struct.Struct("=QQ")


# Size of struct landlock_ruleset_attr that each ABI knows: the kernel
# rejects non-zero bytes past what it knows (E2BIG), so pass only what the
# ABI has (handled_access_net came with ABI 4, scoped with ABI 6).
def _ruleset_attr_size(abi: int) -> int:
    return 24 if abi >= 6 else 16 if abi >= 4 else 8


def probe_abi() -> int:
    """The running Landlock ABI; raises LandlockUnsupported (with .errno) when absent."""
    try:
        return syscall("landlock_create_ruleset", None, 0, CREATE_RULESET_VERSION)
    except OSError as exc:
        # ENOSYS: kernel built without Landlock; EOPNOTSUPP: built in but
        # disabled at boot (lsm= without landlock).
        reasons = {errno.ENOSYS: "kernel has no Landlock (ENOSYS)",
                   errno.EOPNOTSUPP: "Landlock disabled at boot (EOPNOTSUPP; check lsm=)"}
        raise LandlockUnsupported(exc.errno, reasons.get(exc.errno, str(exc))) from None


def restrict(fitted: dict, *, log_new_exec: bool = True, resolve: bool = True) -> tuple[list, list]:
    """Restrict the calling process (and its future children) to `fitted`
    (`agent.enforce.landlock.fitted()`): {"abi", "fs", "net", "scoped",
    "rules": [(path, bits, origin)], "ports": [port], "names": {bits: [names]}}.

    Returns ([(path, resolved, bits, origin)], [restrict flag names]); with
    `resolve` false (the launched child, which reports nothing) resolved is
    None and no readlink is made. Raises
    LandlockError naming the failing rule; then no domain was created.
    """
    abi = fitted["abi"]
    attr = _RULESET_ATTR.pack(fitted["fs"], fitted["net"], fitted["scoped"])
    try:
        ruleset_fd = syscall("landlock_create_ruleset", attr, _ruleset_attr_size(abi), 0)
    except OSError as exc:
        raise LandlockError(f"landlock: create_ruleset (ABI {abi}): {exc.strerror}") from None
    try:
        applied = [_add_path_rule(ruleset_fd, path, bits, origin, fitted, resolve)
                   for path, bits, origin in fitted["rules"]]
        if fitted["net"] & ACCESS_NET_CONNECT_TCP:
            for port in fitted["ports"]:
                _add_port_rule(ruleset_fd, port)
        flags, flag_names = 0, []
        if log_new_exec and abi >= AUDIT_FLAGS_ABI:
            flags |= RESTRICT_SELF_LOG_NEW_EXEC_ON
            flag_names.append("log_new_exec_on")
        try:
            syscall("landlock_restrict_self", ruleset_fd, flags)
        except OSError as exc:
            hint = " (set no_new_privs first)" if exc.errno == errno.EPERM else ""
            raise LandlockError(f"landlock: restrict_self: {exc.strerror}{hint}") from None
    finally:
        posix.close(ruleset_fd)
    return applied, flag_names


def _add_path_rule(ruleset_fd: int, path: str, bits: int, origin: str, fitted: dict,
                   resolve: bool) -> tuple:
    try:
        fd = posix.open(path, posix.O_PATH | posix.O_CLOEXEC)
    except OSError as exc:
        raise LandlockError(f"landlock: rule {path} ({origin}): cannot open: {exc.strerror}") from None
    try:
        try:
            syscall("landlock_add_rule", ruleset_fd, RULE_PATH_BENEATH,
                    _PATH_BENEATH_ATTR.pack(bits, fd), 0)
        except OSError as exc:
            # EINVAL here is a directory-only right on a file, or a right the
            # ruleset does not handle (landlock_add_rule(2)).
            names = fitted.get("names", {}).get(bits, hex(bits))
            raise LandlockError(
                f"landlock: rule {path} ({origin}) {names}: "
                f"add_rule: {errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}") from None
        resolved = None
        if resolve:
            try:
                resolved = posix.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                resolved = "?"
        return path, resolved, bits, origin
    finally:
        posix.close(fd)


def _add_port_rule(ruleset_fd: int, port: int) -> None:
    try:
        syscall("landlock_add_rule", ruleset_fd, RULE_NET_PORT,
                _NET_PORT_ATTR.pack(ACCESS_NET_CONNECT_TCP, port), 0)
    except OSError as exc:
        raise LandlockError(f"landlock: rule connect_tcp port {port}: add_rule: {exc.strerror}") from None
