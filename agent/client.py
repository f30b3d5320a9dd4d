"""A small synchronous client for the daemon's socket API (docs/api.md).

    from agent.client import Client
    with Client() as c:
        print(c.call("status"))
        reply = c.call("launch", {"skill": "demo", "stdio": True}, fds=[0, 1, 2])
        for event in c.events(skill="demo"): ...

The socket path is $SKILLGUARD_SOCKET, else the host config's socket_path.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
from typing import Iterator, Optional, Sequence

SOCKET_ENV = "SKILLGUARD_SOCKET"


class ClientError(Exception):
    """The daemon could not be reached, or the connection broke."""


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data=None):
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


def default_socket_path() -> str:
    path = os.environ.get(SOCKET_ENV)
    if path:
        return path
    try:
        from agent.config import load_host_config

        return load_host_config().socket_path
    except Exception:  # noqa: BLE001 - a broken config still leaves the default
        from agent.config import HostConfig

        return HostConfig().socket_path


class Client:
    def __init__(self, path: Optional[str] = None, timeout: Optional[float] = 30.0):
        self.path = path or default_socket_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise ClientError(f"cannot connect to the skillguard daemon at {self.path}: "
                              f"{exc.strerror or exc}") from None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._notifications: list[dict] = []

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def set_timeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    # -- framing --

    def send(self, message: dict, fds: Sequence[int] = ()) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise ClientError(f"sending to {self.path}: {exc.strerror or exc}") from None

    def read_message(self) -> dict:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise ClientError(f"no answer from {self.path} in time") from None
            except OSError as exc:
                raise ClientError(f"reading from {self.path}: {exc.strerror or exc}") from None
            if not chunk:
                raise ClientError(f"the daemon at {self.path} closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    # -- calls --

    def call(self, method: str, params: Optional[dict] = None, fds: Sequence[int] = ()):
        request_id = next(self._ids)
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}, fds)
        while True:
            message = self.read_message()
            if message.get("id") == request_id and ("result" in message or "error" in message):
                if "error" in message:
                    error = message["error"]
                    raise RpcError(error.get("code"), error.get("message"), error.get("data"))
                return message["result"]
            if "method" in message:
                self._notifications.append(message)

    def subscribe(self, skill: Optional[str] = None) -> dict:
        """Turn this connection into an `events` stream (optionally one skill's)."""
        return self.call("events", {"skill": skill} if skill else {})

    def stream(self) -> Iterator[dict]:
        """Yield each violation (a dict) of the subscription as it arrives; blocks."""
        self.set_timeout(None)
        while True:
            while self._notifications:
                message = self._notifications.pop(0)
                if message.get("method") == "event":
                    yield message.get("params", {})
            message = self.read_message()
            if message.get("method") == "event":
                yield message.get("params", {})

    def events(self, skill: Optional[str] = None) -> Iterator[dict]:
        """subscribe(skill), then stream()."""
        self.subscribe(skill)
        return self.stream()


def daemon_answers(path: Optional[str] = None, timeout: float = 2.0) -> bool:
    """True when a daemon accepts connections and answers `status` at `path`."""
    try:
        with Client(path, timeout=timeout) as client:
            client.call("status")
        return True
    except (ClientError, RpcError, ValueError, OSError):
        return False
