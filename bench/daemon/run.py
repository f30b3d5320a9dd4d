#!/usr/bin/env python3
"""bench/daemon: the daemon under load, side by side with its targets.

0. JSON-RPC on its own: round trips of requests that do no kernel work,
   with the daemon's CPU time per request.
1. register: 1,000 live processes (`sleep`) registered one after another
   through the socket; registrations/s and p50/p99 latency (client view,
   request written to reply read), with 1,000 skills live at the end; then
   1,000 more from 4 client processes offered at 500/s in total, 1,000
   more at 750/s and 1,000 more at 1,000/s (the throughput target: is p99
   within 5 ms while serving it, with 1,000 skills live? and up to which
   of these rates does it hold on this machine?), the last beside the same
   clients and pace sending `list`, which does no kernel work (what this
   machine gives any request at that rate);
   then 1,000 more from 4 clients at once, each sending its next request as
   soon as its last is answered (the daemon saturated: latency is the queue
   behind the other clients). Each of these rows starts with the 1,000 of
   the first live: the row before is unregistered, and the machine left to
   settle (the kernel tears cgroups down in kworkers for seconds after).
   For each: the CPU per registration of the
   daemon, of its helper processes and of the clients, and the host's
   steal (a VM's vCPUs given to something else) during it.
   Before all that, the machine on its own: how often a busy loop loses
   the CPU for over 1 ms, and the steal meanwhile.
2. daemon RSS with those 1,000 registered skills live.
3. pipeline: violation events/s through `Pipeline.publish` (JSON-lines log
   to a file, Prometheus counters, one `events` subscriber), with the
   accounting check ingested == logged + suppressed and delivered + lost.
4. launch: wall time of `/bin/true` launched through the socket and waited
   for (a new client connection each time) vs. bare fork+exec, bubblewrap
   and firejail, and through daemons without the pre-started init and
   without the zygote; medians of the same number of runs, interleaved.

Run as root with the venv python: `.venv/bin/python bench/daemon/run.py`
(`--skills N`, `--concurrent N`, `--clients N`, `--paced N`, `--rates R,R,...`,
`--launches N`, `--events N` to scale; `--skip launch,pipeline` to leave parts out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
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


REGISTER_MANIFEST = ("name: bench-reg\nversion: '1'\npermissions:\n  tcp:\n"
                     "    allowlist: ['127.0.0.1:9']\n")


def cpu_ns(pid: int) -> int:
    """CPU time the process has run, in ns (first field of /proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])


def _children_cpu_ns(pid: int) -> int:
    """CPU time of the daemon's child processes (the cgroup pool's helper,
    the launch zygote; not skills, which are not its children here)."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        return 0
    for child in children:
        try:
            total += cpu_ns(child)
        except OSError:
            pass
    return total


def _steal_ns() -> int:
    """The host's steal over all vCPUs so far, in ns: the eighth value of the
    first line of /proc/stat (proc(5): user nice system idle iowait irq
    softirq steal, in USER_HZ ticks)."""
    with open("/proc/stat") as fh:
        ticks = int(fh.readline().split()[8])
    return int(ticks * 1e9 / os.sysconf("SC_CLK_TCK"))


class CpuBudget:
    """Where the CPU time of a phase went: the daemon, its helper processes
    and the clients (they add theirs with `clients()`); and the host's steal
    (proc(5) /proc/stat: time the hypervisor ran something else while a vCPU
    had work), read around it."""

    def __init__(self, daemon_pid: int):
        self.pid = daemon_pid
        self.client_ns = 0
        self.start = self._read()

    def _read(self) -> tuple:
        return (cpu_ns(self.pid), _children_cpu_ns(self.pid), time.process_time_ns(), _steal_ns(),
                time.perf_counter_ns())

    def clients(self, ns: int) -> None:
        self.client_ns += ns

    def stop(self) -> dict:
        end = self._read()
        daemon, helpers, own, steal, wall = (b - a for a, b in zip(self.start, end))
        clients = self.client_ns + own  # own: the bench process, the client of the sequential phase
        return {"daemon_ns": daemon, "helpers_ns": helpers, "clients_ns": clients,
                "steal_ns": steal, "steal_share": steal / (wall * (os.cpu_count() or 1))}


def register_one(client, pid: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    reply = client.call("register", {"pids": [pid], "manifest": REGISTER_MANIFEST})
    return time.perf_counter() - t0, reply["id"]


def bench_register(daemon, count: int, concurrent_count: int, clients: int, paced_count: int,
                   rates: list) -> dict:
    """`count` registrations one after another over one connection, then
    `paced_count` more for each of `rates` (ascending) from `clients`
    connections (a process each) offered at that rate per second in total
    (and, before the highest rate, as many `list` requests paced the same
    way), then `concurrent_count` more from `clients` connections at once as
    fast as they are answered; each of those rows with only the first
    `count` live (see _unregister_all_but). Client
    view: request written (or due) to reply read. The daemon's CPU time is
    read around each phase."""
    from agent.client import Client, RpcError

    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(count + concurrent_count + paced_count * len(rates))]
    out = {"failure": None}
    try:
        out["rss_before"] = rss_mib(daemon.proc.pid)
        latencies, ids = [], []
        with Client(daemon.socket, timeout=60) as client:
            _latency, warm_id = register_one(client, sleepers[0].pid)  # warm: the first of a manifest compiles it
            budget, start = CpuBudget(daemon.proc.pid), time.perf_counter()
            for proc in sleepers[1:count]:
                try:
                    latency, skill_id = register_one(client, proc.pid)
                except RpcError as exc:
                    out["failure"] = f"registration {len(ids) + 2} refused: {exc.message}"
                    break
                latencies.append(latency)
                ids.append(skill_id)
            elapsed, cpu_budget = time.perf_counter() - start, budget.stop()
        out["sequential"] = summary(latencies, elapsed, cpu_budget)
        out["rss_after"] = rss_mib(daemon.proc.pid)

        out["paced_at"], failures = {}, []
        taken = count
        base = {warm_id, *ids}
        out["settle"] = []
        for rate in rates:
            # Each row runs with the `count` skills of the sequential row live
            # (what the issue asks for), not on top of the rows before it: the
            # kernel's cgroup work per registration grows with the number of
            # cgroups (the pool's helper: 0.41 ms at 1,000 live, 0.67 at
            # 3,000). Then it waits for the machine to settle: unregistering
            # leaves the kernel seconds of cgroup teardown in kworkers.
            out["settle"].append(_unregister_all_but(daemon, base))
            if rate == rates[-1]:
                out["paced_noop"], _ = _from_clients(daemon, list(range(paced_count)), clients, rate=rate,
                                                     request=_NOOP_REQUEST)
            targets = [proc.pid for proc in sleepers[taken:taken + paced_count]]
            taken += paced_count
            out["paced_at"][rate], failure = _from_clients(daemon, targets, clients, rate=rate)
            failures.append(failure)
        out["paced"] = out["paced_at"][rates[-1]]
        out["settle"].append(_unregister_all_but(daemon, base))
        targets = [proc.pid for proc in sleepers[taken:]]
        out["concurrent"], failure = _from_clients(daemon, targets, clients, rate=None)
        failures.append(failure)
        out["clients"] = clients
        if any(failures):
            out["failure"] = f"concurrent registration refused: {next(f for f in failures if f)}"
        with Client(daemon.socket) as client:
            out["live"] = len(client.call("list")["skills"])
        return out
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


def _unregister_all_but(daemon, keep: set, quiet_share: float = 0.05, limit_s: float = 30.0) -> float:
    """Unregister every skill whose id is not in `keep`, then wait until the
    machine is quiet (under `quiet_share` of its CPUs busy over 0.25 s, or
    `limit_s`) and one more second; the seconds waited."""
    from agent.client import Client

    with Client(daemon.socket, timeout=60) as client:
        for skill in client.call("list")["skills"]:
            if skill["id"] not in keep:
                client.call("unregister", {"id": skill["id"]})
    start = time.monotonic()
    while time.monotonic() - start < limit_s and _busy_share(0.25) > quiet_share:
        pass
    time.sleep(1.0)
    return time.monotonic() - start


def _busy_share(seconds: float) -> float:
    """Share of all CPUs' time spent not idle over `seconds` (proc(5) /proc/stat)."""
    def read():
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]
    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _register_request(target: int) -> tuple[str, dict]:
    return "register", {"pids": [target], "manifest": REGISTER_MANIFEST}


def _NOOP_REQUEST(_target: int) -> tuple[str, dict]:
    return "list", {"skill": "no-such-skill"}


def _from_clients(daemon, targets: list[int], clients: int, rate,
                  request=_register_request) -> tuple[dict, str]:
    """Register `targets` (or send `request(target)`) from `clients`
    processes at once, each over its own connection: as fast as each can
    (rate None: every client sends its next request when its last is
    answered), or paced at `rate` requests/s in total. (summary, first
    failure or "")."""
    go_r, go_w = os.pipe()
    workers = [_client_process(daemon.socket, targets[i::clients], go_r, go_w, i, clients, rate, request)
               for i in range(clients)]
    os.close(go_r)
    budget, start = CpuBudget(daemon.proc.pid), time.perf_counter() + 0.05
    os.write(go_w, struct.pack("d", start) * clients)  # each client reads its 8 bytes (atomic: PIPE_BUF)
    os.close(go_w)
    latencies, failures = [], []
    for pid, reader in workers:
        with os.fdopen(reader, "rb") as fh:
            result = json.loads(fh.read() or b'{"failure": "no result"}')
        os.waitpid(pid, 0)
        latencies.extend(result.get("latencies", ()))
        budget.clients(result.get("cpu_ns", 0))
        if result.get("failure"):
            failures.append(result["failure"])
    elapsed = time.perf_counter() - start
    return summary(latencies, elapsed, budget.stop()), (failures[0] if failures else "")


def _client_process(socket_path: str, pids: list[int], go: int, go_writer: int, index: int, clients: int,
                    rate, request) -> tuple[int, int]:
    """A client of its own (a forked process, as each runtime is: client
    threads of one process would add their GIL hand-offs to the latency).
    It reads the start time from `go` (it closes its copy of `go_writer`),
    registers `pids` one after another over one connection and writes
    {"latencies": [...], "failure": ...} as JSON to the pipe returned with
    its pid.

    Paced (`rate`), its k-th request is due at start + (k * clients + index)
    / rate. A request sent late because the one before was slow is timed
    from when it was due, not from when it went out, so a stall counts for
    every request it delays (no "coordinated omission")."""
    from agent.client import Client, RpcError

    reader, writer = os.pipe()
    pid = os.fork()
    if pid:
        os.close(writer)
        return pid, reader
    result = {"latencies": [], "failure": None}
    try:
        os.close(reader)
        os.close(go_writer)
        with Client(socket_path, timeout=60) as client:
            start = struct.unpack("d", os.read(go, 8))[0]
            cpu0 = time.process_time_ns()
            for k, target in enumerate(pids):
                due = start + (k * clients + index) / rate if rate else start
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                    t0 = time.perf_counter()
                else:
                    t0 = due if rate else now
                try:
                    client.call(*request(target))
                    result["latencies"].append(time.perf_counter() - t0)
                except RpcError as exc:
                    result["failure"] = exc.message
                    break
            result["cpu_ns"] = time.process_time_ns() - cpu0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        with os.fdopen(writer, "wb") as out:
            out.write(json.dumps(result).encode())
        os._exit(0)


def summary(latencies: list[float], elapsed: float, budget: dict) -> dict:
    """Latencies and throughput of a phase, and its CpuBudget per request (ms)."""
    n = len(latencies)
    if not n:
        return {"count": 0, "per_s": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0, "last_100_p99": 0.0,
                "cpu_ms": 0.0, "budget_ms": {}, "steal_share": 0.0}
    per_request = {k[:-3]: v / n / 1e6 for k, v in budget.items() if k.endswith("_ns")}
    return {"count": n, "per_s": n / elapsed, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "max": max(latencies),
            "last_100_p99": percentile(latencies[-100:], 99), "cpu_ms": per_request["daemon"],
            "budget_ms": per_request, "steal_share": budget["steal_share"]}


def machine_stalls(seconds: float = 3.0) -> dict:
    """The machine on its own: a busy loop reading the clock, and the gaps
    in it longer than 1 ms (the loop was not on a CPU: on an idle VM, its
    vCPU was descheduled by the host)."""
    stalls = []
    steal0 = _steal_ns()
    last = start = time.perf_counter()
    while last - start < seconds:
        now = time.perf_counter()
        if now - last > 1e-3:
            stalls.append(now - last)
        last = now
    steal = _steal_ns() - steal0
    return {"per_s": len(stalls) / seconds, "longest": max(stalls, default=0.0),
            "lost": sum(stalls) / seconds, "steal": steal / (1e9 * (last - start) * (os.cpu_count() or 1))}


def bench_rpc(daemon, count: int) -> dict:
    """The daemon's JSON-RPC cost on its own: round trips of requests that do
    no kernel work (client view, and the daemon's CPU time per request)."""
    from agent.client import Client, RpcError

    cases = {
        "list (no match)": ("list", {"skill": "no-such-skill"}),
        "register, refused before attach (no such pid)": ("register", {"pids": [2 ** 22 + 1],
                                                                       "manifest": REGISTER_MANIFEST}),
    }
    out = {}
    with Client(daemon.socket, timeout=60) as client:
        for label, (method, params) in cases.items():
            latencies = []
            cpu0 = cpu_ns(daemon.proc.pid)
            for _ in range(count):
                t0 = time.perf_counter()
                try:
                    client.call(method, params)
                except RpcError:
                    pass
                latencies.append(time.perf_counter() - t0)
            cpu1 = cpu_ns(daemon.proc.pid)
            out[label] = {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                          "cpu_us": (cpu1 - cpu0) / count / 1e3}
    return out


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


def bench_launch(daemon, others: dict, runs: int) -> dict:
    """Median wall time of each candidate, rounds interleaved. `daemon`
    launches through its zygote's spares, each with its init pre-started
    (the default); `others` are the same code with other settings: label ->
    daemon (SKILLGUARD_PRESTART_INIT=0: spares start the init at the launch;
    SKILLGUARD_LAUNCH_ZYGOTE=0: the daemon forks each supervisor). Also the
    medians of the `launch` reply alone (the skill's init exists) and the
    zygote's RSS."""
    from agent.client import Client

    manifest = f"name: bench-launch\nversion: '1'\npermissions:\n  fs:\n    dirs: ['{daemon.work}:rw']\n"
    replies: dict = {}

    def through_socket(target, label: str):
        def launch() -> float:
            text = manifest.replace(str(daemon.work), str(target.work))
            t0 = time.perf_counter()
            with Client(target.socket, timeout=60) as client:
                reply = client.call("launch", {"manifest": text, "argv": ["/bin/true"]})
                t1 = time.perf_counter()
                result = client.call("wait", {"id": reply["id"]})
            elapsed = time.perf_counter() - t0
            target.pids_seen.add(reply["supervisor_pid"])
            if result["exit_code"] != 0:
                raise RuntimeError(f"launch: {result}")
            replies.setdefault(label, []).append(t1 - t0)
            return elapsed
        return launch

    candidates = {"skillguard launch (socket)": through_socket(daemon, "skillguard launch (socket)")}
    for label, other in others.items():
        candidates[label] = through_socket(other, label)
    candidates["bare fork+exec"] = lambda: timed(["/bin/true"])
    if shutil.which("bwrap"):
        candidates["bubblewrap"] = lambda: timed(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev",
                                                  "--proc", "/proc", "--unshare-all", "--die-with-parent",
                                                  "/bin/true"])
    if shutil.which("firejail"):
        candidates["firejail"] = lambda: timed(["firejail", "--quiet", "--noprofile", "/bin/true"])
    samples = {name: [] for name in candidates}
    for name, fn in candidates.items():
        fn()  # warm caches (the daemon's plan memo, page cache)
    replies.clear()
    for _ in range(runs):
        for name, fn in candidates.items():
            samples[name].append(fn())
    out = {name: {"median": statistics.median(values), "p25": percentile(values, 25),
                  "p75": percentile(values, 75)} for name, values in samples.items()}
    for label, values in replies.items():
        out[label]["reply"] = statistics.median(values)
    zygote = _zygote_pid(daemon.proc.pid)
    out["zygote_rss"] = rss_mib(zygote) if zygote else None
    return out


def _zygote_pid(daemon_pid: int):
    for tid in os.listdir(f"/proc/{daemon_pid}/task"):
        for pid in open(f"/proc/{daemon_pid}/task/{tid}/children").read().split():
            try:
                if b"agent.daemon.zygote" in open(f"/proc/{pid}/cmdline", "rb").read():
                    return int(pid)
            except OSError:
                continue
    return None


# The launch part's other daemons: label -> the environment setting that makes it.
OTHER_DAEMONS = {"  spare, init at the launch": ("SKILLGUARD_PRESTART_INIT", "0"),
                 "  daemon forks (no zygote)": ("SKILLGUARD_LAUNCH_ZYGOTE", "0")}


def _print_rates(paced_at: dict, count: int, clients: int, live: int) -> None:
    """One line per offered rate of the paced rows, and at which of them p99 met 5 ms."""
    print(f"register, {count} registrations from {clients} connections at once at each offered rate "
          f"(lowest first, {live} live before each):")
    met_at, missed_at = [], []
    for rate, r in sorted(paced_at.items()):
        met = r["p99"] <= 0.005
        (met_at if met else missed_at).append(f"{rate:.0f}/s")
        print(f"  offered {rate:6.0f}/s: served {r['per_s']:6.0f}/s  p50 {r['p50'] * 1e3:6.2f} ms  "
              f"p99 {r['p99'] * 1e3:6.2f} ms  daemon CPU {r['budget_ms'].get('daemon', 0):.2f} ms/registration  "
              f"steal {r['steal_share'] * 100:.0f} %  {'p99 <= 5 ms' if met else 'p99 OVER 5 ms'}")
    print(f"  p99 <= 5 ms met at: {', '.join(met_at) or 'none'}; missed at: {', '.join(missed_at) or 'none'}")


def start_other_daemon(make_root, DaemonProcess, name: str, value: str):
    """Another daemon for the launch part, started with `name`=`value`."""
    saved = os.environ.get(name)
    os.environ[name] = value
    other = DaemonProcess(make_root())
    try:
        other.start()
    except BaseException:
        other.tear_down()
        raise
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
    return other


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=1000,
                        help="registrations made from --clients connections at once after --paced")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--paced", type=int, default=1000,
                        help="registrations from --clients connections at each of --rates in total, after --skills")
    parser.add_argument("--rates", default="500,750,1000",
                        help="comma-separated registrations/s offered in the paced parts (--paced at each); "
                             "the highest is the one `list` is paced beside")
    parser.add_argument("--launches", type=int, default=15)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rpc", type=int, default=2000, help="round trips per JSON-RPC case")
    parser.add_argument("--no-other-daemons", action="store_true",
                        help="launch: leave out the daemons without a pre-started init or without a zygote")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: launch, pipeline")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    if os.geteuid() != 0:
        print("bench/daemon: needs root", file=sys.stderr)
        return 1
    from sgdaemon import DaemonProcess, make_root, remove_root

    root = make_root()
    daemon = DaemonProcess(root, config_extra="max_clients: 4096\n")
    others, launch = {}, {}
    print(f"bench/daemon: {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    stalls = machine_stalls()
    print(f"machine on its own: a busy loop lost the CPU for over 1 ms {stalls['per_s']:.1f} times/s "
          f"(longest {stalls['longest'] * 1e3:.2f} ms, {stalls['lost'] * 100:.1f} % of the time); "
          f"the host's steal: {stalls['steal'] * 100:.0f} % of the vCPUs' time")
    try:
        daemon.start()
        register_ok = daemon.call("status")["register"] == "available"
        rpc = bench_rpc(daemon, args.rpc)
        reg = (bench_register(daemon, args.skills, args.concurrent, args.clients, args.paced, rates)
               if register_ok else None)
        if "launch" not in skip:
            if not args.no_other_daemons:
                for label, (name, value) in OTHER_DAEMONS.items():
                    others[label] = start_other_daemon(make_root, DaemonProcess, name, value)
            time.sleep(1.0)  # the zygote's first spare
            launch = bench_launch(daemon, others, args.launches)
    finally:
        for each in (daemon, *others.values()):
            if each is not None:
                each.stop()
                each.end_supervisors()
                each.unload_hooks()
                remove_root(each.root)
    pipes = [] if "pipeline" in skip else [
        ("no rate limit", bench_pipeline(args.events, rate_limit=10 ** 9)),
        ("default rate limit 1000/s/skill", bench_pipeline(args.events, rate_limit=1000))]

    print(f"(load average {os.getloadavg()[0]:.2f} at the end)")
    print()
    print("JSON-RPC on its own (one connection, no kernel work):")
    for label, r in rpc.items():
        print(f"  {label:48s} p50 {r['p50'] * 1e3:5.2f} ms  p99 {r['p99'] * 1e3:5.2f} ms  "
              f"daemon CPU {r['cpu_us']:5.0f} us/request")
    if reg:
        if reg["failure"]:
            print(f"register: STOPPED EARLY: {reg['failure']}")
        rows = (("sequential", f"{args.skills - 1} registrations one after another, one connection"),
                ("paced", f"{args.paced} registrations from {args.clients} connections at once, offered at "
                          f"{rates[-1]:.0f}/s in total, {args.skills} live before"),
                ("concurrent", f"{args.concurrent} registrations from {args.clients} connections at once, "
                               f"each as fast as it is answered, {args.skills} live before"))
        for key, label in rows:
            r = reg[key]
            if key == "paced" and len(rates) > 1:
                _print_rates(reg["paced_at"], args.paced, args.clients, args.skills)
            print(f"register, {label}:")
            print(f"  {r['per_s']:8.0f} registrations/s   (target >= 1000: {r['per_s'] / 1000:.2f}x of target)")
            print(f"  p50 {r['p50'] * 1e3:6.2f} ms  p99 {r['p99'] * 1e3:6.2f} ms  max {r['max'] * 1e3:6.2f} ms"
                  f"   (target p99 <= 5 ms: {r['p99'] * 1e3 / 5:.2f}x of target)")
            print(f"  p99 of the last 100: {r['last_100_p99'] * 1e3:6.2f} ms")
            b = r["budget_ms"]
            if b:
                spent = b["daemon"] + b["helpers"] + b["clients"]
                print(f"  CPU per registration: daemon {b['daemon']:.2f} ms + its helpers (cgroup pool, zygote) "
                      f"{b['helpers']:.2f} + clients {b['clients']:.2f} = {spent:.2f} ms: at 1,000/s, "
                      f"{spent:.1f} of the {os.cpu_count()} CPUs")
                print(f"  the host's steal: {r['steal_share'] * 100:.0f} % of the vCPUs' time in this row "
                      f"({b['steal']:.2f} ms per registration)")
            if key == "paced":
                noop = reg["paced_noop"]
                print(f"  beside it, `list` (no kernel work) from the same clients at the same pace: "
                      f"p50 {noop['p50'] * 1e3:.2f} ms  p99 {noop['p99'] * 1e3:.2f} ms  max "
                      f"{noop['max'] * 1e3:.2f} ms (steal {noop['steal_share'] * 100:.0f} %); register p99 = "
                      f"{r['p99'] / noop['p99']:.1f}x of it")
        print(f"  {reg['live']} skills live at the end; before each row after the sequential one, the "
              f"skills past the first {args.skills} were unregistered and the machine settled for "
              f"{', '.join(f'{s:.1f}' for s in reg['settle'])} s")
        print(f"daemon RSS: {reg['rss_before']:.1f} MiB idle, {reg['rss_after']:.1f} MiB with "
              f"{args.skills} registered skills   (target <= 150 MiB: {reg['rss_after'] / 150:.2f}x of target)")
    else:
        print("register: unavailable (eBPF hooks did not load); skipped")
    for label, p in pipes:
        print(f"pipeline, {p['count']} events over 50 skills, {label}:")
        print(f"  {p['per_s']:10.0f} events/s   (target >= 100000: {p['per_s'] / 100000:.2f}x of target)")
        print(f"  logged {p['logged']} + suppressed {p['suppressed']} = ingested {p['ingested']}; "
              f"streamed {p['delivered']} + lost {p['lost']}: {'balanced' if p['balanced'] else 'NOT BALANCED'}")
    zygote_rss = launch.pop("zygote_rss", None)
    base = launch.get("bubblewrap", {}).get("median")
    if launch:
        print(f"launch of /bin/true (new connection, `launch`, `wait`), median of {args.launches}, "
              f"interleaved, wall time:")
    for name, value in launch.items():
        ratio = f"{value['median'] / base:5.2f}x bubblewrap" if base else ""
        reply = f"   (`launch` reply {value['reply'] * 1e3:.2f} ms)" if "reply" in value else ""
        print(f"  {name:28s} {value['median'] * 1e3:8.2f} ms  (p25 {value['p25'] * 1e3:6.2f}, "
              f"p75 {value['p75'] * 1e3:6.2f})  {ratio}{reply}")
    if base and launch:
        sg = launch["skillguard launch (socket)"]["median"]
        print(f"  (target: within 2x of bubblewrap: {sg / base:.2f}x)")
        if zygote_rss is not None:
            print(f"  launch zygote RSS {zygote_rss:.1f} MiB (a process beside the daemon)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
