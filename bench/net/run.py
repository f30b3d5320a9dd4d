#!/usr/bin/env python3
"""Network confinement cost: connect() round trips through a skill's namespace
with its nftables table vs. the same namespace without the table, and the
set-up + tear-down time of a skill's network namespace, in one run.

    sudo .venv/bin/python bench/net/run.py [--connects N] [--rounds R] [--setups S]

Needs root. Everything happens in namespaces the bench creates (a simulated
host and an "internet" holding 198.51.100.10:8080); the host's own network
is not touched.
"""
from __future__ import annotations

import argparse
import ctypes
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
                    os.write(self.out_w, struct.pack("=d", self._connects(count)))
            finally:
                os._exit(0)
        os.close(self.cmd_r)
        os.close(self.out_w)
        assert os.read(self.out_r, 1) == b"u"

    @staticmethod
    def _connects(count: int) -> float:
        linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up
        start = time.perf_counter()
        for _ in range(count):
            s = socket.socket()
            s.settimeout(5)  # never hang the bench; connects take microseconds
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect(SERVER)
            s.close()
        return (time.perf_counter() - start) / count

    def connects(self, count: int) -> float:
        os.write(self.cmd_w, struct.pack("=q", count))
        return struct.unpack("=d", os.read(self.out_r, 8))[0]

    def stop(self) -> None:
        # A later Client's child holds a copy of our pipe, so EOF would not
        # reach ours: say stop explicitly.
        os.write(self.cmd_w, struct.pack("=q", -1))
        os.close(self.cmd_w)
        os.waitpid(self.pid, 0)
        os.close(self.out_r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=500, help="connects per round and side")
    parser.add_argument("--rounds", type=int, default=31, help="rounds, alternating the two sides")
    parser.add_argument("--setups", type=int, default=30)
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

        # -- set-up and tear-down per launch
        NetnsHandle(spec, **quiet)  # warm imports (pyroute2, nftables) outside the timing
        # Spaced launches (the kernel has finished destroying the previous
        # namespace, which it does asynchronously under the RTNL lock), then
        # back-to-back ones (that clean-up competes with the next set-up).
        timings: dict[float, tuple[list, list]] = {}
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
                time.sleep(gap)

        # -- connect round trips: the same set-up, with and without the skill's table
        with_table, without_table = Client(), Client()
        handles = [NetnsHandle(spec, **quiet), NetnsHandle(spec, **quiet)]
        handles[0].attach(with_table.pid)
        handles[1].attach(without_table.pid)
        from agent.enforce import nft
        from agent.launch.netns import entered

        with entered(handles[1].netns_fd):
            nft.apply({"nftables": [{"delete": {"table": {"family": "inet", "name": "skillguard"}}}]})
        with_table.connects(200)
        without_table.connects(200)  # warm both paths
        table_us, bare_us = [], []
        for i in range(args.rounds):  # alternate which side goes first, so drift cancels
            order = ((with_table, table_us), (without_table, bare_us))
            for client, out in (order if i % 2 == 0 else order[::-1]):
                out.append(client.connects(args.connects) * 1e6)
        counters = handles[0].counters()
        for handle in handles:
            handle.close()
        with_table.stop()
        without_table.stop()
    finally:
        if server is not None:
            server.send_signal(signal.SIGKILL)
            server.wait()
        subprocess.run(["ip", "netns", "del", host], check=False)
        subprocess.run(["ip", "netns", "del", internet], check=False)
        shutil.rmtree(state, ignore_errors=True)

    t, b = statistics.median(table_us), statistics.median(bare_us)
    print(f"connect() round trip to {SERVER[0]}:{SERVER[1]}, median of {args.rounds} rounds x {args.connects}:")
    print(f"  netns + veth, no table      {b:8.1f} us")
    ratios = sorted(x / y for x, y in zip(table_us, bare_us))
    ratio = statistics.median(ratios)
    print(f"  netns + veth + skill table  {t:8.1f} us")
    print(f"  ratio (median of {len(ratios)} paired rounds) {ratio:.3f}: overhead {100 * (ratio - 1):+.1f} % "
          f"(target <= 5 %); quartiles {ratios[len(ratios) // 4]:.2f}..{ratios[3 * len(ratios) // 4]:.2f}; "
          f"accepted counter {counters['accepted']}")
    print(f"network namespace set-up (veth, addresses, routes, table, NFLOG, NAT check), {args.setups} launches:")
    for gap, label in ((0.1, "spaced 100 ms"), (0.0, "back-to-back ")):
        attach_ms, close_ms = timings[gap]
        print(f"  {label}  set-up median {statistics.median(attach_ms):6.2f} ms (target <= 20 ms), "
              f"p90 {sorted(attach_ms)[int(0.9 * len(attach_ms))]:6.2f} ms; "
              f"tear-down median {statistics.median(close_ms):5.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
