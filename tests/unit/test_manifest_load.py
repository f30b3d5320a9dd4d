"""Manifest loading: the examples load, every broken manifest fails exactly where it says."""
import ipaddress
from pathlib import Path

import pytest

from agent.manifest import load_manifest, load_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "policies" / "examples").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "data" / "bad").glob("*.yaml"))


def expectations(path: Path) -> list[tuple[str, str]]:
    """`# expect: LINE:COL FIELD` lines at the top of a broken manifest."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            where, field = line.split(":", 1)[1].split()
            out.append((where, field))
    return out


def test_there_are_examples_and_bad_manifests():
    assert len(EXAMPLES) >= 4 and len(BAD) >= 20


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    result = load_manifest(path)
    assert result.ok, result.format(result.errors, "error")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_manifest_fails_at_the_right_place(path):
    result = load_manifest(path)
    assert result.policy is None
    got = sorted((f"{p.pos.line}:{p.pos.column}", p.field or "(document)") for p in result.errors)
    assert got == sorted(expectations(path)), "\n".join(result.format(result.errors, "error"))
    for line in result.format(result.errors, "error"):
        assert line.startswith(f"{path}:"), line


def test_reference_manifest_loads_unchanged():
    policy = load_manifest(ROOT / "policies/examples/repo-tools.yaml").policy
    assert [(d.pattern, d.access) for d in policy.fs.dirs] == [
        ("/data/project", "rw"), ("/config", "ro"), ("/data/projects/*/src", "rw")]
    assert [(r.host.name, r.port) for r in policy.http.allowlist] == [
        ("api.example.com", 443), ("*.internal.company.com", 443)]
    tcp = policy.tcp.allowlist
    assert (tcp[0].host.name, tcp[0].port) == ("redis", 6379)
    assert tcp[2].host.networks == (ipaddress.ip_network("10.0.0.0/24"),) and tcp[2].port is None
    assert [c.words for c in policy.shell.allowlist] == [("git", "**"), ("go", "build", "**")]
    assert policy.shell.allowed_dirs == ("/data/project",)
    assert policy.invoke.can_invoke == ("fs-skill",)
    assert policy.network_granted


def test_absent_or_disabled_blocks_grant_nothing():
    policy = load_text("name: a\nversion: '1'\n").policy
    assert not policy.fs.grants and not policy.tcp.grants and not policy.http.grants
    assert not policy.shell.grants and not policy.network_granted
    disabled = load_text("name: a\nversion: '1'\npermissions:\n  tcp:\n    enabled: false\n"
                         "    allowlist: ['10.0.0.1:80']\n")
    assert disabled.ok and not disabled.policy.network_granted
    assert any("grant nothing" in w.message for w in disabled.warnings)


def test_all_problems_reported_at_once():
    text = ("name: X\nversion: 1.0.0\nbogus: 1\npermissions:\n  fs:\n    dirs: ['rel:rw', '/a:zz']\n"
            "  tcp:\n    allowlist: ['h:99999']\n")
    result = load_text(text, "m.yaml")
    fields = {p.field for p in result.errors}
    assert fields == {"name", "bogus", "permissions.fs.dirs[0]", "permissions.fs.dirs[1]",
                      "permissions.tcp.allowlist[0]"}


def test_unknown_key_suggests_the_right_one():
    result = load_text("name: a\nversion: '1'\npermissions:\n  tcp:\n    alowlist: ['a:1']\n")
    assert "did you mean 'allowlist'" in result.errors[0].message


def test_url_defaults_and_ipv6_and_mapped_addresses():
    text = ("name: a\nversion: '1'\npermissions:\n  http:\n    allowlist: ['http://a.example', "
            "'https://[2001:db8::1]:8443/x/**']\n  tcp:\n    allowlist: ['[::ffff:192.0.2.7]:22', '*:443']\n")
    policy = load_text(text).policy
    first, second = policy.http.allowlist
    assert (first.port, first.path) == (80, "/**")
    assert second.host.networks == (ipaddress.ip_network("2001:db8::1/128"),) and second.port == 8443
    mapped, anyhost = policy.tcp.allowlist
    assert mapped.host.networks == (ipaddress.ip_network("192.0.2.7/32"),)
    assert {str(n) for n in anyhost.host.networks} == {"0.0.0.0/0", "::/0"}


def test_version_written_as_number_keeps_its_text():
    assert load_text("name: a\nversion: 1.10\n").policy.version == "1.10"


def test_yaml_booleans_are_not_strings():
    result = load_text("name: a\nversion: '1'\nmode: on\n")
    assert "got boolean" in result.errors[0].message


def test_resources_units():
    policy = load_text("name: a\nversion: '1'\nresources:\n  memory: 1.5GiB\n  cpu: 250m\n"
                       "  pids: 10\n  timeout: 1h30m\n").policy
    r = policy.resources
    assert (r.memory_bytes, r.cpu, r.pids, r.timeout_s) == (int(1.5 * 2**30), 0.25, 10, 5400.0)


def test_entrypoint_string_or_list():
    a = load_text("name: a\nversion: '1'\nentrypoint: /usr/bin/python3 -m x\n").policy
    b = load_text("name: a\nversion: '1'\nentrypoint: [/usr/bin/python3, -m, x]\n").policy
    assert a.entrypoint == b.entrypoint == ("/usr/bin/python3", "-m", "x")


def test_unreadable_and_oversized_files(tmp_path):
    assert "cannot read" in load_manifest(tmp_path / "missing.yaml").errors[0].message
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1 << 20) + b"\n")
    assert "larger than 1 MiB" in load_manifest(big).errors[0].message


def test_argument_checked_syscalls_cannot_be_allowed_outright():
    result = load_text("name: a\nversion: '1'\nsyscalls:\n  allow: [clone3, socket, getppid]\n")
    assert [(e.field, e.pos.column) for e in result.errors] == [("syscalls.allow[0]", 11),
                                                                  ("syscalls.allow[1]", 19)]
