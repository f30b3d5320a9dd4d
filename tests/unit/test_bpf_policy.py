"""Pure parts of the attach path: Policy -> BPF map entries, key packing,
event decoding, nft text, fs rule checks, the fs.on_violation field."""
from __future__ import annotations

import ipaddress
import struct

import pytest

from agent.compile.bpf_policy import (KEY_PATH_LEN, O_CREAT, O_DIRECTORY, O_PATH, O_RDWR, O_WRONLY,
                                      SKILL_DNS, SKILL_ENFORCE, SKILL_FS_KILL, SKILL_FS_OBSERVE,
                                      compile_bpf_policy, literal_prefix, needed_rights, trie_strings)
from agent.compile.landlock import LandlockArtifact, PathRule
from agent.manifest import load_text

ARTIFACT = LandlockArtifact(
    abi=7, handled_fs=(), handled_net=(), connect_ports=(), scopes=(), notes=(),
    path_rules=(PathRule("/usr", ("execute", "read_file", "read_dir"), "base"),
                PathRule("/etc/passwd", ("read_file",), "base"),
                PathRule("/srv/data", ("read_file", "read_dir"), "manifest:/srv/data:ro")))


def policy(body: str, mode: str = "enforce"):
    result = load_text(f'name: t\nversion: "1"\nmode: {mode}\n{body}', "t.yaml")
    assert result.ok, result.errors
    return result.policy


def compiled(body: str, **kw):
    return compile_bpf_policy(policy(body, kw.pop("mode", "enforce")), landlock=ARTIFACT, **kw)


def test_covering_prefixes_lend_their_ports_to_narrower_ones():
    bp = compiled('permissions:\n  tcp:\n    allowlist: ["198.51.100.0/24:80", "198.51.100.7:8080", '
                  '"203.0.113.0/24:443", "[2001:db8::/32]:443", "[2001:db8::1]:22"]\n')
    by_net = {str(e.network): e for e in bp.net4 + bp.net6}
    assert by_net["198.51.100.0/24"].ports == (80,)
    assert by_net["198.51.100.7/32"].ports == (80, 8080)
    assert by_net["203.0.113.0/24"].ports == (443,)
    assert by_net["2001:db8::1/128"].ports == (22, 443)
    assert len({e.net_id for e in bp.net4}) == 3
    assert not any(e.any_port for e in bp.net4 + bp.net6)


def test_any_port_and_star_host():
    bp = compiled('permissions:\n  tcp:\n    allowlist: ["*:*", "10.0.0.1:22"]\n')
    nets = {str(e.network): e for e in bp.net4 + bp.net6}
    assert nets["0.0.0.0/0"].any_port and nets["::/0"].any_port
    assert nets["10.0.0.1/32"].any_port  # covered by *:*


def test_flags_follow_mode_names_and_on_violation():
    assert compiled("").flags == SKILL_ENFORCE | SKILL_FS_OBSERVE
    named = compiled('permissions:\n  tcp:\n    allowlist: ["api.example.com:443"]\n')
    assert named.flags & SKILL_DNS and named.names == ("api.example.com",)
    assert not named.net4
    kill = compiled("permissions:\n  fs:\n    dirs: [/srv/data:ro]\n    on_violation: kill\n")
    assert kill.flags & SKILL_FS_KILL
    audit = compiled("permissions:\n  fs:\n    dirs: [/srv/data:ro]\n    on_violation: kill\n", mode="audit")
    assert not audit.flags & SKILL_ENFORCE and audit.notes
    assert compiled("", observe_fs=False).flags == SKILL_ENFORCE


def test_trie_strings_cover_a_directory_and_its_contents():
    assert trie_strings("/srv/data") == (b"/srv/data/", b"/srv/data\0")
    assert trie_strings("/srv/data/") == (b"/srv/data/", b"/srv/data\0")
    assert trie_strings("/") == (b"/",)
    long = "/" + "a" * 400
    (entry,) = trie_strings(long)
    assert len(entry) == KEY_PATH_LEN - 1 and long.encode().startswith(entry)
    assert literal_prefix("/data/*/src") == "/data"
    assert literal_prefix("/**") == "/"


def test_fs_prefixes_and_rules():
    bp = compiled('permissions:\n  fs:\n    dirs: ["/srv/data:ro", "/opt/*/cache:rw"]\n')
    assert b"/usr/" in bp.fs_prefixes and b"/etc/passwd\0" in bp.fs_prefixes
    assert b"/opt/" in bp.fs_prefixes  # the glob's literal prefix
    rules = bp.fs_rules
    assert rules.allows("/usr/bin/python3", ["execute"])
    assert rules.allows("/etc/passwd", ["read_file"])
    assert not rules.allows("/etc/passwd/x", ["read_file"])  # a file rule covers only itself
    assert not rules.allows("/etc/shadow", ["read_file"])
    assert rules.allows("/srv/data/a/b", ["read_file"])
    assert not rules.allows("/srv/data/a", ["write_file"])
    assert not rules.allows("/srv/database", ["read_file"])
    assert rules.allows("/opt/x/cache/f", ["write_file"])
    assert not rules.allows("/opt/x/y/cache/f", ["write_file"])


@pytest.mark.parametrize("flags,is_exec,is_dir,needs", [
    (0, False, False, ("read_file",)),
    (O_WRONLY, False, False, ("write_file",)),
    (O_RDWR, False, False, ("read_file", "write_file")),
    (O_CREAT | O_WRONLY, False, False, ("write_file",)),
    (O_DIRECTORY, False, True, ("read_dir",)),
    (0, False, True, ("read_dir",)),
    (O_PATH, False, False, ()),
    (0, True, False, ("execute",)),
])
def test_needed_rights(flags, is_exec, is_dir, needs):
    assert needed_rights(flags, is_exec, is_dir) == needs


def test_map_keys_match_the_c_layout():
    from agent.enforce.bpf_maps import MAP_SIZES, lpm_key, path_key, port_key, resolver_key

    key = lpm_key(0x1122334455667788, ipaddress.ip_network("198.51.100.0/24"))
    assert len(key) == MAP_SIZES["allow4"][0]
    assert struct.unpack_from("<IQ", key) == (64 + 24, 0x1122334455667788)
    assert key[12:] == bytes([198, 51, 100, 0])
    assert len(lpm_key(1, ipaddress.ip_network("2001:db8::/32"))) == MAP_SIZES["allow6"][0]
    pk = path_key(5, b"/usr/")
    assert len(pk) == MAP_SIZES["fs_prefixes"][0] and struct.unpack_from("<I", pk)[0] == 64 + 40
    assert len(port_key(1, 2, 443)) == MAP_SIZES["ports"][0]
    assert resolver_key("198.51.100.53")[:8] == struct.pack("<I", 4) + bytes([198, 51, 100, 53])


def test_path_key_carries_the_fs_policy_id_and_reads_back():
    from agent.enforce.bpf_maps import path_entry, path_key

    key = path_key(7, b"/etc/passwd\0")
    assert struct.unpack_from("<IQ", key) == (64 + 8 * 12, 7)
    assert path_entry(key) == (7, b"/etc/passwd\0")


def test_skills_with_the_same_fs_rules_share_one_prefix_set():
    from agent.enforce.bpf_maps import PrefixSets

    a, b = (compile_bpf_policy(load_text(f'name: {n}\nversion: "1"\n', "t.yaml").policy)
            for n in ("one", "two"))
    assert a.fs_prefixes and a.fs_prefixes == b.fs_prefixes  # other skill, same rules: same strings
    sets = PrefixSets()
    assert sets.lookup(a.fs_prefixes) == 0
    first = sets.new_id()
    sets.add(first, a.fs_prefixes, users=1)
    assert sets.lookup(b.fs_prefixes) == first
    sets.acquire(first)
    other = compiled('permissions:\n  fs:\n    dirs: ["/opt/*/cache:rw"]\n')
    assert sets.lookup(other.fs_prefixes) == 0 and sets.new_id() == first + 1
    assert sets.release(first) is None  # one user left: keep the entries
    assert sets.release(first) == frozenset(a.fs_prefixes)  # the last: delete them
    assert sets.lookup(a.fs_prefixes) == 0 and sets.new_id() == first  # the id is free again
    assert sets.release(first) is None  # unknown ids are ignored


def test_decode_event():
    from agent.enforce.bpf_maps import EVENT, EV_NET, EV_OPEN, decode_event

    addr = bytes([0] * 10 + [0xFF, 0xFF, 203, 0, 113, 10])
    raw = EVENT.pack(EV_NET, 0, 77, 10, 9, 6, 6, 8080, addr, 0, 1, b"") + b"\0" * 4
    ev = decode_event(raw)
    assert (ev.decision, ev.pid, ev.address, ev.port) == ("denied", 9, "::ffff:203.0.113.10", 8080)
    raw = EVENT.pack(EV_OPEN, 2, 77, 10, 9, 0, 0, 12, b"\0" * 16, -100, 0, b"/etc/shadow\0junk")
    ev = decode_event(raw)
    assert (ev.decision, ev.path, ev.dfd) == ("killed", "/etc/shadow", -100)


def test_nft_commands_for_a_skill():
    from agent.attach.nft_cgroup import skill_commands, table_commands

    bp = compiled('permissions:\n  tcp:\n    allowlist: ["198.51.100.7:8080", "[2001:db8::/32]:*", '
                  '"www.example.test:443"]\n')
    path = "unified/skillguard/t/i"
    text = skill_commands("sg", path, bp.flags, bp.net4, bp.net6).splitlines()
    # one address and one port: a hash set; prefixes and any port: an interval set
    assert text[0] == 'add element inet sg allow4x { "unified/skillguard/t/i" . 198.51.100.7 . 8080 }'
    assert text[1] == 'add element inet sg allow6 { "unified/skillguard/t/i" . 2001:db8::/32 . 1-65535 }'
    assert text[2] == 'add element inet sg dns { "unified/skillguard/t/i" }'
    assert text[-1] == 'add element inet sg members { "unified/skillguard/t/i" }'  # membership last
    gone = skill_commands("sg", path, bp.flags, bp.net4, bp.net6, delete=True).splitlines()
    assert gone[0] == 'delete element inet sg members { "unified/skillguard/t/i" }'  # and first out
    assert gone[1] == 'delete element inet sg allow4x { "unified/skillguard/t/i" . 198.51.100.7 . 8080 }'
    # nftables 1.0.6 deletes from concatenated interval sets only in explicit range form
    assert gone[2] == ('delete element inet sg allow6 { "unified/skillguard/t/i" . '
                       '2001:db8::-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff . 1-65535 }')
    audit = compiled("", mode="audit")
    assert 'add element inet sg audit { "p" }' in skill_commands("sg", "p", audit.flags, (), ())
    table = table_commands("sg", 3, ["198.51.100.53", "2001:db8::53"])
    assert "add rule inet sg output socket cgroupv2 level 3 @members goto confined" in table
    assert "add rule inet sg confined meta l4proto tcp socket cgroupv2 level 3 . ip daddr . tcp dport " \
           "@allow4x accept" in table
    assert "ip daddr { 198.51.100.53 } udp dport 53 accept" in table
    assert "ip6 daddr { 2001:db8::53 } tcp dport 53 accept" in table
    assert table.splitlines()[-1].endswith("reject with icmpx admin-prohibited")


def test_nft_hash_set_changes_and_their_netlink_batch():
    import ipaddress
    import struct

    from agent.attach.nft_cgroup import hash_changes, ranged_grants
    from agent.attach.nft_netlink import (NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, batch, grant_key,
                                          parse_acks)

    bp = compiled('permissions:\n  tcp:\n    allowlist: ["198.51.100.7:8080", "[2001:db8::/32]:*", '
                  '"www.example.test:443"]\n')
    added = hash_changes(77, bp.flags, bp.net4, bp.net6)
    assert [(op, name) for op, name, keys in added if keys] == [
        (NFT_MSG_NEWSETELEM, "allow4x"), (NFT_MSG_NEWSETELEM, "allow6"), (NFT_MSG_NEWSETELEM, "dns"),
        (NFT_MSG_NEWSETELEM, "members")]
    start, end = added[3][2][0]  # allow6: the prefix and every port, as first and last key
    assert start == struct.pack(">Q", 77) + ipaddress.ip_address("2001:db8::").packed + b"\0\x01\0\0"
    assert end == struct.pack(">Q", 77) + ipaddress.ip_address("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
                                                               ).packed + b"\xff\xff\0\0"
    assert added[0][2] == [struct.pack("=Q", 77) + bytes([198, 51, 100, 7]) + b"\x1f\x90\0\0"]
    assert grant_key(1, ipaddress.ip_address("2001:db8::1"), 53)[8:] == \
        ipaddress.ip_address("2001:db8::1").packed + b"\0\x35\0\0"
    removed = hash_changes(77, bp.flags, bp.net4, bp.net6, delete=True)
    assert removed[0] == (NFT_MSG_DELSETELEM, "members", [struct.pack("=Q", 77)])  # membership first out
    # Nested prefixes: the compiler gives the narrower one the wider one's ports;
    # the kernel refuses overlapping interval elements, so covered ones are left out.
    nested = compiled('permissions:\n  tcp:\n    allowlist: ["10.0.0.0/8:443", "10.1.0.0/16:80", '
                      '"10.2.0.0/16:*", "10.0.0.0/8:*"]\n')
    assert ranged_grants(nested.net4) == [(ipaddress.ip_network("10.0.0.0/8"), 1, 65535)]
    nested = compiled('permissions:\n  tcp:\n    allowlist: ["10.0.0.0/8:443", "10.1.0.0/16:80"]\n')
    assert sorted(ranged_grants(nested.net4)) == [(ipaddress.ip_network("10.0.0.0/8"), 443, 443),
                                                   (ipaddress.ip_network("10.1.0.0/16"), 80, 80)]
    data, acked = batch(added, "sg", 10)
    assert acked == [11, 12, 13, 14, 15, 16, 17]  # begin is 10, end 18
    # Walk the nlmsghdrs: begin, one NEWSETELEM per change, end.
    kinds, offset = [], 0
    while offset < len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        kinds.append(kind)
        offset += (length + 3) & ~3
    assert kinds == [0x10] + [(10 << 8) | NFT_MSG_NEWSETELEM] * 7 + [0x11]
    ack = struct.pack("=IHHII", 36, 2, 0, 12, 0) + struct.pack("=i", -17) + b"\0" * 16
    assert parse_acks(ack) == {12: -17}


def test_on_violation_field():
    assert policy("").fs.on_violation == "report"
    assert policy("permissions:\n  fs:\n    on_violation: kill\n").fs.on_violation == "kill"
    bad = load_text('name: t\nversion: "1"\npermissions:\n  fs:\n    on_violation: explode\n', "b.yaml")
    assert not bad.ok
    assert any(p.field == "permissions.fs.on_violation" and "report or kill" in p.message for p in bad.errors)
