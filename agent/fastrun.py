"""The `skillguard` command's entry point, with a short path for `run`.

`skillguard run --manifest M [--events F] [--audit] [--local] [--] CMD…`
with a stored launch plan (agent/launch/plan_cache.py) starts the skill
without loading the manifest model, the compilers, argparse or site-packages:
that is the difference between ~20 ms and ~190 ms per launch (bench/launch).
Anything else (other commands or options, no stored plan, a daemon that
may take the launch, not root) goes to `agent.cli.main`, which behaves the
same and stores the plan for next time.

The installed command starts Python with `-I -S` (scripts/setup.sh):
site-packages are added only when the full CLI is needed.
"""
import posix
import sys

from agent import oslite


def _parse_run(argv: list[str]):
    """(manifest, events, audit, local, command) for the simple forms of
    `run`; None for anything else (argparse then reads it)."""
    if not argv or argv[0] != "run":
        return None
    manifest = events = None
    audit = local = False
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-"):
            break
        name, eq, value = word.partition("=")
        if name in ("--manifest", "--events"):
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            if name == "--manifest":
                manifest = value
            else:
                events = value
        elif word == "--audit":
            audit = True
        elif word == "--local":
            local = True
        else:
            return None
        i += 1
    if manifest is None:
        return None
    return manifest, events, audit, local, argv[i:]


def _note(text: str) -> None:
    print(f"skillguard: note: {text}", file=sys.stderr)


def fast_run(parsed) -> int | None:
    """The launch from a stored plan; None when there is none to use."""
    manifest, events, audit, local, command = parsed
    if posix.geteuid() != 0:
        return None
    from agent import bundle

    bundle.install()  # the launch path's modules from one file (agent/bundle.py)
    from agent.launch import plan_cache

    try:
        with open(manifest, "rb") as fh:
            data = fh.read((1 << 20) + 1)
    except OSError:
        return None
    if len(data) > 1 << 20:
        return None  # the loader words the limit
    root = oslite.getenv("SKILLGUARD_STATE_ROOT") or "/var/lib/skillguard"
    if not root.startswith("/"):
        return None
    material = plan_cache.inputs(manifest, data, command, audit)
    record = plan_cache.load(oslite.normpath(root), material)
    if record is None:
        return None
    if not local and oslite.getenv("SKILLGUARD_RUN_LOCAL") != "1" \
            and oslite.exists(record["socket"]):
        return None  # a daemon may be there: the full CLI asks it
    for line in record["warnings"]:
        print(line, file=sys.stderr)
    from agent.launch.supervisor import RunOptions

    return launch(None, RunOptions(argv=command, audit=audit), events, plan=record["plan"])


def launch(policy, options, events: str | None, *, plan: dict | None = None, keep=None) -> int:
    """Run a skill as the `run` command reports it: violations to `events`
    (JSON lines; stderr when None), notes to stderr, and the skill's exit
    code, or 125 (127 when the exec failed) after saying which layer could
    not be set up. Without `plan`, the plan is made now and given to `keep`."""
    from agent.events.violation import JsonLinesSink
    from agent.launch.supervisor import LaunchError, make_plan, run

    try:
        sink = JsonLinesSink(path=events) if events else JsonLinesSink.stderr()
    except OSError as exc:
        print(f"skillguard: error: events: {events}: {exc.strerror}", file=sys.stderr)
        return 125
    try:
        if plan is None:
            plan = make_plan(policy, options)
            if keep is not None:
                keep(plan)
        outcome = run(policy, options, emit=sink.emit, note=_note, plan=plan)
    except LaunchError as exc:
        print(f"skillguard: error: {exc} (the skill was not started)", file=sys.stderr)
        return 127 if exc.layer == "exec" else 125
    finally:
        sink.close()
    return outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = _parse_run(argv)
    if parsed is not None:
        import gc

        # A launch allocates little and lives as long as its skill: the
        # collector's passes during start-up are pure cost (and forked
        # children would touch every object's header again).
        gc.disable()
        code = fast_run(parsed)
        if code is not None:
            # Skip the interpreter's shutdown (module teardown, a final
            # collection: ~3-5 ms); nothing of ours is left to finalise.
            sys.stdout.flush()
            sys.stderr.flush()
            posix._exit(code)
    if sys.flags.no_site:
        import site

        site.main()
    from agent.cli import main as cli_main

    return cli_main(argv)
