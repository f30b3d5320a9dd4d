"""The pure parts of registering several skills at once: one nftables
transaction made of the batches of several skills (join_batches), one
journal write for several records (Registry.save_many)."""
from __future__ import annotations

import pytest

from agent.attach.nft_cgroup import hash_changes
from agent.attach.nft_netlink import (_MARKER, _NLMSGHDR, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, BatchTemplate,
                                      batch, join_batches)
from agent.compile.bpf_policy import compile_bpf_policy
from agent.daemon.registry import Registry, RegistryError, read_records
from agent.manifest import load_text


def _template(grants: str) -> BatchTemplate:
    text = f'name: t\nversion: "1"\npermissions:\n  tcp:\n    allowlist: {grants}\n'
    bp = compile_bpf_policy(load_text(text, "t.yaml").policy)
    return BatchTemplate(lambda cg: [c for c in hash_changes(cg, bp.flags, bp.net4, bp.net6) if c[2]],
                         "skillguard_cg")


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, whole message) of every netlink message in `data`."""
    out, offset = [], 0
    while offset < len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        out.append((kind, seq, data[offset:offset + length]))
        offset += (length + 3) & ~3
    return out


def test_joined_batches_hold_every_message_in_order_under_one_begin_and_end():
    one, two = _template('["198.51.100.7:8080"]'), _template('["10.0.0.0/8:443", "[2001:db8::/32]:*"]')
    a, _ = one.fill(11, 100)
    b, _ = two.fill(22, 200)
    joined = join_batches([a, b], 7, 300)
    messages = _messages(joined)
    assert [m[0] for m in (messages[0], messages[-1])] == [NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END]
    assert (messages[0][1], messages[-1][1]) == (7, 300)
    inner = [m[2] for m in messages[1:-1]]
    assert inner == [m[2] for m in _messages(a)[1:-1]] + [m[2] for m in _messages(b)[1:-1]]
    assert sum(1 for m in messages if m[0] in (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END)) == 2
    # One skill joined alone is that skill's batch with new begin and end.
    alone = join_batches([a], 100, 100 + len(one.seq_fields) - 1)
    assert alone == a
    assert len(joined) == len(a) + len(b) - 2 * _MARKER


def test_joining_refuses_what_is_not_a_batch():
    data, _ = batch([], "skillguard_cg", 1)
    with pytest.raises(ValueError):
        join_batches([data[_MARKER:]], 1, 2)


def _record(skill_id: str, **extra) -> dict:
    return {"id": skill_id, "kind": "registered", "name": "n", "manifest_text": "name: n\n", **extra}


def test_save_many_is_one_write_of_lines_that_load_one_by_one(tmp_path):
    registry = Registry(str(tmp_path))
    registry.save("r-0", _record("r-0"))
    registry.save_many([("r-1", _record("r-1", pids=[1])), ("r-2", _record("r-2", pids=[2]))])
    registry.remove("r-0")
    registry.close()
    assert [r["id"] for r in read_records(str(tmp_path))] == ["r-1", "r-2"]
    lines = (tmp_path / "registry" / "journal").read_bytes().splitlines()
    assert len(lines) == 4
    # A write cut short tears its last line only: the lines before it stand.
    (tmp_path / "registry" / "journal").write_bytes(b"\n".join(lines[:3])[:-5] + b"\n")
    report = Registry(str(tmp_path)).load_all()
    assert [r["id"] for r in report.records] == ["r-0", "r-1"]
    assert len(report.corrupt) == 1


def test_save_many_refuses_a_bad_record_before_writing_anything(tmp_path):
    registry = Registry(str(tmp_path))
    with pytest.raises(RegistryError):
        registry.save_many([("r-1", _record("r-1")), ("r-2", _record("r-3"))])
    registry.close()
    assert read_records(str(tmp_path)) == []
