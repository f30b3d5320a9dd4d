"""The daemon's attacher attaches the syscall tracepoints in a worker thread:
the kernel can make that wait 100 ms and more right after the last observing
skill left (agent/attach/hooks.py Hooks.attach_tracepoints), and the event
loop must go on serving everyone else. Scheduling only: the hooks here are a
stand-in whose tracepoint attach blocks until the test lets it go (the kernel
side is tests/kernel/test_attach.py)."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from agent.attach.hooks import AttachError
from agent.daemon import attacher as attacher_mod
from agent.daemon import protocol


class BlockingHooks:
    def __init__(self, fail: bool = False):
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = fail
        self.attached = False
        self.tracepoints_busy = False
        self.busy_seen_by_worker = None
        self.batches: list = []

    def fds(self):
        return []

    def start_pool(self):
        raise OSError("no pool in this test")

    def spare_wait(self, requests):
        return [False] * len(requests)

    def tracepoints_wanted(self, requests):
        return any(r.observe_fs for r in requests) and not self.attached

    def attach_tracepoints(self):
        self.busy_seen_by_worker = self.tracepoints_busy
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise AttachError("fs-observe", "attaching syscall tracepoints: bpf: Operation not permitted")
        self.attached = True

    def attach_many(self, requests):
        self.batches.append(list(requests))
        return [RuntimeError("stop here: the batch ran") for _ in requests]

    def close(self, unload=False):
        pass


def _daemon(loop):
    config = SimpleNamespace(bpf_pin_dir="/unused", cgroup_subtree="unused", nft_cgroup_table=None,
                             dns_upstream=())
    return SimpleNamespace(loop=loop, config=config, log=lambda text: None)


def _attacher(monkeypatch, hooks, loop):
    import agent.daemon.hookloader as hookloader

    monkeypatch.setattr(hookloader, "load_hooks", lambda **kwargs: hooks)
    att = attacher_mod.Attacher(_daemon(loop))
    assert att.hooks is hooks
    return att


def _skill():
    return SimpleNamespace()


async def _served_while_waiting(att, hooks):
    future = att.attach(_skill(), policy=object(), pids=[4242], tree=False, require=())
    await asyncio.to_thread(hooks.started.wait, 10)
    # The worker is inside attach_tracepoints: the loop still runs other work.
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not future.done() and hooks.batches == []
    assert hooks.tracepoints_busy and hooks.busy_seen_by_worker
    assert att.reserved(4242)
    # A second registration waits behind the first, it does not start a second worker.
    second = att.attach(_skill(), policy=object(), pids=[4343], tree=False, require=())
    await asyncio.sleep(0)
    assert not second.done()
    hooks.release.set()
    for waiting in (future, second):
        with pytest.raises(protocol.RpcError) as caught:
            await asyncio.wait_for(waiting, 10)
        yield caught.value


def test_a_registration_waits_for_the_tracepoints_and_the_loop_does_not(monkeypatch):
    hooks = BlockingHooks()

    async def main():
        att = _attacher(monkeypatch, hooks, asyncio.get_running_loop())
        refusals = [r async for r in _served_while_waiting(att, hooks)]
        att.close()
        return refusals

    refusals = asyncio.run(main())
    # Both went on to attach_many once the tracepoints were there (the stand-in refuses there).
    assert [len(b) for b in hooks.batches] == [2]
    assert all("the batch ran" in r.message for r in refusals)
    assert not hooks.tracepoints_busy


def test_a_failed_tracepoint_attach_refuses_the_waiting_registrations_with_its_layer(monkeypatch):
    hooks = BlockingHooks(fail=True)

    async def main():
        att = _attacher(monkeypatch, hooks, asyncio.get_running_loop())
        refusals = [r async for r in _served_while_waiting(att, hooks)]
        reserved = att.reserved(4242) or att.reserved(4343)
        att.close()
        return refusals, reserved

    refusals, reserved = asyncio.run(main())
    assert hooks.batches == []  # not tried again on the loop
    assert [r.data for r in refusals] == [{"layer": "fs-observe"}] * 2
    assert all("Operation not permitted" in r.message for r in refusals)
    assert not reserved and not hooks.tracepoints_busy

