"""Learn at once when a registered skill's cgroup empties: inotify on its
cgroup v2 `cgroup.events`, which the kernel marks modified when `populated`
changes (Documentation/admin-guide/cgroup-v2.rst, "cgroup.events"). One
inotify fd on the event loop for every skill; the daemon's periodic sweep
catches anything without a v2 path."""
from __future__ import annotations

import ctypes
import os
import struct
import time
from typing import Callable, Iterable

IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("=iIII")  # struct inotify_event without its name (inotify(7))
# How long one turn of the event loop may spend ending skills. Ending one
# (detach, rmdir, journal) costs 0.5-5 ms; when thousands exit at once,
# ending them all in one callback held the loop for seconds (1.85 s for
# 3,000 in bench/daemon), and no request was answered meanwhile.
SLICE_S = 0.002


class CgroupWatch:
    def __init__(self, loop, on_change: Callable[[str], None]):
        self.loop = loop
        self.on_change = on_change
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            self.fd = None  # the sweep alone then notices empty cgroups
            return
        self.by_wd: dict[int, str] = {}
        self.by_skill: dict[str, int] = {}
        self._changed: dict[str, None] = {}  # skill ids not handled yet, in arrival order
        self._draining = False
        loop.add_reader(self.fd, self._on_readable)

    def watch(self, skill_id: str, cgroup_paths: Iterable[str]) -> bool:
        if self.fd is None:
            return False
        for path in cgroup_paths:
            # -1 (ENOENT) for a v1 path, which has no cgroup.events
            wd = self._libc.inotify_add_watch(self.fd, f"{path}/cgroup.events".encode(), IN_MODIFY)
            if wd >= 0:
                self.by_wd[wd] = skill_id
                self.by_skill[skill_id] = wd
                return True
        return False

    def unwatch(self, skill_id: str) -> None:
        if self.fd is None:
            return
        wd = self.by_skill.pop(skill_id, None)
        if wd is not None:
            self.by_wd.pop(wd, None)
            self._libc.inotify_rm_watch(self.fd, wd)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        changed = []
        while offset + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            skill_id = self.by_wd.get(wd)
            if skill_id is not None:
                changed.append(skill_id)
        self.enqueue(changed)

    def enqueue(self, skill_ids: Iterable[str]) -> None:
        """Hand these skills to on_change: for up to SLICE_S now (at least
        one), the rest on later turns of the loop."""
        self._changed.update(dict.fromkeys(skill_ids))
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        self._draining = False
        deadline = time.monotonic() + SLICE_S
        try:
            while self._changed:
                skill_id = next(iter(self._changed))
                del self._changed[skill_id]
                self.on_change(skill_id)
                if time.monotonic() >= deadline:
                    break
        finally:
            if self._changed:
                self._draining = True
                self.loop.call_soon(self._drain)

    def close(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None
