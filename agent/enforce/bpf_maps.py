"""Pack a skill's BpfPolicy into the keys and values of the pinned maps.

Layouts mirror bpf/skillguard.h (little-endian x86_64; addresses in network
byte order). Writes go leaves first and the `skills` entry last, removal the
other way round, so the programs never see a skill whose policy is half
written: before the `skills` entry exists its cgroup is simply not a skill.

Network grants are keyed by cgroup id. Path prefixes are keyed by an fs
policy id shared by every skill with the same prefix set (`PrefixSets`,
reference-counted here in user space), so 1,000 skills with the base profile
hold one copy of its ~74 prefixes, not 1,000. The counts are rebuilt from
the maps (the `fs_policy` field of every `skills` entry) when an agent
starts, so a restarted agent shares and frees the sets an earlier one made.
One agent writes a pin directory at a time.
"""
from __future__ import annotations

import errno
import ipaddress
import struct
from dataclasses import dataclass, field

from agent.compile.bpf_policy import KEY_PATH_LEN, BpfPolicy
from agent.enforce.bpf_sys import RawMap

class _ElementWriter:
    """BPF_MAP_UPDATE_ELEM on one map with the `union bpf_attr` and the key
    and value buffers built once: a registration writes a few elements, and
    bpf_sys.RawMap.update (new ctypes buffers, a packed attr and argument
    conversions per call) cost ~25 us each in the daemon against ~5 us here.
    Layout of the attr: map_fd u32, pad, key u64, value u64, flags u64
    (include/uapi/linux/bpf.h, BPF_MAP_*_ELEM commands)."""

    _syscall = None

    def __init__(self, fd: int, key_size: int, value_size: int):
        import ctypes

        if _ElementWriter._syscall is None:
            from agent.enforce.libc import NR

            fn = ctypes.CDLL(None, use_errno=True).syscall  # its own function object: own argtypes
            fn.restype = ctypes.c_long
            fn.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long)
            _ElementWriter._syscall = (fn, NR["bpf"], ctypes.get_errno)
        self.key_size, self.value_size = key_size, value_size
        self.key = ctypes.create_string_buffer(key_size)
        self.value = ctypes.create_string_buffer(value_size)
        self.attr = ctypes.create_string_buffer(64)
        struct.pack_into("<IIQQQ", self.attr, 0, fd, 0, ctypes.addressof(self.key),
                         ctypes.addressof(self.value), 0)  # BPF_ANY

    def update(self, key: bytes, value: bytes) -> None:
        if len(key) != self.key_size or len(value) != self.value_size:
            raise ValueError(f"bpf map element of {len(key)}/{len(value)} bytes, "
                             f"want {self.key_size}/{self.value_size}")
        self.key.raw = key
        self.value.raw = value
        fn, nr, get_errno = self._syscall
        if fn(nr, 2, self.attr, 64) < 0:  # BPF_MAP_UPDATE_ELEM
            err = get_errno()
            raise OSError(err, f"bpf(BPF_MAP_UPDATE_ELEM): {errno.errorcode.get(err, err)}")


SKILL = struct.Struct("<IIQQQ")           # flags, fs_policy, net_denied, fs_events, fs_killed
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


def path_key(fs_policy: int, entry: bytes) -> bytes:
    return struct.pack("<IQ", 64 + 8 * len(entry), fs_policy) + entry.ljust(KEY_PATH_LEN, b"\0")


def path_entry(key: bytes) -> tuple[int, bytes]:
    """(fs policy id, trie string) of an fs_prefixes key."""
    prefixlen, fs_policy = struct.unpack_from("<IQ", key)
    return fs_policy, key[12:12 + (prefixlen - 64) // 8]


class MapFull(OSError):
    """A map update failed with ENOSPC: the map holds max_entries already."""


class PrefixSets:
    """Pure bookkeeping of shared path-prefix sets: content -> id -> users."""

    MAX_ID = 0xFFFFFFFF  # struct skill.fs_policy is a u32

    def __init__(self):
        self.ids: dict[frozenset, int] = {}
        self.contents: dict[int, frozenset] = {}
        self.users: dict[int, int] = {}

    def lookup(self, prefixes) -> int:
        """The id of an existing set with exactly these prefixes, else 0."""
        return self.ids.get(frozenset(prefixes), 0)

    def new_id(self) -> int:
        """The smallest id no set uses (0 means "no prefixes")."""
        fs_id = 1
        while fs_id in self.contents:
            fs_id += 1
        if fs_id > self.MAX_ID:
            raise MapFull(errno.ENOSPC, "no free fs policy id")
        return fs_id

    def add(self, fs_id: int, prefixes, users: int = 0) -> None:
        content = frozenset(prefixes)
        self.ids[content] = fs_id
        self.contents[fs_id] = content
        self.users[fs_id] = users

    def acquire(self, fs_id: int) -> None:
        self.users[fs_id] += 1

    def release(self, fs_id: int) -> frozenset | None:
        """Drop one user; the set's prefixes when it was the last (delete them), else None."""
        if fs_id not in self.users:
            return None
        self.users[fs_id] -= 1
        if self.users[fs_id] > 0:
            return None
        content = self.contents.pop(fs_id)
        del self.users[fs_id]
        self.ids.pop(content, None)
        return content


def resolver_key(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return struct.pack("<I", ip.version) + ip.packed.ljust(16, b"\0")


@dataclass
class FoundEntries:
    """A skill's network entries as read back from the maps."""
    keys: list = field(default_factory=list)  # (map name, key)
    net4: tuple = ()
    net6: tuple = ()


@dataclass
class SkillCounters:
    net_denied: int
    fs_events: int
    fs_killed: int


class PolicyMaps:
    """The per-skill maps, by fd."""

    def __init__(self, fds: dict[str, int]):
        self.maps = {name: RawMap(fds[name], *MAP_SIZES[name], name=name) for name in MAP_SIZES}
        self._writers = {name: _ElementWriter(fds[name], *MAP_SIZES[name]) for name in MAP_SIZES}
        self.prefix_sets = PrefixSets()
        self._load_prefix_sets()

    def _load_prefix_sets(self) -> None:
        """Rebuild the shared sets and their user counts from the pinned maps;
        delete sets no skill uses (an agent died between the two deletes)."""
        found: dict[int, list[bytes]] = {}
        for key in self.maps["fs_prefixes"].keys():
            fs_id, entry = path_entry(key)
            found.setdefault(fs_id, []).append(entry)
        users: dict[int, int] = {}
        for value in self._skill_values():
            fs_id = SKILL.unpack(value)[1]
            if fs_id:
                users[fs_id] = users.get(fs_id, 0) + 1
        for fs_id, entries in found.items():
            if users.get(fs_id):
                self.prefix_sets.add(fs_id, entries, users[fs_id])
            else:
                for entry in entries:
                    self.maps["fs_prefixes"].delete(path_key(fs_id, entry))

    def _skill_values(self) -> list[bytes]:
        rmap = self.maps["skills"]
        return [v for v in (rmap.lookup(k) for k in rmap.keys()) if v is not None]

    def entries(self, cgroup_id: int, policy: BpfPolicy) -> list[tuple[str, bytes, bytes]]:
        """(map, key, value) of the skill's own entries: its network grants."""
        out = []
        for entry in policy.net4 + policy.net6:
            name = "allow4" if entry.network.version == 4 else "allow6"
            out.append((name, lpm_key(cgroup_id, entry.network),
                        NET_VALUE.pack(entry.net_id, int(entry.any_port))))
            for port in entry.ports:
                out.append(("ports", port_key(cgroup_id, entry.net_id, port), U32.pack(1)))
        return out

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        try:
            self._writers[name].update(key, value)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  #: kernel/bpf/hashtab.c, lpm_trie.c at max_entries
                raise MapFull(errno.ENOSPC, f"bpf map {name} is full ({len(self.maps[name].keys())} entries)") \
                    from None
            raise

    def _acquire_prefixes(self, prefixes: tuple[bytes, ...]) -> int:
        """The fs policy id for these prefixes, writing them if no skill has them yet."""
        fs_id = self.prefix_sets.lookup(prefixes)
        if fs_id:
            self.prefix_sets.acquire(fs_id)
            return fs_id
        fs_id = self.prefix_sets.new_id()
        written = []
        try:
            for entry in prefixes:
                self._update("fs_prefixes", path_key(fs_id, entry), U32.pack(1))
                written.append(entry)
        except BaseException:
            for entry in written:
                self.maps["fs_prefixes"].delete(path_key(fs_id, entry))
            raise
        self.prefix_sets.add(fs_id, prefixes, users=1)
        return fs_id

    def _release_prefixes(self, fs_id: int) -> None:
        gone = self.prefix_sets.release(fs_id)
        for entry in gone or ():
            self.maps["fs_prefixes"].delete(path_key(fs_id, entry))

    def install(self, cgroup_id: int, policy: BpfPolicy) -> None:
        """Write every entry of the skill, or (on any error) none: MapFull when a map is full."""
        fs_id = 0
        if policy.flags & 4 and policy.fs_prefixes:  # SKILL_FS_OBSERVE
            fs_id = self._acquire_prefixes(policy.fs_prefixes)
        written = []
        try:
            for name, key, value in self.entries(cgroup_id, policy):
                self._update(name, key, value)
                written.append((name, key))
            self._update("skills", skill_key(cgroup_id), SKILL.pack(policy.flags, fs_id, 0, 0, 0))
        except BaseException:
            for name, key in written:
                self.maps[name].delete(key)
            if fs_id:
                self._release_prefixes(fs_id)
            raise

    def remove(self, cgroup_id: int, policy: BpfPolicy | None,
               found: "FoundEntries | None" = None) -> None:
        """Delete the skill; with no policy (an agent restart lost it), the
        entries `scan()` found for it, else scan every map."""
        value = self.maps["skills"].lookup(skill_key(cgroup_id))
        self.maps["skills"].delete(skill_key(cgroup_id))
        if value is not None and SKILL.unpack(value)[1]:
            self._release_prefixes(SKILL.unpack(value)[1])
        if policy is not None:
            for name, key, _ in self.entries(cgroup_id, policy):
                self.maps[name].delete(key)
            return
        if found is not None:
            for name, key in found.keys:
                self.maps[name].delete(key)
            return
        for name in ("allow4", "allow6", "ports"):
            rmap = self.maps[name]
            offset = 0 if name == "ports" else 4  # cgroup id follows prefixlen in LPM keys
            for key in rmap.keys():
                if struct.unpack_from("<Q", key, offset)[0] == cgroup_id:
                    rmap.delete(key)

    def net_entries(self, cgroup_id: int):
        """(net4, net6) NetEntry tuples of a skill, read back from the maps."""
        found = self.scan({cgroup_id}).get(cgroup_id)
        return (found.net4, found.net6) if found else ((), ())

    def scan(self, cgroup_ids: set[int]) -> dict[int, "FoundEntries"]:
        """The network entries of these skills, read back from the maps in one
        pass over each map (an agent restart: their policies are not known)."""
        from agent.compile.bpf_policy import NetEntry

        ports: dict[tuple[int, int], list[int]] = {}
        found = {cg: FoundEntries() for cg in cgroup_ids}
        for key in self.maps["ports"].keys():
            cg, net_id, port = PORT_KEY.unpack(key)
            if cg in found:
                ports.setdefault((cg, net_id), []).append(port)
                found[cg].keys.append(("ports", key))
        for name, cls in (("allow4", ipaddress.IPv4Network), ("allow6", ipaddress.IPv6Network)):
            rmap = self.maps[name]
            for key in rmap.keys():
                prefixlen, cg = struct.unpack_from("<IQ", key)
                if cg not in found:
                    continue
                found[cg].keys.append((name, key))
                value = rmap.lookup(key)
                if value is None:
                    continue
                net_id, any_port = NET_VALUE.unpack(value)
                net = cls((key[12:], prefixlen - 64))
                entry = NetEntry(net, net_id, bool(any_port),
                                 () if any_port else tuple(sorted(ports.get((cg, net_id), []))))
                if name == "allow4":
                    found[cg].net4 += (entry,)
                else:
                    found[cg].net6 += (entry,)
        return found

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
