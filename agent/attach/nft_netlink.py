"""Add and delete elements of nftables sets with one netlink batch.

Why not libnftables for this: every `nft.cmd()` refetches the table's
objects before its transaction (nftables 1.0.6 src/cache.c) and parses text
with bison, about 0.3 ms of CPU per registration on the development VM
however small the change; pyroute2 0.9's nf_tables message classes take
about 0.25 ms just to encode one element. The messages needed here are
small and fixed, so they are packed with `struct`; one sendmsg carries the
whole transaction and the kernel applies all of it or none
(net/netfilter/nfnetlink.c nfnetlink_rcv_batch). libnftables still creates
and deletes the table (agent/attach/nft_cgroup.py).

Layouts: include/uapi/linux/netlink.h (nlmsghdr, nlattr),
include/uapi/linux/netfilter/nfnetlink.h (nfgenmsg, batch messages),
include/uapi/linux/netfilter/nf_tables.h (NFT_MSG_*, NFTA_SET_ELEM_*).
Set keys are the registers' bytes: a concatenation pads each field to
4 bytes (NFT_REG32_SIZE); an element of a concatenated interval set is its
first key and its last (NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_KEY_END), as
libnftables sends them; `cgroupsv2` is the cgroup id (the kernfs inode
number, host byte order, nftables src/datatype.c cgroupv2_type; big-endian
in interval sets, see range_key), addresses and ports are in network byte
order.
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import struct
from typing import Callable, Iterable, Sequence

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_KEY_END = 10
NFTA_DATA_VALUE = 1
NFPROTO_INET = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused the batch; errno is the first error it reported."""


# ---- keys (pure) -----------------------------------------------------------

def cgroup_key(cgroup_id: int) -> bytes:
    return struct.pack("=Q", cgroup_id)


def grant_key(cgroup_id: int, address, port: int) -> bytes:
    """`cgroupsv2 . ipv4_addr|ipv6_addr . inet_service` for one address and port."""
    return struct.pack("=Q", cgroup_id) + address.packed + struct.pack(">H2x", port)


def range_key(cgroup_id: int, network, first_port: int, last_port: int) -> tuple[bytes, bytes]:
    """(start, end) of a concatenated interval element: one cgroup, a prefix,
    a port range (the kernel's pipapo set matches each field against its
    own range, net/netfilter/nft_set_pipapo.c). Ranges compare big-endian
    bytes, so here the cgroup id is big-endian too: nft puts a `byteorder`
    (hton) before a lookup of a host-order field in an interval set
    (`nft --debug=netlink` shows both)."""
    cg = struct.pack(">Q", cgroup_id)
    return (cg + network.network_address.packed + struct.pack(">H2x", first_port),
            cg + network.broadcast_address.packed + struct.pack(">H2x", last_port))


# ---- messages (pure) -------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, payload: bytes) -> bytes:
    body = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _element(key) -> bytes:
    """A key (bytes), or a (start, end) pair for an interval set."""
    if isinstance(key, tuple):
        start, end = key
        body = (_attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, start))
                + _attr(NFTA_SET_ELEM_KEY_END | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, end)))
    else:
        body = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key))
    return _attr(NFTA_LIST_ELEM | NLA_F_NESTED, body)


def elements_message(op: int, table: str, set_name: str, keys: Sequence, seq: int) -> bytes:
    elements = b"".join(_element(key) for key in keys)
    payload = (_attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
               + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
               + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elements))
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op == NFT_MSG_NEWSETELEM else 0)
    return _message((NFNL_SUBSYS_NFTABLES << 8) | op, flags, seq, NFPROTO_INET, 0, payload)


def batch(changes: Iterable[tuple[int, str, Sequence[bytes]]], table: str, first_seq: int) -> tuple[bytes, list[int]]:
    """(the batch, the sequence numbers that will be acknowledged) for
    (NFT_MSG_NEWSETELEM or NFT_MSG_DELSETELEM, set, keys) changes, in order."""
    seq = itertools.count(first_seq)
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(seq), socket.AF_UNSPEC,
                      NFNL_SUBSYS_NFTABLES, b"")]
    acked = []
    for op, set_name, keys in changes:
        number = next(seq)
        parts.append(elements_message(op, table, set_name, keys, number))
        acked.append(number)
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(seq), socket.AF_UNSPEC,
                          NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(parts), acked


# Stand-ins for the cgroup id and the first sequence number while a template
# is built: every byte of A differs from B's, and C tells the byte orders apart.
_CG_A, _CG_B, _CG_C = 0x0101010101010101, 0x0202020202020202, 0x0102030405060708
_SEQ_A, _SEQ_B = 0x01010101, 0x02020202


class BatchTemplate:
    """The batch of one skill's changes with its cgroup id and sequence numbers
    left open, built once per policy; `fill()` writes them in (a few
    struct.pack_into, against ~80 us in the daemon for building the batch).

    The open fields are found by building the batch with different stand-ins
    and comparing the results byte for byte, so their places come from the
    structure, never from searching for a value (an address in a grant could
    contain any bytes). Pure."""

    def __init__(self, make_changes: Callable[[int], Sequence], table: str):
        base, acked = batch(make_changes(_CG_A), table, _SEQ_A)
        other_cg, _ = batch(make_changes(_CG_B), table, _SEQ_A)
        probe, _ = batch(make_changes(_CG_C), table, _SEQ_A)
        other_seq, _ = batch(make_changes(_CG_A), table, _SEQ_B)
        if not len(base) == len(other_cg) == len(probe) == len(other_seq):
            raise ValueError("the batch's length depends on the cgroup id")
        self.cgroup_fields = []  # (offset, struct format)
        for start in _runs(base, other_cg, 8):
            for fmt in ("=Q", ">Q"):
                if probe[start:start + 8] == struct.pack(fmt, _CG_C):
                    self.cgroup_fields.append((start, fmt))
                    break
            else:
                raise ValueError(f"a cgroup id field at {start} in neither byte order")
        self.seq_fields = _runs(base, other_seq, 4)  # one per message, in order
        if len(self.seq_fields) != len(acked) + 2 or not self.cgroup_fields:
            raise ValueError("unexpected fields in the batch")
        self.template = base
        self.acked = [seq - _SEQ_A for seq in acked]  # offsets from the first sequence number

    def fill(self, cgroup_id: int, first_seq: int) -> tuple[bytes, list[int]]:
        """(the batch, the sequence numbers that will be acknowledged), as batch() returns."""
        data = bytearray(self.template)
        for offset, fmt in self.cgroup_fields:
            struct.pack_into(fmt, data, offset, cgroup_id)
        for i, offset in enumerate(self.seq_fields):
            _U32.pack_into(data, offset, (first_seq + i) & 0xFFFFFFFF)
        return bytes(data), [first_seq + k for k in self.acked]


_U32 = struct.Struct("=I")
_MARKER = _NLMSGHDR.size + _NFGENMSG.size  # a batch begin or end message: header and nfgenmsg only


def join_batches(batches: Sequence[bytes], begin_seq: int, end_seq: int) -> bytes:
    """One batch holding the messages of several (each as batch() builds it:
    begin, messages, end), in order, under new begin and end messages. Pure."""
    body = []
    for data in batches:
        first = _NLMSGHDR.unpack_from(data, 0)
        last = _NLMSGHDR.unpack_from(data, len(data) - _MARKER)
        if (first[0], first[1], last[0], last[1]) != (_MARKER, NFNL_MSG_BATCH_BEGIN, _MARKER, NFNL_MSG_BATCH_END):
            raise ValueError("not a batch of batch()'s layout")
        body.append(data[_MARKER:len(data) - _MARKER])
    return b"".join([_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, socket.AF_UNSPEC,
                              NFNL_SUBSYS_NFTABLES, b"")] + body
                    + [_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, socket.AF_UNSPEC,
                                NFNL_SUBSYS_NFTABLES, b"")])


def _runs(a: bytes, b: bytes, size: int) -> list[int]:
    """Starts of the places where `a` and `b` differ, each `size` bytes long (else ValueError)."""
    starts = []
    i = 0
    while i < len(a):
        if a[i] != b[i]:
            if a[i:i + size] == b[i:i + size] or any(x == y for x, y in zip(a[i:i + size], b[i:i + size])):
                raise ValueError(f"a field at {i} is not {size} differing bytes")
            starts.append(i)
            i += size
        else:
            i += 1
    return starts


def parse_acks(data: bytes) -> dict[int, int]:
    """sequence number -> error (0 or -errno) of every NLMSG_ERROR in `data`. Pure."""
    out = {}
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR:
            out[seq] = _ERRNO.unpack_from(data, offset + _NLMSGHDR.size)[0]
        offset += (length + 3) & ~3
    return out


# ---- the socket ------------------------------------------------------------

class SetElements:
    """One netlink socket in the caller's network namespace (made at init)."""

    def __init__(self, table: str):
        self.table = table
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "little") << 8)

    def apply(self, changes: Sequence[tuple[int, str, Sequence[bytes]]]) -> None:
        """Apply every change in one transaction, or none: NetlinkError with the kernel's errno."""
        changes = [c for c in changes if c[2]]
        if not changes:
            return
        first = next(self._seq)
        data, acked = batch(changes, self.table, first)
        for _ in range(len(changes) + 1):
            next(self._seq)
        self.send(data, acked)

    def apply_template(self, template: BatchTemplate, cgroup_id: int) -> None:
        """apply() of the changes a template holds, for this cgroup."""
        first = next(self._seq)
        data, acked = template.fill(cgroup_id, first)
        for _ in range(len(template.seq_fields) - 1):
            next(self._seq)
        self.send(data, acked)

    def apply_templates(self, pairs: Sequence[tuple["BatchTemplate", int]]) -> None:
        """apply_template() of several (template, cgroup id) in one transaction: all or none."""
        parts, acked = [], []
        begin = next(self._seq)
        for template, cgroup_id in pairs:
            data, part_acked = template.fill(cgroup_id, next(self._seq))
            for _ in range(len(template.seq_fields) - 1):
                next(self._seq)
            parts.append(data)
            acked.extend(part_acked)
        self.send(join_batches(parts, begin, next(self._seq)), acked)

    def send(self, data: bytes, acked: list[int]) -> None:
        """Send a batch and wait for its acknowledgements (NetlinkError on any error)."""
        self.sock.send(data)
        # nfnetlink handles the whole batch inside send(), so every answer is
        # queued by now; the wait is only a guard.
        errors: dict[int, int] = {}
        wanted = set(acked)  # answers to an earlier batch that failed may still be queued
        while True:
            try:
                errors.update((s, e) for s, e in parse_acks(self.sock.recv(65536)).items() if s in wanted)
            except BlockingIOError:
                if not select.select([self.sock], [], [], 5.0)[0]:
                    raise NetlinkError(0, f"nf_tables did not answer within 5 s (table {self.table})") from None
                continue
            if len(errors) == len(wanted) or any(errors.values()):
                # After an error the kernel aborts the batch; read what else it
                # answered, so that nothing of this batch is left queued.
                if any(errors.values()):
                    self._drain(wanted, errors)
                break
        failed = [-errors[s] for s in acked if errors.get(s)]
        if failed:
            code = failed[0]
            raise NetlinkError(code, f"{os.strerror(code)} (nf_tables set elements of table {self.table})")
        if any(s not in errors for s in acked):
            raise NetlinkError(0, f"nf_tables did not acknowledge every change (table {self.table})")

    def _drain(self, wanted: set, errors: dict) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            errors.update((s, e) for s, e in parse_acks(data).items() if s in wanted)

    def close(self) -> None:
        self.sock.close()

