"""DNS-answer admission (agent/net/admit.py) and the manifest side of network rules."""
import ipaddress

import pytest

from agent.manifest import load_text
from agent.net.admit import clamp_ttl, judge

OWN = (ipaddress.ip_network("10.213.0.0/16"), ipaddress.ip_network("192.0.2.2/32"))


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.1", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.1.1.1", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"), ("::127.0.0.1", "IPv4-compatible"),
    ("10.213.4.1", "own address"), ("192.0.2.2", "own address"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "private"), ("fd12:3456::1", "private"), ("fec0::1", "private"),
])
def test_never_admitted_without_opt_in(address, reason):
    verdict = judge(address, own=OWN)
    assert not verdict.admitted
    assert reason.split()[-1] in verdict.reason


@pytest.mark.parametrize("address", ["198.51.100.10", "203.0.113.7", "8.8.8.8", "2001:db8::10", "2606:4700::1"])
def test_public_answers_are_admitted(address):
    verdict = judge(address, own=OWN)
    assert verdict.admitted and verdict.reason == ""
    assert str(verdict.address) == address


def test_private_only_with_opt_in_and_metadata_never():
    assert judge("10.1.2.3", private_ok=True).admitted
    assert judge("fd12::1", private_ok=True).admitted
    # The EC2 IPv6 metadata address is ULA, but no opt-in reaches it; nor loopback or own.
    assert not judge("fd00:ec2::254", private_ok=True).admitted
    assert not judge("127.0.0.1", private_ok=True).admitted
    assert not judge("10.213.0.1", private_ok=True, own=OWN).admitted


def test_ipv4_mapped_is_judged_and_admitted_as_ipv4():
    assert "loopback" in judge("::ffff:127.0.0.1").reason
    assert "metadata" in judge("::ffff:169.254.169.254").reason
    assert "private" in judge("::ffff:10.0.0.1").reason
    verdict = judge("::ffff:198.51.100.7")
    assert verdict.admitted and verdict.address == ipaddress.IPv4Address("198.51.100.7")


def test_ttl_is_clamped():
    assert clamp_ttl(0, 30, 3600) == 30
    assert clamp_ttl(300, 30, 3600) == 300
    assert clamp_ttl(86400, 30, 3600) == 3600


# -- manifest: private_names, https_only, http paths ---------------------------------

HEAD = "name: n\nversion: '1'\npermissions:\n"


def test_private_names_parse_into_the_plan():
    from agent.compile.network import compile_network

    result = load_text(HEAD + "  tcp:\n    allowlist: ['redis:6379', '*.corp.example:443']\n"
                              "    private_names: [Redis, '*.corp.example']\n")
    assert result.ok, result.errors
    assert result.policy.tcp.private_names == ("redis", "*.corp.example")
    assert compile_network(result.policy).private_names == ("*.corp.example", "redis")
    assert not result.warnings


def test_private_names_refuse_ips_and_warn_when_they_match_no_rule():
    bad = load_text(HEAD + "  tcp:\n    allowlist: ['redis:6379']\n    private_names: ['10.0.0.1']\n")
    assert not bad.ok and "private_names lists DNS names" in bad.errors[0].message
    loose = load_text(HEAD + "  http:\n    allowlist: ['https://api.example.com/']\n"
                             "    private_names: [db.internal]\n")
    assert loose.ok
    assert any("matches no name rule" in w.message for w in loose.warnings)


def test_https_only_refuses_plain_http_and_paths_draw_a_warning():
    refused = load_text(HEAD + "  http:\n    https_only: true\n    allowlist: ['http://example.com/']\n")
    assert not refused.ok and "https_only" in refused.errors[0].message
    warned = load_text(HEAD + "  http:\n    allowlist: ['https://example.com/api/**']\n")
    assert warned.ok
    assert any("cannot be enforced in the kernel" in w.message for w in warned.warnings)
