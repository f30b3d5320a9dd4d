#!/usr/bin/env python3
"""Network confinement cost: connect() round trips through a skill's namespace
with its nftables table, with that table plus connection tracking, and
without a table, interleaved in one run; and the set-up + tear-down time of
a skill's network namespace (warm, and once per fresh interpreter).

    sudo .venv/bin/python bench/net/run.py [--connects N] [--rounds R] [--setups S] [--cold C]

Needs root. Everything happens in namespaces the bench creates (a simulated
host and an "internet" holding 198.51.100.10:8080); the host's own network
is not touched.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SERVER = ("198.51.100.10", 8080)
MANIFEST = "name: bench-net\nversion: '1'\npermissions:\n  tcp:\n    allowlist: ['198.51.100.10:8080']\n"
SERVER_CODE = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.10", 8080)); s.listen(4096)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept(); c.close()
    except OSError:  # a client reset it while it waited in the accept queue
        pass
"""

# One set-up in a fresh interpreter, as `skillguard run` does it: the
# network modules' imports and libnftables' loading count too. argv: the
# simulated host's netns path, the state root.
COLD_CODE = """
import ctypes, json, os, sys, time
sys.path.insert(0, %r)
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDONLY)
assert libc.setns(fd, 0x40000000) == 0
from agent.config import HostConfig
from agent.enforce.libc import CLONE_NEWNET, unshare
from agent.manifest import load_text
up_r, up_w = os.pipe()
stop_r, stop_w = os.pipe()
pid = os.fork()
if pid == 0:
    unshare(CLONE_NEWNET); os.write(up_w, b"u"); os.read(stop_r, 1); os._exit(0)
assert os.read(up_r, 1) == b"u"
start = time.perf_counter()
from agent.launch.netns import NetnsHandle, plan_network
spec = plan_network(load_text(%r).policy, HostConfig(address_pool="10.213.0.0/16"), sys.argv[2])
handle = NetnsHandle(spec, emit=lambda **_: None, note=lambda _text: None)
handle.attach(pid)
took = time.perf_counter() - start
handle.close()
os.write(stop_w, b"x"); os.waitpid(pid, 0)
print(json.dumps({"ms": took * 1000, "steps": handle.timings}))
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class Client:
    """A forked child in a fresh network namespace that runs connect loops on demand."""

    def __init__(self):
        from agent.enforce.libc import CLONE_NEWNET, unshare

        self.cmd_r, self.cmd_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.cmd_w)
                os.close(self.out_r)
                unshare(CLONE_NEWNET)
                os.write(self.out_w, b"u")
                while True:
                    data = os.read(self.cmd_r, 8)
                    if len(data) != 8 or struct.unpack("=q", data)[0] < 0:
                        break
                    (count,) = struct.unpack("=q", data)
                    os.write(self.out_w, struct.pack("=dd", *self._connects(count)))
            finally:
                os._exit(0)
        os.close(self.cmd_r)
        os.close(self.out_w)
        assert os.read(self.out_r, 1) == b"u"

    @staticmethod
    def _connects(count: int) -> tuple[float, float]:
        linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(count):
            s = socket.socket()
            s.settimeout(5)  # never hang the bench; connects take microseconds
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect(SERVER)
            s.close()
        return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count

    def connects(self, count: int) -> tuple[float, float]:
        """(wall, CPU time of this client) per connect, in seconds."""
        os.write(self.cmd_w, struct.pack("=q", count))
        return struct.unpack("=dd", os.read(self.out_r, 16))

    def stop(self) -> None:
        # A later Client's child holds a copy of our pipe, so EOF would not
        # reach ours: say stop explicitly.
        os.write(self.cmd_w, struct.pack("=q", -1))
        os.close(self.cmd_w)
        os.waitpid(self.pid, 0)
        os.close(self.out_r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=200, help="connects per round and side")
    parser.add_argument("--rounds", type=int, default=61, help="rounds, rotating the sides' order")
    parser.add_argument("--setups", type=int, default=30)
    parser.add_argument("--cold", type=int, default=5, help="set-ups in a fresh interpreter each")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/net needs root", file=sys.stderr)
        return 2

    from agent.config import HostConfig
    from agent.launch.netns import NetnsHandle, plan_network
    from agent.manifest import load_text

    tag = f"{os.getpid()}"
    host, internet = f"sgb-h-{tag}", f"sgb-i-{tag}"
    state = tempfile.mkdtemp(prefix="skillguard-bench-net-")
    server = None
    ip("netns", "add", host)
    ip("netns", "add", internet)
    try:
        ip("-n", host, "link", "add", "up0", "type", "veth", "peer", "name", "down0", "netns", internet)
        for ns in (host, internet):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", host, "addr", "add", "192.0.2.2/24", "dev", "up0")
        ip("-n", internet, "addr", "add", "192.0.2.1/24", "dev", "down0")
        ip("-n", internet, "addr", "add", "198.51.100.10/32", "dev", "lo")
        ip("-n", host, "link", "set", "up0", "up")
        ip("-n", internet, "link", "set", "down0", "up")
        ip("-n", host, "route", "add", "default", "via", "192.0.2.1")
        server = subprocess.Popen(["nsenter", f"--net=/run/netns/{internet}", sys.executable, "-c", SERVER_CODE],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        # From here on this thread (and every child it forks) lives in the simulated host.
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{host}", os.O_RDONLY)
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)

        policy = load_text(MANIFEST).policy
        spec = plan_network(policy, HostConfig(address_pool="10.213.0.0/16"), state)
        quiet = dict(emit=lambda **_: None, note=lambda _text: None)

        # -- set-up in a fresh process (imports and libnftables' loading included)
        cold: list[float] = []
        for _ in range(args.cold):
            code = COLD_CODE % (str(REPO), MANIFEST)
            done = subprocess.run([sys.executable, "-c", code, f"/run/netns/{host}", state],
                                  capture_output=True, text=True, check=True, timeout=60)
            cold.append(json.loads(done.stdout)["ms"])
            time.sleep(0.1)

        # -- set-up and tear-down per launch, in this warm process
        warm = Client()
        handle = NetnsHandle(spec, **quiet)
        handle.attach(warm.pid)  # imports, libnftables, the first NAT check: not timed
        handle.close()
        warm.stop()
        # Spaced launches (the kernel has finished destroying the previous
        # namespace, which it does asynchronously under the RTNL lock), then
        # back-to-back ones (that clean-up competes with the next set-up).
        timings: dict[float, tuple[list, list]] = {}
        steps: dict[str, list[float]] = {}
        nat_checks: dict[str, int] = {}
        for gap in (0.1, 0.0):
            attach_ms, close_ms = timings.setdefault(gap, ([], []))
            for _ in range(args.setups):
                client = Client()
                handle = NetnsHandle(spec, **quiet)
                t0 = time.perf_counter()
                handle.attach(client.pid)
                t1 = time.perf_counter()
                handle.close()
                t2 = time.perf_counter()
                client.stop()
                attach_ms.append((t1 - t0) * 1000)
                close_ms.append((t2 - t1) * 1000)
                for name, ms in handle.timings.items():
                    steps.setdefault(name, []).append(ms)
                nat_checks[handle.nat_check] = nat_checks.get(handle.nat_check, 0) + 1
                time.sleep(gap)

        # -- connect round trips: the same set-up, with the skill's table,
        # with that table plus connection tracking, and without a table
        from agent.enforce import nft
        from agent.launch.netns import entered

        sides = {"table": Client(), "table + ct": Client(), "no table": Client()}
        handles = {name: NetnsHandle(spec, **quiet) for name in sides}
        for name, client in sides.items():
            handles[name].attach(client.pid)
        with entered(handles["no table"].netns_fd):
            nft.apply({"nftables": [{"delete": {"table": {"family": "inet", "name": "skillguard"}}}]})
        with entered(handles["table + ct"].netns_fd):
            nft.apply({"nftables": [
                {"insert": {"rule": {"family": "inet", "table": "skillguard", "chain": chain, "expr": [
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                    {"accept": None}]}}} for chain in ("output", "input")]})
        for client in sides.values():
            client.connects(200)  # warm every path
        wall: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for i in range(args.rounds):  # rotate which side goes first, so drift cancels
            for name in order[i % 3:] + order[:i % 3]:
                w, c = sides[name].connects(args.connects)
                wall[name].append(w * 1e6)
                cpu[name].append(c * 1e6)
        counters = handles["table"].counters()
        for name in sides:
            handles[name].close()
            sides[name].stop()
    finally:
        if server is not None:
            server.send_signal(signal.SIGKILL)
            server.wait()
        subprocess.run(["ip", "netns", "del", host], check=False)
        subprocess.run(["ip", "netns", "del", internet], check=False)
        shutil.rmtree(state, ignore_errors=True)

    def ratios(series: dict[str, list[float]], name: str) -> list[float]:
        return sorted(x / y for x, y in zip(series[name], series["no table"]))

    def quartiles(values: list[float]) -> str:
        return f"{values[len(values) // 4]:.3f}..{values[3 * len(values) // 4]:.3f}"

    print(f"connect() round trip to {SERVER[0]}:{SERVER[1]}, {args.rounds} rounds x {args.connects} "
          "connects per side, sides interleaved:")
    print(f"  {'':34} {'wall us':>8} {'CPU us':>8}   overhead vs no table: median of paired rounds "
          "(quartiles), wall | CPU")
    for name, label in (("no table", "netns + veth, no table"),
                        ("table", "netns + veth + skill table"),
                        ("table + ct", "  same + ct state established first")):
        line = f"  {label:34} {statistics.median(wall[name]):8.1f} {statistics.median(cpu[name]):8.1f}"
        if name != "no table":
            rw, rc = ratios(wall, name), ratios(cpu, name)
            line += (f"   {100 * (statistics.median(rw) - 1):+5.1f} % ({quartiles(rw)}) | "
                     f"{100 * (statistics.median(rc) - 1):+5.1f} % ({quartiles(rc)})")
        print(line)
    print(f"  target: skill table <= +5 % (wall); accepted counter {counters['accepted']} "
          f"(one per connect: only SYNs are counted)")
    print(f"network namespace set-up (veth, addresses, routes, table, NFLOG, NAT check), {args.setups} launches:")
    for gap, label in ((0.1, "spaced 100 ms"), (0.0, "back-to-back ")):
        attach_ms, close_ms = timings[gap]
        print(f"  {label}  set-up median {statistics.median(attach_ms):6.2f} ms (target <= 20 ms), "
              f"p90 {sorted(attach_ms)[int(0.9 * len(attach_ms))]:6.2f} ms; "
              f"tear-down median {statistics.median(close_ms):5.2f} ms")
    if cold:
        print(f"  fresh process set-up median {statistics.median(cold):6.2f} ms over {len(cold)} "
              "(imports of the network modules and libnftables' loading included)")
    print("  set-up steps, median ms: " + ", ".join(f"{name} {statistics.median(ms):.2f}"
                                                   for name, ms in steps.items()))
    print("  host NAT table found by: " + ", ".join(f"{k} {v}" for k, v in sorted(nat_checks.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
