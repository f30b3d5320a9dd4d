"""Load skillguard's BPF programs once, attach them through pinned links.

Layout under the pin directory (default /sys/fs/bpf/skillguard/v2):
  skills allow4 allow6 ports resolvers fs_prefixes lost events layout   maps (bcc pins them)
  link_connect4 link_connect6 link_sendmsg4 link_sendmsg6          cgroup links
  link_tp_<syscall>                                                tracepoint links, only while needed

A pinned link keeps its program attached after the agent exits, so the
cgroup hooks go on enforcing the policy in the (equally pinned) maps. A
restarted agent compiles the programs again against the same pinned maps
and swaps each link's program with BPF_LINK_UPDATE: at no moment is no
program attached (kernel/bpf/cgroup.c cgroup_bpf_replace()).

bcc reuses a pinned map by path without comparing its layout, so the maps'
layout version (bpf/skillguard.h LAYOUT_VERSION) names the default pin
directory and is stored in the pinned `layout` map: a pin directory made
for another layout is refused, never silently reused. Programs of an older
layout stay attached from their own directory and keep enforcing the skills
in their own maps; `load()` lists such directories in `LoadedHooks.stale`.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.enforce import bpf_sys, libc

BPF_SRC = Path(__file__).resolve().parents[2] / "bpf"
LAYOUT_VERSION = 2  # = LAYOUT_VERSION in bpf/skillguard.h
DEFAULT_PIN_DIR = f"/sys/fs/bpf/skillguard/v{LAYOUT_VERSION}"
RINGBUF_BYTES = 1 << 20

CGROUP_PROGRAMS = (  # function, attach type, pin name
    ("sg_connect4", bpf_sys.BPF_CGROUP_INET4_CONNECT, "link_connect4"),
    ("sg_connect6", bpf_sys.BPF_CGROUP_INET6_CONNECT, "link_connect6"),
    ("sg_sendmsg4", bpf_sys.BPF_CGROUP_UDP4_SENDMSG, "link_sendmsg4"),
    ("sg_sendmsg6", bpf_sys.BPF_CGROUP_UDP6_SENDMSG, "link_sendmsg6"),
)
TRACEPOINT_PROGRAMS = (  # function, syscalls:sys_enter_<name>
    ("sg_openat", "openat"),
    ("sg_openat2", "openat2"),
    ("sg_open", "open"),
    ("sg_creat", "creat"),
    ("sg_execve", "execve"),
    ("sg_execveat", "execveat"),
)
MAP_NAMES = ("skills", "allow4", "allow6", "ports", "resolvers", "fs_prefixes", "lost", "events", "layout")

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3


class BpfError(RuntimeError):
    """Loading or attaching a BPF program failed; says which and why."""


def _source(name: str) -> str:
    # bcc rewrites map calls (`skills.lookup(...)`) only in the main file, so
    # the shared header is pasted in rather than #included.
    header = (BPF_SRC / "skillguard.h").read_text()
    return (BPF_SRC / name).read_text().replace('#include "skillguard.h"', header)


def _compile(name: str, pin_dir: str):
    import bcc  # heavy: clang/LLVM; imported only here

    cflags = [f'-DPIN_DIR="{pin_dir}"', f"-DRINGBUF_BYTES={RINGBUF_BYTES}", "-w"]
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as quiet:
            os.dup2(quiet.fileno(), 2)  # bcc prints warnings for kernel headers on fd 2
            return bcc.BPF(text=_source(name).encode(), cflags=cflags)
    except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception
        raise BpfError(f"compiling bpf/{name} with bcc: {exc}") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tracepoint_id(syscall: str) -> int:
    from agent.enforce.cgroupfs import read_mounts

    roots = [m.mount_point for m in read_mounts() if m.fstype == "tracefs"]
    roots += [Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")]
    for root in roots:
        path = root / "events" / "syscalls" / f"sys_enter_{syscall}" / "id"
        if path.exists():
            return int(path.read_text())
    raise BpfError(f"tracepoint syscalls:sys_enter_{syscall}: no tracefs with it "
                   "(mount tracefs on /sys/kernel/tracing)")


def _perf_tracepoint(tp_id: int) -> int:
    attr = bytearray(128)  # struct perf_event_attr, PERF_ATTR_SIZE_VER7
    # type, size, config, sample_period=1; sample_type = PERF_SAMPLE_RAW (1<<10)
    struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_TRACEPOINT, len(attr), tp_id, 1, 1 << 10)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    # pid -1, cpu 0: a tracepoint program runs on every CPU, whatever the event's CPU
    # (kernel/trace/bpf_trace.c perf_event_attach_bpf_prog adds it to the tracepoint's array).
    return libc.syscall("perf_event_open", buf, ctypes.c_long(-1), ctypes.c_long(0),
                        ctypes.c_long(-1), ctypes.c_long(PERF_FLAG_FD_CLOEXEC))


@dataclass
class LoadedHooks:
    pin_dir: str
    cgroup_root: Path
    map_fds: dict[str, int]
    cgroup_prog_fds: dict[str, int]
    tp_prog_fds: dict[str, int]
    link_fds: dict[str, int] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)  # links that existed (agent restart)
    stale: list[str] = field(default_factory=list)  # sibling pin dirs of other layouts with links
    _bcc: list = field(default_factory=list)  # keeps the bcc objects (and their fds) alive


def load(cgroup_root: Path, pin_dir: str = DEFAULT_PIN_DIR) -> LoadedHooks:
    """Compile and load every program; attach (or swap into) the pinned cgroup links."""
    if not pin_dir.startswith(bpf_sys.DEFAULT_BPFFS + "/"):
        raise BpfError(f"pin dir {pin_dir} is not under {bpf_sys.DEFAULT_BPFFS}")
    try:
        bpf_sys.ensure_bpffs()
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise BpfError(f"bpffs: {exc}") from None
    _check_layout(pin_dir)
    connect = _compile("connect.c", pin_dir)
    _stamp_layout(pin_dir)  # at once: bcc has just created (or opened) every shared map
    fs = _compile("fs_observe.c", pin_dir)
    import bcc

    try:
        cgroup_progs = {fn: connect.load_func(fn.encode(), bcc.BPF.CGROUP_SOCK_ADDR, attach_type=at).fd
                        for fn, at, _ in CGROUP_PROGRAMS}
        tp_progs = {fn: fs.load_func(fn.encode(), bcc.BPF.TRACEPOINT).fd for fn, _ in TRACEPOINT_PROGRAMS}
    except Exception as exc:  # noqa: BLE001
        raise BpfError(f"loading a program: {exc}") from None
    map_fds = {}
    for name in MAP_NAMES:
        try:
            map_fds[name] = bpf_sys.obj_get(f"{pin_dir}/{name}")
        except OSError as exc:
            raise BpfError(f"map {name} not pinned at {pin_dir}/{name}: {exc}") from None
    hooks = LoadedHooks(pin_dir, cgroup_root, map_fds, cgroup_progs, tp_progs, _bcc=[connect, fs],
                        stale=_other_layouts(pin_dir))
    _attach_cgroup_links(hooks)
    return hooks


_ZERO = struct.pack("<I", 0)


def _layout_map(fd: int) -> bpf_sys.RawMap:
    return bpf_sys.RawMap(fd, 4, 4, "layout")


def _stamp_layout(pin_dir: str) -> None:
    try:
        fd = bpf_sys.obj_get(f"{pin_dir}/layout")
        try:
            _layout_map(fd).update(_ZERO, struct.pack("<I", LAYOUT_VERSION))
        finally:
            os.close(fd)
    except OSError as exc:
        raise BpfError(f"map layout not pinned at {pin_dir}/layout: {exc}") from None


def _check_layout(pin_dir: str) -> None:
    """Refuse a pin dir whose maps were made for another layout (see the module doc)."""
    if not os.path.exists(f"{pin_dir}/skills"):
        return  # new: bcc creates every map
    found = None
    try:
        fd = bpf_sys.obj_get(f"{pin_dir}/layout")
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            found = struct.unpack("<I", _layout_map(fd).lookup(_ZERO) or _ZERO)[0]
        finally:
            os.close(fd)
    if found != LAYOUT_VERSION:
        raise BpfError(f"pin dir {pin_dir} holds maps of layout {found or 'v1 (unversioned)'}, this "
                       f"agent uses layout {LAYOUT_VERSION}: reusing them would misread their policy. "
                       f"Use the default pin dir (/sys/fs/bpf/skillguard/v{LAYOUT_VERSION}) or another "
                       "empty one; the old programs keep enforcing their skills until detached")


def _other_layouts(pin_dir: str) -> list[str]:
    """Sibling pin dirs (…/v<N>) still holding pinned links of another layout."""
    parent, own = os.path.split(pin_dir)
    out = []
    try:
        names = os.listdir(parent)
    except OSError:
        return out
    for name in sorted(names):
        path = os.path.join(parent, name)
        if name != own and name[:1] == "v" and name[1:].isdigit() and os.path.isdir(path) \
                and any(n.startswith("link_") for n in os.listdir(path)):
            out.append(path)
    return out


def _attach_cgroup_links(hooks: LoadedHooks) -> None:
    try:
        cgroup_fd = os.open(hooks.cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BpfError(f"opening cgroup {hooks.cgroup_root}: {exc.strerror}") from None
    try:
        for fn, attach_type, pin in CGROUP_PROGRAMS:
            path = f"{hooks.pin_dir}/{pin}"
            prog = hooks.cgroup_prog_fds[fn]
            try:
                link = bpf_sys.obj_get(path)
            except FileNotFoundError:
                link = None
            try:
                if link is not None:
                    bpf_sys.link_update(link, prog)  # atomic: the old program runs until this returns
                    hooks.replaced.append(pin)
                else:
                    link = bpf_sys.link_create(prog, cgroup_fd, attach_type)
                    bpf_sys.obj_pin(link, path)
            except OSError as exc:
                raise BpfError(f"attaching {fn} to {hooks.cgroup_root}: {exc.strerror}") from None
            hooks.link_fds[pin] = link
    finally:
        os.close(cgroup_fd)


def tracepoints_attached(hooks: LoadedHooks) -> bool:
    """Every tracepoint's link is pinned (a crash half-way through an attach leaves only some)."""
    return all(os.path.exists(f"{hooks.pin_dir}/link_tp_{name}") for _, name in TRACEPOINT_PROGRAMS)


def attach_tracepoints(hooks: LoadedHooks) -> None:
    """Attach the syscall tracepoints that have no pinned link; pinned like the cgroup links.

    A link pinned already (an earlier agent's, after a restart) is kept with
    its program: perf-event links have no update_prog (BPF_LINK_UPDATE gives
    EINVAL), and that program reads the same pinned maps.
    """
    done = []
    try:
        for fn, name in TRACEPOINT_PROGRAMS:
            pin = f"link_tp_{name}"
            path = f"{hooks.pin_dir}/{pin}"
            if pin in hooks.link_fds:
                continue
            try:
                link = bpf_sys.obj_get(path)
            except FileNotFoundError:
                link = _tracepoint_link(hooks, fn, name)
                try:
                    bpf_sys.obj_pin(link, path)
                except OSError:
                    os.close(link)
                    raise
                done.append(pin)
            hooks.link_fds[pin] = link
    except (OSError, BpfError) as exc:
        for pin in done:
            _drop_link(hooks, pin)
        if isinstance(exc, BpfError):
            raise
        raise BpfError(f"attaching syscall tracepoints: {exc.strerror or exc}") from None


def detach_tracepoints(hooks: LoadedHooks) -> None:
    for _, name in TRACEPOINT_PROGRAMS:
        _drop_link(hooks, f"link_tp_{name}")


# A perf-event link cannot be detached (bpf_perf_link_lops has no .detach:
# BPF_LINK_DETACH gives EOPNOTSUPP); it leaves the tracepoint once its last
# reference is gone, and then from a workqueue (kernel/bpf/syscall.c
# bpf_link_put()). Until that work has run, the program is still in the
# tracepoint's array and attaching the same program again gives EEXIST
# (kernel/bpf/core.c bpf_prog_array_copy()); by then the link has no
# reference left to take back (BPF_LINK_GET_FD_BY_ID gives ENOENT).
# On 6.18 (2 vCPUs) a few in a hundred attaches made at once after a detach
# met EEXIST, each for under 3 ms; the bound only keeps a stuck kernel from
# holding the agent.
RELEASE_WAIT_S = 1.0


def _tracepoint_link(hooks: LoadedHooks, fn: str, name: str) -> int:
    event = _perf_tracepoint(_tracepoint_id(name))
    try:
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            try:
                return bpf_sys.link_create(hooks.tp_prog_fds[fn], event, bpf_sys.BPF_PERF_EVENT)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                if time.monotonic() > deadline:
                    raise BpfError(f"attaching {fn}: the link it had until just now is still being "
                                   f"released by the kernel after {RELEASE_WAIT_S:g}s (EEXIST)") from None
                time.sleep(0.0005)
    finally:
        os.close(event)  # the link holds the perf event


def _drop_link(hooks: LoadedHooks, pin: str) -> None:
    """Detach (cgroup links can; perf-event links cannot), close and unpin."""
    path = f"{hooks.pin_dir}/{pin}"
    fd = hooks.link_fds.pop(pin, None)
    if fd is None:
        try:
            fd = bpf_sys.obj_get(path)
        except FileNotFoundError:
            fd = None
    if fd is not None:
        try:
            bpf_sys.link_detach(fd)  # detaches now, whoever else holds the link
        except OSError:
            pass
        os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unload(hooks: LoadedHooks, *, unpin: bool = True) -> None:
    """Detach every link and (with unpin) remove every pin: nothing stays in the kernel."""
    detach_tracepoints(hooks)
    for _, _, pin in CGROUP_PROGRAMS:
        _drop_link(hooks, pin)
    for fd in hooks.map_fds.values():
        os.close(fd)
    hooks.map_fds.clear()
    for b in hooks._bcc:
        b.cleanup()
    hooks._bcc.clear()
    if unpin:
        remove_pins(hooks.pin_dir)


def remove_pins(pin_dir: str) -> None:
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        if name.startswith("link_"):
            try:
                fd = bpf_sys.obj_get(f"{pin_dir}/{name}")
                bpf_sys.link_detach(fd)
                os.close(fd)
            except OSError:
                pass
        os.unlink(f"{pin_dir}/{name}")
    os.rmdir(pin_dir)


# ---- events ----------------------------------------------------------------

class RingReader:
    """Reads the pinned ring buffer through libbcc; `fd` is pollable (EPOLLIN on data)."""

    def __init__(self, map_fd: int, on_event: Callable[[bytes], None]):
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        self.fd = map_fd
        self._lib = lib

        def callback(_ctx, data, size):
            try:
                on_event(ctypes.string_at(data, size))
            except Exception as exc:  # noqa: BLE001 - never unwind through C
                print(f"skillguard: event handler failed: {exc!r}", file=sys.stderr)
            return 0

        self._cb = _RINGBUF_CB_TYPE(callback)
        self._manager = lib.bpf_new_ringbuf(map_fd, self._cb, None)
        if not self._manager:
            raise BpfError("libbcc could not open the ring buffer")

    def poll(self, timeout_ms: int = 0) -> None:
        self._lib.bpf_poll_ringbuf(self._manager, timeout_ms)

    def consume(self) -> None:
        self._lib.bpf_consume_ringbuf(self._manager)

    def close(self) -> None:
        if self._manager:
            self._lib.bpf_free_ringbuf(self._manager)
            self._manager = None


def lost_events(map_fd: int) -> int:
    """Sum of the per-CPU `lost` counter."""
    ncpu = _possible_cpus()
    rmap = bpf_sys.RawMap(map_fd, 4, 8 * ncpu, "lost")
    value = rmap.lookup(struct.pack("<I", 0)) or b""
    return sum(struct.unpack(f"<{len(value) // 8}Q", value))


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def set_cloexec(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
