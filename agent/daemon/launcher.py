"""Launching skills from the daemon, and hearing from their supervisors.

`fork_supervisor` forks the daemon; the fork runs `supervise.supervise()`
(agent.launch.supervisor underneath) and never returns. The daemon keeps a
pidfd of the supervisor on its event loop: readable means it exited.

`SupervisorHub` is the daemon end of `supervise.Link`: a unix stream socket
in <state_root>/run (0700, root only), JSON lines from supervisors. A
connection is accepted only from uid 0 and only for a launch whose recorded
supervisor pid is the peer's pid.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from typing import Optional

from agent.daemon import supervise


def fork_supervisor(launch_id: str, policy, options, stdio: list, cwd: Optional[str],
                    state_root: str) -> int:
    """Fork; the child supervises the skill and exits. Returns the child's pid.

    The daemon must have no other threads (it has none: one event loop), so
    the fork holds no lock another thread owned.
    """
    pid = os.fork()
    if pid == 0:
        code = 125
        try:
            code = supervise.supervise(launch_id, policy, options, stdio, cwd, state_root)
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
