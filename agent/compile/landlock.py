"""Policy -> Landlock ruleset description (pure data).

The compiler decides which paths get which Landlock rights, which TCP ports
may be connected to and which scopes apply. It makes no state-changing system
calls; it reads the filesystem only to expand globs, to see whether base paths
exist and whether a path is a directory, and each of those is injectable so
unit tests run against a fake tree. Same inputs, same artifact.

Rights and their ABI versions follow include/uapi/linux/landlock.h and
Documentation/userspace-api/landlock.rst.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

from agent.manifest.model import Policy

CURRENT_ABI = 7

# Filesystem rights in kernel bit order (LANDLOCK_ACCESS_FS_*: bit = index),
# with the ABI that introduced each.
FS_RIGHTS: tuple[tuple[str, int], ...] = (
    ("execute", 1),
    ("write_file", 1),
    ("read_file", 1),
    ("read_dir", 1),
    ("remove_dir", 1),
    ("remove_file", 1),
    ("make_char", 1),
    ("make_dir", 1),
    ("make_reg", 1),
    ("make_sock", 1),
    ("make_fifo", 1),
    ("make_block", 1),
    ("make_sym", 1),
    ("refer", 2),
    ("truncate", 3),
    ("ioctl_dev", 5),
)
FS_BITS = {name: 1 << index for index, (name, _) in enumerate(FS_RIGHTS)}
FS_ABI = dict(FS_RIGHTS)

# LANDLOCK_ACCESS_NET_* (ABI 4) and LANDLOCK_SCOPE_* (ABI 6).
NET_RIGHTS: tuple[str, ...] = ("bind_tcp", "connect_tcp")
NET_BITS = {name: 1 << index for index, name in enumerate(NET_RIGHTS)}
NET_ABI = 4
SCOPES: tuple[str, ...] = ("abstract_unix_socket", "signal")
SCOPE_BITS = {name: 1 << index for index, name in enumerate(SCOPES)}
SCOPE_ABI = 6

# Rights that mean something on a non-directory; the kernel rejects a
# path-beneath rule on a file with any other right (EINVAL,
# security/landlock/fs.c: ACCESS_FILE).
FILE_RIGHTS = frozenset({"execute", "write_file", "read_file", "truncate", "ioctl_dev"})

READ_ONLY = ("read_file", "read_dir")
# Read-write: everything except execute and device-node creation. make_char
# and make_block stay denied: a device node is raw access to hardware or
# kernel memory, no skill has a reason to make one, and mknod(2) of a device
# needs CAP_MKNOD anyway, so granting them would only widen the surface.
READ_WRITE = tuple(
    name for name, _ in FS_RIGHTS if name not in ("execute", "make_char", "make_block")
)
EXECUTE_FILE = ("execute", "read_file")

DNS_PORT = 53
DEFAULT_BASE_PROFILE = Path(__file__).resolve().parents[2] / "policies" / "base-fs.yaml"
AGENT_INSTALL_DIR = str(Path(__file__).resolve().parents[1])


class LandlockCompileError(ValueError):
    """The policy or the base profile cannot be compiled into a safe ruleset."""


@dataclass(frozen=True)
class PathRule:
    path: str
    access: tuple[str, ...]  # Landlock right names in kernel bit order
    origin: str  # "base", "manifest:/data/project:rw", "state-dir", "entrypoint", ...


@dataclass(frozen=True)
class LandlockArtifact:
    abi: int  # the ABI this ruleset asks for
    handled_fs: tuple[str, ...]
    path_rules: tuple[PathRule, ...]
    handled_net: tuple[str, ...]
    connect_ports: tuple[int, ...]
    scopes: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class BaseEntry:
    path: str  # absolute; may hold `*`
    access: tuple[str, ...]


@dataclass(frozen=True)
class BaseProfile:
    rules: tuple[BaseEntry, ...]
    never: tuple[str, ...]
    agent_private: tuple[str, ...]
    source: str = "<base profile>"


# ---------------------------------------------------------------- helpers


def ordered_rights(names: Iterable[str]) -> tuple[str, ...]:
    """Known filesystem right names, deduplicated, in kernel bit order."""
    wanted = set(names)
    unknown = wanted - FS_BITS.keys()
    if unknown:
        raise LandlockCompileError(f"landlock: unknown filesystem rights {sorted(unknown)}")
    return tuple(name for name, _ in FS_RIGHTS if name in wanted)


def fs_rights_for_abi(abi: int) -> tuple[str, ...]:
    return tuple(name for name, since in FS_RIGHTS if since <= abi)


def _is_within(path: str, root: str) -> bool:
    """True when `path` is `root` or lies below it (both normalised, absolute)."""
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")


def _overlaps(path: str, protected: str) -> bool:
    """A rule on `path` reaches `protected` (equal, above it, or inside it)."""
    return _is_within(path, protected) or _is_within(protected, path)


def private_path_reached(pattern: str, base: Optional["BaseProfile"] = None) -> Optional[str]:
    """The agent-private path a manifest grant on `pattern` would reach, if any.

    For the loader, so that `validate` refuses what compilation would: a
    pattern reaches a private path when it matches it or one of its parents,
    or when its literal (glob-free) prefix lies inside it.
    """
    from agent.manifest.glob import match_path

    base = base if base is not None else default_base_profile()
    literal = "/" + "/".join(p for p in pattern.split("/")[1:] if p).split("*", 1)[0].rstrip("/")
    literal = literal.rsplit("/", 1)[0] if "*" in pattern else literal
    for private in base.agent_private:
        ancestors = [private] + [private.rsplit("/", i)[0] or "/" for i in range(1, private.count("/") + 1)]
        if any(match_path(pattern, a) for a in ancestors) or (literal and _is_within(literal or "/", private)):
            return private
    return None


def _scandir_subdirs(path: str) -> list[str]:
    """Names of real (non-symlink) directories in `path`; [] if unreadable."""
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _scandir_names(path: str) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries]
    except OSError:
        return []


def _segment_regex(segment: str) -> re.Pattern[str]:
    """`*` matches any run of characters within one segment, nothing else is special."""
    return re.compile("[^/]*".join(re.escape(part) for part in segment.split("*")) + r"\Z")


def glob_expand(
    pattern: str,
    *,
    list_subdirs: Callable[[str], list[str]] = _scandir_subdirs,
    isdir: Callable[[str], bool] = os.path.isdir,
) -> list[str]:
    """Directories matching `pattern`, sorted.

    `*` matches within one path segment, `**` matches any number of segments
    (zero included). Wildcards only match real directories, never symlinks,
    so expansion cannot loop and cannot be steered out of the tree by a link
    planted in it. Literal segments are taken as written.
    """
    segments = [s for s in pattern.split("/") if s]
    found: set[str] = set()

    def walk(base: str, rest: list[str]) -> None:
        if not rest:
            if isdir(base):
                found.add(base)
            return
        head, tail = rest[0], rest[1:]
        if head == "**":
            walk(base, tail)
            for name in list_subdirs(base):
                walk(os.path.join(base, name), rest)
        elif "*" in head:
            regex = _segment_regex(head)
            for name in list_subdirs(base):
                if regex.match(name):
                    walk(os.path.join(base, name), tail)
        else:
            walk(os.path.join(base, head), tail)

    walk("/", segments)
    return sorted(found)


def _expand_names(
    pattern: str, list_names: Callable[[str], list[str]]
) -> list[str]:
    """Base-profile globs: `*` within the last segment only, files or dirs."""
    parent, _, last = pattern.rpartition("/")
    regex = _segment_regex(last)
    return sorted(os.path.join(parent or "/", n) for n in list_names(parent or "/") if regex.match(n))


# ---------------------------------------------------------------- base profile


def load_base_profile(path: str | os.PathLike[str] = DEFAULT_BASE_PROFILE) -> BaseProfile:
    """Parse and check the base profile YAML."""
    import yaml  # local: keeps CLI start-up light

    source = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as exc:
        raise LandlockCompileError(f"landlock: cannot read base profile {source}: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != 1:
        raise LandlockCompileError(f"landlock: {source}: expected a mapping with version: 1")
    entries = []
    for index, item in enumerate(document.get("rules") or ()):
        where = f"{source}: rules[{index}]"
        if not isinstance(item, dict) or set(item) != {"path", "access"}:
            raise LandlockCompileError(f"landlock: {where}: needs exactly path and access")
        entry_path, access = item["path"], item["access"]
        if not isinstance(entry_path, str) or not entry_path.startswith("/"):
            raise LandlockCompileError(f"landlock: {where}: path must be absolute")
        if not isinstance(access, list) or not access:
            raise LandlockCompileError(f"landlock: {where}: access must be a non-empty list")
        try:
            rights = ordered_rights(access)
        except LandlockCompileError as exc:
            raise LandlockCompileError(f"{exc} at {where}") from None
        if "*" in entry_path.rpartition("/")[0]:
            raise LandlockCompileError(f"landlock: {where}: `*` only in the last segment")
        entries.append(BaseEntry(os.path.normpath(entry_path), rights))

    def path_list(key: str) -> tuple[str, ...]:
        values = document.get(key) or ()
        if not all(isinstance(v, str) and v.startswith("/") for v in values):
            raise LandlockCompileError(f"landlock: {source}: {key} must list absolute paths")
        return tuple(os.path.normpath(v) for v in values)

    return BaseProfile(tuple(entries), path_list("never"), path_list("agent_private"), source)


_base_cache: dict[str, BaseProfile] = {}


def default_base_profile() -> BaseProfile:
    key = str(DEFAULT_BASE_PROFILE)
    if key not in _base_cache:
        _base_cache[key] = load_base_profile(DEFAULT_BASE_PROFILE)
    return _base_cache[key]


# ---------------------------------------------------------------- compiler


def _mask_for_target(rights: tuple[str, ...], is_dir: bool) -> tuple[str, ...]:
    return rights if is_dir else tuple(r for r in rights if r in FILE_RIGHTS)


def compile_landlock(
    policy: Policy,
    *,
    state_dir: str | None = None,
    exec_paths: tuple[str, ...] = (),
    expand: Callable[[str], list[str]] = glob_expand,
    exists: Callable[[str], bool] = os.path.exists,
    isdir: Callable[[str], bool] = os.path.isdir,
    list_names: Callable[[str], list[str]] = _scandir_names,
    realpath: Callable[[str], str] = os.path.realpath,
    base: Optional[BaseProfile] = None,
    install_dir: str = AGENT_INSTALL_DIR,
) -> LandlockArtifact:
    """Build the Landlock ruleset for `policy` at the current ABI."""
    base = base if base is not None else default_base_profile()
    notes: list[str] = []
    rules: list[PathRule] = []

    def add(path: str, rights: tuple[str, ...], origin: str) -> None:
        # A path missing at compile time keeps its directory rights: the
        # enforcer fails closed when it cannot open it at launch.
        masked = _mask_for_target(ordered_rights(rights), isdir(path) or not exists(path))
        if not masked:
            notes.append(f"{origin}: {path} is not a directory and none of "
                         f"{list(rights)} apply to files; rule dropped")
            return
        rules.append(PathRule(path, masked, origin))

    # Base runtime profile.
    for entry in base.rules:
        if "*" in entry.path:
            matches = [m for m in _expand_names(entry.path, list_names) if exists(m)]
            if not matches:
                notes.append(f"base: {entry.path} matches nothing on this host; skipped")
        else:
            # Checked before existence so a bad entry fails on every host.
            matches = [entry.path]
        for match in matches:
            for never in base.never:
                if _overlaps(match, never):
                    raise LandlockCompileError(
                        f"landlock: base profile {base.source}: {match} reaches forbidden {never}")
            if "*" not in entry.path and not exists(match):
                notes.append(f"base: {match} does not exist on this host; skipped")
                continue
            add(match, entry.access, "base")
    install = os.path.normpath(install_dir)
    for rule in list(rules):
        if _is_within(rule.path, install):
            raise LandlockCompileError(
                f"landlock: base rule {rule.path} exposes the agent install dir {install}")
        if _is_within(install, rule.path):
            notes.append(f"base: agent install dir {install} is readable through {rule.path}; "
                         "Landlock cannot exclude a subtree, install skillguard outside it to hide it")

    # The skill's own state directory (chosen by the agent, so it may live
    # under an agent-private tree).
    if state_dir is not None:
        if not state_dir.startswith("/"):
            raise LandlockCompileError(f"landlock: state dir {state_dir!r} is not absolute")
        state = os.path.normpath(state_dir)
        for private in base.agent_private:
            if _is_within(private, state):
                raise LandlockCompileError(
                    f"landlock: state dir {state} would expose agent-private {private}")
        rules.append(PathRule(state, READ_WRITE, "state-dir"))

    def check_private(path: str, origin: str) -> None:
        # The kernel follows symlinks when the rule is added, so check where
        # the path leads now as well as what it says. (A link swapped after
        # compilation is not caught here; the enforcer reports what it opened.)
        for candidate in dict.fromkeys((path, realpath(path))):
            for private in base.agent_private + (install,):
                if _overlaps(candidate, private):
                    raise LandlockCompileError(
                        f"landlock: {origin}: {path} reaches skillguard's private path {private}")

    # The program the launcher executes, and shell-allowed binaries.
    if policy.entrypoint:
        command = policy.entrypoint[0]
        if command.startswith("/"):
            command = os.path.normpath(command)
            check_private(command, "entrypoint")
            add(command, EXECUTE_FILE, "entrypoint")
        else:
            notes.append(f"entrypoint: {command!r} is not an absolute path; the launcher "
                         "resolves it and passes it in exec_paths")
    for exec_path in exec_paths:
        if not exec_path.startswith("/"):
            raise LandlockCompileError(f"landlock: exec path {exec_path!r} is not absolute")
        exec_path = os.path.normpath(exec_path)
        check_private(exec_path, "exec")
        add(exec_path, EXECUTE_FILE, "exec")

    # Manifest fs.dirs.
    for grant in policy.fs.grants:
        origin = f"manifest:{grant.pattern}:{grant.access}"
        if not grant.pattern.startswith("/"):
            raise LandlockCompileError(f"landlock: {origin}: path is not absolute")
        rights = READ_WRITE if grant.access == "rw" else READ_ONLY
        if grant.is_glob:
            matches = _outermost(expand(grant.pattern))
            if not matches:
                notes.append(f"{origin}: glob matches no directory; no rule")
        else:
            # A missing literal path stays in the artifact: the enforcer
            # fails on it (ENOENT), because the manifest asked for it.
            matches = [os.path.normpath(grant.pattern)]
        for match in matches:
            check_private(match, origin)
            add(match, rights, origin)

    handled_net, connect_ports = _network(policy, notes)
    return LandlockArtifact(
        abi=CURRENT_ABI,
        handled_fs=fs_rights_for_abi(CURRENT_ABI),
        path_rules=tuple(rules),
        handled_net=handled_net,
        connect_ports=connect_ports,
        scopes=SCOPES,
        notes=tuple(notes),
    )


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths lying under another one: a path-beneath rule covers its subtree."""
    kept: list[str] = []
    for path in sorted(paths, key=lambda p: (p.count("/"), p)):
        if not any(_is_within(path, outer) for outer in kept):
            kept.append(path)
    return sorted(kept)


def _network(policy: Policy, notes: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    tcp_rules = policy.tcp.grants
    url_rules = policy.http.grants
    if any(rule.port is None for rule in tcp_rules):
        any_port = sorted(rule.text for rule in tcp_rules if rule.port is None)
        notes.append("net: connect_tcp not handled because tcp rule(s) "
                     f"{any_port} allow any port; the netns/nftables layer enforces destinations")
        return ("bind_tcp",), ()
    ports = {rule.port for rule in tcp_rules if rule.port is not None}
    ports |= {rule.port for rule in url_rules}
    if any(rule.host.name is not None for rule in (*tcp_rules, *url_rules)):
        # glibc's resolver retries over TCP when a UDP answer is truncated
        # (resolv.conf(5), use-vc); the agent's DNS stub is the only server
        # the netns reaches, so the port opens no new destination.
        ports.add(DNS_PORT)
        notes.append(f"net: TCP port {DNS_PORT} allowed for DNS over TCP (rules name hosts)")
    if not ports:
        notes.append("net: no network grant; every TCP connect is denied")
    notes.append("net: bind_tcp handled with no ports; skills do not listen on TCP")
    return NET_RIGHTS, tuple(sorted(ports))


# ---------------------------------------------------------------- downgrade


def downgrade(artifact: LandlockArtifact, abi: int) -> tuple[LandlockArtifact, list[str]]:
    """Fit `artifact` to a kernel offering Landlock `abi`.

    Drops the rights, network handling and scopes that ABI lacks, and
    returns a description of each drop: best effort, never silent.
    """
    if abi < 1:
        raise LandlockCompileError(f"landlock: ABI {abi} cannot enforce anything")
    if abi >= artifact.abi:
        return artifact, []
    dropped: list[str] = []
    supported = set(fs_rights_for_abi(abi))
    lost_fs = [r for r in artifact.handled_fs if r not in supported]
    if lost_fs:
        dropped.append(f"fs rights {lost_fs} unknown to ABI {abi}: not handled (allowed everywhere)")
        if "refer" in lost_fs:
            dropped.append(f"refer unknown to ABI {abi}: the kernel then denies every rename "
                           "or link across directories")
    rules = []
    for rule in artifact.path_rules:
        access = tuple(r for r in rule.access if r in supported)
        if access:
            rules.append(replace(rule, access=access))
        else:
            dropped.append(f"rule {rule.path} ({rule.origin}): no right left at ABI {abi}")
    handled_net, ports = artifact.handled_net, artifact.connect_ports
    if abi < NET_ABI and (handled_net or ports):
        dropped.append(f"net {list(handled_net)} ports {list(ports)} need ABI {NET_ABI}: "
                       "TCP is left to the netns/nftables layer")
        handled_net, ports = (), ()
    scopes = artifact.scopes
    if abi < SCOPE_ABI and scopes:
        dropped.append(f"scopes {list(scopes)} need ABI {SCOPE_ABI}: abstract unix sockets "
                       "and signals are not scoped")
        scopes = ()
    return (
        replace(
            artifact,
            abi=abi,
            handled_fs=tuple(r for r in artifact.handled_fs if r in supported),
            path_rules=tuple(rules),
            handled_net=handled_net,
            connect_ports=ports,
            scopes=scopes,
        ),
        dropped,
    )
