"""Turn kernel events of registered skills into Violations.

Paths arrive as the process gave them. A relative path is resolved against
the directory it was relative to (the process's cwd for AT_FDCWD, else the
dirfd) at the time the event is read: if the process changed directory or
closed the fd in between, the resolution can be wrong, and the event says
"unresolved" when it cannot be done at all. Symlinks are followed with
realpath() in the agent's mount namespace, prefixed by /proc/PID/root so a
process in another mount namespace is resolved in its own.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

from agent.compile.bpf_policy import FsRules, needed_rights
from agent.enforce.bpf_maps import EV_EXEC, EV_NET, RawEvent
from agent.events.violation import Violation

AT_FDCWD = -100
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
             socket.IPPROTO_ICMPV6: "icmpv6"}


def resolve(pid: int, dfd: int, path: str) -> Optional[str]:
    """The absolute path `path` names for process `pid`, or None if unknown."""
    if not path:
        return None
    root = f"/proc/{pid}/root"
    if not path.startswith("/"):
        base = f"/proc/{pid}/cwd" if dfd == AT_FDCWD else f"/proc/{pid}/fd/{dfd}"
        try:
            path = os.path.join(os.readlink(base), path)
        except OSError:
            return None
    normal = os.path.normpath(path)
    try:
        if os.readlink(root) == "/":
            return os.path.realpath(normal)
        real = os.path.realpath(root + normal)
        return real[len(root):] if real.startswith(root) else normal
    except OSError:
        return normal


def net_violation(skill: str, event: RawEvent, dns: bool) -> Violation:
    proto = PROTOCOLS.get(event.proto, f"proto {event.proto}")
    host = f"[{event.address}]" if ":" in event.address else event.address
    if event.port == 53 and dns:
        rule = "DNS goes only to the agent's resolver"
    elif proto != "tcp":
        rule = f"no {proto} grant: manifests grant tcp/http only (and DNS for named hosts)"
    else:
        rule = f"no tcp/http grant for {host}:{event.port}"
    verb = "connect" if event.flags == socket.SOCK_STREAM else "send"
    return Violation(skill=skill, pid=event.pid, layer="network", operation=f"{verb} {proto} {host}:{event.port}",
                     decision="denied" if event.decision == "denied" else "audited", rule=rule,
                     detail="cgroup/connect or sendmsg hook")


def fs_violation(skill: str, event: RawEvent, rules: FsRules) -> Optional[Violation]:
    """A Violation when the open/exec is outside the skill's fs rules (or the
    kernel killed for it); None when a rule allows it."""
    is_exec = event.kind == EV_EXEC
    resolved = resolve(event.pid, event.dfd, event.path)
    verb = "exec" if is_exec else "open"
    detail = f"{verb} as given: {event.path!r}, flags {event.flags:#o}"
    if len(event.path.encode()) >= 247:
        detail += " (path truncated by the kernel probe)"
    if resolved is None:
        if event.decision == "killed":
            return Violation(skill, event.pid, "fs", event.path, "killed",
                             "outside every fs grant (absolute path)", detail=detail)
        return Violation(skill, event.pid, "fs", event.path, "audited",
                         "path could not be resolved (process gone or fd closed)", detail=detail)
    needs = needed_rights(event.flags, is_exec, os.path.isdir(resolved))
    if event.decision != "killed" and (not needs or rules.allows(resolved, needs)):
        return None
    rule = f"no fs grant gives {'+'.join(needs) or 'access'} on {resolved}"
    return Violation(skill, event.pid, "fs", resolved,
                     "killed" if event.decision == "killed" else "audited", rule, detail=detail)


def to_violation(skill: str, event: RawEvent, rules: FsRules, dns: bool) -> Optional[Violation]:
    if event.kind == EV_NET:
        return net_violation(skill, event, dns)
    return fs_violation(skill, event, rules)
