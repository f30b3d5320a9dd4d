"""Who is calling, and may they: SO_PEERCRED, SO_PEERGROUPS, the peer's cgroups.

Rules (docs/api.md "Who may call"):
- every method needs uid 0, or the configured socket group among the peer's
  groups (primary or supplementary, from SO_PEERGROUPS at connect time);
- a peer inside any skill cgroup may never call a mutating method, whatever
  its uid: a skill must not unregister or loosen itself. This is checked on
  every mutating call, not only at connect, because a connected process may
  be registered (moved into a skill cgroup) afterwards.

`decide()` is pure; the rest reads the kernel.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

from agent.attach.procs import read_proc

# `invoke` changes nothing, but its refusals are violations recorded in a
# skill's name: a skill must not be able to write those, so it counts here.
MUTATING = frozenset({"register", "unregister", "launch", "reload", "signal", "invoke"})
READ_ONLY = frozenset({"list", "inspect", "events", "status", "wait"})

# include/uapi/asm-generic/socket.h
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
SO_PEERGROUPS = 59  # Linux 4.13
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the process that connected
_UCRED = struct.Struct("=iII")


@dataclass(frozen=True)
class Peer:
    pid: int  # 0 when the peer is in a PID namespace the daemon cannot see
    uid: int
    gid: int
    groups: tuple[int, ...]
    pidfd: Optional[int] = None  # pins `pid` to the process that connected (None before 6.5)

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    groups: tuple[int, ...] = ()
    for size in (4096, 65536 * 4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError:
            continue  # ERANGE: more groups than fit; try the largest buffer
        groups = tuple(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        break
    pidfd = None
    try:
        pidfd = struct.unpack("=i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:
        pidfd = None
    return Peer(pid, uid, gid, groups, pidfd)


def cgroup_paths(pid: int) -> list[str]:
    """The peer's cgroup path in every hierarchy (/proc/PID/cgroup, cgroups(7))."""
    with open(f"/proc/{pid}/cgroup") as fh:
        return _paths_of(fh.read())


def _paths_of(text: str) -> list[str]:
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def skill_cgroup_of(paths: Iterable[str], root_name, known: Iterable[str] = ()) -> Optional[str]:
    """The first path that lies in a skill cgroup: below a level named
    `root_name` (skillguard's subtree, see agent/enforce/cgroup.py; a string or
    several) or below a known skill cgroup; None when none does. Pure."""
    roots = {root_name} if isinstance(root_name, str) else set(root_name)
    known = [k.rstrip("/") for k in known if k]
    for path in paths:
        parts = [p for p in path.split("/") if p]
        if roots & set(parts[:-1]):
            return path
        if any(path == k or path.startswith(k + "/") for k in known):
            return path
    return None


def decide(method: str, peer: Peer, group_gid: Optional[int], skill_cgroup: Optional[str]) -> Optional[str]:
    """None if `peer` may call `method`, else why not. Pure."""
    if method in MUTATING and skill_cgroup is not None:
        return (f"{peer.describe()} is inside skill cgroup {skill_cgroup}: "
                "a process in a skill cgroup may not call mutating methods")
    if peer.uid == 0:
        return None
    if group_gid is not None and (peer.gid == group_gid or group_gid in peer.groups):
        return None
    who = "root or members of the socket group" if group_gid is not None else "root only (no socket_group configured)"
    return f"{peer.describe()} may not call {method}: allowed for {who}"


def peer_skill_cgroup(peer: Peer, root_name, known: Iterable[str] = ()) -> Optional[str]:
    """Where the peer sits if in a skill cgroup, else None. A peer that cannot
    be identified (pid 0, exited, pid reused) is reported as such, so mutating
    calls from it are refused too (fail closed)."""
    if peer.pid <= 0:
        return "<unknown: the peer is in a PID namespace the daemon cannot see>"
    try:
        text = read_proc(f"/proc/{peer.pid}/cgroup").decode("utf-8", "surrogateescape")
    except OSError:
        return "<unknown: the process that connected has exited>"
    if peer.pidfd is not None and not _alive(peer.pidfd):
        # The pid was read above; the pidfd says whether it is still the same process.
        return "<unknown: the process that connected has exited>"
    roots = {root_name} if isinstance(root_name, str) else set(root_name)
    known = [k for k in known if k]
    if not known and not any(f"/{root}/" in text for root in roots):
        # Most calls: no level of any path is a skill root (skill_cgroup_of
        # looks for the root as a level with more below it, "/<root>/").
        return None
    return skill_cgroup_of(_paths_of(text), roots, known)


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def group_id(name: Optional[str]) -> Optional[int]:
    if not name:
        return None
    import grp

    if name.isdigit():
        return int(name)
    return grp.getgrnam(name).gr_gid


def close_peer(peer: Optional[Peer]) -> None:
    if peer is not None and peer.pidfd is not None:
        try:
            os.close(peer.pidfd)
        except OSError:
            pass
