"""Policy -> seccomp classic-BPF program (pure).

libseccomp builds the filter in memory and exports it; nothing here loads a
filter or changes process state. The result is deterministic: rules are
added in sorted order and libseccomp's binary-tree layout depends only on
them.

Layout of the program (see policies/base-syscalls.yaml for the lists):
  * arch != AUDIT_ARCH_X86_64, or an x32 number (bit 0x40000000): KILL_PROCESS
    (libseccomp emits the x32 check for an x86_64-only filter).
  * base `allow` + manifest `syscalls.allow` - manifest `syscalls.deny`:
    ALLOW with no argument checks, so the kernel's constant-action cache
    (kernel/seccomp.c: seccomp_cache_prepare) skips the filter for them.
  * `conditional` syscalls: ALLOW only when argument checks pass (below).
  * clone3: ERRNO(ENOSYS), glibc then falls back to clone.
  * `notify=` names (launch: execve, execveat): USER_NOTIF in every mode,
    so the supervisor decides each one (exec supervision).
  * always_deny: ERRNO(EPERM) in every mode; in "notify" and "log" mode they
    get explicit rules so neither a supervisor nor audit mode can let them
    through.
  * everything else: the deny action (errno: EPERM, notify: USER_NOTIF,
    log: LOG).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from agent.manifest.model import Policy

DENY_ACTIONS = ("errno", "notify", "log")

EPERM = 1
ENOSYS = 38

# linux/socket.h, linux/netlink.h
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0

# linux/sched.h. CLONE_NEWTIME (0x80) lies inside CSIGNAL for clone(2), where
# the kernel reads it as part of the exit signal (kernel/fork.c, sys_clone);
# masking it only refuses exit signals >= 128, which are invalid anyway.
CLONE_NAMESPACE_FLAGS = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)


PER_LINUX = 0
PERSONALITY_QUERY = 0xFFFFFFFF

LOW32 = 0xFFFFFFFF

# libseccomp 2.5.4 seccomp.h: SCMP_FLTATR_CTL_OPTIMIZE = 8 (pyseccomp.Attr
# matches); level 2 = binary tree sorted by syscall number.
OPTIMIZE_BINARY_TREE = 2

_REPO_PROFILE = Path(__file__).resolve().parents[2] / "policies" / "base-syscalls.yaml"
PROFILE_ENV = "SKILLGUARD_BASE_PROFILE"


class ProfileError(ValueError):
    """The base syscall profile is malformed."""


@dataclass(frozen=True)
class BaseProfile:
    allow: tuple[str, ...]
    conditional: tuple[str, ...]
    enosys: tuple[str, ...]
    always_deny: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class SeccompArtifact:
    bpf: bytes  # struct sock_filter[] exactly as the kernel takes it (8 bytes/insn)
    allowed: tuple[str, ...]  # allowed with no argument checks (cache-friendly)
    arg_checked: tuple[str, ...]  # allowed only when argument conditions hold
    denied: tuple[str, ...]  # explicitly denied: always_deny + manifest deny
    deny_action: str  # "errno" | "notify" | "log"
    pfc: str  # libseccomp's pseudo-filter-code export, human readable
    enosys: tuple[str, ...] = ()  # answered ENOSYS so libc falls back
    socket_families: tuple[str, ...] = ()  # families socket(2) may create
    notified: tuple[str, ...] = ()  # always sent to the supervisor (USER_NOTIF)


# ---------------------------------------------------------------- profile


def _names_in(section, where: str) -> list[str]:
    """A profile section is a list of names or a mapping group -> list/description."""
    if section is None:
        return []
    if isinstance(section, list):
        items = section
    elif isinstance(section, dict):
        items = []
        for key, value in section.items():
            if isinstance(value, list):
                items.extend(value)
            elif isinstance(value, str):  # `conditional`: name -> description
                items.append(key)
            else:
                raise ProfileError(f"{where}.{key}: expected a list of syscall names")
    else:
        raise ProfileError(f"{where}: expected a list or a mapping")
    for name in items:
        if not isinstance(name, str):
            raise ProfileError(f"{where}: {name!r} is not a syscall name")
    return items


def _profile_path(path) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(PROFILE_ENV)
    return Path(env) if env else _REPO_PROFILE


def load_base_profile(path=None) -> BaseProfile:
    """Parse and check policies/base-syscalls.yaml (cached per path)."""
    return _load_profile_cached(str(_profile_path(path).resolve()))


@functools.lru_cache(maxsize=8)
def _load_profile_cached(path: str) -> BaseProfile:
    import yaml

    where = f"seccomp base profile {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ProfileError(f"{where}: expected a mapping with `version: 1`")
    unknown_keys = set(doc) - {"version", "allow", "conditional", "enosys", "always_deny"}
    if unknown_keys:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown_keys)}")

    sections = {key: _names_in(doc.get(key), f"{where}: {key}")
                for key in ("allow", "conditional", "enosys", "always_deny")}
    seen: dict[str, str] = {}
    for key, names in sections.items():
        for name in names:
            if not known_syscall(name):
                raise ProfileError(f"{where}: {key}: {name!r} is not an x86_64 syscall "
                                   "known to libseccomp")
            if name in seen:
                raise ProfileError(f"{where}: {name!r} listed in both {seen[name]} and {key}")
            seen[name] = key
    if set(sections["conditional"]) != set(_CONDITIONAL_RULES):
        raise ProfileError(
            f"{where}: conditional lists {sorted(sections['conditional'])} but the compiler "
            f"checks arguments of exactly {sorted(_CONDITIONAL_RULES)}")
    return BaseProfile(
        allow=tuple(sorted(sections["allow"])),
        conditional=tuple(sorted(sections["conditional"])),
        enosys=tuple(sorted(sections["enosys"])),
        always_deny=tuple(sorted(sections["always_deny"])),
        source=path,
    )


def always_denied(profile: Optional[BaseProfile] = None) -> frozenset[str]:
    """Syscalls no manifest may allow."""
    return frozenset((profile or load_base_profile()).always_deny)


def not_allowable(profile: Optional[BaseProfile] = None) -> frozenset[str]:
    """Names a manifest's `syscalls.allow` must not hold: always_deny, plus the
    argument-checked and ENOSYS ones, whose checks would be lost."""
    p = profile or load_base_profile()
    return frozenset(p.always_deny) | frozenset(p.conditional) | frozenset(p.enosys)


@functools.lru_cache(maxsize=1024)
def syscall_number(name: str) -> int:
    """x86_64 number of `name`, or -1 when libseccomp does not know it."""
    import pyseccomp

    if not name or not name.replace("_", "").isalnum():
        return -1
    # pyseccomp leaves argtypes unset here; the arch token fits a c_uint32.
    import ctypes

    fn = pyseccomp._libseccomp.seccomp_syscall_resolve_name_arch
    fn.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
    fn.restype = ctypes.c_int
    return int(fn(pyseccomp.Arch.X86_64, name.encode()))


def known_syscall(name: str) -> bool:
    return syscall_number(name) >= 0


# ---------------------------------------------------------- argument rules


def _rules_clone(policy: Policy, arg) -> list[tuple]:
    return [(arg(0, "MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0),)]


def _socket_families(policy: Policy) -> list[tuple[str, int]]:
    families = [("AF_UNIX", AF_UNIX)]
    if policy.network_granted:
        families += [("AF_INET", AF_INET), ("AF_INET6", AF_INET6)]
    return families


def _rules_socket(policy: Policy, arg) -> list[tuple]:
    rules = [(arg(0, "EQ", family),) for _, family in _socket_families(policy)]
    rules.append((arg(0, "EQ", AF_NETLINK), arg(2, "EQ", NETLINK_ROUTE)))
    return rules


def _rules_socketpair(policy: Policy, arg) -> list[tuple]:
    return [(arg(0, "EQ", AF_UNIX),)]


def _rules_personality(policy: Policy, arg) -> list[tuple]:
    # sys_personality takes `unsigned int`: compare the low 32 bits only.
    return [(arg(0, "MASKED_EQ", LOW32, PER_LINUX),),
            (arg(0, "MASKED_EQ", LOW32, PERSONALITY_QUERY),)]


_CONDITIONAL_RULES: dict[str, Callable] = {
    "clone": _rules_clone,
    "personality": _rules_personality,
    "socket": _rules_socket,
    "socketpair": _rules_socketpair,
}


# ---------------------------------------------------------------- compiler


def _action_values(pyseccomp, deny_action: str) -> int:
    if deny_action == "errno":
        return pyseccomp.ERRNO(EPERM)
    if deny_action == "notify":
        return pyseccomp.NOTIFY
    if deny_action == "log":
        return pyseccomp.LOG
    raise ValueError(f"seccomp: deny_action must be one of {DENY_ACTIONS}, not {deny_action!r}")


def _check_overrides(policy: Policy, profile: BaseProfile) -> None:
    for key, names in (("allow", policy.syscalls.allow), ("deny", policy.syscalls.deny)):
        for name in names:
            if not known_syscall(name):
                raise ValueError(f"seccomp: syscalls.{key}: {name!r} is not an x86_64 "
                                 "syscall known to libseccomp")
    forbidden = not_allowable(profile)
    for name in policy.syscalls.allow:
        if name in profile.always_deny:
            raise ValueError(f"seccomp: syscalls.allow: {name!r} is always denied "
                             "and no manifest can allow it")
        if name in forbidden:
            raise ValueError(f"seccomp: syscalls.allow: {name!r} is argument-checked or "
                             "answered ENOSYS by the base profile; allowing it outright "
                             "would drop those checks")


def _export(flt, method: str) -> bytes:
    fd = os.memfd_create("skillguard-seccomp", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as fh:
        getattr(flt, method)(fh)
        fh.seek(0)
        return fh.read()


def compile_seccomp(policy: Policy, *, deny_action: str = "errno",
                    profile: Optional[BaseProfile] = None,
                    notify: tuple[str, ...] = ()) -> SeccompArtifact:
    """Compile `policy` against the base profile into a seccomp BPF program.

    `notify` names syscalls that always go to the supervisor (USER_NOTIF),
    whatever the profile and `syscalls.allow` say (exec supervision routes
    execve/execveat here); `syscalls.deny` and always_deny still win.
    """
    import pyseccomp

    profile = profile or load_base_profile()
    deny = _action_values(pyseccomp, deny_action)
    _check_overrides(policy, profile)
    if pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        # Rule numbers are resolved for x86_64; libseccomp would translate
        # them from the host's native table.
        raise RuntimeError("seccomp: the compiler runs on x86_64 hosts only")

    manifest_deny = set(policy.syscalls.deny)
    for name in notify:
        if not known_syscall(name):
            raise ValueError(f"seccomp: notify: {name!r} is not an x86_64 syscall")
    notified = sorted(set(notify) - manifest_deny - set(profile.always_deny))
    allowed = sorted((set(profile.allow) | set(policy.syscalls.allow)) - manifest_deny
                     - set(notified))
    arg_checked = sorted(set(profile.conditional) - manifest_deny)
    enosys = sorted(set(profile.enosys) - manifest_deny)
    denied = sorted(set(profile.always_deny) | manifest_deny)

    def arg(index: int, op: str, datum: int, datum_b: Optional[int] = None):
        if op == "MASKED_EQ":  # libseccomp: (arg & datum_a) == datum_b
            return pyseccomp.Arg(index, pyseccomp.MASKED_EQ, datum, datum_b)
        return pyseccomp.Arg(index, getattr(pyseccomp, op), datum)

    flt = pyseccomp.SyscallFilter(deny)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, OPTIMIZE_BINARY_TREE)
    flt.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # the launcher sets no_new_privs itself

    for name in allowed:
        flt.add_rule(pyseccomp.ALLOW, syscall_number(name))
    for name in arg_checked:
        for conditions in _CONDITIONAL_RULES[name](policy, arg):
            flt.add_rule_exactly(pyseccomp.ALLOW, syscall_number(name), *conditions)
    for name in enosys:
        flt.add_rule(pyseccomp.ERRNO(ENOSYS), syscall_number(name))
    if deny != pyseccomp.NOTIFY:  # else the default action already notifies (libseccomp
        for name in notified:      # refuses a rule equal to the default: EACCES)
            flt.add_rule(pyseccomp.NOTIFY, syscall_number(name))
    if deny != pyseccomp.ERRNO(EPERM):
        for name in profile.always_deny:
            flt.add_rule(pyseccomp.ERRNO(EPERM), syscall_number(name))

    families = tuple(n for n, _ in _socket_families(policy)) if "socket" in arg_checked else ()
    if families:
        families += ("AF_NETLINK(NETLINK_ROUTE)",)
    return SeccompArtifact(
        bpf=_export(flt, "export_bpf"),
        allowed=tuple(allowed),
        arg_checked=tuple(arg_checked),
        denied=tuple(denied),
        deny_action=deny_action,
        pfc=_export(flt, "export_pfc").decode(),
        enosys=tuple(enosys),
        socket_families=families,
        notified=tuple(notified),
    )


def summary(artifact: SeccompArtifact) -> dict:
    """Counts for `skillguard compile`."""
    from agent.compile.bpf import INSN_SIZE

    return {
        "instructions": len(artifact.bpf) // INSN_SIZE,
        "bytes": len(artifact.bpf),
        "allowed": len(artifact.allowed),
        "arg_checked": len(artifact.arg_checked),
        "enosys": len(artifact.enosys),
        "denied": len(artifact.denied),
        "deny_action": artifact.deny_action,
        "socket_families": list(artifact.socket_families),
    }
