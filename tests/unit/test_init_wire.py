"""The init's plan message (agent/launch/init_wire.py), as pure logic.

`decode()` below reads a message back following the layout documented in
init_wire and read by skillguard-init.c `read_plan()`: every number a
little-endian u64, a string its size including the final NUL then its
bytes, bytes their size then themselves, a list its count then its items.
The kernel suite (tests/kernel/test_skill_init.py) checks the C side.
"""
import struct

import pytest

from agent.launch import init_wire
from agent.launch.init_wire import (FLAG_LANDLOCK, FLAG_NETWORK, FLAG_STDIO, PINNED_EXEC_FD,
                                    encode, sorted_binds)

NONE = (1 << 64) - 1  # an fd index of -1, as a u64


class Reader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def bytes(self) -> bytes:
        size = self.u64()
        value = self.data[self.offset:self.offset + size]
        assert len(value) == size, "truncated"
        self.offset += size
        return value

    def str(self) -> str:
        raw = self.bytes()
        assert raw.endswith(b"\0") and b"\0" not in raw[:-1], raw
        return raw[:-1].decode("utf-8", "surrogateescape")

    def strs(self) -> list:
        return [self.str() for _ in range(self.u64())]


def decode(message: bytes) -> dict:
    r = Reader(message)
    out = {"format": r.u64(), "flags": r.u64(), "executable": r.str(), "argv": r.strs(),
           "env": r.strs(), "cwd": r.str(), "hostname": r.str(), "uid": r.u64(),
           "gid": r.u64(), "tmp_size": r.u64(), "resolv_source": r.str(),
           "resolv_target": r.str()}
    out["binds"] = [(r.str(), r.u64(), r.str(), r.u64()) for _ in range(r.u64())]
    out["rlimits"] = [(r.u64(), r.u64(), r.u64()) for _ in range(r.u64())]
    if out["flags"] & FLAG_LANDLOCK:
        out["landlock"] = {key: r.u64() for key in ("abi", "fs", "net", "scoped")}
        out["landlock"]["rules"] = [(r.str(), r.u64(), r.str(), r.str()) for _ in range(r.u64())]
        out["landlock"]["ports"] = [r.u64() for _ in range(r.u64())]
    out["seccomp_bpf"] = r.bytes()
    out["exec_fd"] = r.u64()
    assert r.offset == len(message), f"{len(message) - r.offset} bytes past the end"
    return out


def make_plan(*, landlock=True, network=False, resolv=False) -> dict:
    """The keys encode() reads, as Supervisor.prepare and _send_plan leave them."""
    mounts = {"tmp_size": 64 << 20, "resolv_conf": "/var/lib/sg/resolv.conf" if resolv else None}
    if resolv:
        mounts["resolv_target"] = "/run/systemd/resolve/stub-resolv.conf"
    return {
        "executable": "/usr/bin/python3", "argv": ["python3", "-c", "pass"],
        "cwd": "/home/skill", "hostname": "skill-host", "uid": 61000, "gid": 61000,
        "mounts": mounts,
        "rlimits": [(7, 1024, 1024), (1, (1 << 64) - 1, (1 << 64) - 1)],
        "landlock": {
            "abi": 7, "fs": 0x7FFF, "net": 2, "scoped": 3,
            "rules": [("/usr", 0x0D, "base profile"), (PINNED_EXEC_FD, 0x01, "entrypoint"),
                      ("/work", 0x1FFF, "fs.dirs /work:rw")],
            "names": {0x0D: ("execute", "read_file", "read_dir"), 0x1FFF: "all"},
            "ports": [443, 53],
        } if landlock else None,
        "seccomp_bpf": bytes(range(16)),
        "wait_for_network": network,
    }


BINDS = [("/work", True, "fs.dirs /work:rw", None), ("/work/ref", False, "fs.dirs /work/ref", 0)]
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def test_every_field_reads_back_in_order():
    message = encode(make_plan(resolv=True), BINDS, ENV, 1, False)
    assert decode(message) == {
        "format": init_wire.FORMAT, "flags": FLAG_LANDLOCK,
        "executable": "/usr/bin/python3", "argv": ["python3", "-c", "pass"],
        "env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "cwd": "/home/skill",
        "hostname": "skill-host", "uid": 61000, "gid": 61000, "tmp_size": 64 << 20,
        "resolv_source": "/var/lib/sg/resolv.conf",
        "resolv_target": "/run/systemd/resolve/stub-resolv.conf",
        "binds": [("/work", 1, "fs.dirs /work:rw", NONE), ("/work/ref", 0, "fs.dirs /work/ref", 0)],
        "rlimits": [(7, 1024, 1024), (1, (1 << 64) - 1, (1 << 64) - 1)],
        "landlock": {"abi": 7, "fs": 0x7FFF, "net": 2, "scoped": 3,
                     "rules": [("/usr", 0x0D, "base profile", "execute,read_file,read_dir"),
                               ("", 0x01, "entrypoint", "0x1"),
                               ("/work", 0x1FFF, "fs.dirs /work:rw", "all")],
                     "ports": [443, 53]},
        "seccomp_bpf": bytes(range(16)), "exec_fd": 1,
    }


def test_format_is_read_from_the_module_global(monkeypatch):
    # tests/kernel/test_skill_init.py patches it to send a plan of another format.
    monkeypatch.setattr(init_wire, "FORMAT", 99)
    assert struct.unpack_from("<Q", encode(make_plan(), [], {}, None, False))[0] == 99


def test_fd_indexes_none_become_minus_one():
    message = decode(encode(make_plan(), [("/a", False, "o", None), ("/b", True, "o", 2)],
                            {}, None, False))
    assert [bind[3] for bind in message["binds"]] == [NONE, 2]
    assert message["exec_fd"] == NONE
    assert struct.unpack("<q", struct.pack("<Q", NONE)) == (-1,)  # what the C's int64_t reads


def test_a_negative_fd_index_is_sent_as_its_twos_complement():
    # -2 - N: the Nth user namespace skillguard-init made (supervisor._binds).
    message = decode(encode(make_plan(), [("/a", False, "o", -2), ("/b", False, "o", -3)],
                            {}, None, False))
    assert [bind[3] for bind in message["binds"]] == [(1 << 64) - 2, (1 << 64) - 3]


def test_the_exec_fd_index_is_the_last_u64():
    message = encode(make_plan(), [], {}, 5, False)
    assert struct.unpack_from("<Q", message, len(message) - 8)[0] == 5


def test_pinned_entrypoint_rule_is_sent_as_the_empty_string():
    rules = decode(encode(make_plan(), [], {}, 0, False))["landlock"]["rules"]
    assert [path for path, *_ in rules] == ["/usr", "", "/work"]
    # The raw bytes: size 1, then only the NUL.
    message = encode(make_plan(), [], {}, 0, False)
    assert struct.pack("<Q", 1) + b"\0" + struct.pack("<Q", 0x01) in message


def test_no_resolv_target_sends_two_empty_strings():
    message = decode(encode(make_plan(resolv=False), [], {}, None, False))
    assert (message["resolv_source"], message["resolv_target"]) == ("", "")


def test_no_tmp_size_is_zero():
    plan = make_plan()
    plan["mounts"]["tmp_size"] = None
    assert decode(encode(plan, [], {}, None, False))["tmp_size"] == 0


@pytest.mark.parametrize("stdio, network, landlock, flags", [
    (False, False, False, 0),
    (True, False, False, FLAG_STDIO),
    (False, True, False, FLAG_NETWORK),
    (False, False, True, FLAG_LANDLOCK),
    (True, True, True, FLAG_STDIO | FLAG_NETWORK | FLAG_LANDLOCK),
])
def test_flags_follow_the_inputs(stdio, network, landlock, flags):
    message = decode(encode(make_plan(landlock=landlock, network=network), [], {}, None, stdio))
    assert message["flags"] == flags
    assert ("landlock" in message) == landlock  # no Landlock section without the flag


def test_flags_are_distinct_bits():
    assert sorted((FLAG_STDIO, FLAG_NETWORK, FLAG_LANDLOCK)) == [1, 2, 4]


def _with_nul(where: str):
    plan, binds, env = make_plan(), list(BINDS), dict(ENV)
    if where == "executable":
        plan["executable"] = "/bin/s\0h"
    elif where == "argv":
        plan["argv"] = ["sh", "-c", "echo\0rm -rf /"]
    elif where == "env value":
        env["LANG"] = "C\0LD_PRELOAD=/x.so"
    elif where == "env name":
        env["A\0B"] = "x"
    elif where == "cwd":
        plan["cwd"] = "/home\0/x"
    elif where == "hostname":
        plan["hostname"] = "host\0"
    elif where == "bind path":
        binds[1] = ("/work/r\0ef", False, "o", None)
    elif where == "bind origin":
        binds[0] = ("/work", True, "fs.dirs\0", None)
    elif where == "landlock rule path":
        plan["landlock"]["rules"].append(("/etc\0/shadow", 1, "o"))
    elif where == "resolv target":
        plan["mounts"]["resolv_conf"] = "/r"
        plan["mounts"]["resolv_target"] = "/etc/resolv.conf\0"
    return plan, binds, env


@pytest.mark.parametrize("where", ["executable", "argv", "env value", "env name", "cwd",
                                   "hostname", "bind path", "bind origin",
                                   "landlock rule path", "resolv target"])
def test_a_nul_inside_a_string_is_refused(where):
    plan, binds, env = _with_nul(where)
    with pytest.raises(ValueError, match="NUL byte"):
        encode(plan, binds, env, None, False)


def test_the_same_inputs_without_a_nul_encode():
    # The control for the refusals above.
    plan, binds, env = make_plan(), list(BINDS), dict(ENV)
    assert decode(encode(plan, binds, env, None, False))["format"] == init_wire.FORMAT


def test_a_path_that_is_not_utf8_is_sent_as_its_bytes():
    path = b"/work/caf\xe9".decode("utf-8", "surrogateescape")
    message = encode(make_plan(), [(path, False, "o", None)], {}, None, False)
    assert struct.pack("<Q", len(b"/work/caf\xe9\0")) + b"/work/caf\xe9\0" in message


def test_sorted_binds_puts_outer_paths_first():
    binds = [("/srv/data/a/b", True, "o1", None), ("/srv", False, "o2", 0),
             ("/srv/data", True, "o3", None), ("/opt/x", False, "o4", 1), ("/a", False, "o5", None)]
    ordered = sorted_binds(binds)
    assert [path for path, *_ in ordered] == ["/a", "/srv", "/opt/x", "/srv/data", "/srv/data/a/b"]
    assert sorted(ordered) == sorted(binds)  # nothing lost or changed
    for outer, inner in [("/srv", "/srv/data"), ("/srv/data", "/srv/data/a/b")]:
        paths = [path for path, *_ in ordered]
        assert paths.index(outer) < paths.index(inner)
