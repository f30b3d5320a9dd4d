"""Pack a skill's BpfPolicy into the keys and values of the pinned maps.

Layouts mirror bpf/skillguard.h (little-endian x86_64; addresses in network
byte order). Writes go leaves first and the `skills` entry last, removal the
other way round, so the programs never see a skill whose policy is half
written: before the `skills` entry exists its cgroup is simply not a skill.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from agent.compile.bpf_policy import KEY_PATH_LEN, BpfPolicy
from agent.enforce.bpf_sys import RawMap

SKILL = struct.Struct("<IIQQQ")           # flags, reserved, net_denied, fs_events, fs_killed
NET_VALUE = struct.Struct("<II")          # net_id, any_port
PORT_KEY = struct.Struct("<QII")          # cgroup id, net_id, port
U32 = struct.Struct("<I")
EVENT = struct.Struct(f"<IIQIIIII16siI{KEY_PATH_LEN}s")

# name -> (key size, value size); must match bpf/skillguard.h and the .c files
MAP_SIZES = {
    "skills": (8, SKILL.size),
    "allow4": (16, NET_VALUE.size),
    "allow6": (28, NET_VALUE.size),
    "ports": (PORT_KEY.size, 4),
    "resolvers": (20, 4),
    "fs_prefixes": (12 + KEY_PATH_LEN, 4),
}

EV_NET, EV_OPEN, EV_EXEC = 1, 2, 3
DECISIONS = {0: "denied", 1: "audited", 2: "killed", 3: "observed"}


def skill_key(cgroup_id: int) -> bytes:
    return struct.pack("<Q", cgroup_id)


def lpm_key(cgroup_id: int, network) -> bytes:
    return struct.pack("<IQ", 64 + network.prefixlen, cgroup_id) + network.network_address.packed


def port_key(cgroup_id: int, net_id: int, port: int) -> bytes:
    return PORT_KEY.pack(cgroup_id, net_id, port)


def path_key(cgroup_id: int, entry: bytes) -> bytes:
    return struct.pack("<IQ", 64 + 8 * len(entry), cgroup_id) + entry.ljust(KEY_PATH_LEN, b"\0")


def resolver_key(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return struct.pack("<I", ip.version) + ip.packed.ljust(16, b"\0")


@dataclass
class SkillCounters:
    net_denied: int
    fs_events: int
    fs_killed: int


class PolicyMaps:
    """The per-skill maps, by fd."""

    def __init__(self, fds: dict[str, int]):
        self.maps = {name: RawMap(fds[name], *MAP_SIZES[name], name=name) for name in MAP_SIZES}

    def entries(self, cgroup_id: int, policy: BpfPolicy) -> list[tuple[str, bytes, bytes]]:
        """(map, key, value) for everything but the `skills` entry."""
        out = []
        for entry in policy.net4 + policy.net6:
            name = "allow4" if entry.network.version == 4 else "allow6"
            out.append((name, lpm_key(cgroup_id, entry.network),
                        NET_VALUE.pack(entry.net_id, int(entry.any_port))))
            for port in entry.ports:
                out.append(("ports", port_key(cgroup_id, entry.net_id, port), U32.pack(1)))
        if policy.flags & 4:  # SKILL_FS_OBSERVE
            for prefix in policy.fs_prefixes:
                out.append(("fs_prefixes", path_key(cgroup_id, prefix), U32.pack(1)))
        return out

    def install(self, cgroup_id: int, policy: BpfPolicy) -> None:
        for name, key, value in self.entries(cgroup_id, policy):
            self.maps[name].update(key, value)
        self.maps["skills"].update(skill_key(cgroup_id), SKILL.pack(policy.flags, 0, 0, 0, 0))

    def remove(self, cgroup_id: int, policy: BpfPolicy | None) -> None:
        """Delete the skill; with no policy (an agent restart lost it), scan every map."""
        self.maps["skills"].delete(skill_key(cgroup_id))
        if policy is not None:
            for name, key, _ in self.entries(cgroup_id, policy):
                self.maps[name].delete(key)
            return
        for name in ("allow4", "allow6", "ports", "fs_prefixes"):
            rmap = self.maps[name]
            offset = 0 if name == "ports" else 4  # cgroup id follows prefixlen in LPM keys
            for key in rmap.keys():
                if struct.unpack_from("<Q", key, offset)[0] == cgroup_id:
                    rmap.delete(key)

    def net_entries(self, cgroup_id: int):
        """(net4, net6) NetEntry tuples of a skill, read back from the maps."""
        from agent.compile.bpf_policy import NetEntry

        ports: dict[int, list[int]] = {}
        for key in self.maps["ports"].keys():
            cg, net_id, port = PORT_KEY.unpack(key)
            if cg == cgroup_id:
                ports.setdefault(net_id, []).append(port)
        out = {}
        for name, cls in (("allow4", ipaddress.IPv4Network), ("allow6", ipaddress.IPv6Network)):
            entries = []
            rmap = self.maps[name]
            for key in rmap.keys():
                prefixlen, cg = struct.unpack_from("<IQ", key)
                if cg != cgroup_id:
                    continue
                value = rmap.lookup(key)
                if value is None:
                    continue
                net_id, any_port = NET_VALUE.unpack(value)
                net = cls((key[12:], prefixlen - 64))
                entries.append(NetEntry(net, net_id, bool(any_port),
                                        () if any_port else tuple(sorted(ports.get(net_id, [])))))
            out[name] = tuple(entries)
        return out["allow4"], out["allow6"]

    def skills(self) -> dict[int, int]:
        """cgroup id -> flags of every skill in the map."""
        out = {}
        rmap = self.maps["skills"]
        for key in rmap.keys():
            value = rmap.lookup(key)
            if value is not None:
                out[struct.unpack("<Q", key)[0]] = SKILL.unpack(value)[0]
        return out

    def counters(self, cgroup_id: int) -> SkillCounters | None:
        value = self.maps["skills"].lookup(skill_key(cgroup_id))
        if value is None:
            return None
        _, _, net, fs, killed = SKILL.unpack(value)
        return SkillCounters(net, fs, killed)

    def set_resolvers(self, addresses: list[str]) -> None:
        rmap = self.maps["resolvers"]
        wanted = {resolver_key(a) for a in addresses}
        for key in rmap.keys():
            if key not in wanted:
                rmap.delete(key)
        for key in wanted:
            rmap.update(key, U32.pack(1))


@dataclass(frozen=True)
class RawEvent:
    kind: int
    decision: str
    cgroup_id: int
    tid: int
    pid: int  # thread group id, what user space calls the pid
    family: int
    proto: int
    port: int
    address: str
    dfd: int
    flags: int
    path: str


def decode_event(data: bytes) -> RawEvent:
    (kind, decision, cg, tid, tgid, family, proto, port, addr, dfd, flags,
     path) = EVENT.unpack_from(data)
    address = ""
    if kind == EV_NET:
        if family == 4:
            address = str(ipaddress.IPv4Address(addr[:4]))
        else:
            ip6 = ipaddress.IPv6Address(addr)
            address = str(ip6.ipv4_mapped and f"::ffff:{ip6.ipv4_mapped}" or ip6)
    return RawEvent(kind, DECISIONS.get(decision, str(decision)), cg, tid, tgid, family, proto,
                    port, address, dfd, flags,
                    path.split(b"\0", 1)[0].decode(errors="surrogateescape"))
