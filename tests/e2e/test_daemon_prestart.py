"""Launches from a pre-started init (agent/daemon/zygote.py `_spare_main`,
supervisor.prestart_init): a spare makes a neutral cgroup
`skillguard/@spare/run-<spare pid>` and clones its init into it before the
launch; the launch writes the manifest's limits there. Nothing of it may
outlive the spare: its launch, its exit, its death, or the daemon's."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import require
from sgdaemon import children, zygote_of, make_root, manifest_text, read_all, remove_root, running_daemon, wait_for, DaemonProcess

from agent.enforce.cgroup import NEUTRAL_GROUP, ROOT_NAME
from agent.enforce.cgroupfs import cgroup_mounts


def _ended(pid: int) -> bool:
    """Gone, or a zombie (reparented to an init that has not reaped it yet)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:].startswith(b"Z")


def _neutral_dirs(spare: int) -> list[Path]:
    """Every hierarchy's `@spare/run-<spare>` directory that exists."""
    mounts = cgroup_mounts()
    roots = ([mounts.v2] if mounts.v2 is not None else []) + list(mounts.v1.values())
    return [d for d in (Path(m) / ROOT_NAME / NEUTRAL_GROUP / f"run-{spare}" for m in roots) if d.is_dir()]


def _idle_spare(daemon) -> int:
    """A spare of the zygote whose init is waiting in its neutral cgroup."""
    zygote = wait_for(lambda: zygote_of(daemon), 10, what="the launch zygote")

    def ready():
        for pid in children(zygote):
            if _neutral_dirs(pid) and children(pid):
                return pid
        return None

    return wait_for(ready, 20, 0.05, "a spare with its pre-started init")


def _launch_true(daemon, name: str, not_by: int) -> None:
    reply, out = daemon.launch(manifest_text(name, str(daemon.work)), ["/bin/true"])
    os.close(out)
    assert reply["supervisor_pid"] != not_by
    assert daemon.call("wait", {"id": reply["id"], "timeout": 30})["exit_code"] == 0


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon() as d:
        yield d


def test_the_skill_runs_in_the_spare_cgroup_with_the_manifests_limits(daemon):
    spare = _idle_spare(daemon)
    text = manifest_text("pre-limits", str(daemon.work)).replace("pids: 64", "pids: 23\n  memory: 96M")
    script = ("import os\n"
              "print(open('/proc/self/cgroup').read(), end='')\n"
              "print('UID', os.getuid())\n")
    reply, out = daemon.launch(text, ["/usr/bin/python3", "-c", script])
    assert reply["supervisor_pid"] == spare
    detail = daemon.call("inspect", {"id": reply["id"]})
    paths = [Path(p) for p in detail["cgroup_paths"]]
    assert paths and all(p.parent.name == NEUTRAL_GROUP and p.name == f"run-{spare}" for p in paths), paths
    # The limits are written before the skill runs: read them while it may still run.
    mounts = cgroup_mounts()
    by_mount = {str(m): c for c, m in mounts.v1.items()}
    limits = {}
    for path in paths:
        controller = by_mount.get(str(path.parents[2]))
        if controller == "pids":
            limits["pids"] = (path / "pids.max").read_text().strip()
        elif controller == "memory":
            limits["memory"] = (path / "memory.limit_in_bytes").read_text().strip()
        elif controller is None and (path / "pids.max").exists():
            limits["pids"] = (path / "pids.max").read_text().strip()
        if controller is None and (path / "memory.max").exists():
            limits["memory"] = (path / "memory.max").read_text().strip()
    result = daemon.call("wait", {"id": reply["id"], "timeout": 30})
    output = read_all(out)
    assert result["exit_code"] == 0, (result, output)
    assert limits == {"pids": "23", "memory": str(96 << 20)}, limits
    lines = dict(line.split(":", 2)[1:] for line in output.splitlines() if line.count(":") >= 2)
    # cgroup namespace rooted at the skill's cgroup: v2 ("0::") and every v1 hierarchy read "/".
    assert lines.get("") == "/", output
    assert all(path == "/" for path in lines.values()), output
    assert "UID 0" not in output
    # Removed with the launch.
    wait_for(lambda: not any(p.exists() for p in paths), 10, what="the neutral cgroup to be removed")


def test_a_spare_ended_before_its_launch_leaves_no_cgroup(daemon):
    spare = _idle_spare(daemon)
    init = next(iter(children(spare)))
    os.kill(spare, signal.SIGTERM)
    wait_for(lambda: not _neutral_dirs(spare), 10, what="the spare to remove its cgroup")
    wait_for(lambda: not os.path.exists(f"/proc/{init}"), 10, what="the init to end")
    _launch_true(daemon, "pre-after-term", not_by=spare)  # the daemon finds it gone, takes another

    # SIGKILL: nothing can run in it; the next spare sweeps its cgroup.
    spare = _idle_spare(daemon)
    init = next(iter(children(spare)))
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{spare}"), 10, what="the spare to be reaped")
    # The launch finds the spare dead, takes the next one, which removes the leftovers.
    _launch_true(daemon, "pre-after-kill", not_by=spare)
    wait_for(lambda: not _neutral_dirs(spare), 10, what="the killed spare's cgroup to be swept")
    wait_for(lambda: _ended(init), 10, what="the init to end (its parent-death signal)")


def test_a_layer_that_fails_in_the_prestarted_init_is_named(daemon):
    from agent.client import RpcError

    require("memory" in cgroup_mounts().v1, "the memory controller is a v1 hierarchy (v2 accepts any memory.max)")
    spare = _idle_spare(daemon)
    # A v1 memory limit below what the waiting init already uses is refused
    # (EBUSY, cgroup-v1/memory.rst): the launch fails closed, layer named.
    text = manifest_text("pre-fail", str(daemon.work)).replace("pids: 64", "pids: 64\n  memory: 4K")
    with pytest.raises(RpcError, match=r"^cgroup: .*the skill was not started"):
        daemon.launch(text, ["/bin/true"])
    wait_for(lambda: not _neutral_dirs(spare), 10, what="the failed launch's cgroup to be removed")


def test_a_daemon_killed_with_idle_spares_leaves_none_after_its_next_start():
    require(os.geteuid() == 0, "needs root (euid 0)")
    root = make_root()
    daemon = DaemonProcess(root)
    try:
        daemon.start()
        spare = _idle_spare(daemon)
        init = next(iter(children(spare)))
        os.kill(spare, signal.SIGKILL)  # as a host-wide SIGKILL would: no clean-up of its own
        daemon.kill9()
        wait_for(lambda: _ended(init), 10, what="the init to end")
        assert _neutral_dirs(spare)  # left behind
        daemon.start()
        assert not _neutral_dirs(spare)  # swept before the daemon answers
    finally:
        daemon.tear_down()
        remove_root(root)
