"""Read the packets an nftables `log group N` statement hands to user space (NFLOG).

nfnetlink_log (net/netfilter/nfnetlink_log.c) keeps one instance per
(network namespace, group): the socket must be created inside the skill's
namespace, and `bind()` then hears only that namespace's group. pyroute2
has no NFLOG support, so the few messages needed are packed here
(include/uapi/linux/netfilter/nfnetlink_log.h).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX = 1, 9, 10
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
COPY_BYTES = 128  # IPv6 header + TCP/UDP header fit easily
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
IPV6_EXTENSIONS = {0, 43, 44, 60}  # hop-by-hop, routing, fragment, destination options

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Packet:
    prefix: str
    protocol: str  # "tcp", "udp", "icmp", ... or "proto N"
    destination: str
    port: Optional[int]  # TCP/UDP destination port


def _attr(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * ((4 - size % 4) % 4)


def attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `data` from `offset`
    (also agent/net/rtnl.py's extended acks)."""
    while offset + _NLATTR.size <= len(data):
        size, kind = _NLATTR.unpack_from(data, offset)
        if size < _NLATTR.size:
            break
        yield kind & 0x3FFF, data[offset + _NLATTR.size:offset + size]
        offset += (size + 3) & ~3


def parse_payload(payload: bytes) -> tuple[str, str, Optional[int]]:
    """(protocol, destination, destination port) of an IPv4/IPv6 packet's first bytes."""
    if not payload:
        return "?", "?", None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        proto = payload[9]
        destination = str(ipaddress.IPv4Address(payload[16:20]))
    elif version == 6 and len(payload) >= 40:
        header, proto = 40, payload[6]
        destination = str(ipaddress.IPv6Address(payload[24:40]))
        # Walk extension headers (RFC 8200 4.2) to the transport header.
        while proto in IPV6_EXTENSIONS and len(payload) >= header + 8:
            if proto == 44:  # fragment header, 8 bytes; a later fragment has no transport header
                if struct.unpack_from("!H", payload, header + 2)[0] >> 3:
                    return PROTOCOLS.get(payload[header], f"proto {payload[header]}"), destination, None
                proto, header = payload[header], header + 8
            else:
                proto, header = payload[header], header + 8 * (payload[header + 1] + 1)
    else:
        return "?", "?", None
    port = None
    if proto in (6, 17) and len(payload) >= header + 4:
        port = struct.unpack_from("!H", payload, header + 2)[0]
    return PROTOCOLS.get(proto, f"proto {proto}"), destination, port


def parse_messages(data: bytes) -> Iterator[Packet]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            body = data[offset + _NLMSGHDR.size + _NFGENMSG.size:offset + length]
            prefix, payload = "", b""
            for attr, value in attrs(body):
                if attr == NFULA_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode(errors="replace")
                elif attr == NFULA_PAYLOAD:
                    payload = value
            yield Packet(prefix, *parse_payload(payload))
        offset += (length + 3) & ~3


class NflogSocket:
    """A non-blocking NFLOG listener for one group in the caller's network namespace."""

    def __init__(self, group: int):
        self.group = group
        self.lost = 0  # messages the kernel dropped because we read too slowly (ENOBUFS)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(2.0)
            body = (_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
                    + _attr(NFULA_CFG_MODE, struct.pack("!IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0))
                    + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))  # deliver each packet at once
            header = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group))
            message = header + body
            self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(message),
                                          (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                                          NLM_F_REQUEST | NLM_F_ACK, 1, 0) + message)
            reply = self.sock.recv(65536)
            _len, kind, _f, _s, _p = _NLMSGHDR.unpack_from(reply)
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
                if code:
                    raise OSError(code, f"NFLOG bind group {group}: {os.strerror(code)}")
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Packet]:
        """Every packet queued now (never blocks)."""
        packets: list[Packet] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return packets
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            packets.extend(parse_messages(data))

    def close(self) -> None:
        self.sock.close()
