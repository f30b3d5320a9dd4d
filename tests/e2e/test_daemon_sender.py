"""Who may call is decided per request, by the process that wrote its bytes
(SCM_CREDENTIALS), not by the process that connected (SO_PEERCRED).

A connected socket outlives its connector's intentions: a runtime outside any
skill connects, then the connection is inherited by (or passed to) a process
that is, or becomes, a skill. Requests that skill writes on it must be refused
like any other request from inside a skill cgroup.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sgdaemon import LineReader, manifest_text, read_reply, register_daemon

EPERM = 1

# Started with the daemon connection inherited as fd argv[1]: runs one command
# per stdin line, answers one JSON line on stdout.
HOLDER = r'''
import json, os, socket, sys
conn = socket.socket(fileno=int(sys.argv[1]))
conn.settimeout(30)  # the fd is shared with the parent, which made it non-blocking
def do(cmd):
    if cmd["op"] == "send":
        conn.sendall(cmd["data"].encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return {"reply": json.loads(data.split(b"\n")[0])}
    if cmd["op"] == "tcp":
        try:
            with socket.socket() as s:
                s.settimeout(3)
                s.connect(("127.0.0.1", cmd["port"]))
            return {"ok": True}
        except OSError as e:
            return {"errno": e.errno}
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    print(json.dumps(do(json.loads(line))), flush=True)
'''


@pytest.fixture(scope="module")
def daemon():
    with register_daemon() as d:
        yield d


def request(request_id, method, params=None) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}) + "\n"



def listening_socket() -> socket.socket:
    """A loopback TCP listener (so an unconfined connect succeeds)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


class Holder:
    """A process (fork+exec) that inherited the daemon connection `conn`."""

    def __init__(self, conn: socket.socket):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(conn.fileno())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     pass_fds=[conn.fileno()])
        self.pid = json.loads(self.proc.stdout.readline())["ready"]

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def end(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Idle:
    """A plain process to register (it holds no daemon connection)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                     stdin=subprocess.PIPE)
        self.pid = self.proc.pid

    def end(self):
        self.proc.kill()
        self.proc.wait()


def test_a_registered_skill_cannot_unregister_itself_on_an_inherited_connection(daemon):
    """A runtime outside any skill connects, starts a child that inherits the
    connection, registers that child on it and closes its own copy; the child
    (now a skill) writes `unregister` of its own id on the inherited
    connection: refused, counted, and the skill stays registered and confined."""
    listener = listening_socket()
    port = listener.getsockname()[1]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(daemon.socket)
    holder = Holder(conn)
    try:
        assert holder.ask(op="tcp", port=port) == {"ok": True}
        manifest = textwrap.dedent("""\
            name: sender-reg
            version: "1"
            permissions:
              tcp:
                allowlist: ["127.0.0.1:1"]
            """)
        conn.sendall(request(1, "register", {"pids": [holder.pid], "manifest": manifest}).encode())
        registered = read_reply(conn)["result"]
        conn.close()  # the runtime's copy; the skill's inherited copy stays open
        assert holder.ask(op="tcp", port=port) == {"errno": EPERM}
        before = daemon.metric("skillguard_api_unauthorized_requests_total", reason="skill_cgroup")

        answer = holder.ask(op="send", data=request(2, "unregister", {"id": registered["id"]}))["reply"]

        assert answer["id"] == 2 and answer["error"]["code"] == -32001, answer
        assert "skill cgroup" in answer["error"]["message"]
        assert f"pid {holder.pid} " in answer["error"]["message"]  # the sender, not the connector
        assert daemon.metric("skillguard_api_unauthorized_requests_total",
                             reason="skill_cgroup") == before + 1
        assert [s["id"] for s in daemon.call("list")["skills"]] == [registered["id"]]
        assert daemon.subtree in open(f"/proc/{holder.pid}/cgroup").read()
        assert holder.ask(op="tcp", port=port) == {"errno": EPERM}
        # Read-only calls on the same connection still work for it.
        assert "result" in holder.ask(op="send", data=request(3, "list"))["reply"]
        daemon.call("unregister", {"id": registered["id"]})
        assert holder.ask(op="tcp", port=port) == {"ok": True}
    finally:
        holder.end()
        listener.close()
        conn.close()


def test_a_launched_skill_given_a_root_connection_by_scm_rights_cannot_mutate(daemon):
    """A skill inside its cgroup (and its own pid namespace) from the start
    gets, as its stdout, a connection a root process outside any skill opened
    (passed to the daemon with SCM_RIGHTS, and by it to the skill). What the
    skill writes on it is refused; the refusal names the skill's pid as the
    daemon sees it (the kernel translates the sender's pid into the reader's
    pid namespace)."""
    other = Idle()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(daemon.socket)
    try:
        victim = daemon.call("register", {"pids": [other.pid], "manifest": manifest_text(
            "sender-victim", str(daemon.work))})
        code = (
            "import os, sys\n"
            f"sys.stdout.write({request(7, 'unregister', {'id': victim['id']})!r})\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write(f'{os.getpid()}\\n')\n"
            "sys.stderr.flush()\n"
            "sys.stdin.read()\n"  # stay until the test has looked at it
        )
        before = daemon.metric("skillguard_api_unauthorized_requests_total", reason="skill_cgroup")
        stdin_r, stdin_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            launched = daemon.call("launch", {"manifest": manifest_text("sender-launched", str(daemon.work)),
                                              "argv": ["/usr/bin/python3", "-c", code], "stdio": True,
                                              "cwd": str(daemon.work)},
                                   fds=[stdin_r, conn.fileno(), err_w])
        finally:
            os.close(stdin_r)
            os.close(err_w)
        daemon.pids_seen.add(launched["supervisor_pid"])
        errors = LineReader(err_r)
        try:
            answer = read_reply(conn)
            pid_inside = int(errors.readline())
            assert answer["id"] == 7 and answer["error"]["code"] == -32001, answer
            assert "skill cgroup" in answer["error"]["message"]
            sender_pid = int(answer["error"]["message"].split()[1])
            # The sender as the daemon names it is the skill's python, pid
            # `pid_inside` in its own namespace (NSpid: outermost first).
            with open(f"/proc/{sender_pid}/status") as status:
                nspids = next(line for line in status if line.startswith("NSpid:")).split()[1:]
            assert len(nspids) == 2 and int(nspids[-1]) == pid_inside != sender_pid, nspids
            # ... in the cgroup the daemon recorded for the launch (a spare's, skillguard/@spare/run-N).
            with open(f"/proc/{sender_pid}/cgroup") as fh:
                v2_path = next(line for line in fh.read().splitlines() if line.startswith("0::"))[3:]
            recorded = daemon.call("inspect", {"id": launched["id"]})["cgroup_paths"]
            assert v2_path.startswith("/skillguard/") and any(p.endswith(v2_path) for p in recorded), \
                (v2_path, recorded)
        finally:
            os.close(stdin_w)
            errors.close()
        daemon.call("wait", {"id": launched["id"]})
        assert daemon.metric("skillguard_api_unauthorized_requests_total",
                             reason="skill_cgroup") == before + 1
        assert victim["id"] in [s["id"] for s in daemon.call("list")["skills"]]
        # The connection's owner, outside any skill, may still mutate on it.
        conn.sendall(request(8, "unregister", {"id": victim["id"]}).encode())
        assert read_reply(conn)["result"] is not None
    finally:
        conn.close()
        other.end()


def test_a_line_written_by_two_processes_is_refused(daemon):
    """The kernel never returns bytes of two senders in one read; a request
    line assembled from two reads of different senders is refused (even a
    read-only one), counted, and the connection keeps serving."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(daemon.socket)
    holder = Holder(conn)
    try:
        before = daemon.metric("skillguard_api_unauthorized_requests_total", reason="mixed_senders")
        line = request(4, "status")
        conn.sendall(line[:20].encode())
        answer = holder.ask(op="send", data=line[20:])["reply"]
        assert answer["id"] == 4 and answer["error"]["code"] == -32001, answer
        assert "more than one process" in answer["error"]["message"]
        assert daemon.metric("skillguard_api_unauthorized_requests_total",
                             reason="mixed_senders") == before + 1
        # Whole lines from either process are answered on the same connection.
        assert holder.ask(op="send", data=request(5, "status"))["reply"]["result"]["caller"]["pid"] == holder.pid
        conn.sendall(request(6, "status").encode())
        assert read_reply(conn)["result"]["caller"]["pid"] == os.getpid()
    finally:
        holder.end()
        conn.close()


def test_an_unprivileged_process_on_a_root_connection_has_only_its_own_rights(daemon):
    """uid and groups are the sender's too: a child that dropped to uid 65534
    and writes on the connection its root parent opened is refused even
    read-only calls (no socket_group here); the parent is still answered."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(daemon.socket)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            conn.sendall(request(1, "status").encode())
            os.write(w, json.dumps(read_reply(conn)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        answer = json.loads(data)
        assert answer["error"]["code"] == -32001 and f"pid {pid} uid 65534" in answer["error"]["message"], answer
        conn.sendall(request(2, "status").encode())
        mine = read_reply(conn)["result"]
        assert mine["caller"]["pid"] == os.getpid() and mine["connected_by"]["pid"] == os.getpid()
    finally:
        os.close(r)
        conn.close()
