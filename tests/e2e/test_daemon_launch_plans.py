"""The daemon's launch path reuses what it made for an earlier launch of the
same manifest (agent/daemon/launcher.py PlanMemo, UsernsFds), and never
when what it depended on changed."""
from __future__ import annotations

import os

import pytest

from conftest import require
from sgdaemon import manifest_text, read_all, running_daemon

PROBE = """
import os, sys
for name in ("mine", "theirs"):
    path = os.path.join(sys.argv[1], name)
    try:
        open(os.path.join(path, f"f-{os.getpid()}-{os.urandom(4).hex()}.txt"), "w").write("x")
        print(name, "written")
    except OSError as exc:
        print(name, exc.strerror)
"""


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon() as d:
        yield d


def _launch(daemon, text: str, tree: str) -> tuple[dict, str]:
    reply, out = daemon.launch(text, ["/usr/bin/python3", "-c", PROBE, tree])
    result = daemon.call("wait", {"id": reply["id"]})
    assert result["exit_code"] == 0, result
    return result, read_all(out)


def test_relaunches_reuse_the_plan_and_follow_an_owner_change(daemon):
    tree = daemon.work / "plans"
    for name in ("mine", "theirs"):
        (tree / name).mkdir(parents=True)
    os.chmod(tree / "mine", 0o700)
    os.chmod(tree / "theirs", 0o700)
    os.chown(tree / "theirs", 4343, 4343)
    text = manifest_text("e2e-plans", str(tree / "mine")).replace(
        f"      - {tree / 'mine'}:rw\n", f"      - {tree / 'mine'}:rw\n      - {tree / 'theirs'}:rw\n")
    first, out1 = _launch(daemon, text, str(tree))
    second, out2 = _launch(daemon, text, str(tree))
    # Both directories are writable through their idmapped mounts, each time.
    for out in (out1, out2):
        assert "mine written" in out and "theirs written" in out, (out, first["notes"])
    assert first["notes"] == second["notes"]
    assert any("4343:4343 is idmapped" in n for n in second["notes"]), second["notes"]
    # The owner decides the idmapping: a changed owner is a new plan and a new
    # user namespace, not the stored ones.
    os.chown(tree / "theirs", 4444, 4444)
    third, out3 = _launch(daemon, text, str(tree))
    assert "theirs written" in out3, out3
    assert any("4444:4444 is idmapped" in n for n in third["notes"]), third["notes"]
    # What the skill creates lands on disk as the directory's owner.
    assert {p.stat().st_uid for p in (tree / "theirs").iterdir()} == {4343, 4444}
