"""The bpf(2) commands bcc 0.26 does not wrap: pin/get, links, raw map access.

bcc attaches cgroup programs with BPF_PROG_ATTACH, which has no pinnable
handle and cannot be swapped atomically for a newer program. Links can:
a pinned link (BPF_OBJ_PIN) keeps its program attached after every fd is
closed, so enforcement outlives the agent, and BPF_LINK_UPDATE replaces the
program of a live link in one step (kernel/bpf/cgroup.c
cgroup_bpf_replace(): the effective array is rewritten in place, never
emptied). Layouts follow `union bpf_attr` in include/uapi/linux/bpf.h.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

from agent.enforce import libc

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

BPF_ANY = 0

# enum bpf_attach_type
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_PERF_EVENT = 41

BPF_FS_MAGIC = 0xCAFE4A11
DEFAULT_BPFFS = "/sys/fs/bpf"


def _bpf(cmd: int, attr: bytes | bytearray) -> int:
    buf = ctypes.create_string_buffer(bytes(attr), max(len(attr), 8))
    return libc.syscall("bpf", ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))


def _attr(size: int = 64) -> bytearray:
    return bytearray(size)


# ---- objects in bpffs ------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    attr = _attr()
    struct.pack_into("<QI", attr, 0, ctypes.addressof(name), fd)
    _bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str) -> int:
    """fd of the object pinned at `path`; FileNotFoundError when nothing is."""
    name = ctypes.create_string_buffer(path.encode())
    attr = _attr()
    struct.pack_into("<Q", attr, 0, ctypes.addressof(name))
    try:
        return _bpf(BPF_OBJ_GET, attr)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "nothing pinned", path) from None
        raise


def prog_id(fd: int) -> int:
    """The kernel's id of a program (or link: id of the link) from its fd."""
    info = ctypes.create_string_buffer(256)
    attr = _attr()
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    # struct bpf_prog_info: type (u32), id (u32); struct bpf_link_info: type, id, prog_id
    return struct.unpack_from("<I", info.raw, 4)[0]


def link_prog_id(link_fd: int) -> int:
    info = ctypes.create_string_buffer(256)
    attr = _attr()
    struct.pack_into("<IIQ", attr, 0, link_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("<I", info.raw, 8)[0]


def is_bpffs(path: str) -> bool:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]
    buf = StatFs()
    libc_ = ctypes.CDLL(None, use_errno=True)
    if libc_.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def ensure_bpffs(root: str = DEFAULT_BPFFS) -> None:
    """Mount a bpf filesystem at `root` unless one is there (what systemd does at boot)."""
    if is_bpffs(root):
        return
    os.makedirs(root, exist_ok=True)
    src = ctypes.c_char_p(b"bpf")
    try:
        libc.syscall("mount", src, ctypes.c_char_p(root.encode()), src, ctypes.c_ulong(0),
                     ctypes.c_void_p())
    except OSError as exc:
        raise OSError(exc.errno, f"mounting bpffs on {root}: {os.strerror(exc.errno)}") from None


# ---- links -----------------------------------------------------------------

def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    attr = _attr()
    struct.pack_into("<IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr)


def link_update(link_fd: int, new_prog_fd: int) -> None:
    attr = _attr()
    struct.pack_into("<III", attr, 0, link_fd, new_prog_fd, 0)
    _bpf(BPF_LINK_UPDATE, attr)


def link_detach(link_fd: int) -> None:
    attr = _attr()
    struct.pack_into("<I", attr, 0, link_fd)
    _bpf(BPF_LINK_DETACH, attr)


# ---- maps by fd ------------------------------------------------------------

class RawMap:
    """Element access to a map by fd, with fixed key and value sizes."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str = "map"):
        self.fd, self.key_size, self.value_size, self.name = fd, key_size, value_size, name

    def _elem_attr(self, key: bytes, value_buf, flags: int = 0):
        assert len(key) == self.key_size, (self.name, len(key), self.key_size)
        key_buf = ctypes.create_string_buffer(key, len(key))
        attr = _attr()
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(key_buf),
                         ctypes.addressof(value_buf) if value_buf is not None else 0, flags)
        return attr, key_buf

    def update(self, key: bytes, value: bytes) -> None:
        assert len(value) == self.value_size, (self.name, len(value), self.value_size)
        value_buf = ctypes.create_string_buffer(value, len(value))
        attr, _keep = self._elem_attr(key, value_buf, BPF_ANY)
        _bpf(BPF_MAP_UPDATE_ELEM, attr)

    def lookup(self, key: bytes) -> bytes | None:
        value_buf = ctypes.create_string_buffer(self.value_size)
        attr, _keep = self._elem_attr(key, value_buf)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value_buf.raw

    def delete(self, key: bytes) -> bool:
        attr, _keep = self._elem_attr(key, None)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        next_buf = ctypes.create_string_buffer(self.key_size)
        prev: ctypes.Array | None = None
        while True:
            attr = _attr()
            struct.pack_into("<IIQQ", attr, 0, self.fd, 0,
                             ctypes.addressof(prev) if prev is not None else 0,
                             ctypes.addressof(next_buf))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return out
                raise
            out.append(next_buf.raw)
            prev = ctypes.create_string_buffer(next_buf.raw, self.key_size)
