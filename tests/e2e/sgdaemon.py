"""Test harness: a real `skillguard daemon` subprocess with its own socket,
state root, policy directory and metrics port, and clients for it.

Paths live under /var/tmp (short enough for sun_path, and outside the
private /tmp every launched skill gets). Everything a daemon started is
ended by pid at tear-down: its supervisors (from its registry) and itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def manifest_text(name: str, work: str, extra: str = "", timeout: str = "60s") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        version: "1"
        permissions:
          fs:
            dirs:
              - {work}:rw
        resources:
          pids: 64
          timeout: {timeout}
        """) + extra


class DaemonProcess:
    def __init__(self, root: Path, config_extra: str = "", wrap: tuple = ()):
        self.root = root
        self.wrap = list(wrap)  # a command prefix, e.g. setpriv with the unit's capabilities
        self.socket = str(root / "agent.sock")
        self.state = root / "state"
        self.policies = root / "policies"
        self.work = root / "work"
        self.log = root / "events.log"
        self.stderr_path = root / "daemon.err"
        self.port = free_port()
        tag = root.name.replace("sg-e2e-", "").lower()
        tag = "".join(c if c.isalnum() else "x" for c in tag)
        self.subtree = f"sg-e2e-{tag}"
        self.pin_dir = f"/sys/fs/bpf/sg-e2e-{tag}/v1"
        self.nft_table = f"sge2e_{tag}"
        self.config = root / "agent.yaml"
        self.config.write_text(textwrap.dedent(f"""\
            socket_path: {self.socket}
            socket_mode: 0666
            metrics_address: 127.0.0.1:{self.port}
            policy_dir: {self.policies}
            state_root: {self.state}
            log_path: {self.log}
            request_timeout_s: 1
            bpf_pin_dir: {self.pin_dir}
            cgroup_subtree: {self.subtree}
            nft_cgroup_table: {self.nft_table}
            """) + config_extra)
        self.proc: subprocess.Popen | None = None
        self.pids_seen: set[int] = set()

    # -- lifecycle --

    def start(self, wait: bool = True) -> "DaemonProcess":
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        env.pop("NOTIFY_SOCKET", None)
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.wrap + [PYTHON, "-m", "agent", "daemon", "--config", str(self.config)],
                                     cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        if wait:
            wait_for(self._answers, 20, 0.05, f"the daemon on {self.socket} "
                                                f"(stderr: {self.stderr_path})")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.stderr_text()}")
        from agent.client import daemon_answers

        return daemon_answers(self.socket, timeout=1.0)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.stderr.close()

    def end_supervisors(self) -> None:
        """SIGKILL every supervisor this state root's launches recorded (their
        skills die with them: PR_SET_PDEATHSIG)."""
        pids = set(self.pids_seen)
        for record in self.registry_records():
            if record.get("supervisor_pid"):
                pids.add(record["supervisor_pid"])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def registry_records(self) -> list[dict]:
        """The live records in this daemon's registry journal (read only)."""
        from agent.daemon.registry import read_records

        try:
            return read_records(str(self.state))
        except (OSError, ValueError):
            return []

    def tear_down(self) -> None:
        """Stop the daemon (if it still runs), end its supervisors, unload its
        hooks and remove its root: everything it and its launches made."""
        self.stop()
        self.end_supervisors()
        self.unload_hooks()
        remove_root(self.root)

    def unload_hooks(self) -> None:
        """Remove what this daemon's hooks pinned and created: pins (which
        detaches the programs), the cgroup subtree, the nft table."""
        pin_parent = os.path.dirname(self.pin_dir)
        for directory in (self.pin_dir, pin_parent):
            if os.path.isdir(directory):
                for name in os.listdir(directory):
                    path = os.path.join(directory, name)
                    if not os.path.isdir(path):
                        os.unlink(path)
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
        if os.path.isdir(pin_parent):
            try:
                os.rmdir(pin_parent)
            except OSError:
                pass
        from agent.enforce.cgroupfs import cgroup_mounts

        mounts = cgroup_mounts()
        for mount in [mounts.v2] + sorted(set(mounts.v1.values())):
            if mount is None:
                continue
            top = mount / self.subtree
            if top.is_dir():
                for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass
        subprocess.run(["nft", "delete", "table", "inet", self.nft_table], capture_output=True)

    # -- clients --

    def client(self, timeout: float = 30.0):
        from agent.client import Client

        return Client(self.socket, timeout=timeout)

    def call(self, method: str, params: dict | None = None, fds=()):
        with self.client() as c:
            return c.call(method, params or {}, fds=fds)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def metric(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        found = False
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
                    found = True
        return total if found else 0.0

    # -- launching --

    def launch(self, manifest: str, argv: list[str], *, capture: bool = True, **extra):
        """Launch through the socket with stdio as pipes. Returns (reply, stdout reader fd)."""
        null = os.open("/dev/null", os.O_RDWR)
        r, w = os.pipe()
        try:
            params = {"manifest": manifest, "argv": argv, "stdio": True, "cwd": str(self.work), **extra}
            reply = self.call("launch", params, fds=[null, w, w] if capture else [null, null, null])
        finally:
            os.close(null)
            os.close(w)
        self.pids_seen.add(reply["supervisor_pid"])
        return reply, r


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="sg-e2e-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    for name in ("state", "policies", "work"):
        (root / name).mkdir()
    os.chmod(root / "work", 0o777)
    return root


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_daemon(config_extra: str = "", policies: tuple[str, ...] = ()) -> Iterator[DaemonProcess]:
    """A started daemon on a fresh root, torn down at exit. Each name in
    policies becomes a policy in its policy directory granting <root>/work."""
    root = make_root()
    for name in policies:
        (root / "policies" / f"{name}.yaml").write_text(manifest_text(name, str(root / "work")))
    daemon = DaemonProcess(root, config_extra=config_extra)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.tear_down()


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid` (/proc/PID/task/TID/children)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        out.update(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def zygote_of(daemon) -> int | None:
    """The pid of the daemon's launch zygote (agent/daemon/zygote.py), if running."""
    for pid in children(daemon.proc.pid):
        try:
            if b"agent.daemon.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def read_reply(sock: socket.socket) -> dict:
    """The first JSON line the daemon sends on a raw socket."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data.split(b"\n")[0])


@contextlib.contextmanager
def register_daemon() -> Iterator[DaemonProcess]:
    """A running daemon whose `register` is available (else the test fails
    on CI and skips elsewhere: tests/conftest.py require)."""
    from conftest import require

    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon() as d:
        status = d.call("status")
        require(status["register"] == "available", f"register unavailable: {status['register']}")
        yield d


def read_all(fd: int, timeout: float = 30.0) -> str:
    import select

    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


class LineReader:
    """Reads lines from a pipe fd as they come (the skill's stdout)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def readline(self, timeout: float = 15.0) -> str:
        import select

        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line from the skill within {timeout}s (have {self.buffer!r})")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                data = os.read(self.fd, 65536)
                if not data:
                    raise AssertionError(f"the skill closed its output (have {self.buffer!r})")
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self.fd)


def collect_events(client, predicate, count: int = 1, timeout: float = 15.0) -> list[dict]:
    """Events from a subscribed `client` until `count` of them satisfy `predicate`
    (those are returned); an AssertionError after `timeout` seconds."""
    from agent.client import ClientError

    matched = []
    deadline = time.monotonic() + timeout
    pending = client._notifications
    while len(matched) < count:
        while pending and len(matched) < count:
            message = pending.pop(0)
            if message.get("method") == "event" and predicate(message.get("params", {})):
                matched.append(message["params"])
        if len(matched) >= count:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout}s: {len(matched)} of {count} events seen")
        client.set_timeout(remaining)
        try:
            pending.append(client.read_message())
        except ClientError as exc:
            raise AssertionError(f"waiting for events: {exc} ({len(matched)} of {count} seen)") from None
    return matched


def run_in_cgroup(cgroup: Path, work) -> object:
    """Fork a child, move it into `cgroup` (created here, removed after, with
    its parent when that empties), run `work()` there and return its
    JSON-able result: how the tests act as a process inside a skill cgroup."""
    cgroup.mkdir(parents=True)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            os.read(go_r, 1)  # wait until moved
            os.write(w, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
        os.write(go_w, b"x")
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        os.close(go_w)
        wait_for(lambda: not (cgroup / "cgroup.procs").read_text().strip(), 5, what="the cgroup to empty")
        cgroup.rmdir()
        with contextlib.suppress(OSError):
            cgroup.parent.rmdir()
    return json.loads(data)
