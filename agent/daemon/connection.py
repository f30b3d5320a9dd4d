"""One API client connection, driven by the event loop (add_reader/add_writer).

Raw non-blocking socket rather than asyncio streams, because `launch` takes
the caller's stdio as SCM_RIGHTS ancillary data, which streams cannot read.

Bounds, so one client can neither crash the daemon nor hold it up:
- a request line over `request_max_bytes` -> error, connection closed;
- a request that has begun must end within `request_timeout_s` -> error, closed;
- requests are handled one at a time per connection, in order; at most
  MAX_QUEUED wait, beyond that the daemon stops reading (backpressure);
- replies wait in an output buffer; a client that stops reading until it
  passes OUTPUT_LIMIT is disconnected; `events` notifications are only moved
  from the subscriber's bounded queue while the buffer is small, so a slow
  subscriber loses events (counted) instead of growing the daemon;
- at most MAX_FDS descriptors per message; unused ones are closed after each
  request.

Each request carries the process that wrote it (auth.py): every read returns
SCM_CREDENTIALS and SCM_PIDFD of its bytes' one sender, and a line is
attributed to the sender of all its reads, or to MIXED when two senders
wrote parts of it. A read's pidfd stays open while a request it completed
waits to be handled (at most MAX_QUEUED per connection), and is closed after.
"""
from __future__ import annotations

import array
import asyncio
import os
import socket
import time
from collections import deque
from typing import Optional

from agent.daemon import auth, protocol

MAX_FDS = 3
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: `&` on the IntFlag member costs an enum call per read
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_SCM_CREDENTIALS = auth.SCM_CREDENTIALS
_SCM_PIDFD = auth.SCM_PIDFD
# The kernel puts credentials, then the pidfd, then the descriptors (scm_recv()).
_ANCILLARY_SPACE = (socket.CMSG_SPACE(auth.UCRED_SIZE) + socket.CMSG_SPACE(4)
                    + socket.CMSG_SPACE(MAX_FDS * 4))
MIXED = auth.MIXED
MAX_QUEUED = 32
OUTPUT_LIMIT = 8 << 20
STREAM_HIGH_WATER = 256 << 10


class Connection:
    def __init__(self, daemon, sock: socket.socket, peer):
        self.daemon = daemon
        self.loop: asyncio.AbstractEventLoop = daemon.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.buffer = protocol.LineBuffer(daemon.config.request_max_bytes)
        self.requests: deque = deque()  # (line, fds, sender)
        self.fds: list[int] = []  # received and not yet attached to a request
        self.partial_sender = None  # who wrote the line begun in self.buffer (a Peer or MIXED)
        self.pidfd_users: dict[int, int] = {}  # a sender's pidfd -> queued or running requests of it
        self.sender = None  # of the request being handled: a Peer, or MIXED (methods read it)
        self.out = bytearray()
        self.busy = False
        self.reading = True
        self.read_closed = False
        self.closing = False  # close once the output buffer is written
        self.closed = False
        self.subscriber = None
        now = time.monotonic()
        self.last_activity = now
        self.partial_since: Optional[float] = None
        self.out_since: Optional[float] = None
        self.loop.add_reader(self.fd, self._on_readable)

    # -- reading --

    def _on_readable(self) -> None:
        try:
            # Close-on-exec, so nothing the daemon forks and execs (a
            # supervisor's init) inherits another caller's fds or pidfd.
            data, ancdata, flags, _ = self.sock.recvmsg(65536, _ANCILLARY_SPACE, _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        received = []
        credentials = None
        pidfd = None
        for _level, kind, payload in ancdata:  # all SOL_SOCKET on a unix socket
            if kind == _SCM_CREDENTIALS:
                credentials = payload
            elif kind == _SCM_PIDFD:
                pidfd = int.from_bytes(payload[:4], "little", signed=True)
            elif kind == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                received.extend(fds)
        if credentials is not None and len(credentials) >= auth.UCRED_SIZE:
            pid, uid, gid = auth.unpack_ucred(credentials[:auth.UCRED_SIZE])
            sender = auth.Peer(pid, uid, gid, (), pidfd)
        else:
            sender = auth.UNKNOWN_SENDER
            if pidfd is not None:
                os.close(pidfd)
                pidfd = None
        if flags & _MSG_CTRUNC:
            for fd in received:
                os.close(fd)
            if pidfd is not None:
                os.close(pidfd)
            self.fail(protocol.RpcError(protocol.INVALID_REQUEST,
                                        f"at most {MAX_FDS} file descriptors per message"))
            return
        self.fds.extend(received)
        if not data:
            if pidfd is not None:
                os.close(pidfd)
            # EOF: the client half-closed or went away. Answer what it sent, then close.
            self.read_closed = True
            self._stop_reading()
            if self.buffer.pending:
                self.fail(protocol.RpcError(protocol.INVALID_REQUEST,
                                            "connection closed in the middle of a request line"))
                return
            self._maybe_finish()
            return
        self.last_activity = time.monotonic()
        continued = self.partial_sender if self.buffer.pending else None
        lines, error = self.buffer.feed(data)
        users = 0
        first = True
        for line in lines:
            if line.strip():
                fds, self.fds = self.fds, []
                if first and continued is not None and (
                        continued is MIXED or not continued.same_sender(sender)):
                    self.requests.append((line, fds, MIXED))
                else:
                    users += 1
                    self.requests.append((line, fds, sender))
            first = False
        if self.buffer.pending:
            if lines or continued is None:
                self.partial_sender = sender
            elif continued is not MIXED and not continued.same_sender(sender):
                self.partial_sender = MIXED
        else:
            self.partial_sender = None
        if pidfd is not None:
            if users:
                self.pidfd_users[pidfd] = users
            else:
                os.close(pidfd)  # a later read that ends the line brings its own
        if error is not None:
            self.requests.append((None, error, None))
            self._stop_reading()
            self.read_closed = True
        self.partial_since = (self.partial_since or time.monotonic()) if self.buffer.pending else None
        if len(self.requests) >= MAX_QUEUED:
            self._stop_reading()
        self._pump()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _resume_reading(self) -> None:
        if not self.reading and not self.read_closed and not self.closed:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    # -- requests --

    def _pump(self) -> None:
        if self.busy or self.closed:
            return
        if not self.requests:
            self._maybe_finish()
            return
        line, extra, sender = self.requests.popleft()
        if line is None:  # a framing error: answer it and close
            self.fail(extra)
            return
        self.busy = True
        self.sender = sender
        self.loop.create_task(self._handle(line, extra, sender))

    async def _handle(self, line: bytes, fds: list[int], sender) -> None:
        try:
            reply = await self.daemon.dispatch(self, line, fds, sender)
        finally:
            for fd in fds:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._release(sender)
            self.sender = None
            self.busy = False
        if self.closed:
            return
        if reply:
            self.write(reply)
        if len(self.requests) < MAX_QUEUED // 2:
            self._resume_reading()
        self._pump()

    def _release(self, sender) -> None:
        pidfd = None if sender is MIXED else sender.pidfd
        if pidfd is None:
            return
        left = self.pidfd_users.get(pidfd, 0) - 1
        if left > 0:
            self.pidfd_users[pidfd] = left
        else:
            self.pidfd_users.pop(pidfd, None)
            try:
                os.close(pidfd)
            except OSError:
                pass

    def _maybe_finish(self) -> None:
        if self.read_closed and not self.busy and not self.requests and self.subscriber is None:
            self.closing = True
            if not self.out:
                self.close()

    def fail(self, error: protocol.RpcError) -> None:
        """Answer a framing error and close the connection once it is written."""
        self.daemon.count_request("_framing", "error")
        self.write(protocol.error_line(None, error))
        self.closing = True
        self.requests.clear()
        self._stop_reading()
        if not self.out:
            self.close()

    # -- writing --

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self.out) + len(data) > OUTPUT_LIMIT:
            self.close()  # the client does not read its replies
            return
        if not self.out:
            try:
                sent = self.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                if self.closing:
                    self.close()
                return
            data = data[sent:]
            self.out_since = time.monotonic()
            self.loop.add_writer(self.fd, self._on_writable)
        self.out += data

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.out[:sent]
        if self.out:
            return
        self.out_since = None
        self.loop.remove_writer(self.fd)
        if self.closing:
            self.close()
            return
        self.drain_events()

    # -- events stream --

    def drain_events(self) -> None:
        subscriber = self.subscriber
        if subscriber is None or self.closed:
            return
        while subscriber.queue and len(self.out) < STREAM_HIGH_WATER:
            line = subscriber.queue.popleft()
            if subscriber.lost:
                # Tell the subscriber how many it missed just before this one.
                import json

                record = json.loads(line)
                record["lost_before"] = subscriber.lost
                subscriber.lost = 0
                params = record
            else:
                params = None
            if params is None:
                self.write(b'{"jsonrpc":"2.0","method":"event","params":' + line.rstrip(b"\n") + b"}\n")
            else:
                self.write(protocol.notification_line("event", params))
            if self.closed:
                return

    # -- lifecycle --

    def idle_for(self, now: float) -> float:
        if self.busy or self.requests or self.subscriber is not None or self.out:
            return 0.0
        return now - self.last_activity

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        if self.subscriber is not None:
            self.daemon.pipeline.unsubscribe(self.subscriber)
            self.subscriber = None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        for _line, extra, _sender in self.requests:
            if isinstance(extra, list):
                for fd in extra:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self.requests.clear()
        # The queued requests' pidfds; the running request's is closed by
        # _release() when it ends.
        running = None if self.sender is None or self.sender is MIXED else self.sender.pidfd
        for pidfd in list(self.pidfd_users):
            if pidfd == running:
                self.pidfd_users[pidfd] = 1
                continue
            del self.pidfd_users[pidfd]
            try:
                os.close(pidfd)
            except OSError:
                pass
        self.sock.close()
        self.daemon.forget(self)
