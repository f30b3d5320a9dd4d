"""The skill's only resolver: answers allowlisted names, admits their addresses.

The skill's resolv.conf names the stub (169.254.53.53, an address on the
host end of the skill's veth); its nftables table lets DNS reach nothing
else. For each query the stub

1. refuses (REFUSED + a `network` event) a name that no tcp/http rule
   names (glob semantics of agent/manifest/glob.py);
2. forwards an allowlisted one to the host's upstream resolver under a
   fresh random query id;
3. keeps from the answer only the CNAME chain from the asked name and its
   A/AAAA records (authority and additional sections are dropped), judges
   each address with agent/net/admit.py (rebinding/SSRF defence), strips
   the refused ones (REFUSED when none is left), caps TTLs at the ceiling;
4. adds each admitted address to the skill's nftables sets for the ports of
   the rules that named it, with timeout = TTL clamped to [floor, ceiling],
   and only then sends the answer, so a connect right after the lookup
   already passes.

`StubRules` is the pure part (tests/unit/test_dns_stub.py); `DnsStub` owns
the sockets and is served from the supervisor's poll loop: UDP and TCP
listeners bound to the skill's veth (SO_BINDTODEVICE, so each skill's stub
hears only its own skill and several stubs share 169.254.53.53:53), and one
upstream socket whose replies are matched by id, source and question.
"""
from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from agent.compile.network import DnsSets, NameGrant
from agent.manifest.glob import match_host
from agent.net.admit import TTL_CEILING, TTL_FLOOR, IPNetwork, clamp_ttl, judge

PENDING_TIMEOUT = 5.0  # seconds an upstream answer is waited for
TCP_READ_TIMEOUT = 1.0


@dataclass(frozen=True)
class Addition:
    set_name: str
    address: str
    timeout: int


@dataclass
class Filtered:
    response: object  # dns.message.Message, as it goes to the skill
    additions: list[Addition] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (address, why)
    admitted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StubRules:
    names: tuple[NameGrant, ...]
    sets: tuple[DnsSets, ...]
    private_names: tuple[str, ...] = ()
    own: tuple[IPNetwork, ...] = ()
    ttl_floor: int = TTL_FLOOR
    ttl_ceiling: int = TTL_CEILING

    def grants_for(self, qname: str) -> tuple[NameGrant, ...]:
        return tuple(g for g in self.names if match_host(g.pattern, qname))

    def private_ok(self, qname: str) -> bool:
        return any(match_host(p, qname) for p in self.private_names)

    def filter_response(self, qname: str, response) -> Filtered:
        """Keep what the skill may see of `response` to a query for allowlisted `qname`."""
        import dns.flags
        import dns.rcode
        import dns.rdatatype

        qname = qname.lower().rstrip(".")
        grants = self.grants_for(qname)
        ports = {g.ports for g in grants}
        sets = [s for s in self.sets if s.ports in ports]
        out = Filtered(response)
        response.authority = []
        response.additional = []
        if response.rcode() != dns.rcode.NOERROR:
            return out
        chain = {qname}
        changed = True
        while changed:  # follow CNAMEs from the asked name, in any order
            changed = False
            for rrset in response.answer:
                owner = rrset.name.to_text().lower().rstrip(".")
                if rrset.rdtype == dns.rdatatype.CNAME and owner in chain:
                    for rdata in rrset:
                        target = rdata.target.to_text().lower().rstrip(".")
                        if target not in chain:
                            chain.add(target)
                            changed = True
        kept = []
        private_ok = self.private_ok(qname)
        for rrset in response.answer:
            owner = rrset.name.to_text().lower().rstrip(".")
            if owner not in chain or rrset.rdtype not in (dns.rdatatype.CNAME, dns.rdatatype.A,
                                                          dns.rdatatype.AAAA):
                continue
            rrset.ttl = min(rrset.ttl, self.ttl_ceiling)
            if rrset.rdtype == dns.rdatatype.CNAME:
                kept.append(rrset)
                continue
            timeout = clamp_ttl(rrset.ttl, self.ttl_floor, self.ttl_ceiling)
            for rdata in list(rrset):
                verdict = judge(rdata.address, private_ok=private_ok, own=self.own)
                if not verdict.admitted:
                    out.refused.append((rdata.address, verdict.reason))
                    rrset.discard(rdata)
                    continue
                out.admitted.append(str(verdict.address))
                for group in sets:
                    name = group.set4 if verdict.address.version == 4 else group.set6
                    out.additions.append(Addition(name, str(verdict.address), timeout))
            if len(rrset):
                kept.append(rrset)
        response.answer = kept
        if out.refused and not out.admitted:
            response.answer = []
            response.set_rcode(dns.rcode.REFUSED)
        return out


def parse_upstreams(entries: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """'198.51.100.53', '198.51.100.53:5353', '2001:db8::53', '[2001:db8::53]:53' -> (ip, port)."""
    out = []
    for text in entries:
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                port = int(rest.lstrip(":"))
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = int(port_text)
        address = ipaddress.ip_address(host)  # ValueError for anything else
        if not 0 < port < 65536:
            raise ValueError(f"{text}: port out of range")
        out.append((str(address), port))
    return tuple(out)


def resolv_conf_upstreams(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    servers.append(words[1].split("%", 1)[0])
    except OSError:
        return ()
    return tuple(servers)


@dataclass
class _Pending:
    client_id: int
    qname: str
    reply: Callable[[bytes], None]
    close: Callable[[], None]
    started: float
    max_size: int  # what the client can take: 512 or its EDNS size over UDP, 65535 over TCP


class DnsStub:
    """Serve one skill's DNS. `admit(additions)` must put the addresses into
    the skill's sets (raising on failure); `refuse(operation, rule)` reports."""

    def __init__(self, rules: StubRules, address: str, device: str,
                 upstreams: tuple[tuple[str, int], ...],
                 admit: Callable[[list[Addition]], None],
                 refuse: Callable[[str, str], None], port: int = 53):
        if not upstreams:
            raise ValueError("no upstream resolver (set dns_upstream in the host config)")
        self.rules = rules
        self.upstreams = upstreams
        self.admit = admit
        self.refuse = refuse
        self.pending: dict[int, _Pending] = {}
        self.queries = 0
        self.sockets: list[socket.socket] = []
        try:
            self.udp = self._listener(socket.SOCK_DGRAM, address, port, device)
            self.tcp = self._listener(socket.SOCK_STREAM, address, port, device)
            self.tcp.listen(16)
            self.upstream = {}
            for family in {socket.AF_INET6 if ":" in host else socket.AF_INET for host, _ in upstreams}:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                self.sockets.append(sock)
                self.upstream[family] = sock
        except BaseException:
            self.close()
            raise

    def _listener(self, kind: int, address: str, port: int, device: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((address, port))
        return sock

    def readers(self) -> dict[int, Callable[[int, int], None]]:
        out = {self.udp.fileno(): self._on_udp, self.tcp.fileno(): self._on_tcp}
        for sock in self.upstream.values():
            out[sock.fileno()] = self._on_upstream
        return out

    def close(self) -> None:
        for pending in self.pending.values():
            pending.close()
        self.pending.clear()
        for sock in self.sockets:
            sock.close()

    # -- clients --

    def _on_udp(self, _fd: int, _mask: int) -> None:
        for _ in range(64):
            try:
                data, client = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

            def reply(wire: bytes, client=client) -> None:
                try:
                    self.udp.sendto(wire, client)
                except OSError:
                    pass

            self._query(data, reply, lambda: None, udp=True)

    def _on_tcp(self, _fd: int, _mask: int) -> None:
        try:
            conn, _peer = self.tcp.accept()
        except OSError:
            return
        # One length-prefixed query per connection (RFC 7766 allows more; resolvers
        # falling back from a truncated UDP answer send one). A client that sends
        # nothing stalls only its own supervisor, for at most TCP_READ_TIMEOUT.
        conn.settimeout(TCP_READ_TIMEOUT)
        try:
            size = struct.unpack("!H", _recv_exactly(conn, 2))[0]
            data = _recv_exactly(conn, size)
        except (OSError, struct.error, EOFError):
            conn.close()
            return

        def reply(wire: bytes) -> None:
            try:
                conn.sendall(struct.pack("!H", len(wire)) + wire)
            except OSError:
                pass
            conn.close()

        self._query(data, reply, conn.close, udp=False)

    def _query(self, data: bytes, reply: Callable[[bytes], None], close: Callable[[], None],
               udp: bool) -> None:
        import dns.exception
        import dns.message
        import dns.rcode
        import dns.rdataclass

        self._expire()
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            close()
            return
        if len(query.question) != 1:
            reply(_answer(query, dns.rcode.FORMERR))
            return
        question = query.question[0]
        qname = question.name.to_text().lower().rstrip(".")
        import dns.rdatatype

        qtype = dns.rdatatype.to_text(question.rdtype)
        if question.rdclass != dns.rdataclass.IN or not self.rules.grants_for(qname):
            self.refuse(f"dns query {qname} {qtype}",
                        f"no tcp/http rule names {qname}; the agent's resolver refuses it")
            reply(_answer(query, dns.rcode.REFUSED))
            return
        upstream = self.upstreams[self.queries % len(self.upstreams)]
        self.queries += 1
        forward_id = secrets.randbits(16)
        while forward_id in self.pending:
            forward_id = secrets.randbits(16)
        client_id = query.id
        query.id = forward_id
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        try:
            self.upstream[family].sendto(query.to_wire(), upstream)
        except OSError:
            query.id = client_id
            reply(_answer(query, dns.rcode.SERVFAIL))
            return
        max_size = max(512, query.payload) if udp and query.edns >= 0 else (512 if udp else 65535)
        self.pending[forward_id] = _Pending(client_id, qname, reply, close, time.monotonic(), max_size)

    # -- upstream --

    def _on_upstream(self, fd: int, _mask: int) -> None:
        import dns.exception
        import dns.message
        import dns.rcode

        sock = next(s for s in self.upstream.values() if s.fileno() == fd)
        for _ in range(64):
            try:
                data, source = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if (ipaddress.ip_address(source[0]).compressed, source[1]) not in \
                    {(ipaddress.ip_address(h).compressed, p) for h, p in self.upstreams}:
                continue
            try:
                response = dns.message.from_wire(data)
            except (dns.exception.DNSException, ValueError):
                continue
            pending = self.pending.get(response.id)
            if pending is None or len(response.question) != 1 or \
                    response.question[0].name.to_text().lower().rstrip(".") != pending.qname:
                continue
            del self.pending[response.id]
            response.id = pending.client_id
            result = self.rules.filter_response(pending.qname, response)
            for address, why in result.refused:
                self.refuse(f"dns answer {pending.qname} -> {address}",
                            f"not admitted: {why} (DNS-rebinding/SSRF defence)")
            try:
                self.admit(result.additions)
            except Exception as exc:  # noqa: BLE001 - fail closed: no answer without the grant
                self.refuse(f"dns answer {pending.qname}", f"could not admit the addresses: {exc}")
                response.answer = []
                response.set_rcode(dns.rcode.SERVFAIL)
            pending.reply(_wire(response, pending.max_size))

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self.pending.items() if now - p.started > PENDING_TIMEOUT]:
            self.pending.pop(key).close()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _wire(response, max_size: int) -> bytes:
    """The response as bytes; too big for the client: truncated (TC), so it retries over TCP."""
    import dns.exception
    import dns.flags

    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer = []
        response.flags |= dns.flags.TC
        return response.to_wire()


def _answer(query, rcode: int) -> bytes:
    import dns.message

    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()
