"""Where the cgroup hierarchies are mounted, read from /proc/self/mountinfo.

Hosts differ (pure v2, hybrid v2 + v1, v1 only, containers with bind-mounted
sub-trees), so nothing here assumes /sys/fs/cgroup. `parse_mountinfo` is pure;
`cgroup_mounts` reads the calling process's mountinfo.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"

# cgroup v1 super options that are mount flags, not controller names
# (kernel/cgroup/cgroup-v1.c: parse_cgroup_root_flags / cgroup1_parse_param).
_V1_NON_CONTROLLER_OPTIONS = frozenset({
    "rw", "ro", "none", "all", "noprefix", "clone_children", "xattr",
    "cpuset_v2_mode", "favordynmods", "nofavordynmods",
})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (proc(5), /proc/pid/mountinfo)."""

    mount_id: int
    parent_id: int
    device: str                     # "major:minor"
    root: str                       # path inside the filesystem that is mounted here
    mount_point: Path
    mount_options: tuple[str, ...]  # per-mount options (rw, nosuid, ...)
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per-superblock options; cgroup v1 lists controllers here


@dataclass(frozen=True)
class CgroupMounts:
    v2: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)     # controller -> mount point
    named: dict[str, Path] = field(default_factory=dict)  # v1 "name=X" hierarchies (e.g. systemd)


def _unescape(text: str) -> str:
    # The kernel escapes space, tab, newline and backslash in paths as \ooo (fs/proc_namespace.c).
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_line(line: str) -> Mount:
    fields = line.split()
    try:
        sep = fields.index("-", 6)  # optional fields (shared:N, master:N) end at "-"
        fstype, source, super_opts = fields[sep + 1], fields[sep + 2], fields[sep + 3]
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            device=fields[2],
            root=_unescape(fields[3]),
            mount_point=Path(_unescape(fields[4])),
            mount_options=tuple(fields[5].split(",")),
            fstype=fstype,
            source=_unescape(source),
            super_options=tuple(super_opts.split(",")),
        )
    except (ValueError, IndexError) as exc:
        raise ValueError(f"malformed mountinfo line: {line!r}") from exc


def parse_mountinfo(text: str) -> list[Mount]:
    return [parse_line(line) for line in text.splitlines() if line.strip()]


def v1_controllers(mount: Mount) -> tuple[tuple[str, ...], str | None]:
    """Controllers of a cgroup v1 mount and its `name=` if any."""
    controllers: list[str] = []
    name = None
    for opt in mount.super_options:
        if opt.startswith("name="):
            name = opt[len("name="):]
        elif "=" in opt or opt in _V1_NON_CONTROLLER_OPTIONS:
            continue
        else:
            controllers.append(opt)
    return tuple(controllers), name


def cgroup_mounts_from(mounts: list[Mount]) -> CgroupMounts:
    """The first mount of each hierarchy wins (later ones are usually bind mounts)."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    named: dict[str, Path] = {}
    for mount in mounts:
        if mount.fstype == "cgroup2":
            if v2 is None:
                v2 = mount.mount_point
        elif mount.fstype == "cgroup":
            controllers, name = v1_controllers(mount)
            for controller in controllers:
                v1.setdefault(controller, mount.mount_point)
            if name is not None:
                named.setdefault(name, mount.mount_point)
    return CgroupMounts(v2=v2, v1=v1, named=named)


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return parse_mountinfo(handle.read())


def cgroup_mounts(path: str = MOUNTINFO) -> CgroupMounts:
    return cgroup_mounts_from(read_mounts(path))
