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
