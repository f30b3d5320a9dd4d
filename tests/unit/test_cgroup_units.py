"""Pure parts of agent.enforce.cgroup: value conversions and name safety."""
from __future__ import annotations

import pytest

from agent.compile.rlimits import Limits
from agent.enforce.cgroup import (
    LimitValues, cpu_quota_us, parse_flat_keyed, safe_name, v1_limit_files, v2_limit_files,
)

MiB = 1 << 20


@pytest.mark.parametrize("cpu, quota", [(0.5, 50_000), (0.25, 25_000), (1.0, 100_000),
                                        (2.5, 250_000), (0.001, 1_000), (0.0001, 1_000)])
def test_cpu_quota_per_100ms_period_with_kernel_minimum(cpu, quota):
    assert cpu_quota_us(cpu) == quota


def test_v2_files():
    limits = Limits(memory_bytes=64 * MiB, cpu=0.5, pids=16)
    assert v2_limit_files(limits, "memory") == [("memory.max", str(64 * MiB)),
                                                ("memory.swap.max", "0")]
    assert v2_limit_files(limits, "cpu") == [("cpu.max", "50000 100000")]
    assert v2_limit_files(limits, "pids") == [("pids.max", "16")]


def test_v1_files_keep_kernel_ordering_constraints():
    limits = Limits(memory_bytes=64 * MiB, cpu=0.5, pids=16)
    # memsw must not go below memory: memory first; period before quota.
    assert v1_limit_files(limits, "memory") == [("memory.limit_in_bytes", str(64 * MiB)),
                                                ("memory.memsw.limit_in_bytes", str(64 * MiB))]
    assert v1_limit_files(limits, "cpu") == [("cpu.cfs_period_us", "100000"),
                                             ("cpu.cfs_quota_us", "50000")]
    assert v1_limit_files(limits, "pids") == [("pids.max", "16")]


def test_unrequested_limit_writes_nothing():
    limits = Limits(memory_bytes=None, cpu=None, pids=None)
    for ctrl in ("memory", "cpu", "pids"):
        assert not limits.requested(ctrl)
        assert v1_limit_files(limits, ctrl) == []
        assert v2_limit_files(limits, ctrl) == []


@pytest.mark.parametrize("field, value", [("memory_bytes", 0), ("cpu", 0.0), ("pids", -1)])
def test_non_positive_limits_are_rejected(field, value):
    kwargs = {"memory_bytes": MiB, "cpu": 1.0, "pids": 8, field: value}
    with pytest.raises(ValueError, match=field):
        Limits(**kwargs)


def test_safe_name_keeps_plain_names():
    assert safe_name("web-search_v2.1") == "web-search_v2.1"
    assert safe_name("42") == "42"


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "a b", "../../etc", "x" * 100, ".hidden"])
def test_safe_name_is_one_plain_path_component(name):
    out = safe_name(name)
    assert out and "/" not in out and not out.startswith(".")
    assert len(out) <= 64 + 11
    assert safe_name(name) == out  # deterministic


def test_safe_name_keeps_distinct_names_distinct():
    assert len({safe_name(n) for n in ["a/b", "a_b", "a b", "a:b"]}) == 4


def test_parse_flat_keyed():
    text = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"
    assert parse_flat_keyed(text) == {"low": 0, "high": 0, "max": 12, "oom": 1,
                                      "oom_kill": 1, "oom_group_kill": 0}
    assert parse_flat_keyed("") == {}


def test_plain_limit_values_write_the_same_files_as_compiled_limits():
    compiled = Limits(memory_bytes=64 * MiB, cpu=0.5, pids=32)
    plain = LimitValues(64 * MiB, 0.5, 32)
    for controller in ("memory", "cpu", "pids"):
        assert v1_limit_files(plain, controller) == v1_limit_files(compiled, controller)
        assert v2_limit_files(plain, controller) == v2_limit_files(compiled, controller)
    assert not LimitValues(pids=3).requested("memory")


def test_a_cgroup_being_removed_has_no_members(monkeypatch):
    # Reading cgroup.procs of a cgroup that rmdir is tearing down fails with
    # ENODEV (kernfs deactivated it) before the file is gone (ENOENT).
    import errno

    from agent.enforce import cgroup

    for err in (errno.ENODEV, errno.ENOENT):
        def failing(path, err=err):
            raise OSError(err, "gone")
        monkeypatch.setattr(cgroup, "_read", failing)
        assert cgroup._read_pids("/sys/fs/cgroup/x/cgroup.procs") == []

    def denied(path):
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(cgroup, "_read", denied)
    with pytest.raises(OSError):
        cgroup._read_pids("/sys/fs/cgroup/x/cgroup.procs")
