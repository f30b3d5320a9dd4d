import pytest

from agent.compile.env import compile_env, refusal
from agent.manifest import load_text, units


@pytest.mark.parametrize("text,value", [
    (1024, 1024), ("512M", 512 << 20), ("512MiB", 512 << 20), ("1.5G", int(1.5 * (1 << 30))),
    ("200MB", 200_000_000), ("64k", 65536),
])
def test_sizes(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1M", 0, True, "12 parsecs"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        units.parse_size(text)


@pytest.mark.parametrize("text,value", [(2, 2.0), ("50%", 0.5), ("500m", 0.5), ("0.25", 0.25)])
def test_cpu(text, value):
    assert units.parse_cpu(text) == value


@pytest.mark.parametrize("text,value", [(0, 0), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25)])
def test_durations(text, value):
    assert units.parse_duration(text) == value


@pytest.mark.parametrize("text", ["5 minutes", "s", "1x", "-1s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        units.parse_duration(text)


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "NODE_OPTIONS",
                                  "PERL5LIB", "RUBYLIB", "GLIBC_TUNABLES", "BASH_ENV", "PATH", "HOME", "1BAD"])
def test_env_refusals(name):
    assert refusal(name)


def test_env_is_safe_set_plus_pass_only():
    policy = load_text("name: s\nversion: '1'\nenv:\n  pass: [API_TOKEN]\n").policy
    caller = {"LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp", "API_TOKEN": "t", "SECRET": "x",
              "LANG": "C.UTF-8", "LC_ALL": "C", "PATH": "/tmp/evil:/usr/bin", "HOME": "/root"}
    art = compile_env(policy, caller, home="/var/lib/skillguard/state/s", user="sg-s")
    env = art.as_dict()
    assert "LD_PRELOAD" not in env and "PYTHONPATH" not in env and "SECRET" not in env
    assert env["API_TOKEN"] == "t" and env["LANG"] == "C.UTF-8" and env["LC_ALL"] == "C"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["HOME"] == "/var/lib/skillguard/state/s"
    assert set(art.refused) == {"LD_PRELOAD", "PYTHONPATH"}
    assert compile_env(policy, caller, home="h", user="u") == art.__class__(
        env=tuple(sorted({**env, "HOME": "h", "USER": "u", "LOGNAME": "u"}.items())), refused=art.refused)


def _warnings(text):
    result = load_text("name: a\nversion: '1'\n" + text)
    assert result.ok, result.errors
    return [(w.field, w.message) for w in result.warnings]


@pytest.mark.parametrize("text,field", [
    ("permissions:\n  fs:\n    dirs: ['/*/data:ro']\n", "permissions.fs.dirs[0]"),
    ("permissions:\n  fs:\n    dirs: ['/opt:rw']\n", "permissions.fs.dirs[0]"),
    ("permissions:\n  fs:\n    dirs: ['/usr/local/lib:rw']\n", "permissions.fs.dirs[0]"),
    ("permissions:\n  fs:\n    dirs: ['/home:ro']\n", "permissions.fs.dirs[0]"),
    ("permissions:\n  shell:\n    allowlist: ['sh **']\n    allowed_dirs: [/w]\n", "permissions.shell.allowlist[0]"),
    ("permissions:\n  shell:\n    allowlist: ['python3 **']\n    allowed_dirs: [/w]\n", "permissions.shell.allowlist[0]"),
    ("permissions:\n  shell:\n    allowlist: ['/usr/bin/env git']\n    allowed_dirs: [/w]\n", "permissions.shell.allowlist[0]"),
    ("permissions:\n  tcp:\n    allowlist: ['*:*']\n", "permissions.tcp.allowlist[0]"),
    ("permissions:\n  tcp:\n    allowlist: ['169.254.169.254:80']\n", "permissions.tcp.allowlist[0]"),
    ("permissions:\n  http:\n    allowlist: ['https://a.example/v1/**']\n", "permissions.http.allowlist[0]"),
])
def test_risky_grants_warn(text, field):
    assert field in [f for f, _ in _warnings(text)]


def test_plain_grants_do_not_warn():
    assert _warnings("permissions:\n  fs:\n    dirs: ['/data/project:rw']\n  tcp:\n    allowlist: ['10.0.0.*:5432']\n"
                     "  shell:\n    allowlist: ['git **']\n    allowed_dirs: [/data/project]\n") == []


def test_warning_points_at_the_line():
    result = load_text("name: a\nversion: '1'\npermissions:\n  tcp:\n    allowlist:\n      - '*:*'\n")
    assert (result.warnings[0].pos.line, result.warnings[0].pos.column) == (6, 9)


@pytest.mark.parametrize("grant", ["/:ro", "/**:ro", "/etc:ro", "/etc/*:ro", "/var/lib/*:rw",
                                   "/var/lib/skillguard/state:rw", "/run/skillguard:ro"])
def test_grants_reaching_agent_private_paths_are_errors(grant):
    result = load_text(f"name: a\nversion: '1'\npermissions:\n  fs:\n    dirs: ['{grant}']\n")
    assert [(e.field, e.pos.line) for e in result.errors] == [("permissions.fs.dirs[0]", 5)]
    assert "no skill may access" in result.errors[0].message
