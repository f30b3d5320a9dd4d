"""sd_notify by hand: READY/WATCHDOG datagrams to $NOTIFY_SOCKET."""
import os
import socket

from agent.daemon.sdnotify import notify, watchdog_interval


def test_notify_sends_a_datagram(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": path})
        assert server.recv(100) == b"READY=1\nSTATUS=x"


def test_abstract_socket():
    name = f"@skillguard-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name[1:])
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": name})
        assert server.recv(100) == b"WATCHDOG=1"


def test_no_socket_no_notify():
    assert not notify("READY=1", {})


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
