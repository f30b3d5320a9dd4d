"""The command's short path for `run` (agent/fastrun.py): which forms it
takes, which it leaves to argparse; and the constants the launcher's lean
modules repeat instead of importing the compilers."""
import pytest

from agent.fastrun import _parse_run


@pytest.mark.parametrize("argv, expected", [
    (["run", "--manifest", "m.yaml", "--", "/bin/true"], ("m.yaml", None, False, False, ["/bin/true"])),
    (["run", "--manifest=m.yaml", "--events", "e", "--audit", "--local", "ls", "-l"],
     ("m.yaml", "e", True, True, ["ls", "-l"])),
    (["run", "--manifest", "m.yaml"], ("m.yaml", None, False, False, [])),
    (["run", "--manifest", "m.yaml", "--", "--audit"], ("m.yaml", None, False, False, ["--audit"])),
])
def test_simple_run_forms_are_taken(argv, expected):
    assert _parse_run(argv) == expected


@pytest.mark.parametrize("argv", [
    [], ["validate", "m.yaml"], ["run"], ["run", "--package", "p.skill"],
    ["run", "--manifest", "m.yaml", "--state-root", "/x"], ["run", "--manifest", "m.yaml", "--cwd", "/"],
    ["run", "--manifest", "m.yaml", "--config", "c.yaml"], ["run", "--manifest"], ["run", "-h"],
    ["run", "--events", "e", "--", "true"],
])
def test_everything_else_goes_to_argparse(argv):
    assert _parse_run(argv) is None


def test_lean_constants_match_the_compilers():
    from agent.compile import bpf
    from agent.compile.landlock import NET_BITS
    from agent.enforce import landlock_sys
    from agent.launch import notify

    assert notify.AUDIT_ARCH_X86_64 == bpf.AUDIT_ARCH_X86_64
    assert landlock_sys.ACCESS_NET_CONNECT_TCP == NET_BITS["connect_tcp"]


def test_env_filter_is_the_compilers():
    from agent.compile.env import filter_env

    art = filter_env({"HOME": "/h", "PATH": "/bin"}, {"WANTED"},
                     {"LANG": "C", "WANTED": "1", "OTHER": "x", "LD_PRELOAD": "/evil.so", "HOME": "/root"})
    assert dict(art.env) == {"HOME": "/h", "PATH": "/bin", "LANG": "C", "WANTED": "1"}
    assert art.refused == ("LD_PRELOAD",)
