"""The compiled nftables ruleset loads into a real kernel and drops what it must.

Runs in a network namespace made for the test, so the host's ruleset is never
touched: a child unshares CLONE_NEWNET, loads the JSON with libnftables, and
tries connects on loopback-free addresses.
"""
import errno
import json
import os
import socket

import pytest

from agent.compile.network import compile_network, nft_ruleset
from agent.enforce.libc import CLONE_NEWNET, unshare
from agent.manifest import load_text
from tests.conftest import require


def in_fresh_netns(fn):
    """Run fn() in a forked child inside a new network namespace; return its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            unshare(CLONE_NEWNET)
            out = {"ok": True, "value": fn()}
        except BaseException as exc:  # report everything to the parent
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def nft(root):
    try:
        import nftables
    except ImportError:
        require(False, "python3-nftables is not installed")
    return nftables


def test_ruleset_loads_and_drops_ungranted_connects(nft):
    policy = load_text("name: n\nversion: '1'\npermissions:\n  tcp:\n    allowlist:\n"
                       "      - 192.0.2.10:443\n      - redis:6379\n      - '[2001:db8::1]:22'\n").policy
    ruleset = nft_ruleset(compile_network(policy))

    def load_and_probe():
        # A veth pair makes 192.0.2.0/24 routable without touching loopback,
        # which the ruleset accepts; packets sent there simply vanish.
        for cmd in ("ip link set lo up", "ip link add d0 type veth peer name d1", "ip link set d1 up",
                    "ip addr add 192.0.2.1/24 dev d0", "ip link set d0 up"):
            if os.system(cmd) != 0:
                raise RuntimeError(f"{cmd} failed")
        n = nft.Nftables()
        n.set_json_output(True)
        rc, out, err = n.json_cmd(ruleset)
        if rc != 0:
            raise RuntimeError(f"nft rejected the ruleset: {err}")
        results = {}
        for addr, port in (("192.0.2.10", 443), ("192.0.2.10", 444), ("192.0.2.11", 443)):
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect((addr, port))
                results[f"{addr}:{port}"] = "connected"
            except OSError as exc:
                results[f"{addr}:{port}"] = os.strerror(exc.errno) if exc.errno else str(exc)
            finally:
                s.close()
        rc, out, err = n.cmd("list counter inet skillguard dropped")
        results["dropped"] = json.loads(out)["nftables"][1]["counter"]["packets"]
        return results

    result = in_fresh_netns(load_and_probe)
    assert result["ok"], result.get("error")
    v = result["value"]
    # Ungranted connects are rejected with a TCP reset: they fail at
    # once (TCP reset: ECONNREFUSED) instead of hanging until the timeout.
    assert v["192.0.2.10:444"] == os.strerror(errno.ECONNREFUSED)
    assert v["192.0.2.11:443"] == os.strerror(errno.ECONNREFUSED)
    # The granted destination passes the filter into a veth where
    # nobody answers: the connect times out instead of being rejected.
    assert v["192.0.2.10:443"] == "timed out"
    assert v["dropped"] >= 2
