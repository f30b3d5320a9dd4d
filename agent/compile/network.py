"""Network plan: the destinations a policy grants, and the nftables ruleset
(libnftables JSON, see libnftables-json(5)) that a skill's network namespace
loads to enforce them.

Literal addresses go into interval sets of `address . port-range` pairs;
names are admitted only through DNS: the agent's resolver adds each answer
to the address sets of the name rule's port range (`dns4_443`,
`dns6_1_65535`, ...: one pair per distinct port range, so elements never
overlap, which an interval set would refuse with EEXIST) with the record's
TTL as element timeout. Nothing else leaves the namespace. Ungranted packets are rejected, not silently
dropped: a TCP SYN dropped in the output hook is retransmitted until
connect() times out (TCP ignores the local transmit error). TCP gets a
reset, which fails connect() at once with ECONNREFUSED, blocking or not:
the RST is a packet, queued to the socket's backlog if connect() holds the
socket lock. An ICMP admin-prohibited error would not do for TCP: it is not
backlogged, and when it arrives while a blocking connect() holds the lock
tcp_v4_err() only records a soft error, so connect() fails only after the
first SYN retransmit (1 s), and after ~50 rejects the ICMP rate limit
(icmp_msgs_burst) delays it further. Other protocols get ICMP
admin-prohibited; the local send fails with EPERM (NF_DROP in LOCAL_OUT).
The table is stateless (see nft_ruleset). Checked by
tests/kernel/test_nft_ruleset.py and test_network_launch.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.manifest.model import IPNetwork, Policy

TABLE = "skillguard"
ANY_PORT = (1, 65535)
# The agent's DNS stub as the skill sees it; the netns enforcer may pass another.
DEFAULT_RESOLVER4 = "169.254.53.53"
# Dropped packets logged per second (and burst) per skill; the rest are only counted.
LOG_RATE, LOG_BURST = 20, 40
LOG_PREFIX = "skillguard-drop"


@dataclass(frozen=True)
class Destination:
    network: IPNetwork
    ports: tuple[int, int]  # inclusive range
    rule: str  # the manifest rule that grants it


@dataclass(frozen=True)
class NameGrant:
    pattern: str  # DNS name pattern, `*` / `**` labels
    ports: tuple[int, int]
    rule: str


@dataclass(frozen=True)
class NetworkPlan:
    destinations: tuple[Destination, ...]
    names: tuple[NameGrant, ...]
    private_names: tuple[str, ...] = ()  # name patterns whose private answers may be admitted

    @property
    def loopback_only(self) -> bool:
        return not self.destinations and not self.names

    @property
    def needs_dns(self) -> bool:
        return bool(self.names)


def _ports(port: Optional[int]) -> tuple[int, int]:
    return ANY_PORT if port is None else (port, port)


def compile_network(policy: Policy) -> NetworkPlan:
    dests: set[Destination] = set()
    names: set[NameGrant] = set()
    granted = [(r.host, _ports(r.port), r.text) for r in policy.tcp.grants]
    granted += [(r.host, _ports(r.port), r.text) for r in policy.http.grants]
    for host, ports, text in granted:
        for net in host.networks:
            dests.add(Destination(net, ports, text))
        if host.name:
            names.add(NameGrant(host.name, ports, text))
    order = lambda d: (d.network.version, int(d.network.network_address), d.network.prefixlen, d.ports)
    private = set(policy.tcp.private_names if policy.tcp.enabled else ())
    private |= set(policy.http.private_names if policy.http.enabled else ())
    return NetworkPlan(tuple(sorted(dests, key=order)),
                       tuple(sorted(names, key=lambda n: (n.pattern, n.ports))),
                       tuple(sorted(private)))


@dataclass(frozen=True)
class DnsSets:
    """The two timeout sets that hold DNS-admitted addresses for one port range."""

    ports: tuple[int, int]
    set4: str
    set6: str


def dns_sets(plan: NetworkPlan) -> tuple[DnsSets, ...]:
    out = []
    for lo, hi in sorted({n.ports for n in plan.names}):
        suffix = str(lo) if lo == hi else f"{lo}_{hi}"
        out.append(DnsSets((lo, hi), f"dns4_{suffix}", f"dns6_{suffix}"))
    return tuple(out)


# -- nftables --------------------------------------------------------------


def _addr(net: IPNetwork) -> object:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _port(ports: tuple[int, int]) -> object:
    return ports[0] if ports[0] == ports[1] else {"range": list(ports)}


def _set(name: str, addr_type: str, elems: list, *, dynamic: bool) -> dict:
    # Static sets: `address . port-range` intervals. DNS sets: plain addresses
    # with per-element timeouts (the port range is in the rule that uses them).
    body: dict = {"family": "inet", "table": TABLE, "name": name,
                  "type": addr_type if dynamic else [addr_type, "inet_service"],
                  "flags": ["timeout"] if dynamic else ["interval"]}
    if elems:
        body["elem"] = elems
    return {"set": body}


def _match(left: object, right: object) -> dict:
    return {"match": {"op": "==", "left": left, "right": right}}


def _rule(chain: str, *expr: dict, comment: Optional[str] = None) -> dict:
    body: dict = {"family": "inet", "table": TABLE, "chain": chain, "expr": list(expr)}
    if comment:
        body["comment"] = comment
    return {"rule": body}


# Any TCP segment but a connection opening (SYN set, ACK clear).
_NOT_SYN = {"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                                  ["syn", "ack"]]},
                      "right": "syn"}}
ICMP_ERRORS = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMPV6_ERRORS = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem")
NEIGHBOUR_DISCOVERY = ("nd-neighbor-solicit", "nd-neighbor-advert")


def _daddr_dport(proto: str, l4: str) -> dict:
    return {"concat": [{"payload": {"protocol": proto, "field": "daddr"}},
                       {"payload": {"protocol": l4, "field": "dport"}}]}


def _without(network: IPNetwork, holes: list) -> list:
    """`network` minus every hole, as a list of CIDRs (ipaddress.address_exclude)."""
    parts = [network]
    for hole in holes:
        if hole.version != network.version:
            continue
        rest = []
        for part in parts:
            if hole.subnet_of(part):
                rest.extend(part.address_exclude(hole))
            elif not part.subnet_of(hole):
                rest.append(part)
        parts = rest
    return sorted(parts, key=lambda n: (int(n.network_address), n.prefixlen))


def nft_ruleset(plan: NetworkPlan, *, resolver4: str = DEFAULT_RESOLVER4,
                guard: tuple[IPNetwork, ...] = (), log_group: Optional[int] = None) -> dict:
    """The whole table for a skill's namespace, as one libnftables JSON document.

    `guard`: the agent's own networks (the veth address pool); they and
    `resolver4` are cut out of the literal allowlist at compile time (a rule
    `10.0.0.0/8:*` does not reach the host through its veth), so nothing but
    DNS to the resolver reaches them and the hot path has no extra rule.
    `log_group`: NFLOG group for dropped packets (read by the supervisor);
    None logs to the kernel log instead, which a non-initial namespace only
    does when net.netfilter.nf_log_all_netns is set (nf_log_syslog.c).

    Stateless: no `ct` expression, so connection tracking is never switched
    on in the skill's namespace (nf_ct_netns_get() is only called for ct and
    nat expressions), which saves its cost on every packet. TCP is checked
    where a connection opens: a SYN without ACK must match a grant, other
    segments pass, because the only way to send a TCP segment without raw
    sockets (CAP_NET_RAW) or repair mode (CAP_NET_ADMIN), neither of which
    a skill has, is the kernel's own stack, which sends the later segments
    of a connection only to the peer its SYN went to. A source route would
    send them to another first hop (an IPv6 routing header is settable
    without privilege; IPv4 source routes need CAP_NET_RAW), so only
    segments without IPv4 options or IPv6 extension headers pass unchecked;
    the others are checked like a SYN. UDP is checked on every datagram;
    the input chain drops every inbound SYN (nothing connects into a skill)
    and all UDP but the resolver's. docs/threat-model.md has the argument
    and the tests that back it.
    """
    import ipaddress

    holes = sorted(set(guard) | {ipaddress.ip_network(resolver4)},
                   key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    elems = {4: [], 6: []}
    for d in plan.destinations:
        for part in _without(d.network, holes):
            elems[d.network.version].append({"concat": [_addr(part), _port(d.ports)]})
    accept = {"accept": None}
    cmds: list[dict] = [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": TABLE}},
        _set("allow4", "ipv4_addr", elems[4], dynamic=False),
        _set("allow6", "ipv6_addr", elems[6], dynamic=False),
    ]
    groups = dns_sets(plan)
    for group in groups:
        cmds.append(_set(group.set4, "ipv4_addr", [], dynamic=True))
        cmds.append(_set(group.set6, "ipv6_addr", [], dynamic=True))
    cmds += [
        {"counter": {"family": "inet", "table": TABLE, "name": "accepted"}},
        {"counter": {"family": "inet", "table": TABLE, "name": "dropped"}},
    ]
    for chain, hook in (("output", "output"), ("input", "input")):
        cmds.append({"chain": {"family": "inet", "table": TABLE, "name": chain, "type": "filter",
                               "hook": hook, "prio": 0, "policy": "drop"}})
        cmds.append(_rule(chain, _match({"meta": {"key": "oif" if chain == "output" else "iif"}}, "lo"),
                          accept))
        # Not a connection opening: a later segment of a connection, a reply,
        # or the kernel's reset to a stray segment. IPv4 without options and
        # IPv6 without extension headers only (see the doc above).
        for plain in (_match({"payload": {"protocol": "ip", "field": "hdrlength"}}, 5),
                      _match({"payload": {"protocol": "ip6", "field": "nexthdr"}}, "tcp")):
            cmds.append(_rule(chain, plain, _NOT_SYN, accept))
    for proto, setname in (("ip", "allow4"), ("ip6", "allow6")):
        cmds.append(_rule("output", _match(_daddr_dport(proto, "tcp"), f"@{setname}"),
                          {"counter": "accepted"}, accept))
    for group in groups:
        for proto, setname in (("ip", group.set4), ("ip6", group.set6)):
            cmds.append(_rule("output", _match({"payload": {"protocol": proto, "field": "daddr"}}, f"@{setname}"),
                              _match({"payload": {"protocol": "tcp", "field": "dport"}}, _port(group.ports)),
                              {"counter": "accepted"}, accept))
    if plan.needs_dns:
        for l4 in ("udp", "tcp"):
            cmds.append(_rule("output", _match({"payload": {"protocol": "ip", "field": "daddr"}}, resolver4),
                              _match({"payload": {"protocol": l4, "field": "dport"}}, 53),
                              accept, comment="DNS to the agent's resolver only"))
        cmds.append(_rule("input", _match({"payload": {"protocol": "ip", "field": "saddr"}}, resolver4),
                          _match({"payload": {"protocol": "udp", "field": "sport"}}, 53), accept))
    # ICMP errors: the kernel sends them only about packets it received (the
    # skill cannot open raw or ping sockets), and receives them about its
    # own (path MTU, unreachable). Neighbour discovery passes both ways, or
    # IPv6 never reaches the veth.
    for chain in ("output", "input"):
        cmds.append(_rule(chain, _match({"payload": {"protocol": "icmp", "field": "type"}},
                                        {"set": list(ICMP_ERRORS)}), accept))
        cmds.append(_rule(chain, _match({"payload": {"protocol": "icmpv6", "field": "type"}},
                                        {"set": list(ICMPV6_ERRORS + NEIGHBOUR_DISCOVERY)}), accept))
    # The kernel's own router solicitations and MLD reports: not the skill's doing.
    cmds.append(_rule("output", _match({"payload": {"protocol": "icmpv6", "field": "type"}},
                                       {"set": ["nd-router-solicit", "mld-listener-report",
                                                "mld2-listener-report"]}),
                      {"drop": None}))
    # Everything else: count it, log a rate-limited sample (a `limit` that
    # does not match only skips the log), and reject it.
    log = {"log": {"prefix": LOG_PREFIX + " ", "level": "info"}} if log_group is None \
        else {"log": {"prefix": LOG_PREFIX, "group": log_group}}
    cmds += [
        _rule("output", {"counter": "dropped"}, comment="everything not granted"),
        _rule("output", {"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}}, log),
        _rule("output", _match({"meta": {"key": "l4proto"}}, "tcp"), {"reject": {"type": "tcp reset"}}),
        _rule("output", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
    ]
    return {"nftables": cmds}


def summary(plan: NetworkPlan) -> dict:
    def ports(p: tuple[int, int]) -> str:
        return "*" if p == ANY_PORT else (str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}")

    return {
        "loopback_only": plan.loopback_only,
        "destinations": [{"network": str(d.network), "ports": ports(d.ports), "rule": d.rule}
                         for d in plan.destinations],
        "names_via_dns": [{"pattern": n.pattern, "ports": ports(n.ports), "rule": n.rule}
                          for n in plan.names],
    }

