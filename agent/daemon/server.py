"""`skillguard daemon`: one asyncio event loop that owns every fd.

The API socket, client connections, the supervisors' hub, supervisor pidfds,
the eBPF hooks' event fds, the cgroup watch (inotify) and the /metrics HTTP
listener are all served from this loop; nothing blocks it for long and there
is no thread (so forking a supervisor is safe).

Start-up order: host config -> lock the state root -> policies -> registry
and re-adoption of every live skill -> supervisors' hub -> API socket ->
/metrics -> READY=1 to systemd. Supervisors of launched skills keep
enforcing while the daemon is down; registered skills stay confined by the
pinned eBPF programs (agent/attach).
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from typing import Optional

from agent.config import HostConfig
from agent.daemon import auth, methods, protocol, sdnotify
from agent.daemon.connection import Connection
from agent.daemon.skills import Skill
from agent.enforce.cgroup import ROOT_NAME

SWEEP_INTERVAL_S = 0.1
SWEEP_BATCH = 10  # registered skills looked at per tick: 100/s, in slices that never stall a request


class DaemonError(RuntimeError):
    pass


class Daemon:
    def __init__(self, config: HostConfig, *, log_stream=None):
        from agent import __version__
        from agent.daemon.metrics import Metrics

        self.config = config
        self.version = __version__
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.metrics = Metrics(config.metrics_skill_labels, __version__)
        self.skills: dict[str, Skill] = {}
        self.finished: dict[str, Skill] = {}  # ended launches kept for `wait`, oldest first
        self.connections: set[Connection] = set()
        self.started_at = time.time()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopping: Optional[asyncio.Event] = None
        self.listener: Optional[socket.socket] = None
        self.sender_pidfds = False  # SO_PASSPIDFD on the listener (Linux 6.5)
        self.group_gid: Optional[int] = None
        self.registry_problems: list = []
        self.attacher = None
        self.cgroup_watch = None
        self.metrics_server = None
        self.hub = None
        self.zygote = None  # agent/daemon/zygote.py: forks the supervisors of launches
        self._lock_fd: Optional[int] = None
        self._timers: list = []
        self.last_reload: dict = {}
        self._sweep_order: deque = deque()  # ids of registered skills the backstop has yet to look at
        self.pid_owner: dict[int, Skill] = {}  # registered pids and launched supervisors/inits
        self._request_counters: dict = {}  # (method, outcome) -> its api_requests child

    # ------------------------------------------------------------------ logging

    def log(self, text: str) -> None:
        try:
            self.log_stream.write(f"skillguard: {text}\n")
            self.log_stream.flush()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ start

    def _remove_stale_spare_cgroups(self) -> None:
        """The neutral cgroups of spares SIGKILLed before their launch
        (agent/daemon/zygote.py); a live spare's are left alone."""
        from agent.enforce.cgroup import NEUTRAL_GROUP, remove_stale_instances
        from agent.enforce.cgroupfs import cgroup_mounts

        try:
            for path in remove_stale_instances(None, "run-", cgroup_mounts(), group=NEUTRAL_GROUP):
                self.log(f"cgroup: removed {path}, left by a launch spare that was killed")
        except OSError as exc:
            self.log(f"cgroup: looking for stale spare cgroups: {exc}")

    async def start(self) -> None:
        from agent.daemon.attacher import Attacher
        from agent.daemon.cgroupwatch import CgroupWatch
        from agent.daemon.launcher import SupervisorHub
        from agent.daemon.pipeline import Pipeline
        from agent.daemon.policies import PolicyStore
        from agent.daemon.registry import Registry

        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        config = self.config
        try:
            self.group_gid = auth.group_id(config.socket_group)
        except KeyError:
            raise DaemonError(f"socket_group: no group named {config.socket_group!r}") from None
        from agent.daemon.launcher import preload_launch_modules
        from agent.daemon.zygote import Zygote

        os.makedirs(config.state_root, mode=0o755, exist_ok=True)
        self._lock_state_root()
        self._remove_stale_spare_cgroups()
        self.zygote = Zygote(self.loop, self.log)
        if self.zygote.enabled():
            self.zygote.start()  # it loads the launcher while this process does the same
        preload_launch_modules()
        log_fd = 1
        if config.log_path:
            try:
                log_fd = os.open(config.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise DaemonError(f"log_path: {config.log_path}: {exc.strerror}") from None
        self.pipeline = Pipeline(self.metrics, log_fd=log_fd, rate_limit=config.event_rate_limit,
                                 schedule=self.loop.call_soon)
        self.policies = PolicyStore(config.policy_dir)
        self.reload_policies(initial=True)
        self.registry = Registry(config.state_root)
        self.attacher = Attacher(self)
        self.cgroup_watch = CgroupWatch(self.loop, self.on_cgroup_maybe_empty)
        self.metrics.set_network_source(self._network_counts)
        self.metrics.skills_registered.set_function(lambda: self._kind_counts()["registered"])
        for kind in ("registered", "launched"):
            self.metrics.skills_running.labels(kind).set_function(
                lambda kind=kind: self._kind_counts()[kind])
        self.hub = SupervisorHub(self, config.state_root)
        await self.hub.start()
        self.readopt()
        self._bind_api_socket()
        if config.metrics_address:
            from agent.daemon.http import MetricsServer

            self.metrics_server = MetricsServer(self)
            await self.metrics_server.start(config.metrics_address)
        for signum, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                                (signal.SIGHUP, self._on_sighup)):
            self.loop.add_signal_handler(signum, handler)
        self._schedule_sweep()
        interval = sdnotify.watchdog_interval()
        if interval:
            self._schedule_watchdog(interval)
        self.log(f"daemon {self.version} ready: socket {config.socket_path}, metrics "
                 f"{config.metrics_address or 'off'}, policies {len(self.policies.by_name)} from "
                 f"{config.policy_dir}, {len(self.skills)} skill(s) adopted, state {config.state_root}")
        if self.log_stream.isatty():
            self.log(f"try (as root, from another shell; SKILLGUARD_SOCKET={config.socket_path} "
                     "if not the config's):\n"
                     "  skillguard status\n"
                     "  skillguard run --manifest M.yaml -- CMD ARGS   # launched through the daemon\n"
                     "  skillguard register --manifest M.yaml --pid PID   # confine a running process\n"
                     "  skillguard ps; skillguard events; "
                     f"curl -s http://{config.metrics_address or '(metrics off)'}/metrics")
        # What start-up made (modules, policies, hooks) lives as long as the
        # daemon: keep it out of the cyclic collector's full passes, which
        # otherwise walk it all every so often in the middle of a request.
        import gc

        gc.freeze()
        sdnotify.notify(f"READY=1\nSTATUS=serving {config.socket_path}\nMAINPID={os.getpid()}")

    def _lock_state_root(self) -> None:
        path = os.path.join(self.config.state_root, "daemon.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"another skillguard daemon holds {path}") from None
        self._lock_fd = fd

    def _bind_api_socket(self) -> None:
        path = self.config.socket_path
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(path)
                raise DaemonError(f"{path}: another daemon is answering on this socket")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale, from a daemon that did not exit cleanly
            except OSError as exc:
                if isinstance(exc, DaemonError):
                    raise
                os.unlink(path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.socket_mode)
        if self.group_gid is not None:
            os.chown(path, 0, self.group_gid)
        # Every request is authorised by the process that wrote it (auth.py).
        self.sender_pidfds = auth.enable_sender_credentials(sock)
        if not self.sender_pidfds:
            self.log("no SO_PASSPIDFD (Linux < 6.5): a request's sender is known by pid only; "
                     "a sender that exits before its request is handled may be mistaken for the pid's next owner")
        sock.listen(128)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)

    # ------------------------------------------------------------------ run / stop

    async def serve(self) -> None:
        await self.stopping.wait()
        await self.shutdown()

    def stop(self) -> None:
        if self.stopping is not None:
            self.stopping.set()

    async def shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            try:
                os.unlink(self.config.socket_path)
            except OSError:
                pass
        for conn in list(self.connections):
            conn.close()
        for timer in self._timers:
            timer.cancel()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.hub is not None:
            await self.hub.close()
        if self.zygote is not None:
            self.zygote.stop()
        if self.cgroup_watch is not None:
            self.cgroup_watch.close()
        if self.attacher is not None:
            self.attacher.close()
        for skill in self.skills.values():
            if skill.pidfd is not None:
                self.loop.remove_reader(skill.pidfd)
                os.close(skill.pidfd)
                skill.pidfd = None
        self.pipeline.flush()
        self.registry.close()
        self.log("daemon stopped; launched skills keep running under their supervisors")

    def _on_sighup(self) -> None:
        report = self.reload_policies()
        self.log(f"SIGHUP: policies reloaded: {len(report.loaded)} loaded, "
                 f"{len(report.rejected)} rejected")

    # ------------------------------------------------------------------ timers

    def _schedule_sweep(self) -> None:
        self._timers.append(self.loop.call_later(SWEEP_INTERVAL_S, self._sweep))

    def _sweep(self) -> None:
        now = time.monotonic()
        config = self.config
        for conn in list(self.connections):
            if conn.partial_since is not None and now - conn.partial_since > config.request_timeout_s:
                conn.fail(protocol.RpcError(protocol.REQUEST_TIMEOUT,
                                            f"request not completed within {config.request_timeout_s:g}s"))
            elif conn.out_since is not None and now - conn.out_since > max(config.request_timeout_s, 30.0) \
                    and conn.subscriber is None:
                conn.close()  # not reading its replies
            elif config.idle_timeout_s and conn.idle_for(now) > config.idle_timeout_s:
                conn.close()
        # inotify on cgroup.events reports an emptied cgroup at once; this
        # backstop looks at a slice of the registered skills per tick, so the
        # loop never stalls on thousands of cgroup.procs reads (nor on a walk
        # of every skill: the ids are listed once per pass).
        order = self._sweep_order
        if not order:
            order.extend(s.id for s in self.skills.values() if s.kind == "registered")
        for _ in range(min(SWEEP_BATCH, len(order))):
            skill = self.skills.get(order.popleft())
            if skill is not None and skill.live and not self.attacher.alive(skill):
                self.end_registered(skill, "every process exited")
        # Only timers still to run (a handle that has run is not `cancelled()`).
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > self.loop.time()]
        self._schedule_sweep()

    def _schedule_watchdog(self, interval: float) -> None:
        def beat():
            sdnotify.notify("WATCHDOG=1")
            self._timers.append(self.loop.call_later(interval, beat))

        beat()

    # ------------------------------------------------------------------ API connections

    def _on_accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log(f"accept: {exc.strerror}")
                return
            sock.setblocking(False)
            if len(self.connections) >= self.config.max_clients:
                try:
                    sock.send(protocol.error_line(None, protocol.RpcError(
                        protocol.BUSY, f"too many clients (max_clients {self.config.max_clients})")),
                        socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                except OSError:
                    pass
                sock.close()
                self.count_request("_connect", "busy")
                continue
            try:
                peer = auth.peer_of(sock)
            except OSError:
                sock.close()
                continue
            self.connections.add(Connection(self, sock, peer))
            self.metrics.api_clients.set(len(self.connections))

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        auth.close_peer(conn.peer)
        self.metrics.api_clients.set(len(self.connections))

    def count_request(self, method: str, outcome: str) -> None:
        # The labelled child is looked up once (labels() takes a lock and
        # builds a key each time); callers' method names are bounded here.
        child = self._request_counters.get((method, outcome))
        if child is None:
            child = self.metrics.api_requests.labels(self.metrics.method_label(method), outcome)
            if len(self._request_counters) < 256:
                self._request_counters[(method, outcome)] = child
        child.inc()

    async def dispatch(self, conn: Connection, line: bytes, fds: list, sender) -> Optional[bytes]:
        """Answer one request line; `sender` is the process that wrote it
        (auth.Peer from SCM_CREDENTIALS) or auth.MIXED."""
        try:
            request = protocol.parse_request(line)
        except protocol.RpcError as exc:
            self.count_request("_invalid", "error")
            return protocol.error_line(protocol.request_id_of(exc), exc)
        if sender is auth.MIXED:
            self.metrics.api_refused.labels(self.metrics.method_label(request.method), "mixed_senders").inc()
            self.count_request(request.method, "unauthorized")
            self.log(f"refused {request.method} on the connection of {conn.peer.describe()}: {auth.MIXED_SENDERS}")
            return protocol.error_line(request.id, protocol.RpcError(protocol.UNAUTHORIZED, auth.MIXED_SENDERS))
        handler = methods.HANDLERS.get(request.method)
        if handler is None:
            self.count_request(request.method, "error")
            error = protocol.RpcError(protocol.METHOD_NOT_FOUND,
                                      f"unknown method {request.method!r} "
                                      f"(one of {', '.join(sorted(methods.HANDLERS))})")
            return None if request.is_notification else protocol.error_line(request.id, error)
        in_skill = None
        if request.method in auth.MUTATING:
            # Every skill cgroup (launched or registered) lies below one of these levels.
            in_skill = auth.peer_skill_cgroup(sender, (ROOT_NAME, self.config.cgroup_subtree))
        if auth.needs_groups(sender, self.group_gid):
            sender = auth.with_groups(sender)
        refusal = auth.decide(request.method, sender, self.group_gid, in_skill)
        if refusal is not None:
            reason = "skill_cgroup" if in_skill is not None else "not_permitted"
            self.metrics.api_refused.labels(self.metrics.method_label(request.method), reason).inc()
            self.count_request(request.method, "unauthorized")
            self.log(f"refused {request.method} on the connection of {conn.peer.describe()}: {refusal}")
            return protocol.error_line(request.id, protocol.RpcError(protocol.UNAUTHORIZED, refusal))
        try:
            result = await handler(self, conn, request.params, fds)
        except protocol.RpcError as exc:
            self.count_request(request.method, "error")
            return None if request.is_notification else protocol.error_line(request.id, exc)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the daemon down
            self.count_request(request.method, "error")
            self.log(f"internal error in {request.method}: {type(exc).__name__}: {exc}\n"
                     f"{traceback.format_exc()}")
            return None if request.is_notification else protocol.error_line(
                request.id, protocol.RpcError(protocol.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
        self.count_request(request.method, "ok")
        return None if request.is_notification else protocol.result_line(request.id, result)

    # ------------------------------------------------------------------ policies

    def reload_policies(self, initial: bool = False):
        report = self.policies.reload()
        if report.rejected:
            self.metrics.policy_errors.inc(len(report.rejected))
            for path, problems in report.rejected.items():
                kept = " (previous version kept)" if any(
                    e.path == path for e in self.policies.by_name.values()) else ""
                self.log(f"policy rejected{kept}: " + "; ".join(problems))
        for name in self.policies.by_name:
            self.metrics.skills.admit(name)
        self.metrics.policies_loaded.set(len(self.policies.by_name))
        self.last_reload = {"time": time.time(), **report.to_dict()}
        return report

    # ------------------------------------------------------------------ skills

    def add_skill(self, skill: Skill) -> None:
        self.skills[skill.id] = skill
        self.own_pids(skill)
        self.metrics.skills.admit(skill.name)
        self.persist(skill)
        self.update_gauges()

    def add_skills(self, skills: list) -> None:
        """add_skill() of several, their records in one journal write made
        first: if it fails, none of them is added."""
        self.registry.save_many([(skill.id, skill.to_record()) for skill in skills])
        for skill in skills:
            self.skills[skill.id] = skill
            self.own_pids(skill)
            self.metrics.skills.admit(skill.name)
        self.update_gauges()

    def persist(self, skill: Skill) -> None:
        self.registry.save(skill.id, skill.to_record())

    def update_gauges(self) -> None:
        """Skill gauges are computed at scrape time (see start()); nothing to do per change."""

    def publish(self, violation, skill: Optional[Skill]) -> None:
        if skill is not None:
            skill.violation_count += 1
            skill.violations.append(violation)  # as dicts only when read (inspect, wait)
        self.pipeline.publish(violation, skill.id if skill is not None else None)

    def _kind_counts(self) -> dict:
        counts = {"registered": 0, "launched": 0}
        for skill in self.skills.values():
            counts[skill.kind] += 1
        return counts

    def own_pids(self, skill: Skill) -> None:
        for pid in (*skill.pids, skill.pid, skill.supervisor_pid):
            if pid:
                self.pid_owner[pid] = skill

    def _retire(self, skill: Skill) -> None:
        """Drop a skill that has ended from the live set and from the registry."""
        self.skills.pop(skill.id, None)
        for pid in (*skill.pids, skill.pid, skill.supervisor_pid):
            if pid and self.pid_owner.get(pid) is skill:
                del self.pid_owner[pid]
        try:
            self.registry.remove(skill.id)
        except OSError as exc:
            self.log(f"registry: removing {skill.id}: {exc.strerror}")
        if skill.pidfd is not None:
            self.loop.remove_reader(skill.pidfd)
            os.close(skill.pidfd)
            skill.pidfd = None
        skill.ended_at = time.time()
        self.finished[skill.id] = skill
        while len(self.finished) > 1000:
            self.finished.pop(next(iter(self.finished)))
        for future in skill.waiters + skill.started_waiters:
            if not future.done():
                future.set_result(skill)
        skill.waiters.clear()
        skill.started_waiters.clear()
        self.update_gauges()

    # -- launched skills --

    def watch_supervisor(self, skill: Skill, pidfd: Optional[int] = None) -> bool:
        """Watch the supervisor's pidfd (opened here unless given); False if it is already gone."""
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(skill.supervisor_pid)
            except OSError:
                return False
        skill.pidfd = pidfd
        self.loop.add_reader(pidfd, self._on_supervisor_exit, skill)
        return True

    def _on_supervisor_exit(self, skill: Skill) -> None:
        if skill.pidfd is not None:
            self.loop.remove_reader(skill.pidfd)
        try:
            os.waitpid(skill.supervisor_pid, os.WNOHANG)  # ours unless adopted after a restart
        except ChildProcessError:
            pass
        skill.supervisor_gone = True
        if skill.exit_code is not None:
            self._finish_launch(skill)
        else:
            # Its last message may still be in flight on the hub; the exit file
            # is read if it does not come.
            self.loop.call_later(0.5, self._finish_launch, skill)

    def _finish_launch(self, skill: Skill) -> None:
        from agent.daemon.launcher import read_exit, remove_exit

        if skill.id not in self.skills:
            return  # already finished

        if skill.exit_code is None:
            result = read_exit(self.config.state_root, skill.id)
            if result is not None:
                self._apply_exit(skill, result)
        if skill.exit_code is None:
            skill.error = skill.error or {"layer": "launch", "reason": "the supervisor died without "
                                                                        "reporting an exit status"}
            skill.exit_code = 125
        skill.state = "failed" if skill.error else "exited"
        self._cleanup_launch_cgroups(skill)
        remove_exit(self.config.state_root, skill.id)
        if skill.pidfd is not None and not skill.supervisor_gone:
            # It reported the exit and is finishing: `wait` is answered now,
            # and the process is reaped once it has gone.
            pidfd, skill.pidfd = skill.pidfd, None
            self.loop.remove_reader(pidfd)
            self.loop.add_reader(pidfd, self._reap_supervisor, pidfd, skill.supervisor_pid)
        self._retire(skill)

    def _reap_supervisor(self, pidfd: int, pid: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            os.waitpid(pid, os.WNOHANG)  # ours when the daemon forked it; the zygote reaps its own
        except ChildProcessError:
            pass

    def _apply_exit(self, skill: Skill, message: dict) -> None:
        skill.exit_code = message.get("exit_code")
        skill.wait_status = message.get("wait_status")
        if message.get("error"):
            error = dict(message["error"])
            if "traceback" in error:
                self.log(f"launch {skill.id}: supervisor error:\n{error.pop('traceback')}")
            skill.error = error

    def _cleanup_launch_cgroups(self, skill: Skill) -> None:
        """The supervisor removes its cgroup; if it was killed, do it here (kill first)."""
        from agent.daemon.cgroups import remove_cgroup_paths

        if not any(os.path.isdir(path) for path in skill.cgroup_paths):
            return  # the usual case: removed already (finding the mounts costs ~0.5 ms)
        problems = remove_cgroup_paths(skill.cgroup_paths)
        for problem in problems:
            self.log(f"launch {skill.id}: cleanup: {problem}")

    def on_supervisor_message(self, skill: Skill, message: dict) -> None:
        kind = message.get("type")
        if kind == "violation":
            from agent.events.violation import Violation

            fields = message.get("violation") or {}
            try:
                violation = Violation(**fields)
            except (TypeError, ValueError) as exc:
                self.log(f"launch {skill.id}: bad violation from the supervisor: {exc}")
                self.pipeline.count_lost("malformed", 1)
                return
            self.publish(violation, skill)
        elif kind == "started":
            skill.pid = message.get("pid")
            skill.cgroup_paths = tuple(message.get("cgroup_paths") or ())
            skill.cgroup_id = message.get("cgroup_id")
            self.own_pids(skill)
            if skill.state == "starting":
                skill.state = "running"
            self.persist(skill)
            for future in skill.started_waiters:
                if not future.done():
                    future.set_result(skill)
            skill.started_waiters.clear()
        elif kind == "note":
            skill.notes.append(str(message.get("text", "")))
        elif kind == "lost":
            self.pipeline.count_lost("supervisor_buffer_full", int(message.get("count", 0)))
        elif kind == "exit":
            # Sent after the skill's init was reaped and its cgroups removed:
            # the launch is over, whether or not the supervisor has exited yet.
            self._apply_exit(skill, message)
            self._finish_launch(skill)

    # -- registered skills --

    def on_cgroup_maybe_empty(self, skill_id: str) -> None:
        skill = self.skills.get(skill_id)
        if skill is not None and skill.kind == "registered" and skill.live and not self.attacher.alive(skill):
            self.end_registered(skill, "every process exited")

    def end_registered(self, skill: Skill, why: str) -> None:
        problems = self.attacher.detach(skill)
        for problem in problems:
            self.log(f"skill {skill.id}: detach: {problem}")
        if self.cgroup_watch is not None:
            self.cgroup_watch.unwatch(skill.id)
        skill.state = "exited"
        skill.notes.append(why)
        self._retire(skill)

    def _network_counts(self):
        for skill in list(self.skills.values()):
            if skill.kind == "registered" and skill.live:
                for verdict, count in self.attacher.network_counts(skill).items():
                    yield skill.name, verdict, count

    # ------------------------------------------------------------------ re-adoption

    def readopt(self) -> None:
        from agent.daemon.launcher import read_exit, remove_exit
        from agent.daemon.registry import boot_id

        report = self.registry.load_all()
        for name, why, moved in report.corrupt:
            self.metrics.registry_corrupt.inc()
            self.registry_problems.append({"file": name, "problem": why, "moved_to": moved})
            self.log(f"registry: {name}: {why}; not trusted, moved to {moved}")
        this_boot = boot_id()
        for record in report.records:
            try:
                skill = Skill.from_record(record)
            except (KeyError, TypeError, ValueError) as exc:
                self.metrics.registry_corrupt.inc()
                self.registry_problems.append({"file": f"record {record.get('id')}", "problem": str(exc)})
                continue
            skill.adopted = True
            from agent.manifest import load_text

            loaded = load_text(skill.manifest_text, skill.source)
            skill.policy = loaded.policy if loaded.ok else None
            if skill.kind == "launched":
                alive = (skill.boot_id == this_boot and skill.supervisor_pid
                         and self._adopt_supervisor(skill))
                if alive:
                    skill.state = "running"
                    self.skills[skill.id] = skill
                    self.own_pids(skill)
                    self.metrics.skills.admit(skill.name)
                    self.metrics.readoptions.labels("adopted").inc()
                    continue
                result = read_exit(self.config.state_root, skill.id)
                if result is not None:
                    self._apply_exit(skill, result)
                remove_exit(self.config.state_root, skill.id)
                skill.state = "exited"
                self._cleanup_launch_cgroups(skill)
            else:
                if skill.boot_id == this_boot and skill.policy is not None:
                    problem = self.attacher.readopt(skill)
                    if problem is None:
                        skill.state = "running"
                        self.skills[skill.id] = skill
                        self.own_pids(skill)
                        self.metrics.skills.admit(skill.name)
                        self.metrics.readoptions.labels("adopted").inc()
                        if self.cgroup_watch is not None:
                            self.cgroup_watch.watch(skill.id, skill.cgroup_paths)
                        continue
                    self.log(f"registry: {skill.id} ({skill.name}): not re-adopted: {problem}")
                self.attacher.detach(skill)
                skill.state = "exited"
            self.metrics.readoptions.labels("dropped").inc()
            try:
                self.registry.remove(skill.id)
            except OSError:
                pass
            skill.ended_at = time.time()
            self.finished[skill.id] = skill
        self.update_gauges()

    def _adopt_supervisor(self, skill: Skill) -> bool:
        from agent.daemon.registry import same_process

        # pidfd first, then the start time: the pidfd pins the process the
        # start time was checked against, so a reused pid cannot slip in between.
        if not self.watch_supervisor(skill):
            return False
        if not same_process(skill.supervisor_pid, skill.supervisor_start):
            self.loop.remove_reader(skill.pidfd)
            os.close(skill.pidfd)
            skill.pidfd = None
            return False
        return True


def run_daemon(config: HostConfig) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit status."""
    async def main() -> int:
        daemon = Daemon(config)
        try:
            await daemon.start()
        except (DaemonError, OSError) as exc:
            daemon.log(f"error: {exc}")
            return 1
        await daemon.serve()
        return 0

    return asyncio.run(main())
