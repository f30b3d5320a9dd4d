#!/work/main/.venv/bin/python
"""Cost of skillguard's attach hooks; see README.md. Run as root:

    .venv/bin/python bench/hooks/run.py [--skills 1000] [--reps 5] [--cpu 1]
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

from agent.attach import Hooks  # noqa: E402
from agent.enforce import bpf_hooks, bpf_sys  # noqa: E402
from agent.manifest import load_text  # noqa: E402

TAG = f"bench{os.getpid()}"
USE_MIN = False
ITER = {"connect": 5000, "openat": 300000, "getppid": 1000000}


class Loop:
    """The C timing loop (hooks_bench.c) as a long-running process."""

    def __init__(self, binary: str, cpu: int | None):
        self.proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
        _, pid, port = self.proc.stdout.readline().split()
        self.pid, self.port = int(pid), int(port)

    def run(self, op: str) -> float:
        cmd = f"connect {self.port} {ITER[op]}" if op == "connect" else f"{op} {ITER[op]}"
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer.startswith("error"):
            raise RuntimeError(f"{op}: {answer}")
        return float(answer)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def policy(name: str, port: int | None = None):
    grant = f'permissions:\n  tcp:\n    allowlist: ["127.0.0.1:{port}"]\n' if port else \
        'permissions:\n  tcp:\n    allowlist: ["198.51.100.7:443", "[2001:db8::/32]:443"]\n' \
        '  fs:\n    dirs: [/srv/data:ro]\n'
    result = load_text(f'name: {name}\nversion: "1"\n{grant}', f"{name}.yaml")
    assert result.ok, result.errors
    return result.policy


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def cgroup_links_off(hooks: Hooks) -> None:
    for _, _, pin in bpf_hooks.CGROUP_PROGRAMS:
        bpf_hooks._drop_link(hooks.loaded, pin)
    if hooks.nft is not None:
        hooks.nft._run(f"flush chain inet {hooks.nft.table} output", "bench: unhook")


def cgroup_links_on(hooks: Hooks, level: int) -> None:
    bpf_hooks._attach_cgroup_links(hooks.loaded)
    if hooks.nft is not None:
        hooks.nft._run(f"add rule inet {hooks.nft.table} output socket cgroupv2 level {level} "
                       f"@members goto confined", "bench: rehook")


def floor_tracepoints(tmp: str):
    """A program that returns at once on the same tracepoints: the kernel's floor."""
    import bcc

    noop = bcc.BPF(text=b"int noop(void *ctx) { return 0; }")
    prog = noop.load_func(b"noop", bcc.BPF.TRACEPOINT).fd
    links = []
    for _, name in bpf_hooks.TRACEPOINT_PROGRAMS:
        event = bpf_hooks._perf_tracepoint(bpf_hooks._tracepoint_id(name))
        links.append(bpf_sys.link_create(prog, event, bpf_sys.BPF_PERF_EVENT))
        os.close(event)
    return noop, links


def median_of(loop: Loop, op: str, reps: int, states: dict, order: list[str]) -> dict[str, float]:
    """Interleave: every rep visits every state once, in order."""
    runs: dict[str, list[float]] = {s: [] for s in order}
    for _ in range(reps):
        for state in order:
            enter, leave = states[state]
            enter()
            try:
                runs[state].append(loop.run(op))
            finally:
                leave()
    # The minimum is the least disturbed run: on a shared machine, noise only adds.
    return {s: (min(v) if USE_MIN else statistics.median(v)) for s, v in runs.items()}


def ratio_rounds(loop: Loop, op: str, rounds: int, states: dict, base: str) -> dict:
    """Per round, every state once (the order rotates from round to round, so
    a drift in machine load hits every state alike); each state's ratio to
    `base` in the same round. Returns per state the median, quartiles and
    min/max of those ratios, and the median ns."""
    order = list(states)
    ratios: dict[str, list[float]] = {s: [] for s in order}
    values: dict[str, list[float]] = {s: [] for s in order}
    for r in range(rounds):
        this = {}
        for state in order[r % len(order):] + order[:r % len(order)]:
            enter, leave = states[state]
            enter()
            try:
                this[state] = loop.run(op)
            finally:
                leave()
        for state in order:
            values[state].append(this[state])
            ratios[state].append(this[state] / this[base])
    out = {}
    for state in order:
        q = statistics.quantiles(ratios[state], n=4) if rounds >= 4 else [min(ratios[state])] * 3
        out[state] = {"ns": statistics.median(values[state]), "ratio": statistics.median(ratios[state]),
                      "q1": q[0], "q3": q[2], "min": min(ratios[state]), "max": max(ratios[state])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--stat", choices=("median", "min"), default="min",
                        help="per state, over the reps (default min: noise on a shared machine only adds)")
    parser.add_argument("--cpu", type=int, default=1 if os.cpu_count() and os.cpu_count() > 1 else None)
    parser.add_argument("--c-rounds", type=int, default=31,
                        help="(c): interleaved rounds; the result is the median of the per-round ratios")
    args = parser.parse_args()
    global USE_MIN
    USE_MIN = args.stat == "min"
    agg = min if USE_MIN else statistics.median
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="skillguard-bench-hooks-")
    binary = f"{tmp}/hooks_bench"
    subprocess.run(["cc", "-O2", "-o", binary, str(Path(__file__).with_name("hooks_bench.c"))], check=True)
    noop = lambda: None  # noqa: E731
    sleepers: list[subprocess.Popen] = []
    loop = Loop(binary, args.cpu)
    hooks = None
    try:
        base = {op: agg(loop.run(op) for _ in range(args.reps)) for op in ITER}
        t0 = time.perf_counter()
        hooks = Hooks.load(pin_dir=f"/sys/fs/bpf/skillguard-{TAG}", subtree=f"skillguard-{TAG}",
                           nft_table=f"skillguard_{TAG}", resolvers=[])
        load_s = time.perf_counter() - t0

        # (d) attach latency, populating the skill cgroups
        print(f"populating {args.skills} skill cgroups (one sleeping process each)...", file=sys.stderr)
        # The daemon compiles its policies when it loads them; attach then only
        # writes maps, nft elements and cgroup files.
        policies = [policy(f"s{i}") for i in range(args.skills)]
        fs_policies = [policy(f"f{i}") for i in range(50)]
        for p in policies:
            hooks.prepare(p, observe_fs=False)
        for p in fs_policies:
            hooks.prepare(p)
        hooks.prepare(policy("fsobs"))
        latencies = []
        level = None
        for i in range(args.skills):
            proc = subprocess.Popen(["sleep", "3600"])
            sleepers.append(proc)
        attach_cpu = time.thread_time()
        for i, proc in enumerate(sleepers):
            t = time.perf_counter()
            a = hooks.attach(policies[i], [proc.pid], observe_fs=False)
            latencies.append((time.perf_counter() - t) * 1000)
            level = hooks._skill_level
        attach_cpu = (time.thread_time() - attach_cpu) / len(sleepers) * 1000
        # With fs observation: the first such skill attaches the syscall
        # tracepoints (and the last one to leave detaches them, issue 5), so
        # an attach pays that only when no other fs-observing skill is there.
        # Measured both ways: cold (none attached before each) and while one
        # fs-observing skill stays attached.
        def fs_attaches() -> list:
            out = []
            for i in range(50):
                proc = subprocess.Popen(["sleep", "3600"])
                t = time.perf_counter()
                a = hooks.attach(fs_policies[i], [proc.pid])
                out.append((time.perf_counter() - t) * 1000)
                hooks.detach(a.skill_id)
                proc.kill()
                proc.wait()
            return out

        fs_cold = fs_attaches()
        anchor_proc = subprocess.Popen(["sleep", "3600"])
        anchor = hooks.attach(policy("fsobs"), [anchor_proc.pid])
        fs_latencies = fs_attaches()
        hooks.detach(anchor.skill_id)
        anchor_proc.kill()
        anchor_proc.wait()

        # (a) unconfined connect: programs attached + 1,000 skills vs unhooked
        a = median_of(loop, "connect", args.reps,
                      {"off": (lambda: cgroup_links_off(hooks), lambda: cgroup_links_on(hooks, level)),
                       "on": (noop, noop)}, ["off", "on"])

        # (b) unconfined openat/getppid: tracepoints attached (one fs skill) / after it left / floor
        fs_proc = subprocess.Popen(["sleep", "3600"])
        sleepers.append(fs_proc)
        fs_skill: list = []

        def fs_on():
            fs_skill.append(hooks.attach(policy("fsobs"), [fs_proc.pid]).skill_id)

        def fs_off():
            hooks.detach(fs_skill.pop())
        floor_state: list = []

        def floor_on():
            floor_state.append(floor_tracepoints(tmp))

        def floor_off():
            bpf, links = floor_state.pop()
            for link in links:
                os.close(link)  # perf links cannot be LINK_DETACHed; the last close detaches
            bpf.cleanup()
        b = {}
        for op in ("openat", "getppid"):
            b[op] = median_of(loop, op, args.reps,
                              {"after": (noop, noop), "attached": (fs_on, fs_off), "floor": (floor_on, floor_off)},
                              ["after", "attached", "floor"])

        # (c) the same process confined vs unconfined
        confined: list = []

        def confine(observe: bool):
            def enter():
                confined.append(hooks.attach(policy("bench-self", loop.port), [loop.pid],
                                             observe_fs=observe).skill_id)
            return enter

        def release():
            hooks.detach(confined.pop())
        c = ratio_rounds(loop, "connect", args.c_rounds,
                         {"unconfined": (noop, noop), "confined": (confine(False), release),
                          "confined+fs": (confine(True), release)},
                         "unconfined")

        after = {op: agg(loop.run(op) for _ in range(args.reps)) for op in ("openat", "getppid")}
    finally:
        loop.close()
        if hooks is not None:
            hooks.close(unload=True)
        for proc in sleepers:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"bench/hooks: {args.skills} skill cgroups populated, {args.reps} interleaved reps, "
          f"{args.stat} ns per iteration (CPU {args.cpu}); programs loaded in {load_s:.2f} s\n")
    print("(a) connect()+accept() on loopback, unconfined process")
    print(f"    no programs loaded (before load)   {base['connect']:9.1f}")
    print(f"    hooks unlinked, skills in maps     {a['off']:9.1f}")
    print(f"    programs attached + {args.skills} skills   {a['on']:9.1f}   ratio on/off {a['on'] / a['off']:.3f}"
          f"   on/none {a['on'] / base['connect']:.3f}")
    print("(b) unconfined process while syscall tracepoints are attached / after the last fs skill left")
    for op in ("openat", "getppid"):
        r = b[op]
        print(f"    {op:8} none {base[op]:7.1f}  attached {r['attached']:7.1f}  floor(no-op prog) {r['floor']:7.1f}"
              f"  after {r['after']:7.1f}   attached/floor {r['attached'] / r['floor']:.3f}"
              f"  after/none {r['after'] / base[op]:.3f}  (end of run {after[op]:.1f})")
    print(f"(c) connect()+accept() from the same process, confined vs unconfined: {args.c_rounds} interleaved "
          "rounds, median of the per-round ratios [quartiles] (min-max)")
    print(f"    unconfined {c['unconfined']['ns']:.1f} ns (median)")
    for state in ("confined", "confined+fs"):
        r = c[state]
        print(f"    {state:12s} {r['ns']:8.1f} ns   ratio {r['ratio']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}] "
              f"({r['min']:.3f}-{r['max']:.3f})   target <= 1.030")
    print(f"(d) attach latency, request to enforced (Hooks.attach: cgroup made with its limits, map entries, "
          f"nft elements, processes moved), over {len(latencies)} attaches (no fs observation)")
    print(f"    p50 {pct(latencies, .5):.2f} ms  p99 {pct(latencies, .99):.2f} ms  max {max(latencies):.2f} ms"
          f"   first 100 p50 {pct(latencies[:100], .5):.2f} ms, last 100 p50 {pct(latencies[-100:], .5):.2f} ms"
          f"   CPU {attach_cpu:.2f} ms per attach   target p99 <= 5 ms")
    print(f"    with fs observation (50), tracepoints already attached for another skill: "
          f"p50 {pct(fs_latencies, .5):.2f} ms  p99 {pct(fs_latencies, .99):.2f} ms")
    print(f"    with fs observation (50), each the only one (tracepoints attached and detached "
          f"each time): p50 {pct(fs_cold, .5):.2f} ms  p99 {pct(fs_cold, .99):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
