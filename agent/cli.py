"""`skillguard` command line. Heavy modules are imported by the command that needs them."""
from __future__ import annotations

import argparse
import sys


def cmd_validate(args: argparse.Namespace) -> int:
    from agent.manifest import load_manifest

    failed = 0
    names: dict[str, str] = {}
    for path in args.files:
        result = load_manifest(path)
        for line in result.format(result.warnings, "warning"):
            print(line, file=sys.stderr)
        for line in result.format(result.errors, "error"):
            print(line, file=sys.stderr)
        if result.ok and result.policy.name in names:
            print(f"{path}:1:1: error: name: skill '{result.policy.name}' is already defined "
                  f"by {names[result.policy.name]}", file=sys.stderr)
            failed += 1
        elif result.ok:
            names[result.policy.name] = path
            print(f"{path}: ok ({result.policy.name} {result.policy.version}, "
                  f"{len(result.warnings)} warning{'s' * (len(result.warnings) != 1)})")
        else:
            failed += 1
    return 1 if failed else 0


def _load_or_report(path: str):
    """The manifest's Policy, or None after printing its errors; warnings are printed either way."""
    from agent.manifest import load_manifest

    result = load_manifest(path)
    for line in result.format(result.warnings, "warning"):
        print(line, file=sys.stderr)
    if not result.ok:
        for line in result.format(result.errors, "error"):
            print(line, file=sys.stderr)
        return None
    return result.policy


def _load_cached(path: str, cache_root, warnings_out: list | None = None):
    """`_load_or_report` for launches: the load is memoized by the manifest's bytes.
    The printed warnings are appended to `warnings_out`."""
    from agent.cache import key_of, memo

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return _load_or_report(path)  # the loader words the error
    if len(data) > 1 << 20:
        return _load_or_report(path)  # too large: the loader words the limit

    def load() -> tuple:
        from agent.manifest import load_text

        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None, [], []  # not cached as a policy: the loader words the error below
        result = load_text(text, path)
        return (result.policy if result.ok else None,
                result.format(result.warnings, "warning"), result.format(result.errors, "error"))

    policy, warnings, errors = memo("manifest", key_of(path, data), load, root=cache_root)
    if policy is None and not errors:
        return _load_or_report(path)
    for line in warnings + errors:
        print(line, file=sys.stderr)
    if warnings_out is not None:
        warnings_out.extend(warnings)
    return policy


def cmd_compile(args: argparse.Namespace) -> int:
    from agent.compile import compile_policy
    from agent.compile import report

    policy = _load_or_report(args.file)
    if policy is None:
        return 1
    try:
        artifacts = compile_policy(policy)
    except ValueError as exc:
        print(f"{args.file}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(report.to_dict(artifacts), indent=2, sort_keys=True))
    else:
        sys.stdout.write(report.to_text(artifacts))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent import doctor

    probes = doctor.run_probes()
    print(doctor.to_json(probes) if args.json else doctor.render_text(probes))
    # Optional layers (BPF-LSM, fentry, ...) may be missing; required ones may not.
    return 1 if any(doctor.status_word(p) == "FAIL" for p in probes) else 0


def _host_config(path):
    """The host config (--config FILE, else $SKILLGUARD_CONFIG or /etc/skillguard/agent.yaml)."""
    from agent.config import ConfigError, load_host_config

    try:
        return load_host_config(path)
    except ConfigError as exc:
        print(f"skillguard: error: config: {exc}", file=sys.stderr)
        return None


def _package_policy(args: argparse.Namespace):
    """The Policy of a package admitted by the host's rule, or None after saying why not."""
    from agent.manifest import load_text
    from agent.package import PackageError
    from agent.package.trust import admit_package

    config = _host_config(args.config)
    if config is None:
        return None
    try:
        admitted = admit_package(args.package, config)
    except PackageError as exc:
        print(f"skillguard: error: package: {exc} (the skill was not started)", file=sys.stderr)
        return None
    for text in admitted.notes:
        print(f"skillguard: note: {text}", file=sys.stderr)
    try:
        text = admitted.manifest_text.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(f"skillguard: error: package: {args.package}: manifest.yaml is not UTF-8 ({exc.reason})",
              file=sys.stderr)
        return None
    # The manifest exactly as it was digested: never re-read from disk.
    result = load_text(text, f"{args.package}:manifest.yaml")
    for line in result.format(result.warnings, "warning") + result.format(result.errors, "error"):
        print(line, file=sys.stderr)
    return result.policy if result.ok else None


def _bare_manifest_allowed(args: argparse.Namespace) -> bool:
    from agent.package import PackageError
    from agent.package.trust import admit_manifest

    config = _host_config(args.config)
    if config is None:
        return False
    try:
        admit_manifest(config)
    except PackageError as exc:
        print(f"skillguard: error: package: {exc} (the skill was not started)", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    delegated = _run_via_daemon(args)
    if delegated is not None:
        return delegated
    from agent.launch.identity import IdentityError, state_root

    try:
        cache_root = state_root(args.state_root)
    except IdentityError:
        cache_root = None  # the launch reports the bad root
    warnings: list[str] = []
    if args.package:
        policy = _package_policy(args)  # verified under the host's require_signed/trusted_keys
    else:
        policy = _load_cached(args.manifest, cache_root, warnings) if _bare_manifest_allowed(args) else None
    if policy is None:
        return 125
    from agent.fastrun import launch
    from agent.launch.supervisor import RunOptions

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    options = RunOptions(argv=tuple(command), audit=args.audit, state_root=args.state_root,
                         uid_range=args.uid_range, cwd=args.cwd)
    keep = None
    if not (args.package or args.config or args.state_root or args.uid_range or args.cwd) \
            and cache_root is not None:
        def keep(plan):  # for the next `run` of the same inputs (agent/fastrun.py)
            _store_plan(args, command, cache_root, plan, warnings)
            from agent import bundle

            if not bundle.fresh():
                bundle.build()  # the agent's code changed since it was made
    return launch(policy, options, args.events, keep=keep)


def _store_plan(args, command: list, cache_root: str, plan: dict, warnings: list) -> None:
    """Keep the plan for the next `run` of the same inputs (agent/fastrun.py)."""
    import os

    from agent.client import default_socket_path
    from agent.launch import plan_cache

    if os.geteuid() != 0:
        return
    try:
        with open(args.manifest, "rb") as fh:
            data = fh.read()
    except OSError:
        return
    material = plan_cache.inputs(args.manifest, data, command, args.audit)
    plan_cache.store(cache_root, material, {"plan": plan, "warnings": list(warnings),
                                            "socket": default_socket_path()})


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.package import PackageError
    from agent.package.sign import generate_keypair

    try:
        pair = generate_keypair(args.out)
    except PackageError as exc:
        print(f"skillguard: error: keygen: {exc}", file=sys.stderr)
        return 1
    print(f"key {pair.key_id}: private {pair.private_path} (0600), public {pair.public_path}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from agent.package import PackageError
    from agent.package.sign import sign_package

    try:
        signed = sign_package(args.package, args.key)
    except PackageError as exc:
        print(f"skillguard: error: sign: {exc}", file=sys.stderr)
        return 1
    print(f"{args.package}: signed by key {signed.key_id}, digest sha256:{signed.digest} "
          f"-> {signed.signature_path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.package import PackageError
    from agent.package.trust import load_trusted_keys
    from agent.package.verify import verify_package

    if args.pubkey:
        key_paths = args.pubkey
    else:
        config = _host_config(args.config)
        if config is None:
            return 1
        key_paths = config.trusted_keys
    try:
        verified = verify_package(args.package, load_trusted_keys(key_paths))
    except PackageError as exc:
        print(f"{args.package}: refused: {exc}", file=sys.stderr)
        return 1
    print(f"{args.package}: ok: signed by trusted key {verified.key_id}, digest sha256:{verified.digest}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from agent.compile import compile_policy, report
    from agent.manifest import load_text
    from agent.package import PackageError
    from agent.package.digest import digest_package
    from agent.package.verify import verify_package

    try:
        contents = digest_package(args.package)
    except PackageError as exc:
        print(f"skillguard: error: {args.package}: {exc}", file=sys.stderr)
        return 1
    try:
        signer = f"key {verify_package(args.package).key_id} (signature valid; trust: see `verify`)"
    except PackageError as exc:
        signer = "none (unsigned)" if exc.reason == "unsigned" else f"INVALID: {exc}"
    print(f"package   {args.package}")
    print(f"digest    sha256:{contents.digest} ({len(contents.entries)} entries)")
    print(f"signer    {signer}")
    print()
    result = load_text(contents.manifest_text.decode("utf-8", "replace"), f"{args.package}:manifest.yaml")
    for line in result.format(result.warnings, "warning") + result.format(result.errors, "error"):
        print(line, file=sys.stderr)
    if not result.ok:
        return 1
    try:
        sys.stdout.write(report.to_text(compile_policy(result.policy)))
    except ValueError as exc:
        print(f"{args.package}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_invoke_check(args: argparse.Namespace) -> int:
    from agent.invoke import invoke_violation, may_invoke

    caller, callee = _load_or_report(args.caller), _load_or_report(args.callee)
    if caller is None or callee is None:
        return 2
    decision = may_invoke(caller, callee)
    print(f"{'allowed' if decision.allowed else 'denied'}: {caller.name} -> {callee.name}: {decision.reason}")
    if not decision.allowed:
        print(invoke_violation(caller, callee, decision).to_json(), file=sys.stderr)
    return 0 if decision.allowed else 1


def _from_daemon_commands(name: str):
    """A command that imports agent.daemon.commands (client, protocol) only when run."""
    def command(args: argparse.Namespace):
        from agent.daemon import commands

        return getattr(commands, name)(args)

    command.__name__ = command.__qualname__ = name
    return command


_run_via_daemon = _from_daemon_commands("run_via_daemon")
cmd_daemon, cmd_status, cmd_ps, cmd_register, cmd_unregister, cmd_events = (
    _from_daemon_commands(name) for name in
    ("cmd_daemon", "cmd_status", "cmd_ps", "cmd_register", "cmd_unregister", "cmd_events"))


def cmd_attach(args: argparse.Namespace) -> int:
    policy = _load_or_report(args.manifest)
    if policy is None:
        return 2
    import json
    import select
    import signal

    from agent.attach import AttachError, Hooks
    from agent.events.violation import JsonLinesSink

    sink = JsonLinesSink(sys.stdout)
    stop: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda num, _frame: stop.append(num))

    def note(text: str) -> None:
        print(f"skillguard: note: {text}", file=sys.stderr)

    try:
        hooks = Hooks.load(pin_dir=args.pin_dir, subtree=args.subtree, nft_table=args.nft_table,
                           resolvers=args.resolver, emit=sink.emit, note=note)
    except AttachError as exc:
        print(f"skillguard: error: {exc}", file=sys.stderr)
        return 1
    try:
        attachment = hooks.attach(policy, args.pid, tree=args.tree, require=args.require)
    except AttachError as exc:
        print(f"skillguard: error: attach refused: {exc} (nothing was changed)", file=sys.stderr)
        hooks.close()
        return 1
    print(json.dumps({"attached": attachment.to_dict()}, sort_keys=True), flush=True)
    try:
        while not stop:
            select.select(hooks.fds(), [], [], 0.5)
            hooks.poll(0)
            if not hooks.members(attachment.skill_id):
                note("no attached process is left")
                break
    finally:
        hooks.poll(0)
        counters = hooks.counters(attachment.skill_id)
        hooks.detach(attachment.skill_id)
        hooks.close()
        print(json.dumps({"detached": attachment.skill_id, "counters": counters}, sort_keys=True),
              flush=True)
    return 0


class _Skipped:
    """Stands in for the sub-parsers of commands not being run: building all
    twenty costs ~10 ms of every `skillguard run` start-up."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (only=NAME) one with just that subcommand's arguments."""
    from agent import __version__

    parser = argparse.ArgumentParser(prog="skillguard",
                                     description="Kernel-enforced permission manifests for AI-agent skills.")
    parser.add_argument("--version", action="version", version=f"skillguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if only is not None:
        add_parser = sub.add_parser
        sub.add_parser = lambda name, **kw: add_parser(name, **kw) if name == only else _Skipped()

    p = sub.add_parser("validate", help="check manifests; print every error and warning")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("compile", help="show what a manifest becomes: seccomp, Landlock, network, env, limits")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("doctor", help="probe which kernel layers work on this host, and why not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("run", help="run a skill confined by its manifest (no daemon needed)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", metavar="FILE")
    source.add_argument("--package", metavar="PKG",
                        help="a skill package (directory or .skill tar); its signature is checked "
                             "under the host config's require_signed and trusted_keys")
    p.add_argument("--config", metavar="FILE",
                   help="host config (default $SKILLGUARD_CONFIG or /etc/skillguard/agent.yaml)")
    p.add_argument("--audit", action="store_true",
                   help="log seccomp denials and allow them; skip Landlock")
    p.add_argument("--events", metavar="FILE", help="append violations as JSON lines (default: stderr)")
    p.add_argument("--state-root", metavar="DIR",
                   help="uid table and state dirs (default $SKILLGUARD_STATE_ROOT or /var/lib/skillguard)")
    p.add_argument("--uid-range", metavar="FIRST-LAST", help="uids for skills (default $SKILLGUARD_UID_RANGE)")
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one if granted, else HOME)")
    p.add_argument("--local", action="store_true",
                   help="run here even if a daemon answers (also $SKILLGUARD_RUN_LOCAL=1); "
                        "--state-root and --uid-range imply it")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS (default: the manifest's entrypoint)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing packages")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (0600) and PREFIX.pub")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign a skill package (detached Ed25519 signature)")
    p.add_argument("package", metavar="PKG", help="a package directory or .skill tar")
    p.add_argument("--key", required=True, metavar="KEY", help="private key file from keygen")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="check a package's signature against trusted public keys")
    p.add_argument("package", metavar="PKG")
    p.add_argument("--pubkey", action="append", metavar="FILE",
                   help="trusted public key (repeatable; default: the host config's trusted_keys)")
    p.add_argument("--config", metavar="FILE", help="host config to take trusted_keys from")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("info", help="a package's signer, digest and what its manifest grants")
    p.add_argument("package", metavar="PKG")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("invoke-check", help="may skill A invoke skill B? (both invoke_policy sides)")
    p.add_argument("--from", dest="caller", required=True, metavar="A.yaml")
    p.add_argument("--to", dest="callee", required=True, metavar="B.yaml")
    p.set_defaults(func=cmd_invoke_check)
    p = sub.add_parser("daemon", help="run the agent daemon: socket API, registry, events, /metrics")
    p.add_argument("--config", metavar="FILE", help="host config (default $SKILLGUARD_CONFIG or /etc/skillguard/agent.yaml)")
    p.add_argument("--socket", metavar="PATH", help="override socket_path")
    p.add_argument("--metrics", metavar="HOST:PORT", help="override metrics_address ('' disables)")
    p.add_argument("--state-root", metavar="DIR", help="override state_root")
    p.add_argument("--policy-dir", metavar="DIR", help="override policy_dir")
    p.add_argument("--log", metavar="FILE", help="override log_path (violations as JSON lines)")
    p.set_defaults(func=cmd_daemon)

    for name, func, text in (("status", cmd_status, "the daemon's state: policies, skills, events"),
                             ("ps", cmd_ps, "skills the daemon confines")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", metavar="PATH", help="daemon socket (default $SKILLGUARD_SOCKET or the config's)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "ps":
            p.add_argument("--skill", metavar="NAME", help="only this skill")
        p.set_defaults(func=func)

    p = sub.add_parser("register", help="confine running processes through the daemon")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", metavar="FILE", help="sent inline to the daemon")
    source.add_argument("--skill", metavar="NAME", help="a policy in the daemon's policy directory")
    source.add_argument("--package", metavar="PKG", help="a skill package the daemon verifies")
    p.add_argument("--pid", type=int, action="append", required=True, metavar="PID", help="repeatable")
    p.add_argument("--tree", action="store_true", help="also the processes' descendants")
    p.add_argument("--require", nargs="+", metavar="LAYER", help="refuse unless these layers are active")
    p.add_argument("--socket", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("unregister", help="release a registered skill (its processes leave the skill cgroup)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--socket", metavar="PATH")
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser("events", help="stream violations from the daemon as JSON lines")
    p.add_argument("--skill", metavar="NAME|ID", help="only this skill")
    p.add_argument("--socket", metavar="PATH")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("attach", help="confine running processes in the foreground (cgroup, eBPF, nftables)")
    p.add_argument("--manifest", required=True, metavar="FILE")
    p.add_argument("--pid", required=True, type=int, nargs="+", metavar="PID")
    p.add_argument("--tree", action="store_true", help="also move every descendant of each PID")
    p.add_argument("--require", nargs="+", default=[], metavar="LAYER",
                   help="refuse unless these layers are active (e.g. bpf-connect nftables-cgroup)")
    p.add_argument("--resolver", action="append", metavar="ADDR",
                   help="the DNS resolver skills may query (default: nameservers of /etc/resolv.conf)")
    p.add_argument("--pin-dir", default="/sys/fs/bpf/skillguard/v2", metavar="DIR",
                   help="where programs, links and maps are pinned")
    p.add_argument("--subtree", default="skillguard", metavar="NAME",
                   help="cgroup v2 directory the hooks attach to (below the v2 mount)")
    p.add_argument("--nft-table", default="skillguard_cg", metavar="NAME",
                   help="host nftables table for socket cgroupv2 rules")
    p.set_defaults(func=cmd_attach)
    if only is not None and only not in sub.choices:
        return build_parser()  # not a command: the full parser words the error
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and not argv[0].startswith("-") else None
    args = build_parser(only).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
