"""Launching skills from the daemon, and hearing from their supervisors.

`start_supervisor` has the launch zygote (agent/daemon/zygote.py) fork the
supervisor when the daemon made the launch's plan and the zygote is ready;
otherwise `fork_supervisor` forks the daemon. Either fork runs
`supervise.supervise()` (agent.launch.supervisor underneath) and never
returns. The daemon keeps a pidfd of the supervisor on its event loop:
readable means it exited.

`SupervisorHub` is the daemon end of `supervise.Link`: a unix stream socket
in <state_root>/run (0700, root only), JSON lines from supervisors. A
connection is accepted only from uid 0 and only for a launch whose recorded
supervisor pid is the peer's pid.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import TYPE_CHECKING, Optional

from agent.daemon import supervise

if TYPE_CHECKING:
    import asyncio  # imported where it is used: the zygote imports this module too


# What a supervisor imports on its way to exec and while it supervises:
# imported once by the daemon and by the zygote, so a launch does not pay for
# it in every fork (about half of a launch's time before they were).
SUPERVISOR_MODULES = (
    "agent.launch.supervisor", "agent.launch.init_wire", "agent.launch.mounts", "agent.launch.notify",
    "agent.launch.exec_supervisor", "agent.compile.env", "agent.compile.exec_policy", "agent.enforce.cgroup",
    "agent.enforce.cgroupfs", "agent.events.violation", "agent.daemon.supervise",
    "agent.launch.plan_cache", "fcntl", "resource", "select",
)
# A launch with a network grant also needs these (pyroute2, libnftables: ~20 MB).
NETWORK_MODULES = (
    "agent.launch.netns", "agent.compile.network", "agent.enforce.nft", "agent.net.dns_stub",
    "agent.net.admit", "agent.net.rtnl", "agent.net.nflog", "agent.net.events", "agent.net.hostnat",
    "nftables", "pyroute2.netlink.rtnl.ifinfmsg", "pyroute2.netlink.rtnl.ifaddrmsg",
    "pyroute2.netlink.rtnl.rtmsg",
)
# Making plans (the daemon only).
PLAN_MODULES = (
    "agent.launch.plan", "agent.launch.identity", "agent.cache", "agent.compile", "agent.compile.landlock",
    "agent.compile.rlimits", "agent.compile.seccomp", "agent.enforce.landlock", "pyseccomp", "shlex",
)


def preload_launch_modules(sets=(SUPERVISOR_MODULES, NETWORK_MODULES, PLAN_MODULES)) -> None:
    import importlib

    for modules in sets:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module another layer has not built yet
                pass


class PlanMemo:
    """Launch plans (agent/launch/plan.py) the daemon made, reused while they
    hold: a launch of the same manifest text with the same command, working
    directory and options skips the compilers. A plan is reused only while
    every witness holds (plan_cache.witness_holds); least recently used
    plans go first beyond `size`."""

    def __init__(self, size: int = 256):
        self.size = size
        self.plans: dict = {}

    def get(self, policy, text: str, options, cwd: Optional[str]) -> Optional[dict]:
        """The plan for this launch, made now if needed; None when it cannot be
        made (the forked supervisor then makes it and reports why)."""
        from agent.launch.plan_cache import witness_holds
        from agent.launch.supervisor import LaunchError, make_plan

        caller_cwd = cwd if cwd and os.path.isdir(cwd) else os.getcwd()
        key = (text, options.argv, caller_cwd, options.cwd, bool(options.audit),
               options.state_root, str(options.uid_range))
        plan = self.plans.pop(key, None)
        if plan is not None and witness_holds(plan["witness"]):
            self.plans[key] = plan  # most recently used last
            return plan
        try:
            plan = make_plan(policy, options, caller_cwd=caller_cwd)
        except LaunchError:
            return None
        if plan["cacheable"]:
            self.plans[key] = plan
            while len(self.plans) > self.size:
                self.plans.pop(next(iter(self.plans)))
        return plan


PLANS = PlanMemo()


class UsernsFds:
    """The idmapping user namespaces of launched skills, kept open by the
    daemon: (owner uid, owner gid, skill uid, skill gid) -> fd. Making one
    forks a helper (agent/launch/mounts.py idmap_userns), which from the
    daemon's large process costs several ms; a forked supervisor inherits
    these instead. At most `size` are kept (the oldest is closed)."""

    def __init__(self, size: int = 128):
        self.size = size
        self.fds: dict = {}

    def for_plan(self, plan: Optional[dict]) -> dict:
        """(owner uid, owner gid) -> fd for the idmapped binds of `plan`; {}
        when there are none or one cannot be made (the supervisor then tries
        and reports why)."""
        from agent.launch.mounts import MountError, idmap_userns

        out = {}
        if plan is None:
            return out
        for _path, _writable, _origin, owner in plan["binds"]:
            if owner is None:
                continue
            key = (owner[0], owner[1], plan["uid"], plan["gid"])
            fd = self.fds.get(key)
            if fd is None:
                try:
                    fd = idmap_userns(*key)
                except (MountError, OSError):
                    return {}
                self.fds[key] = fd
                while len(self.fds) > self.size:
                    os.close(self.fds.pop(next(iter(self.fds))))
            out[(owner[0], owner[1])] = fd
        return out


USERNS = UsernsFds()


async def start_supervisor(daemon, launch_id: str, policy, options, stdio: list, cwd: Optional[str],
                           state_root: str, plan: Optional[dict]) -> tuple[int, Optional[int], Optional[int]]:
    """(supervisor pid, a pidfd of it or None, its start time or None).

    A spare of the launch zygote takes the launch when the zygote is ready and
    the plan is made; otherwise (or when no spare takes it) the daemon forks."""
    from agent.daemon.zygote import ZygoteGone

    zygote = daemon.zygote
    if plan is not None and zygote is not None and zygote.usable():
        try:
            return await zygote.hand_over(launch_id, options, stdio, cwd, state_root, plan,
                                          USERNS.for_plan(plan))
        except ZygoteGone as exc:
            daemon.log(f"launch {launch_id}: the launch zygote did not take it ({exc}); forking the daemon")
    return fork_supervisor(launch_id, policy, options, stdio, cwd, state_root, plan), None, None


def fork_supervisor(launch_id: str, policy, options, stdio: list, cwd: Optional[str],
                    state_root: str, plan: Optional[dict] = None) -> int:
    """Fork; the child supervises the skill and exits. Returns the child's pid.

    The daemon must have no other threads (it has none: one event loop), so
    the fork holds no lock another thread owned.
    """
    userns = USERNS.for_plan(plan)
    pid = os.fork()
    if pid == 0:
        code = 125
        try:
            code = supervise.supervise(launch_id, policy, options, stdio, cwd, state_root, plan, userns)
        finally:
            os._exit(code)
    return pid


def read_exit(state_root: str, launch_id: str) -> Optional[dict]:
    try:
        with open(supervise.exit_path(state_root, launch_id)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def remove_exit(state_root: str, launch_id: str) -> None:
    try:
        os.unlink(supervise.exit_path(state_root, launch_id))
    except OSError:
        pass


_UCRED = struct.Struct("=iII")


class SupervisorHub:
    def __init__(self, daemon, state_root: str):
        self.daemon = daemon
        self.path = supervise.hub_path(state_root)
        self.server: Optional[asyncio.AbstractServer] = None
        self.connections: set = set()

    async def start(self) -> None:
        import asyncio

        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._serve, path=self.path, limit=1 << 20)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        for writer in list(self.connections):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        sock = writer.get_extra_info("socket")
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        self.connections.add(writer)
        skill = None
        try:
            try:
                hello = json.loads(await asyncio.wait_for(reader.readline(), 5.0))
            except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError):
                return
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                return
            skill = self.daemon.skills.get(str(hello.get("id")))
            if uid != 0 or skill is None or skill.kind != "launched" or skill.supervisor_pid != pid:
                self.daemon.log(f"supervisor hub: refused a connection from pid {pid} uid {uid} "
                                f"for launch {hello.get('id')!r}")
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self.daemon.pipeline.count_lost("supervisor_message_too_long", 1)
                    return
                if not line:
                    return
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self.daemon.on_supervisor_message(skill, message)
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()
