"""SkillCgroup.create_neutral / apply_limits / the @spare sweep, on the real
kernel: what a spare of the daemon's launch zygote makes before its launch."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.enforce.cgroup import (LIMITED_CONTROLLERS, NEUTRAL_GROUP, CgroupError, LimitValues,
                                  SkillCgroup, remove_stale_instances, safe_name)
from agent.enforce.cgroupfs import cgroup_mounts
from conftest import require


@pytest.fixture
def neutral():
    require(os.geteuid() == 0, "cgroup tests need root")
    mounts = cgroup_mounts()
    require(mounts.v2 is not None or bool(mounts.v1), "no cgroup hierarchy mounted")
    made = []

    def make(instance):
        cgroup = SkillCgroup.create_neutral(instance, mounts)
        made.append(cgroup)
        return cgroup

    yield mounts, make
    for cgroup in made:
        cgroup.remove()


def test_a_neutral_cgroup_has_every_hierarchy_and_no_limit_until_applied(neutral):
    mounts, make = neutral
    cgroup = make(f"test-neutral-{os.getpid()}")
    assert all(Path(p).parent.name == NEUTRAL_GROUP for p in [cgroup.v2, *cgroup.v1.values()] if p)
    v1_limited = [c for c in LIMITED_CONTROLLERS if c in mounts.v1]
    assert all(c in cgroup.v1 for c in v1_limited), cgroup
    if "pids" in cgroup.v1:
        assert (Path(cgroup.v1["pids"]) / "pids.max").read_text().strip() == "max"
    cgroup.apply_limits(LimitValues(memory_bytes=64 << 20, cpu=None, pids=17))
    assert cgroup.limits_applied()["cpu"] == "not requested"
    assert cgroup.limits_applied()["pids"] in ("v1", "v2")
    pids_dir = cgroup.v1.get("pids") or cgroup.v2
    assert (Path(pids_dir) / "pids.max").read_text().strip() == "17"
    if "memory" in cgroup.v1:
        assert int((Path(cgroup.v1["memory"]) / "memory.limit_in_bytes").read_text()) == 64 << 20
    paths = [cgroup.v2, *cgroup.v1.values()]
    cgroup.remove()
    assert not any(p and os.path.exists(p) for p in paths)


def test_a_refused_limit_raises_naming_the_controller(neutral):
    mounts, make = neutral
    require("memory" in mounts.v1, "v1 memory hierarchy (v2 memory.max takes any value)")
    cgroup = make(f"test-neutral-busy-{os.getpid()}")
    # A process already charged there: v1 refuses a limit below its usage (EBUSY).
    proc = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {cgroup.v1['memory']}/cgroup.procs; "
                                             "exec python3 -c 'import time; b = bytearray(8 << 20); "
                                             "print(1, flush=True); time.sleep(30)'"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"1"
        with pytest.raises(CgroupError) as info:
            cgroup.apply_limits(LimitValues(memory_bytes=1 << 20))
        assert info.value.controller == "memory"
    finally:
        proc.kill()
        proc.wait()


def test_stale_neutral_cgroups_of_dead_pids_are_swept(neutral):
    mounts, make = neutral
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    stale = make(f"run-{dead.pid}")
    alive = make(f"run-{os.getpid()}")
    removed = remove_stale_instances(None, "run-", mounts, group=NEUTRAL_GROUP)
    assert stale.v2 in removed or any(p in removed for p in stale.v1.values())
    assert not any(os.path.exists(p) for p in [stale.v2, *stale.v1.values()] if p)
    assert all(os.path.exists(p) for p in [alive.v2, *alive.v1.values()] if p)
    # No skill's directory can be the neutral group's.
    assert safe_name(NEUTRAL_GROUP) != NEUTRAL_GROUP
