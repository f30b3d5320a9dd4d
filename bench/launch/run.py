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
PYTHON = str(REPO / ".venv" / "bin" / "python")
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


def median_ms(argv: list[str], runs: int, env=None) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        samples.append((time.perf_counter() - start) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return statistics.median(samples)


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
    env = {**os.environ, "SKILLGUARD_STATE_ROOT": str(tmp / "state")}
    candidates = {
        "bare /bin/true": ["/bin/true"],
        "skillguard run": [PYTHON, "-m", "agent", "run", "--manifest", str(manifest),
                           "--events", str(tmp / "events.jsonl"), "--", "/bin/true"],
    }
    if ensure("bwrap", "bubblewrap"):
        candidates["bwrap --unshare-all"] = ["bwrap", "--unshare-all", "--die-with-parent",
                                             "--ro-bind", "/", "/", "true"]
    if ensure("firejail", "firejail"):
        candidates["firejail --noprofile"] = ["firejail", "--quiet", "--noprofile", "true"]
    os.chdir(REPO)
    results = {}
    try:
        for name, argv in candidates.items():
            median_ms(argv, 2, env)  # warm caches
            results[name] = median_ms(argv, args.runs, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["bare /bin/true"]
    print(f"launch overhead, median of {args.runs} runs (ratio to bare /bin/true)")
    for name, value in results.items():
        print(f"  {name:<24} {value:8.2f} ms   x{value / base:7.1f}")
    if "firejail --noprofile" in results:
        sg, fj = results["skillguard run"], results["firejail --noprofile"]
        verdict = "faster" if sg < fj else "SLOWER"
        print(f"  skillguard run vs firejail: x{sg / fj:.2f} ({verdict}; target: faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
