import ipaddress

import pytest

from agent.manifest import glob


@pytest.mark.parametrize("pattern,path,hit", [
    ("/data/*/src", "/data/a/src", True),
    ("/data/*/src", "/data/a/b/src", False),
    ("/data/**", "/data", True),
    ("/data/**", "/data/a/b/c", True),
    ("/data/**/src", "/data/src", True),
    ("/data/**/src", "/data/x/y/src", True),
    ("/data/**/src", "/data/x/y/srcs", False),
    ("/data", "/database", False),
    ("/data/project", "/data/project/", True),
])
def test_paths(pattern, path, hit):
    assert glob.match_path(pattern, path) is hit


@pytest.mark.parametrize("pattern,host,hit", [
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("**.example.com", "a.b.example.com", True),
    ("**.example.com", "example.com", True),
    ("api.example.com", "API.Example.COM.", True),
    ("*.example.com", "evil-example.com", False),
])
def test_hosts(pattern, host, hit):
    assert glob.match_host(pattern, host) is hit


@pytest.mark.parametrize("pattern,argv,hit", [
    ("git **", ["git"], True),
    ("git **", ["git", "log", "-1"], True),
    ("go build **", ["go", "build", "./..."], True),
    ("go build **", ["go", "run", "x"], False),
    ("git *", ["git", "status", "-s"], False),
    ("git * -s", ["git", "status", "-s"], True),
])
def test_commands(pattern, argv, hit):
    assert glob.match_command(pattern.split(), argv) is hit


def test_names_glob_within_the_name():
    assert glob.match_name("assistant-*", "assistant-1")
    assert glob.match_name("*", "anything")
    assert not glob.match_name("fs-skill", "fs-skill2")


@pytest.mark.parametrize("text,net", [
    ("10.0.0.*", "10.0.0.0/24"), ("10.*.*.*", "10.0.0.0/8"), ("*", "0.0.0.0/0"),
    ("192.168.*.*", "192.168.0.0/16"), ("*.*.*.*", "0.0.0.0/0"),
])
def test_ipv4_wildcards(text, net):
    assert glob.ipv4_wildcard(text) == ipaddress.ip_network(net)


@pytest.mark.parametrize("text", ["10.*.0.1", "300.0.0.*"])
def test_bad_ipv4_wildcards(text):
    with pytest.raises(ValueError):
        glob.ipv4_wildcard(text)


def test_not_a_wildcard():
    assert glob.ipv4_wildcard("10.0.0.1") is None
    assert glob.ipv4_wildcard("*.example.com") is None


def test_partial_segments_rejected():
    assert glob.check_segments(["data", "proj*"], "path component")
    assert glob.check_segments(["data", "*", "**"], "path component") is None
