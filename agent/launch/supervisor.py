"""`skillguard run`: start a skill under the full local stack and supervise it.

The supervisor compiles everything before it forks (so the child only makes
kernel calls), then stays as the skill's parent: it answers seccomp
notifications, forwards SIGINT/SIGTERM/SIGHUP, enforces the wall-clock
timeout by killing the skill's whole cgroup, turns every refusal it can see
into a `Violation`, and returns the skill's exit status (128+N for a signal).

One launch per supervisor process: it unshares CLONE_NEWPID so that its next
child is PID 1 of a fresh PID namespace, which leaves this process unable to
fork anything else afterwards (fork(2) then fails with ENOMEM once that
namespace's init is gone). A daemon launches through `skillguard run`.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

from agent.enforce.libc import CLONE_NEWPID
from agent.events.violation import Violation
from agent.manifest.model import Policy

SETUP_FAILED = 125
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LaunchError(RuntimeError):
    """A layer the manifest needs could not be set up; the skill did not start."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


@dataclass(frozen=True)
class RunOptions:
    argv: tuple[str, ...] = ()  # empty: the manifest's entrypoint
    audit: bool = False  # --audit: seccomp logs and allows; Landlock skipped
    state_root: Optional[str] = None
    uid_range: Optional[str] = None
    cwd: Optional[str] = None  # default: the caller's cwd if granted, else HOME
    caller_env: Optional[Mapping[str, str]] = None  # default: os.environ
    host_config: Optional[object] = None  # agent.config.HostConfig; default: load_host_config()


@dataclass
class RunResult:
    exit_code: int
    wait_status: Optional[int]  # the skill's raw status from the init; None if unknown
    violations: list
    notes: list


# ------------------------------------------------------------------ planning


def _resolve(command: str, path: str, cwd: str) -> str:
    if "/" in command:
        return os.path.normpath(os.path.join(cwd, command))
    for directory in path.split(":"):
        candidate = os.path.join(directory, command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise LaunchError("exec", f"{command!r} not found in PATH {path}")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _seccomp_for_launch(policy: Policy):
    """The policy's filter with every denial routed to the supervisor.

    The compiler answers the base profile's always_deny set with EPERM in the
    kernel; here those syscalls are left to the default USER_NOTIF action so
    each attempt is reported, and the supervisor answers them EPERM in every
    mode (see `_decide`). If the supervisor is gone the kernel fails them with
    ENOSYS (seccomp_unotify(2)), so they stay denied.
    """
    from agent.compile import seccomp

    base = seccomp.load_base_profile()
    for name in policy.syscalls.allow:
        if name in base.always_deny:
            raise LaunchError("seccomp", f"syscalls.allow: {name!r} is always denied "
                                         "and no manifest can allow it")
    routed = replace(base, always_deny=())
    try:
        # execve/execveat always reach the supervisor: exec supervision (issue 7).
        artifact = seccomp.compile_seccomp(policy, deny_action="notify", profile=routed,
                                           notify=("execve", "execveat"))
    except (ValueError, RuntimeError) as exc:
        raise LaunchError("seccomp", str(exc)) from None
    return artifact, frozenset(base.always_deny)


def _binds(landlock, identity, notes: list) -> tuple:
    from agent.launch.mounts import Bind, idmap_userns

    userns: dict[tuple[int, int], int] = {}
    binds = [Bind(identity.state_dir, True, "state-dir")]
    for rule in landlock.path_rules:
        if not rule.origin.startswith("manifest:"):
            continue
        writable = rule.origin.endswith(":rw")
        try:
            st = os.stat(rule.path)
        except OSError as exc:
            raise LaunchError("mount", f"{rule.origin}: {rule.path}: {exc.strerror}") from None
        fd = None
        if (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
            key = (st.st_uid, st.st_gid)
            if key not in userns:
                userns[key] = idmap_userns(st.st_uid, st.st_gid, identity.uid, identity.gid)
            fd = userns[key]
            notes.append(f"mount: {rule.path} owned by {st.st_uid}:{st.st_gid} is idmapped "
                         f"to the skill's {identity.uid}:{identity.gid}")
        binds.append(Bind(rule.path, writable, rule.origin, fd))
    return tuple(binds)


# ------------------------------------------------------------------ supervisor


class Supervisor:
    def __init__(self, policy: Policy, options: RunOptions, emit: Callable[[Violation], None],
                 note: Callable[[str], None]):
        self.policy = policy
        self.options = options
        self.emit_cb = emit
        self.note_cb = note
        self.audit = options.audit or policy.mode == "audit"
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        # Extra fds served by the supervise loop (DNS stub, ...): fd -> callback(fd, mask).
        self.readers: dict[int, Callable[[int, int], None]] = {}

    def emit(self, **fields) -> None:
        violation = Violation(skill=self.policy.name, **fields)
        self.violations.append(violation)
        self.emit_cb(violation)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.note_cb(text)

    # -- before fork --

    def prepare(self):
        from agent.compile.env import compile_env
        from agent.compile.landlock import READ_WRITE, PathRule, compile_landlock
        from agent.compile.rlimits import compile_limits, compile_rlimits
        from agent.enforce.cgroup import CgroupError, SkillCgroup
        from agent.launch.child import ChildPlan
        from agent.launch.identity import IdentityError, allocate
        from agent.launch.mounts import MountPlan

        policy = self.policy
        self.network = None  # netns.NetworkSpec when the manifest grants network
        self.net = None  # netns.NetnsHandle once attached
        resolv = None
        if policy.network_granted:
            from agent.config import ConfigError, load_host_config
            from agent.launch.identity import state_root
            from agent.launch.netns import NetworkSetupError, plan_network, resolv_conf

            try:
                host = self.options.host_config or load_host_config()
                root = state_root(self.options.state_root)
                self.network = plan_network(policy, host, root)
                resolv = resolv_conf(root)
            except (ConfigError, NetworkSetupError, IdentityError, OSError) as exc:
                raise LaunchError("network", str(exc)) from None
        try:
            identity = allocate(policy.name, root=self.options.state_root,
                                range_=self.options.uid_range)
        except (IdentityError, OSError) as exc:
            raise LaunchError("identity", str(exc)) from None
        caller_env = os.environ if self.options.caller_env is None else self.options.caller_env
        env = compile_env(policy, caller_env, home=identity.state_dir, user=identity.user)
        for name in env.refused:
            self.emit(pid=None, layer="env", operation=f"env {name}", decision="denied",
                      rule="protected variable: changes how code is loaded; never passed")
        env_map = env.as_dict()

        argv = self.options.argv or policy.entrypoint
        if not argv:
            raise LaunchError("exec", "no command given and the manifest has no entrypoint")
        caller_cwd = os.getcwd()
        grants = [g.pattern for g in policy.fs.grants if not g.is_glob]
        cwd = self.options.cwd or next(
            (caller_cwd for g in grants if _within(caller_cwd, g)), identity.state_dir)
        executable = _resolve(argv[0], env_map["PATH"], cwd)
        exec_fd = None
        if policy.entrypoint_sha256:
            # Hash the open file and execute that fd (execveat AT_EMPTY_PATH):
            # a file renamed over the path after this check is never run.
            from agent.package.pin import PinError, open_pinned

            try:
                exec_fd = open_pinned(executable, policy.entrypoint_sha256)
            except PinError as exc:
                raise LaunchError("pin", f"entrypoint_sha256: {exc}") from None

        from agent.cache import key_of, memo
        from agent.compile.landlock import LandlockCompileError, default_base_profile
        from agent.launch.identity import state_root

        cache_root = state_root(self.options.state_root)
        try:
            # The base profile's parse is memoized; the ruleset is not (it
            # looks at the filesystem: globs, which base paths exist).
            base = memo("landlock-base", b"", default_base_profile, root=cache_root)
            landlock = compile_landlock(policy, base=base, state_dir=identity.state_dir,
                                        exec_paths=(executable,))
        except LandlockCompileError as exc:
            raise LaunchError("landlock", str(exc)) from None
        landlock = self._plan_exec(landlock, env_map["PATH"], executable)
        # The private /tmp is a tmpfs mounted by the child; this rule is
        # opened after the mount, so it names that tmpfs, not the host's /tmp.
        landlock = replace(landlock, path_rules=landlock.path_rules
                           + (PathRule("/tmp", READ_WRITE, "private-tmp"),))
        if exec_fd is not None:
            # Grant execute on the pinned inode (the child opens the rule's
            # path, and /proc/self/fd/N leads to the fd's file), not on
            # whatever the path names by then.
            from agent.compile.landlock import EXECUTE_FILE

            landlock = replace(landlock, path_rules=tuple(
                r for r in landlock.path_rules
                if not (r.path == os.path.normpath(executable) and r.origin in ("entrypoint", "exec"))
            ) + (PathRule(f"/proc/self/fd/{exec_fd}", EXECUTE_FILE, "entrypoint-pinned"),))
        if self.network is not None and "connect_tcp" in landlock.handled_net:
            # The skill's nftables table checks address *and* port and reports
            # each refusal (NFLOG); a Landlock port check would refuse first,
            # silently. bind_tcp stays handled: skills never listen.
            landlock = replace(landlock, connect_ports=(),
                               handled_net=tuple(r for r in landlock.handled_net if r != "connect_tcp"),
                               notes=tuple(t for t in landlock.notes if "connect" not in t and "port 53" not in t)
                               + ("net: connect_tcp left to the skill's nftables table (address and port; "
                                  "every refusal is an event)",))
        for text in landlock.notes:
            if not text.startswith("base:"):
                self.note(f"landlock: {text}")
        if self.options.audit:
            self.note("landlock: skipped (--audit on the command line); file access is not confined")
        # Pure in the policy and the base profile: memoized across launches.
        seccomp_artifact, self.always_deny = memo(
            "seccomp-launch", key_of(policy), lambda: _seccomp_for_launch(policy), root=cache_root)
        self.seccomp = seccomp_artifact
        limits = compile_limits(policy.resources)
        try:
            cgroup = SkillCgroup.create(policy.name, f"run-{os.getpid()}", limits)
        except CgroupError as exc:
            raise LaunchError("cgroup", str(exc)) from None
        self.cgroup = cgroup
        try:
            binds = _binds(landlock, identity, self.notes)
        except BaseException:
            cgroup.remove()
            raise
        self.identity = identity
        from agent.enforce.cgroup import safe_name

        return ChildPlan(
            executable=executable,
            argv=tuple(argv),
            env=env_map,
            cwd=cwd,
            uid=identity.uid,
            gid=identity.gid,
            hostname=safe_name(policy.name)[:64],
            cgroup=cgroup,
            mounts=MountPlan(binds, identity.uid, identity.gid, limits.memory_bytes, resolv_conf=resolv),
            wait_for_network=self.network is not None,
            rlimits=compile_rlimits(policy.resources),
            landlock=None if self.options.audit else landlock,
            seccomp_bpf=seccomp_artifact.bpf,
            exec_fd=exec_fd,
        )

    # -- fork and supervise --

    def run(self) -> RunResult:
        plan = self.prepare()
        try:
            return self._run(plan)
        finally:
            if self.net is not None:
                self.net.close()
            try:
                self.cgroup.remove()
            except Exception as exc:  # noqa: BLE001 - report, do not mask the result
                self.note(f"cgroup: cleanup failed: {exc}")
            from agent.launch.mounts import close_userns_fds

            close_userns_fds(plan.mounts.binds)

    def _run(self, plan) -> RunResult:
        from agent.enforce.libc import syscall
        from agent.launch import child

        pids_before = self._counter(self.cgroup.pids_events)
        oom_before = self._counter(lambda: self.cgroup.memory_events().get("oom_kill", 0))
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            syscall("unshare", ctypes.c_int(CLONE_NEWPID))
        except OSError as exc:
            raise LaunchError("namespaces", f"unshare(CLONE_NEWPID): {exc.strerror}") from None
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            os.close(err_r)
            child.run(plan, err_w, child_sock)  # never returns
        child_sock.close()
        os.close(err_w)
        self.pid = pid
        if self.network is not None:
            try:
                self._attach_network(pid, parent_sock)
            except BaseException:
                parent_sock.close()
                os.close(err_r)
                raise
        previous = {s: signal.signal(s, self._forward) for s in FORWARDED}
        try:
            status, started, listener, wait_status = self._supervise(pid, parent_sock, err_r)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            parent_sock.close()
            os.close(err_r)

        if isinstance(started, LaunchError):
            raise started
        self._after_exit(wait_status, pids_before, oom_before)
        if os.WIFSIGNALED(status):
            code = 128 + os.WTERMSIG(status)
        else:
            code = os.waitstatus_to_exitcode(status)
        if started is not True and not isinstance(started, LaunchError) and code == 0:
            code = SETUP_FAILED
        return RunResult(code, wait_status, self.violations, self.notes)

    def _attach_network(self, pid: int, sock: socket.socket) -> None:
        """The child has unshared its network namespace: give it the veth, the
        table, the DNS stub (agent/launch/netns.py), then let it go on."""
        from agent.launch.netns import NetnsHandle

        try:
            ready = sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"netns":
            return  # the child failed before unsharing; _supervise reads why
        handle = NetnsHandle(self.network, self.emit, self.note)
        try:
            handle.attach(pid)
            sock.send(b"go")
        except BaseException as exc:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            handle.close()
            if isinstance(exc, Exception):
                raise LaunchError("network", f"{type(exc).__name__}: {exc}") from None
            raise
        self.net = handle
        self.readers.update(handle.readers())

    @staticmethod
    def _counter(read) -> int:
        try:
            return read()
        except (OSError, KeyError):
            return 0

    def _forward(self, signum, _frame) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def _supervise(self, pid: int, sock: socket.socket, err_r: int):
        """Wait for the listener fd, then serve notifications until the init exits.

        Returns (init wait status, started, listener fd, skill wait status);
        `started` is True once exec happened, a LaunchError when set-up or exec
        failed, else False.
        """
        listener = None
        started: object = False
        skill_status = None
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        except OSError:
            message, fds = b"", []
        if fds:
            listener = fds[0]
            info = json.loads(message or b"{}")
            for text in info.get("landlock_dropped", ()):
                self.note(f"landlock: downgrade: {text}")
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(err_r, select.POLLIN)
        poller.register(sock, select.POLLIN)
        if listener is not None:
            poller.register(listener, select.POLLIN)
        for fd in self.readers:
            poller.register(fd, select.POLLIN)
        timeout_s = self.policy.resources.timeout_s
        deadline = time.monotonic() + timeout_s if timeout_s > 0 and listener is not None else None
        exited = False
        try:
            while not exited:
                wait_ms = None
                if deadline is not None:
                    wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
                events = poller.poll(wait_ms)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    self._timeout(timeout_s)
                    deadline = None
                    continue
                for fd, mask in events:
                    if fd == listener:
                        if mask & select.POLLIN:
                            self._on_notification(listener)
                        elif mask & (select.POLLHUP | select.POLLERR):
                            poller.unregister(listener)
                    elif fd == err_r:
                        data = os.read(err_r, 65536)
                        poller.unregister(err_r)
                        if data:
                            failure = json.loads(data)
                            started = LaunchError(failure.get("layer", "launch"), failure.get("error", "?"))
                        elif listener is not None:
                            started = True
                    elif fd == sock.fileno():
                        try:
                            payload = sock.recv(64)
                        except OSError:
                            payload = b""
                        if len(payload) == 4:
                            skill_status = int.from_bytes(payload, "little", signed=True)
                        else:
                            poller.unregister(sock)
                    elif fd == pidfd:
                        exited = True
                    elif fd in self.readers:
                        self.readers[fd](fd, mask)
            _, status = os.waitpid(pid, 0)
            # A status message sent just before exit may still be queued.
            if skill_status is None:
                try:
                    payload = sock.recv(64, socket.MSG_DONTWAIT)
                    if len(payload) == 4:
                        skill_status = int.from_bytes(payload, "little", signed=True)
                except OSError:
                    pass
            if started is False:
                try:
                    data = os.read(err_r, 65536)
                except OSError:
                    data = b""
                if data:
                    failure = json.loads(data)
                    started = LaunchError(failure.get("layer", "launch"), failure.get("error", "?"))
                elif listener is None:
                    started = LaunchError("launch", "the child exited before confinement "
                                                    f"completed (wait status {status})")
            return status, started, listener, skill_status
        finally:
            os.close(pidfd)
            if listener is not None:
                os.close(listener)

    # -- events --

    def _timeout(self, timeout_s: float) -> None:
        self.emit(pid=self.pid, layer="timeout", operation=f"ran longer than {timeout_s:g}s",
                  decision="killed", rule=f"resources.timeout: {timeout_s:g}s")
        self.cgroup.kill()

    def _on_notification(self, listener: int) -> None:
        from agent.launch import notify

        request = notify.receive(listener)
        if request is None:
            return
        name = notify.syscall_name(request.nr, request.arch)
        if name in ("execve", "execveat") and name not in self.policy.syscalls.deny:
            self._exec_supervisor().handle(listener, request)
            return
        operation, rule = self._describe(name, request.args)
        always = name in self.always_deny
        resume = self.audit and not always
        notify.respond(listener, request.id, error=1, resume=resume)  # 1 = EPERM
        self.emit(pid=request.pid, layer="seccomp", operation=operation,
                  decision="audited" if resume else "denied", rule=rule)

    def _plan_exec(self, landlock, path_env: str, executable: str):
        """Compile the shell allowlist (self.exec_rules) and pin Landlock
        execute rights to the programs it admits plus the entrypoint."""
        from agent.compile.exec_policy import (ExecPolicyError, compile_exec_rules,
                                               execute_pins, pin_execute)

        writable = ["/tmp"] + [rule.path for rule in landlock.path_rules
                               if "write_file" in rule.access or "make_reg" in rule.access]
        try:
            self.exec_rules = compile_exec_rules(self.policy.shell, path_env, writable=writable)
        except ExecPolicyError as exc:
            raise LaunchError("shell", str(exc)) from None
        for text in self.exec_rules.notes:
            self.note(f"shell: {text}")
        if self.audit:
            self.note("shell: audit mode: refused execs are reported and allowed; Landlock "
                      "execute rights are not pinned")
            return landlock
        if self.exec_rules.any_program:
            return landlock
        programs = self.exec_rules.programs
        entry = os.path.realpath(executable)
        pins = execute_pins(programs + (executable,))
        # The entrypoint keeps the rule the launcher made for it (a path, or
        # the pinned fd); here only what the kernel opens to run it is added.
        return pin_execute(landlock, tuple(p for p in pins if p != entry or p in programs))

    def _exec_supervisor(self):
        if getattr(self, "_exec", None) is None:
            from agent.launch.exec_supervisor import ExecSupervisor

            self._exec = ExecSupervisor(
                self.exec_rules, self.pid, audit=self.audit,
                emit=lambda **fields: self.emit(layer="exec", **fields))
        return self._exec

    def _describe(self, name: str, args: Sequence[int]) -> tuple[str, str]:
        from agent.compile.seccomp import AF_INET, AF_INET6, AF_NETLINK, AF_UNIX

        if name in self.always_deny:
            return name, "base profile always_deny: no manifest can allow it"
        if name in self.policy.syscalls.deny:
            return name, "manifest syscalls.deny"
        if name == "socket":
            families = {AF_UNIX: "AF_UNIX", AF_INET: "AF_INET", AF_INET6: "AF_INET6",
                        AF_NETLINK: "AF_NETLINK"}
            family = families.get(args[0] & 0xFFFFFFFF, f"family {args[0] & 0xFFFFFFFF}")
            if family in ("AF_INET", "AF_INET6"):
                return f"socket({family})", "no tcp/http grant in the manifest"
            return f"socket({family})", "socket family not in the base profile"
        if name == "clone":
            return f"clone(flags={args[0]:#x})", "base profile: clone with namespace flags"
        if name in self.seccomp.arg_checked:
            return f"{name}({', '.join(hex(a) for a in args[:3])})", \
                f"base profile: {name} arguments outside the allowed checks"
        return name, "not in the base profile allow list nor syscalls.allow"

    def _after_exit(self, skill_status: Optional[int], pids_before: int, oom_before: int) -> None:
        import signal as _signal

        if skill_status is not None and os.WIFSIGNALED(skill_status) \
                and os.WTERMSIG(skill_status) == _signal.SIGSYS:
            self.emit(pid=None, layer="seccomp", operation="non-x86_64 syscall (i386/x32 ABI)",
                      decision="killed", rule="base profile: only native x86_64 syscalls "
                                               "(other arches and x32 kill the process)")
        refused = self._counter(self.cgroup.pids_events) - pids_before
        if refused > 0:
            self.emit(pid=None, layer="cgroup", operation=f"fork refused {refused} time(s)",
                      decision="denied", rule=f"resources.pids: {self.policy.resources.pids}")
        kills = self._counter(lambda: self.cgroup.memory_events().get("oom_kill", 0)) - oom_before
        if kills > 0:
            self.emit(pid=None, layer="cgroup", operation=f"memory: {kills} process(es) OOM-killed",
                      decision="killed",
                      rule=f"resources.memory: {self.policy.resources.memory_bytes} bytes")


def run(policy: Policy, options: RunOptions, *, emit: Callable[[Violation], None],
        note: Callable[[str], None]) -> RunResult:
    """Launch `policy` (see module doc). Raises LaunchError if it cannot start."""
    return Supervisor(policy, options, emit, note).run()
