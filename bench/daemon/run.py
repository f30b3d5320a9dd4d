#!/usr/bin/env python3
"""bench/daemon: the daemon under load, side by side with its targets.

1. register: 1,000 live processes (`sleep`) registered one after another
   through the socket; registrations/s and p50/p99 latency (client view,
   request written to reply read), with 1,000 skills live at the end.
2. daemon RSS with those 1,000 registered skills live.
3. pipeline: violation events/s through `Pipeline.publish` (JSON-lines log
   to a file, Prometheus counters, one `events` subscriber), with the
   accounting check ingested == logged + suppressed and delivered + lost.
4. launch: wall time of `/bin/true` launched through the socket and waited
   for (a new client connection each time) vs. bare fork+exec, bubblewrap
   and firejail, medians of the same number of runs, interleaved.

Run as root with the venv python: `.venv/bin/python bench/daemon/run.py`
(`--skills N`, `--launches N`, `--events N` to scale).
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))


def percentile(values, q):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_register(daemon, count: int) -> dict:
    from agent.client import Client

    manifest = ("name: bench-reg\nversion: '1'\npermissions:\n  tcp:\n"
                "    allowlist: ['127.0.0.1:9']\n")
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(count)]
    latencies, ids = [], []
    failure = None
    from agent.client import RpcError

    try:
        rss_before = rss_mib(daemon.proc.pid)
        with Client(daemon.socket, timeout=60) as client:
            start = time.perf_counter()
            for proc in sleepers:
                t0 = time.perf_counter()
                try:
                    reply = client.call("register", {"pids": [proc.pid], "manifest": manifest})
                except RpcError as exc:
                    failure = f"registration {len(ids) + 1} refused: {exc.message}"
                    break
                latencies.append(time.perf_counter() - t0)
                ids.append(reply["id"])
            elapsed = time.perf_counter() - start
            live = len(client.call("list")["skills"])
        rss_after = rss_mib(daemon.proc.pid)
        count = len(ids)
        return {"failure": failure, "count": count, "per_s": count / elapsed, "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99), "max": max(latencies), "live": live,
                "rss_before": rss_before, "rss_after": rss_after,
                "last_100_p99": percentile(latencies[-100:], 99)}
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()
        # Their cgroups empty; the daemon drops every skill.
        deadline = time.monotonic() + 60
        from agent.client import Client as C

        while time.monotonic() < deadline:
            with C(daemon.socket) as client:
                if not client.call("list")["skills"]:
                    break
            time.sleep(0.2)


def bench_pipeline(count: int, rate_limit: int) -> dict:
    from agent.daemon.metrics import Metrics
    from agent.daemon.pipeline import Pipeline
    from agent.events.violation import Violation

    with tempfile.TemporaryDirectory() as tmp:
        log = os.open(os.path.join(tmp, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        metrics = Metrics(200)
        skills = [f"skill-{i}" for i in range(50)]
        for name in skills:
            metrics.skills.admit(name)
        pipe = Pipeline(metrics, log_fd=log, rate_limit=rate_limit)
        subscriber = pipe.subscribe(None, count, lambda: None)
        events = [Violation(skill=skills[i % len(skills)], pid=1000 + i % 7, layer="seccomp",
                            operation="socket(AF_INET)", decision="denied", rule="no grant")
                  for i in range(count)]
        start = time.perf_counter()
        for i, violation in enumerate(events):
            pipe.publish(violation, f"l-{i % 50}")
        pipe.flush()
        elapsed = time.perf_counter() - start
        os.close(log)
        logged = sum(1 for _ in open(os.path.join(tmp, "log"), "rb"))
    delivered = len(subscriber.queue)
    lost = sum(pipe.lost.values())
    return {"count": count, "per_s": count / elapsed, "logged": logged, "suppressed": pipe.suppressed,
            "delivered": delivered, "lost": lost, "ingested": pipe.ingested,
            "balanced": pipe.ingested == logged + pipe.suppressed == delivered + lost + pipe.suppressed}


def timed(cmd, env=None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}")
    return elapsed


def bench_launch(daemon, runs: int) -> dict:
    from agent.client import Client

    manifest = f"name: bench-launch\nversion: '1'\npermissions:\n  fs:\n    dirs: ['{daemon.work}:rw']\n"

    def through_socket() -> float:
        t0 = time.perf_counter()
        with Client(daemon.socket, timeout=60) as client:
            reply = client.call("launch", {"manifest": manifest, "argv": ["/bin/true"]})
            result = client.call("wait", {"id": reply["id"]})
        elapsed = time.perf_counter() - t0
        daemon.pids_seen.add(reply["supervisor_pid"])
        if result["exit_code"] != 0:
            raise RuntimeError(f"launch: {result}")
        return elapsed

    candidates = {"skillguard launch (socket)": through_socket,
                  "bare fork+exec": lambda: timed(["/bin/true"])}
    if shutil.which("bwrap"):
        candidates["bubblewrap"] = lambda: timed(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev",
                                                  "--proc", "/proc", "--unshare-all", "--die-with-parent",
                                                  "/bin/true"])
    if shutil.which("firejail"):
        candidates["firejail"] = lambda: timed(["firejail", "--quiet", "--noprofile", "/bin/true"])
    samples = {name: [] for name in candidates}
    for name, fn in candidates.items():
        fn()  # warm caches (compiled-policy cache, page cache)
    for _ in range(runs):
        for name, fn in candidates.items():
            samples[name].append(fn())
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument("--launches", type=int, default=15)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/daemon: needs root", file=sys.stderr)
        return 1
    from sgdaemon import DaemonProcess, make_root, remove_root

    root = make_root()
    daemon = DaemonProcess(root, config_extra="max_clients: 4096\n")
    print(f"bench/daemon: {os.cpu_count()} CPUs, kernel {os.uname().release}")
    try:
        daemon.start()
        register_ok = daemon.call("status")["register"] == "available"
        reg = bench_register(daemon, args.skills) if register_ok else None
        launch = bench_launch(daemon, args.launches)
    finally:
        daemon.stop()
        daemon.end_supervisors()
        daemon.unload_hooks()
        remove_root(root)
    pipe_all = bench_pipeline(args.events, rate_limit=10 ** 9)
    pipe_default = bench_pipeline(args.events, rate_limit=1000)

    print()
    if reg:
        if reg["failure"]:
            print(f"register: STOPPED EARLY: {reg['failure']}")
        print(f"register, {reg['count']} processes one after another ({reg['live']} live at the end):")
        print(f"  {reg['per_s']:8.0f} registrations/s   (target >= 1000: {reg['per_s'] / 1000:.2f}x of target)")
        print(f"  p50 {reg['p50'] * 1e3:6.2f} ms  p99 {reg['p99'] * 1e3:6.2f} ms  max {reg['max'] * 1e3:6.2f} ms"
              f"   (target p99 <= 5 ms: {reg['p99'] * 1e3 / 5:.2f}x of target)")
        print(f"  p99 of the last 100 registrations ({reg['count'] - 100}+ live): "
              f"{reg['last_100_p99'] * 1e3:6.2f} ms")
        print(f"daemon RSS: {reg['rss_before']:.1f} MiB idle, {reg['rss_after']:.1f} MiB with "
              f"{reg['live']} registered skills   (target <= 150 MiB: {reg['rss_after'] / 150:.2f}x of target)")
    else:
        print("register: unavailable (eBPF hooks did not load); skipped")
    for label, p in (("no rate limit", pipe_all), ("default rate limit 1000/s/skill", pipe_default)):
        print(f"pipeline, {p['count']} events over 50 skills, {label}:")
        print(f"  {p['per_s']:10.0f} events/s   (target >= 100000: {p['per_s'] / 100000:.2f}x of target)")
        print(f"  logged {p['logged']} + suppressed {p['suppressed']} = ingested {p['ingested']}; "
              f"streamed {p['delivered']} + lost {p['lost']}: {'balanced' if p['balanced'] else 'NOT BALANCED'}")
    base = launch.get("bubblewrap")
    print(f"launch of /bin/true, median of {args.launches}, wall time:")
    for name, value in launch.items():
        ratio = f"{value / base:5.2f}x bubblewrap" if base else ""
        print(f"  {name:28s} {value * 1e3:8.2f} ms  {ratio}")
    if base:
        sg = launch["skillguard launch (socket)"]
        print(f"  (target: within 2x of bubblewrap: {sg / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
