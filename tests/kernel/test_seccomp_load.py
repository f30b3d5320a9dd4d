"""Compiled seccomp filters loaded into the real kernel.

Each filter goes into a forked child (a filter can never be removed, so the
pytest process stays unfiltered). The child installs the program, runs its
probes and sends one JSON object back through a pipe: probe -> 0 when the
call succeeded, else the errno. A child killed by a signal reports that.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import threading
import traceback

import pytest

from agent.compile.seccomp import compile_seccomp, syscall_number
from agent.enforce.seccomp_load import install_filter
from agent.manifest.model import HostPattern, Policy, TcpPolicy, TcpRule

from tests.conftest import require

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PLAIN = Policy(name="t", version="1")
NETWORKED = Policy(name="t", version="1", tcp=TcpPolicy(enabled=True, allowlist=(
    TcpRule(host=HostPattern(text="example.com", name="example.com"), port=443,
            text="example.com:443"),)))


@pytest.fixture(autouse=True)
def _seccomp_available():
    require(os.geteuid() == 0, "needs root (euid 0)")
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as fh:
            actions = fh.read().split()
    except OSError:
        actions = []
    require({"errno", "user_notif", "log", "kill_process"} <= set(actions),
            f"kernel seccomp lacks actions (has {actions})")


def raw(name_or_nr, *args) -> int:
    """Issue a raw syscall; 0 on success, else errno."""
    number = name_or_nr if isinstance(name_or_nr, int) else syscall_number(name_or_nr)
    res = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if res < 0 else 0


def probe_socket(family, kind=socket.SOCK_STREAM, proto=0) -> int:
    try:
        socket.socket(family, kind, proto).close()
        return 0
    except OSError as exc:
        return exc.errno


def run_filtered(bpf: bytes, probes, *, listener: bool = False) -> tuple[dict, int]:
    """Fork; in the child install `bpf` and report probes(); return (results, wait status)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            fd = install_filter(bpf, listener=listener)
            results = probes(fd)
            os.write(write_end, json.dumps(results).encode())
        except BaseException:
            os.write(write_end, json.dumps({"error": traceback.format_exc()}).encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    results = json.loads(data) if data else {}
    assert "error" not in results, results.get("error")
    return results, status


def common_probes(_fd) -> dict:
    out = {
        "getpid": 0 if os.getpid() > 0 else -1,
        "getppid": raw("getppid"),
        "af_unix": probe_socket(socket.AF_UNIX),
        "af_inet": probe_socket(socket.AF_INET),
        "af_inet6": probe_socket(socket.AF_INET6),
        "af_packet": probe_socket(17, socket.SOCK_RAW, 0),
        "netlink_route": probe_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
        "netlink_audit": probe_socket(socket.AF_NETLINK, socket.SOCK_RAW, 9),
        "ptrace": raw("ptrace", 0, 0, 0, 0),  # PTRACE_TRACEME
        "io_uring_setup": raw("io_uring_setup", 1, 0),
        "unshare_user": raw("unshare", 0x10000000),
        "clone3": raw("clone3", 0, 0),
        "clone_newuser": raw("clone", 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0),
        "fionread_devnull": None,
    }
    with open("/dev/null", "rb") as fh:
        # /dev/null is no tty and has no FIONREAD: ENOTTY/EINVAL from the driver
        # means the filter let the call through.
        out["fionread_devnull"] = raw("ioctl", fh.fileno(), 0x541B, 0)
    child = os.fork()  # glibc fork uses clone(2) without namespace flags
    if child == 0:
        os._exit(7)
    out["fork_exit"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    box = []
    thread = threading.Thread(target=box.append, args=(1,))  # clone3 -> ENOSYS -> clone
    thread.start()
    thread.join()
    out["thread"] = box
    return out


def test_errno_filter_in_the_kernel():
    art = compile_seccomp(PLAIN)
    results, status = run_filtered(art.bpf, common_probes)
    assert os.waitstatus_to_exitcode(status) == 0
    assert results["getpid"] == 0 and results["getppid"] == 0
    assert results["af_unix"] == 0
    assert results["af_inet"] == errno.EPERM
    assert results["af_inet6"] == errno.EPERM
    assert results["af_packet"] == errno.EPERM
    assert results["netlink_route"] == 0
    assert results["netlink_audit"] == errno.EPERM
    assert results["ptrace"] == errno.EPERM
    assert results["io_uring_setup"] == errno.EPERM
    assert results["unshare_user"] == errno.EPERM
    assert results["clone_newuser"] == errno.EPERM
    assert results["clone3"] == errno.ENOSYS
    assert results["fionread_devnull"] in (errno.ENOTTY, errno.EINVAL)
    assert results["fork_exit"] == 7
    assert results["thread"] == [1]


def test_network_grant_opens_inet_sockets():
    art = compile_seccomp(NETWORKED)
    results, _ = run_filtered(art.bpf, common_probes)
    assert results["af_inet"] == 0 and results["af_inet6"] in (0, errno.EAFNOSUPPORT)
    assert results["af_packet"] == errno.EPERM
    assert results["ptrace"] == errno.EPERM


def test_x32_syscall_kills_the_process():
    art = compile_seccomp(PLAIN)
    getpid_x32 = syscall_number("getpid") | 0x40000000
    results, status = run_filtered(art.bpf, lambda _fd: {"x32": raw(getpid_x32)})
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, (results, status)


def test_notify_filter_returns_a_listener():
    art = compile_seccomp(PLAIN, deny_action="notify")

    def probes(fd) -> dict:
        out = {"fd": fd, "kind": os.readlink(f"/proc/self/fd/{fd}")}
        out["ptrace"] = raw("ptrace", 0, 0, 0, 0)  # always_deny: kernel answers EPERM
        os.close(fd)
        # seccomp_do_user_notification: with no listener left, USER_NOTIF -> ENOSYS
        out["mbind_no_listener"] = raw("mbind", 0, 0, 0, 0, 0, 0)
        out["getppid"] = raw("getppid")
        return out

    results, status = run_filtered(art.bpf, probes, listener=True)
    assert os.waitstatus_to_exitcode(status) == 0
    assert results["fd"] >= 0 and "seccomp notify" in results["kind"]
    assert results["ptrace"] == errno.EPERM
    assert results["mbind_no_listener"] == errno.ENOSYS
    assert results["getppid"] == 0


def test_log_filter_lets_unlisted_calls_run_but_not_always_denied():
    errno_art = compile_seccomp(PLAIN)
    log_art = compile_seccomp(PLAIN, deny_action="log")

    def probes(_fd) -> dict:
        # sysfs(3): number of filesystem types; unlisted in the base profile
        return {"sysfs": raw("sysfs", 3), "ptrace": raw("ptrace", 0, 0, 0, 0)}

    errno_results, _ = run_filtered(errno_art.bpf, probes)
    log_results, _ = run_filtered(log_art.bpf, probes)
    assert errno_results == {"sysfs": errno.EPERM, "ptrace": errno.EPERM}
    assert log_results["sysfs"] == 0 and log_results["ptrace"] == errno.EPERM


def test_install_rejects_garbage():
    with pytest.raises(ValueError, match="seccomp"):
        install_filter(b"\x00" * 7)
    # An invalid program (load outside seccomp_data) must be refused by the kernel.
    bad = (0x20).to_bytes(2, "little") + b"\x00\x00" + (4096).to_bytes(4, "little")
    bad += (0x06).to_bytes(2, "little") + b"\x00\x00" + (0x7FFF0000).to_bytes(4, "little")

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            install_filter(bad)
            msg = "loaded"
        except OSError as exc:
            msg = f"{exc.errno}:{exc.strerror}"
        os.write(write_end, msg.encode())
        os._exit(0)
    os.close(write_end)
    msg = os.read(read_end, 4096).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert msg.startswith(f"{errno.EINVAL}:seccomp: cannot install filter"), msg
