"""nftables `socket cgroupv2` rules in the host namespace: the second network
layer for registered skills, beside the BPF connect/sendmsg hooks.

One table (`inet skillguard_cg`) shared by every registered skill. Its output
chain sends packets whose socket belongs to a registered skill cgroup (at
the fixed depth of skill cgroups below the v2 root) to a `confined` chain,
which accepts established flows, the skill's own `cgroup . address . port`
elements and DNS to the resolvers (for skills that name hosts), and rejects
the rest with ICMP admin-prohibited (connect() fails at once with
EHOSTUNREACH). Audit-mode skills are accepted after the checks, counted.

Shared sets keyed by the cgroup, not a chain and sets per skill, and exact
grants (one address, one port) in hash sets apart from the prefix and
any-port grants, which need interval sets: libnftables fetches the table's
sets before every transaction, and the elements of every interval set it
adds to or deletes from (nftables 1.0.6 src/cache.c, for interval merging),
so per-skill chains or one interval set for every grant made an attach cost
grow with the number of skills (per-skill chains ≈12 ms per attach at 1,000
skills, one interval set ≈0.55 ms; measured on the development VM).
A skill's elements (membership, grants, dns, audit) are written with one
netlink batch (agent/attach/nft_netlink.py, ≈0.03 ms whatever the number of
skills, against ≈0.3 ms for a libnftables transaction that refetches the
table first); libnftables creates and deletes the table and rebuilds it
after a restart. The table exists only while a skill is registered.

Text commands, not JSON: nftables 1.0.6 (Debian 12) cannot express `socket
cgroupv2` in its JSON parser ("Invalid socket key value") and drops `level`
from its JSON output. nft resolves a cgroup path relative to /sys/fs/cgroup
when the element is added (nftables src/datatype.c, cgroupv2_type_parse), so
the cgroup must exist then and the v2 mount must lie under /sys/fs/cgroup.
Listing elements does the reverse for each one (a walk of /sys/fs/cgroup per
element: seconds for 1,000 skills), so this module never lists elements:
listings are terse.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Iterable

from agent.attach.nft_netlink import (NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, BatchTemplate, NetlinkError,
                                      SetElements, cgroup_key, grant_key, range_key)
from agent.compile.bpf_policy import SKILL_DNS, SKILL_ENFORCE, NetEntry
from agent.compile.network import ANY_PORT

NFT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_TABLE = "skillguard_cg"
# A set only this layout has: a table without it was made by an older agent.
LAYOUT_MARK = "allow4x"


class NftError(RuntimeError):
    pass


def nft_path(v2_dir) -> str:
    """The path nft wants for a cgroup v2 directory; NftError if nft cannot name it."""
    text = str(v2_dir)
    root = str(NFT_CGROUP_ROOT) + "/"
    if not text.startswith(root) or ".." in text.split("/"):
        raise NftError(f"{v2_dir} is not under {NFT_CGROUP_ROOT}, where nft resolves cgroup paths")
    return text[len(root):]


def _is_exact(entry: NetEntry) -> bool:
    net = entry.network
    return not entry.any_port and net.prefixlen == net.max_prefixlen


def _elements(path: str, entries: Iterable[NetEntry]) -> list[str]:
    """`"path" . address . port` elements of exact grants."""
    return [f'"{path}" . {entry.network.network_address} . {port}' for entry in entries for port in entry.ports]


def _range_element(path: str, grant: tuple, *, explicit: bool = False) -> str:
    """`"path" . prefix . ports` for an interval set. Explicit: every part a
    range; nftables 1.0.6 finds an element of a concatenated interval set to
    delete only in that form ("No such file or directory" otherwise)."""
    net, first, last = grant
    if explicit:
        return f'"{path}" . {net.network_address}-{net.broadcast_address} . {first}-{last}'
    ports = str(first) if first == last else f"{first}-{last}"
    return f'"{path}" . {net} . {ports}'


def table_commands(table: str, level: int, resolvers: Iterable[str]) -> str:
    """The whole table, empty of skills (pure)."""
    t = f"inet {table}"
    sock = f"socket cgroupv2 level {level}"
    v4 = [r for r in resolvers if ipaddress.ip_address(r).version == 4]
    v6 = [r for r in resolvers if ipaddress.ip_address(r).version == 6]
    lines = [
        f"add table {t}",
        f"add set {t} members {{ type cgroupsv2; }}",
        f"add set {t} audit {{ type cgroupsv2; }}",
        f"add set {t} dns {{ type cgroupsv2; }}",
        f"add set {t} allow4x {{ type cgroupsv2 . ipv4_addr . inet_service; }}",
        f"add set {t} allow6x {{ type cgroupsv2 . ipv6_addr . inet_service; }}",
        f"add set {t} allow4 {{ type cgroupsv2 . ipv4_addr . inet_service; flags interval; }}",
        f"add set {t} allow6 {{ type cgroupsv2 . ipv6_addr . inet_service; flags interval; }}",
        f"add counter {t} rejected",
        f"add counter {t} audited",
        f"add chain {t} confined",
        f"add chain {t} output {{ type filter hook output priority 0; policy accept; }}",
        f"add rule {t} output {sock} @members goto confined",
        f"add rule {t} confined ct state established,related accept",
        f"add rule {t} confined meta l4proto tcp {sock} . ip daddr . tcp dport @allow4x accept",
        f"add rule {t} confined meta l4proto tcp {sock} . ip6 daddr . tcp dport @allow6x accept",
        f"add rule {t} confined meta l4proto tcp {sock} . ip daddr . tcp dport @allow4 accept",
        f"add rule {t} confined meta l4proto tcp {sock} . ip6 daddr . tcp dport @allow6 accept",
    ]
    for proto, addrs in (("ip", v4), ("ip6", v6)):
        if addrs:
            for l4 in ("udp", "tcp"):
                lines.append(f"add rule {t} confined {sock} @dns {proto} daddr {{ {', '.join(addrs)} }} "
                             f"{l4} dport 53 accept")
    lines.append(f"add rule {t} confined {sock} @audit counter name audited accept")
    lines.append(f"add rule {t} confined counter name rejected reject with icmpx admin-prohibited")
    return "\n".join(lines)


def ranged_grants(entries: Iterable[NetEntry]) -> list[tuple]:
    """(network, first port, last port) of the grants that need an interval
    set, leaving out those another one covers (pure). The BPF compiler gives
    a narrower prefix the ports of every wider one, and the kernel's
    concatenated interval sets refuse an element whose first or last key
    lies in another element (ENOTEMPTY, net/netfilter/nft_set_pipapo.c
    nft_pipapo_insert). With prefixes nested or disjoint and ports one or
    all, only a covered element or one whose range starts or ends on a
    single-port grant of a wider prefix (port 1 or 65535) does; the first
    are left out here, the second is refused by the kernel and the attach
    fails with that error (fail closed)."""
    ranges = []
    for e in entries:
        if _is_exact(e):
            continue
        if e.any_port:
            ranges.append((e.network, ANY_PORT[0], ANY_PORT[1]))
        else:
            ranges.extend((e.network, port, port) for port in e.ports)

    def covered(r, by):
        return r != by and r[0].subnet_of(by[0]) and by[1] <= r[1] and r[2] <= by[2]

    kept = []
    for r in ranges:
        if not any(covered(r, other) for other in ranges) and r not in kept:
            kept.append(r)
    return kept


def hash_changes(cgroup_id: int, flags: int, net4: Iterable[NetEntry], net6: Iterable[NetEntry], *,
                 delete: bool = False) -> list[tuple[int, str, list]]:
    """One skill's elements of every set as netlink changes (pure). Membership
    goes last on add and first on delete, like skill_commands."""
    op = NFT_MSG_DELSETELEM if delete else NFT_MSG_NEWSETELEM
    me = [cgroup_key(cgroup_id)]
    grants = []
    for name, entries in (("allow4", list(net4)), ("allow6", list(net6))):
        keys = [grant_key(cgroup_id, e.network.network_address, port)
                for e in entries if _is_exact(e) for port in e.ports]
        grants.append((op, name + "x", keys))
        grants.append((op, name, [range_key(cgroup_id, *r) for r in ranged_grants(entries)]))
    grants.append((op, "dns", me if flags & SKILL_DNS else []))
    grants.append((op, "audit", me if not flags & SKILL_ENFORCE else []))
    member = (op, "members", me)
    return [member] + grants if delete else grants + [member]


def skill_commands(table: str, path: str, flags: int, net4: Iterable[NetEntry],
                   net6: Iterable[NetEntry], *, delete: bool = False) -> str:
    """Add (or delete) one skill's elements (pure). Membership goes last on
    add and first on delete, so the chain never sees a member without its grants."""
    t = f"inet {table}"
    verb = "delete" if delete else "add"
    grants = []
    for name, entries in (("allow4", net4), ("allow6", net6)):
        entries = list(entries)
        elems = _elements(path, [e for e in entries if _is_exact(e)])
        if elems:
            grants.append(f"{verb} element {t} {name}x {{ {', '.join(elems)} }}")
        elems = [_range_element(path, r, explicit=delete) for r in ranged_grants(entries)]
        if elems:
            grants.append(f"{verb} element {t} {name} {{ {', '.join(elems)} }}")
    if flags & SKILL_DNS:
        grants.append(f'{verb} element {t} dns {{ "{path}" }}')
    if not flags & SKILL_ENFORCE:
        grants.append(f'{verb} element {t} audit {{ "{path}" }}')
    member = f'{verb} element {t} members {{ "{path}" }}'
    return "\n".join([member] + grants if delete else grants + [member])


class NftCgroupTable:
    """The host table; every change is one libnftables transaction."""

    def __init__(self, table: str = DEFAULT_TABLE):
        import nftables  # python3-nftables; imported where used

        self.table = table
        self._nft = nftables.Nftables()
        self._terse = nftables.Nftables()
        self._terse.set_terse_output(True)  # never list elements (see the module doc)
        self._made = False
        self._elements = SetElements(table)
        self._templates: dict = {}  # (flags, id(net4), id(net6), delete) -> (net4, net6, BatchTemplate)

    def _run(self, commands: str, what: str) -> str:
        rc, out, err = self._nft.cmd(commands)
        if rc != 0:
            raise NftError(f"nftables: {what}: {err.strip() or 'failed'}")
        return out

    def exists(self) -> bool:
        rc, out, _ = self._terse.cmd("list tables inet")
        return rc == 0 and f"table inet {self.table}\n" in out

    def layout_current(self) -> bool:
        """True when the table exists and has this module's layout."""
        rc, out, _ = self._terse.cmd(f"list table inet {self.table}")
        return rc == 0 and f"set {LAYOUT_MARK} {{" in out

    def _ensure(self, level: int, resolvers: Iterable[str]) -> None:
        if self._made:
            return
        if not self.exists():
            self._run(table_commands(self.table, level, resolvers), f"creating table {self.table}")
        elif not self.layout_current():
            raise NftError(f"table inet {self.table} has the layout of another skillguard version; "
                           "restart the agent so that it rebuilds it")
        self._made = True

    def rebuild(self, level: int, resolvers: Iterable[str], skills: Iterable[tuple]) -> None:
        """Replace the table in one transaction with one holding `skills`
        ((v2 dir, flags, net4, net6) each): packets see the old table or the
        new one, never none (a restarted agent over a table of another layout)."""
        commands = [f"delete table inet {self.table}"] if self.exists() else []
        commands.append(table_commands(self.table, level, resolvers))
        for v2_dir, flags, net4, net6 in skills:
            commands.append(skill_commands(self.table, nft_path(v2_dir), flags, net4, net6))
        self._run("\n".join(commands), f"rebuilding table {self.table}")
        self._made = True

    def _template(self, flags: int, net4, net6, delete: bool):
        """The batch of hash_changes() for these grants with the cgroup id left
        open, kept per grants object (the same for every skill of a policy)."""
        key = (flags, id(net4), id(net6), delete)
        entry = self._templates.get(key)
        if entry is None or entry[0] is not net4 or entry[1] is not net6:
            def changes(cgroup_id):
                return [c for c in hash_changes(cgroup_id, flags, net4, net6, delete=delete) if c[2]]

            entry = (net4, net6, BatchTemplate(changes, self.table))
            if len(self._templates) > 1024:
                self._templates.clear()
            self._templates[key] = entry
        return entry[2]

    def _apply_for(self, cgroup_id: int, flags: int, net4, net6, delete: bool, what: str) -> None:
        try:
            self._elements.apply_template(self._template(flags, net4, net6, delete), cgroup_id)
        except NetlinkError as exc:
            raise NftError(f"nftables: {what}: {exc.strerror or exc}") from None

    def add(self, v2_dir, cgroup_id: int, level: int, flags: int, net4, net6,
            resolvers: Iterable[str]) -> None:
        """The skill's elements in one transaction, all or none; its membership last."""
        nft_path(v2_dir)  # where nft will name it (rebuild, listings): refuse what it cannot
        self._ensure(level, resolvers)
        self._apply_for(cgroup_id, flags, net4, net6, False, f"adding {v2_dir}")

    def add_many(self, items: list[tuple], level: int, resolvers: Iterable[str]) -> list:
        """add() of several skills ((v2 dir, cgroup id, flags, net4, net6) each)
        in one transaction; per skill None or the NftError that refused it. When
        the kernel refuses the transaction (nothing of it applied), each
        skill's elements are written alone, so only the one at fault fails."""
        errors: list = [None] * len(items)
        ready = []
        for index, (v2_dir, cgroup_id, flags, net4, net6) in enumerate(items):
            try:
                nft_path(v2_dir)
            except NftError as exc:
                errors[index] = exc
                continue
            ready.append(index)
        if not ready:
            return errors
        try:
            self._ensure(level, resolvers)
        except NftError as exc:
            return [exc] * len(items)
        if len(ready) > 1:
            pairs = [(self._template(items[i][2], items[i][3], items[i][4], False), items[i][1]) for i in ready]
            try:
                self._elements.apply_templates(pairs)
                return errors
            except NetlinkError:
                pass  # one of them is at fault: find which, alone
        for index in ready:
            v2_dir, cgroup_id, flags, net4, net6 = items[index]
            try:
                self._apply_for(cgroup_id, flags, net4, net6, False, f"adding {v2_dir}")
            except NftError as exc:
                errors[index] = exc
        return errors

    def remove(self, v2_dir, cgroup_id: int, flags: int, net4, net6) -> None:
        """The skill's elements in one transaction; its membership first."""
        self._apply_for(cgroup_id, flags, net4, net6, True, f"removing {v2_dir}")

    def counter(self, name: str) -> int:
        rc, out, _ = self._nft.cmd(f"list counter inet {self.table} {name}")
        if rc != 0:
            return 0
        words = out.split()
        return int(words[words.index("packets") + 1]) if "packets" in words else 0

    def drop_table(self) -> None:
        if self.exists():
            self._run(f"delete table inet {self.table}", f"deleting table {self.table}")
        self._made = False

    def close(self) -> None:
        self._elements.close()
