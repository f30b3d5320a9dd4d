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
Checked by tests/kernel/test_nft_ruleset.py and test_network_launch.py.
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

    Rule order follows the packets: established traffic is accepted by the
    first rule, a new granted TCP connection by the third or fourth.
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
    # Neighbour discovery must pass both ways or IPv6 never reaches the veth.
    nd = _match({"payload": {"protocol": "icmpv6", "field": "type"}},
                {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]})
    for chain, hook in (("output", "output"), ("input", "input")):
        cmds.append({"chain": {"family": "inet", "table": TABLE, "name": chain, "type": "filter",
                               "hook": hook, "prio": 0, "policy": "drop"}})
        cmds.append(_rule(chain, _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}),
                          accept))
        cmds.append(_rule(chain, _match({"meta": {"key": "oifname" if chain == "output" else "iifname"}}, "lo"),
                          accept))
        if chain == "input":
            cmds.append(_rule(chain, nd, accept))
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
    cmds.append(_rule("output", nd, accept))
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

