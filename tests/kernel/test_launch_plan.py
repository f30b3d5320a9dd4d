"""Stored launch plans (agent/launch/plan_cache.py, agent/fastrun.py) and the
clone3 start of the skill in its cgroups, on the real kernel, as root.

The installed `skillguard` command (scripts/setup.sh writes it: python -IS)
runs a skill twice: the first launch compiles and stores the plan, the
second starts from it without importing the manifest model or the
compilers, and both confine the same way. Whatever the plan depended on
(the manifest's bytes, the owner of a granted directory) invalidates it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.launching import (REPO_ROOT, read_events, require_launch_features,
                                    temp_state_root, write_manifest)

VENV_PYTHON = str(Path(sys.executable))
COMMAND = str(REPO_ROOT / ".venv" / "bin" / "skillguard")

PROBE = r"""
import errno, json, os, socket, sys
work, ref = sys.argv[1], sys.argv[2]
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("write_work", lambda: open(os.path.join(work, "w.txt"), "w").write("x"))
attempt("read_ref", lambda: open(os.path.join(ref, "r.txt")).read())
attempt("write_ref", lambda: open(os.path.join(ref, "new.txt"), "w").write("x"))
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
out["cgroup"] = open("/proc/self/cgroup").read().splitlines()
out["uid"] = os.getuid()
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def _features():
    require_launch_features()
    assert os.access(COMMAND, os.X_OK), f"{COMMAND}: run scripts/setup.sh (make test does)"


@pytest.fixture
def area():
    with temp_state_root("sg-plan-") as root:
        base = Path(root)
        (base / "work").mkdir()
        (base / "ref").mkdir()
        (base / "ref" / "r.txt").write_text("ref")
        for path in (base / "work", base / "ref"):
            path.chmod(0o755)
        yield base


def _launch(area: Path, manifest: Path, *, importtime: bool = True) -> dict:
    events = area / f"events-{os.urandom(4).hex()}.jsonl"
    argv = [VENV_PYTHON, "-IS"] + (["-X", "importtime"] if importtime else []) + [
        COMMAND, "run", "--manifest", str(manifest), "--events", str(events), "--",
        "/usr/bin/python3", "-c", PROBE, str(area / "work"), str(area / "ref")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLGUARD_")}
    env.update(SKILLGUARD_STATE_ROOT=str(area / "state"),
               SKILLGUARD_SOCKET=str(area / "no-daemon.sock"))
    proc = subprocess.run(argv, cwd=str(area), capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    return {"result": json.loads(proc.stdout.strip().splitlines()[-1]),
            "events": read_events(events), "imported": imported,
            "notes": [l for l in proc.stderr.splitlines() if l.startswith("skillguard: note:")]}


def _compiled(run: dict) -> bool:
    return "agent.manifest.model" in run["imported"] or "agent.compile.landlock" in run["imported"]


def _layers(run: dict) -> list:
    return sorted((e["layer"], e["operation"], e["decision"]) for e in run["events"])


def test_the_second_launch_starts_from_the_stored_plan_and_confines_the_same(area):
    manifest = write_manifest(area, "plan-same", [f"{area}/work:rw", f"{area}/ref:ro"])
    cold = _launch(area, manifest)
    warm = _launch(area, manifest)
    assert _compiled(cold), "the first launch should compile (no stored plan yet)"
    assert not _compiled(warm), sorted(m for m in warm["imported"] if m.startswith("agent"))
    assert "yaml" not in warm["imported"] and "dataclasses" not in warm["imported"]
    expected = {"write_work": "ok", "read_ref": "ok", "write_ref": "EROFS",  # the ro bind mount answers first
                "read_shadow": "EACCES", "inet_socket": "EPERM"}
    for run in (cold, warm):
        assert {k: run["result"][k] for k in expected} == expected
    assert cold["result"]["uid"] == warm["result"]["uid"] != 0
    assert _layers(cold) == _layers(warm)
    assert ("seccomp", "socket(AF_INET)", "denied") in _layers(warm)
    assert cold["notes"] == warm["notes"]


def test_the_skill_starts_inside_its_cgroups(area):
    # clone3(CLONE_INTO_CGROUP) for v2, "0" into the v1 `tasks` files. Seen
    # from outside: the skill has its own cgroup namespace, where it is "/".
    import time

    from agent.enforce.cgroupfs import cgroup_mounts

    manifest = write_manifest(area, "plan-cgroup", [f"{area}/work:rw"],
                              resources={"timeout": "30s", "memory": "256MiB", "pids": 64})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLGUARD_")}
    env.update(SKILLGUARD_STATE_ROOT=str(area / "state"), SKILLGUARD_SOCKET=str(area / "none"))
    proc = subprocess.Popen([COMMAND, "run", "--manifest", str(manifest), "--",
                             "/bin/sleep", "3"], cwd=str(area), env=env,
                            stderr=subprocess.DEVNULL)
    mounts = cgroup_mounts()
    hierarchies = ([mounts.v2] if mounts.v2 is not None else []) + \
        [mounts.v1[c] for c in ("memory", "pids") if c in mounts.v1]
    try:
        members = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(members) < len(hierarchies):
            members = {}
            for root in hierarchies:
                for leaf in Path(root, "skillguard", "plan-cgroup").glob("run-*"):
                    pids = (leaf / "cgroup.procs").read_text().split()
                    if len(pids) >= 2:  # the namespace's init and the skill
                        members[str(root)] = set(pids)
            time.sleep(0.05)
        assert len(members) == len(hierarchies), members
        assert len({frozenset(p) for p in members.values()}) == 1, members
        sleeping = {p for p in next(iter(members.values()))
                    if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"}
        assert len(sleeping) == 1, members
    finally:
        proc.kill()  # SIGKILL: the supervisor cannot remove the skill's cgroups
        proc.wait()
    # The next launch of the skill removes what the killed supervisor left.
    stale = [Path(root, "skillguard", "plan-cgroup", f"run-{proc.pid}") for root in hierarchies]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            (p / "cgroup.procs").exists() and (p / "cgroup.procs").read_text().split() for p in stale):
        time.sleep(0.05)  # the init and the skill die with their supervisor (PDEATHSIG)
    assert all(p.is_dir() for p in stale)
    again = subprocess.run([COMMAND, "run", "--manifest", str(manifest), "--", "/bin/true"],
                           cwd=str(area), env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert not any(p.exists() for p in stale), stale
    assert "left by a supervisor that was killed" in again.stderr


def test_a_changed_manifest_or_owner_is_not_served_from_the_stored_plan(area):
    manifest = write_manifest(area, "plan-change", [f"{area}/work:rw", f"{area}/ref:ro"])
    _launch(area, manifest)
    assert not _compiled(_launch(area, manifest))
    # The owner of a granted directory decides the idmapping: a witness.
    os.chown(area / "ref", 4242, 4242)
    changed = _launch(area, manifest)
    assert _compiled(changed)
    assert any("4242:4242" in note for note in changed["notes"]), changed["notes"]
    assert not _compiled(_launch(area, manifest))
    # Other bytes, another plan: write is now granted in ref.
    write_manifest(area, "plan-change", [f"{area}/work:rw", f"{area}/ref:rw"])
    regranted = _launch(area, manifest)
    assert _compiled(regranted) and regranted["result"]["write_ref"] == "ok"


def test_stored_plans_are_trusted_only_from_a_root_only_directory(area):
    from agent.launch import plan_cache

    manifest = write_manifest(area, "plan-perm", [f"{area}/work:rw"])
    _launch(area, manifest)
    cache = area / "state" / "cache"
    records = list(cache.glob("plan-*"))
    assert len(records) == 1
    record = records[0]
    assert record.stat().st_mode & 0o777 == 0o600 and record.stat().st_uid == 0
    os.chmod(cache, 0o777)
    try:
        assert _compiled(_launch(area, manifest))
    finally:
        os.chmod(cache, 0o700)
    assert not _compiled(_launch(area, manifest))
    # A record whose inputs differ (a checksum collision, a stale file) is not used.
    material, stored = __import__("marshal").loads(record.read_bytes())
    assert plan_cache.load(str(area / "state"), material + b"x") is None
    # A torn record is not used either.
    record.write_bytes(record.read_bytes()[:100])
    assert _compiled(_launch(area, manifest))
