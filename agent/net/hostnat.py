"""The shared host table `inet skillguard_nat`: masquerade the skills' address
pool, and let nothing start a connection into a skill. The first launch with
a network grant creates it; it stays.

Every launch makes sure it is in place, without paying for that each time:
listing it through libnftables costs ~2.5 ms and applying it ~15 ms (a
commit that touches a NAT chain waits for an RCU grace period). A listing
that finds the table as it must be leaves a stamp in the state root: the
boot id, the network namespace's cookie and nftables' generation id read
before the listing. Every nf_tables commit in a namespace increments its
generation (net/netfilter/nf_tables_api.c, nf_tables_commit: base_seq), and
a namespace cookie is never reused while the system runs (SO_NETNS_COOKIE,
net/core/net_namespace.c), so when the next launch reads the same three
values nothing has been committed in this namespace since the listing, and
the table is still as it was then. Because the generation is read before
the listing, a commit that lands in between makes the stamp stale (one
listing more), never wrong. The stamp lives in the state root, which only
root can write.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Optional

NAT_TABLE = "skillguard_nat"
VETH_PREFIX = "sgv"
# IPv6 twin of the IPv4 pool: a /30 a.b.c.d/30 becomes POOL6::a.b.c.d/126 (ULA, RFC 4193).
POOL6 = ipaddress.IPv6Network("fd53:6b67:7264::/96")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NLM_F_REQUEST, NLMSG_ERROR = 1, 2
SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux 5.14
_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")


def host_nat_ruleset(pool: ipaddress.IPv4Network) -> dict:
    """The shared host table: masquerade the pool; nothing starts a connection into a skill."""
    t = {"family": "inet", "table": NAT_TABLE}
    saddr = lambda proto, setname: {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}},
                                              "right": f"@{setname}"}}
    daddr_not = lambda proto, setname: {"match": {"op": "!=", "left": {"payload": {"protocol": proto, "field": "daddr"}},
                                                  "right": f"@{setname}"}}
    oif = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": f"{VETH_PREFIX}*"}}
    return {"nftables": [
        {"add": {"table": {"family": "inet", "name": NAT_TABLE}}},
        {"add": {"set": {**t, "name": "pool4", "type": "ipv4_addr", "flags": ["interval"]}}},
        {"add": {"set": {**t, "name": "pool6", "type": "ipv6_addr", "flags": ["interval"]}}},
        {"add": {"chain": {**t, "name": "postrouting", "type": "nat", "hook": "postrouting",
                           "prio": 100, "policy": "accept"}}},
        {"add": {"chain": {**t, "name": "forward", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "accept"}}},
        {"flush": {"chain": {**t, "name": "postrouting"}}},
        {"flush": {"chain": {**t, "name": "forward"}}},
        {"add": {"rule": {**t, "chain": "postrouting",
                          "expr": [saddr("ip", "pool4"), daddr_not("ip", "pool4"), {"masquerade": None}]}}},
        {"add": {"rule": {**t, "chain": "postrouting",
                          "expr": [saddr("ip6", "pool6"), daddr_not("ip6", "pool6"), {"masquerade": None}]}}},
        {"add": {"rule": {**t, "chain": "forward",
                          "expr": [oif, {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                                   "right": ["established", "related"]}}, {"accept": None}]}}},
        {"add": {"rule": {**t, "chain": "forward", "expr": [oif, {"drop": None}],
                          "comment": "no connection into a skill, not from the outside, not from another skill"}}},
        {"add": {"element": {**t, "name": "pool4", "elem": [{"prefix": {"addr": str(pool.network_address),
                                                                         "len": pool.prefixlen}}]}}},
        {"add": {"element": {**t, "name": "pool6", "elem": [{"prefix": {"addr": str(POOL6.network_address),
                                                                         "len": POOL6.prefixlen}}]}}},
    ]}


def generation() -> tuple[int, int]:
    """(network namespace cookie, nftables generation id) of the calling thread's namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        (cookie,) = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # struct nfgenmsg
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                                 NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(4096)
    finally:
        sock.close()
    _len, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
        raise OSError(code, f"nftables generation: {os.strerror(code)}")
    offset = _NLMSGHDR.size + 4  # past struct nfgenmsg
    while offset + _NLATTR.size <= len(data):
        size, attr = _NLATTR.unpack_from(data, offset)
        if size < _NLATTR.size:
            break
        if attr & 0x3FFF == NFTA_GEN_ID:
            return cookie, struct.unpack_from("!I", data, offset + _NLATTR.size)[0]
        offset += (size + 3) & ~3
    raise OSError(0, "nftables generation: no NFTA_GEN_ID in the kernel's answer")


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
        return fh.read().strip()


def _stamp(pool: ipaddress.IPv4Network) -> Optional[str]:
    try:
        cookie, gen = generation()
    except OSError:  # nf_tables not loaded yet, say: no stamp, list the table instead
        return None
    return f"{_boot_id()} {cookie} {gen} {pool}\n"


def _in_place(pool: ipaddress.IPv4Network, nft_ctx=None) -> bool:
    from agent.enforce import nft

    try:
        items = nft.query({"list": {"table": {"family": "inet", "name": NAT_TABLE}}}, nft_ctx)
    except nft.NftError:
        return False
    rules = sum(1 for item in items if "rule" in item)
    pool_elem = {"prefix": {"addr": str(pool.network_address), "len": pool.prefixlen}}
    pools = [item["set"].get("elem", []) for item in items if "set" in item and item["set"]["name"] == "pool4"]
    return rules == 4 and bool(pools) and pool_elem in pools[0]


def ensure_host_nat(pool: ipaddress.IPv4Network, stamp_path: str) -> str:
    """Create or repair the shared host table in the calling thread's
    namespace; a no-op when it is in place. Returns what it did: "stamp"
    (unchanged since verified), "listed" or "applied". Call it under the
    pool lock, so two launches do not both apply it."""
    from agent.enforce import nft

    before = _stamp(pool)
    try:
        with open(stamp_path, encoding="ascii") as fh:
            if before is not None and fh.read() == before:
                return "stamp"
    except OSError:
        pass
    done = "listed"
    if not _in_place(pool):
        nft.apply(host_nat_ruleset(pool))
        done = "applied"
        before = _stamp(pool)
        if not _in_place(pool):
            raise nft.NftError(f"table inet {NAT_TABLE} is not as applied")
    if before is None:
        return done
    tmp = f"{stamp_path}.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(before)
    os.replace(tmp, stamp_path)
    return done
