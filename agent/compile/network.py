"""Network plan: the destinations a policy grants, and the nftables ruleset
(libnftables JSON, see libnftables-json(5)) that a skill's network namespace
loads to enforce them.

Literal addresses go into interval sets of `address . port-range` pairs;
names are admitted only through DNS: the agent's resolver adds each answer
to the `dns4`/`dns6` sets with the record's TTL as element timeout. Nothing
else leaves the namespace. Ungranted packets are rejected, not silently
dropped: a TCP SYN dropped in the output hook is retransmitted until
connect() times out (TCP ignores the local transmit error), whereas an ICMP
admin-prohibited answer fails connect() at once with EHOSTUNREACH
(net/ipv4/icmp.c icmp_err_convert: ICMP_PKT_FILTERED); checked by
tests/kernel/test_nft_ruleset.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.manifest.model import IPNetwork, Policy

TABLE = "skillguard"
ANY_PORT = (1, 65535)
# The agent's DNS stub as the skill sees it; the netns enforcer may pass another.
DEFAULT_RESOLVER4 = "169.254.53.53"


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
    return NetworkPlan(tuple(sorted(dests, key=order)),
                       tuple(sorted(names, key=lambda n: (n.pattern, n.ports))))


# -- nftables --------------------------------------------------------------


def _addr(net: IPNetwork) -> object:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _port(ports: tuple[int, int]) -> object:
    return ports[0] if ports[0] == ports[1] else {"range": list(ports)}


def _set(name: str, addr_type: str, elems: list, *, dynamic: bool) -> dict:
    body: dict = {"family": "inet", "table": TABLE, "name": name,
                  "type": [addr_type, "inet_service"],
                  "flags": ["interval", "timeout"] if dynamic else ["interval"]}
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


def nft_ruleset(plan: NetworkPlan, *, resolver4: str = DEFAULT_RESOLVER4) -> dict:
    """The whole table for a skill's namespace, as one libnftables JSON document."""
    elems = {4: [], 6: []}
    for d in plan.destinations:
        elems[d.network.version].append({"concat": [_addr(d.network), _port(d.ports)]})
    accept = {"accept": None}
    cmds: list[dict] = [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": TABLE}},
        _set("allow4", "ipv4_addr", elems[4], dynamic=False),
        _set("allow6", "ipv6_addr", elems[6], dynamic=False),
        _set("dns4", "ipv4_addr", [], dynamic=True),
        _set("dns6", "ipv6_addr", [], dynamic=True),
        {"counter": {"family": "inet", "table": TABLE, "name": "accepted"}},
        {"counter": {"family": "inet", "table": TABLE, "name": "dropped"}},
    ]
    for chain, hook in (("output", "output"), ("input", "input")):
        cmds.append({"chain": {"family": "inet", "table": TABLE, "name": chain, "type": "filter",
                               "hook": hook, "prio": 0, "policy": "drop"}})
        cmds.append(_rule(chain, _match({"meta": {"key": "oifname" if chain == "output" else "iifname"}}, "lo"),
                          accept))
        cmds.append(_rule(chain, _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}),
                          accept))
    if plan.needs_dns:
        for l4 in ("udp", "tcp"):
            cmds.append(_rule("output", _match({"payload": {"protocol": "ip", "field": "daddr"}}, resolver4),
                              _match({"payload": {"protocol": l4, "field": "dport"}}, 53),
                              accept, comment="DNS to the agent's resolver only"))
    for proto, setname in (("ip", "allow4"), ("ip6", "allow6"), ("ip", "dns4"), ("ip6", "dns6")):
        cmds.append(_rule("output", _match(_daddr_dport(proto, "tcp"), f"@{setname}"),
                          {"counter": "accepted"}, accept))
    # Everything else: count it, log a rate-limited sample (a `limit` that
    # does not match only skips the log), and reject it.
    cmds.append(_rule("output", {"counter": "dropped"}, comment="everything not granted"))
    cmds.append(_rule("output", {"limit": {"rate": 10, "per": "second"}},
                      {"log": {"prefix": "skillguard-drop ", "level": "info"}}))
    cmds.append(_rule("output", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}))
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

