"""The CLI commands that talk to the daemon: daemon, ps, register, unregister,
events, status, and `run` delegated to a running daemon."""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Optional

RUN_LOCAL_ENV = "SKILLGUARD_RUN_LOCAL"


def _err(text: str) -> None:
    print(f"skillguard: error: {text}", file=sys.stderr)


def _client(args):
    from agent.client import Client, ClientError

    try:
        return Client(getattr(args, "socket", None))
    except ClientError as exc:
        _err(str(exc))
        return None


def _call(args, method: str, params: Optional[dict] = None):
    """(result, exit code): exit code 0 on success, else 1 after printing the error."""
    from agent.client import ClientError, RpcError

    client = _client(args)
    if client is None:
        return None, 1
    with client:
        try:
            return client.call(method, params or {}), 0
        except RpcError as exc:
            _err(f"{method}: {exc.message}")
            if exc.data:
                for line in (exc.data.get("errors") or []) if isinstance(exc.data, dict) else []:
                    print(line, file=sys.stderr)
            return None, 1
        except ClientError as exc:
            _err(str(exc))
            return None, 1


# ------------------------------------------------------------------ daemon


def cmd_daemon(args) -> int:
    from dataclasses import replace

    from agent.config import ConfigError, load_host_config

    try:
        config = load_host_config(args.config)
    except ConfigError as exc:
        _err(f"config: {exc}")
        return 1
    overrides = {k: v for k, v in (("socket_path", args.socket), ("metrics_address", args.metrics),
                                   ("state_root", args.state_root), ("policy_dir", args.policy_dir),
                                   ("log_path", args.log))
                 if v is not None}
    if overrides:
        from agent.config import _check

        problems = [f"--{k.replace('_', '-')}: {p}" for k, v in overrides.items()
                    if (p := _check(k, v)) and not (k == "metrics_address" and v == "")]
        if problems:
            for problem in problems:
                _err(problem)
            return 1
        config = replace(config, **overrides)
    if os.geteuid() != 0:
        _err("the daemon must run as root (it creates cgroups, namespaces and BPF programs)")
        return 1
    from agent.daemon.server import run_daemon

    return run_daemon(config)


# ------------------------------------------------------------------ read-only commands


def cmd_status(args) -> int:
    result, code = _call(args, "status")
    if result is None:
        return code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"skillguard daemon {result['version']} (API {result['api_version']}), pid {result['pid']}, "
          f"up {result['uptime_s']:.0f}s")
    print(f"socket     {result['socket']}")
    print(f"metrics    {result['metrics'] or 'off'}")
    print(f"config     {result['config']}")
    print(f"policies   {len(result['policies'])} from {result['policy_dir']}"
          + (f"; {len(result['policy_errors'])} rejected" if result["policy_errors"] else ""))
    for path, problems in result["policy_errors"].items():
        for problem in problems:
            print(f"  rejected {problem}")
    skills = result["skills"]
    print(f"skills     {skills['registered']} registered, {skills['launched']} launched")
    print(f"register   {result['register']}")
    ev = result["events"]
    lost = ", ".join(f"{reason} {count}" for reason, count in sorted(ev["lost"].items()))
    print(f"events     {ev['ingested']} ingested, {ev['suppressed']} suppressed, "
          f"{sum(ev['lost'].values())} lost{f' ({lost})' if lost else ''}, {ev['subscribers']} subscriber(s)")
    for problem in result["registry_problems"]:
        print(f"registry   {problem}")
    return 0


def cmd_ps(args) -> int:
    result, code = _call(args, "list", {"skill": args.skill} if args.skill else {})
    if result is None:
        return code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    rows = result["skills"]
    print(f"{'ID':<20} {'KIND':<10} {'SKILL':<20} {'STATE':<8} {'PIDS':<16} VIOLATIONS")
    for row in rows:
        pids = row.get("pids") or ([row["pid"]] if row.get("pid") else [])
        print(f"{row['id']:<20} {row['kind']:<10} {row['skill']:<20} {row['state']:<8} "
              f"{','.join(map(str, pids)) or '-':<16} {row['violations']}")
    return 0


def cmd_events(args) -> int:
    from agent.client import ClientError, RpcError

    client = _client(args)
    if client is None:
        return 1
    with client:
        try:
            for event in client.events(args.skill):
                print(json.dumps(event, sort_keys=True, separators=(",", ":")), flush=True)
        except RpcError as exc:
            _err(f"events: {exc.message}")
            return 1
        except ClientError as exc:
            _err(str(exc))
            return 1
    return 0


# ------------------------------------------------------------------ mutating commands


def _policy_params(args) -> Optional[dict]:
    if getattr(args, "package", None):
        return {"package": os.path.abspath(args.package)}
    if getattr(args, "manifest", None):
        try:
            with open(args.manifest, encoding="utf-8") as fh:
                return {"manifest": fh.read()}
        except (OSError, UnicodeDecodeError) as exc:
            _err(f"{args.manifest}: {getattr(exc, 'strerror', None) or exc}")
            return None
    return {"skill": getattr(args, "skill", None)}


def cmd_register(args) -> int:
    params = _policy_params(args)
    if params is None:
        return 1
    params.update(pids=args.pid, tree=args.tree, require=args.require or [])
    result, code = _call(args, "register", params)
    if result is None:
        return code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"{result['id']}: {result['skill']} pids {','.join(map(str, result['pids']))} "
          f"cgroup {result.get('cgroup')}")
    for layer, state in sorted(result.get("layers", {}).items()):
        print(f"  {layer:<12} {state}")
    return 0


def cmd_unregister(args) -> int:
    result, code = _call(args, "unregister", {"id": args.id})
    if result is None:
        return code
    print(f"{result['id']}: unregistered")
    return 0


# ------------------------------------------------------------------ run through the daemon


def run_via_daemon(args) -> Optional[int]:
    """`skillguard run` through a running daemon; None to run locally instead.

    Local when asked (--local, $SKILLGUARD_RUN_LOCAL=1), when local-only
    options are given (--state-root, --uid-range), or when no daemon answers
    on its socket.
    """
    if getattr(args, "local", False) or os.environ.get(RUN_LOCAL_ENV) == "1" \
            or args.state_root or args.uid_range:
        return None
    from agent.client import Client, ClientError, RpcError, default_socket_path

    path = default_socket_path()
    if not os.path.exists(path):
        return None
    try:
        client = Client(path, timeout=60.0)
    except ClientError:
        return None
    params = _policy_params(args)
    if params is None:
        client.close()
        return 125
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    params.update(argv=command, audit=bool(args.audit), cwd=os.getcwd(), env=dict(os.environ),
                  stdio=True)
    if args.cwd:
        params["workdir"] = os.path.abspath(args.cwd)
    with client:
        try:
            started = client.call("launch", params, fds=[0, 1, 2])
        except RpcError as exc:
            _err(f"{exc.message}")
            for line in (exc.data or {}).get("errors", []) if isinstance(exc.data, dict) else []:
                print(line, file=sys.stderr)
            layer = (exc.data or {}).get("layer") if isinstance(exc.data, dict) else None
            return 127 if layer == "exec" else 125
        except ClientError as exc:
            _err(str(exc))
            return 125
        for text in started.get("notes", []):
            print(f"skillguard: note: {text}", file=sys.stderr)
        launch_id = started["id"]
        client.set_timeout(None)

        def forward(signum, _frame):
            try:
                with Client(path, timeout=5.0) as other:
                    other.call("signal", {"id": launch_id, "signal": signal.Signals(signum).name})
            except (ClientError, RpcError):
                pass

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    result = client.call("wait", {"id": launch_id})
                    break
                except InterruptedError:
                    continue
        except (ClientError, RpcError) as exc:
            _err(f"waiting for {launch_id}: {exc}")
            return 125
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    for text in result.get("notes", []):
        if text not in started.get("notes", []):
            print(f"skillguard: note: {text}", file=sys.stderr)
    lines = [json.dumps(v, sort_keys=True, separators=(",", ":")) + "\n" for v in result.get("violations", [])]
    if args.events:
        with open(args.events, "a") as fh:
            fh.writelines(lines)
    else:
        sys.stderr.writelines(lines)
    if result.get("error"):
        error = result["error"]
        _err(f"{error.get('layer')}: {error.get('reason')} (the skill was not started)")
    return int(result.get("exit_code") if result.get("exit_code") is not None else 125)
