"""The launch zygote: a small process that forks the daemon's supervisors.

Forking the daemon itself (~110 MB, libbcc mapped) costs ~2 ms per launch,
and every later process creation on the way to exec (the skill's init, the
skill) copies the same large page tables and pays copy-on-write faults; the
exec and every exit then tear that address space down again. The zygote is a
fresh interpreter (~18 MB) that the daemon starts once: it imports the
launcher and forks *spares*: supervisors made ahead of their launch, already
detached (supervise.detach), each waiting on its own socket. A launch hands
its request straight to a spare; every process on the way to the skill is
then a copy of a small one, and the fork is off the launch's path.
bench/daemon measures both ways side by side.

Protocol (SOCK_SEQPACKET socketpairs, one message per datagram):
- daemon -> zygote: b"now" (a launch waits for a spare: fork one at once),
  b"ahead" (a spare for the next launch: forked once the running launch has
  ended, i.e. a supervisor was reaped, or after SPARE_IDLE_MS without one, so
  the fork does not take a CPU from the launch it follows), b"network" (load
  the network layer's modules, for the spares forked from then on);
- zygote -> daemon: marshal(pid) with [pidfd, socket] as SCM_RIGHTS: a
  new spare, its pidfd (the zygote keeps its own and reaps the spare once it
  has exited; the daemon reads the start time and then checks that its
  pidfd still says "running", so the pid and start time it keeps name this
  process) and the daemon's end of the spare's socket (the zygote keeps
  none);
- daemon -> spare: marshal((launch id, RunOptions fields, cwd, state root,
  plan, number of stdio fds, idmapping user-namespace keys)) with the stdio
  fds and then the user-namespace fds as SCM_RIGHTS. A spare whose socket
  closes before a launch came (the daemon ended) exits.
The zygote exits when the daemon's end closes (a SIGKILLed daemon included).
Supervisors are in their own session and outlive both, as before.

Only launches whose plan the daemon made come here (plain values: marshal);
a launch whose plan cannot be made, or that finds no zygote ready, takes the
daemon's own fork, where the supervisor reports what went wrong.
"""
from __future__ import annotations

import _socket
import marshal
import os
import sys

from agent.fdpass import FD_SIZE, close_all, fds_of, rights

SPARE_IDLE_MS = 50
SPARES = 1  # spares the daemon keeps ready
MAX_MESSAGE = 8 << 20  # bytes; a plan is ~16 KB, larger ones take the daemon's fork
ZYGOTE_ENV = "SKILLGUARD_LAUNCH_ZYGOTE"  # "0": fork supervisors from the daemon (bench/daemon)
PRESTART_ENV = "SKILLGUARD_PRESTART_INIT"  # "0": spares start their init at the launch (bench/daemon)


def _socketpair():
    pair = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    for end in pair:
        end.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, MAX_MESSAGE)
        end.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, MAX_MESSAGE)
    return pair


# ------------------------------------------------------------------ daemon side


class ZygoteGone(RuntimeError):
    """The zygote could not take the launch, and nothing was started: the
    daemon forks the supervisor itself."""


class _Spare:
    """A supervisor forked ahead of its launch, waiting on `sock`."""

    __slots__ = ("pid", "pidfd", "start", "sock")

    def __init__(self, pid, pidfd, start, sock):
        self.pid, self.pidfd, self.start, self.sock = pid, pidfd, start, sock

    def discard(self) -> None:
        self.sock.close()  # a spare whose socket closes exits
        os.close(self.pidfd)


def _exited(pidfd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))  # a pidfd is readable once its process has exited


class Zygote:
    """The daemon's handle on its zygote process and the spares it made."""

    def __init__(self, loop, log):
        from collections import deque

        self.loop = loop
        self.log = log
        self.proc = None
        self.sock = None
        self.spares: deque = deque()
        self.waiters: list = []  # futures of launches waiting for a spare
        self.asked = 0  # spares asked for and not received
        self.ready = False  # a spare has arrived: the zygote works
        self.was_ready = True  # a zygote that never got ready is not started again
        self.network_warm = False

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(ZYGOTE_ENV, "1") != "0"

    def start(self) -> None:
        """Start the process; it imports the launcher while the daemon goes on
        with its own start-up (launches meanwhile fork the daemon), then
        makes the first spare."""
        import subprocess
        import sys

        ours, theirs = _socketpair()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = (f"import sys; sys.path.insert(0, {repo!r}); "
                f"from agent.daemon.zygote import main; main({theirs.fileno()})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", boot], pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            self.log(f"launch zygote: not started ({exc}); launches fork the daemon")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.ready = self.was_ready = self.network_warm = False
        self.asked = 1  # it makes one spare unasked
        self.loop.add_reader(ours.fileno(), self._on_message)

    def usable(self) -> bool:
        """Ready now; starts a new zygote if the last one ended after it was
        ready (that launch still forks the daemon)."""
        if self.ready:
            return True
        if self.sock is None and self.was_ready and self.enabled():
            self.start()
        return False

    async def hand_over(self, launch_id: str, options, stdio: list, cwd, state_root: str, plan: dict,
                        userns: dict, timeout_s: float = 5.0) -> tuple[int, int, int]:
        """Give this launch to a spare: (supervisor pid, its pidfd, its start
        time). Raises ZygoteGone when none took it (nothing was started)."""
        fields = {name: getattr(options, name) for name in options.FIELDS}
        keys = sorted(userns)
        # The witnesses are for the daemon's plan memo; the supervisor has no use for them.
        for_supervisor = {key: value for key, value in plan.items() if key != "witness"}
        try:
            request = marshal.dumps((launch_id, fields, cwd, state_root, for_supervisor, len(stdio), keys))
        except ValueError as exc:
            raise ZygoteGone(f"the plan is not plain data: {exc}") from None
        if len(request) > MAX_MESSAGE // 2:
            raise ZygoteGone(f"a request of {len(request)} bytes")
        if plan.get("network") is not None and not self.network_warm:
            self.network_warm = True
            self._send(b"network")
        passed = rights(list(stdio) + [userns[key] for key in keys])
        for _attempt in range(3):
            spare = await self._take(timeout_s)
            try:
                spare.sock.sendmsg([request], passed)
            except OSError:
                spare.discard()  # it died waiting; the zygote reaps it
                continue
            spare.sock.close()
            return spare.pid, spare.pidfd, spare.start
        raise ZygoteGone("no spare took the launch")

    async def _take(self, timeout_s: float) -> _Spare:
        import asyncio

        if self.spares:
            spare = self.spares.popleft()
        else:
            if self.sock is None:
                raise ZygoteGone("not running")
            future = self.loop.create_future()
            self.waiters.append(future)
            if self.asked == 0:
                self.asked += 1
            self._send(b"now")  # one more, or the one asked ahead, at once
            try:
                spare = await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except asyncio.TimeoutError:
                self.waiters.remove(future)
                self._lost(f"no spare within {timeout_s:g}s")
                raise ZygoteGone("no spare in time") from None
        if len(self.spares) + self.asked < SPARES:
            self.asked += 1
            self._send(b"ahead")
        return spare

    def _send(self, message: bytes) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(message)
        except OSError as exc:
            self._lost(f"send: {exc.strerror}")

    def _on_message(self) -> None:
        from agent.daemon.registry import process_start_time

        while self.sock is not None:
            try:
                message, ancillary, _flags, _addr = self.sock.recvmsg(256, _socket.CMSG_SPACE(2 * FD_SIZE),
                                                                      _socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"receive: {exc.strerror}")
                return
            fds = fds_of(ancillary)
            if not message:
                self._lost("it exited")
                return
            try:
                pid = marshal.loads(message)
            except (ValueError, EOFError, TypeError):
                pid = None
            if not isinstance(pid, int) or len(fds) != 2:
                close_all(fds)
                self._lost("a malformed message")
                return
            spare = _Spare(pid, fds[0], process_start_time(pid), _socket.socket(fileno=fds[1]))
            if spare.start is None or _exited(spare.pidfd):
                spare.discard()  # died at once
                self.asked = max(0, self.asked - 1)
                if self.waiters:  # else the next launch asks for one
                    self.asked += 1
                    self._send(b"now")
                continue
            self.asked = max(0, self.asked - 1)
            self.ready = self.was_ready = True
            while self.waiters:
                future = self.waiters.pop(0)
                if not future.done():
                    future.set_result(spare)
                    break
            else:
                self.spares.append(spare)

    def _lost(self, why: str) -> None:
        if self.sock is None:
            return
        again = "started again at the next launch" if self.ready else "not started again"
        self.log(f"launch zygote: {why}; it is ended and {again}; launches fork the daemon meanwhile")
        for future in self.waiters:
            if not future.done():
                future.set_exception(ZygoteGone(why))
        self.waiters.clear()
        self.stop()

    def stop(self) -> None:
        """Close our ends (the zygote and the spares exit on EOF) and reap the zygote."""
        self.ready = False
        while self.spares:
            self.spares.popleft().discard()
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(1.0)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------ zygote side


class _Factory:
    """The zygote process: forks spares when the daemon asks, reaps them."""

    def __init__(self, sock, launcher, supervise):
        import select

        self.sock = sock
        self.launcher = launcher
        self.supervise = supervise
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.children: dict = {}  # pidfd -> pid of a spare or supervisor not yet reaped
        self.ahead = 0  # spares asked ahead, not yet forked

    def loop(self) -> None:
        self._fork_spare()
        while True:
            events = self.poller.poll(SPARE_IDLE_MS if self.ahead else None)
            reaped = False
            for ready, _mask in events:
                if ready == self.sock.fileno():
                    self._serve()
                else:
                    self._reap(ready)
                    reaped = True
            if self.ahead and (reaped or not events):
                self.ahead -= 1
                self._fork_spare()

    def _serve(self) -> None:
        try:
            message = self.sock.recv(64)
        except InterruptedError:
            return
        if not message:
            os._exit(0)  # the daemon's end closed
        if message == b"now":
            if self.ahead:
                self.ahead -= 1
            self._fork_spare()
        elif message == b"ahead":
            self.ahead += 1
        elif message == b"network" and "agent.launch.netns" not in sys.modules:
            self.launcher.preload_launch_modules((self.launcher.NETWORK_MODULES,))

    def _reap(self, pidfd: int) -> None:
        self.poller.unregister(pidfd)
        pid = self.children.pop(pidfd)
        os.close(pidfd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def _fork_spare(self) -> None:
        import select

        try:
            ours, theirs = _socketpair()
        except OSError:
            return  # the daemon's wait for it times out, and it forks itself
        pid = os.fork()
        if pid == 0:
            code = 125
            try:
                ours.close()
                code = _spare_main(theirs, self.supervise)
            finally:
                os._exit(code)
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            ours.close()  # the spare exits on EOF
            os.waitpid(pid, 0)
            return
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        try:
            self.sock.sendmsg([marshal.dumps(pid)], rights([pidfd, ours.fileno()]))
        except OSError:
            pass
        ours.close()


class _Ended(Exception):
    pass


def _end_spare(_signum, _frame) -> None:
    raise _Ended  # out of the wait for a launch, through the clean-up


def _prestart(sock):
    """The spare's init, started now (supervisor.prestart_init: a neutral
    cgroup, namespaces); None when that failed: the launch then starts its
    init the usual way, which reports the layer that fails."""
    from agent.launch.supervisor import prestart_init

    if os.environ.get(PRESTART_ENV, "1") == "0":
        return None
    try:
        return prestart_init()
    except Exception:  # noqa: BLE001 - see above
        return None


def _spare_main(sock, supervise) -> int:
    """A spare: detach, drop every fd but `sock` and 0..2, start the init,
    wait for the launch, run it. (0..2 stay open so the fds received land
    above them: supervise() puts the skill's stdio there.) A spare that ends
    without a launch (EOF, SIGTERM/SIGINT/SIGHUP) removes its init and
    cgroup; one SIGKILLed leaves `@spare/run-<pid>`, which the next spare and
    the next daemon start remove."""
    supervise.detach()
    keep = (0, 1, 2, sock.fileno())
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass
    # Fault in the allocator's memory while idle, not during the launch: the
    # first objects a fork makes land on pages it shares with the zygote
    # (copy on write). Decoding a plan-shaped value took ~1.3 ms in a fresh
    # spare, ~0.9 ms after this (bench/daemon README).
    shape = marshal.dumps({f"k{i}": [(str(i), i, b"x" * 16, {"a": i})] for i in range(600)})
    for _ in range(3):
        marshal.loads(shape)
    del shape
    import signal

    ending = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in ending:
        signal.signal(signum, _end_spare)
    init = None
    message = b""
    try:
        init = _prestart(sock)
        message, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, _socket.CMSG_SPACE(64 * FD_SIZE))
        for signum in ending:
            signal.signal(signum, signal.SIG_DFL)
    except (OSError, _Ended):
        pass
    finally:
        if not message and init is not None:
            init.discard()
    if not message:
        return 0  # the daemon ended (or we were told to) before a launch came
    fds = fds_of(ancillary)
    sock.close()
    launch_id, fields, cwd, state_root, plan, stdio_count, keys = marshal.loads(message)
    from agent.launch.supervisor import RunOptions

    stdio = fds[:stdio_count]
    userns = {tuple(key): fd for key, fd in zip(keys, fds[stdio_count:])}
    return supervise.supervise(launch_id, None, RunOptions(**fields), stdio, cwd, state_root, plan, userns,
                               detached=True, prestarted=init)


def main(fd: int) -> None:
    """The zygote process. Never returns."""
    import gc
    import signal

    # Ctrl-C of a foreground daemon reaches its whole process group; the
    # daemon ends the zygote by closing the socket. Supervisors reset these.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    from agent.daemon import launcher, supervise

    launcher.preload_launch_modules((launcher.SUPERVISOR_MODULES,))
    supervise._supervisor_class()
    sock = _socket.socket(fileno=fd)
    sock.setblocking(True)
    # Forks copy this heap; keep the collector off what was loaded so far
    # (each fork freezes its own heap again: supervise.detach()).
    gc.collect()
    gc.freeze()
    _Factory(sock, launcher, supervise).loop()
