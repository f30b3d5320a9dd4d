"""The API methods (docs/api.md). Each is `async (daemon, conn, params, fds) -> result`.

Parameters are checked before anything changes: bad input is an
INVALID_PARAMS error naming the parameter, and the daemon's state is as
before.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal as _signal
import time

from agent.daemon import protocol
from agent.daemon.policies import load_policy_text
from agent.daemon.protocol import RpcError, check_known, param
from agent.daemon.registry import boot_id
from agent.daemon.skills import Skill, new_id

try:
    from agent.package import PackageError
    from agent.package.trust import admit_manifest, admit_package
except ImportError:  # a build without package support
    PackageError = admit_manifest = admit_package = None

LAUNCH_START_TIMEOUT_S = 30.0


# ---------------------------------------------------------------- policy source


def _resolve_policy(daemon, params: dict):
    """(Policy, manifest text, source) from exactly one of skill / manifest / package."""
    given = [k for k in ("skill", "manifest", "package") if params.get(k) is not None]
    if len(given) != 1:
        raise RpcError(protocol.INVALID_PARAMS,
                       "give exactly one of params.skill (a policy in the policy directory), "
                       "params.manifest (inline YAML text) or params.package (a package path)")
    if given[0] == "skill":
        name = param(params, "skill", str)
        entry = daemon.policies.get(name)
        if entry is None:
            errors = [p for path, problems in daemon.policies.errors.items() for p in problems]
            hint = f"; rejected files: {' | '.join(errors[:3])}" if errors else ""
            raise RpcError(protocol.NOT_FOUND, f"no valid policy named {name!r} in "
                                               f"{daemon.config.policy_dir}{hint}")
        return entry.policy, entry.text, entry.path
    if given[0] == "manifest":
        text = param(params, "manifest", str)
        _admit_manifest(daemon)
        return _load_checked(text, "<inline manifest>") + ("inline",)
    path = param(params, "package", str, check=os.path.isabs, what="an absolute path")
    text = _admit_package(daemon, path)
    return _load_checked(text, f"{path}:manifest") + (path,)


_POLICY_CACHE: dict = {}  # sha256 of (source, text) -> (policy, problems); runtimes send the same manifests
_POLICY_CACHE_MAX = 256


def _load_checked(text: str, source: str):
    key = hashlib.sha256(source.encode() + b"\0" + text.encode()).digest()
    cached = _POLICY_CACHE.get(key)
    if cached is None:
        cached = load_policy_text(text, source)
        if len(_POLICY_CACHE) >= _POLICY_CACHE_MAX:
            _POLICY_CACHE.pop(next(iter(_POLICY_CACHE)))
        _POLICY_CACHE[key] = cached
    policy, problems = cached
    if policy is None:
        raise RpcError(protocol.POLICY_INVALID, "the manifest is invalid; nothing was changed",
                       {"errors": problems})
    return policy, text


def _admit_manifest(daemon) -> None:
    if admit_manifest is None:
        if daemon.config.require_signed:
            raise RpcError(protocol.PACKAGE_REFUSED, "require_signed is true and package "
                                                     "verification is not available")
        return
    try:
        admit_manifest(daemon.config)
    except PackageError as exc:
        raise RpcError(protocol.PACKAGE_REFUSED, f"package: {exc}; nothing was changed",
                       {"reason": exc.reason}) from None


def _admit_package(daemon, path: str) -> str:
    if admit_package is None:
        raise RpcError(protocol.PACKAGE_REFUSED, "packages are not supported by this build")
    try:
        admission = admit_package(path, daemon.config)
    except PackageError as exc:
        raise RpcError(protocol.PACKAGE_REFUSED, f"package: {exc}; nothing was changed",
                       {"reason": exc.reason, "package": path}) from None
    except OSError as exc:
        raise RpcError(protocol.PACKAGE_REFUSED, f"package: {path}: {exc.strerror}; nothing was changed",
                       {"reason": "invalid-package", "package": path}) from None
    text = admission.manifest_text
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RpcError(protocol.POLICY_INVALID, f"package: {path}: manifest.yaml is not UTF-8 "
                                                    f"({exc.reason}); nothing was changed",
                           {"errors": [f"{path}:manifest.yaml: not UTF-8"]}) from None
    return text


def _skill(daemon, params: dict, *, finished: bool = False) -> Skill:
    skill_id = param(params, "id", str)
    skill = daemon.skills.get(skill_id)
    if skill is None and finished:
        skill = daemon.finished.get(skill_id)
    if skill is None:
        raise RpcError(protocol.NOT_FOUND, f"no skill with id {skill_id!r}")
    return skill


# ---------------------------------------------------------------- register


async def register(daemon, conn, params, fds):
    check_known(params, {"pids", "skill", "manifest", "package", "require", "tree"})
    pids = param(params, "pids", list, check=protocol.pid_list,
                 what="a non-empty list of process ids")
    require = param(params, "require", list, default=[], check=protocol.string_list,
                    what="a list of layer names")
    if require and daemon.attacher.available() is None:
        known = daemon.attacher.layer_names()
        unknown = [layer for layer in require if layer not in known]
        if unknown:
            raise RpcError(protocol.INVALID_PARAMS, f"params.require: unknown layer(s) {unknown} "
                                                    f"(one of {', '.join(known)})")
    tree = param(params, "tree", bool, default=False)
    policy, text, source = _resolve_policy(daemon, params)
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise RpcError(protocol.NOT_FOUND, f"params.pids: no process {pid}; nothing was changed")
        owner = _owner_of(daemon, pid)
        if owner is not None:
            raise RpcError(protocol.CONFLICT, f"params.pids: process {pid} is already confined as "
                                              f"{owner.id} ({owner.name}); nothing was changed")
        if daemon.attacher.reserved(pid):
            raise RpcError(protocol.CONFLICT, f"params.pids: process {pid} is being registered by "
                                              "another request; nothing was changed")
    skill = Skill(id=new_id("registered"), kind="registered", name=policy.name, manifest_text=text,
                  source=source, policy=policy, boot_id=boot_id(), required=tuple(require), tree=tree)
    # Attached, recorded and added to the daemon (or refused, nothing changed)
    # together with the registrations that arrived beside it.
    await daemon.attacher.attach(skill, policy, pids, tree, require)
    return {"id": skill.id, "skill": skill.name, "pids": list(skill.pids), "layers": skill.layers,
            "cgroup": skill.cgroup_paths[0] if skill.cgroup_paths else None,
            "cgroup_id": skill.cgroup_id}


def _owner_of(daemon, pid: int):
    skill = daemon.pid_owner.get(pid)
    return skill if skill is not None and skill.live else None


async def unregister(daemon, conn, params, fds):
    check_known(params, {"id"})
    skill = _skill(daemon, params)
    if skill.kind != "registered":
        raise RpcError(protocol.INVALID_PARAMS, f"{skill.id} was launched, not registered: "
                                                "stop it with `signal` (its supervisor cleans up)")
    daemon.end_registered(skill, "unregistered through the API")
    return {"id": skill.id, "unregistered": True}


# ---------------------------------------------------------------- launch


async def launch(daemon, conn, params, fds):
    check_known(params, {"skill", "manifest", "package", "argv", "cwd", "workdir", "env", "audit", "stdio",
                         "invoked_by"})
    argv = param(params, "argv", list, default=[], check=lambda v: all(isinstance(a, str) for a in v),
                 what="a list of strings")
    cwd = param(params, "cwd", str, default=None, check=os.path.isabs, what="an absolute path")
    env = param(params, "env", dict, default=None,
                check=lambda v: all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
                what="an object of string values")
    workdir = param(params, "workdir", str, default=None, check=os.path.isabs, what="an absolute path")
    audit = param(params, "audit", bool, default=False)
    stdio = param(params, "stdio", bool, default=False)
    if stdio and len(fds) != 3:
        raise RpcError(protocol.INVALID_PARAMS, f"params.stdio is true: send exactly 3 file descriptors "
                                                f"(stdin, stdout, stderr) with SCM_RIGHTS in the same "
                                                f"message as the request; got {len(fds)}")
    invoked_by = param(params, "invoked_by", str, default=None, check=bool, what="a skill id or policy name")
    policy, text, source = _resolve_policy(daemon, params)
    if invoked_by is not None:
        # The launch path of the invoke policy: a skill started for a caller
        # only when both manifests agree; a refusal is recorded like `invoke`'s.
        caller_policy, caller_skill = _invoke_party(daemon, params, "invoked_by")
        _authorize_invoke(daemon, caller_policy, caller_skill, policy, None, raise_on_refusal=True)
    from agent.daemon.launcher import PLANS, start_supervisor
    from agent.daemon.registry import process_start_time
    from agent.launch.supervisor import RunOptions

    config = daemon.config
    wanted = {"argv": tuple(argv), "audit": audit, "state_root": config.state_root,
              "uid_range": config.uid_range, "caller_env": env if env is not None else {}, "cwd": workdir,
              # Network settings, for the RunOptions fields the network layer defines.
              "address_pool": config.address_pool, "dns_upstream": config.dns_upstream}
    known = set(RunOptions.FIELDS)
    options = RunOptions(**{k: v for k, v in wanted.items() if k in known})
    skill = Skill(id=new_id("launched"), kind="launched", name=policy.name, manifest_text=text,
                  source=source, policy=policy, boot_id=boot_id(), argv=tuple(argv))
    started_at = time.monotonic()
    daemon.pipeline.flush()
    stdio_fds = list(fds) if stdio else []
    plan = PLANS.get(policy, text, options, cwd)  # None: the supervisor compiles and says why not
    try:
        supervisor_pid, pidfd, supervisor_start = await start_supervisor(
            daemon, skill.id, policy, options, stdio_fds, cwd, config.state_root, plan)
    finally:
        if stdio:
            for fd in fds:
                os.close(fd)
            fds[:] = [-1] * len(fds)  # closed here; the connection must not close them again
    skill.supervisor_pid = supervisor_pid
    skill.supervisor_start = supervisor_start if pidfd is not None else process_start_time(supervisor_pid)
    if not daemon.watch_supervisor(skill, pidfd):
        skill.state = "failed"
    daemon.add_skill(skill)
    future = daemon.loop.create_future()
    skill.started_waiters.append(future)
    try:
        await asyncio.wait_for(asyncio.shield(future), LAUNCH_START_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RpcError(protocol.LAUNCH_FAILED, f"launch {skill.id}: the supervisor did not start "
                                               f"the skill within {LAUNCH_START_TIMEOUT_S:g}s",
                       {"id": skill.id}) from None
    daemon.metrics.launch_seconds.observe(time.monotonic() - started_at)
    if skill.pid is None:
        error = skill.error or {"layer": "launch", "reason": "the supervisor exited before the skill started"}
        raise RpcError(protocol.LAUNCH_FAILED, f"{error['layer']}: {error['reason']} "
                                               "(the skill was not started)",
                       {"id": skill.id, "layer": error["layer"], "exit_code": skill.exit_code})
    return {"id": skill.id, "skill": skill.name, "pid": skill.pid, "supervisor_pid": supervisor_pid,
            "notes": list(skill.notes)}


# ---------------------------------------------------------------- invoke


def _invoke_party(daemon, params: dict, key: str):
    """(Policy, live Skill or None) for params[key]: a skill id, else the name
    of a policy in the policy directory, else the name of live skills that all
    run the same manifest."""
    value = param(params, key, str, check=bool, what="a skill id or policy name")
    skill = daemon.skills.get(value)
    if skill is not None:
        policy = skill.policy
        if policy is None:
            policy, _ = _load_checked(skill.manifest_text, f"{skill.id}:manifest")
        return policy, skill
    entry = daemon.policies.get(value)
    if entry is not None:
        return entry.policy, None
    named = [s for s in daemon.skills.values() if s.name == value and s.live]
    if named:
        if len({s.manifest_text for s in named}) > 1:
            raise RpcError(protocol.CONFLICT, f"params.{key}: {len(named)} live skills named {value!r} run "
                                              "different manifests; give a skill id",
                           {"param": key, "ids": sorted(s.id for s in named)})
        first = min(named, key=lambda s: s.created)
        policy = first.policy
        if policy is None:
            policy, _ = _load_checked(first.manifest_text, f"{first.id}:manifest")
        return policy, None
    raise RpcError(protocol.NOT_FOUND, f"params.{key}: no live skill with id {value!r} and no skill or "
                                       f"policy named {value!r}", {"param": key, "value": value})


def _authorize_invoke(daemon, caller, caller_skill, callee, pid, *, raise_on_refusal: bool):
    from agent.invoke import invoke_violation, may_invoke

    decision = may_invoke(caller, callee)
    if not decision.allowed:
        daemon.publish(invoke_violation(caller, callee, decision, pid), caller_skill)
        if raise_on_refusal:
            raise RpcError(protocol.UNAUTHORIZED, f"invoke refused: {decision.reason}; nothing was changed",
                           {"layer": "invoke", "caller": caller.name, "callee": callee.name})
    return decision


async def invoke(daemon, conn, params, fds):
    check_known(params, {"caller", "callee", "pid"})
    pid = param(params, "pid", int, default=None, check=lambda v: v > 0,
                what="a process id")
    caller, caller_skill = _invoke_party(daemon, params, "caller")
    callee, callee_skill = _invoke_party(daemon, params, "callee")
    decision = _authorize_invoke(daemon, caller, caller_skill, callee, pid, raise_on_refusal=False)
    return {"allowed": decision.allowed, "reason": decision.reason,
            "caller": {"skill": caller.name, "id": caller_skill.id if caller_skill else None,
                       "rule": decision.caller_rule},
            "callee": {"skill": callee.name, "id": callee_skill.id if callee_skill else None,
                       "rule": decision.callee_rule}}


async def wait(daemon, conn, params, fds):
    check_known(params, {"id", "timeout"})
    timeout = param(params, "timeout", (int, float), default=None,
                    check=lambda v: 0 <= v <= 86400 * 365, what="a number of seconds")
    skill = _skill(daemon, params, finished=True)
    if skill.kind != "launched":
        raise RpcError(protocol.INVALID_PARAMS, f"{skill.id} is registered; only launched skills can be waited for")
    if skill.live:
        future = daemon.loop.create_future()
        skill.waiters.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            return {"id": skill.id, "state": skill.state, "exited": False}
    result = {"id": skill.id, "state": skill.state, "exited": True, "exit_code": skill.exit_code,
              "violations": [v.to_dict() for v in skill.violations], "notes": list(skill.notes)}
    if skill.error:
        result["error"] = skill.error
    return result


_SIGNALS = {"SIGTERM": _signal.SIGTERM, "SIGINT": _signal.SIGINT, "SIGHUP": _signal.SIGHUP,
            "SIGKILL": _signal.SIGKILL}


async def signal(daemon, conn, params, fds):
    check_known(params, {"id", "signal"})
    skill = _skill(daemon, params)
    name = param(params, "signal", str, default="SIGTERM", check=lambda v: v in _SIGNALS,
                 what=f"one of {', '.join(_SIGNALS)}")
    if skill.kind != "launched":
        raise RpcError(protocol.INVALID_PARAMS, f"{skill.id} is registered; `signal` is for launched skills")
    if name == "SIGKILL":
        # The whole skill, through its cgroup; the supervisor then reports the exit.
        from agent.daemon.cgroups import cgroup_from_paths

        cgroup = cgroup_from_paths(skill.cgroup_paths)
        if cgroup is not None:
            cgroup.kill()
    elif skill.pidfd is not None:
        # The supervisor forwards SIGINT/SIGTERM/SIGHUP to the skill.
        _signal.pidfd_send_signal(skill.pidfd, _SIGNALS[name])
    return {"id": skill.id, "signal": name}


# ---------------------------------------------------------------- read-only


async def list_(daemon, conn, params, fds):
    check_known(params, {"skill"})
    name = param(params, "skill", str, default=None)
    skills = [s.summary() for s in daemon.skills.values() if name is None or s.name == name]
    return {"skills": sorted(skills, key=lambda s: s["created"])}


async def inspect(daemon, conn, params, fds):
    check_known(params, {"id"})
    skill = _skill(daemon, params, finished=True)
    out = skill.detail()
    if skill.kind == "registered" and skill.live:
        out["network"] = daemon.attacher.network_counts(skill)
    return out


async def events(daemon, conn, params, fds):
    check_known(params, {"skill"})
    name = param(params, "skill", str, default=None)
    if conn.subscriber is not None:
        daemon.pipeline.unsubscribe(conn.subscriber)
    conn.subscriber = daemon.pipeline.subscribe(name, daemon.config.subscriber_queue, conn.drain_events)
    return {"subscribed": True, "skill": name, "queue": daemon.config.subscriber_queue}


async def reload(daemon, conn, params, fds):
    check_known(params, set())
    report = daemon.reload_policies()
    return report.to_dict()


async def status(daemon, conn, params, fds):
    check_known(params, set())
    pipeline = daemon.pipeline
    return {
        "api_version": protocol.API_VERSION,
        "version": daemon.version,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - daemon.started_at, 3),
        "socket": daemon.config.socket_path,
        "metrics": daemon.config.metrics_address or None,
        "config": daemon.config.source,
        "policy_dir": daemon.config.policy_dir,
        "policies": sorted(daemon.policies.by_name),
        "policy_errors": daemon.policies.errors,
        "skills": {"registered": sum(1 for s in daemon.skills.values() if s.kind == "registered"),
                   "launched": sum(1 for s in daemon.skills.values() if s.kind == "launched")},
        "register": "available" if daemon.attacher.available() is None else daemon.attacher.available(),
        "events": {"ingested": pipeline.ingested, "suppressed": pipeline.suppressed,
                   "lost": dict(pipeline.lost), "subscribers": len(pipeline.subscribers)},
        "registry_problems": daemon.registry_problems,
        "clients": len(daemon.connections),
        "caller": {"pid": conn.sender.pid, "uid": conn.sender.uid, "gid": conn.sender.gid},
        "connected_by": {"pid": conn.peer.pid, "uid": conn.peer.uid, "gid": conn.peer.gid},
    }


HANDLERS = {
    "register": register,
    "unregister": unregister,
    "launch": launch,
    "invoke": invoke,
    "wait": wait,
    "signal": signal,
    "list": list_,
    "inspect": inspect,
    "events": events,
    "reload": reload,
    "status": status,
}
