"""Landlock against the real kernel.

Every ruleset is applied in a forked child (a domain can never be lifted, so
the pytest process itself must stay unrestricted). The child sets
no_new_privs, applies the artifact, runs its probes and sends one JSON
object back through a pipe: probe name -> 0 on success or the errno.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import traceback

import pytest

from agent.compile.landlock import LandlockArtifact, PathRule, compile_landlock
from agent.enforce import landlock as enforce
from agent.enforce.libc import PR_SET_NO_NEW_PRIVS, prctl
from agent.manifest.model import DirGrant, FsPolicy, HostPattern, Policy, TcpPolicy, TcpRule

from tests.conftest import require


def run_confined(artifact: LandlockArtifact, probes) -> dict:
    """Fork; in the child apply `artifact`, then run probes(report) -> dict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            try:
                report = enforce.apply(artifact)
            except enforce.LandlockError as exc:
                result = {"apply_error": str(exc)}
            else:
                result = {"report": {"abi": report.abi, "dropped": list(report.dropped),
                                     "flags": list(report.restrict_flags),
                                     "rules": len(report.rules)}}
                result.update(probes(report))
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_end, data):]
        except BaseException:
            traceback.print_exc()
            status = 70
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        chunks.append(reader.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "confined child crashed (see stderr)"
    return json.loads(b"".join(chunks))


def attempt(action) -> int:
    """0 when `action()` succeeds, else its errno."""
    try:
        action()
        return 0
    except OSError as exc:
        return exc.errno


def read_file(path):
    with open(path, "rb") as handle:
        handle.read(1)


def write_file(path, mode="wb"):
    with open(path, mode) as handle:
        handle.write(b"x")


def connect_tcp(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))


def bind_tcp():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))


def connect_abstract(name: bytes):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(b"\0" + name)


def openat_from_root(relative):
    root_fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(os.open(relative, os.O_RDONLY | os.O_CLOEXEC, dir_fd=root_fd))
    finally:
        os.close(root_fd)


def run_exit(argv, cwd=None):
    done = subprocess.run(argv, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"{argv[0]} exited {done.returncode}: {done.stderr[-300:]!r}")


def kill_own_child():
    child = subprocess.Popen(["/usr/bin/sleep", "30"])
    try:
        os.kill(child.pid, signal.SIGTERM)
    finally:
        child.wait()


@pytest.fixture(scope="module")
def abi():
    require(os.geteuid() == 0, "Landlock kernel tests run as root")
    try:
        version = enforce.probe_abi()
    except enforce.LandlockUnsupported as exc:
        require(False, str(exc))
    require(version >= 1, "Landlock unavailable")
    return version


@pytest.fixture(scope="module")
def confined(abi, tmp_path_factory):
    """Run every probe once in one confined child; tests check the answers."""
    root = tmp_path_factory.mktemp("landlock")
    work, ref = root / "work", root / "ref"
    work.mkdir()
    ref.mkdir()
    (work / "existing.txt").write_text("work data")
    (ref / "data.txt").write_text("reference data")
    (work / "shadow-link").symlink_to("/etc/shadow")
    shutil.copy("/usr/bin/true", work / "mytrue")

    granted = socket.create_server(("127.0.0.1", 0))
    not_granted = socket.create_server(("127.0.0.1", 0))
    granted_port = granted.getsockname()[1]
    denied_port = not_granted.getsockname()[1]
    abstract_name = f"skillguard-landlock-test-{os.getpid()}".encode()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0" + abstract_name)
    abstract.listen(4)
    outsider = subprocess.Popen(["/usr/bin/sleep", "60"])

    policy = Policy(
        name="landlock-test", version="1",
        fs=FsPolicy(enabled=True, dirs=(DirGrant(str(work), "rw"), DirGrant(str(ref), "ro"))),
        tcp=TcpPolicy(enabled=True, allowlist=(TcpRule(
            HostPattern("127.0.0.1", networks=(ipaddress.ip_network("127.0.0.1/32"),)),
            granted_port, f"127.0.0.1:{granted_port}"),)),
    )
    artifact = compile_landlock(policy)
    deep_escape = f"{work}/" + "../" * 30 + "etc/shadow"

    def probes(report):
        return {
            "work_read": attempt(lambda: read_file(work / "existing.txt")),
            "work_write_new": attempt(lambda: write_file(work / "new.txt")),
            "work_append": attempt(lambda: write_file(work / "existing.txt", "ab")),
            "work_mkdir_rename": attempt(lambda: (os.mkdir(work / "d"),
                                                  os.rename(work / "new.txt", work / "d/n"))),
            "work_exec_copy": attempt(lambda: run_exit([str(work / "mytrue")])),
            "ref_read": attempt(lambda: read_file(ref / "data.txt")),
            "ref_listdir": attempt(lambda: os.listdir(ref)),
            "ref_write_new": attempt(lambda: write_file(ref / "new.txt")),
            "ref_write_existing": attempt(lambda: write_file(ref / "data.txt", "r+b")),
            "ref_truncate": attempt(lambda: os.truncate(ref / "data.txt", 0)),
            "ref_unlink": attempt(lambda: os.unlink(ref / "data.txt")),
            "shadow": attempt(lambda: read_file("/etc/shadow")),
            "root_listdir": attempt(lambda: os.listdir("/root")),
            "home_listdir": attempt(lambda: os.listdir("/home")),
            "ssl_private": attempt(lambda: os.listdir("/etc/ssl/private")),
            "dotdot_escape": attempt(lambda: read_file(deep_escape)),
            "symlink_in_work": attempt(lambda: read_file(work / "shadow-link")),
            "proc_self_root": attempt(lambda: read_file("/proc/self/root/etc/shadow")),
            "opath_root": attempt(lambda: os.close(os.open("/", os.O_PATH))),
            "openat_from_opath_root": attempt(lambda: openat_from_root("etc/shadow")),
            "passwd_read": attempt(lambda: read_file("/etc/passwd")),
            "dev_null_write": attempt(lambda: write_file("/dev/null")),
            "exec_python": attempt(lambda: run_exit(["/usr/bin/python3", "-c", "pass"])),
            "exec_python_stdlib": attempt(lambda: run_exit(
                ["/usr/bin/python3", "-c", "import ssl, json, locale, decimal, sqlite3"])),
            "exec_git": attempt(lambda: run_exit(["/usr/bin/git", "--version"])),
            "exec_ls_work": attempt(lambda: run_exit(["/usr/bin/ls", "-l", str(work)])),
            "tcp_not_granted": attempt(lambda: connect_tcp(denied_port)),
            "tcp_granted": attempt(lambda: connect_tcp(granted_port)),
            "tcp_bind": attempt(bind_tcp),
            "abstract_unix_outside": attempt(lambda: connect_abstract(abstract_name)),
            "kill_outside": attempt(lambda: os.kill(outsider.pid, 0)),
            "kill_outside_term": attempt(lambda: os.kill(outsider.pid, signal.SIGTERM)),
            "kill_own_child": attempt(kill_own_child),
        }

    try:
        results = run_confined(artifact, probes)
        # The outsider must have survived the child's SIGTERM attempt.
        results["outsider_alive"] = outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()
        for sock in (granted, not_granted, abstract):
            sock.close()
    assert "apply_error" not in results, results["apply_error"]
    return results


def test_abi_version_matches_probe(abi):
    assert enforce.abi_version() == abi


def test_applied_at_running_abi_with_audit_flag(confined, abi):
    report = confined["report"]
    assert report["abi"] == abi
    if abi >= 7:
        assert report["dropped"] == []
        assert report["flags"] == ["log_new_exec_on"]
    assert report["rules"] > 5


ALLOWED = ["work_read", "work_write_new", "work_append", "work_mkdir_rename", "ref_read",
           "ref_listdir", "opath_root", "passwd_read", "dev_null_write", "exec_python",
           "exec_python_stdlib", "exec_git", "exec_ls_work", "tcp_granted", "kill_own_child"]
DENIED = ["work_exec_copy", "ref_write_new", "ref_write_existing", "ref_unlink", "shadow",
          "root_listdir", "home_listdir", "dotdot_escape", "symlink_in_work", "proc_self_root",
          "openat_from_opath_root"]


@pytest.mark.parametrize("probe", ALLOWED)
def test_granted_access_works(confined, probe):
    assert confined[probe] == 0, f"{probe}: {errno.errorcode.get(confined[probe])}"


@pytest.mark.parametrize("probe", DENIED)
def test_ungranted_access_is_eacces(confined, probe):
    assert confined[probe] == errno.EACCES, f"{probe}: {errno.errorcode.get(confined[probe])}"


def test_ssl_private_keys_hidden(confined):
    require(os.path.isdir("/etc/ssl/private"), "/etc/ssl/private absent on this host")
    assert confined["ssl_private"] == errno.EACCES


def test_truncate_denied_in_ro_tree(confined, abi):
    require(abi >= 3, f"truncate needs Landlock ABI 3, kernel has {abi}")
    assert confined["ref_truncate"] == errno.EACCES


def test_tcp_connect_to_ungranted_port_denied(confined, abi):
    require(abi >= 4, f"TCP rules need Landlock ABI 4, kernel has {abi}")
    assert confined["tcp_not_granted"] == errno.EACCES
    assert confined["tcp_bind"] == errno.EACCES


def test_abstract_unix_socket_outside_domain_denied(confined, abi):
    require(abi >= 6, f"scopes need Landlock ABI 6, kernel has {abi}")
    # security/landlock/task.c: scoped denials return EPERM.
    assert confined["abstract_unix_outside"] == errno.EPERM


def test_signal_outside_domain_denied(confined, abi):
    require(abi >= 6, f"scopes need Landlock ABI 6, kernel has {abi}")
    assert confined["kill_outside"] == errno.EPERM
    assert confined["kill_outside_term"] == errno.EPERM
    assert confined["outsider_alive"] is True


# ------------------------------------------------------------ failing closed


def _artifact_with(rule: PathRule) -> LandlockArtifact:
    base = compile_landlock(Policy(name="t", version="1"))
    return LandlockArtifact(base.abi, base.handled_fs, base.path_rules + (rule,),
                            base.handled_net, base.connect_ports, base.scopes, base.notes)


def test_missing_manifest_path_fails_naming_it(abi, tmp_path):
    missing = str(tmp_path / "not-there")
    artifact = _artifact_with(PathRule(missing, ("read_file", "read_dir"), f"manifest:{missing}:ro"))
    result = run_confined(artifact, lambda report: {})
    assert missing in result["apply_error"]
    assert "No such file" in result["apply_error"]


def test_directory_right_on_a_file_is_einval_naming_it(abi):
    # The compiler masks this; bypass it to check the kernel rule and the
    # enforcer's message (landlock_add_rule(2): EINVAL).
    artifact = _artifact_with(PathRule("/etc/passwd", ("read_file", "read_dir"), "test"))
    result = run_confined(artifact, lambda report: {})
    assert "/etc/passwd" in result["apply_error"] and "EINVAL" in result["apply_error"]


def test_failed_apply_leaves_process_unrestricted(abi, tmp_path):
    missing = str(tmp_path / "not-there")
    artifact = _artifact_with(PathRule(missing, ("read_file",), "manifest"))

    def after_failure():
        return {"shadow": attempt(lambda: read_file("/etc/shadow"))}

    # apply raises before restrict_self, so no half-built domain exists: a
    # caller that ignored the error would run unconfined, which is why the
    # launcher must not exec after a LandlockError.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            try:
                enforce.apply(artifact)
                os.write(write_end, b"applied")
            except enforce.LandlockError:
                os.write(write_end, json.dumps(after_failure()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    assert json.loads(data) == {"shadow": 0}
