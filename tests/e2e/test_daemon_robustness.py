"""Malformed, slow, half-closed and unauthorised clients get errors; the daemon
keeps serving everyone else."""
from __future__ import annotations

import json
import os
import socket

import pytest

from conftest import require
from sgdaemon import LineReader, manifest_text, read_reply, run_in_cgroup, running_daemon, wait_for


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon(config_extra="request_max_bytes: 4096\nsocket_group: '4242'\n") as d:
        yield d


def raw(daemon, timeout=10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(daemon.socket)
    return s



def exchange(daemon, payload: bytes) -> dict:
    with raw(daemon) as s:
        s.sendall(payload)
        return read_reply(s)


@pytest.mark.parametrize("payload,code", [
    (b"this is not json\n", -32700),
    (b'{"jsonrpc":"2.0","id":1,"method":"no_such_method"}\n', -32601),
    (b'{"jsonrpc":"2.0","id":2,"method":"status","params":[1,2]}\n', -32602),
    (b'{"jsonrpc":"2.0","id":3,"method":"register","params":{"pids":"1","skill":"x"}}\n', -32602),
    (b'{"jsonrpc":"2.0","id":4,"method":"register","params":{"pids":[0],"skill":"x"}}\n', -32602),
    (b'{"jsonrpc":"2.0","id":5,"method":"inspect","params":{"id":5}}\n', -32602),
    (b'{"jsonrpc":"2.0","id":6,"method":"status","params":{"bogus":1}}\n', -32602),
    (b'{"jsonrpc":"2.0","id":7,"method":"inspect","params":{"id":"r-nope"}}\n', -32002),
    (b'{"jsonrpc":"2.0","id":8,"method":"launch","params":{"argv":"x","skill":"x"}}\n', -32602),
    (b'["batch"]\n', -32600),
    (b'\xff\xfe\n', -32700),
])
def test_malformed_requests_get_errors(daemon, payload, code):
    reply = exchange(daemon, payload)
    assert reply["error"]["code"] == code, reply
    assert daemon.call("status")["api_version"] == 1


def test_huge_line_is_refused_and_the_connection_closed(daemon):
    with raw(daemon) as s:
        try:
            s.sendall(b"{" + b" " * 100_000)
        except BrokenPipeError:
            pass
        reply = read_reply(s)
        assert reply["error"]["code"] == -32006
        try:
            assert s.recv(10) == b""  # closed...
        except ConnectionResetError:
            pass  # ...or reset, since the rest of the line was never read
    assert daemon.call("status")["api_version"] == 1


def test_slow_client_times_out_without_blocking_others(daemon):
    slow = raw(daemon)
    slow.sendall(b'{"jsonrpc":"2.0","id":1,"meth')  # ...and nothing more
    # Meanwhile others are served at once.
    for _ in range(5):
        assert daemon.call("status")["api_version"] == 1
    reply = read_reply(slow)  # request_timeout_s is 1 in this daemon's config
    assert reply["error"]["code"] == -32007
    assert slow.recv(10) == b""
    slow.close()


def test_half_closed_client_still_gets_its_answers(daemon):
    with raw(daemon) as s:
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n{"jsonrpc":"2.0","id":2,"method":"list"}\n')
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["id"] for r in replies] == [1, 2] and all("result" in r for r in replies)


def test_client_that_vanishes_mid_request(daemon):
    for _ in range(20):
        s = raw(daemon)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n{"jsonrpc":"2.0","id":2,"meth')
        s.close()
    assert daemon.call("status")["api_version"] == 1


def test_fds_sent_without_a_use_are_closed(daemon):
    before = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    for _ in range(30):
        r, w = os.pipe()
        with raw(daemon) as s:
            socket.send_fds(s, [b'{"jsonrpc":"2.0","id":1,"method":"status"}\n'], [r, w, r])
            assert "result" in read_reply(s)
        os.close(r)
        os.close(w)
    wait_for(lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) <= before + 2, 5,
             what="the daemon to close the fds it was sent")


def test_too_many_fds_in_one_message(daemon):
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
    try:
        with raw(daemon) as s:
            socket.send_fds(s, [b'{"jsonrpc":"2.0","id":1,"method":"status"}\n'], fds)
            reply = read_reply(s)
            assert reply["error"]["code"] == -32600 and "file descriptors" in reply["error"]["message"]
    finally:
        for fd in fds:
            os.close(fd)
    assert daemon.call("status")["api_version"] == 1


def test_many_clients_at_once(daemon):
    socks = [raw(daemon) for _ in range(100)]
    for i, s in enumerate(socks):
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": "list"}).encode() + b"\n")
    for i, s in enumerate(socks):
        assert read_reply(s)["id"] == i
        s.close()


def _as_user(daemon, uid: int, groups: list[int], method: str, params: dict) -> dict:
    """Call `method` from a forked child running as `uid` with `groups`; its reply."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(groups[0] if groups else uid)
            os.setuid(uid)
            with raw(daemon) as s:
                s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                      "params": params}).encode() + b"\n")
                os.write(w, json.dumps(read_reply(s)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_unauthorised_uid_is_refused_and_counted(daemon):
    before = daemon.metric("skillguard_api_unauthorized_requests_total")
    for method, params in (("status", {}), ("register", {"pids": [os.getpid()], "skill": "x"}),
                           ("reload", {}), ("list", {})):
        reply = _as_user(daemon, 65534, [65534], method, params)
        assert reply["error"]["code"] == -32001, reply
        assert "uid 65534" in reply["error"]["message"]
    assert daemon.metric("skillguard_api_unauthorized_requests_total") == before + 4
    # A member of the socket group (4242 here) may call; nothing else changed for it.
    reply = _as_user(daemon, 65534, [4242], "status", {})
    assert reply["result"]["caller"]["uid"] == 65534


def test_process_in_a_skill_cgroup_may_not_mutate(daemon):
    """A root process moved into a cgroup below skillguard's subtree: read-only
    calls work, mutating ones are refused, whatever its uid."""
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    require(mounts.v2 is not None, "needs a cgroup v2 hierarchy")
    def calls():
        replies = {}
        for method, params in (("status", {}), ("list", {}), ("reload", {}),
                               ("unregister", {"id": "r-anything"}),
                               ("launch", {"skill": "x"}),
                               ("register", {"pids": [os.getpid()], "skill": "x"})):
            with raw(daemon) as s:
                s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                      "params": params}).encode() + b"\n")
                replies[method] = read_reply(s)
        return replies

    replies = run_in_cgroup(mounts.v2 / "skillguard" / f"e2e-auth-{os.getpid()}", calls)
    assert "result" in replies["status"] and "result" in replies["list"]
    for method in ("reload", "unregister", "launch", "register"):
        error = replies[method]["error"]
        assert error["code"] == -32001 and "skill cgroup" in error["message"], (method, error)
    assert daemon.metric("skillguard_api_unauthorized_requests_total", reason="skill_cgroup") >= 4


def test_a_launched_skill_cannot_unregister_or_launch(daemon):
    """The skill itself (its own uid, inside its cgroup) talks to the socket."""
    work = str(daemon.work)
    code = (
        "import json, socket, sys\n"
        f"path = {daemon.socket!r}\n"
        "for method, params in (('status', {}), ('launch', {'skill': 'x'}), ('unregister', {'id': 'x'})):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect(path)\n"
        "    s.sendall(json.dumps({'jsonrpc': '2.0', 'id': 1, 'method': method, 'params': params}).encode() + b'\\n')\n"
        "    print(method, s.makefile().readline().strip(), flush=True)\n"
    )
    reply, out = daemon.launch(manifest_text("e2e-self", work), ["/usr/bin/python3", "-c", code])
    reader = LineReader(out)
    lines = {}
    for _ in range(3):
        method, text = reader.readline().split(" ", 1)
        lines[method] = json.loads(text)
    reader.close()
    daemon.call("wait", {"id": reply["id"]})
    for method in ("status", "launch", "unregister"):
        assert lines[method]["error"]["code"] == -32001
    assert "skill cgroup" in lines["launch"]["error"]["message"]
    assert "skill cgroup" in lines["unregister"]["error"]["message"]


def test_usable_from_socat(daemon):
    import shutil
    import subprocess

    require(shutil.which("socat") is not None, "socat not installed")
    requests = ('{"jsonrpc":"2.0","id":1,"method":"status"}\n'
                '{"jsonrpc":"2.0","id":2,"method":"list"}\n')
    proc = subprocess.run(["socat", "-t", "5", "-", f"UNIX-CONNECT:{daemon.socket}"], input=requests,
                          capture_output=True, text=True, timeout=30)
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == [1, 2]
    assert replies[0]["result"]["api_version"] == 1 and replies[1]["result"] == {"skills": []}
