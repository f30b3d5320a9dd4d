"""Pure parts of the stateless network layer: NFLOG payloads with IPv6
extension headers, and the rtnetlink messages packed by hand."""
import socket
import struct

import pytest

from agent.net import nflog, rtnl
from agent.net.nflog import parse_payload


def _ipv6(next_header: int, dst: str, rest: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(rest), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, "fd53:6b67:7264::a00:2"),
                       socket.inet_pton(socket.AF_INET6, dst)) + rest


def test_nflog_finds_tcp_behind_a_routing_header():
    tcp = struct.pack("!HHIIHHHH", 40000, 8082, 0, 0, 0x5010, 0, 0, 0)
    srh = bytes([6, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, "2001:db8::10") \
        + socket.inet_pton(socket.AF_INET6, "2001:db8::99")
    assert parse_payload(_ipv6(43, "2001:db8::99", srh + tcp)) == ("tcp", "2001:db8::99", 8082)
    # A later fragment carries no transport header: no port is made up.
    later = struct.pack("!BBHI", 6, 0, (185 << 3), 7)
    assert parse_payload(_ipv6(44, "2001:db8::99", later + b"\xff" * 20)) == ("tcp", "2001:db8::99", None)
    first = struct.pack("!BBHI", 17, 0, 1, 7) + struct.pack("!HHHH", 5000, 9999, 8, 0)
    assert parse_payload(_ipv6(44, "2001:db8::99", first)) == ("udp", "2001:db8::99", 9999)


def _attrs(body: bytes, offset: int) -> dict:
    return dict(nflog.attrs(body, offset))


# include/uapi/linux/if_link.h, if_addr.h, rtnetlink.h, veth.h: checked here
# independently of pyroute2, which encodes the messages.
IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_LOCAL = 2


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def test_rtnetlink_messages():
    kind, flags, body = rtnl.new_address(7, "10.213.0.1", 30)
    assert (kind, flags) == (rtnl.RTM_NEWADDR, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL)
    assert struct.unpack_from("=BBBBi", body) == (socket.AF_INET, 30, 0, 0, 7)
    assert _attrs(body, 8)[IFA_LOCAL] == socket.inet_aton("10.213.0.1")
    kind, flags, body = rtnl.new_address(7, "fd53:6b67:7264::a00:1", 126, nodad=True)
    assert struct.unpack_from("=BBBBi", body) == (socket.AF_INET6, 126, rtnl.IFA_F_NODAD, 0, 7)
    kind, flags, body = rtnl.new_default_route("fd53:6b67:7264::a00:1")
    assert struct.unpack_from("=BBBBBBBBI", body)[:2] == (socket.AF_INET6, 0)  # ::/0
    assert _attrs(body, 12)[rtnl.RTA_GATEWAY] == socket.inet_pton(socket.AF_INET6, "fd53:6b67:7264::a00:1")
    kind, flags, body = rtnl.new_veth("sgv3", "eth0", 42)
    outer = _attrs(body, 16)
    assert outer[IFLA_IFNAME] == b"sgv3\0"
    info = _attrs(outer[IFLA_LINKINFO], 0)
    assert info[IFLA_INFO_KIND] == b"veth\0"
    peer = _attrs(info[IFLA_INFO_DATA], 0)[VETH_INFO_PEER]
    assert struct.unpack_from("=BxHiII", peer)[3] == 0  # down: set up from inside (ENOTCONN otherwise)
    peer_attrs = _attrs(peer, 16)
    assert peer_attrs[IFLA_IFNAME] == b"eth0\0" and peer_attrs[IFLA_NET_NS_FD] == struct.pack("=I", 42)
    # The echoed link names its peer's index.
    echoed = struct.pack("=BxHiII", 0, 1, 9, 0, 0) + _attr(IFLA_LINK, struct.pack("=i", 2))
    assert rtnl.parse_link(echoed) == (9, 2)


def test_rtnetlink_messages_read_back_by_pyroute2():
    """pyroute2 decodes what it encoded for us into the fields we asked for."""
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    def decoded(cls, request):
        kind, flags, body = request
        msg = cls(struct.pack("=IHHII", 16 + len(body), kind, flags | 5, 1, 0) + body)
        msg.decode()
        return msg

    addr = decoded(ifaddrmsg, rtnl.new_address(7, "fd53:6b67:7264::a00:1", 126, nodad=True))
    assert (addr["index"], addr["prefixlen"], addr.get_attr("IFA_ADDRESS")) == (7, 126, "fd53:6b67:7264::a00:1")
    route = decoded(rtmsg, rtnl.new_default_route("10.213.0.1"))
    assert (route["dst_len"], route["table"], route.get_attr("RTA_GATEWAY")) == (0, 254, "10.213.0.1")
    link = decoded(ifinfmsg, rtnl.new_veth("sgv3", "eth0", 42))
    info = link.get_attr("IFLA_LINKINFO")
    assert link.get_attr("IFLA_IFNAME") == "sgv3" and info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0" and peer.get_attr("IFLA_NET_NS_FD") == 42
