"""Hand a compiled LandlockArtifact to the kernel for the calling process.

The launcher calls apply() in the child between fork and exec, after
PR_SET_NO_NEW_PRIVS (landlock_restrict_self(2) needs it or CAP_SYS_ADMIN).
The domain then holds for the process and everything it executes or forks.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.compile.landlock import (
    FS_BITS,
    NET_BITS,
    SCOPE_BITS,
    LandlockArtifact,
    downgrade,
)
from agent.enforce.landlock_sys import (  # noqa: F401  (re-exported)
    LandlockError,
    LandlockUnsupported,
    probe_abi,
    restrict,
)


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


def fitted(artifact: LandlockArtifact, abi: int) -> tuple[dict, list[str]]:
    """`artifact` fitted to a kernel offering `abi`, in the numbers that
    `landlock_sys.restrict` hands to the kernel; and every downgrade made."""
    fit, dropped = downgrade(artifact, abi)
    names: dict[int, list[str]] = {}
    rules = []
    for rule in fit.path_rules:
        bits = _bits(rule.access, FS_BITS)
        names[bits] = list(rule.access)
        rules.append((rule.path, bits, rule.origin))
    return {
        "abi": abi,
        "fs": _bits(fit.handled_fs, FS_BITS),
        "net": _bits(fit.handled_net, NET_BITS),
        "scoped": _bits(fit.scopes, SCOPE_BITS),
        "rules": rules,
        "ports": list(fit.connect_ports) if "connect_tcp" in fit.handled_net else [],
        "names": names,
    }, dropped


def apply(artifact: LandlockArtifact, *, log_new_exec: bool = True) -> AppliedReport:
    """Restrict the calling process (and its future children) to `artifact`.

    Raises LandlockError naming the failing rule; on error no domain has been
    created, so the caller must not exec the skill.
    """
    abi = probe_abi()
    fit, dropped = downgrade(artifact, abi)
    numbers, _ = fitted(artifact, abi)
    applied, flag_names = restrict(numbers, log_new_exec=log_new_exec)
    return AppliedReport(
        abi=abi,
        handled_fs=fit.handled_fs,
        handled_net=fit.handled_net,
        connect_ports=fit.connect_ports if "connect_tcp" in fit.handled_net else (),
        scopes=fit.scopes,
        rules=tuple(AppliedRule(path, resolved, rule.access, origin)
                    for (path, resolved, _bits_, origin), rule in zip(applied, fit.path_rules)),
        restrict_flags=tuple(flag_names),
        dropped=tuple(dropped),
        notes=fit.notes,
    )
