"""Which DNS answers may become reachable addresses (DNS-rebinding and SSRF defence).

Pure: no sockets, no kernel. A name rule (`api.example.com:443`) trusts the
name, not whatever its resolver says: an answer that points into the host
itself, its link or the cloud metadata service would turn an allowlisted
name into a way to reach those. So an answer is never admitted when it is

- unspecified (0.0.0.0/8, ::), loopback (127.0.0.0/8, ::1), link-local
  (169.254.0.0/16 with the metadata address 169.254.169.254, fe80::/10,
  and the EC2 IPv6 metadata address fd00:ec2::254), multicast, broadcast,
  reserved (240.0.0.0/4) or IPv4-compatible (::/96);
- one of the agent's own addresses (the host's, the address pool's);

and a private answer (RFC 1918, RFC 6598 shared 100.64.0.0/10, ULA
fc00::/7, site-local fec0::/10) only for names the manifest lists in
`private_names`. An IPv4-mapped IPv6 answer (::ffff:a.b.c.d) is judged as
the IPv4 address it carries, because that is where a dual-stack socket
connects (RFC 4291 2.5.5.2); it is admitted as that IPv4 address.

Literal IP rules never pass through here: they are taken as written.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_N = ipaddress.ip_network

# (network, reason) in the order they are checked; the first match decides.
NEVER: tuple[tuple[IPNetwork, str], ...] = (
    (_N("169.254.169.254/32"), "cloud metadata address"),
    (_N("fd00:ec2::254/128"), "cloud metadata address"),
    (_N("0.0.0.0/8"), "unspecified"),
    (_N("::/128"), "unspecified"),
    (_N("127.0.0.0/8"), "loopback"),
    (_N("::1/128"), "loopback"),
    (_N("169.254.0.0/16"), "link-local"),
    (_N("fe80::/10"), "link-local"),
    (_N("224.0.0.0/4"), "multicast"),
    (_N("ff00::/8"), "multicast"),
    (_N("255.255.255.255/32"), "broadcast"),
    (_N("240.0.0.0/4"), "reserved"),
    (_N("::/96"), "IPv4-compatible (deprecated)"),
)
PRIVATE: tuple[IPNetwork, ...] = (
    _N("10.0.0.0/8"), _N("172.16.0.0/12"), _N("192.168.0.0/16"), _N("100.64.0.0/10"),
    _N("fc00::/7"), _N("fec0::/10"),
)


@dataclass(frozen=True)
class Verdict:
    address: IPAddress  # what gets admitted: the IPv4 inside a mapped address
    admitted: bool
    reason: str  # why not, or "" when admitted


def effective(address: IPAddress) -> IPAddress:
    """The address a connect() reaches: the IPv4 inside ::ffff:a.b.c.d, else itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refusal(address: IPAddress, *, private_ok: bool = False,
            own: Iterable[IPNetwork] = ()) -> Optional[str]:
    """Why `address` may not be admitted for a name rule, or None if it may."""
    address = effective(address)
    for network, reason in NEVER:
        if address.version == network.version and address in network:
            return f"{reason} ({address})"
    for network in own:
        if address.version == network.version and address in network:
            return f"the agent's own address ({address} in {network})"
    if not private_ok:
        for network in PRIVATE:
            if address.version == network.version and address in network:
                return f"private address ({address} in {network}; the manifest does not list " \
                       "this name in private_names)"
    return None


def judge(address: Union[str, IPAddress], *, private_ok: bool = False,
          own: Iterable[IPNetwork] = ()) -> Verdict:
    parsed = ipaddress.ip_address(address) if isinstance(address, str) else address
    why = refusal(parsed, private_ok=private_ok, own=own)
    return Verdict(effective(parsed), why is None, why or "")


TTL_FLOOR = 30  # seconds: short TTLs still leave time to connect
TTL_CEILING = 3600  # seconds: an address stays admitted at most this long per answer


def clamp_ttl(ttl: int, floor: int, ceiling: int) -> int:
    """The set-element timeout for an answer's TTL: at least `floor`, at most `ceiling`."""
    return max(floor, min(int(ttl), ceiling))
