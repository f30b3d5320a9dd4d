"""A small "internet" made of network namespaces, for the network tests.

    [sim host netns]  up0 192.0.2.2/24, 2001:db8:ffff::2/64
          |  veth           skillguard runs here (nsenter --net=...): its veths,
          |                 NAT table and DNS stub live in this namespace only
    [internet netns]  down0 192.0.2.1/24, 2001:db8:ffff::1/64
                      lo: 198.51.100.10, .20, .53, 203.0.113.10, 2001:db8::10
                      servers (one subprocess, `python -m tests.kernel.netlab serve LOG`):
                        TCP "hello" on [::]:8080 and [::]:8081 (dual stack),
                        TCP echo on [::]:8082 (the connection stays open),
                        HTTP on [::]:80, UDP sink on [::]:9999,
                        authoritative DNS (dnspython) on 198.51.100.53:53 for ZONE

Every address is from the documentation ranges (RFC 5737, RFC 3849), so
nothing leaves the namespaces the tests made, and the host's own routes and
tables are never touched. Names are unique per process, so concurrent test
runs do not collide. Every server writes what it received as JSON lines to
the log, so a test can prove a packet did NOT arrive.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DNS_SERVER = "198.51.100.53"
WWW, WWW2, OTHER, V6 = "198.51.100.10", "198.51.100.20", "203.0.113.10", "2001:db8::10"
SERVER_ADDRESSES = (WWW + "/32", WWW2 + "/32", DNS_SERVER + "/32", OTHER + "/32", V6 + "/128")
# name -> [(type, value)], all under example.test; TTL 60 unless named in SHORT_TTL.
ZONE = {
    "www.example.test": [("A", WWW)],
    "www2.example.test": [("A", WWW2)],
    "other.example.test": [("A", OTHER)],
    "alias.example.test": [("CNAME", "www2.example.test")],
    "loop.example.test": [("A", "127.0.0.1")],
    "meta.example.test": [("A", "169.254.169.254")],
    "metav6.example.test": [("AAAA", "fd00:ec2::254")],
    "private.example.test": [("A", "10.1.2.3")],
    "corp.example.test": [("A", "10.1.2.4")],
    "mixed.example.test": [("A", "127.0.0.1"), ("A", WWW2)],
    "v6.example.test": [("AAAA", V6)],
    "mapped.example.test": [("AAAA", "::ffff:" + WWW2)],
    "mappedloop.example.test": [("AAAA", "::ffff:127.0.0.1")],
    "short.example.test": [("A", WWW2)],
}
SHORT_TTL = {"short.example.test": 1}
ECHO_PORT = 8082


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NetLab:
    """Create with `NetLab.create()`; `close()` removes both namespaces and the server."""

    def __init__(self, tag: str, workdir: Path):
        self.host = f"sgl-h-{tag}"
        self.internet = f"sgl-i-{tag}"
        self.workdir = workdir
        self.log = workdir / "internet.jsonl"
        self.server: Optional[subprocess.Popen] = None

    @classmethod
    def create(cls, workdir: Path) -> "NetLab":
        lab = cls(f"{os.getpid()}-{int(time.monotonic() * 1000) % 100000}", workdir)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    @property
    def host_netns_path(self) -> str:
        return f"/run/netns/{self.host}"

    def _build(self) -> None:
        h, i = self.host, self.internet
        _ip("netns", "add", h)
        _ip("netns", "add", i)
        _ip("-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "down0", "netns", i)
        for ns in (h, i):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", h, "addr", "add", "192.0.2.2/24", "dev", "up0")
        _ip("-n", h, "addr", "add", "2001:db8:ffff::2/64", "dev", "up0", "nodad")
        _ip("-n", i, "addr", "add", "192.0.2.1/24", "dev", "down0")
        _ip("-n", i, "addr", "add", "2001:db8:ffff::1/64", "dev", "down0", "nodad")
        for address in SERVER_ADDRESSES:
            _ip("-n", i, "addr", "add", address, "dev", "lo")
        _ip("-n", h, "link", "set", "up0", "up")
        _ip("-n", i, "link", "set", "down0", "up")
        _ip("-n", h, "route", "add", "default", "via", "192.0.2.1")
        _ip("-n", h, "-6", "route", "add", "default", "via", "2001:db8:ffff::1")
        # The simulated host routes IPv6 (skillguard leaves that sysctl alone); IPv4
        # forwarding is left off so that the supervisor's own switch is exercised.
        self.sysctl_host("net.ipv6.conf.all.forwarding", "1")
        self.log.write_text("")
        self.server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{i}", sys.executable, "-m", "tests.kernel.netlab",
             "serve", str(self.log)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"netlab server did not start: {line}{self.server.stderr.read()}")

    def sysctl_host(self, key: str, value: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.host, "sysctl", "-qw", f"{key}={value}"], check=True)

    def in_host(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={self.host_netns_path}", *argv],
                              capture_output=True, text=True, **kw)

    def host_links(self) -> list[str]:
        out = _ip("-n", self.host, "-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def host_tables(self) -> list[str]:
        out = self.in_host("nft", "list", "tables").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def received(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        for ns in (self.host, self.internet):
            _ip("netns", "del", ns, check=False)


# -- the servers (run inside the internet namespace) ---------------------------


def _record(log, lock, **entry) -> None:
    with lock:
        log.write(json.dumps(entry) + "\n")
        log.flush()


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


def _tcp_hello(port: int, log, lock) -> None:
    listener = _dual_stack(socket.SOCK_STREAM, port)
    listener.listen(64)
    while True:
        conn, peer = listener.accept()
        local = conn.getsockname()
        _record(log, lock, kind="tcp", src=peer[0], dst=local[0], port=port)
        try:
            conn.sendall(f"hello {local[0]} {port}\n".encode())
        except OSError:
            pass
        conn.close()


def _tcp_echo(port: int, log, lock) -> None:
    """Echo every byte back until the client closes: a connection that stays open."""
    listener = _dual_stack(socket.SOCK_STREAM, port)
    listener.listen(64)

    def serve_one(conn, peer, local):
        _record(log, lock, kind="tcp", src=peer[0], dst=local[0], port=port)
        with conn:
            try:
                while data := conn.recv(4096):
                    _record(log, lock, kind="echo", src=peer[0], data=data.decode(errors="replace"))
                    conn.sendall(data)
            except OSError:
                pass

    while True:
        conn, peer = listener.accept()
        threading.Thread(target=serve_one, args=(conn, peer, conn.getsockname()), daemon=True).start()


def _http(log, lock) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            _record(log, lock, kind="http", src=self.client_address[0], path=self.path)
            body = b"netlab http ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    Server(("::", 80), Handler).serve_forever()


def _udp_sink(log, lock) -> None:
    sock = _dual_stack(socket.SOCK_DGRAM, 9999)
    while True:
        data, peer = sock.recvfrom(65535)
        _record(log, lock, kind="udp", src=peer[0], data=data.decode(errors="replace"))


def _dns(log, lock) -> None:
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((DNS_SERVER, 53))
    while True:
        data, peer = sock.recvfrom(65535)
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - a probe that is not DNS
            _record(log, lock, kind="dns-garbage", src=peer[0])
            continue
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        _record(log, lock, kind="dns", src=peer[0], qname=name, qtype=qtype)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        records = ZONE.get(name)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        owner = name
        while records:
            ttl = SHORT_TTL.get(owner, 60)
            cname = [v for t, v in records if t == "CNAME"]
            if cname:
                response.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", "CNAME", cname[0] + "."))
                owner = cname[0]
                records = ZONE.get(owner)
                continue
            values = [v for t, v in records if t == qtype]
            if values:
                response.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", qtype, *values))
            break
        sock.sendto(response.to_wire(), peer)


def serve(log_path: str) -> None:
    import dns.rdatatype  # noqa: F401 - fail before "ready" if dnspython is missing

    lock = threading.Lock()
    log = open(log_path, "a", encoding="utf-8")
    workers = [lambda: _tcp_hello(8080, log, lock), lambda: _tcp_hello(8081, log, lock),
               lambda: _tcp_echo(ECHO_PORT, log, lock),
               lambda: _http(log, lock), lambda: _udp_sink(log, lock), lambda: _dns(log, lock)]
    for work in workers:
        threading.Thread(target=work, daemon=True).start()
    time.sleep(0.3)  # let every thread bind
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
