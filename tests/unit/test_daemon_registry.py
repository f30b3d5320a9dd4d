"""Registry records: atomic, checksummed, corrupt files detected and set aside."""
import json
import os

import pytest

from agent.daemon.registry import (Registry, RegistryError, decode_record, encode_record,
                                   process_start_time, same_process)
from agent.daemon.skills import Skill


def test_roundtrip(tmp_path):
    reg = Registry(str(tmp_path))
    record = {"id": "r-1", "kind": "registered", "name": "demo", "pids": [1, 2]}
    reg.save("r-1", record)
    report = reg.load_all()
    assert report.records == [record] and report.corrupt == []
    assert oct(os.stat(reg.directory).st_mode & 0o777) == "0o700"
    assert oct(os.stat(reg.path("r-1")).st_mode & 0o777) == "0o600"


def test_checksum_detects_a_change():
    data = encode_record({"id": "x", "a": 1})
    assert decode_record(data) == {"id": "x", "a": 1}
    tampered = data.replace(b'"a":1', b'"a":2')
    assert tampered != data
    with pytest.raises(RegistryError, match="checksum"):
        decode_record(tampered)
    with pytest.raises(RegistryError, match="torn or corrupt"):
        decode_record(data[: len(data) // 2])


def test_corrupt_and_torn_files_are_reported_and_moved_aside(tmp_path):
    reg = Registry(str(tmp_path))
    reg.save("good", {"id": "good"})
    reg.save("torn", {"id": "torn", "x": "y" * 100})
    path = reg.path("torn")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    reg.save("edited", {"id": "edited", "pids": [1]})
    document = json.loads(open(reg.path("edited")).read())
    document["record"]["pids"] = [1, 2]
    open(reg.path("edited"), "w").write(json.dumps(document))
    reg.save("renamed", {"id": "other"})
    open(os.path.join(reg.directory, "half.json.tmp-99"), "w").write("{")
    report = reg.load_all()
    assert [r["id"] for r in report.records] == ["good"]
    problems = {name: why for name, why, _moved in report.corrupt}
    assert set(problems) == {"torn.json", "edited.json", "renamed.json"}
    assert "checksum" in problems["edited.json"]
    assert "does not match" in problems["renamed.json"]
    assert all(moved and os.path.exists(moved) for _n, _w, moved in report.corrupt)
    # Set aside and not read again; the unfinished temporary file is gone.
    assert [r["id"] for r in reg.load_all().records] == ["good"]
    assert reg.load_all().corrupt == []
    assert not any(".tmp-" in n for n in os.listdir(reg.directory))


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
