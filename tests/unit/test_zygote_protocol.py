"""The daemon's side of the launch zygote protocol (agent/daemon/zygote.py),
against a zygote played by the test over real socketpairs: spares are asked
for and handed out in order, a dead spare is skipped, a zygote that goes
away fails the waiting launch so the daemon forks instead."""
from __future__ import annotations

import _socket
import asyncio
import marshal
import os

import pytest

from agent.daemon import zygote as zyg
from agent.fdpass import fds_of, rights
from agent.launch.supervisor import RunOptions


class FakeZygote:
    """The zygote's end of the daemon's socket; makes spares on demand."""

    def __init__(self, daemon_side: zyg.Zygote):
        ours, theirs = zyg._socketpair()
        theirs.setblocking(False)
        daemon_side.sock = theirs
        daemon_side.asked = 0
        daemon_side.loop.add_reader(theirs.fileno(), daemon_side._on_message)
        self.sock = ours
        self.spares: list = []  # our ends of the spares' sockets

    def asks(self) -> list:
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(64))
            except BlockingIOError:
                return out

    def send_spare(self, alive: bool = True):
        spare_end, daemon_end = zyg._socketpair()
        pidfd = os.pidfd_open(os.getpid())
        self.sock.sendmsg([marshal.dumps(os.getpid())], rights([pidfd, daemon_end.fileno()]))
        os.close(pidfd)
        daemon_end.close()
        if not alive:
            spare_end.close()
        else:
            self.spares.append(spare_end)
        return spare_end


def _request(spare_end):
    message, ancillary, _flags, _addr = spare_end.recvmsg(1 << 20, _socket.CMSG_SPACE(8 * 4))
    return marshal.loads(message), fds_of(ancillary)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_launch_goes_to_a_spare_with_its_fds_and_the_next_is_asked_ahead(loop):
    side = zyg.Zygote(loop, log=lambda text: None)
    fake = FakeZygote(side)
    spare_end = fake.send_spare()
    plan = {"skill": "s", "witness": [("/x", None)], "network": None}
    r, w = os.pipe()

    async def go():
        await asyncio.sleep(0.01)  # the spare message is read
        assert side.ready and len(side.spares) == 1
        return await side.hand_over("l-1", RunOptions(argv=("/bin/true",)), [r, w, w], "/",
                                    "/state", plan, {(0, 0): r})

    pid, pidfd, start = loop.run_until_complete(go())
    from agent.daemon.registry import process_start_time

    assert (pid, start) == (os.getpid(), process_start_time(os.getpid()))
    os.close(pidfd)
    (launch_id, fields, cwd, state_root, sent_plan, stdio_count, keys), fds = _request(spare_end)
    assert launch_id == "l-1" and fields["argv"] == ("/bin/true",) and cwd == "/" and state_root == "/state"
    assert "witness" not in sent_plan and sent_plan["skill"] == "s"
    assert stdio_count == 3 and keys == [(0, 0)] and len(fds) == 4
    # The fds arrived as copies of what was sent: the pipe still works through them.
    os.write(fds[1], b"hi")
    assert os.read(r, 2) == b"hi"
    for fd in fds + [r, w]:
        os.close(fd)
    assert fake.asks() == [b"ahead"]  # one spare kept ready for the next launch


def test_with_no_spare_the_launch_asks_now_and_a_dead_spare_is_skipped(loop):
    side = zyg.Zygote(loop, log=lambda text: None)
    fake = FakeZygote(side)
    side.ready = True

    async def go():
        task = asyncio.ensure_future(side.hand_over("l-2", RunOptions(), [], None, "/state",
                                                    {"network": None}, {}))
        await asyncio.sleep(0.01)
        assert fake.asks() == [b"now"]
        fake.send_spare(alive=False)  # died while waiting: its socket is closed
        await asyncio.sleep(0.01)
        assert fake.asks() == [b"ahead", b"now"]
        live = fake.send_spare()
        result = await task
        return result, live

    (pid, pidfd, _start), live = loop.run_until_complete(go())
    os.close(pidfd)
    (launch_id, *_rest), fds = _request(live)
    assert launch_id == "l-2" and fds == []


def test_a_zygote_that_goes_away_fails_the_waiting_launch(loop):
    logged = []
    side = zyg.Zygote(loop, log=logged.append)
    fake = FakeZygote(side)
    side.ready = True

    async def go():
        task = asyncio.ensure_future(side.hand_over("l-3", RunOptions(), [], None, "/state",
                                                    {"network": None}, {}))
        await asyncio.sleep(0.01)
        fake.sock.close()
        with pytest.raises(zyg.ZygoteGone):
            await task

    loop.run_until_complete(go())
    assert not side.ready and side.sock is None
    assert any("launch zygote: " in text for text in logged), logged


def test_a_plan_that_is_not_plain_data_is_refused_before_any_spare_is_used(loop):
    side = zyg.Zygote(loop, log=lambda text: None)
    fake = FakeZygote(side)
    fake.send_spare()

    async def go():
        await asyncio.sleep(0.01)
        with pytest.raises(zyg.ZygoteGone, match="not plain data"):
            await side.hand_over("l-4", RunOptions(), [], None, "/state", {"network": None, "x": object()}, {})
        assert len(side.spares) == 1

    loop.run_until_complete(go())
