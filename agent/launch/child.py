"""What the launched child does between fork and exec.

The child is PID 1 of a new PID namespace (the supervisor cloned it with
CLONE_NEWPID, and CLONE_INTO_CGROUP into the skill's v2 cgroup). It
confines itself in this order, reporting the first failure to the
supervisor as (layer, error) on the error pipe and exiting 125, so the
skill never starts half-confined:

    cgroup (v1: write "0" to `tasks`) -> namespaces (mount, IPC, UTS, net,
    cgroup) + setsid -> the launch message from the supervisor (binds,
    environment, pinned entrypoint: made while we imported and unshared;
    idmapping user namespaces take a helper process) -> mounts
    -> network (with a grant: wait until the supervisor has set up veth,
    nftables and DNS stub in our netns, agent/launch/netns.py) -> loopback -> rlimits -> uid/gid/capabilities -> no_new_privs
    -> Landlock -> seccomp (listener fd sent to the supervisor) -> fork+exec

Everything up to setsid is `_first_phase` (nothing of it depends on the
skill). An init pre-started by a spare of the daemon's launch zygote runs it
before its launch exists, in a neutral cgroup, then waits for the rest of
its plan (`_receive_plan`, with the skill's stdio) and runs `_second_phase`
as every other init does.

It then stays as the namespace's init: PID 1 ignores every signal it has no
handler for, even SIGTERM from its own namespace (pid_namespaces(7)), so a
skill running as PID 1 could not be stopped politely. The init forwards
SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the skill, reaps orphans,
and when the skill ends reports its raw wait status and exits with its code
(128+N for a signal); the kernel then kills whatever the skill left behind
(zap_pid_ns_processes). The init is confined exactly like the skill.
"""
import _signal  # not `signal`/`socket`/`json`: their imports cost milliseconds per launch
import _socket
import marshal
import posix
import _struct as struct  # the C module `struct` re-exports: one import less

from agent.enforce.libc import (CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS,
                                CLONE_NEWUTS, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, prctl,
                                syscall)

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

SIGKILL = 9
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT,
                     _signal.SIGUSR1, _signal.SIGUSR2)
# The Landlock rule path plan.py puts for a pinned entrypoint; _receive_launch
# makes it /proc/self/fd/N of the fd the supervisor passed.
PINNED_EXEC_FD = "\0pinned-exec-fd"
SETUP_FAILED = 125
EXEC_FAILED = 127
STATUS = struct.Struct("=i")


class StepError(Exception):
    def __init__(self, layer: str, reason: str):
        super().__init__(reason)
        self.layer = layer


# The child's plan is a dict the supervisor fills before it forks:
#   executable, argv, cwd, uid, gid, hostname; env: filled from the launch message;
#   cgroup: the SkillCgroup; in_v2: True when clone3 already placed us in its v2 directory;
#   mounts: the mount plan (agent/launch/mounts.py); rlimits: [(RLIMIT_*, soft, hard)];
#   landlock: agent.enforce.landlock.fitted() numbers, None when skipped (--audit);
#   seccomp_bpf: the filter; exec_fd: a pinned entrypoint executed by fd (execveat), or
#   None (from the launch message);
#   wait_for_network: the supervisor sets up a veth + nftables in our netns.


def _step(layer: str, fn, *args):
    try:
        return fn(*args)
    except StepError:
        raise
    except Exception as exc:  # every failure becomes "layer: why"
        raise StepError(layer, str(exc)) from None


def _report(fd: int, layer: str, reason: str) -> None:
    try:
        posix.write(fd, marshal.dumps((layer, reason)))
    except OSError:
        pass


def _unshare() -> None:
    syscall("unshare", CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP)


def _loopback_up() -> None:
    # A new network namespace has only `lo`, and it is down (network_namespaces(7)).
    import fcntl

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    finally:
        sock.close()


def _wait_for_network(sock) -> None:
    # The supervisor answers b"go" once veth, routes, nftables table and DNS
    # stub are in place; if it fails it kills us instead.
    if sock.recv(16) != b"go":
        raise RuntimeError("the supervisor did not finish the network namespace set-up")


def _rearm_parent_death(sock) -> None:
    # Changing uid/gid clears the parent-death signal (commit_creds(),
    # kernel/cred.c), so set it again: without it a SIGKILLed supervisor would
    # leave the skill (and its network namespace) running. getppid() is 0 for
    # a namespace's init, so the supervisor's end of the socketpair tells
    # whether it died before this call.
    import select

    prctl(PR_SET_PDEATHSIG, SIGKILL)
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP)
    for _fd, mask in poller.poll(0):
        if mask & (select.POLLHUP | select.POLLERR):
            raise RuntimeError("the supervisor is gone")


_RLIMIT64 = struct.Struct("=QQ")  # struct rlimit64: rlim_cur, rlim_max
_U64 = (1 << 64) - 1  # RLIM_INFINITY is -1 as an unsigned 64-bit number


def _set_rlimits(rlimits) -> None:
    # prlimit64(2) on ourselves (pid 0): the `resource` module's setrlimit is
    # the same call, but loading it costs ~0.5 ms per launch.
    for number, soft, hard in rlimits:
        syscall("prlimit64", 0, number, _RLIMIT64.pack(soft & _U64, hard & _U64), None)


def _drop_identity(uid: int, gid: int) -> None:
    # Empty the bounding set while we still hold CAP_SETPCAP, so nothing the
    # skill executes can regain a capability (capabilities(7)); clear the
    # ambient set; then switch ids. setresuid from 0 to non-zero clears the
    # permitted and effective sets (no SECBIT_KEEP_CAPS).
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last_cap = int(fh.read())
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    posix.setgroups([])
    posix.setresgid(gid, gid, gid)
    posix.setresuid(uid, uid, uid)
    try:
        posix.setresuid(0, 0, 0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("could regain uid 0 after dropping it")
    if posix.getresuid() != (uid, uid, uid) or posix.getresgid() != (gid, gid, gid) or posix.getgroups():
        raise RuntimeError("ids did not change as asked")


def _landlock(fitted: dict) -> None:
    from agent.enforce.landlock_sys import probe_abi, restrict

    abi = probe_abi()
    if abi != fitted["abi"]:
        # The plan was fitted to another ABI; stored plans are keyed by the
        # kernel release (plan_cache.py), so this is never a guess to make here.
        raise RuntimeError(f"Landlock ABI is {abi}, the plan was made for {fitted['abi']}")
    restrict(fitted, resolve=False)


def _seccomp(bpf: bytes) -> int:
    from agent.enforce.seccomp_load import install_filter

    return install_filter(bpf, listener=True)


def _receive_launch(sock, plan: dict) -> None:
    """The supervisor's launch message (supervisor.py `_send_launch`): the
    binds with their user-namespace fds, the environment, the pinned
    entrypoint's fd. Received fds are close-on-exec."""
    message, ancillary, _flags, _addr = sock.recvmsg(1 << 20, _socket.CMSG_SPACE(64 * 4),
                                                     _socket.MSG_CMSG_CLOEXEC)
    if not message.startswith(b"launch"):
        raise RuntimeError("the supervisor did not send the launch")
    fds = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    fields = marshal.loads(message[6:])
    plan["mounts"]["binds"] = [(path, writable, origin, None if index is None else fds[index])
                               for path, writable, origin, index in fields["binds"]]
    plan["env"] = fields["env"]
    if fields["exec_fd"] is not None:
        exec_fd = plan["exec_fd"] = fds[fields["exec_fd"]]
        if plan["landlock"] is not None:
            # The entrypoint's execute right is on this open file (plan.py PINNED_EXEC_FD).
            plan["landlock"] = dict(plan["landlock"], rules=[
                (f"/proc/self/fd/{exec_fd}" if path == PINNED_EXEC_FD else path, bits, origin)
                for path, bits, origin in plan["landlock"]["rules"]])


def _send_fd(sock, message: bytes, fd: int) -> None:
    sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])


def _receive_plan(sock) -> dict:
    """A pre-started init's plan (supervisor.py `_send_plan`): plain values,
    with the skill's stdio as SCM_RIGHTS, put on 0..2 for the skill."""
    message, ancillary, _flags, _addr = sock.recvmsg(1 << 20, _socket.CMSG_SPACE(3 * 4))
    fds = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    if not message.startswith(b"plan") or len(fds) != 3:
        for fd in fds:
            posix.close(fd)
        raise RuntimeError("the supervisor did not send the plan")
    for number, fd in enumerate(fds):
        posix.dup2(fd, number)  # inheritable: the skill gets the caller's stdio
        posix.close(fd)
    return marshal.loads(message[4:])


def run(plan: dict, err_fd: int, sock, prestarted: bool = False) -> None:
    """Confine this process, start the skill, act as its init. Never returns.
    `prestarted`: `plan` holds only the cgroup; the first phase runs now and
    the rest of the plan comes on `sock` when the launch does (a spare of the
    daemon's launch zygote, agent/daemon/zygote.py)."""
    code = SETUP_FAILED
    try:
        code = _confine_and_start(plan, err_fd, sock, prestarted)
    except StepError as exc:
        _report(err_fd, exc.layer, str(exc))
    except BaseException as exc:  # noqa: BLE001 - nothing may escape a forked child
        _report(err_fd, "launch", f"{type(exc).__name__}: {exc}")
    posix._exit(code)


def _join_cgroup(plan: dict) -> None:
    cgroup = plan["cgroup"]
    if plan["in_v2"]:
        cgroup.join_v1_self()
    else:
        cgroup.add(0)  # "0": the writing process itself


def _confine_and_start(plan: dict, err_fd: int, sock, prestarted: bool = False) -> int:
    _first_phase(plan)
    if prestarted:
        plan = _step("launch", _receive_plan, sock)
    return _second_phase(plan, err_fd, sock)


def _first_phase(plan: dict) -> None:
    """What does not depend on the skill: signals, imports, cgroup, namespaces."""
    prctl(PR_SET_PDEATHSIG, SIGKILL)
    # The supervisor cloned us with the forwarded signals blocked: as PID 1
    # with no handler we would discard them (pid_namespaces(7)); blocked,
    # they wait (kernel/signal.c sig_ignored). Held until the skill exists.
    _install_forwarders()
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    # Import now: once Landlock holds, the agent's own files are unreadable.
    import fcntl  # noqa: F401
    import select  # noqa: F401
    import agent.enforce.landlock_sys  # noqa: F401
    import agent.enforce.seccomp_load  # noqa: F401
    import agent.launch.mounts  # noqa: F401

    _step("cgroup", _join_cgroup, plan)
    # The cgroup namespace's root is the cgroup joined above: the skill sees "/".
    _step("namespaces", _unshare)
    posix.setsid()  # no controlling terminal: nothing to TIOCSTI into


def _second_phase(plan: dict, err_fd: int, sock) -> int:
    """The skill's confinement, from the launch message to exec."""
    from agent.launch import mounts

    if plan["wait_for_network"]:
        _step("network", sock.send, b"netns")  # the supervisor may now enter our netns
    _step("mount", _receive_launch, sock, plan)
    _step("mount", mounts.setup, plan["mounts"])
    mounts.close_userns_fds(plan["mounts"]["binds"])
    if plan["wait_for_network"]:
        _step("network", _wait_for_network, sock)
    _step("network", _loopback_up)
    _step("uts", _socket.sethostname, plan["hostname"])
    _step("rlimits", _set_rlimits, plan["rlimits"])
    _step("identity", _drop_identity, plan["uid"], plan["gid"])
    _step("identity", _rearm_parent_death, sock)
    _step("cwd", posix.chdir, plan["cwd"])
    _step("no_new_privs", prctl, PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)  # /proc/1/* stays closed to the skill
    if plan["landlock"] is not None:
        _step("landlock", _landlock, plan["landlock"])
    listener = _step("seccomp", _seccomp, plan["seccomp_bpf"])
    _step("seccomp", _send_fd, sock, b"listener", listener)
    posix.close(listener)

    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED_SIGNALS)
    pid = posix.fork()
    if pid == 0:
        _exec(plan, err_fd, sock)
    _child_pid[0] = pid
    for signum in _pending:  # arrived during set-up: the skill gets them at once
        _forward(signum, None)
    _pending.clear()
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    posix.close(err_fd)
    return _init_loop(pid, sock)


_child_pid = [0]
_pending: list = []


def _forward(signum, _frame) -> None:
    if _child_pid[0] > 0:
        try:
            posix.kill(_child_pid[0], signum)
        except ProcessLookupError:
            pass
    else:
        _pending.append(signum)


def _install_forwarders() -> None:
    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, _forward)


def _exec(plan: dict, err_fd: int, sock) -> None:
    try:
        sock.close()
        for signum in FORWARDED_SIGNALS:
            _signal.signal(signum, _signal.SIG_DFL)
        # A signal the init forwarded before we got here acts now, with
        # its default action, and the skill never starts.
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        if plan["exec_fd"] is not None:
            from agent.enforce.libc import execveat_fd

            execveat_fd(plan["exec_fd"], plan["argv"], plan["env"])
        posix.execve(plan["executable"], list(plan["argv"]), plan["env"])
    except OSError as exc:
        _report(err_fd, "exec", f"{plan['executable']}: {exc.strerror}")
    except BaseException as exc:  # noqa: BLE001
        _report(err_fd, "exec", f"{type(exc).__name__}: {exc}")
    posix._exit(EXEC_FAILED)


def _init_loop(main_pid: int, sock) -> int:
    # Keep no copy of the caller's terminal or pipes: the skill's reader
    # should see EOF when the skill closes them.
    try:
        null = posix.open("/dev/null", posix.O_RDWR)
        for fd in (0, 1, 2):
            posix.dup2(null, fd)
        posix.close(null)
    except OSError:
        pass
    status = 0
    while True:
        try:
            pid, wait_status = posix.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == main_pid:
            status = wait_status
            break
    try:
        sock.send(STATUS.pack(status))
    except OSError:
        pass
    if posix.WIFSIGNALED(status):
        return 128 + posix.WTERMSIG(status)
    return posix.waitstatus_to_exitcode(status) if posix.WIFEXITED(status) else SETUP_FAILED
