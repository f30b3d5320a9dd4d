"""`skillguard doctor` against the real kernel.

Each test compares what doctor says with a fact checked here by other means
(another library, /proc/mounts instead of mountinfo, the raw syscall), so the
expectations hold on any host, not only this one. Layers skillguard needs must
be ok: under CI=true a missing one fails, elsewhere it skips with the reason.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from agent import doctor
from agent.enforce import libc
from conftest import require

pytestmark = pytest.mark.root

PR_GET_NO_NEW_PRIVS = 39


def _caller_state() -> dict:
    return {
        "seccomp": libc.prctl(libc.PR_GET_SECCOMP),
        "no_new_privs": libc.prctl(PR_GET_NO_NEW_PRIVS),
        "namespaces": {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "mnt", "user")},
        "mountinfo": Path("/proc/self/mountinfo").read_text(),
    }


@pytest.fixture(scope="module")
def run():
    require(os.geteuid() == 0, "doctor probes need root")
    before = _caller_state()
    timings, probes = {}, []
    for layer, probe in doctor.PROBES:
        start = time.monotonic()
        probes.extend(doctor._guarded(layer, probe))
        timings[layer] = time.monotonic() - start
    return {"probes": {p.layer: p for p in probes}, "order": [p.layer for p in probes],
            "timings": timings, "before": before, "after": _caller_state()}


def needed(run, layer: str) -> doctor.Probe:
    probe = run["probes"][layer]
    require(probe.ok, f"{layer} unavailable on this host: {probe.detail}")
    return probe


def _fork_result(body) -> object:
    """Run body() in a child; return its value (json) or the text of its exception."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                value = {"value": body()}
            except BaseException as exc:  # noqa: BLE001
                value = {"error": repr(exc)}
            os.write(write_fd, json.dumps(value).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _proc_mounts(fstype: str) -> list[tuple[str, list[str]]]:
    """(mount point, options) from /proc/mounts: a different file from the one cgroupfs parses."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, target, kind, options = line.split()[:4]
        if kind == fstype:
            found.append((target.replace("\\040", " "), options.split(",")))
    return found


# ---------------------------------------------------------------- whole run

def test_every_layer_reported_once_in_order(run):
    assert run["order"] == list(doctor.LAYERS)
    for probe in run["probes"].values():
        assert isinstance(probe.ok, bool)
        assert probe.detail.strip(), f"{probe.layer} has no detail"


def test_json_is_valid_and_complete(run):
    probes = [run["probes"][layer] for layer in run["order"]]
    parsed = json.loads(doctor.to_json(probes))
    assert [entry["layer"] for entry in parsed["probes"]] == list(doctor.LAYERS)
    for entry in parsed["probes"]:
        assert entry["ok"] is run["probes"][entry["layer"]].ok
        assert entry["detail"] == run["probes"][entry["layer"]].detail
        assert entry["optional"] is (entry["layer"] in doctor.OPTIONAL_LAYERS)


def test_text_table_has_a_row_per_layer(run):
    probes = [run["probes"][layer] for layer in run["order"]]
    lines = doctor.render_text(probes).splitlines()
    for layer in doctor.LAYERS:
        assert any(line.split()[0] == layer for line in lines[1:] if line.strip()), layer


def test_probes_leave_the_caller_untouched(run):
    before, after = run["before"], run["after"]
    assert after["seccomp"] == before["seccomp"] == 0
    assert after["no_new_privs"] == before["no_new_privs"]
    assert after["namespaces"] == before["namespaces"]
    assert after["mountinfo"] == before["mountinfo"], "a probe mount leaked into the host namespace"
    with pytest.raises(ChildProcessError):  # every probe child was reaped
        os.waitpid(-1, os.WNOHANG)
    assert not list(Path("/tmp").glob("skillguard-doctor-*"))


def test_fast_enough_without_bcc(run):
    others = sum(t for layer, t in run["timings"].items() if layer != "bcc")
    assert others < 5.0, run["timings"]


# ---------------------------------------------------------------- host facts

def test_kernel_and_privileges(run):
    assert os.uname().release in run["probes"]["kernel"].detail
    privileges = run["probes"]["privileges"]
    assert f"euid {os.geteuid()}" in privileges.detail
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(l for l in status.splitlines() if l.startswith("CapEff:")).split()[1], 16)
    cap_sys_admin, cap_bpf = 21, 39
    if not (cap_eff >> cap_sys_admin & 1 and cap_eff >> cap_bpf & 1):
        assert not privileges.ok


def test_unprivileged_bpf_matches_sysctl(run):
    value = Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip()
    probe = run["probes"]["unprivileged-bpf"]
    assert f"unprivileged_bpf_disabled={value}" in probe.detail
    assert probe.ok is (value != "0")


def test_userns_reports_sysctl(run):
    value = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    assert f"max_user_namespaces={value}" in run["probes"]["userns"].detail


# ---------------------------------------------------------------- seccomp

def test_seccomp_agrees_with_libseccomp(run):
    """Deny getppid with libseccomp (not doctor's hand-written filter) in a child."""
    def raw():
        import pyseccomp
        flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        flt.add_rule(pyseccomp.ERRNO(errno.EXDEV), "getppid")
        flt.load()
        try:
            libc.syscall("getppid")  # raw: glibc's getppid() wrapper never reports errors
        except OSError as exc:
            return exc.errno
        return 0
    result = _fork_result(raw)
    kernel_filters = result.get("value") == errno.EXDEV
    assert run["probes"]["seccomp"].ok is kernel_filters, (result, run["probes"]["seccomp"].detail)
    needed(run, "seccomp")


def test_seccomp_notify_reports_a_target_that_fails(monkeypatch):
    def refuse(program, flags=0):
        raise doctor.ProbeError("EINVAL (simulated) from seccomp")
    monkeypatch.setattr(doctor, "_install_filter", refuse)
    probe = doctor.probe_seccomp_notify()
    assert not probe.ok
    assert probe.detail == "target failed before sending its listener fd: EINVAL (simulated) from seccomp"


def test_seccomp_notify(run):
    probe = needed(run, "seccomp-notify")
    assert "answer delivered" in probe.detail
    actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    assert "user_notif" in actions


# ---------------------------------------------------------------- Landlock

def test_landlock_abi_matches_raw_syscall(run):
    probe = run["probes"]["landlock"]
    try:
        abi = libc.syscall("landlock_create_ruleset", None, 0, 1)
    except OSError as exc:
        assert not probe.ok
        assert errno.errorcode[exc.errno] in probe.detail
        require(False, f"Landlock unavailable: {probe.detail}")
        return
    assert probe.detail.startswith(f"ABI {abi};")
    needed(run, "landlock")
    assert "read outside the granted dir denied (EACCES)" in probe.detail
    if abi >= 4:
        assert "TCP connect denied" in probe.detail


# ---------------------------------------------------------------- BPF

def _bcc_loads(text: str) -> str | None:
    """None when bcc loads and attaches `text`; else the error. Runs in a child."""
    def body():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import bcc
        bcc.BPF(text=text)  # LSM_PROBE / KFUNC_PROBE programs are loaded and attached here
        return None
    result = _fork_result(body)
    return result.get("error")


@pytest.mark.parametrize("layer, program", [
    ("bpf-lsm", 'LSM_PROBE(file_open, struct file *file) { return 0; }'),
    ("bpf-fentry", 'KFUNC_PROBE(security_file_open, struct file *file) { return 0; }'),
])
def test_btf_programs_agree_with_bcc(run, layer, program):
    """Doctor loads these with raw bpf(2); bcc's independent loader must agree."""
    require(importlib.util.find_spec("bcc") is not None, "python3-bpfcc not installed")
    require(run["probes"]["bcc"].ok, f"bcc cannot compile here: {run['probes']['bcc'].detail}")
    probe = run["probes"][layer]
    bcc_error = _bcc_loads(program)
    doctor_loaded = "loaded and attached" in probe.detail
    assert doctor_loaded is (bcc_error is None), (probe.detail, bcc_error)
    if not doctor_loaded:
        assert "E" in probe.detail.split("loading")[0], "errno name missing from detail"


def test_bpf_lsm_reports_the_lsm_list(run):
    probe = run["probes"]["bpf-lsm"]
    lsm_file = Path("/sys/kernel/security/lsm")
    if lsm_file.exists():
        lsms = lsm_file.read_text().strip()
        assert lsms in probe.detail
        if "bpf" not in lsms.split(","):
            assert not probe.ok
    else:
        assert "active LSMs:" in probe.detail or "LSM list unknown" in probe.detail


def test_cgroup_bpf(run):
    v2 = _proc_mounts("cgroup2")
    require(bool(v2), "no cgroup2 mount")
    probe = needed(run, "cgroup-bpf")
    assert f"cgroup2 at {v2[0][0]}" in probe.detail
    assert not list(Path(v2[0][0]).glob("skillguard-doctor-*")), "probe cgroup left behind"


def test_syscall_tracepoints(run):
    probe = needed(run, "syscall-tracepoints")
    tracefs = _proc_mounts("tracefs")
    if tracefs:
        assert f"tracefs at {tracefs[0][0]}" in probe.detail
        assert Path(tracefs[0][0], "events/syscalls/sys_enter_openat/id").exists()
    else:
        assert "private mount" in probe.detail or "debugfs" in probe.detail


def test_syscall_tracepoints_without_host_tracefs(run):
    """In a mount namespace with every tracefs unmounted, the probe mounts one privately."""
    needed(run, "syscall-tracepoints")
    before = Path("/proc/self/mountinfo").read_text()

    def body():
        libc_ = ctypes.CDLL(None, use_errno=True)
        if libc_.unshare(doctor.CLONE_NEWNS) != 0 or \
                libc_.mount(None, b"/", None, doctor.MS_REC | doctor.MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "private mount namespace")
        mnt_detach = 2
        for mount_point, _ in reversed(_proc_mounts("tracefs")):
            if libc_.umount2(mount_point.encode(), mnt_detach) != 0:
                raise OSError(ctypes.get_errno(), f"umount {mount_point}")
        assert not _proc_mounts("tracefs")
        probe = doctor.probe_syscall_tracepoints()
        return [probe.ok, probe.detail]

    result = _fork_result(body)
    assert "value" in result, result
    ok, detail = result["value"]
    assert ok, detail
    assert "used a private mount" in detail or "via debugfs" in detail
    assert Path("/proc/self/mountinfo").read_text() == before


# ---------------------------------------------------------------- networking

def test_nftables(run):
    probe = run["probes"]["nftables"]
    if importlib.util.find_spec("nftables") is None:
        assert not probe.ok and "python3-nftables not installed" in probe.detail
    needed(run, "nftables")


def test_nftables_reports_missing_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "nftables", None)  # makes `import nftables` raise ImportError
    probe = doctor.probe_nftables()
    assert not probe.ok
    assert "python3-nftables not installed" in probe.detail


def test_netns(run):
    probe = needed(run, "netns")
    assert "lo up" in probe.detail


# ---------------------------------------------------------------- cgroups

def test_cgroup_v2_controllers_match_the_file(run):
    v2 = _proc_mounts("cgroup2")
    probe = run["probes"]["cgroup-v2"]
    if not v2:
        assert not probe.ok
        require(False, "no cgroup2 mount")
    mount_point = v2[0][0]
    controllers = Path(mount_point, "cgroup.controllers").read_text().split()
    assert probe.ok and f"mounted at {mount_point}" in probe.detail
    if controllers:
        assert f"controllers: {' '.join(controllers)}" in probe.detail
    else:
        assert "no controllers" in probe.detail


def test_cgroup_v1_hierarchies_match_proc_mounts(run):
    v1 = _proc_mounts("cgroup")
    probe = run["probes"]["cgroup-v1"]
    wanted = [c for c in doctor.LIMIT_CONTROLLERS if any(c in opts for _, opts in v1)]
    assert probe.ok is bool(wanted)
    for controller in wanted:
        mount_point = next(target for target, opts in v1 if controller in opts)
        assert f"{controller} at {mount_point}" in probe.detail


def test_cgroup_limits_say_where_each_controller_lives(run):
    v1_opts = [opts for _, opts in _proc_mounts("cgroup")]
    v2 = _proc_mounts("cgroup2")
    v2_controllers = Path(v2[0][0], "cgroup.controllers").read_text().split() if v2 else []
    detail = run["probes"]["cgroup-limits"].detail
    for controller in doctor.LIMIT_CONTROLLERS:
        if controller in v2_controllers:
            assert f"{controller}: v2" in detail
        elif any(controller in opts for opts in v1_opts):
            assert f"{controller}: v1" in detail
        else:
            assert f"{controller}: unavailable" in detail


# ---------------------------------------------------------------- bcc

def test_bcc(run):
    probe = run["probes"]["bcc"]
    build = Path(f"/lib/modules/{os.uname().release}/build")
    assert (f"{build} present" if build.exists() else f"{build} missing") in probe.detail
    if importlib.util.find_spec("bcc") is None:
        assert not probe.ok and "python3-bpfcc not installed" in probe.detail
    needed(run, "bcc")


def test_bcc_reports_missing_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)
    probe = doctor.probe_bcc()
    assert not probe.ok
    assert probe.detail.startswith("python3-bpfcc not installed")
