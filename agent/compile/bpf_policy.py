"""Policy -> the entries skillguard's BPF maps hold for one registered skill.

Pure: no kernel calls; the same policy gives the same entries. The layout of
the maps is in bpf/skillguard.h; agent/enforce/bpf_maps.py packs these
entries into their keys and values.

Networks: the kernel does one longest-prefix match per connect(), so each
granted prefix carries the ports of every granted prefix that covers it
(10.0.0.0/8 port 443 and 10.1.0.0/16 port 80 give 10.1.0.0/16 both ports).
Manifest ports are single ports or any port, never ranges.

Files: the kernel kills (fs.on_violation: kill) only for absolute paths
outside every allowed prefix; `fs_prefixes` are those prefixes as trie
strings ("dir/" for what lies below a directory, "dir" + NUL for the
directory itself). Globs are cut at their first wildcard, so the kernel's
prefix is never narrower than the grant. The exact check (rights, globs,
relative paths) is `FsRules.allows`, run by user space on every event.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

from agent.compile.landlock import (FILE_RIGHTS, READ_ONLY, READ_WRITE, LandlockArtifact,
                                    compile_landlock)
from agent.compile.network import ANY_PORT, compile_network
from agent.manifest.glob import match_path
from agent.manifest.model import IPNetwork, Policy

# Must match bpf/skillguard.h.
SKILL_ENFORCE = 1
SKILL_DNS = 2
SKILL_FS_OBSERVE = 4
SKILL_FS_KILL = 8
KEY_PATH_LEN = 248

O_ACCMODE = 0o3
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_TRUNC = 0o1000
O_DIRECTORY = 0o200000
O_PATH = 0o10000000


@dataclass(frozen=True)
class NetEntry:
    network: IPNetwork
    net_id: int  # unique within the skill; with the cgroup id, the key of the port set
    any_port: bool
    ports: tuple[int, ...]  # empty when any_port


@dataclass(frozen=True)
class FsRule:
    pattern: str  # an absolute path, or a manifest glob
    rights: tuple[str, ...]  # Landlock right names
    is_dir: bool
    origin: str


@dataclass(frozen=True)
class FsRules:
    rules: tuple[FsRule, ...]

    def allows(self, path: str, needs: Iterable[str]) -> Optional[FsRule]:
        """The rule granting every right in `needs` on the absolute, normalised
        `path`, or None."""
        needs = set(needs)
        for rule in self.rules:
            if not needs <= set(rule.rights):
                continue
            if "*" in rule.pattern:
                if match_path(rule.pattern, path) or match_path(rule.pattern + "/**", path):
                    return rule
            elif path == rule.pattern or (rule.is_dir and _below(path, rule.pattern)):
                return rule
        return None


@dataclass(frozen=True)
class BpfPolicy:
    flags: int
    net4: tuple[NetEntry, ...]
    net6: tuple[NetEntry, ...]
    fs_prefixes: tuple[bytes, ...]  # trie strings, at most KEY_PATH_LEN bytes each
    fs_rules: FsRules
    names: tuple[str, ...]  # DNS name patterns: admitted only through a resolver
    notes: tuple[str, ...]


_NO_FS = LandlockArtifact(abi=0, handled_fs=(), path_rules=(), handled_net=(), connect_ports=(),
                          scopes=(), notes=())


def _below(path: str, root: str) -> bool:
    return root == "/" or path.startswith(root.rstrip("/") + "/")


def _net_entries(dests: list[tuple[IPNetwork, tuple[int, int]]]) -> tuple[NetEntry, ...]:
    networks = sorted({net for net, _ in dests},
                      key=lambda n: (int(n.network_address), n.prefixlen))
    out = []
    for net_id, net in enumerate(networks, start=1):
        covering = [ports for other, ports in dests
                    if other.prefixlen <= net.prefixlen and net.subnet_of(other)]
        any_port = any(p == ANY_PORT for p in covering)
        ports = () if any_port else tuple(sorted({p[0] for p in covering}))
        out.append(NetEntry(net, net_id, any_port, ports))
    return tuple(out)


def needed_rights(flags: int, is_exec: bool, is_dir: bool) -> tuple[str, ...]:
    """Landlock rights an open(2) with `flags` (or an execve) needs."""
    if is_exec:
        return ("execute",)
    if flags & O_PATH:
        return ()  # O_PATH opens neither read nor write (open(2)); Landlock does not check them
    access = flags & O_ACCMODE
    needs = []
    if access in (0, O_RDWR):
        needs.append("read_dir" if is_dir or flags & O_DIRECTORY else "read_file")
    if access in (O_WRONLY, O_RDWR) or flags & (O_CREAT | O_TRUNC):
        needs.append("write_file")
    return tuple(needs)


def trie_strings(path: str) -> tuple[bytes, ...]:
    """The fs_prefixes entries for an allowed path (see the module doc)."""
    raw = os.path.normpath(path).encode()
    if raw == b"/":
        return (b"/",)
    cut = KEY_PATH_LEN - 1
    if len(raw) >= cut:
        # Too long for the kernel's key: a shorter prefix only allows more,
        # so the kernel never kills for something the grant allows.
        return (raw[:cut],)
    return (raw + b"/", raw + b"\0")


def literal_prefix(pattern: str) -> str:
    """`/data/*/src` -> `/data`: the part before the first wildcard segment."""
    parts = []
    for seg in pattern.split("/")[1:]:
        if "*" in seg:
            break
        parts.append(seg)
    return "/" + "/".join(parts)


def compile_bpf_policy(policy: Policy, *, observe_fs: bool = True,
                       landlock: Optional[LandlockArtifact] = None) -> BpfPolicy:
    notes: list[str] = []
    flags = SKILL_ENFORCE if policy.mode == "enforce" else 0
    plan = compile_network(policy)
    if plan.needs_dns:
        flags |= SKILL_DNS
    net = {4: [], 6: []}
    for d in plan.destinations:
        net[d.network.version].append((d.network, d.ports))

    if landlock is None:
        landlock = compile_landlock(policy) if observe_fs else _NO_FS
    # A rule with a directory-only right is a directory rule (the Landlock
    # compiler masks those off for files).
    rules = [FsRule(r.path, r.access, any(a not in FILE_RIGHTS for a in r.access), r.origin)
             for r in landlock.path_rules]
    prefixes: list[str] = [r.path for r in landlock.path_rules]
    for grant in policy.fs.grants:
        if grant.is_glob:
            # The Landlock compiler expanded the glob against today's tree;
            # keep the glob itself so paths created later still match.
            rights = READ_WRITE if grant.access == "rw" else READ_ONLY
            rules.append(FsRule(grant.pattern, rights, True, f"manifest:{grant.pattern}:{grant.access}"))
            prefixes.append(literal_prefix(grant.pattern))
    trie: dict[bytes, None] = {}
    for prefix in prefixes:
        for entry in trie_strings(prefix):
            trie[entry] = None
    if observe_fs:
        flags |= SKILL_FS_OBSERVE
        if policy.fs.on_violation == "kill":
            flags |= SKILL_FS_KILL
            if policy.mode != "enforce":
                notes.append("fs.on_violation: kill is not applied in audit mode; opens are reported")
    return BpfPolicy(
        flags=flags,
        net4=_net_entries(net[4]),
        net6=_net_entries(net[6]),
        fs_prefixes=tuple(sorted(trie)),
        fs_rules=FsRules(tuple(rules)),
        names=tuple(n.pattern for n in plan.names),
        notes=tuple(notes),
    )
