"""`skillguard run`: start a skill under the full local stack and supervise it.

The supervisor works from a launch plan (agent/launch/plan.py: everything
compiled, as plain values) so that the child only makes kernel calls, then
stays as the skill's parent: it answers seccomp notifications, forwards
SIGINT/SIGTERM/SIGHUP, enforces the wall-clock timeout by killing the
skill's whole cgroup, turns every refusal it can see into a `Violation`, and
returns the skill's exit status (128+N for a signal).

The launch path imports only what it runs (bench/launch measures it): no
dataclasses, typing, socket, signal or json modules here or in
mounts.py, notify.py and the enforcers they call. The compilers are imported
by plan.build() only when no stored plan fits.

One launch per supervisor process: its child is PID 1 of a new PID namespace
(clone3 with CLONE_NEWPID, and CLONE_INTO_CGROUP to start it in the skill's
v2 cgroup) and executes the skill's init, init/skillguard-init.c, at once:
the steps between fork and exec are system calls on the plan's values, in
C, so that no copy of this interpreter does them. The init runs its first
phase (cgroups, namespaces) while the supervisor prepares the rest, then
gets its plan in one message (agent/launch/init_wire.py). A daemon launches
by forking a supervisor per skill; a spare supervisor
(agent/daemon/zygote.py) starts its init before its launch (`prestart_init`:
a neutral cgroup, the init's first phase), and the launch then writes the
limits and sends the init its plan.
"""
import _signal
import _socket
import posix
import select
import _struct as struct  # the C module `struct` re-exports: one import less
import time

from agent import oslite
from agent.launch.init_wire import encode, sorted_binds

SETUP_FAILED = 125
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
# What the skill's init forwards (skillguard-init.c `forwarded`).
INIT_FORWARDS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT,
                 _signal.SIGUSR1, _signal.SIGUSR2)
SIGKILL, SIGSYS = 9, 31
# Socket families named in events (linux/socket.h).
FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK"}


class LaunchError(RuntimeError):
    """A layer the manifest needs could not be set up; the skill did not start."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


class RunOptions:
    """How to launch: argv (empty: the manifest's entrypoint); audit (--audit:
    seccomp logs and allows, Landlock skipped); state_root; uid_range; cwd
    (default: the caller's cwd if granted, else HOME); caller_env (default:
    os.environ); host_config (agent.config.HostConfig; default: loaded)."""

    FIELDS = ("argv", "audit", "state_root", "uid_range", "cwd", "caller_env", "host_config")
    __slots__ = FIELDS

    def __init__(self, argv=(), audit=False, state_root=None, uid_range=None, cwd=None,
                 caller_env=None, host_config=None):
        self.argv = tuple(argv)
        self.audit = audit
        self.state_root = state_root
        self.uid_range = uid_range
        self.cwd = cwd
        self.caller_env = caller_env
        self.host_config = host_config

    def __repr__(self) -> str:
        return "RunOptions(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS) + ")"


class RunResult:
    __slots__ = ("exit_code", "wait_status", "violations", "notes")

    def __init__(self, exit_code: int, wait_status, violations: list, notes: list):
        self.exit_code = exit_code
        self.wait_status = wait_status  # the skill's raw status from the init; None if unknown
        self.violations = violations
        self.notes = notes

    def __repr__(self) -> str:
        return (f"RunResult(exit_code={self.exit_code}, wait_status={self.wait_status}, "
                f"violations={self.violations!r}, notes={self.notes!r})")


def make_plan(policy, options: RunOptions, caller_cwd: str | None = None) -> dict:
    """plan.build(), with its failures as LaunchError."""
    from agent.launch.plan import PlanError, build

    try:
        return build(policy, options, caller_cwd=caller_cwd)
    except PlanError as exc:
        raise LaunchError(exc.layer, exc.reason) from None


def _recv_fd(sock) -> tuple[bytes, int | None]:
    """One message and the fd passed with it (SCM_RIGHTS), if any."""
    size = struct.calcsize("i")
    message, ancillary, _flags, _addr = sock.recvmsg(4096, _socket.CMSG_SPACE(size))
    fds = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % size
            fds.extend(struct.unpack(f"{usable // size}i", data[:usable]))
    for extra in fds[1:]:
        posix.close(extra)
    return message, (fds[0] if fds else None)


# ------------------------------------------------------------------ supervisor


class PrestartedInit:
    """An init cloned before its launch was known (`prestart_init`): in its
    neutral cgroup, its first phase done (skillguard-init.c), waiting on `sock` for
    its plan."""

    __slots__ = ("pid", "sock", "err_r", "cgroup")

    def __init__(self, pid, sock, err_r, cgroup):
        self.pid, self.sock, self.err_r, self.cgroup = pid, sock, err_r, cgroup

    def fds(self) -> tuple:
        return (self.sock.fileno(), self.err_r)

    def alive(self) -> bool:
        """Still waiting for its plan (its end of the socket is open)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)  # it sends nothing before its plan: readable is EOF

    def discard(self) -> None:
        """Kill and reap the init, remove its cgroup (a spare ending without a launch)."""
        _kill_and_reap(self.pid)
        self.sock.close()
        posix.close(self.err_r)
        self.cgroup.remove()


def prestart_init() -> PrestartedInit:
    """Clone an init into a new cgroup `<root>/@spare/run-<our pid>` (no limits
    yet) and let it run its first phase (skillguard-init.c): what a launch needs done
    whatever its skill. Stale `@spare` cgroups of dead spares are removed
    first. Raises CgroupError / OSError / LaunchError when it cannot."""
    from agent.enforce.cgroup import (NEUTRAL_GROUP, CgroupExists, SkillCgroup,
                                      remove_leftover_instance, remove_stale_instances)
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    remove_stale_instances(None, "run-", mounts, group=NEUTRAL_GROUP)
    instance = f"run-{posix.getpid()}"
    try:
        cgroup = SkillCgroup.create_neutral(instance, mounts)
    except CgroupExists:
        remove_leftover_instance((NEUTRAL_GROUP,), instance, mounts)
        cgroup = SkillCgroup.create_neutral(instance, mounts)
    try:
        launcher, sock, err_r = _start_child(cgroup)
    except BaseException:
        cgroup.remove()
        raise
    try:
        pid = _await_init(launcher, sock, err_r)
    except BaseException:
        sock.close()
        posix.close(err_r)
        cgroup.remove()
        raise
    return PrestartedInit(pid, sock, err_r, cgroup)


# Built by scripts/setup.sh (make setup) from init/skillguard-init.c.
INIT = oslite.join(oslite.REPO_ROOT, "build", "skillguard-init")


def _check_init() -> None:
    """The init is executed as root: it must be root's and writable by nobody
    else, like the agent's own code (its directory too)."""
    for path, kind in ((oslite.dirname(INIT), "directory"), (INIT, "file")):
        try:
            st = posix.stat(path)
        except OSError as exc:
            raise LaunchError("launch", f"{INIT}: {exc.strerror}; build it with "
                                        "`sudo make setup`") from None
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise LaunchError("launch", f"{path}: not a {kind} of root's that only root may "
                                        f"write (uid {st.st_uid}, mode {st.st_mode & 0o7777:o}); "
                                        "refusing to execute the init from it")


def _start_child(cgroup, idmaps=()) -> tuple:
    """Start skillguard-init (posix_spawn: no copy of this process), which
    makes the idmapping user namespaces `idmaps` ([(owner uid, owner gid,
    uid, gid)]) and clones the init into a new PID namespace and `cgroup`
    as our child. Returns (the launcher's pid, our socket, error pipe);
    `_await_init` gives the init's pid."""
    _check_init()
    parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    err_r, err_w = posix.pipe2(posix.O_CLOEXEC)
    cgroup_fd = None
    try:
        cgroup_fd = cgroup.open_v2()
        keep = [child_sock.fileno(), err_w] + ([cgroup_fd] if cgroup_fd is not None else [])
        tasks, procs = cgroup.init_join_files()
        argv = [INIT, str(keep[0]), str(err_w), str(-1 if cgroup_fd is None else cgroup_fd)]
        argv += [f"idmap={a}:{b}:{c}:{d}" for a, b, c, d in idmaps]
        argv += [f"tasks={path}" for path in tasks] + ([f"procs={procs}"] if procs else [])
        # dup2 of an fd onto itself clears its close-on-exec flag
        # (posix_spawn_file_actions_adddup2(3), glibc >= 2.29). The init's
        # forwarded signals start blocked: none sent before its handlers
        # exist is lost (skillguard-init.c).
        launcher = posix.posix_spawn(INIT, argv, {}, setsigmask=INIT_FORWARDS,
                                     file_actions=[(posix.POSIX_SPAWN_DUP2, fd, fd) for fd in keep])
    except OSError as exc:
        parent_sock.close()
        posix.close(err_r)
        raise LaunchError("launch", f"starting {INIT}: {exc.strerror}") from None
    except BaseException:
        parent_sock.close()
        posix.close(err_r)
        raise
    finally:
        child_sock.close()
        posix.close(err_w)
        if cgroup_fd is not None:
            posix.close(cgroup_fd)
    return launcher, parent_sock, err_r


def _await_init(launcher: int, sock, err_r: int) -> int:
    """The init's pid, which the launcher sends before it exits; reaps the
    launcher. Raises LaunchError with the launcher's reason when there is
    no init."""
    try:
        message = sock.recv(16)
    except OSError:
        message = b""
    posix.waitpid(launcher, 0)
    if len(message) == 7 and message.startswith(b"pid"):
        return int.from_bytes(message[3:], "little", signed=True)
    try:
        data = posix.read(err_r, 65536)
    except OSError:
        data = b""
    if data:
        raise LaunchError(*_failure(data))
    raise LaunchError("launch", "skillguard-init exited without starting the init")


class Supervisor:
    """Runs one launch. `policy` may be None when `plan` is given (a stored plan).
    `prestarted`: a PrestartedInit to launch in (set before run())."""

    prestarted = None

    def __init__(self, policy, options: RunOptions, emit, note, plan: dict | None = None,
                 userns: dict | None = None):
        self.policy = policy
        # Idmapping user namespaces made earlier (the daemon keeps them):
        # (owner uid, owner gid) -> fd, for this plan's uid/gid; not closed here.
        self.userns = userns or {}
        self.options = options
        self.emit_cb = emit
        self.note_cb = note
        self.plan = plan
        self.violations: list = []
        self.notes: list[str] = []
        # Extra fds served by the supervise loop (DNS stub, ...): fd -> callback(fd, mask).
        self.readers: dict = {}
        self.cgroup = None
        self.net = None
        self.exec_fd = None

    def emit(self, **fields) -> None:
        from agent.events.violation import Violation

        violation = Violation(skill=self.plan["skill"], **fields)
        self.violations.append(violation)
        self.emit_cb(violation)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.note_cb(text)

    # -- before fork --

    def prepare(self) -> dict:
        """What the init must be started with: the plan (built now unless
        given), the skill's cgroup (clone3 starts the init in it) and the
        idmappings skillguard-init makes. Everything else is done while the
        init starts (`_complete`). Returns the init's part of the plan
        (init_wire.encode)."""
        if self.plan is None:
            self.plan = make_plan(self.policy, self.options)
        plan = self.plan
        self.audit = plan["audit"]
        self.network = None  # netns.NetworkSpec when the manifest grants network
        if plan["network"] is not None:
            import pickle

            self.network = pickle.loads(plan["network"])
        from agent.enforce.cgroup import (CgroupError, CgroupExists, LimitValues, SkillCgroup,
                                          remove_leftover_instance, safe_name)

        # The owners whose binds are idmapped, for skillguard-init to make
        # their user namespaces (a pre-started init's are made here).
        self.idmaps = []
        if self.prestarted is None:
            for *_bind, owner in plan["binds"]:
                if owner is not None and _idmap(owner, plan) not in self.idmaps:
                    self.idmaps.append(_idmap(owner, plan))
        spec = plan["cgroup"]
        self.cgroup_mounts = _CgroupMounts(spec["v2"], spec["v1"])
        try:
            if self.prestarted is not None:
                # Before the init gets its plan: nothing of the skill runs yet.
                self.cgroup = self.prestarted.cgroup
                self.cgroup.apply_limits(LimitValues(*spec["limits"]))
            else:
                instance = f"run-{posix.getpid()}"
                try:
                    self.cgroup = SkillCgroup.create(spec["skill"], instance,
                                                     LimitValues(*spec["limits"]), self.cgroup_mounts)
                except CgroupExists:
                    remove_leftover_instance((safe_name(spec["skill"]),), instance, self.cgroup_mounts)
                    self.cgroup = SkillCgroup.create(spec["skill"], instance,
                                                     LimitValues(*spec["limits"]), self.cgroup_mounts)
        except CgroupError as exc:
            raise LaunchError("cgroup", str(exc)) from None
        return {
            "executable": plan["executable"], "argv": plan["argv"], "cwd": plan["cwd"],
            "uid": plan["uid"], "gid": plan["gid"], "hostname": plan["hostname"],
            "mounts": {"tmp_size": plan["tmp_size"], "resolv_conf": plan["resolv_conf"]},
            "rlimits": plan["rlimits"], "landlock": plan["landlock"],
            "seccomp_bpf": plan["seccomp"]["bpf"], "wait_for_network": self.network is not None,
        }

    def _complete(self) -> tuple:
        """What the init's plan still needs, made while the init starts: the
        environment, the pinned entrypoint's fd, the binds (and the
        idmapping user namespaces they need, which take a helper process).
        Returns (binds with fd indexes, environment, entrypoint fd index,
        fds to pass, names of the variables refused)."""
        plan = self.plan
        from agent.compile.env import filter_env

        caller_env = oslite.environ() if self.options.caller_env is None else self.options.caller_env
        env = filter_env(plan["env_fixed"], frozenset(plan["env_pass"]), caller_env)
        binds = self._binds(plan)
        fds = sorted({ref for *_rest, ref in binds if ref is not None and ref >= 0})
        spec = sorted_binds([(path, writable, origin,
                              ref if ref is None or ref < 0 else fds.index(ref))
                             for path, writable, origin, ref in binds])
        exec_index = None
        if plan["entrypoint_sha256"]:
            # Hash the open file and execute that fd (execveat AT_EMPTY_PATH):
            # a file renamed over the path after this check is never run.
            from agent.package.pin import PinError, open_pinned

            try:
                self.exec_fd = open_pinned(plan["executable"], plan["entrypoint_sha256"])
            except PinError as exc:
                raise LaunchError("pin", f"entrypoint_sha256: {exc}") from None
            exec_index = len(fds)
            fds.append(self.exec_fd)
        return spec, env.as_dict(), exec_index, fds, env.refused

    def _report_launch(self, refused) -> None:
        """Notes and events of the launch, and the housekeeping no step of
        it waits for: done once the init has its plan, while it confines
        itself (or when the launch fails before)."""
        plan = self.plan
        for text in plan["notes"]:
            self.note(text)
        for name in refused:
            self.emit(pid=None, layer="env", operation=f"env {name}", decision="denied",
                      rule="protected variable: changes how code is loaded; never passed")
        from agent.enforce.cgroup import remove_stale_instances

        for path in remove_stale_instances(plan["cgroup"]["skill"], "run-", self.cgroup_mounts):
            self.note(f"cgroup: removed {path}, left by a supervisor that was killed")

    def _binds(self, plan: dict) -> list:
        """[(path, writable, origin, user namespace)]: None, an fd to pass, or
        -2 - N for the Nth of `self.idmaps`, which skillguard-init made."""
        if self.prestarted is None:
            return [(path, writable, origin,
                     None if owner is None else -2 - self.idmaps.index(_idmap(owner, plan)))
                    for path, writable, origin, owner in plan["binds"]]
        from agent.launch.mounts import MountError, idmap_userns

        made: dict = {}
        binds = []
        try:
            for path, writable, origin, owner in plan["binds"]:
                fd = None
                if owner is not None:
                    key = tuple(owner)
                    fd = self.userns.get(key)
                    if fd is None:
                        if key not in made:
                            made[key] = idmap_userns(key[0], key[1], plan["uid"], plan["gid"])
                        fd = made[key]
                binds.append((path, writable, origin, fd))
        except BaseException as exc:
            for fd in made.values():
                posix.close(fd)
            if isinstance(exc, MountError):
                raise LaunchError("mount", str(exc)) from None
            raise
        self.userns_made = list(made.values())
        return binds

    def _send_plan(self, plan: dict, pid, sock, launcher=None, err_r=None) -> int:
        """The init's plan (init_wire.encode; skillguard-init.c
        `receive_plan`) in one message, with its fds: a pre-started init's
        first, our 0..2 (the skill's stdio: supervise.py put them there).
        `pid` None: the init is being started by `launcher`. Returns the
        init's pid."""
        try:
            binds, env, exec_index, fds, refused = self._complete()
            if plan["mounts"]["resolv_conf"]:
                plan["mounts"]["resolv_target"] = _resolv_conf_target()
        except BaseException:
            for text in self.plan["notes"]:
                self.note(text)
            try:
                pid = pid if pid is not None else _await_init(launcher, sock, err_r)
            except LaunchError:
                pass
            else:
                _kill_and_reap(pid)
            raise
        stdio = self.prestarted is not None
        if stdio:
            shift = 3
            fds = [0, 1, 2] + fds
            binds = [(path, writable, origin, index + shift if index is not None and index >= 0 else index)
                     for path, writable, origin, index in binds]
            exec_index = None if exec_index is None else exec_index + shift
        message = encode(plan, binds, env, exec_index, stdio)
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        try:
            sock.sendmsg([message], ancillary)
        except OSError:
            pass  # the init is gone; _supervise reads why from its error pipe
        self._report_launch(refused)
        # The message waits in the socket if the init is not cloned yet.
        return pid if pid is not None else _await_init(launcher, sock, err_r)

    # -- fork and supervise --

    def run(self) -> RunResult:
        try:
            child_plan = self.prepare()
        except BaseException:
            if self.prestarted is not None:
                self.prestarted.discard()
            raise
        try:
            return self._run(child_plan)
        finally:
            if self.net is not None:
                self.net.close()
            try:
                self.cgroup.remove()
            except Exception as exc:  # noqa: BLE001 - report, do not mask the result
                self.note(f"cgroup: cleanup failed: {exc}")
            for fd in getattr(self, "userns_made", ()):
                posix.close(fd)
            if self.exec_fd is not None:
                posix.close(self.exec_fd)

    def _run(self, plan) -> RunResult:
        launcher = None
        if self.prestarted is not None:
            init = self.prestarted
            pid, parent_sock, err_r = init.pid, init.sock, init.err_r
        else:
            pid = None
            launcher, parent_sock, err_r = _start_child(self.cgroup, self.idmaps)
        try:
            pid = self.pid = self._send_plan(plan, pid, parent_sock, launcher, err_r)
            if self.network is not None:
                self._attach_network(pid, parent_sock)
        except BaseException:
            parent_sock.close()
            posix.close(err_r)
            raise
        previous = {s: _signal.signal(s, self._forward) for s in FORWARDED}
        try:
            status, started, listener, wait_status = self._supervise(pid, parent_sock, err_r)
        finally:
            for s, handler in previous.items():
                _signal.signal(s, handler)
            parent_sock.close()
            posix.close(err_r)

        if isinstance(started, LaunchError):
            raise started
        self._after_exit(wait_status)
        if posix.WIFSIGNALED(status):
            code = 128 + posix.WTERMSIG(status)
        else:
            code = posix.waitstatus_to_exitcode(status)
        if started is not True and not isinstance(started, LaunchError) and code == 0:
            code = SETUP_FAILED
        return RunResult(code, wait_status, self.violations, self.notes)

    def _attach_network(self, pid: int, sock) -> None:
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
                posix.kill(pid, SIGKILL)
                posix.waitpid(pid, 0)
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
            posix.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def _supervise(self, pid: int, sock, err_r: int):
        """Wait for the listener fd, then serve notifications until the init exits.

        Returns (init wait status, started, listener fd, skill wait status);
        `started` is True once exec happened, a LaunchError when set-up or exec
        failed, else False.
        """
        listener = None
        started: object = False
        skill_status = None
        # Loaded while the child confines itself, so that the entrypoint's
        # exec notification is answered at once.
        from agent.launch import notify  # noqa: F401
        try:
            _message, listener = _recv_fd(sock)
        except OSError:
            listener = None
        pidfd = posix.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(err_r, select.POLLIN)
        poller.register(sock, select.POLLIN)
        if listener is not None:
            poller.register(listener, select.POLLIN)
        for fd in self.readers:
            poller.register(fd, select.POLLIN)
        timeout_s = self.plan["timeout_s"]
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
                        data = posix.read(err_r, 65536)
                        poller.unregister(err_r)
                        if data:
                            started = LaunchError(*_failure(data))
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
            _, status = posix.waitpid(pid, 0)
            # A status message sent just before exit may still be queued.
            if skill_status is None:
                try:
                    payload = sock.recv(64, _socket.MSG_DONTWAIT)
                    if len(payload) == 4:
                        skill_status = int.from_bytes(payload, "little", signed=True)
                except OSError:
                    pass
            if started is False:
                try:
                    data = posix.read(err_r, 65536)
                except OSError:
                    data = b""
                if data:
                    started = LaunchError(*_failure(data))
                elif listener is None:
                    started = LaunchError("launch", "the child exited before confinement "
                                                    f"completed (wait status {status})")
            return status, started, listener, skill_status
        finally:
            posix.close(pidfd)
            if listener is not None:
                posix.close(listener)

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
        name = notify.syscall_name(request.nr, request.arch, self.plan["seccomp"]["names"])
        if name in ("execve", "execveat") and name not in self.plan["syscalls_deny"]:
            self._on_exec(listener, request)
            return
        operation, rule = self._describe(name, request.args)
        always = name in self.plan["seccomp"]["always_deny"]
        resume = self.audit and not always
        notify.respond(listener, request.id, error=1, resume=resume)  # 1 = EPERM
        self.emit(pid=request.pid, layer="seccomp", operation=operation,
                  decision="audited" if resume else "denied", rule=rule)

    def _on_exec(self, listener: int, request) -> None:
        if getattr(self, "_exec", None) is None and _parent_pid(request.pid) == self.pid:
            # The init's child exec'ing the entrypoint (skillguard-init.c `exec_skill`, by
            # path or execveat(fd, "", AT_EMPTY_PATH)): the launcher's exec,
            # not the skill's. Answered here, without loading the exec policy.
            from agent.launch import notify

            self._exec = False
            if notify.id_valid(listener, request.id):
                notify.respond(listener, request.id, resume=True)
            return
        if not self._exec:
            import pickle

            from agent.launch.exec_supervisor import ExecSupervisor

            self._exec = ExecSupervisor(
                pickle.loads(self.plan["exec_rules"]), audit=self.audit,
                emit=lambda **fields: self.emit(layer="exec", **fields))
        self._exec.handle(listener, request)

    def _describe(self, name: str, args) -> tuple[str, str]:
        if name in self.plan["seccomp"]["always_deny"]:
            return name, "base profile always_deny: no manifest can allow it"
        if name in self.plan["syscalls_deny"]:
            return name, "manifest syscalls.deny"
        if name == "socket":
            family = FAMILIES.get(args[0] & 0xFFFFFFFF, f"family {args[0] & 0xFFFFFFFF}")
            if family in ("AF_INET", "AF_INET6"):
                return f"socket({family})", "no tcp/http grant in the manifest"
            return f"socket({family})", "socket family not in the base profile"
        if name == "clone":
            return f"clone(flags={args[0]:#x})", "base profile: clone with namespace flags"
        if name in self.plan["seccomp"]["arg_checked"]:
            return f"{name}({', '.join(hex(a) for a in args[:3])})", \
                f"base profile: {name} arguments outside the allowed checks"
        return name, "not in the base profile allow list nor syscalls.allow"

    def _after_exit(self, skill_status) -> None:
        # The cgroup was made for this launch (SkillCgroup.create refuses an
        # existing one), so its counters started at 0.
        if skill_status is not None and posix.WIFSIGNALED(skill_status) \
                and posix.WTERMSIG(skill_status) == SIGSYS:
            self.emit(pid=None, layer="seccomp", operation="non-x86_64 syscall (i386/x32 ABI)",
                      decision="killed", rule="base profile: only native x86_64 syscalls "
                                               "(other arches and x32 kill the process)")
        refused = self._counter(self.cgroup.pids_events)
        if refused > 0:
            self.emit(pid=None, layer="cgroup", operation=f"fork refused {refused} time(s)",
                      decision="denied", rule=f"resources.pids: {self.plan['pids_limit']}")
        kills = self._counter(lambda: self.cgroup.memory_events().get("oom_kill", 0))
        if kills > 0:
            self.emit(pid=None, layer="cgroup", operation=f"memory: {kills} process(es) OOM-killed",
                      decision="killed",
                      rule=f"resources.memory: {self.plan['memory_bytes']} bytes")


class _CgroupMounts:
    __slots__ = ("v2", "v1")

    def __init__(self, v2, v1):
        self.v2, self.v1 = v2, v1


def _failure(data: bytes) -> tuple[str, str]:
    """The init's report on its error pipe: b"layer\\0reason"."""
    layer, nul, reason = data.partition(b"\0")
    if not nul or not layer:
        return "launch", repr(data[:200])
    return layer.decode(errors="replace"), reason.decode(errors="replace")


def _idmap(owner, plan: dict) -> tuple:
    """(owner uid, owner gid, skill uid, skill gid): one idmapping user namespace."""
    return (owner[0], owner[1], plan["uid"], plan["gid"])


def _resolv_conf_target() -> str:
    """The file /etc/resolv.conf names (often a symlink into /run): the init
    mounts the skill's resolv.conf over it, and move_mount(2) does not follow
    a symlink in the target's last component."""
    from os.path import realpath  # network launches only

    target = realpath("/etc/resolv.conf")
    if not oslite.isfile(target):
        raise LaunchError("mount", f"mount namespace: resolv.conf: /etc/resolv.conf resolves to "
                                   f"{target}, which is not a file; the skill's resolver cannot "
                                   "be put in place")
    return target


def _kill_and_reap(pid: int) -> None:
    try:
        posix.kill(pid, SIGKILL)
        posix.waitpid(pid, 0)
    except OSError:
        pass


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def run(policy, options: RunOptions, *, emit, note, plan: dict | None = None) -> RunResult:
    """Launch `policy` (or a stored `plan`; see module doc). Raises LaunchError
    if it cannot start."""
    return Supervisor(policy, options, emit, note, plan).run()
