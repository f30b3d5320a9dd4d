"""Warnings for grants that are valid but risky. They never block loading."""
from __future__ import annotations

import ipaddress
import re

from agent.manifest.glob import match_host
from agent.manifest.model import Policy
from agent.manifest.nodes import Pos
from agent.manifest.parse import Problem

SYSTEM_DIRS = ("/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
               "/boot", "/var", "/proc", "/sys", "/dev", "/root", "/home", "/opt", "/srv", "/run")
# rw anywhere below these changes what every program on the host runs or sees.
SYSTEM_TREES = ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev", "/bin", "/sbin",
                "/lib", "/lib32", "/lib64", "/libx32")
SECRET_DIRS = ("/root", "/home")  # grants reaching agent-private paths are load errors
# Programs that run code or commands they are handed. Their own execs are still
# supervised (shell rules are checked at every execve); their own code is not.
RUNS_ANYTHING = frozenset({
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "busybox",
    "python", "python2", "python3", "perl", "ruby", "node", "nodejs", "deno", "bun", "php",
    "lua", "tclsh", "wish", "awk", "gawk", "mawk", "nawk", "env", "xargs", "find",
    "nice", "nohup", "timeout", "stdbuf", "setsid", "sudo", "su", "doas", "ssh", "strace",
    "gdb", "watch", "flock", "chroot", "unshare", "nsenter", "script",
})


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _literal_depth(pattern: str) -> int:
    """How many leading path components are literal before any glob."""
    depth = 0
    for seg in (s for s in pattern.split("/") if s):
        if "*" in seg:
            break
        depth += 1
    return depth


def _position(positions: dict[str, Pos], fieldname: str) -> Pos:
    """The position of `fieldname`, or of its nearest parent that has one."""
    while fieldname:
        if fieldname in positions:
            return positions[fieldname]
        fieldname = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", fieldname)
    return Pos(1, 1)


def lint(policy: Policy, positions: dict[str, Pos]) -> list[Problem]:
    out: list[Problem] = []

    def warn(fieldname: str, message: str) -> None:
        out.append(Problem(_position(positions, fieldname), fieldname, message))

    if policy.mode == "audit":
        warn("mode", "audit mode: seccomp violations are reported and allowed, not blocked")

    for i, grant in enumerate(policy.fs.dirs):
        f = f"permissions.fs.dirs[{i}]"
        if grant.is_glob and _literal_depth(grant.pattern) <= 1:
            warn(f, f"'{grant.pattern}': a glob at or near / grants a large part of the file system")
        if grant.access == "rw" and (grant.pattern in SYSTEM_DIRS
                                     or any(_is_under(grant.pattern, d) for d in SYSTEM_TREES)):
            warn(f, f"'{grant.pattern}': rw on a system directory")
        elif grant.pattern in SECRET_DIRS:
            warn(f, f"'{grant.pattern}': grants read access to secrets below it")

    for i, rule in enumerate(policy.tcp.allowlist):
        f = f"permissions.tcp.allowlist[{i}]"
        any_host = any(n.prefixlen == 0 for n in rule.host.networks) or rule.host.name == "**"
        if any_host and rule.port is None:
            warn(f, f"'{rule.text}': allows every host on every port")
        elif any_host:
            warn(f, f"'{rule.text}': allows every host")
        for net in rule.host.networks:
            if net.prefixlen and (net.is_loopback or net.overlaps(ipaddress.ip_network("169.254.0.0/16"))
                                  if isinstance(net, ipaddress.IPv4Network) else net.is_loopback):
                warn(f, f"'{rule.text}': grants loopback or link-local addresses (host services, cloud metadata)")

    for i, rule in enumerate(policy.http.allowlist):
        f = f"permissions.http.allowlist[{i}]"
        if rule.path not in ("/**", "/"):
            warn(f, f"'{rule.text}': the path '{rule.path}' cannot be enforced in the kernel; "
                    f"only {rule.host.text} port {rule.port} is")
        if rule.host.name == "**":
            warn(f, f"'{rule.text}': allows every host")

    for block in ("tcp", "http"):
        part = getattr(policy, block)
        names = [r.host.name for r in part.allowlist if r.host.name]
        for i, pattern in enumerate(part.private_names):
            if not any(n == pattern or match_host(n, pattern) for n in names):
                warn(f"permissions.{block}.private_names[{i}]",
                     f"'{pattern}' matches no name rule in permissions.{block}.allowlist; "
                     "it admits nothing")

    for i, cmd in enumerate(policy.shell.allowlist):
        f = f"permissions.shell.allowlist[{i}]"
        first = cmd.words[0].rsplit("/", 1)[-1]
        if first in ("*", "**"):
            warn(f, f"'{cmd.text}': admits any command")
        elif first in RUNS_ANYTHING or first.startswith(("python", "perl", "ruby", "php", "lua")):
            warn(f, f"'{cmd.text}': '{first}' runs code it is given; every program that code "
                    "starts is still checked against this allowlist, but what the code does "
                    "itself is bounded only by the other layers")
    if policy.shell.enabled and policy.shell.allowlist and not policy.shell.allowed_dirs:
        warn("permissions.shell", "shell.allowed_dirs is empty: no command can run anywhere")

    for block in ("fs", "http", "tcp", "shell"):
        part = getattr(policy, block)
        rules = getattr(part, "dirs", None) or getattr(part, "allowlist", ())
        if not part.enabled and rules:
            warn(f"permissions.{block}.enabled", f"{block} is disabled: its rules grant nothing")
    return out
