"""Tear down a skill's cgroups from their recorded paths (after its supervisor
died, or when a registered skill's processes have all gone)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def cgroup_from_paths(paths: Iterable[str]):
    """A SkillCgroup for recorded cgroupfs paths (the v2 one and v1 ones); None if none exists."""
    from agent.enforce.cgroup import SkillCgroup
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    v2_path = None
    v1_paths: dict[str, Path] = {}
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            continue
        if mounts.v2 is not None and str(path).startswith(str(mounts.v2).rstrip("/") + "/"):
            v2_path = path
            continue
        for controller, mount in mounts.v1.items():
            if str(path).startswith(str(mount).rstrip("/") + "/"):
                v1_paths.setdefault(controller, path)
                break
    if v2_path is None and not v1_paths:
        return None
    applied = {c: "not requested" for c in ("memory", "pids", "cpu")}
    cgroup_id = os.stat(v2_path).st_ino if v2_path is not None else None
    return SkillCgroup(v2_path, v1_paths, applied, cgroup_id)


def remove_cgroup_paths(paths: Iterable[str]) -> list[str]:
    """Kill what is left in the cgroups and remove them. Returns problems (empty if none)."""
    from agent.enforce.cgroup import CgroupError

    try:
        cgroup = cgroup_from_paths(paths)
    except OSError as exc:
        return [f"finding cgroup mounts: {exc.strerror}"]
    if cgroup is None:
        return []
    try:
        cgroup.remove()
    except CgroupError as exc:
        return [str(exc)]
    return []


def cgroup_populated(paths: Iterable[str]) -> bool:
    """True while any of the cgroups has a member process (one read each,
    no file object: the sweep calls this for every registered skill)."""
    from agent.attach.procs import read_proc

    for text in paths:
        try:
            if read_proc(os.path.join(text, "cgroup.procs")).strip():
                return True
        except FileNotFoundError:
            continue
        except OSError:
            return True  # cannot tell: treat as alive, never tear down a live skill
    return False


def rmdir_if_empty(paths: Iterable[str]) -> list[str]:
    """rmdir each cgroup that still exists and has no member; never signals anyone."""
    problems = []
    for text in paths:
        if not os.path.isdir(text):
            continue
        try:
            os.rmdir(text)
        except OSError as exc:
            problems.append(f"rmdir {text}: {exc.strerror}")
    return problems
