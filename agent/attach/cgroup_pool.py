"""Empty skill cgroups made ahead of time by a helper process.

Making a registered skill's cgroup (mkdir in v2 and in the memory, pids
and cpu v1 hierarchies, then the limit writes) was the largest part of a
registration's CPU time in the daemon (~0.4 ms of ~1.5 ms on the
development VM; the kernel's cgroup_mkdir is most of it). The daemon is one
thread and forks supervisors, so the work goes to a *process*: a child
forked once, which makes cgroups with `SkillCgroup.create` for a (skill
name, limits) on request and sends their paths back. `Hooks.attach` takes a
spare when there is one, and makes the cgroup itself (as before) when there
is none, so the pool only changes where the time is spent.

Spares are made at their final place, `<subtree>/<skill>/reg-<hex>`, with
the skill's limits already written: cgroup v2 refuses rename(2)
(kernel/cgroup/cgroup.c has no `.rename` in cgroup_kf_syscall_ops, only
cgroup-v1 does; EPERM here), so a directory cannot be made under another
name and moved into place. A spare holds no process and has no map entries
or nft elements, so it grants nothing; it becomes a skill's cgroup when
`attach` writes its entries and moves processes into it, in the same order
as with a cgroup made on the spot. Spares left by a daemon that was killed
are removed at the next start (`remove_stale_spares`); the helper dies with
the daemon (PR_SET_PDEATHSIG).

The helper also opens each spare's `cgroup.procs` files and passes the fds
with its answer (SCM_RIGHTS), so the move into a spare is a write(2) per
hierarchy: the path lookups of an open(2) take each hierarchy's kernfs
rwsem, which the helper's mkdirs hold for writing while they create a
cgroup's files. The daemon holds at most HELD_FDS_MAX of them, and no
more than an eighth of its RLIMIT_NOFILE; a spare without fds is moved
into by path, as before.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import resource
import secrets
import signal
import socket
from collections import OrderedDict, deque
from typing import Optional

from agent.enforce.cgroup import SkillCgroup
from agent.fdpass import FD_SIZE, close_all, fds_of, rights

SPARE_PREFIX = "reg-"
LOW_WATER = 24  # ask for more when a key has fewer spares (made or on their way) than this
BATCH = 24  # cgroups per request
CHUNK = 8  # the helper answers as soon as it has made this many, so spares arrive steadily
MAX_KEYS = 16  # (skill, limits) pairs with spares; the least recently used is dropped
HELD_FDS_MAX = 512  # cgroup.procs fds of spares the daemon keeps open at most
_MAX_MESSAGE = 1 << 20
_FDS_PER_SPARE = 5  # v2 and at most four v1 hierarchies (memory, pids, cpu, freezer)
_MAX_ANSWER_FDS = CHUNK * _FDS_PER_SPARE  # SCM_MAX_FD is 253 (include/net/scm.h)


def new_instance() -> str:
    """An instance directory name for a registered skill's cgroup."""
    return SPARE_PREFIX + secrets.token_hex(6)


def limits_key(limits) -> tuple:
    return (limits.memory_bytes, limits.cpu, limits.pids)


class CgroupPool:
    """The daemon's side: spares by (skill name, limits), refilled by the helper."""

    def __init__(self, mounts, root: str, *, low_water: int = LOW_WATER, batch: int = BATCH,
                 chunk: int = CHUNK):
        self.mounts = mounts
        self.root = root
        self.low_water = low_water
        self.batch = batch
        self.chunk = chunk
        self.spares: "OrderedDict[tuple, deque]" = OrderedDict()
        self.pending: dict[tuple, int] = {}  # key -> cgroups asked for and not yet answered
        self.problem: Optional[str] = None  # why the helper stopped, if it did
        self.made = 0
        self.taken = 0
        self.held = 0  # cgroup.procs fds of the spares here
        self.held_max = min(HELD_FDS_MAX, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                parent.close()
                _helper(child, mounts, root, daemon_pid)
            except BaseException:  # noqa: BLE001 - a forked child must never return
                code = 1
            finally:
                os._exit(code)
        child.close()
        parent.setblocking(False)
        self.sock = parent
        self.pid = pid

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- taking --

    def take(self, skill: str, limits):
        """A spare SkillCgroup for `skill` with these limits, or None (make one then).
        Either way, ask for more when few are left."""
        key = (skill, limits_key(limits))
        queue = self.spares.get(key)
        cgroup = None
        if queue:
            cgroup = queue.popleft()
            self.held -= cgroup.held_fds  # the taker closes them
            self.taken += 1
        if queue is None:
            queue = self.spares[key] = deque()
            self._evict()
        else:
            self.spares.move_to_end(key)
        if len(queue) + self.pending.get(key, 0) < self.low_water and self.sock is not None:
            if self._request({"op": "make", "skill": skill, "limits": list(key[1]), "count": self.batch,
                              "chunk": self.chunk}):
                self.pending[key] = self.pending.get(key, 0) + self.batch
        return cgroup

    def ready(self, skill: str, limits) -> int:
        """How many spares for `skill` with these limits are here now; asks the
        helper for more when few are left or coming."""
        key = (skill, limits_key(limits))
        queue = self.spares.get(key)
        have = len(queue) if queue else 0
        if have + self.pending.get(key, 0) < self.low_water and self.sock is not None:
            if queue is None:
                self.spares[key] = deque()
                self._evict()
            if self._request({"op": "make", "skill": skill, "limits": list(key[1]), "count": self.batch,
                              "chunk": self.chunk}):
                self.pending[key] = self.pending.get(key, 0) + self.batch
        return have

    def coming(self, skill: str, limits) -> bool:
        """True while the helper runs and has been asked for spares of this key."""
        return self.sock is not None and self.pending.get((skill, limits_key(limits)), 0) > 0

    def _evict(self) -> None:
        while len(self.spares) > MAX_KEYS:
            _key, queue = self.spares.popitem(last=False)
            self.pending.pop(_key, None)
            if queue:
                self._drop(queue)

    def _drop(self, cgroups) -> None:
        """Have the helper remove spares this side will not use."""
        for cgroup in cgroups:
            self.held -= cgroup.held_fds
            cgroup.close_held()
        self._request({"op": "drop", "cgroups": [_paths(c) for c in cgroups]})

    def _request(self, message: dict) -> bool:
        """Send a request to the helper; False if it was not sent."""
        try:
            self.sock.send(json.dumps(message).encode())
        except (BlockingIOError, InterruptedError):
            return False  # the helper is behind; the next take() asks again
        except OSError as exc:
            self.stop(f"sending to the helper: {exc.strerror or exc}")
            return False
        return True

    # -- answers, read from the event loop --

    def on_readable(self) -> None:
        while self.sock is not None:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(_MAX_MESSAGE, _ANSWER_ANCILLARY, _MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stop(f"reading from the helper: {exc.strerror or exc}")
                return
            fds = fds_of(ancdata)
            if not data:
                close_all(fds)
                self.stop("the helper exited")
                return
            if flags & socket.MSG_CTRUNC:  # not all fds arrived: use none of them
                close_all(fds)
                fds = []
            answer = json.loads(data)
            key = (answer["skill"], tuple(answer["limits"]))
            made = []
            for v2, v1, applied, cg, count in answer["made"]:
                held, fds = fds[:count], fds[count:]
                if len(held) != count or self.held + count > self.held_max:
                    close_all(held)
                    held = None
                cgroup = SkillCgroup(v2, v1, applied, cg, held)
                if held is not None and not cgroup.held_fds:  # not one fd per hierarchy
                    close_all(held)
                self.held += cgroup.held_fds
                made.append(cgroup)
            close_all(fds)
            left = self.pending.get(key, 0) - len(made) - answer.get("unmade", 0)
            if left > 0:
                self.pending[key] = left
            else:
                self.pending.pop(key, None)
            self.made += len(made)
            queue = self.spares.get(key)
            if queue is None:  # evicted meanwhile
                if made:
                    self._drop(made)
            else:
                queue.extend(made)
            if answer.get("error") and not made:
                self.problem = answer["error"]

    def stop(self, why: str) -> None:
        self.problem = why
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.pending.clear()

    def spare_count(self) -> int:
        return sum(len(q) for q in self.spares.values())

    # -- end --

    def close(self) -> None:
        """Remove every spare and end the helper. The helper finishes the
        batch it is making, reads EOF and exits; the spares it reported
        meanwhile (answers still queued here) are removed as well."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)  # the helper reads EOF
                sock.settimeout(5.0)
                while True:
                    data, ancdata, _flags, _ = sock.recvmsg(_MAX_MESSAGE, _ANSWER_ANCILLARY, _MSG_CMSG_CLOEXEC)
                    close_all(fds_of(ancdata))
                    if not data:
                        break  # the helper has exited
                    for v2, v1, _applied, _id, _count in json.loads(data).get("made", []):
                        _rmdir_all(list(v1.values()) + [v2])
            except socket.timeout:
                if self.pid:
                    os.kill(self.pid, signal.SIGKILL)
            except (OSError, ValueError, TypeError, AttributeError):
                pass
            finally:
                sock.close()
        for queue in self.spares.values():
            for cgroup in queue:
                cgroup.close_held()
                _rmdir_all(_paths(cgroup))
        self.spares.clear()
        self.held = 0
        if self.pid:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


_ANSWER_ANCILLARY = socket.CMSG_SPACE(_MAX_ANSWER_FDS * FD_SIZE)
_MSG_CMSG_CLOEXEC = socket.MSG_CMSG_CLOEXEC  # received fds are close-on-exec: the daemon forks supervisors


def _paths(cgroup) -> list[str]:
    return list(cgroup.v1.values()) + ([cgroup.v2] if cgroup.v2 is not None else [])


def _rmdir_all(paths) -> None:
    """rmdir each spare, then its skill's directory if that is now empty
    (as SkillCgroup.remove does; a busy one stays)."""
    for path in paths:
        for directory in (path, os.path.dirname(path)):
            try:
                os.rmdir(directory)
            except OSError:
                break


# ---- the helper process -----------------------------------------------------

def _helper(sock: socket.socket, mounts, root: str, daemon_pid: int) -> None:
    from agent.enforce.cgroup import CgroupError, LimitValues
    from agent.enforce.libc import PR_SET_PDEATHSIG, prctl

    # Nothing inherited may be finalised here: garbage of the daemon's (a
    # socket object, say) would close an fd number this process reuses.
    # Everything the fork inherited goes to the permanent generation.
    gc.freeze()
    # Die with the daemon; it may already be gone (the fork raced its exit).
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon_pid:
        return
    try:
        signal.set_wakeup_fd(-1)  # the event loop's, closed below
    except ValueError:
        pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    keep = sock.fileno()
    # Nothing of the daemon's stays open here: not its listening socket, not
    # the state root lock (a flock held by this copy would keep a restarted
    # daemon out), not the BPF or netlink fds.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    sock.setblocking(True)
    while True:
        try:
            data = sock.recv(_MAX_MESSAGE)
        except InterruptedError:
            continue
        if not data:
            return
        request = json.loads(data)
        if request.get("op") == "drop":
            for paths in request["cgroups"]:
                _rmdir_all(paths)
            continue
        memory_bytes, cpu, pids = request["limits"]
        limits = LimitValues(memory_bytes, cpu, pids)
        count = int(request["count"])
        chunk = min(max(1, int(request.get("chunk", count))), CHUNK)
        made, fds, error = [], [], None
        for number in range(1, count + 1):
            try:
                cgroup = SkillCgroup.create(request["skill"], new_instance(), limits, mounts=mounts, root=root)
            except (CgroupError, OSError) as exc:
                error = str(exc)
            else:
                opened = _open_procs(cgroup)
                fds += opened
                made.append([cgroup.v2, cgroup.v1, cgroup.limits_applied(), cgroup.id, len(opened)])
            # The first at once (a registration may be waiting for it), then by chunks.
            if error is not None or len(made) == chunk or number in (1, count):
                answer = {"skill": request["skill"], "limits": request["limits"], "made": made,
                          "error": error, "unmade": count - number + (error is not None)}
                sent = _answer(sock, answer, fds)
                close_all(fds)  # the daemon has its own copies now
                if not sent:
                    return
                made, fds = [], []
            if error is not None:
                break


def _open_procs(cgroup) -> list[int]:
    """Write fds of the spare's cgroup.procs files, in SkillCgroup._procs_files
    order; none if one cannot be opened (the daemon then opens them itself)."""
    if len(cgroup._procs_files) > _FDS_PER_SPARE:  # more than an answer has room for
        return []
    fds: list[int] = []
    try:
        for path in cgroup._procs_files:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    except OSError:
        close_all(fds)
        return []
    return fds


def _answer(sock: socket.socket, answer: dict, fds: list[int]) -> bool:
    """Send an answer (and the spares' fds) to the daemon; False (and the
    cgroups in it removed) if it is gone."""
    try:
        sock.sendmsg([json.dumps(answer).encode()], rights(fds))
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            for v2, v1, _applied, _id, _count in answer["made"]:
                _rmdir_all(list(v1.values()) + [v2])
            return False
        raise
    return True


def remove_stale_spares(v2_mount, v1_mounts: dict, root: str, in_use: set[int]) -> int:
    """rmdir spares an earlier daemon left (its helper made them, nobody took
    them): `reg-*` instance directories whose cgroup id is not in `in_use`
    (the ids in the pinned `skills` map) and which hold no process. Returns
    how many were removed."""
    removed = 0
    top = os.path.join(v2_mount, root)
    try:
        skills = [e for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for skill in skills:
        try:
            instances = [e for e in os.scandir(skill.path) if e.is_dir(follow_symlinks=False)
                         and e.name.startswith(SPARE_PREFIX)]
        except FileNotFoundError:
            continue
        for inst in instances:
            try:
                if inst.inode() in in_use:
                    continue
                os.rmdir(inst.path)  # EBUSY when it holds a process: then it is left alone
            except OSError:
                continue
            removed += 1
            rel = os.path.join(root, skill.name, inst.name)
            _rmdir_all(os.path.join(m, rel) for m in v1_mounts.values())
    return removed
