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


def _load_cached(path: str, cache_root):
    """`_load_or_report` for launches: the load is memoized by the manifest's bytes."""
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


def cmd_run(args: argparse.Namespace) -> int:
    from agent.launch.identity import IdentityError, state_root

    try:
        cache_root = state_root(args.state_root)
    except IdentityError:
        cache_root = None  # the launch reports the bad root
    policy = _load_cached(args.manifest, cache_root)
    if policy is None:
        return 125
    from agent.events.violation import JsonLinesSink
    from agent.launch.supervisor import LaunchError, RunOptions, run

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        sink = JsonLinesSink(path=args.events) if args.events else JsonLinesSink.stderr()
    except OSError as exc:
        print(f"skillguard: error: events: {args.events}: {exc.strerror}", file=sys.stderr)
        return 125
    options = RunOptions(argv=tuple(command), audit=args.audit, state_root=args.state_root,
                         uid_range=args.uid_range, cwd=args.cwd)
    try:
        outcome = run(policy, options, emit=sink.emit,
                      note=lambda text: print(f"skillguard: note: {text}", file=sys.stderr))
    except LaunchError as exc:
        print(f"skillguard: error: {exc} (the skill was not started)", file=sys.stderr)
        return 127 if exc.layer == "exec" else 125
    finally:
        sink.close()
    return outcome.exit_code


def build_parser() -> argparse.ArgumentParser:
    from agent import __version__

    parser = argparse.ArgumentParser(prog="skillguard",
                                     description="Kernel-enforced permission manifests for AI-agent skills.")
    parser.add_argument("--version", action="version", version=f"skillguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--manifest", required=True, metavar="FILE")
    p.add_argument("--audit", action="store_true",
                   help="log seccomp denials and allow them; skip Landlock")
    p.add_argument("--events", metavar="FILE", help="append violations as JSON lines (default: stderr)")
    p.add_argument("--state-root", metavar="DIR",
                   help="uid table and state dirs (default $SKILLGUARD_STATE_ROOT or /var/lib/skillguard)")
    p.add_argument("--uid-range", metavar="FIRST-LAST", help="uids for skills (default $SKILLGUARD_UID_RANGE)")
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one if granted, else HOME)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS (default: the manifest's entrypoint)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
