"""The supervisor side of a daemon launch: runs in a fork of the daemon.

The daemon forks (no interpreter start-up), and the fork becomes the skill's
supervisor through `agent.launch.supervisor` exactly as `skillguard run`
does. It outlives the daemon: it is in its own session, holds no daemon fd,
and reports to the daemon through `Link`, a unix stream connection to
<state_root>/run/supervisors.sock that it re-opens after a daemon restart.
Messages are JSON lines; while no daemon listens they wait in a bounded
buffer and what overflows is counted and reported as `lost` later.

When the skill has ended, the result is sent and also written to
<state_root>/run/<id>.exit, so a daemon that was down at that moment still
learns the exit code.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from typing import Optional

BUFFER_LIMIT = 10_000
RECONNECT_INTERVAL_S = 0.2


def hub_path(state_root: str) -> str:
    return os.path.join(state_root, "run", "supervisors.sock")


def exit_path(state_root: str, launch_id: str) -> str:
    return os.path.join(state_root, "run", f"{launch_id}.exit")


class Link:
    """A supervisor's reporting channel to whichever daemon is running now."""

    def __init__(self, path: str, launch_id: str):
        self.path = path
        self.launch_id = launch_id
        self.sock: Optional[socket.socket] = None
        self.pending: deque[bytes] = deque()
        self.lost = 0
        self._next_try = 0.0

    def send(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(self.pending) >= BUFFER_LIMIT:
            self.pending.popleft()
            self.lost += 1
        self.pending.append(line)
        self.flush()

    def flush(self) -> None:
        if self.sock is None and not self._connect():
            return
        if self.lost:
            self.pending.appendleft(json.dumps({"type": "lost", "count": self.lost}).encode() + b"\n")
            self.lost = 0
        while self.pending:
            line = self.pending[0]
            try:
                sent = self.sock.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return  # the daemon is behind; keep the rest for the next send
            except OSError:
                self._drop()
                return
            if sent < len(line):
                self.pending[0] = line[sent:]
                return
            self.pending.popleft()

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RECONNECT_INTERVAL_S
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(0.5)
            sock.connect(self.path)
            hello = {"type": "hello", "id": self.launch_id, "pid": os.getpid()}
            sock.sendall(json.dumps(hello).encode() + b"\n")
        except OSError:
            sock.close()
            return False
        self.sock = sock
        return True

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self, deadline_s: float = 1.0) -> None:
        """Try for up to `deadline_s` to hand over what is pending."""
        end = time.monotonic() + deadline_s
        while self.pending and time.monotonic() < end:
            self._next_try = 0.0
            self.flush()
            if self.pending:
                time.sleep(0.02)
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


_CLASS: list = []


def _supervisor_class():
    if _CLASS:
        return _CLASS[0]
    from agent.launch.supervisor import Supervisor

    class DaemonSupervisor(Supervisor):
        """`Supervisor` that tells the daemon the skill's pid and cgroup as soon
        as the child exists."""

        on_started = None

        def _supervise(self, pid, *args, **kwargs):
            if self.on_started is not None:
                self.on_started(pid, self.cgroup)
            return super()._supervise(pid, *args, **kwargs)

    _CLASS.append(DaemonSupervisor)
    return DaemonSupervisor


def _cgroup_info(cgroup) -> dict:
    paths = [str(p) for p in ([cgroup.v2_path] if cgroup.v2_path else []) + list(cgroup.v1_paths.values())]
    return {"cgroup_paths": paths, "cgroup_id": cgroup.id}


def write_exit(state_root: str, launch_id: str, result: dict) -> None:
    """The exit record, for a daemon that restarted meanwhile. Atomic (a
    reader sees all of it or nothing) but not fsynced: it must outlive the
    daemon, which the page cache does; after a host crash the skill is gone
    and so is what the record would say."""
    path = exit_path(state_root, launch_id)
    tmp = path + ".tmp"
    data = json.dumps(result).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)  # one write of a few hundred bytes to a regular file: all of it
    finally:
        os.close(fd)
    os.rename(tmp, path)


def detach() -> None:
    """What a forked supervisor does first, whatever it will launch (a spare
    of the zygote does it before its launch arrives)."""
    import gc
    import signal

    # Nothing the forking process owns may be released here: an object
    # finalised in this fork could close an fd number that now means something
    # else. Every object the fork inherited, garbage included, moves to the
    # permanent generation and is never collected here. (No gc.collect()
    # first: on the daemon's heap it took ~23 ms per launch, and would run
    # finalisers.)
    gc.freeze()
    os.setsid()
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def supervise(launch_id: str, policy, options, stdio: list, cwd: Optional[str], state_root: str,
              plan: Optional[dict] = None, userns: Optional[dict] = None, detached: bool = False,
              prestarted=None) -> int:
    """Body of the forked supervisor: set up the process, run the skill, report.
    Returns the exit code for os._exit (the caller never returns to the daemon).
    `detached`: detach() was done already. `prestarted`: the spare's init
    (supervisor.PrestartedInit), used when it is still waiting."""
    if not detached:
        detach()
    null = os.open("/dev/null", os.O_RDWR)
    targets = [fd if fd is not None else null for fd in (list(stdio) + [None] * 3)[:3]]
    # dup above 2 first, so dup2 onto 0..2 never overwrites a source still needed.
    staged = [os.dup(fd) for fd in targets]
    for number, fd in enumerate(staged):
        os.dup2(fd, number)  # inheritable: the skill gets the caller's stdio
    if prestarted is not None and not prestarted.alive():
        prestarted.discard()  # ended before its launch: start one the usual way
        prestarted = None
    keep = {0, 1, 2} | set((userns or {}).values()) | set(prestarted.fds() if prestarted else ())
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    link = Link(hub_path(state_root), launch_id)
    result: dict = {"type": "exit", "id": launch_id}
    code = 125
    try:
        if cwd:
            try:
                os.chdir(cwd)
            except OSError:
                pass  # the supervisor then picks HOME, as `run` does for an ungranted cwd
        from agent.launch.supervisor import LaunchError

        cls = _supervisor_class()
        supervisor = cls(policy, options,
                         lambda v: link.send({"type": "violation", "violation": _violation_dict(v)}),
                         lambda text: link.send({"type": "note", "text": text}), plan, userns)
        supervisor.prestarted = prestarted
        supervisor.on_started = lambda pid, cgroup: link.send(
            {"type": "started", "pid": pid, **_cgroup_info(cgroup)})
        try:
            outcome = supervisor.run()
            code = outcome.exit_code
            result.update(exit_code=code, wait_status=outcome.wait_status)
        except LaunchError as exc:
            code = 127 if exc.layer == "exec" else 125
            result.update(exit_code=code, error={"layer": exc.layer, "reason": exc.reason})
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        import traceback

        result.update(exit_code=125, error={"layer": "launch", "reason": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()[-4000:]})
    try:
        write_exit(state_root, launch_id, result)
    except OSError:
        pass
    link.send(result)
    link.finish()
    return code


def _violation_dict(violation) -> dict:
    return violation.fields()
