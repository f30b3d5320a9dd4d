#!/usr/bin/env python3
"""Seccomp overhead: bare vs a one-rule filter vs the compiled skill filters.

Builds seccomp_bench.c with `cc -O2` into a temporary directory, compiles a
filter for every manifest in policies/examples/ (or a Policy built in code
when there are none), then runs every setting side by side, REPS times in
interleaved order, and prints the median ns/call and the ratios:

    compiled / one-rule   on each call (target: <= 1.0 for the hot allowed
                          calls getppid and ioctl, the constant-action cache
                          floor; <= 1.3 for the argument-checked personality)
    one-rule / bare       the cost of having any filter at all

Usage: .venv/bin/python bench/seccomp_overhead/run.py [--iterations N] [--reps R]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

HOT_CALLS = ("getppid", "ioctl_fionread")  # plain allows: the kernel caches them
ARG_CHECKED_CALLS = ("personality_query",)  # the filter runs on every call
CALLS = HOT_CALLS + ARG_CHECKED_CALLS


def build(workdir: Path) -> Path:
    binary = workdir / "seccomp_bench"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(HERE / "seccomp_bench.c")],
                   check=True)
    return binary


def compiled_filters(workdir: Path) -> dict[str, Path]:
    from agent.compile.seccomp import compile_seccomp

    policies = {}
    examples = sorted((REPO / "policies" / "examples").glob("*.yaml"))
    if examples:
        from agent.manifest import load_manifest

        for path in examples:
            result = load_manifest(path)
            if result.errors or result.policy is None:
                print(f"skipping {path.name}: {result.errors}", file=sys.stderr)
                continue
            policies[path.stem] = result.policy
    if not policies:
        from agent.manifest.model import Policy

        print("policies/examples/ has no loadable manifest: using a Policy built in code",
              file=sys.stderr)
        policies["in-code"] = Policy(name="bench", version="1")
    filters = {}
    for name, policy in policies.items():
        path = workdir / f"{name}.bpf"
        path.write_bytes(compile_seccomp(policy).bpf)
        filters[name] = path
    return filters


def run_once(binary: Path, iterations: int, mode: str, prog: Path | None) -> dict[str, float]:
    cmd = [str(binary), mode, str(iterations)] + ([str(prog)] if prog else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


def print_filter_steps(settings) -> None:
    """Instructions each filter runs per timed call (noise-free), from the simulator.

    A constant-ALLOW call costs no filter run at all in the kernel: the
    constant-action cache (kernel/seccomp.c, seccomp_cache_check_allow) answers it.
    """
    from agent.compile.bpf import Simulator
    from agent.compile.seccomp import syscall_number

    probes = {
        "getppid": (syscall_number("getppid"), (0,) * 6),
        "ioctl_fionread": (syscall_number("ioctl"), (3, 0x541B, 0, 0, 0, 0)),
        "personality_query": (syscall_number("personality"), (0xFFFFFFFF, 0, 0, 0, 0, 0)),
    }
    print("BPF instructions executed per call (simulator; getppid is cached by the kernel)")
    for setting, (mode, prog) in settings.items():
        if prog is None:
            continue
        sim = Simulator(prog.read_bytes())
        row = "".join(f"{sim.steps(nr, args=a):>20}" for nr, a in probes.values())
        print(f"{setting:<16}{row}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the last one)")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[-1]
    os.sched_setaffinity(0, {cpu})  # children inherit it

    with tempfile.TemporaryDirectory(prefix="seccomp-bench-") as tmp:
        workdir = Path(tmp)
        binary = build(workdir)
        settings: dict[str, tuple[str, Path | None]] = {"bare": ("bare", None),
                                                         "one-rule": ("onerule", None)}
        for name, path in compiled_filters(workdir).items():
            settings[name] = ("file", path)
        print_filter_steps(settings)
        samples: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CALLS} for s in settings}
        for _ in range(args.reps):
            for setting, (mode, prog) in settings.items():
                for call, ns in run_once(binary, args.iterations, mode, prog).items():
                    samples[setting][call].append(ns)

    median = {s: {c: statistics.median(v) for c, v in calls.items()} for s, calls in samples.items()}
    print(f"median ns/call over {args.reps} runs x {args.iterations} calls, pinned to CPU {cpu}, "
          f"kernel {os.uname().release}\n")
    header = f"{'setting':<16}" + "".join(f"{c:>20}" for c in CALLS)
    print(header)
    print("-" * len(header))
    for setting, calls in median.items():
        print(f"{setting:<16}" + "".join(f"{calls[c]:>20.1f}" for c in CALLS))
    print("\nratios" + " " * 10 + "".join(f"{c:>20}" for c in CALLS))
    one = median["one-rule"]
    print(f"{'one-rule/bare':<16}" + "".join(f"{one[c] / median['bare'][c]:>20.3f}" for c in CALLS))
    worst = {c: 0.0 for c in CALLS}
    for setting, calls in median.items():
        if setting in ("bare", "one-rule"):
            continue
        ratios = {c: calls[c] / one[c] for c in CALLS}
        worst = {c: max(worst[c], ratios[c]) for c in CALLS}
        print(f"{setting + '/one':<16}" + "".join(f"{ratios[c]:>20.3f}" for c in CALLS))
    print()
    for call in HOT_CALLS:
        print(f"target {call} compiled/one-rule <= 1.0 (+noise): worst {worst[call]:.3f}")
    for call in ARG_CHECKED_CALLS:
        verdict = "met" if worst[call] <= 1.3 else "NOT met"
        print(f"target {call} compiled/one-rule <= 1.3: worst {worst[call]:.3f} ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
