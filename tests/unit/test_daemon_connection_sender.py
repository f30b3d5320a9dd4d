"""Each request line is attributed to the process that wrote it
(agent/daemon/connection.py), on a real unix socketpair; the daemon behind
the connection is a stand-in that records what it is asked."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from types import SimpleNamespace

import pytest

from agent.daemon import auth
from conftest import require
from agent.daemon.connection import MIXED, Connection


class Recorder:
    """The parts of the daemon a Connection uses."""

    def __init__(self, loop):
        self.loop = loop
        self.config = SimpleNamespace(request_max_bytes=4096)
        self.seen: list[tuple[bytes, object]] = []
        self.open_pidfds: list[bool] = []  # per request: was its sender's pidfd open while handled
        self.forgotten = False

    async def dispatch(self, conn, line, fds, sender):
        self.seen.append((line, sender))
        if sender is not MIXED and sender.pidfd is not None:
            self.open_pidfds.append(_is_open(sender.pidfd))
        await asyncio.sleep(0)
        return b'{"jsonrpc":"2.0","id":null,"result":{}}\n'

    def count_request(self, method, outcome):
        pass

    def forget(self, conn):
        self.forgotten = True


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    loop = asyncio.new_event_loop()
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.setblocking(False)
    pidfds = auth.enable_sender_credentials(server)
    require(pidfds, "no SO_PASSPIDFD (Linux < 6.5)")
    daemon = Recorder(loop)
    conn = Connection(daemon, server, auth.peer_of(server))
    yield SimpleNamespace(loop=loop, client=client, daemon=daemon, conn=conn)
    conn.close()
    client.close()
    loop.close()


def _run_until(loop, predicate, timeout=5.0):
    async def wait():
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            await asyncio.sleep(0.001)

    loop.run_until_complete(wait())


def _write_from_child(sock: socket.socket, data: bytes) -> int:
    """Write `data` on `sock` from a forked child (another sender); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.write(sock.fileno(), data)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_lines_of_one_write_belong_to_its_writer_and_share_one_pidfd(pair):
    before = _open_fds()
    pair.client.sendall(b'{"a":1}\n\n{"b":2}\n')
    _run_until(pair.loop, lambda: len(pair.daemon.seen) == 2)
    (first, s1), (second, s2) = pair.daemon.seen
    assert (first, second) == (b'{"a":1}', b'{"b":2}')
    assert s1.pid == s2.pid == os.getpid() and s1.uid == os.getuid() and s1.gid == os.getgid()
    assert s1.pidfd is not None and s1.pidfd == s2.pidfd
    assert pair.daemon.open_pidfds == [True, True]
    _run_until(pair.loop, lambda: not pair.conn.busy)
    assert pair.conn.pidfd_users == {} and _open_fds() <= before  # closed after the last of them


def test_a_line_split_over_writes_of_one_process_is_its_own(pair):
    before = _open_fds()
    pair.client.sendall(b'{"a":')
    _run_until(pair.loop, lambda: pair.conn.buffer.pending)
    pair.client.sendall(b'1}\n')
    _run_until(pair.loop, lambda: len(pair.daemon.seen) == 1)
    assert pair.daemon.seen[0][0] == b'{"a":1}'
    assert pair.daemon.seen[0][1].pid == os.getpid()
    _run_until(pair.loop, lambda: not pair.conn.busy)
    assert _open_fds() <= before  # the first read's pidfd too


def test_a_line_begun_by_one_process_and_ended_by_another_is_mixed(pair):
    pair.client.sendall(b'{"a":')
    _run_until(pair.loop, lambda: pair.conn.buffer.pending)
    child = _write_from_child(pair.client, b'1}\n{"b":2}\n')
    _run_until(pair.loop, lambda: len(pair.daemon.seen) == 2)
    (first, s1), (second, s2) = pair.daemon.seen
    assert first == b'{"a":1}' and s1 is MIXED
    assert second == b'{"b":2}' and s2.pid == child  # the next line is the child's alone


def test_a_partial_line_of_three_writers_stays_mixed(pair):
    pair.client.sendall(b'{"a"')
    _run_until(pair.loop, lambda: pair.conn.buffer.pending)
    _write_from_child(pair.client, b':')
    _run_until(pair.loop, lambda: pair.conn.buffer.pending == 5)
    pair.client.sendall(b'1}\n')
    _run_until(pair.loop, lambda: len(pair.daemon.seen) == 1)
    assert pair.daemon.seen[0] == (b'{"a":1}', MIXED)


def test_a_writer_that_exited_before_its_line_is_handled_is_refused_mutating_calls(pair):
    verdicts = []
    daemon = pair.daemon

    async def judge(conn, line, fds, sender):
        daemon.seen.append((line, sender))
        verdicts.append(auth.peer_skill_cgroup(sender, "skillguard"))
        return None

    daemon.dispatch = judge
    child = _write_from_child(pair.client, b'{"a":1}\n')  # reaped before the daemon reads
    _run_until(pair.loop, lambda: len(daemon.seen) == 1)
    assert daemon.seen[0][1].pid == child
    assert "exited" in verdicts[0]


def test_queued_requests_pidfds_are_closed_with_the_connection(pair):
    before = _open_fds()
    gate = asyncio.Event()
    daemon = pair.daemon

    async def slow(conn, line, fds, sender):
        daemon.seen.append((line, sender))
        await gate.wait()
        return None

    daemon.dispatch = slow
    pair.client.sendall(b'{"a":1}\n')
    _run_until(pair.loop, lambda: len(daemon.seen) == 1)
    _write_from_child(pair.client, b'{"b":2}\n')
    _run_until(pair.loop, lambda: len(pair.conn.requests) == 1)
    assert len(pair.conn.pidfd_users) == 2
    pair.conn.close()
    assert list(pair.conn.pidfd_users.values()) == [1]  # the running request's, until it ends
    gate.set()
    _run_until(pair.loop, lambda: not pair.conn.busy)
    assert pair.conn.pidfd_users == {}
    assert _open_fds() <= before | {str(pair.client.fileno())}


def _send_with_fds(client, count: int) -> None:
    """One request line with `count` fds of /dev/null (SCM_RIGHTS)."""
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
    try:
        client.sendmsg([b'{"a":1}\n'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         b"".join(fd.to_bytes(4, "little") for fd in fds))])
    finally:
        for fd in fds:
            os.close(fd)


def test_received_fds_and_the_senders_pidfd_are_close_on_exec(pair):
    """A skill the daemon forks and execs must not inherit another caller's
    fds: what recvmsg installs is O_CLOEXEC (MSG_CMSG_CLOEXEC)."""
    seen = []

    async def dispatch(conn, line, fds, sender):
        seen.append(([os.get_inheritable(fd) for fd in fds], os.get_inheritable(sender.pidfd)))
        return b'{"jsonrpc":"2.0","id":null,"result":{}}\n'

    pair.daemon.dispatch = dispatch
    _send_with_fds(pair.client, 2)
    _run_until(pair.loop, lambda: seen)
    assert seen == [([False, False], False)]


def test_too_many_fds_closes_them_and_the_pidfd(pair):
    before = _open_fds()
    _send_with_fds(pair.client, 5)
    _run_until(pair.loop, lambda: pair.conn.closed)
    assert pair.daemon.seen == []
    assert _open_fds() <= before


def test_sender_liveness_and_groups():
    """peer_skill_cgroup() and with_groups() of a sender that has exited:
    refused / no groups, even though its pid was read from the message."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    os.waitpid(pid, 0)
    try:
        gone = auth.Peer(pid, 1000, 1000, (), pidfd)
        assert "exited" in auth.peer_skill_cgroup(gone, "skillguard")
        assert auth.with_groups(gone).groups == ()
        me = auth.Peer(os.getpid(), 1000, 1000, (), os.pidfd_open(os.getpid()))
        try:
            assert auth.peer_skill_cgroup(me, "no-such-root-level") is None
            assert set(auth.with_groups(me).groups) == set(os.getgroups())
        finally:
            os.close(me.pidfd)
    finally:
        os.close(pidfd)
    assert "could not be identified" in auth.peer_skill_cgroup(auth.UNKNOWN_SENDER, "skillguard")


def test_an_unidentified_sender_holds_no_right():
    for method in auth.MUTATING | auth.READ_ONLY:
        assert auth.decide(method, auth.UNKNOWN_SENDER, 4242, None) is not None
    assert not auth.needs_groups(auth.Peer(5, 0, 0), 4242)  # root: no /proc read
    assert not auth.needs_groups(auth.Peer(5, 1000, 4242), 4242)  # primary group
    assert not auth.needs_groups(auth.Peer(5, 1000, 1000), None)  # no socket group
    assert auth.needs_groups(auth.Peer(5, 1000, 1000), 4242)
