"""Hand a compiled LandlockArtifact to the kernel for the calling process.

The launcher calls apply() in the child between fork and exec, after
PR_SET_NO_NEW_PRIVS (landlock_restrict_self(2) needs it or CAP_SYS_ADMIN).
The domain then holds for the process and everything it executes or forks.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from agent.compile.landlock import (
    FS_BITS,
    NET_BITS,
    SCOPE_BITS,
    LandlockArtifact,
    downgrade,
)
from agent.enforce.libc import syscall

# include/uapi/linux/landlock.h
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2
# Audit flags of landlock_restrict_self(2), ABI 7. By default the kernel logs
# a domain's denials only until the process that created it calls execve(2)
# (security/landlock/audit.c checks cred->domain_exec); LOG_NEW_EXEC_ON keeps
# logging in the programs executed afterwards, which is the skill itself.
RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1 << 0
RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1
RESTRICT_SELF_LOG_SUBDOMAINS_OFF = 1 << 2
AUDIT_FLAGS_ABI = 7


class LandlockError(RuntimeError):
    """Landlock could not be applied as compiled; the process must not run."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


# Size of struct landlock_ruleset_attr that each ABI knows: the kernel
# rejects non-zero bytes past what it knows (E2BIG), so pass only what the
# ABI has (handled_access_net came with ABI 4, scoped with ABI 6).
def _ruleset_attr_size(abi: int) -> int:
    return 24 if abi >= 6 else 16 if abi >= 4 else 8


@dataclass(frozen=True)
class AppliedRule:
    path: str
    resolved: str  # what the kernel opened (symlinks followed)
    access: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class AppliedReport:
    abi: int
    handled_fs: tuple[str, ...]
    handled_net: tuple[str, ...]
    connect_ports: tuple[int, ...]
    scopes: tuple[str, ...]
    rules: tuple[AppliedRule, ...]
    restrict_flags: tuple[str, ...]
    dropped: tuple[str, ...]  # every downgrade to the running ABI
    notes: tuple[str, ...]  # the compiler's notes, carried through


class LandlockUnsupported(LandlockError):
    def __init__(self, err: int, reason: str):
        super().__init__(f"landlock: unsupported: {reason}")
        self.errno = err


def probe_abi() -> int:
    """The running Landlock ABI; raises LandlockUnsupported (with .errno) when absent."""
    try:
        return syscall("landlock_create_ruleset", ctypes.c_void_p(None), ctypes.c_size_t(0),
                       ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError as exc:
        # ENOSYS: kernel built without Landlock; EOPNOTSUPP: built in but
        # disabled at boot (lsm= without landlock).
        reasons = {errno.ENOSYS: "kernel has no Landlock (ENOSYS)",
                   errno.EOPNOTSUPP: "Landlock disabled at boot (EOPNOTSUPP; check lsm=)"}
        raise LandlockUnsupported(exc.errno, reasons.get(exc.errno, str(exc))) from None


def abi_version() -> int:
    """The running kernel's Landlock ABI, or 0 when Landlock is unavailable."""
    try:
        return probe_abi()
    except LandlockUnsupported:
        return 0


def _bits(names, table) -> int:
    value = 0
    for name in names:
        value |= table[name]
    return value


def _resolved(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def apply(artifact: LandlockArtifact, *, log_new_exec: bool = True) -> AppliedReport:
    """Restrict the calling process (and its future children) to `artifact`.

    Raises LandlockError naming the failing rule; on error no domain has been
    created, so the caller must not exec the skill.
    """
    abi = probe_abi()
    fitted, dropped = downgrade(artifact, abi)
    attr = _RulesetAttr(
        _bits(fitted.handled_fs, FS_BITS),
        _bits(fitted.handled_net, NET_BITS),
        _bits(fitted.scopes, SCOPE_BITS),
    )
    try:
        ruleset_fd = syscall("landlock_create_ruleset", ctypes.byref(attr),
                             ctypes.c_size_t(_ruleset_attr_size(abi)), ctypes.c_uint32(0))
    except OSError as exc:
        raise LandlockError(f"landlock: create_ruleset (ABI {abi}): {exc.strerror}") from None
    try:
        applied = tuple(_add_path_rule(ruleset_fd, rule) for rule in fitted.path_rules)
        if "connect_tcp" in fitted.handled_net:
            for port in fitted.connect_ports:
                _add_port_rule(ruleset_fd, port)
        flags, flag_names = 0, []
        if log_new_exec and abi >= AUDIT_FLAGS_ABI:
            flags |= RESTRICT_SELF_LOG_NEW_EXEC_ON
            flag_names.append("log_new_exec_on")
        try:
            syscall("landlock_restrict_self", ctypes.c_int(ruleset_fd), ctypes.c_uint32(flags))
        except OSError as exc:
            hint = " (set no_new_privs first)" if exc.errno == errno.EPERM else ""
            raise LandlockError(f"landlock: restrict_self: {exc.strerror}{hint}") from None
    finally:
        os.close(ruleset_fd)
    return AppliedReport(
        abi=abi,
        handled_fs=fitted.handled_fs,
        handled_net=fitted.handled_net,
        connect_ports=fitted.connect_ports if "connect_tcp" in fitted.handled_net else (),
        scopes=fitted.scopes,
        rules=applied,
        restrict_flags=tuple(flag_names),
        dropped=tuple(dropped),
        notes=fitted.notes,
    )


def _add_path_rule(ruleset_fd: int, rule) -> AppliedRule:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise LandlockError(
            f"landlock: rule {rule.path} ({rule.origin}): cannot open: {exc.strerror}") from None
    try:
        attr = _PathBeneathAttr(_bits(rule.access, FS_BITS), fd)
        try:
            syscall("landlock_add_rule", ctypes.c_int(ruleset_fd), ctypes.c_int(RULE_PATH_BENEATH),
                    ctypes.byref(attr), ctypes.c_uint32(0))
        except OSError as exc:
            # EINVAL here is a directory-only right on a file, or a right the
            # ruleset does not handle (landlock_add_rule(2)).
            raise LandlockError(
                f"landlock: rule {rule.path} ({rule.origin}) {list(rule.access)}: "
                f"add_rule: {errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}") from None
        return AppliedRule(rule.path, _resolved(fd), rule.access, rule.origin)
    finally:
        os.close(fd)


def _add_port_rule(ruleset_fd: int, port: int) -> None:
    attr = _NetPortAttr(NET_BITS["connect_tcp"], port)
    try:
        syscall("landlock_add_rule", ctypes.c_int(ruleset_fd), ctypes.c_int(RULE_NET_PORT),
                ctypes.byref(attr), ctypes.c_uint32(0))
    except OSError as exc:
        raise LandlockError(f"landlock: rule connect_tcp port {port}: add_rule: {exc.strerror}") from None
