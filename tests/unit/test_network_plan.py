import ipaddress
import json

from agent.compile.network import ANY_PORT, compile_network, nft_ruleset
from agent.manifest import load_text


def plan_of(text):
    result = load_text("name: n\nversion: '1'\npermissions:\n" + text)
    assert result.ok, result.errors
    return compile_network(result.policy)


def test_no_grant_is_loopback_only():
    plan = compile_network(load_text("name: n\nversion: '1'\n").policy)
    assert plan.loopback_only and not plan.needs_dns


def test_literals_names_and_ports():
    plan = plan_of("  tcp:\n    allowlist: ['10.0.0.*:*', 'redis:6379', '[2001:db8::1]:5432']\n"
                   "  http:\n    allowlist: ['https://api.example.com/**', 'http://192.0.2.1:8080/x']\n")
    dests = {(str(d.network), d.ports) for d in plan.destinations}
    assert dests == {("10.0.0.0/24", ANY_PORT), ("192.0.2.1/32", (8080, 8080)),
                     ("2001:db8::1/128", (5432, 5432))}
    assert {(n.pattern, n.ports) for n in plan.names} == {("redis", (6379, 6379)),
                                                          ("api.example.com", (443, 443))}
    assert plan.needs_dns


def test_disabled_block_adds_nothing():
    plan = plan_of("  tcp:\n    enabled: false\n    allowlist: ['10.0.0.1:22']\n")
    assert plan.loopback_only


def test_ruleset_is_deterministic_and_drops_by_default():
    text = "  tcp:\n    allowlist: ['redis:6379', '10.0.0.0/8:5432', '10.0.0.1:22']\n"
    a, b = nft_ruleset(plan_of(text)), nft_ruleset(plan_of(text))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    chains = [c["chain"] for c in a["nftables"] if "chain" in c]
    assert {c["name"]: c["policy"] for c in chains} == {"output": "drop", "input": "drop"}
    allow4 = next(c["set"] for c in a["nftables"] if "set" in c and c["set"]["name"] == "allow4")
    assert {json.dumps(e, sort_keys=True) for e in allow4["elem"]} == {
        json.dumps({"concat": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, 5432]}, sort_keys=True),
        json.dumps({"concat": ["10.0.0.1", 22]}, sort_keys=True)}


def test_dns_rule_only_with_names():
    with_names = json.dumps(nft_ruleset(plan_of("  tcp:\n    allowlist: ['redis:6379']\n")))
    without = json.dumps(nft_ruleset(plan_of("  tcp:\n    allowlist: ['10.0.0.1:22']\n")))
    assert '"dport"}}, "right": 53' in with_names and '"right": 53' not in without


def test_mapped_ipv6_is_ipv4():
    plan = plan_of("  tcp:\n    allowlist: ['[::ffff:198.51.100.7]:443']\n")
    assert plan.destinations[0].network == ipaddress.ip_network("198.51.100.7/32")


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _rules(ruleset, chain):
    return [c["rule"]["expr"] for c in ruleset["nftables"] if "rule" in c and c["rule"]["chain"] == chain]


def test_ruleset_is_stateless():
    # No ct expression anywhere: connection tracking never starts in the skill's namespace.
    ruleset = nft_ruleset(plan_of("  tcp:\n    allowlist: ['redis:6379', '10.0.0.1:22', '[2001:db8::1]:22']\n"))
    assert "ct" not in set(_walk(ruleset))


def _accepts_syn(expr) -> bool:
    """Whether a TCP rule could accept a connection opening: it lacks the not-SYN match."""
    not_syn = {"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                                     ["syn", "ack"]]}, "right": "syn"}}
    return expr[-1] == {"accept": None} and not_syn not in expr


def test_only_connection_openings_are_checked_and_source_routes_are_not_waved_through():
    ruleset = nft_ruleset(plan_of("  tcp:\n    allowlist: ['redis:6379', '10.0.0.1:22']\n"))
    out, inp = _rules(ruleset, "output"), _rules(ruleset, "input")
    waved = [e for e in out if not _accepts_syn(e) and e[-1] == {"accept": None}]
    # One rule per family, and each insists on a plain header: IPv4 without
    # options, IPv6 without extension headers (no source route to another hop).
    assert [e[0]["match"] for e in waved] == [
        {"op": "==", "left": {"payload": {"protocol": "ip", "field": "hdrlength"}}, "right": 5},
        {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "nexthdr"}}, "right": "tcp"}]
    # Inbound: nothing opens a connection into the skill (a SYN is dropped by the policy).
    tcp_in = [e for e in inp if "tcp" in json.dumps(e) and "icmp" not in json.dumps(e)]
    assert tcp_in and not [e for e in tcp_in if _accepts_syn(e)]
    # UDP in: the resolver's answers only, and only where names need DNS.
    udp_in = [e for e in inp if '"udp"' in json.dumps(e)]
    assert udp_in == [[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                  "right": "169.254.53.53"}},
                       {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}},
                                  "right": 53}},
                       {"accept": None}]]
    no_names = nft_ruleset(plan_of("  tcp:\n    allowlist: ['10.0.0.1:22']\n"))
    assert not [e for e in _rules(no_names, "input") if '"udp"' in json.dumps(e)]


def test_accepted_counts_connection_openings_only():
    ruleset = nft_ruleset(plan_of("  tcp:\n    allowlist: ['redis:6379', '10.0.0.1:22']\n"))
    counted = [e for e in _rules(ruleset, "output") if {"counter": "accepted"} in e]
    assert len(counted) == 4  # allow4, allow6, dns4_6379, dns6_6379: after the not-SYN rules
    first_counted = _rules(ruleset, "output").index(counted[0])
    assert all(not _accepts_syn(e) for e in _rules(ruleset, "output")[1:3]) and first_counted == 3
