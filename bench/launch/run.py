#!/usr/bin/env python3
"""Launch overhead: median wall time of starting /bin/true under skillguard
run, bubblewrap and firejail, as ratios to bare /bin/true, in one run.

    sudo .venv/bin/python bench/launch/run.py [--runs N]

Needs root. bubblewrap and firejail are installed with apt-get when missing
(bench only); a tool that still cannot run is reported, not hidden.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(REPO / ".venv" / "bin" / "skillguard")  # as scripts/setup.sh installs it
MANIFEST = """\
name: bench-true
version: "1"
permissions:
  fs:
    dirs:
      - {work}:rw
resources:
  timeout: 30s
"""


def ensure(tool: str, package: str) -> bool:
    if shutil.which(tool):
        return True
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return shutil.which(tool) is not None


def once_ms(argv: list[str], env) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/launch: needs root", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/var/tmp"))
    tmp.chmod(0o711)  # the skill must be able to traverse to its state dir
    (tmp / "work").mkdir()
    manifest = tmp / "bench.yaml"
    manifest.write_text(MANIFEST.format(work=tmp / "work"))
    env = {**os.environ, "SKILLGUARD_STATE_ROOT": str(tmp / "state"),
           "SKILLGUARD_SOCKET": str(tmp / "no-daemon.sock")}  # local, as with no daemon running
    run = [COMMAND, "run", "--manifest", str(manifest), "--events", str(tmp / "events.jsonl"),
           "--", "/bin/true"]
    candidates = {
        "bare /bin/true": (["/bin/true"], env),
        "skillguard run": (run, env),
        # The first launch of a manifest (or after it, its files or the agent
        # changed): everything compiled, nothing stored is used.
        "skillguard run, compiling": (run, {**env, "SKILLGUARD_NO_CACHE": "1"}),
    }
    if ensure("bwrap", "bubblewrap"):
        candidates["bwrap --unshare-all"] = (["bwrap", "--unshare-all", "--die-with-parent",
                                              "--ro-bind", "/", "/", "true"], env)
    if ensure("firejail", "firejail"):
        candidates["firejail --noprofile"] = (["firejail", "--quiet", "--noprofile", "true"], env)
    os.chdir(REPO)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for argv, cand_env in candidates.values():
            once_ms(argv, cand_env)  # warm caches (and store the plan)
        # Interleaved: every round runs each candidate once, so load changes
        # on this shared machine hit them all alike.
        for _ in range(args.runs):
            for name, (argv, cand_env) in candidates.items():
                samples[name].append(once_ms(argv, cand_env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {name: statistics.median(values) for name, values in samples.items()}
    base = results["bare /bin/true"]
    load = os.getloadavg()[0]
    print(f"launch overhead, median of {args.runs} interleaved rounds (ratio to bare /bin/true; "
          f"load average {load:.2f})")
    for name, value in results.items():
        print(f"  {name:<24} {value:8.2f} ms   x{value / base:7.1f}")
    if "firejail --noprofile" in results:
        sg, fj = results["skillguard run"], results["firejail --noprofile"]
        verdict = "faster" if sg < fj else "SLOWER"
        print(f"  skillguard run vs firejail: x{sg / fj:.2f} ({verdict}; target: faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
