"""The daemon's side of `register`: agent.attach (eBPF hooks, cgroup move,
nftables socket-cgroup rules) driven from the event loop.

The hooks load once, at the daemon's start, and their event fds are read by
the loop. If they cannot load, `register` is refused with the reason
(fail closed): a registered process is only confined by them.
"""
from __future__ import annotations

import gc
import time
from typing import Optional

from agent.daemon import protocol
from agent.daemon.cgroups import cgroup_populated, rmdir_if_empty


class Attacher:
    def __init__(self, daemon):
        self.daemon = daemon
        self.hooks = None
        self.problem: Optional[str] = None
        self._readers: list[int] = []
        self._queue: list = []  # registrations waiting for the next batch: (skill, request, future, since)
        self._reserved: set[int] = set()  # their pids
        self._flush = None  # the loop's handle of the next batch
        self._flush_at = 0.0
        self._tracepoints = None  # while a worker thread attaches the syscall tracepoints: its future
        self._worker = None
        try:
            import agent.attach  # noqa: F401
        except ImportError as exc:
            self.problem = f"eBPF hooks are not available: {exc}"
            return
        config = daemon.config
        try:
            from agent.daemon.hookloader import load_hooks

            self.hooks = load_hooks(pin_dir=config.bpf_pin_dir, subtree=config.cgroup_subtree,
                                    nft_table=config.nft_cgroup_table,
                                    resolvers=list(config.dns_upstream) or None,
                                    emit=self._on_violation,
                                    note=lambda text: daemon.log(f"hooks: {text}"))
        except Exception as exc:  # noqa: BLE001 - any load failure refuses register, not the daemon
            self.problem = f"eBPF hooks failed to load: {exc}"
            self.daemon.log(f"register disabled: {self.problem}")
            return
        from agent.attach.hooks import AttachRequest

        self._request_type = AttachRequest
        self._lost_seen = 0
        for fd in self.hooks.fds():
            self.daemon.loop.add_reader(fd, self._on_readable)
            self._readers.append(fd)
        # Skill cgroups made ahead by a helper process (agent/attach/cgroup_pool.py);
        # without it each registration makes its own, as before.
        try:
            pool = self.hooks.start_pool()
        except OSError as exc:
            self.daemon.log(f"hooks: no cgroup pool ({exc.strerror or exc}); cgroups are made per registration")
        else:
            self.daemon.loop.add_reader(pool.fileno(), self._on_pool_readable)
            self._readers.append(pool.fileno())

    def _on_pool_readable(self) -> None:
        pool = self.hooks.pool
        if pool is None:
            return
        fd = pool.fileno() if pool.sock is not None else None
        try:
            pool.on_readable()
        except Exception as exc:  # noqa: BLE001 - a bad answer stops the pool, not the daemon
            pool.stop(f"{type(exc).__name__}: {exc}")
        if self._queue:
            self._schedule(0.0)  # registrations may wait for these spares
        if pool.sock is None and fd is not None:
            self.daemon.loop.remove_reader(fd)
            self._readers.remove(fd)
            self.daemon.log(f"hooks: cgroup pool stopped ({pool.problem}); cgroups are made per registration")

    def _on_readable(self) -> None:
        try:
            self.hooks.poll(0)
        except Exception as exc:  # noqa: BLE001
            self.daemon.log(f"hooks: poll failed: {type(exc).__name__}: {exc}")
        try:
            lost = self.hooks.lost_events()
        except Exception:  # noqa: BLE001
            return
        if lost > self._lost_seen:
            self.daemon.pipeline.count_lost("kernel_ring_buffer", lost - self._lost_seen)
            self._lost_seen = lost

    def _on_violation(self, violation) -> None:
        skill = next((s for s in self.daemon.skills.values()
                      if s.kind == "registered" and s.live and s.name == violation.skill), None)
        self.daemon.publish(violation, skill)

    # -- operations --

    def available(self) -> Optional[str]:
        return None if self.hooks is not None else self.problem

    def reserved(self, pid: int) -> bool:
        """True while `pid` is named by a registration that waits for the next batch."""
        return pid in self._reserved

    def attach(self, skill, policy, pids, tree: bool, require):
        """Queue a registration for the next batch; the future's result is the
        skill, attached, recorded and added to the daemon, or an RpcError.

        Registrations that arrive in the same turn of the event loop are
        attached together (Hooks.attach_many: one nftables transaction) and
        recorded with one journal write; each is answered only after all of
        that. The batch runs on the loop's next turn, so a single
        registration waits for nothing."""
        if self.hooks is None:
            raise protocol.RpcError(protocol.LAYER_UNAVAILABLE,
                                    f"register: {self.problem}; nothing was changed")
        future = self.daemon.loop.create_future()
        request = self._request_type(policy, tuple(pids), tree, tuple(require))
        self._queue.append((skill, request, future, time.monotonic()))
        self._reserved.update(pids)
        self._schedule(0.0)
        return future

    def _schedule(self, delay: float) -> None:
        if self._flush is not None:
            if delay or self._flush_at <= time.monotonic():
                return
            self._flush.cancel()  # a wait for spares, and now something to do at once
        self._flush_at = time.monotonic() + delay
        self._flush = (self.daemon.loop.call_later(delay, self._attach_queued) if delay
                       else self.daemon.loop.call_soon(self._attach_queued))

    def _attach_queued(self) -> None:
        self._flush = None
        if self._tracepoints is not None:
            return  # _tracepoints_done() comes back to the queue
        queue, self._queue = self._queue, []
        # Registrations whose cgroup the pool's helper is still making wait for
        # it (up to SPARE_WAIT_S, then it is made here): making it here at once
        # would cost the daemon the mkdirs the helper does anyway, in the way
        # of every other request.
        now = time.monotonic()
        try:
            waits = self.hooks.spare_wait([request for _skill, request, _f, _since in queue])
        except Exception as exc:  # noqa: BLE001 - the pool misbehaving: attach without waiting
            self.daemon.log(f"hooks: cgroup pool: {type(exc).__name__}: {exc}")
            waits = [False] * len(queue)
        batch = []
        for entry, wait in zip(queue, waits):
            if wait and now - entry[3] < SPARE_WAIT_S:
                self._queue.append(entry)
            else:
                batch.append(entry)
        if self._queue:
            self._schedule(max(0.0, SPARE_WAIT_S - (now - self._queue[0][3])) + 0.001)
        if not batch:
            return
        if self.hooks.tracepoints_wanted([request for _skill, request, _f, _since in batch]):
            self._queue[:0] = batch
            self._start_tracepoints()
            return
        try:
            results = self.hooks.attach_many([request for _skill, request, _f, _since in batch])
            done_at = time.monotonic()
            attached = []
            for (skill, request, future, since), result in zip(batch, results):
                if isinstance(result, BaseException):
                    _fail(future, _refusal(result))
                    continue
                self.daemon.metrics.attach_seconds.observe(done_at - since)
                skill.attachment = result
                skill.pids = tuple(result.pids)
                skill.layers = dict(result.layers)
                skill.cgroup_paths = (str(result.cgroup_path),)
                skill.cgroup_id = result.cgroup_id
                skill.state = "running"
                attached.append((skill, future))
            if attached:
                self._record(attached)
        except BaseException as exc:
            for _skill, _request, future, _since in batch:
                _fail(future, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            for _skill, request, _future, _since in batch:
                self._reserved.difference_update(request.pids)

    def _start_tracepoints(self) -> None:
        """Attach the syscall tracepoints in a worker thread (see Hooks.attach_tracepoints:
        the kernel can make that wait for 100 ms and more); the registrations that
        need them wait in the queue, every other request is served meanwhile."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="tracepoints")
        self.hooks.tracepoints_busy = True
        self._tracepoints = asyncio.wrap_future(self._worker.submit(self.hooks.attach_tracepoints),
                                                loop=self.daemon.loop)
        self._tracepoints.add_done_callback(self._tracepoints_done)

    def _tracepoints_done(self, future) -> None:
        self._tracepoints = None
        self.hooks.tracepoints_busy = False
        exc = None if future.cancelled() else future.exception()
        if exc is not None:  # refused with the reason; not tried again on the loop
            waiting, self._queue = self._queue, []
            for entry in waiting:
                request = entry[1]
                if request.observe_fs:
                    _fail(entry[2], _refusal(exc))
                    self._reserved.difference_update(request.pids)
                else:
                    self._queue.append(entry)
        if self._queue:
            self._schedule(0.0)

    def _record(self, attached: list) -> None:
        """Record and add attached skills (one journal write), then answer them.
        If the record cannot be written they are detached again and refused."""
        daemon = self.daemon
        skills = [skill for skill, _future in attached]
        try:
            daemon.add_skills(skills)
        except Exception as exc:  # noqa: BLE001 - ENOSPC, EIO: not recorded, so not kept
            for skill, future in attached:
                self.detach(skill)
                _fail(future, protocol.RpcError(
                    protocol.LAYER_UNAVAILABLE, f"register refused: the registry record could not be "
                                                f"written ({exc}); nothing was changed", {"layer": "registry"}))
            return
        for skill, future in attached:
            if daemon.cgroup_watch is not None:
                daemon.cgroup_watch.watch(skill.id, skill.cgroup_paths)
            if not future.done():
                future.set_result(skill)
        _out_of_young_collections()

    def layer_names(self) -> tuple:
        from agent.attach import ALL_LAYERS

        return tuple(ALL_LAYERS)

    def detach(self, skill) -> list[str]:
        problems = []
        if self.hooks is not None:
            attach_id = _attach_id(skill)
            if self.hooks.attached(attach_id):
                try:
                    self.hooks.detach(attach_id)
                except Exception as exc:  # noqa: BLE001
                    problems.append(str(exc))
        # Never kill here: unregistering releases processes, it does not end them.
        problems.extend(rmdir_if_empty(skill.cgroup_paths))
        return problems

    def readopt(self, skill) -> Optional[str]:
        """Take over a registered skill after a restart; None on success, else why not.

        Its programs, maps and nft rules never went away (pinned); Hooks.load()
        found it by cgroup id as an orphan. Here it gets its policy back, so
        its fs events are checked against its rules again.
        """
        if not cgroup_populated(skill.cgroup_paths):
            return "its processes have all exited"
        if self.hooks is None:
            return self.problem
        found = self.hooks.attachment_of_cgroup(skill.cgroup_id)
        if found is None:
            return (f"cgroup {skill.cgroup_id} is not in the pinned eBPF maps: its hooks were "
                    "removed while the daemon was down")
        skill.attachment = found
        adopt = getattr(self.hooks, "adopt", None)
        if callable(adopt):
            try:
                adopt(found.skill_id, skill.policy)
            except Exception as exc:  # noqa: BLE001
                return f"adopting {found.skill_id}: {exc}"
        return None

    def alive(self, skill) -> bool:
        """True while any of the skill's cgroups has a member."""
        return cgroup_populated(skill.cgroup_paths)

    def network_counts(self, skill) -> dict:
        """{"dropped": n}: connects/sends the cgroup hooks refused plus packets the
        nft socket-cgroup rules rejected. Allowed traffic is not counted by them."""
        if self.hooks is None or skill.attachment is None:
            return {}
        try:
            counters = self.hooks.counters(_attach_id(skill))
        except Exception:  # noqa: BLE001
            return {}
        return {"dropped": counters.get("net_denied", 0) + counters.get("nft_rejected", 0)}

    def close(self) -> None:
        """Stop reading events; the pinned hooks keep enforcing (never unloaded here)."""
        for fd in self._readers:
            self.daemon.loop.remove_reader(fd)
        self._readers.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # a tracepoint attach finishes before the hooks close
        if self.hooks is not None:
            self.hooks.close(unload=False)


SPARE_WAIT_S = 0.01  # the helper answers a request's first spare at once: one mkdir set, ~0.5 ms
FULL_COLLECTION_S = 600.0
_last_full_collection = time.monotonic()


def _out_of_young_collections() -> None:
    """Move what registrations made (a few dozen objects each, living as long
    as their skill) out of the cyclic collector's reach, as the daemon's
    start-up does with what it made: otherwise every collection of the
    older generations walks all of them, a pause of milliseconds at a
    thousand skills in the middle of other requests. gc.freeze() is a list
    splice. The register path makes no reference cycles (none found after
    2,000 registrations with the collector off), so nothing is kept alive by
    this; a full collection every FULL_COLLECTION_S still finds any cycle
    another part of the daemon left among the frozen objects."""
    global _last_full_collection
    if time.monotonic() - _last_full_collection > FULL_COLLECTION_S:
        _last_full_collection = time.monotonic()
        gc.unfreeze()
        gc.collect()
    gc.freeze()


def _refusal(exc: BaseException) -> protocol.RpcError:
    if isinstance(exc, protocol.RpcError):
        return exc
    layer = getattr(exc, "layer", None)
    return protocol.RpcError(protocol.LAYER_UNAVAILABLE, f"register refused: {exc}; nothing was changed",
                             {"layer": layer} if layer else None)


def _fail(future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _attach_id(skill) -> str:
    attachment = skill.attachment
    return getattr(attachment, "skill_id", None) or skill.id
