"""The few rtnetlink requests a skill's network set-up makes: pyroute2's
message classes encode and decode them (ifinfmsg, ifaddrmsg, rtmsg), and
this module sends each step's requests to the kernel in one sendmsg().

pyroute2's IPRoute would send them one by one through its asyncio core,
2-4 ms of Python per request in 0.9, more than the kernel's own work for
the whole set-up (bench/net). In one sendmsg() rtnetlink handles the
requests in order inside that call (netlink_rcv_skb), so their acks are
waiting when it returns, and a failed request names itself by sequence
number. Importing pyroute2 costs ~200 ms, paid once per process, when a
skill with a network grant is launched.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Iterator, Optional, Union

from agent.net.nflog import attrs

NETLINK_ROUTE = 0
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x2, 0x4, 0x8
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK, RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE = 16, 18, 19, 20, 22, 24
IFA_F_NODAD = 0x02  # no duplicate address detection (IPv6)
RTA_GATEWAY = 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
IFF_UP = 0x1
TIMEOUT_S = 5.0  # the kernel answers within its sendmsg(); never hang a launch on it

_NLMSGHDR = struct.Struct("=IHHII")

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class RtnlError(OSError):
    pass


def _family(address: Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


Request = tuple[int, int, bytes]  # message type, flags beyond REQUEST|ACK, body
_NEW = NLM_F_CREATE | NLM_F_EXCL


def _encode(kind: str, fields: dict, attrs: list) -> bytes:
    """The message body (no nlmsghdr) pyroute2 encodes for `fields` and `attrs`."""
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    msg = {"link": ifinfmsg, "addr": ifaddrmsg, "route": rtmsg}[kind]()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[_NLMSGHDR.size:])


def _decode(kind: str, mtype: int, payload: bytes):
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = {"link": ifinfmsg, "addr": ifaddrmsg}[kind](
        _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), mtype, 0, 0, 0) + payload)
    msg.decode()
    return msg


def new_veth(name: str, peer: str, peer_netns_fd: int) -> Request:
    """A veth pair: `name` here and up, `peer` made inside the namespace of
    `peer_netns_fd` and down: asking for the peer up at creation fails with
    ENOTCONN on this kernel (veth_open() runs before the pair is linked), so
    the peer is switched on by `link_up` from inside its namespace."""
    peer_attrs = {"attrs": [("IFLA_IFNAME", peer), ("IFLA_NET_NS_FD", peer_netns_fd)]}
    linkinfo = {"attrs": [("IFLA_INFO_KIND", "veth"),
                          ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer_attrs)]})]}
    body = _encode("link", {"family": socket.AF_UNSPEC, "index": 0, "flags": IFF_UP, "change": IFF_UP},
                   [("IFLA_IFNAME", name), ("IFLA_LINKINFO", linkinfo)])
    return RTM_NEWLINK, _NEW, body


def link_up(index: int) -> Request:
    return RTM_SETLINK, 0, _encode("link", {"family": socket.AF_UNSPEC, "index": index,
                                            "flags": IFF_UP, "change": IFF_UP}, [])


def new_address(index: int, address: str, prefixlen: int, *, nodad: bool = False) -> Request:
    parsed = ipaddress.ip_address(address)
    flags = IFA_F_NODAD if nodad else 0
    body = _encode("addr", {"family": _family(parsed), "prefixlen": prefixlen, "flags": flags,
                            "scope": RT_SCOPE_UNIVERSE, "index": index},
                   [("IFA_LOCAL", str(parsed)), ("IFA_ADDRESS", str(parsed)), ("IFA_FLAGS", flags)])
    return RTM_NEWADDR, _NEW, body


def new_default_route(gateway: str) -> Request:
    parsed = ipaddress.ip_address(gateway)
    body = _encode("route", {"family": _family(parsed), "dst_len": 0, "table": RT_TABLE_MAIN,
                             "proto": RTPROT_BOOT, "scope": RT_SCOPE_UNIVERSE, "type": RTN_UNICAST},
                   [("RTA_GATEWAY", str(parsed))])
    return RTM_NEWROUTE, _NEW, body


class Rtnl:
    """An rtnetlink socket in the calling thread's network namespace; it stays
    in that namespace after the thread leaves it (netlink(7))."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without our request echoed
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # and with the kernel's reason
            self.sock.bind((0, 0))
            self.sock.settimeout(TIMEOUT_S)
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _pack(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body

    def _messages(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, flags, seq, payload) of every message the kernel has for us, blocking for more."""
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                yield kind, flags, seq, data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3

    @staticmethod
    def _error(flags: int, payload: bytes, what: str) -> Optional[RtnlError]:
        code = -struct.unpack_from("=i", payload)[0]
        if not code:
            return None
        reason = ""
        if flags & NLM_F_ACK_TLVS:  # struct nlmsgerr: error, then the request's header (capped), then TLVs
            for kind, value in attrs(payload, 4 + _NLMSGHDR.size):
                if kind == NLMSGERR_ATTR_MSG:
                    reason = value.split(b"\0", 1)[0].decode(errors="replace")
        return RtnlError(code, f"{what}: {os.strerror(code)}" + (f" ({reason})" if reason else ""))

    def run(self, requests: list[tuple[str, Request]], *, echo: bool = False) -> list[list[bytes]]:
        """Send every (description, request) at once, each to be acked; raise
        RtnlError for the first that failed. With `echo`, return for each
        request the payloads of the messages the kernel echoed back
        (NLM_F_ECHO: a created link's RTM_NEWLINK, since Linux 6.3)."""
        pending: dict[int, str] = {}
        echoed: dict[int, list[bytes]] = {}
        wire = b""
        for what, (kind, flags, body) in requests:
            flags |= NLM_F_REQUEST | NLM_F_ACK | (NLM_F_ECHO if echo else 0)
            seq, message = self._pack(kind, flags, body)
            pending[seq] = what
            echoed[seq] = []
            wire += message
        order = list(pending)
        self.sock.send(wire)
        failure: Optional[RtnlError] = None
        for kind, mflags, seq, payload in self._messages():
            if seq not in pending:
                continue
            if kind != NLMSG_ERROR:
                echoed[seq].append(payload)
                continue
            error = self._error(mflags, payload, pending.pop(seq))
            if error is not None and failure is None:
                failure = error
            if not pending:
                break
        if failure is not None:
            raise failure
        return [echoed[seq] for seq in order]

    def addresses(self) -> list[Address]:
        """Every address of every interface in this namespace (RTM_GETADDR dump)."""
        seq, message = self._pack(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                                  _encode("addr", {"family": socket.AF_UNSPEC}, []))
        self.sock.send(message)
        out: list[Address] = []
        for kind, flags, got, payload in self._messages():
            if got != seq:
                continue
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                error = self._error(flags, payload, "list addresses")
                if error is not None:
                    raise error
                return out
            if kind != RTM_NEWADDR:
                continue
            msg = _decode("addr", kind, payload)
            value = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if value:
                out.append(ipaddress.ip_address(value))
        return out

    def link_index(self, name: str) -> tuple[int, Optional[int]]:
        """(ifindex, IFLA_LINK) of the device `name` here."""
        seq, message = self._pack(RTM_GETLINK, NLM_F_REQUEST,
                                  _encode("link", {"family": socket.AF_UNSPEC}, [("IFLA_IFNAME", name)]))
        self.sock.send(message)
        for kind, flags, got, payload in self._messages():
            if got != seq:
                continue
            if kind == NLMSG_ERROR:
                raise self._error(flags, payload, f"find device {name}") or RtnlError(errno.ENODEV, name)
            return parse_link(payload)
        raise AssertionError("unreachable")


def parse_link(payload: bytes) -> tuple[int, Optional[int]]:
    """(ifindex, IFLA_LINK or None) of an RTM_NEWLINK message's payload."""
    msg = _decode("link", RTM_NEWLINK, payload)
    return msg["index"], msg.get_attr("IFLA_LINK")
