#!/usr/bin/env python3
"""Exec supervision overhead: fork+exec of an allowed binary, supervised vs not.

The same loop (posix_spawn of /usr/bin/true, then waitpid; ITERATIONS times)
runs in three settings, REPS rounds in interleaved order:

    bare         on the host, unconfined
    supervised   inside `skillguard run` with `shell.allowlist: ["true **"]`:
                 every execve is a seccomp notification answered by the
                 supervisor (read argv/cwd from /proc, decide, CONTINUE),
                 under the skill's Landlock domain and seccomp filter
    filter-only  on the host under the skill's seccomp filter compiled with
                 execve allowed in the kernel (no notification, no Landlock):
                 what the filter alone costs

and prints the median µs per fork+exec and the ratio supervised / bare
(target: <= 1.5; the exec path is one round trip to the supervisor).

Usage (root): .venv/bin/python bench/exec/run.py [--iterations N] [--reps R]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

TRUE = "/usr/bin/true"

LOOP = r"""
import json, os, sys, time
n, cwd = int(sys.argv[1]), sys.argv[2]
os.chdir(cwd)
env = {"PATH": "/usr/bin:/bin"}
def once():
    pid = os.posix_spawn("/usr/bin/true", ["true"], env)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"true exited with status {status}")
once()  # warm up
start = time.perf_counter()
for _ in range(n):
    once()
print(json.dumps({"us_per_exec": (time.perf_counter() - start) / n * 1e6}))
"""


def manifest(work: Path) -> Path:
    path = work.parent / "bench-exec.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: bench-exec
        version: "1"
        permissions:
          fs:
            dirs: ["{work}:rw"]
          shell:
            allowlist: ["true **"]
            allowed_dirs: ["{work}"]
        resources:
          pids: 64
          timeout: 120s
        """))
    return path


def bare(script: Path, n: int, work: Path) -> float:
    out = subprocess.run([sys.executable, str(script), str(n), str(work)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["us_per_exec"]


def supervised(script: Path, n: int, work: Path, m: Path, state_root: str) -> float:
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--manifest", str(m),
                           "--state-root", state_root, "--events", os.devnull, "--",
                           "python3", str(script), str(n), str(work)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"supervised run failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["us_per_exec"]


def filter_only(script: Path, n: int, work: Path, m: Path) -> float:
    """The launch seccomp filter with execve/execveat allowed in the kernel."""
    from agent.compile.seccomp import compile_seccomp
    from agent.manifest import load_manifest

    policy = load_manifest(m).policy
    bpf = compile_seccomp(policy, deny_action="errno").bpf
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, prctl
            from agent.enforce.seccomp_load import install_filter

            prctl(PR_SET_NO_NEW_PRIVS, 1)
            install_filter(bpf)
            os.dup2(w, 1)
            os.execv(sys.executable, [sys.executable, str(script), str(n), str(work)])
        finally:
            os._exit(127)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)["us_per_exec"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/exec needs root (it launches skills)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="sg-bench-exec-", dir="/var/tmp"))
    try:
        os.chmod(root, 0o711)
        work = root / "work"
        work.mkdir()
        os.chmod(work, 0o777)
        script = work / "loop.py"
        script.write_text(LOOP)
        state_root = root / "state"
        state_root.mkdir()
        m = manifest(work)
        results: dict[str, list[float]] = {"bare": [], "filter-only": [], "supervised": []}
        for _ in range(args.reps):
            results["bare"].append(bare(script, args.iterations, work))
            results["filter-only"].append(filter_only(script, args.iterations, work, m))
            results["supervised"].append(supervised(script, args.iterations, work, m,
                                                    str(state_root)))
        median = {k: statistics.median(v) for k, v in results.items()}
        print(f"fork+exec of {TRUE} (posix_spawn + waitpid), {args.iterations} per round, "
              f"median of {args.reps} rounds:")
        for name, value in median.items():
            print(f"  {name:<12} {value:8.1f} µs/exec   x{value / median['bare']:.2f} of bare")
        ratio = median["supervised"] / median["bare"]
        verdict = "met" if ratio <= 1.5 else "NOT met"
        print(f"supervised / bare = {ratio:.2f} (target <= 1.5: {verdict})")
        print(f"supervised / filter-only = {median['supervised'] / median['filter-only']:.2f} "
              "(the notification round trip and Landlock)")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
