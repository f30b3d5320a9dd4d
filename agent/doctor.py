"""`skillguard doctor`: exercise every kernel layer skillguard relies on.

Each probe really uses the feature on the running kernel (loads a filter,
restricts a process, loads and attaches a BPF program, ...) instead of reading
config flags. Anything that changes process state (seccomp, Landlock,
no_new_privs, unshare, mounts) happens in a forked child, never in the caller.
Every probe has a time limit and turns its own failures into `ok=False` with
a detail that names the step and the errno.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.enforce import cgroupfs, libc


@dataclass(frozen=True)
class Probe:
    layer: str
    ok: bool
    detail: str


# Layers skillguard can run without; a failure there is reported, not fatal.
OPTIONAL_LAYERS = frozenset({"bpf-lsm", "bpf-fentry", "cgroup-v1", "userns", "unprivileged-bpf"})

PROBE_TIMEOUT = 5.0
BCC_TIMEOUT = 30.0


class ProbeError(Exception):
    """A probe step failed; the message is the user-facing detail."""


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return f"{name} ({os.strerror(exc.errno or 0)})"


def _oserror_text(exc: OSError) -> str:
    """"EPERM (Operation not permitted) from bpf" for libc.syscall errors, with the path if any."""
    source = (exc.strerror or "").partition(":")[0] if ":" in (exc.strerror or "") else ""
    where = f" from {source}" if source else ""
    if exc.filename is not None:
        where += f" on {exc.filename}"
    return _errno_text(exc) + where


def _step(what: str, exc: OSError) -> ProbeError:
    return ProbeError(f"{_errno_text(exc)} {what}")


# ---------------------------------------------------------------- child processes

_answer_fd: int | None = None  # in a probe child: where its own answer goes


def _fork_call(body: Callable[[], object]) -> tuple[int, int]:
    """Run body() in a forked child; return (pid, fd to read its JSON answer from)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, read_fd
    try:  # child: never return into the caller's stack
        global _answer_fd
        os.close(read_fd)
        if _answer_fd is not None:  # a grandchild must not hold its parent's answer pipe open
            os.close(_answer_fd)
        _answer_fd = write_fd
        try:
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            answer = {"value": body()}
        except ProbeError as exc:
            answer = {"error": str(exc)}
        except OSError as exc:
            answer = {"error": _oserror_text(exc)}
        except BaseException as exc:  # noqa: BLE001 - report anything, the child exits anyway
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer).encode()
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(0)


def _read_until_eof(fd: int, deadline: float) -> bytes:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _collect(pid: int, read_fd: int, timeout: float) -> object:
    """Wait for a _fork_call child; return its value or raise ProbeError."""
    try:
        data = _read_until_eof(read_fd, time.monotonic() + timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise ProbeError(f"timed out after {timeout:g}s") from None
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not data:
        if os.WIFSIGNALED(status):
            raise ProbeError(f"probe process killed by {signal.Signals(os.WTERMSIG(status)).name}")
        raise ProbeError(f"probe process exited with status {os.waitstatus_to_exitcode(status)}")
    answer = json.loads(data)
    if "error" in answer:
        raise ProbeError(answer["error"])
    return answer["value"]


def _in_child(body: Callable[[], object], timeout: float = PROBE_TIMEOUT) -> object:
    return _collect(*_fork_call(body), timeout)


# ---------------------------------------------------------------- small syscall helpers

from agent.enforce.libc import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUSER  # noqa: E402
from agent.launch.mounts import MS_PRIVATE, MS_REC  # noqa: E402


def _unshare(flags: int) -> None:
    try:
        libc.syscall("unshare", ctypes.c_long(flags))
    except OSError as exc:
        raise _step(f"from unshare({flags:#x})", exc) from None


def _mount(source: str | None, target: str, fstype: str | None, flags: int = 0) -> None:
    def cstr(text):
        return ctypes.c_char_p(text.encode()) if text is not None else ctypes.c_char_p()
    try:
        libc.syscall("mount", cstr(source), cstr(target), cstr(fstype), ctypes.c_ulong(flags),
                     ctypes.c_void_p())
    except OSError as exc:
        raise _step(f"mounting {fstype or source} on {target}", exc) from None


def _private_mount_ns() -> None:
    """Own mount namespace with no propagation back to the host (mount_namespaces(7))."""
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _mounts_of(fstype: str) -> list[Path]:
    return [m.mount_point for m in cgroupfs.read_mounts() if m.fstype == fstype]


# ---------------------------------------------------------------- seccomp

from agent.compile.bpf import (AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW,  # noqa: E402
                               SECCOMP_RET_ERRNO, SECCOMP_RET_USER_NOTIF)
from agent.enforce.seccomp_load import (SECCOMP_FILTER_FLAG_NEW_LISTENER,  # noqa: E402
                                        SECCOMP_SET_MODE_FILTER)
from agent.launch.notify import IOCTL_NOTIF_ID_VALID as SECCOMP_IOCTL_NOTIF_ID_VALID  # noqa: E402
from agent.launch.notify import IOCTL_NOTIF_RECV as SECCOMP_IOCTL_NOTIF_RECV  # noqa: E402
from agent.launch.notify import IOCTL_NOTIF_SEND as SECCOMP_IOCTL_NOTIF_SEND  # noqa: E402

SECCOMP_GET_NOTIF_SIZES = 3
# _IOW('!', 3, struct seccomp_notif_addfd), include/uapi/linux/seccomp.h; only doctor uses it
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103

PROBE_COOKIE = 0x5ECC0DE  # getppid() ignores its argument; the filter matches only this value
DENY_ERRNO = errno.EKEYREJECTED  # unusual, so it can only have come from our filter


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _cookie_filter(action: int) -> bytes:
    """Classic BPF: `action` for getppid(PROBE_COOKIE) on x86_64, allow everything else."""
    def insn(code, jt, jf, k):
        return struct.pack("<HBBI", code, jt, jf, k)
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    return b"".join([
        insn(ld_abs, 0, 0, 4),                        # seccomp_data.arch
        insn(jeq, 0, 5, AUDIT_ARCH_X86_64),
        insn(ld_abs, 0, 0, 0),                        # seccomp_data.nr
        insn(jeq, 0, 3, libc.NR["getppid"]),
        insn(ld_abs, 0, 0, 16),                       # low half of args[0] (little endian)
        insn(jeq, 0, 1, PROBE_COOKIE),
        insn(ret, 0, 0, action),
        insn(ret, 0, 0, SECCOMP_RET_ALLOW),
    ])


def _install_filter(program: bytes, flags: int = 0) -> int:
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    try:
        return libc.syscall("seccomp", ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags),
                            ctypes.byref(fprog))
    except OSError as exc:
        raise _step(f"from seccomp(SET_MODE_FILTER, flags={flags:#x})", exc) from None


def _getppid_cookie() -> int:
    return libc.syscall("getppid", ctypes.c_long(PROBE_COOKIE))


def probe_seccomp() -> Probe:
    def body():
        _install_filter(_cookie_filter(SECCOMP_RET_ERRNO | DENY_ERRNO))
        try:
            _getppid_cookie()
        except OSError as exc:
            if exc.errno != DENY_ERRNO:
                raise ProbeError(f"filtered syscall failed with {_errno_text(exc)}, "
                                 f"expected {errno.errorcode[DENY_ERRNO]}") from None
        else:
            raise ProbeError("filter loaded but the denied syscall succeeded")
        if libc.prctl(libc.PR_GET_SECCOMP) != 2:
            raise ProbeError("filter loaded but PR_GET_SECCOMP does not report filter mode")
        return True
    try:
        _in_child(body)
    except ProbeError as exc:
        return Probe("seccomp", False, str(exc))
    actions = _read_text("/proc/sys/kernel/seccomp/actions_avail") or "unknown"
    return Probe("seccomp", True, f"filter denied a syscall with {errno.errorcode[DENY_ERRNO]}; "
                                  f"actions: {actions}; {_libseccomp_version()}")


def _libseccomp_version() -> str:
    try:
        import pyseccomp
    except ImportError:
        return "pyseccomp not importable"
    return f"pyseccomp {getattr(pyseccomp, '__version__', '?')} (libseccomp API level {pyseccomp.get_api()})"


def _notif_sizes() -> tuple[int, int, int]:
    sizes = ctypes.create_string_buffer(6)
    libc.syscall("seccomp", ctypes.c_long(SECCOMP_GET_NOTIF_SIZES), ctypes.c_long(0), sizes)
    return struct.unpack("<HHH", sizes.raw)


def probe_seccomp_notify() -> Probe:
    def supervisor():
        info_r, info_w = os.pipe()
        go_r, go_w = os.pipe()

        def target():
            listener = _install_filter(_cookie_filter(SECCOMP_RET_USER_NOTIF),
                                       SECCOMP_FILTER_FLAG_NEW_LISTENER)
            os.write(info_w, str(listener).encode())
            os.read(go_r, 1)
            answer = _getppid_cookie()  # blocks until the supervisor responds
            try:
                got_devnull = os.fstat(answer).st_rdev == os.stat("/dev/null").st_rdev
            except OSError:
                got_devnull = False
            return {"answer": answer, "got_devnull": got_devnull}

        pid, result_fd = _fork_call(target)
        os.close(info_w)  # so a target that dies early shows up as EOF
        os.close(go_r)
        deadline = time.monotonic() + PROBE_TIMEOUT - 1
        try:
            remote_fd = int(_read_some(info_r, deadline) or b"-1")
            if remote_fd < 0:
                failure, result_fd = _collect_error(pid, result_fd), None
                raise ProbeError(f"target failed before sending its listener fd: {failure}")
            try:
                pidfd = libc.syscall("pidfd_open", ctypes.c_long(pid), ctypes.c_long(0))
                listener = libc.syscall("pidfd_getfd", ctypes.c_long(pidfd), ctypes.c_long(remote_fd),
                                        ctypes.c_long(0))
            except OSError as exc:
                raise _step("fetching the listener fd with pidfd_getfd", exc) from None
            os.close(pidfd)
            os.write(go_w, b"g")
            if not select.select([listener], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise ProbeError("no notification arrived on the listener fd")
            notif = bytearray(80)
            _ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, notif, "SECCOMP_IOCTL_NOTIF_RECV")
            notif_id, notif_pid, _flags, nr, _arch, _ip, arg0 = struct.unpack_from("<QIIiIQQ", notif)
            if nr != libc.NR["getppid"] or arg0 != PROBE_COOKIE:
                raise ProbeError(f"notification for syscall {nr} arg {arg0:#x}, expected getppid cookie")
            _ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("<Q", notif_id)),
                   "SECCOMP_IOCTL_NOTIF_ID_VALID")
            devnull = os.open("/dev/null", os.O_RDONLY)
            try:
                addfd = bytearray(struct.pack("<QIIII", notif_id, 0, devnull, 0, 0))
                answer = fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, addfd, True)
                addfd_note = "ADDFD works"
            except OSError as exc:
                answer, addfd_note = 42, f"ADDFD failed: {_errno_text(exc)}"
            resp = bytearray(struct.pack("<QqiI", notif_id, answer, 0, 0))
            _ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp, "SECCOMP_IOCTL_NOTIF_SEND")
            got = _collect(pid, result_fd, max(deadline - time.monotonic(), 0.1))
            result_fd = None
        finally:
            if result_fd is not None:
                _kill_and_reap(pid, result_fd)
        if got["answer"] != answer:
            raise ProbeError(f"target got {got['answer']} instead of the supervisor's answer {answer}")
        if addfd_note == "ADDFD works" and not got["got_devnull"]:
            addfd_note = "ADDFD returned an fd that is not the supervisor's /dev/null"
        if notif_pid != pid:
            raise ProbeError(f"notification names pid {notif_pid}, expected {pid}")
        return addfd_note

    try:
        addfd_note = _in_child(supervisor)
        sizes = _notif_sizes()
    except ProbeError as exc:
        return Probe("seccomp-notify", False, str(exc))
    except OSError as exc:
        return Probe("seccomp-notify", False, f"{_errno_text(exc)} from SECCOMP_GET_NOTIF_SIZES")
    return Probe("seccomp-notify", True,
                 "listener fd taken with pidfd_getfd; notification received, ID_VALID checked, "
                 f"answer delivered; {addfd_note}; notif sizes (notif, resp, data) = {sizes}")


def _read_some(fd: int, deadline: float) -> bytes:
    left = max(deadline - time.monotonic(), 0)
    if not select.select([fd], [], [], left)[0]:
        raise ProbeError("peer process did not answer in time")
    return os.read(fd, 4096)


def _collect_error(pid: int, read_fd: int) -> str:
    try:
        return str(_collect(pid, read_fd, 1.0))
    except ProbeError as exc:
        return str(exc)


def _kill_and_reap(pid: int, read_fd: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os.close(read_fd)


def _ioctl(fd: int, request: int, buf: bytearray, name: str) -> int:
    """ioctl with an in/out buffer; returns the ioctl's own result."""
    try:
        return fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        raise _step(f"from {name}", exc) from None


# ---------------------------------------------------------------- Landlock

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS_READ_FILE = 1 << 2
LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0
LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1
LANDLOCK_SCOPE_SIGNAL = 1 << 1
LANDLOCK_RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1 << 0

LANDLOCK_ABI_FEATURES = {
    1: "filesystem access rights",
    2: "file reparenting (REFER)",
    3: "truncate",
    4: "TCP bind/connect ports",
    5: "ioctl on devices (IOCTL_DEV)",
    6: "scopes: abstract unix sockets, signals",
    7: "audit logging flags for restrict_self",
}


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; OSError if Landlock is absent or disabled."""
    return libc.syscall("landlock_create_ruleset", ctypes.c_void_p(), ctypes.c_long(0),
                        ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION))


def probe_landlock() -> Probe:
    try:
        abi = landlock_abi()
    except OSError as exc:
        why = {errno.ENOSYS: "not built into this kernel (CONFIG_SECURITY_LANDLOCK)",
               errno.EOPNOTSUPP: "built in but not enabled at boot (add landlock to lsm=)"}
        return Probe("landlock", False, f"{_errno_text(exc)}: {why.get(exc.errno, 'ABI query failed')}")

    def body():
        import shutil
        import socket
        import tempfile
        top = tempfile.mkdtemp(prefix="skillguard-doctor-")
        try:
            for sub in ("allowed", "denied"):
                os.mkdir(f"{top}/{sub}")
                Path(f"{top}/{sub}/file").write_text("x")
            handled_net = (LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP) if abi >= 4 else 0
            scoped = LANDLOCK_SCOPE_SIGNAL if abi >= 6 else 0
            attr = struct.pack("<QQQ", LANDLOCK_ACCESS_FS_READ_FILE, handled_net, scoped)
            attr_len = 24 if abi >= 6 else 16 if abi >= 4 else 8
            attr_buf = ctypes.create_string_buffer(attr[:attr_len], attr_len)
            try:
                ruleset = libc.syscall("landlock_create_ruleset", attr_buf, ctypes.c_long(attr_len),
                                       ctypes.c_long(0))
                allowed_dir = os.open(f"{top}/allowed", os.O_PATH | os.O_DIRECTORY)
                rule = ctypes.create_string_buffer(struct.pack("<Qi", LANDLOCK_ACCESS_FS_READ_FILE,
                                                               allowed_dir), 12)
                libc.syscall("landlock_add_rule", ctypes.c_long(ruleset),
                             ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_long(0))
                libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
                flags = LANDLOCK_RESTRICT_SELF_LOG_SAME_EXEC_OFF if abi >= 7 else 0
                libc.syscall("landlock_restrict_self", ctypes.c_long(ruleset), ctypes.c_long(flags))
            except OSError as exc:
                raise ProbeError(_oserror_text(exc)) from None
            checks = []
            Path(f"{top}/allowed/file").read_text()
            checks.append(_expect_denied("read outside the granted dir",
                                         lambda: Path(f"{top}/denied/file").read_text(), errno.EACCES))
            if abi >= 4:
                def connect():
                    with socket.socket() as sock:
                        sock.connect(("127.0.0.1", 9))
                checks.append(_expect_denied("TCP connect", connect, errno.EACCES))
            if abi >= 6:
                checks.append(_expect_denied("signal to parent", lambda: os.kill(os.getppid(), 0),
                                             errno.EPERM))
            if abi >= 7:
                checks.append("restrict_self log flags accepted")
            return checks
        finally:
            shutil.rmtree(top, ignore_errors=True)

    try:
        checks = _in_child(body)
    except ProbeError as exc:
        return Probe("landlock", False, f"ABI {abi}; enforcing failed: {exc}")
    features = ", ".join(f"v{v} {text}" for v, text in LANDLOCK_ABI_FEATURES.items() if v <= abi)
    newer = f"; ABI {abi} has features newer than v{max(LANDLOCK_ABI_FEATURES)} not used" \
        if abi > max(LANDLOCK_ABI_FEATURES) else ""
    return Probe("landlock", True, f"ABI {abi}; enforced: {'; '.join(checks)}; features: {features}{newer}")


def _expect_denied(what: str, action: Callable[[], object], expected: int) -> str:
    try:
        action()
    except OSError as exc:
        if exc.errno == expected:
            return f"{what} denied ({errno.errorcode[expected]})"
        raise ProbeError(f"{what}: got {_errno_text(exc)}, expected {errno.errorcode[expected]}") from None
    raise ProbeError(f"{what} was allowed under Landlock")


# ---------------------------------------------------------------- BPF via raw bpf(2)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_RAW_TRACEPOINT_OPEN = 17

BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_LSM = 29

BPF_CGROUP_INET4_CONNECT = 10
BPF_TRACE_FENTRY = 24
BPF_LSM_MAC = 27

BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_send_signal = 109


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _return(value: int) -> bytes:
    """r0 = value; exit"""
    return _insn(0xB7, 0, imm=value) + _insn(0x95)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    return libc.syscall("bpf", ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))


def bpf_prog_load(prog_type: int, insns: bytes, *, expected_attach_type: int = 0,
                  attach_btf_id: int = 0, what: str = "program") -> int:
    """BPF_PROG_LOAD; on failure ProbeError with errno and the verifier's last words."""
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(16384)
    # union bpf_attr, BPF_PROG_LOAD part (include/uapi/linux/bpf.h)
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(license_), 1, len(log), ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, b"skillguard_doc")
    struct.pack_into("<I", attr, 68, expected_attach_type)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    try:
        return _bpf(BPF_PROG_LOAD, bytes(attr))
    except OSError as exc:
        lines = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()]
        tail = f"; verifier: {lines[-1]}" if lines else ""
        raise ProbeError(f"{_errno_text(exc)} loading {what}{tail}") from None


def _bpf_array_map(value_size: int = 8) -> int:
    return _bpf(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_ARRAY, 4, value_size, 1, 0))


def _bpf_map_lookup_u64(map_fd: int, key: int = 0) -> int:
    key_buf = ctypes.create_string_buffer(struct.pack("<I", key), 4)
    value = ctypes.create_string_buffer(8)
    _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key_buf),
                                          ctypes.addressof(value), 0))
    return struct.unpack("<Q", value.raw)[0]


def _counting_program(map_fd: int) -> bytes:
    """Adds 1 to element 0 of an array map each run, returns 0."""
    return b"".join([
        _insn(0x62, 10, off=-4, imm=0),            # *(u32 *)(r10 - 4) = 0
        _insn(0xBF, 2, 10),                        # r2 = r10
        _insn(0x07, 2, imm=-4),                    # r2 += -4
        _insn(0x18, 1, 1, imm=map_fd), _insn(0),   # r1 = map (BPF_PSEUDO_MAP_FD)
        _insn(0x85, imm=BPF_FUNC_map_lookup_elem),
        _insn(0x15, 0, off=2, imm=0),              # if r0 == 0 goto out
        _insn(0xB7, 1, imm=1),                     # r1 = 1
        _insn(0xDB, 0, 1, imm=0),                  # lock *(u64 *)(r0 + 0) += r1
        _return(0),                                # out:
    ])


def _raw_tp_attach(prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN with name NULL attaches tracing/LSM programs to their BTF target."""
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QII", 0, prog_fd, 0))


# ---------------------------------------------------------------- BTF

BTF_KIND_FUNC = 12
# bytes that follow `struct btf_type` for each kind (include/uapi/linux/btf.h)
_BTF_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_BTF_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}

_btf_cache: dict[tuple[str, str], int] = {}  # (BTF file, function name) -> type id


def btf_func_ids(names: tuple[str, ...], path: str = "/sys/kernel/btf/vmlinux") -> dict[str, int]:
    """Type ids of the named BTF_KIND_FUNC entries in the kernel's BTF."""
    missing = [n for n in names if (path, n) not in _btf_cache]
    if missing:
        with open(path, "rb") as handle:
            data = handle.read()
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
        if magic != 0xEB9F:
            raise ProbeError(f"{path} is not little-endian BTF (magic {magic:#x})")
        strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        wanted = {}
        for name in missing:
            at = strings.find(b"\0" + name.encode() + b"\0")
            if at >= 0:
                wanted[at + 1] = name
        pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
        unpack = struct.unpack_from
        while pos < end and wanted:
            name_off, info = unpack("<II", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind == BTF_KIND_FUNC and name_off in wanted:
                _btf_cache[path, wanted.pop(name_off)] = type_id
            pos += 12 + _BTF_FIXED_EXTRA.get(kind, 0) + vlen * _BTF_PER_MEMBER.get(kind, 0)
            type_id += 1
    return {n: _btf_cache[path, n] for n in names if (path, n) in _btf_cache}


def _btf_target(candidates: tuple[str, ...]) -> tuple[str, int]:
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise ProbeError("/sys/kernel/btf/vmlinux missing (kernel built without CONFIG_DEBUG_INFO_BTF)")
    ids = btf_func_ids(candidates)
    for name in candidates:
        if name in ids:
            return name, ids[name]
    raise ProbeError(f"none of {', '.join(candidates)} found in kernel BTF")


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _securityfs_file(name: str) -> tuple[str | None, str]:
    """Read /sys/kernel/security/<name>; mounts securityfs privately if the host has not.
    Must run in a probe child (it may unshare the mount namespace)."""
    path = f"/sys/kernel/security/{name}"
    if os.path.exists(path):
        return _read_text(path), "securityfs"
    if not _mounts_of("securityfs"):
        _private_mount_ns()
        _mount("securityfs", "/sys/kernel/security", "securityfs")
        return _read_text(path), "securityfs not mounted on host; read via a private mount"
    return None, f"{path} missing"


def _lockdown_mode() -> str | None:
    """"lockdown: integrity" from "none [integrity] confidentiality" (security/lockdown)."""
    text, _ = _securityfs_file("lockdown")
    if not text:
        return None
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return f"lockdown: {chosen[0] if chosen else text}"


def probe_bpf_lsm() -> Probe:
    def body():
        lsms, how = _securityfs_file("lsm")
        lockdown = _lockdown_mode()
        notes = [f"active LSMs: {lsms} ({how})" if lsms is not None else f"LSM list unknown ({how})"]
        if lockdown:
            notes.append(lockdown)
        in_list = lsms is not None and "bpf" in lsms.split(",")
        if lsms is not None and not in_list:
            notes.append('"bpf" not in the active LSM list')
        hook, btf_id = _btf_target(("bpf_lsm_file_open",))
        try:
            prog = bpf_prog_load(BPF_PROG_TYPE_LSM, _return(0), expected_attach_type=BPF_LSM_MAC,
                                 attach_btf_id=btf_id, what=f"BPF_PROG_TYPE_LSM for {hook} (BTF id {btf_id})")
            try:
                os.close(_raw_tp_attach(prog))
            except OSError as exc:
                raise _step(f"attaching BPF_PROG_TYPE_LSM to {hook}", exc) from None
        except ProbeError as exc:
            return [False, "; ".join(notes + [str(exc)])]
        return [in_list, "; ".join(notes + [f"LSM program loaded and attached to {hook}"])]
    return _probe_pair("bpf-lsm", body)


def probe_bpf_fentry() -> Probe:
    def body():
        lockdown = _lockdown_mode()
        notes = [lockdown] if lockdown else []
        name, btf_id = _btf_target(("security_file_open", "vfs_read"))
        try:
            prog = bpf_prog_load(BPF_PROG_TYPE_TRACING, _return(0), expected_attach_type=BPF_TRACE_FENTRY,
                                 attach_btf_id=btf_id, what=f"fentry program for {name} (BTF id {btf_id})")
            try:
                os.close(_raw_tp_attach(prog))
            except OSError as exc:
                raise _step(f"attaching fentry to {name}", exc) from None
        except ProbeError as exc:
            return [False, "; ".join(notes + [str(exc)])]
        return [True, "; ".join(notes + [f"fentry program loaded and attached to {name}"])]
    return _probe_pair("bpf-fentry", body)


def _probe_pair(layer: str, body: Callable[[], list], timeout: float = PROBE_TIMEOUT) -> Probe:
    try:
        ok, detail = _in_child(body, timeout)
    except ProbeError as exc:
        return Probe(layer, False, str(exc))
    return Probe(layer, bool(ok), detail)


# ---------------------------------------------------------------- cgroup BPF

def probe_cgroup_bpf() -> Probe:
    try:
        v2 = cgroupfs.cgroup_mounts().v2
    except (OSError, ValueError) as exc:
        return Probe("cgroup-bpf", False, f"cannot read mountinfo: {exc}")
    if v2 is None:
        return Probe("cgroup-bpf", False, "no cgroup2 mount in /proc/self/mountinfo")
    cgroup_dir = v2 / f"skillguard-doctor-{os.getpid()}-{time.monotonic_ns()}"

    def body():
        import socket
        prog = bpf_prog_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, _return(0),
                             expected_attach_type=BPF_CGROUP_INET4_CONNECT,
                             what="BPF_PROG_TYPE_CGROUP_SOCK_ADDR (connect4)")
        try:
            os.mkdir(cgroup_dir)
        except OSError as exc:
            raise _step(f"creating {cgroup_dir}", exc) from None
        dir_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        attach = struct.pack("<IIIII", dir_fd, prog, BPF_CGROUP_INET4_CONNECT, 0, 0)
        try:
            _bpf(BPF_PROG_ATTACH, attach)
        except OSError as exc:
            raise _step("attaching connect4 to a cgroup v2 directory", exc) from None

        def inside():
            Path(cgroup_dir, "cgroup.procs").write_text("0")  # "0" moves the writer (cgroup-v2.rst)
            with socket.socket() as sock:  # cgroup of a socket is fixed at creation
                try:
                    sock.connect(("127.0.0.1", 9))
                except OSError as exc:
                    return exc.errno
            return 0

        got = _in_child(inside)
        try:
            _bpf(BPF_PROG_DETACH, attach)
        except OSError as exc:
            raise _step("detaching the connect4 program", exc) from None
        if got != errno.EPERM:
            name = errno.errorcode.get(got, "success") if got else "success"
            raise ProbeError(f"connect() inside the cgroup gave {name}, expected EPERM from the program")
        return "connect4 program attached to a fresh cgroup; connect() inside it got EPERM; detached"

    try:
        detail = _in_child(body)
        ok = True
    except ProbeError as exc:
        detail, ok = str(exc), False
    finally:
        _remove_cgroup(cgroup_dir)
    return Probe("cgroup-bpf", ok, f"{detail} (cgroup2 at {v2})")


def _remove_cgroup(path: Path) -> None:
    # rmdir can see EBUSY for a moment after the last task was reaped.
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return
            time.sleep(0.01)


# ---------------------------------------------------------------- syscall tracepoints

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400      # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)
TRACEPOINT = "syscalls/sys_enter_openat"


def _tracefs_root() -> tuple[Path, str]:
    """Must run in a probe child: mounts tracefs privately if the host has not."""
    for mount_point in _mounts_of("tracefs"):
        return mount_point, f"tracefs at {mount_point}"
    debugfs = _mounts_of("debugfs")
    if debugfs and (debugfs[0] / "tracing" / "events").is_dir():
        return debugfs[0] / "tracing", f"tracefs via debugfs at {debugfs[0]}"
    _private_mount_ns()
    _mount("tracefs", "/sys/kernel/tracing", "tracefs")
    return Path("/sys/kernel/tracing"), "tracefs not mounted on host; used a private mount"


def probe_syscall_tracepoints() -> Probe:
    def body():
        root, how = _tracefs_root()
        id_path = root / "events" / TRACEPOINT / "id"
        try:
            tp_id = int(id_path.read_text())
        except OSError as exc:
            raise _step(f"reading {id_path}", exc) from None
        counter = _bpf_array_map()
        prog = bpf_prog_load(BPF_PROG_TYPE_TRACEPOINT, _counting_program(counter),
                             what="BPF_PROG_TYPE_TRACEPOINT")
        attr = bytearray(128)  # struct perf_event_attr; size 128 = PERF_ATTR_SIZE_VER7
        struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, len(attr), tp_id, 1)
        attr_buf = ctypes.create_string_buffer(bytes(attr), len(attr))
        try:
            # pid 0, cpu -1: this process on any CPU
            event = libc.syscall("perf_event_open", attr_buf, ctypes.c_long(0), ctypes.c_long(-1),
                                 ctypes.c_long(-1), ctypes.c_long(PERF_FLAG_FD_CLOEXEC))
            fcntl.ioctl(event, PERF_EVENT_IOC_SET_BPF, prog)
            fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except OSError as exc:
            raise ProbeError(f"{_errno_text(exc)} attaching to {TRACEPOINT} via perf_event_open") from None
        for _ in range(3):
            os.close(os.open("/dev/null", os.O_RDONLY))
        runs = _bpf_map_lookup_u64(counter)
        os.close(event)
        if runs < 3:
            raise ProbeError(f"program attached to {TRACEPOINT} ran {runs} times for 3 openat calls")
        send_signal = _helper_loads(BPF_PROG_TYPE_TRACEPOINT, BPF_FUNC_send_signal, "bpf_send_signal")
        return f"{how}; program on {TRACEPOINT} ran for every openat; {send_signal}"
    try:
        return Probe("syscall-tracepoints", True, _in_child(body))
    except ProbeError as exc:
        return Probe("syscall-tracepoints", False, str(exc))


def _helper_loads(prog_type: int, helper: int, name: str) -> str:
    insns = _insn(0xB7, 1, imm=0) + _insn(0x85, imm=helper) + _return(0)
    try:
        os.close(bpf_prog_load(prog_type, insns, what=name))
    except ProbeError as exc:
        return f"{name} unavailable: {exc}"
    return f"{name} available"


# ---------------------------------------------------------------- networking

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def probe_nftables() -> Probe:
    def body():
        _unshare(CLONE_NEWNET)  # a fresh netns: the host ruleset is never touched
        try:
            import nftables
        except ImportError as exc:
            return [False, f"python3-nftables not installed ({exc}); {_nft_binary()}"]
        nft = nftables.Nftables()
        rc, _, err = nft.cmd("add table inet skillguard_doctor")
        if rc != 0:
            return [False, f"libnftables could not add a table in a fresh netns: {err.strip()}"]
        rc, out, err = nft.cmd("list ruleset")
        if rc != 0 or "skillguard_doctor" not in out:
            return [False, f"libnftables list ruleset failed: {err.strip() or 'table missing'}"]
        return [True, "python3-nftables: added and listed a table in a fresh netns"]
    return _probe_pair("nftables", body)


def _nft_binary() -> str:
    import shutil
    import subprocess
    nft = shutil.which("nft")
    if nft is None:
        return "no nft binary either"
    done = subprocess.run([nft, "list", "ruleset"], capture_output=True, text=True, timeout=3)
    if done.returncode == 0:
        return f"{nft} list ruleset works in a fresh netns"
    return f"{nft} list ruleset failed: {done.stderr.strip()}"


def probe_netns() -> Probe:
    def body():
        import socket
        _unshare(CLONE_NEWNET)
        names = [name for _, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            req = bytearray(struct.pack("16sh22x", b"lo", 0))  # struct ifreq
            try:
                fcntl.ioctl(sock, SIOCGIFFLAGS, req, True)
                flags = struct.unpack_from("h", req, 16)[0]
                struct.pack_into("h", req, 16, flags | IFF_UP)
                fcntl.ioctl(sock, SIOCSIFFLAGS, req, True)
            except OSError as exc:
                raise _step("bringing up lo", exc) from None
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.connect(server.getsockname())
            server.accept()[0].close()
        return f"new netns has interfaces {names}; lo up, loopback TCP works"
    try:
        return Probe("netns", True, _in_child(body))
    except ProbeError as exc:
        return Probe("netns", False, str(exc))


# ---------------------------------------------------------------- cgroups

LIMIT_CONTROLLERS = ("memory", "pids", "cpu")


def probe_cgroups() -> list[Probe]:
    try:
        mounts = cgroupfs.cgroup_mounts()
    except (OSError, ValueError) as exc:
        failed = f"cannot read /proc/self/mountinfo: {exc}"
        return [Probe(layer, False, failed) for layer in ("cgroup-v2", "cgroup-v1", "cgroup-limits")]
    v2_controllers: list[str] = []
    if mounts.v2 is None:
        v2 = Probe("cgroup-v2", False, "no cgroup2 mount in /proc/self/mountinfo")
    else:
        text = _read_text(str(mounts.v2 / "cgroup.controllers"))
        if text is None:
            v2 = Probe("cgroup-v2", False, f"mounted at {mounts.v2} but cgroup.controllers unreadable")
        else:
            v2_controllers = text.split()
            listed = f"controllers: {' '.join(v2_controllers)}" if v2_controllers else \
                "no controllers (hybrid host)"
            v2 = Probe("cgroup-v2", True, f"mounted at {mounts.v2}; {listed}")

    found_v1 = {c: str(mounts.v1[c]) for c in LIMIT_CONTROLLERS if c in mounts.v1}
    if found_v1:
        missing = [c for c in LIMIT_CONTROLLERS if c not in found_v1]
        v1 = Probe("cgroup-v1", True, "; ".join(f"{c} at {p}" for c, p in found_v1.items())
                   + (f"; not mounted: {', '.join(missing)}" if missing else ""))
    else:
        v1 = Probe("cgroup-v1", False, f"no v1 hierarchy for {', '.join(LIMIT_CONTROLLERS)}")

    places = []
    for controller in LIMIT_CONTROLLERS:
        if controller in v2_controllers:
            places.append(f"{controller}: v2")
        elif controller in mounts.v1:
            # A controller lives in one hierarchy at a time; it can only move to v2 once its
            # v1 hierarchy is unmounted (kernel/cgroup/cgroup.c: rebind_subsystems).
            places.append(f"{controller}: v1 (cannot be delegated to v2 while its v1 hierarchy is mounted)")
        else:
            places.append(f"{controller}: unavailable")
    ok = not any(p.endswith("unavailable") for p in places)
    return [v2, v1, Probe("cgroup-limits", ok, "; ".join(places))]


# ---------------------------------------------------------------- bcc

BCC_PROGRAM = "int skillguard_probe(void *ctx) { return 0; }"


def probe_bcc() -> Probe:
    build = Path(f"/lib/modules/{os.uname().release}/build")
    headers = f"{build} present" if build.exists() else f"{build} missing (no kernel headers)"

    def body():
        import tempfile
        captured = tempfile.TemporaryFile()
        os.dup2(captured.fileno(), 1)  # bcc and clang print straight to fds 1 and 2
        os.dup2(captured.fileno(), 2)
        try:
            import bcc
        except ImportError as exc:
            return [False, f"python3-bpfcc not installed ({exc})"]
        version = getattr(bcc, "__version__", "?")
        try:
            bpf = bcc.BPF(text=BCC_PROGRAM)
            bpf.load_func("skillguard_probe", bcc.BPF.SOCKET_FILTER)
        except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception
            captured.seek(0)
            lines = [ln for ln in captured.read().decode(errors="replace").splitlines() if ln.strip()]
            said = f"; bcc said: {lines[-1].strip()}" if lines else ""
            return [False, f"bcc {version} imports but cannot compile: {exc}{said}"]
        return [True, f"bcc {version} compiled and loaded a program"]

    probe = _probe_pair("bcc", body, BCC_TIMEOUT)
    if probe.detail.startswith("timed out"):
        probe = Probe("bcc", False, f"compiling a trivial program {probe.detail}")
    return Probe("bcc", probe.ok, f"{probe.detail}; {headers}")


# ---------------------------------------------------------------- host facts

CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
NEEDED_CAPS = ("SYS_ADMIN", "NET_ADMIN", "BPF", "PERFMON", "SETUID", "SETGID", "KILL")


def effective_caps(status_text: str) -> set[str]:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            bits = int(line.split()[1], 16)
            return {name for bit, name in enumerate(CAP_NAMES) if bits >> bit & 1}
    return set()


def probe_privileges() -> Probe:
    caps = effective_caps(_read_text("/proc/self/status") or "")
    missing_needed = [c for c in NEEDED_CAPS if c not in caps]
    missing_other = [c for c in CAP_NAMES if c not in caps and c not in NEEDED_CAPS]
    parts = [f"euid {os.geteuid()}"]
    if missing_needed:
        parts.append(f"missing needed capabilities: {', '.join('CAP_' + c for c in missing_needed)}")
    else:
        parts.append("has CAP_" + ", CAP_".join(NEEDED_CAPS))
    if missing_other:
        parts.append(f"also lacks: {', '.join('CAP_' + c for c in missing_other)}")
    return Probe("privileges", os.geteuid() == 0 and not missing_needed, "; ".join(parts))


def probe_kernel() -> Probe:
    uname = os.uname()
    return Probe("kernel", True, f"Linux {uname.release} {uname.machine} ({uname.version})")


def probe_unprivileged_bpf() -> Probe:
    value = _read_text("/proc/sys/kernel/unprivileged_bpf_disabled")
    meaning = {"0": "unprivileged bpf() allowed (skills are still denied bpf by seccomp)",
               "1": "unprivileged bpf() disabled until reboot",
               "2": "unprivileged bpf() disabled (an admin may re-enable it)"}
    if value is None:
        return Probe("unprivileged-bpf", False, "kernel.unprivileged_bpf_disabled unreadable")
    return Probe("unprivileged-bpf", value != "0",
                 f"kernel.unprivileged_bpf_disabled={value}: {meaning.get(value, 'unknown value')}")


def probe_userns() -> Probe:
    facts = [f"user.max_user_namespaces={_read_text('/proc/sys/user/max_user_namespaces')}"]
    clone = _read_text("/proc/sys/kernel/unprivileged_userns_clone")
    facts.append(f"kernel.unprivileged_userns_clone={clone}" if clone is not None
                 else "no kernel.unprivileged_userns_clone (not a Debian-patched kernel)")

    def body():
        _unshare(CLONE_NEWUSER)
        return True
    try:
        _in_child(body)
    except ProbeError as exc:
        return Probe("userns", False, f"cannot create a user namespace: {exc}; {'; '.join(facts)}")
    return Probe("userns", True, f"user namespace created; {'; '.join(facts)}")


# ---------------------------------------------------------------- entry points

def _guarded(layer: str, probe: Callable[[], Probe]) -> list[Probe]:
    try:
        result = probe()
    except ProbeError as exc:
        return [Probe(layer, False, str(exc))]
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
        return [Probe(layer, False, f"probe crashed: {type(exc).__name__}: {exc}")]
    return result if isinstance(result, list) else [result]


PROBES: tuple[tuple[str, Callable[[], Probe | list[Probe]]], ...] = (
    ("kernel", probe_kernel),
    ("privileges", probe_privileges),
    ("seccomp", probe_seccomp),
    ("seccomp-notify", probe_seccomp_notify),
    ("landlock", probe_landlock),
    ("bpf-lsm", probe_bpf_lsm),
    ("bpf-fentry", probe_bpf_fentry),
    ("cgroup-bpf", probe_cgroup_bpf),
    ("syscall-tracepoints", probe_syscall_tracepoints),
    ("nftables", probe_nftables),
    ("netns", probe_netns),
    ("cgroup-v2", probe_cgroups),  # also yields cgroup-v1 and cgroup-limits
    ("bcc", probe_bcc),
    ("userns", probe_userns),
    ("unprivileged-bpf", probe_unprivileged_bpf),
)

LAYERS = (
    "kernel", "privileges", "seccomp", "seccomp-notify", "landlock", "bpf-lsm", "bpf-fentry",
    "cgroup-bpf", "syscall-tracepoints", "nftables", "netns", "cgroup-v2", "cgroup-v1",
    "cgroup-limits", "bcc", "userns", "unprivileged-bpf",
)


def run_probes() -> list[Probe]:
    results: list[Probe] = []
    for layer, probe in PROBES:
        results.extend(_guarded(layer, probe))
    return results


def status_word(probe: Probe) -> str:
    if probe.ok:
        return "ok"
    return "no" if probe.layer in OPTIONAL_LAYERS else "FAIL"


def render_text(probes: list[Probe]) -> str:
    width = max([len("LAYER")] + [len(p.layer) for p in probes])
    lines = [f"{'LAYER':<{width}}  STATUS  DETAIL"]
    lines += [f"{p.layer:<{width}}  {status_word(p):<6}  {p.detail}" for p in probes]
    if any(status_word(p) == "no" for p in probes):
        lines.append("(no = optional layer unavailable; skillguard works without it)")
    return "\n".join(lines) + "\n"


def to_json(probes: list[Probe]) -> str:
    return json.dumps({"probes": [
        {"layer": p.layer, "ok": p.ok, "optional": p.layer in OPTIONAL_LAYERS, "detail": p.detail}
        for p in probes]}, indent=2)
