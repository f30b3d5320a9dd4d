"""SkillCgroup against the real kernel: limits, membership, kill, removal.

Needs root and mounted cgroup hierarchies. Under CI=true a missing feature
fails the test; elsewhere it skips with the reason.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.compile.rlimits import Limits
from agent.enforce.cgroup import CgroupError, SkillCgroup
from agent.enforce.cgroupfs import cgroup_mounts
from conftest import require

MiB = 1 << 20
_counter = itertools.count()


@pytest.fixture(scope="module")
def mounts():
    require(os.geteuid() == 0, "cgroup tests need root")
    found = cgroup_mounts()
    require(found.v2 is not None or bool(found.v1), "no cgroup hierarchy mounted")
    return found


@pytest.fixture
def cgroups(mounts):
    """Factory for SkillCgroups and their child processes; everything is
    killed, reaped and removed afterwards even when the test fails."""
    made: list[SkillCgroup] = []
    procs: list[subprocess.Popen] = []

    class Factory:
        def create(self, limits: Limits, mounts_override=None, skill=None) -> SkillCgroup:
            skill = skill or f"sgtest-{os.getpid()}-{next(_counter)}"
            cg = SkillCgroup.create(skill, "1", limits, mounts=mounts_override or mounts)
            made.append(cg)
            return cg

        def spawn(self, cg: SkillCgroup, argv: list[str], **kw) -> subprocess.Popen:
            # As the launcher does: the forked child joins before exec.
            proc = subprocess.Popen(argv, preexec_fn=lambda: cg.add(os.getpid()), **kw)
            procs.append(proc)
            return proc

    yield Factory()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    for cg in made:
        cg.remove()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait_members(cg: SkillCgroup, count: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(cg.pids()) < count:
        assert time.monotonic() < deadline, f"only {cg.pids()} joined, expected {count}"
        time.sleep(0.01)
    return cg.pids()


def _is_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _read(path: Path) -> str:
    return path.read_text().strip()


def _limit_dir(cg: SkillCgroup, controller: str) -> tuple[str, Path]:
    where = cg.limits_applied()[controller]
    assert where in ("v1", "v2"), f"{controller}: {where}"
    return where, (cg.v2_path if where == "v2" else cg.v1_paths[controller])


def test_limits_are_written_and_read_back(cgroups):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=0.5, pids=32))

    where, path = _limit_dir(cg, "memory")
    if where == "v2":
        assert _read(path / "memory.max") == str(64 * MiB)
    else:
        assert _read(path / "memory.limit_in_bytes") == str(64 * MiB)
        if (path / "memory.memsw.limit_in_bytes").exists():
            assert _read(path / "memory.memsw.limit_in_bytes") == str(64 * MiB)

    where, path = _limit_dir(cg, "cpu")
    if where == "v2":
        assert _read(path / "cpu.max") == "50000 100000"
    else:
        assert _read(path / "cpu.cfs_quota_us") == "50000"
        assert _read(path / "cpu.cfs_period_us") == "100000"

    _, path = _limit_dir(cg, "pids")
    assert _read(path / "pids.max") == "32"


def test_layout_and_id(cgroups, mounts):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    for path in [cg.v2_path, *cg.v1_paths.values()]:
        if path is None:
            continue
        assert path.is_dir()
        assert path.name == "1"
        assert path.parent.parent.name == "skillguard"
    if mounts.v2 is not None:
        assert cg.v2_path.is_relative_to(mounts.v2)
        assert cg.id == os.stat(cg.v2_path).st_ino


def test_child_added_before_exec_is_a_member_of_every_hierarchy(cgroups, mounts):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    proc = cgroups.spawn(cg, ["sleep", "30"])
    assert _wait_members(cg, 1) == [proc.pid]

    # /proc/<pid>/cgroup: "id:controllers:path" per hierarchy (cgroups(7)).
    lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
    by_ctrl = {}
    for line in lines:
        _, ctrls, rel = line.split(":", 2)
        for ctrl in (ctrls.split(",") if ctrls else [""]):
            by_ctrl[ctrl] = rel
    for ctrl, path in cg.v1_paths.items():
        assert by_ctrl[ctrl] == "/" + str(path.relative_to(mounts.v1[ctrl]))
    if cg.v2_path is not None:
        assert by_ctrl[""] == "/" + str(cg.v2_path.relative_to(mounts.v2))


def test_add_moves_every_thread(cgroups):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    proc = subprocess.Popen(_python("""
        import threading, time, sys
        for _ in range(3):
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        print("ready", flush=True)
        time.sleep(30)
    """), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        cg.add(proc.pid)  # from outside, after the threads exist
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 4
        expected = {str(p) for p in [cg.v2_path, *cg.v1_paths.values()] if p is not None}
        for tid in tids:
            rels = {line.split(":", 2)[2] for line in
                    Path(f"/proc/{proc.pid}/task/{tid}/cgroup").read_text().splitlines()}
            for path in expected:
                assert any(path.endswith(rel) for rel in rels if rel != "/"), (tid, rels)
        assert cg.pids() == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_fork_bomb_stops_at_pids_limit(cgroups):
    limit = 16
    cg = cgroups.create(Limits(memory_bytes=256 * MiB, cpu=1.0, pids=limit))
    bomb = cgroups.spawn(cg, _python("""
        import os, time
        made = refused = 0
        end = time.monotonic() + 3
        while time.monotonic() < end and refused < 500:
            try:
                pid = os.fork()
            except BlockingIOError:  # EAGAIN from the pids controller
                refused += 1
                time.sleep(0.001)
                continue
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            made += 1
        print(made, refused, flush=True)
        time.sleep(60)
    """), stdout=subprocess.PIPE, text=True)

    # This process, outside the cgroup, stays responsive while the bomb runs.
    time.sleep(0.3)
    started = time.monotonic()
    subprocess.run(["true"], check=True, timeout=5)
    assert time.monotonic() - started < 2.0

    made, refused = map(int, bomb.stdout.readline().split())
    assert 1 <= made <= limit - 1  # the bomb itself holds one pid
    assert refused > 0
    assert cg.pids_events() >= refused
    assert len(cg.pids()) == made + 1
    cg.kill()
    assert cg.pids() == []


def test_memory_hog_is_oom_killed_at_limit(cgroups):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    assert cg.memory_events()["oom_kill"] == 0
    hog = cgroups.spawn(cg, _python("""
        chunks = []
        for _ in range(200):
            chunks.append(b"\\x01" * (1 << 20))  # written, so really resident
        print("survived", flush=True)
    """), stdout=subprocess.PIPE, text=True)
    out, _ = hog.communicate(timeout=60)
    assert hog.returncode == -signal.SIGKILL, (hog.returncode, out)
    assert "survived" not in out
    events = cg.memory_events()
    assert events["oom_kill"] >= 1, events
    assert events["oom"] >= 1, events
    if cg.limits_applied()["memory"] == "v2":
        assert events["max"] >= 1, events


def test_cpu_quota_throttles_a_busy_loop(cgroups):
    cg = cgroups.create(Limits(memory_bytes=256 * MiB, cpu=0.25, pids=32))
    require(cg.v2_path is not None, "no cgroup v2 cpu.stat to read CPU usage from")
    started = time.monotonic()
    busy = cgroups.spawn(cg, _python("""
        import time
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
    """))
    busy.wait(timeout=30)
    wall = time.monotonic() - started
    stat = cg.cpu_stat()
    used = stat["usage_usec"] / 1e6
    assert used > 0.05, stat  # it did run inside this cgroup
    assert used < 0.7 * wall, (used, wall, stat)
    assert stat["nr_throttled"] > 0, stat


def test_kill_reaches_a_double_forked_grandchild(cgroups):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    # `( sleep & )`: the subshell exits, so that sleep is orphaned and
    # re-parented away from us; only the cgroup still knows it.
    cgroups.spawn(cg, ["sh", "-c", "sleep 300 & (sleep 300 &); exec sleep 300"])
    members = _wait_members(cg, 3)
    cg.kill()
    assert cg.pids() == []
    time.sleep(0.05)
    assert all(_is_dead(pid) for pid in members), members


def test_kill_with_signals_fallback_under_freeze(cgroups):
    """The path for kernels without cgroup.kill: freeze, SIGKILL, thaw."""
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=64))
    cgroups.spawn(cg, _python("""
        import os, time
        while True:  # keeps forking short-lived children while being killed
            try:
                if os.fork() == 0:
                    time.sleep(0.05)
                    os._exit(0)
            except BlockingIOError:
                pass
            try:
                os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.005)
    """))
    _wait_members(cg, 2)
    cg._kill_with_signals()
    assert cg.pids() == []


def test_v1_only_host_uses_the_v1_freezer(cgroups, mounts):
    """A host without cgroup v2: limits and the kill freezer in v1."""
    for ctrl in ("memory", "pids", "cpu", "freezer"):
        require(ctrl in mounts.v1, f"no v1 {ctrl} hierarchy to test a v1-only layout with")
    v1_only = SimpleNamespace(v2=None, v1=dict(mounts.v1))
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32), mounts_override=v1_only)
    assert cg.v2_path is None and cg.id is None
    assert set(cg.v1_paths) == {"memory", "pids", "cpu", "freezer"}
    cgroups.spawn(cg, ["sh", "-c", "sleep 300 & (sleep 300 &); exec sleep 300"])
    members = _wait_members(cg, 3)
    cg.kill()
    assert cg.pids() == []
    assert _read(cg.v1_paths["freezer"] / "freezer.state") == "THAWED"
    time.sleep(0.05)
    assert all(_is_dead(pid) for pid in members), members


def test_remove_kills_members_and_leaves_no_directory(cgroups):
    cg = cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32))
    proc = cgroups.spawn(cg, ["sleep", "300"])
    _wait_members(cg, 1)
    dirs = [p for p in [cg.v2_path, *cg.v1_paths.values()] if p is not None]
    cg.remove()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    for path in dirs:
        assert not path.exists(), path
        assert not path.parent.exists(), path.parent  # the skill level too
    cg.remove()  # idempotent


def test_limit_that_cannot_be_applied_fails_closed(cgroups, mounts):
    """No memory controller anywhere: create refuses and leaves nothing."""
    require(mounts.v2 is None or "memory" not in (mounts.v2 / "cgroup.controllers").read_text().split(),
            "v2 offers memory here; cannot hide it for this test")
    no_memory = SimpleNamespace(v2=mounts.v2,
                                v1={k: v for k, v in mounts.v1.items() if k != "memory"})
    skill = f"sgtest-{os.getpid()}-{next(_counter)}"
    with pytest.raises(CgroupError) as err:
        cgroups.create(Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32),
                       mounts_override=no_memory, skill=skill)
    assert err.value.controller == "memory"
    assert "memory" in str(err.value)
    for root in [mounts.v2, *mounts.v1.values()]:
        if root is not None:
            assert not (root / "skillguard" / skill).exists(), root
    # A limit that is not asked for is not required.
    cg = cgroups.create(Limits(memory_bytes=None, cpu=1.0, pids=32), mounts_override=no_memory)
    assert cg.limits_applied()["memory"] == "not requested"
    assert "memory" not in cg.v1_paths


def test_second_instance_of_same_skill_is_separate(cgroups, mounts):
    limits = Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32)
    first = cgroups.create(limits)
    skill = first.v1_paths.get("pids", first.v2_path).parent.name
    second = SkillCgroup.create(skill, "2", limits, mounts=mounts)
    try:
        assert second.v2_path != first.v2_path
        with pytest.raises(CgroupError):
            SkillCgroup.create(skill, "2", limits, mounts=mounts)  # instance must be new
        second.remove()
        assert first.v2_path is None or first.v2_path.is_dir()  # sibling untouched
    finally:
        second.remove()


def test_a_leftover_of_the_same_instance_name_is_replaced_only_when_empty(cgroups, mounts):
    """A supervisor names its cgroup after its pid; one killed with SIGKILL
    leaves an empty directory that a later process with the same pid finds."""
    from agent.enforce.cgroup import CgroupExists, remove_leftover_instance, safe_name

    limits = Limits(memory_bytes=64 * MiB, cpu=1.0, pids=32)
    skill = f"sgtest-{os.getpid()}-leftover"
    left = SkillCgroup.create(skill, "run-1", limits, mounts=mounts)  # the dead process's
    try:
        with pytest.raises(CgroupExists):
            SkillCgroup.create(skill, "run-1", limits, mounts=mounts)
        proc = cgroups.spawn(left, ["sleep", "30"])
        _wait_members(left, 1)
        remove_leftover_instance((safe_name(skill),), "run-1", mounts)  # in use: stays
        assert left.v2_path is None or left.v2_path.is_dir()
        proc.kill()
        proc.wait(timeout=10)
        remove_leftover_instance((safe_name(skill),), "run-1", mounts)
        assert all(not Path(p).exists() for p in [left.v2] + list(left.v1.values()) if p)
        again = SkillCgroup.create(skill, "run-1", limits, mounts=mounts)
        again.remove()
    finally:
        left.remove()
