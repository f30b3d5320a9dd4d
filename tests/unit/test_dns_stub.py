"""The DNS stub's pure filter, its socket loop on loopback, and the NFLOG/event helpers.

The socket test needs no root: the stub listens on 127.0.0.1 (port 0) bound
to `lo`, and a fake upstream answers from a thread.
"""
import ipaddress
import select
import socket
import struct
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from agent.compile.network import compile_network, dns_sets, nft_ruleset
from agent.manifest import load_text
from agent.net.dns_stub import Addition, DnsStub, StubRules, parse_upstreams
from agent.net.events import EventGate, missing_rule
from agent.net.nflog import parse_messages, parse_payload
from tests.conftest import require

MANIFEST = ("name: n\nversion: '1'\npermissions:\n  tcp:\n    allowlist:\n"
            "      - 'api.example.test:443'\n      - '*.cdn.example.test:*'\n      - 'api.example.test:8443'\n"
            "      - 'db.example.test:5432'\n      - '198.51.100.7:22'\n    private_names: [db.example.test]\n")


@pytest.fixture
def plan():
    result = load_text(MANIFEST)
    assert result.ok, result.errors
    return compile_network(result.policy)


@pytest.fixture
def rules(plan):
    return StubRules(plan.names, dns_sets(plan), plan.private_names,
                     own=(ipaddress.ip_network("10.213.0.0/16"),), ttl_floor=30, ttl_ceiling=3600)


def answer(qname, qtype, *records, rcode=dns.rcode.NOERROR):
    query = dns.message.make_query(qname, qtype)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for owner, ttl, rtype, values in records:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, *values))
    return response


def test_glob_semantics_decide_which_names_are_asked(rules):
    assert [g.pattern for g in rules.grants_for("api.example.test")] == ["api.example.test"] * 2
    assert rules.grants_for("x.cdn.example.test")
    assert not rules.grants_for("a.b.cdn.example.test")  # `*` is exactly one label
    assert not rules.grants_for("example.test") and not rules.grants_for("evil.test")


def test_admitted_addresses_go_to_the_sets_of_the_named_ports(rules):
    response = answer("api.example.test", "A", ("api.example.test.", 120, "A", ["198.51.100.1", "198.51.100.2"]))
    out = rules.filter_response("api.example.test", response)
    assert sorted(out.admitted) == ["198.51.100.1", "198.51.100.2"]
    assert set(out.additions) == {Addition(s, a, 120) for s in ("dns4_443", "dns4_8443")
                                  for a in ("198.51.100.1", "198.51.100.2")}
    assert not out.refused and out.response.rcode() == dns.rcode.NOERROR


def test_cname_chain_is_followed_and_strays_are_dropped(rules):
    response = answer("api.example.test", "A",
                      ("api.example.test.", 60, "CNAME", ["edge.provider.test."]),
                      ("edge.provider.test.", 20, "A", ["203.0.113.9"]),
                      ("unrelated.test.", 60, "A", ["203.0.113.66"]))
    response.additional.append(dns.rrset.from_text("ns.test.", 60, "IN", "A", "203.0.113.77"))
    out = rules.filter_response("api.example.test", response)
    assert out.admitted == ["203.0.113.9"]
    assert {a.timeout for a in out.additions} == {30}  # TTL 20 raised to the floor
    names = {r.name.to_text() for r in out.response.answer}
    assert names == {"api.example.test.", "edge.provider.test."} and not out.response.additional


def test_rebinding_answers_are_stripped_or_refused(rules):
    mixed = answer("api.example.test", "A", ("api.example.test.", 60, "A", ["127.0.0.1", "198.51.100.1"]))
    out = rules.filter_response("api.example.test", mixed)
    assert out.admitted == ["198.51.100.1"] and out.refused[0][0] == "127.0.0.1"
    assert [r.address for r in out.response.answer[0]] == ["198.51.100.1"]
    only_bad = answer("api.example.test", "AAAA", ("api.example.test.", 60, "AAAA", ["::ffff:169.254.169.254"]))
    out = rules.filter_response("api.example.test", only_bad)
    assert not out.additions and out.response.rcode() == dns.rcode.REFUSED and not out.response.answer
    own = answer("api.example.test", "A", ("api.example.test.", 60, "A", ["10.213.0.1"]))
    assert "own address" in rules.filter_response("api.example.test", own).refused[0][1]


def test_private_answers_only_for_opted_in_names(rules):
    private = ("10.20.30.40",)
    out = rules.filter_response("db.example.test", answer("db.example.test", "A", ("db.example.test.", 60, "A", private)))
    assert out.admitted == ["10.20.30.40"] and out.additions == [Addition("dns4_5432", "10.20.30.40", 60)]
    out = rules.filter_response("api.example.test", answer("api.example.test", "A", ("api.example.test.", 60, "A", private)))
    assert not out.admitted and "private" in out.refused[0][1]


def test_mapped_answers_admit_the_ipv4_and_ttls_are_capped(rules):
    response = answer("x.cdn.example.test", "AAAA", ("x.cdn.example.test.", 86400, "AAAA", ["::ffff:198.51.100.9", "2001:db8::9"]))
    out = rules.filter_response("x.cdn.example.test", response)
    assert set(out.additions) == {Addition("dns4_1_65535", "198.51.100.9", 3600),
                                  Addition("dns6_1_65535", "2001:db8::9", 3600)}
    assert out.response.answer[0].ttl == 3600


def test_negative_answers_pass_without_admitting(rules):
    out = rules.filter_response("api.example.test", answer("api.example.test", "A", rcode=dns.rcode.NXDOMAIN))
    assert out.response.rcode() == dns.rcode.NXDOMAIN and not out.additions


def test_upstreams_parse():
    assert parse_upstreams(["198.51.100.53", "198.51.100.54:5353", "2001:db8::53", "[2001:db8::54]:54"]) == (
        ("198.51.100.53", 53), ("198.51.100.54", 5353), ("2001:db8::53", 53), ("2001:db8::54", 54))
    with pytest.raises(ValueError):
        parse_upstreams(["resolver.example"])


def test_ruleset_rejects_tcp_with_reset_cuts_own_addresses_out_and_has_a_set_per_port_range(plan):
    ruleset = nft_ruleset(plan, guard=(ipaddress.ip_network("10.213.0.0/16"),), log_group=53)
    text = repr(ruleset)
    assert "'tcp reset'" in text and "'group': 53" in text
    sets = {c["set"]["name"]: c["set"] for c in ruleset["nftables"] if "set" in c}
    wide = load_text("name: n\nversion: '1'\npermissions:\n  tcp:\n    allowlist: ['*:443']\n").policy
    allow4 = next(c["set"] for c in nft_ruleset(compile_network(wide), guard=(ipaddress.ip_network("10.213.0.0/16"),))
                  ["nftables"] if "set" in c and c["set"]["name"] == "allow4")
    covered = [ipaddress.ip_network(f"{e['concat'][0]['prefix']['addr']}/{e['concat'][0]['prefix']['len']}")
               if isinstance(e["concat"][0], dict) else ipaddress.ip_network(e["concat"][0]) for e in allow4["elem"]]
    assert sum(n.num_addresses for n in covered) == 2 ** 32 - 2 ** 16 - 1  # all but the pool and the resolver
    for own in ("10.213.0.1", "10.213.255.254", "169.254.53.53"):
        assert not any(ipaddress.ip_address(own) in n for n in covered)
    assert {"dns4_443", "dns6_443", "dns4_8443", "dns4_5432", "dns4_1_65535"} <= set(sets)
    assert sets["dns4_443"]["flags"] == ["timeout"] and sets["allow4"]["flags"] == ["interval"]


def test_event_gate_passes_a_burst_then_a_rate_and_counts_the_rest():
    gate = EventGate(rate=10, burst=5)
    passed = sum(gate.allow(100.0) for _ in range(20))
    assert passed == 5 and gate.suppressed_total == 15
    assert gate.allow(100.2) and gate.take_suppressed() == 15 and gate.take_suppressed() == 0


def test_missing_rule_names_what_the_manifest_has(plan):
    assert "granted only by 198.51.100.7:22 (port 22)" in missing_rule(plan, "tcp", "198.51.100.7", 80)
    assert missing_rule(plan, "tcp", "203.0.113.1", 443) == "no tcp/http rule grants 203.0.113.1:443"
    assert "grant TCP only" in missing_rule(plan, "udp", "198.51.100.7", 22)
    via_dns = missing_rule(plan, "tcp", "198.51.100.1", 22, {"198.51.100.1": [("api.example.test", (443, 443))]})
    assert "api.example.test via DNS (port 443)" in via_dns
    assert "agent's own addresses" in missing_rule(plan, "tcp", "10.213.0.1", 22, own=True)


def _ipv4_tcp(dst: str, port: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                         socket.inet_aton("10.213.0.2"), socket.inet_aton(dst))
    return header + struct.pack("!HHIIHHHH", 40000, port, 0, 0, 0x5002, 0, 0, 0)


def test_nflog_messages_are_parsed():
    assert parse_payload(_ipv4_tcp("203.0.113.5", 8081)) == ("tcp", "203.0.113.5", 8081)
    v6 = struct.pack("!IHBB16s16s", 0x60000000, 8, 17, 64, socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                     socket.inet_pton(socket.AF_INET6, "2001:db8::10")) + struct.pack("!HHHH", 5000, 9999, 8, 0)
    assert parse_payload(v6) == ("udp", "2001:db8::10", 9999)

    def attr(kind, data):
        size = 4 + len(data)
        return struct.pack("=HH", size, kind) + data + b"\0" * ((4 - size % 4) % 4)

    body = struct.pack("=BBH", 2, 0, socket.htons(53)) + attr(10, b"skillguard-own\0") + attr(9, _ipv4_tcp("10.213.0.1", 22))
    message = struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body
    (packet,) = list(parse_messages(message + message[:10]))  # a torn tail is ignored
    assert (packet.prefix, packet.protocol, packet.destination, packet.port) == ("skillguard-own", "tcp", "10.213.0.1", 22)


# -- the stub's socket loop, on loopback --------------------------------------


def _fake_upstream(stop: threading.Event):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    seen = []

    def serve():
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(data)
            seen.append(query.question[0].name.to_text())
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "A",
                                                       "198.51.100.1", "127.0.0.1"))
            sock.sendto(response.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, seen


def _serve_until(stub, done, limit=200):
    readers = stub.readers()
    for _ in range(limit):
        if done():
            return
        ready, _, _ = select.select(list(readers), [], [], 0.05)
        for fd in ready:
            readers[fd](fd, select.POLLIN)


def test_stub_answers_filters_admits_before_replying_and_refuses(rules):
    stop = threading.Event()
    upstream, seen = _fake_upstream(stop)
    admitted, refusals, order = [], [], []
    try:
        stub = DnsStub(rules, "127.0.0.1", "lo", (upstream.getsockname(),),
                       admit=lambda adds: (admitted.extend(adds), order.append("admit")),
                       refuse=lambda op, rule: refusals.append((op, rule)), port=0)
    except PermissionError:
        require(False, "SO_BINDTODEVICE needs CAP_NET_RAW (run as root)")
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(3)
        query = dns.message.make_query("api.example.test", "A")
        client.sendto(query.to_wire(), stub.udp.getsockname())
        box = []

        def got():
            try:
                box.append(client.recv(4096))
                order.append("reply")
            except BlockingIOError:
                return False
            return True

        client.setblocking(False)
        _serve_until(stub, lambda: box or got())
        reply = dns.message.from_wire(box[0])
        assert reply.id == query.id  # the upstream saw another id; the client gets its own back
        assert [r.address for r in reply.answer[0]] == ["198.51.100.1"]
        assert order == ["admit", "reply"]
        assert {a.address for a in admitted} == {"198.51.100.1"}
        assert any("127.0.0.1" in op for op, _ in refusals)

        refused_query = dns.message.make_query("evil.test", "A")
        client.sendto(refused_query.to_wire(), stub.udp.getsockname())
        box.clear()
        _serve_until(stub, lambda: box or got())
        assert dns.message.from_wire(box[0]).rcode() == dns.rcode.REFUSED
        assert seen == ["api.example.test."]  # the refused name never left
        assert ("dns query evil.test A", "no tcp/http rule names evil.test; the agent's resolver refuses it") in refusals

        tcp = socket.create_connection(stub.tcp.getsockname(), timeout=3)
        wire = dns.message.make_query("x.cdn.example.test", "A").to_wire()
        tcp.sendall(struct.pack("!H", len(wire)) + wire)
        tcp.setblocking(False)
        chunks = []

        def tcp_got():
            try:
                data = tcp.recv(4096)
            except BlockingIOError:
                return False
            chunks.append(data)
            return True

        _serve_until(stub, lambda: chunks or tcp_got())
        tcp.close()
        assert dns.message.from_wire(chunks[0][2:]).answer[0][0].address == "198.51.100.1"
    finally:
        stop.set()
        stub.close()
        upstream.close()
