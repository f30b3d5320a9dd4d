"""Who is calling, and may they: the sender of each request, and its cgroups.

Callers are identified per request, not per connection: the listening socket
has SO_PASSCRED and SO_PASSPIDFD (inherited by every accepted socket), so each
read returns SCM_CREDENTIALS (pid, real uid and gid) and SCM_PIDFD of the
process that wrote those bytes, and one read never returns bytes of two
senders (unix(7); net/unix/af_unix.c, unix_stream_read_generic()). A
connection can be inherited by, or passed to, another process (a skill): what
that process writes is judged as its own. SO_PEERCRED (the process that
connected) is kept only to name the connection in logs.

Rules (docs/api.md "Who may call"):
- every method needs uid 0, or the configured socket group as the sender's
  gid or among its supplementary groups (/proc/PID/status);
- a sender inside any skill cgroup may never call a mutating method, whatever
  its uid: a skill must not unregister or loosen itself. Its cgroups are read
  when its request is handled; a sender that has exited by then is refused;
- a request line whose bytes came from more than one sender is refused.

`decide()` is pure; the rest reads the kernel.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
from typing import Iterable, NamedTuple, Optional

from agent.attach.procs import read_proc

# `invoke` changes nothing, but its refusals are violations recorded in a
# skill's name: a skill must not be able to write those, so it counts here.
MUTATING = frozenset({"register", "unregister", "launch", "reload", "signal", "invoke"})
READ_ONLY = frozenset({"list", "inspect", "events", "status", "wait"})

# include/uapi/asm-generic/socket.h
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SO_PASSPIDFD = 76  # Linux 6.5
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
SCM_PIDFD = 4  # Linux 6.5: a pidfd of the sender, with SO_PASSPIDFD
_UCRED = struct.Struct("=iII")
UCRED_SIZE = _UCRED.size
unpack_ucred = _UCRED.unpack

MIXED = object()  # the sender of a request line that more than one process wrote
MIXED_SENDERS = ("the bytes of this request line were written by more than one process "
                 "(a request must be written by one process)")


class Peer(NamedTuple):
    """A caller: the process that wrote a request, or the one that connected.
    (A tuple: one is built per read, and a tuple is the cheapest to build.)"""
    pid: int  # 0 when the peer is in a PID namespace the daemon cannot see
    uid: int
    gid: int
    groups: tuple = ()
    pidfd: Optional[int] = None  # pins `pid` to the sender (None before 6.5); owned by the connection

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"

    def same_sender(self, other: "Peer") -> bool:
        return self.pid == other.pid and self.uid == other.uid and self.gid == other.gid


# A sender that could not be identified: a read without SCM_CREDENTIALS (the
# listener lacks SO_PASSCRED). uid and gid -1 match neither root nor any group.
UNKNOWN_SENDER = Peer(0, -1, -1, ())


def enable_sender_credentials(listener: socket.socket) -> bool:
    """Ask for the sender's credentials with every read, on the listening
    socket: accepted sockets inherit both flags (af_unix.c,
    unix_sock_inherit_flags()), so no read of a new connection, even of bytes
    written before accept(), comes without them. False when the kernel has no
    SO_PASSPIDFD (before 6.5): senders are then known by pid only."""
    listener.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
    try:
        listener.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
    except OSError:
        return False
    return True


def peer_of(sock: socket.socket) -> Peer:
    """The process that connected (SO_PEERCRED: its effective uid and gid at
    connect()); it names the connection in logs, it authorises nothing."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid, ())


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
    """Where the sender sits if in a skill cgroup, else None. A sender that
    cannot be identified (pid 0, exited, pid reused) is reported as such, so
    mutating calls from it are refused too (fail closed)."""
    if peer.pid <= 0:
        return "<unknown: the sender could not be identified (no credentials, or a PID namespace the daemon cannot see)>"
    try:
        text = read_proc(f"/proc/{peer.pid}/cgroup").decode("utf-8", "surrogateescape")
    except OSError:
        return "<unknown: the process that sent the request has exited>"
    if peer.pidfd is not None and not _alive(peer.pidfd):
        # The pid was read above; the pidfd (of the sender's own struct pid)
        # says whether that pid still names the sender and not a new process.
        return "<unknown: the process that sent the request has exited>"
    roots = {root_name} if isinstance(root_name, str) else set(root_name)
    known = [k for k in known if k]
    if not known and not any(f"/{root}/" in text for root in roots):
        # Most calls: no level of any path is a skill root (skill_cgroup_of
        # looks for the root as a level with more below it, "/<root>/").
        return None
    return skill_cgroup_of(_paths_of(text), roots, known)


def needs_groups(peer: Peer, group_gid: Optional[int]) -> bool:
    """Whether decide() needs the sender's supplementary groups (SCM_CREDENTIALS has none)."""
    return group_gid is not None and peer.uid != 0 and peer.gid != group_gid and not peer.groups


def with_groups(peer: Peer) -> Peer:
    """The sender with its supplementary groups (/proc/PID/status "Groups:",
    proc(5)); none when it has exited or its pid now names another process."""
    groups: tuple[int, ...] = ()
    try:
        for line in read_proc(f"/proc/{peer.pid}/status").decode("ascii", "replace").splitlines():
            if line.startswith("Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
                break
    except (OSError, ValueError):
        groups = ()
    if peer.pidfd is not None and not _alive(peer.pidfd):
        groups = ()
    return peer._replace(groups=groups)


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
