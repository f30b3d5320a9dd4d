"""Registry journal: appended, checksummed, compacted; corrupt lines and files detected and set aside."""
import json
import os

import pytest

from agent.daemon.registry import (Registry, RegistryError, decode_entry, decode_record, encode_entry,
                                   encode_record, process_start_time, read_records, same_process)
from agent.daemon.skills import Skill


def test_roundtrip(tmp_path):
    reg = Registry(str(tmp_path))
    record = {"id": "r-1", "kind": "registered", "name": "demo", "pids": [1, 2]}
    reg.save("r-1", record)
    reg.save("r-2", {"id": "r-2"})
    reg.save("r-1", dict(record, pids=[1]))  # a later put replaces the record
    reg.remove("r-2")
    reg.close()
    again = Registry(str(tmp_path))
    report = again.load_all()
    assert report.records == [dict(record, pids=[1])] and report.corrupt == []
    assert read_records(str(tmp_path)) == report.records
    assert oct(os.stat(again.directory).st_mode & 0o777) == "0o700"
    assert oct(os.stat(again.journal).st_mode & 0o777) == "0o600"
    # Loading compacts: one line per live record.
    assert open(again.journal, "rb").read().count(b"\n") == 1


def test_checksum_detects_a_change():
    data = encode_record({"id": "x", "a": 1})
    assert decode_record(data) == {"id": "x", "a": 1}
    tampered = data.replace(b'"a":1', b'"a":2')
    assert tampered != data
    with pytest.raises(RegistryError, match="checksum"):
        decode_record(tampered)
    with pytest.raises(RegistryError, match="torn or corrupt"):
        decode_record(data[: len(data) // 2])
    line = encode_entry("put", {"id": "x", "a": 1})
    assert decode_entry(line) == ("put", {"id": "x", "a": 1})
    with pytest.raises(RegistryError, match="checksum"):
        decode_entry(line.replace(b'"a":1', b'"a":2'))
    with pytest.raises(RegistryError, match="checksum"):
        decode_entry(line.replace(b'"op":"put"', b'"op":"delete"'))  # the op is covered too
    with pytest.raises(RegistryError, match="bad record id"):
        decode_entry(encode_entry("put", {"id": "../x"}))


def test_torn_and_corrupt_journal_lines_are_reported_and_set_aside(tmp_path):
    reg = Registry(str(tmp_path))
    reg.save("good", {"id": "good"})
    reg.save("edited", {"id": "edited", "pids": [1]})
    reg.save("later", {"id": "later"})
    reg.close()
    data = open(reg.journal, "rb").read().replace(b'"pids":[1]', b'"pids":[1,2]')
    torn = encode_entry("put", {"id": "torn", "x": "y" * 100})
    open(reg.journal, "wb").write(data + torn[: len(torn) // 2])
    again = Registry(str(tmp_path))
    report = again.load_all()
    assert [r["id"] for r in report.records] == ["good", "later"]
    problems = {name: why for name, why, _moved in report.corrupt}
    assert set(problems) == {"journal line 2", "journal line 4"}
    assert "checksum" in problems["journal line 2"] and "torn" in problems["journal line 4"]
    moved = report.corrupt[0][2]
    assert moved and open(moved, "rb").read().count(b"\n") == 1  # both bad lines kept for a look
    # Set aside and not read again; new lines after a torn tail are read.
    again.save("new", {"id": "new"})
    again.close()
    third = Registry(str(tmp_path)).load_all()
    assert [r["id"] for r in third.records] == ["good", "later", "new"] and third.corrupt == []


def test_files_of_an_older_daemon_move_into_the_journal(tmp_path):
    reg = Registry(str(tmp_path))

    def legacy(skill_id, record):
        open(reg.path(skill_id), "wb").write(encode_record(record))

    legacy("good", {"id": "good"})
    legacy("torn", {"id": "torn", "x": "y" * 100})
    path = reg.path("torn")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    legacy("edited", {"id": "edited", "pids": [1]})
    document = json.loads(open(reg.path("edited")).read())
    document["record"]["pids"] = [1, 2]
    open(reg.path("edited"), "w").write(json.dumps(document))
    legacy("renamed", {"id": "other"})
    open(os.path.join(reg.directory, "half.json.tmp-99"), "w").write("{")
    report = reg.load_all()
    assert [r["id"] for r in report.records] == ["good"]
    problems = {name: why for name, why, _moved in report.corrupt}
    assert set(problems) == {"torn.json", "edited.json", "renamed.json"}
    assert "checksum" in problems["edited.json"]
    assert "does not match" in problems["renamed.json"]
    assert all(moved and os.path.exists(moved) for _n, _w, moved in report.corrupt)
    # Moved into the journal, set aside, not read again; the unfinished temporary file is gone.
    assert not os.path.exists(reg.path("good"))
    reg.close()
    again = Registry(str(tmp_path))
    assert [r["id"] for r in again.load_all().records] == ["good"]
    assert again.load_all().corrupt == []
    assert not any(".tmp-" in n for n in os.listdir(reg.directory))


def test_the_journal_is_compacted_as_it_goes(tmp_path):
    from agent.daemon import registry

    reg = Registry(str(tmp_path))
    reg.save("keep", {"id": "keep"})
    for i in range(registry.COMPACT_SLACK + 10):
        reg.save(f"r-{i}", {"id": f"r-{i}"})
        reg.remove(f"r-{i}")
    assert reg._lines <= 2 * len(reg._live) + registry.COMPACT_SLACK
    reg.remove("never-saved")  # unknown ids cost nothing
    reg.close()
    assert [r["id"] for r in Registry(str(tmp_path)).load_all().records] == ["keep"]


def test_bad_ids_are_refused(tmp_path):
    reg = Registry(str(tmp_path))
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(RegistryError):
            reg.path(bad)


def test_start_time_tells_processes_apart():
    me = process_start_time(os.getpid())
    assert isinstance(me, int) and same_process(os.getpid(), me)
    assert not same_process(os.getpid(), me + 1)
    assert not same_process(os.getpid(), None)


def test_skill_record_roundtrip():
    skill = Skill(id="l-1", kind="launched", name="demo", manifest_text="name: demo\n", source="inline",
                  supervisor_pid=5, supervisor_start=77, pid=6, argv=("/bin/true",),
                  cgroup_paths=("/sys/fs/cgroup/unified/skillguard/demo/run-5",), cgroup_id=9)
    again = Skill.from_record(skill.to_record())
    assert again.to_record() == skill.to_record()
    reg = Skill(id="r-1", kind="registered", name="demo", manifest_text="", source="inline",
                pids=(3, 4), layers={"network": "active"}, required=("network",), tree=True)
    assert Skill.from_record(reg.to_record()).to_record() == reg.to_record()
