"""The launch plan: everything `skillguard run` decides before it forks.

`build()` runs the compilers (seccomp, Landlock, exec policy, env, limits)
and allocates the skill's identity; the result is a dict of plain values
(str, int, bytes, lists, dicts) that the supervisor and the child execute
with nothing but system calls (agent/launch/supervisor.py, init/skillguard-init.c), so a
plan can be stored with `marshal` and reused by the next launch of the same
manifest (agent/launch/plan_cache.py) without importing the compilers.

A plan depends on the filesystem as well as on its inputs (which base
profile paths exist, where PATH finds a program, which file a rule names,
who owns a granted directory). Every path the compilers looked at is
recorded with its stat() in `plan["witness"]`; a stored plan is used only
while every witness still holds (`plan_cache.witness_holds`).
"""
from __future__ import annotations

import os

from agent.launch.init_wire import PINNED_EXEC_FD  # the pinned entrypoint's Landlock rule path
from agent.launch.plan_cache import stat_key

PLAN_VERSION = 1


class _Recorder:
    """Filesystem look-ups for the compilers that remember what they saw."""

    def __init__(self):
        self.seen: dict[str, object] = {}
        self.cacheable = True  # False: never store this plan (a network grant)

    def note(self, path: str, listed: bool = False) -> None:
        if path not in self.seen or listed:
            self.seen[path] = stat_key(path, listed)

    def exists(self, path: str) -> bool:
        self.note(path)
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        self.note(path)
        return os.path.isdir(path)

    def stat(self, path: str):
        self.note(path)
        return os.stat(path)

    def realpath(self, path: str) -> str:
        self.note(path)
        real = os.path.realpath(path)
        self.note(real)
        return real

    def list_names(self, path: str) -> list[str]:
        # A directory's mtime changes when an entry is added, removed or renamed.
        from agent.compile.landlock import _scandir_names

        self.note(path, listed=True)
        return _scandir_names(path)

    def list_exec_names(self, path: str) -> list[str]:
        from agent.compile.exec_policy import _list_names

        self.note(path, listed=True)
        return _list_names(path)

    def list_subdirs(self, path: str) -> list[str]:
        from agent.compile.landlock import _scandir_subdirs

        self.note(path, listed=True)
        return _scandir_subdirs(path)

    def expand(self, pattern: str) -> list[str]:
        from agent.compile.landlock import glob_expand

        return glob_expand(pattern, list_subdirs=self.list_subdirs, isdir=self.isdir)

    def witness(self) -> list:
        return sorted(self.seen.items())


class PlanError(Exception):
    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


def _resolve(command: str, path: str, cwd: str, rec: _Recorder) -> str:
    if "/" in command:
        return os.path.normpath(os.path.join(cwd, command))
    for directory in path.split(":"):
        rec.note(directory, listed=True)  # a program added earlier in PATH changes the answer
        candidate = os.path.join(directory, command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            rec.note(candidate)
            return candidate
    raise PlanError("exec", f"{command!r} not found in PATH {path}")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _seccomp_for_launch(policy):
    """The policy's filter with every denial routed to the supervisor.

    The compiler answers the base profile's always_deny set with EPERM in the
    kernel; here those syscalls are left to the default USER_NOTIF action so
    each attempt is reported, and the supervisor answers them EPERM in every
    mode. If the supervisor is gone the kernel fails them with ENOSYS
    (seccomp_unotify(2)), so they stay denied.
    """
    from dataclasses import replace

    from agent.compile import seccomp

    base = seccomp.load_base_profile()
    for name in policy.syscalls.allow:
        if name in base.always_deny:
            raise PlanError("seccomp", f"syscalls.allow: {name!r} is always denied "
                                       "and no manifest can allow it")
    routed = replace(base, always_deny=())
    try:
        # execve/execveat always reach the supervisor: exec supervision.
        artifact = seccomp.compile_seccomp(policy, deny_action="notify", profile=routed,
                                           notify=("execve", "execveat"))
    except (ValueError, RuntimeError) as exc:
        raise PlanError("seccomp", str(exc)) from None
    return {"bpf": artifact.bpf, "always_deny": sorted(base.always_deny),
            "arg_checked": sorted(artifact.arg_checked), "names": _syscall_names()}


def _syscall_names() -> dict:
    """{number: name} of every x86_64 syscall libseccomp knows: the supervisor
    names each notification without importing libseccomp."""
    import pyseccomp

    names = {}
    for nr in range(1024):
        try:
            name = pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, nr)
        except (ValueError, OSError):
            continue
        if name:
            names[nr] = name.decode() if isinstance(name, bytes) else str(name)
    return names


def build(policy, options, *, caller_cwd: str | None = None) -> dict:
    """The launch plan for `policy` under `options` (supervisor.RunOptions).

    Raises PlanError naming the layer. Side effects: the skill's uid is
    allocated and its state dir made (agent/launch/identity.py), and for a
    network grant the resolver file is written (agent/launch/netns.py).
    """
    from dataclasses import replace

    from agent.cache import key_of, memo
    from agent.compile.env import fixed_env, passable_names
    from agent.compile.landlock import (EXECUTE_FILE, READ_WRITE, LandlockCompileError,
                                        PathRule, compile_landlock, default_base_profile)
    from agent.compile.rlimits import compile_limits, compile_rlimits
    from agent.enforce.cgroup import safe_name
    from agent.launch.identity import IdentityError, allocate, state_root

    rec = _Recorder()
    notes: list[str] = []
    try:
        root = state_root(options.state_root)
    except IdentityError as exc:
        raise PlanError("identity", str(exc)) from None
    network = None
    resolv = None
    if policy.network_granted:
        from agent.config import ConfigError, load_host_config
        from agent.launch.netns import NetworkSetupError, plan_network, resolv_conf

        try:
            host = options.host_config or load_host_config()
            network = plan_network(policy, host, root)
            resolv = resolv_conf(root)
        except (ConfigError, NetworkSetupError, IdentityError, OSError) as exc:
            raise PlanError("network", str(exc)) from None
        rec.cacheable = False  # the address pool and resolver are per launch
    try:
        identity = allocate(policy.name, root=options.state_root, range_=options.uid_range)
    except (IdentityError, OSError) as exc:
        raise PlanError("identity", str(exc)) from None
    rec.note(identity.state_dir)
    rec.note(os.path.join(root, "uids.json"))

    env_fixed = fixed_env(policy, home=identity.state_dir, user=identity.user)
    argv = list(options.argv or policy.entrypoint)
    if not argv:
        raise PlanError("exec", "no command given and the manifest has no entrypoint")
    caller_cwd = caller_cwd or os.getcwd()
    grants = [g.pattern for g in policy.fs.grants if not g.is_glob]
    cwd = options.cwd or next((caller_cwd for g in grants if _within(caller_cwd, g)),
                              identity.state_dir)
    executable = _resolve(argv[0], env_fixed["PATH"], cwd, rec)
    pinned = bool(policy.entrypoint_sha256)

    try:
        # The base profile's parse is memoized (it is pure in its file).
        base = memo("landlock-base", b"", default_base_profile, root=root)
        landlock = compile_landlock(policy, base=base, state_dir=identity.state_dir,
                                    exec_paths=(executable,), expand=rec.expand,
                                    exists=rec.exists, isdir=rec.isdir,
                                    list_names=rec.list_names, realpath=rec.realpath)
    except LandlockCompileError as exc:
        raise PlanError("landlock", str(exc)) from None
    audit = bool(options.audit or policy.mode == "audit")
    landlock, exec_rules = _plan_exec(policy, landlock, env_fixed["PATH"], executable, audit,
                                      notes, rec)
    # The private /tmp is a tmpfs mounted by the child; this rule is opened
    # after the mount, so it names that tmpfs, not the host's /tmp.
    landlock = replace(landlock, path_rules=landlock.path_rules
                       + (PathRule("/tmp", READ_WRITE, "private-tmp"),))
    if pinned:
        # Grant execute on the pinned inode (the child opens /proc/self/fd/N,
        # which leads to the fd's file), not on whatever the path names by then.
        landlock = replace(landlock, path_rules=tuple(
            r for r in landlock.path_rules
            if not (r.path == os.path.normpath(executable) and r.origin in ("entrypoint", "exec"))
        ) + (PathRule(PINNED_EXEC_FD, EXECUTE_FILE, "entrypoint-pinned"),))
    if network is not None and "connect_tcp" in landlock.handled_net:
        # The skill's nftables table checks address *and* port and reports
        # each refusal (NFLOG); a Landlock port check would refuse first,
        # silently. bind_tcp stays handled: skills never listen.
        landlock = replace(landlock, connect_ports=(),
                           handled_net=tuple(r for r in landlock.handled_net if r != "connect_tcp"),
                           notes=tuple(t for t in landlock.notes if "connect" not in t and "port 53" not in t)
                           + ("net: connect_tcp left to the skill's nftables table (address and port; "
                              "every refusal is an event)",))
    for text in landlock.notes:
        if not text.startswith("base:"):
            notes.append(f"landlock: {text}")
    fitted = None
    if options.audit:
        notes.append("landlock: skipped (--audit on the command line); file access is not confined")
    else:
        from agent.enforce.landlock import LandlockUnsupported, fitted as fit, probe_abi

        try:
            abi = probe_abi()
        except LandlockUnsupported as exc:
            raise PlanError("landlock", str(exc)) from None
        try:
            fitted, dropped = fit(landlock, abi)
        except LandlockCompileError as exc:
            raise PlanError("landlock", str(exc)) from None
        notes.extend(f"landlock: downgrade: {text}" for text in dropped)

    seccomp = memo("seccomp-launch-plan", key_of(policy), lambda: _seccomp_for_launch(policy), root=root)
    limits = compile_limits(policy.resources)
    import resource

    rlimits = [(getattr(resource, r.name), r.soft, r.hard) for r in compile_rlimits(policy.resources)]
    binds = _binds(landlock, identity, notes, rec)
    from agent.enforce.cgroup import _mounts

    mounts = _mounts()
    for path in [mounts.v2, *mounts.v1.values()]:
        if path is not None:
            rec.note(str(path))
    import pickle

    return {
        "version": PLAN_VERSION,
        "skill": policy.name,
        "mode": policy.mode,
        "audit": audit,
        "landlock_skipped": bool(options.audit),
        "argv": argv,
        "executable": executable,
        "cwd": cwd,
        "entrypoint_sha256": policy.entrypoint_sha256 or None,
        "env_fixed": env_fixed,
        "env_pass": sorted(passable_names(policy)),
        "uid": identity.uid,
        "gid": identity.gid,
        "state_dir": identity.state_dir,
        "hostname": safe_name(policy.name)[:64],
        "cgroup": {"skill": policy.name, "v2": None if mounts.v2 is None else str(mounts.v2),
                   "v1": {c: str(p) for c, p in mounts.v1.items()},
                   "limits": [limits.memory_bytes, limits.cpu, limits.pids]},
        "timeout_s": policy.resources.timeout_s,
        "pids_limit": policy.resources.pids,
        "memory_bytes": policy.resources.memory_bytes,
        "binds": binds,
        "tmp_size": limits.memory_bytes,
        "resolv_conf": resolv,
        "rlimits": rlimits,
        "landlock": fitted,
        "seccomp": seccomp,
        "syscalls_deny": sorted(policy.syscalls.deny),
        "exec_rules": pickle.dumps(exec_rules),
        "network": pickle.dumps(network) if network is not None else None,
        "notes": notes,
        "cacheable": rec.cacheable,
        "witness": rec.witness(),
    }


def _plan_exec(policy, landlock, path_env: str, executable: str, audit: bool, notes: list,
               rec: _Recorder):
    """Compile the shell allowlist and pin Landlock execute rights to the
    programs it admits plus the entrypoint."""
    from agent.compile.exec_policy import (ExecPolicyError, compile_exec_rules,
                                           execute_pins, pin_execute)

    writable = ["/tmp"] + [rule.path for rule in landlock.path_rules
                           if "write_file" in rule.access or "make_reg" in rule.access]
    try:
        rules = compile_exec_rules(policy.shell, path_env, writable=writable, stat=rec.stat,
                                   realpath=rec.realpath, list_names=rec.list_exec_names)
    except ExecPolicyError as exc:
        raise PlanError("shell", str(exc)) from None
    notes.extend(f"shell: {text}" for text in rules.notes)
    if audit:
        notes.append("shell: audit mode: refused execs are reported and allowed; Landlock "
                     "execute rights are not pinned")
        return landlock, rules
    if rules.any_program:
        return landlock, rules
    programs = rules.programs
    entry = rec.realpath(executable)
    pins = execute_pins(programs + (executable,), realpath=rec.realpath)
    for pin in pins:
        rec.note(pin)
    # The entrypoint keeps the rule the launcher made for it (a path, or the
    # pinned fd); here only what the kernel opens to run it is added.
    return pin_execute(landlock, tuple(p for p in pins if p != entry or p in programs)), rules


def _binds(landlock, identity, notes: list, rec: _Recorder) -> list:
    """[path, writable, origin, owner] for each manifest directory: owner is
    [uid, gid] on disk when it is not the skill's (the mount is idmapped to
    the skill's ids), else None."""
    binds = [[identity.state_dir, True, "state-dir", None]]
    for rule in landlock.path_rules:
        if not rule.origin.startswith("manifest:"):
            continue
        writable = rule.origin.endswith(":rw")
        rec.note(rule.path)
        try:
            st = os.stat(rule.path)
        except OSError as exc:
            raise PlanError("mount", f"{rule.origin}: {rule.path}: {exc.strerror}") from None
        owner = None
        if (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
            owner = [st.st_uid, st.st_gid]
            notes.append(f"mount: {rule.path} owned by {st.st_uid}:{st.st_gid} is idmapped "
                         f"to the skill's {identity.uid}:{identity.gid}")
        binds.append([rule.path, writable, rule.origin, owner])
    return binds
