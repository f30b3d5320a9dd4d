"""The systemd unit and tmpfiles entry: `systemd-analyze verify`, tmpfiles
creates /run/skillguard, and the daemon works with exactly the unit's
capability bounding set and NoNewPrivileges (PID 1 here is not systemd, so
the unit is verified and its privileges reproduced with setpriv)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


from conftest import require
from sgdaemon import REPO_ROOT, DaemonProcess, LineReader, make_root, read_all

UNIT = REPO_ROOT / "systemd" / "skillguard.service"
TMPFILES = REPO_ROOT / "systemd" / "skillguard.conf"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze missing (Debian: systemd)")
    venv_bin = os.path.dirname(sys.executable)
    require(os.path.exists(os.path.join(venv_bin, "skillguard")), "no skillguard console script in the venv")
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^WatchdogSec=", text, re.M)
    assert re.search(r"^Restart=on-failure$", text, re.M)
    # Point ExecStart at this checkout's venv (verify rejects a missing binary).
    unit = tmp_path / "skillguard.service"
    unit.write_text(text.replace("/opt/skillguard/.venv/bin/", venv_bin + "/")
                    .replace("/opt/skillguard/", str(REPO_ROOT) + "/"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skillguard.service" not in proc.stderr, proc.stderr  # no warning about the unit


def test_tmpfiles_creates_the_runtime_directory(tmp_path):
    require(shutil.which("systemd-tmpfiles") is not None, "systemd-tmpfiles missing")
    proc = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run" / "skillguard"
    assert run_dir.is_dir() and oct(run_dir.stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "var" / "lib" / "skillguard").stat().st_mode & 0o777) == "0o711"


def _unit_capabilities() -> list[str]:
    match = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    return match.group(1).split()


def _unit_daemon() -> DaemonProcess:
    require(os.geteuid() == 0, "needs root (euid 0)")
    require(shutil.which("setpriv") is not None, "setpriv missing (util-linux)")
    caps = _unit_capabilities()
    assert "NoNewPrivileges=yes" in UNIT.read_text()
    wrap = ("setpriv", "--bounding-set", "-all," + ",".join("+" + c[4:].lower() for c in caps),
            "--no-new-privs", "--")
    return DaemonProcess(make_root(), wrap=wrap,
                         config_extra="address_pool: 10.213.201.0/24\ndns_upstream: ['127.0.0.1']\n")


def _end(d: DaemonProcess) -> None:
    d.tear_down()


def test_daemon_works_with_exactly_the_units_capabilities():
    d = _unit_daemon()
    try:
        d.start()
        bounding = [l for l in open(f"/proc/{d.proc.pid}/status") if l.startswith("CapBnd")][0]
        assert int(bounding.split()[1], 16).bit_count() == len(_unit_capabilities())
        assert d.call("status")["register"] == "available"
        # Full-stack launch with exec supervision (a shell rule) and a signal.
        work = str(d.work)
        manifest = ("name: units\nversion: '1'\npermissions:\n"
                    f"  shell:\n    allowlist: ['/usr/bin/true **']\n    allowed_dirs: ['{work}']\n"
                    f"  fs:\n    dirs: ['{work}:rw']\nresources:\n  pids: 64\n  timeout: 60s\n")
        reply, out = d.launch(manifest, ["/usr/bin/python3", "-c",
                                         "import subprocess, time\n"
                                         "print(subprocess.call(['/usr/bin/true']), flush=True)\n"
                                         "time.sleep(60)\n"])
        reader = LineReader(out)
        assert reader.readline() == "0"
        d.call("signal", {"id": reply["id"], "signal": "SIGTERM"})
        assert d.call("wait", {"id": reply["id"], "timeout": 20})["exit_code"] == 143
        reader.close()
        # Register: cgroup BPF hooks, nftables socket-cgroup rules.
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            reg = d.call("register", {"pids": [sleeper.pid], "manifest":
                                      "name: unitr\nversion: '1'\npermissions:\n  tcp:\n"
                                      "    allowlist: ['127.0.0.1:9']\n"})
            assert reg["layers"]["nftables-cgroup"] == "active"
            d.call("unregister", {"id": reg["id"]})
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        _end(d)


def test_network_launch_with_exactly_the_units_capabilities():
    """netns, veth, nftables in the skill's namespace, the DNS stub on port 53."""
    d = _unit_daemon()
    try:
        d.start()
        net = "name: unitn\nversion: '1'\npermissions:\n  tcp:\n    allowlist: ['name.invalid:443']\n"
        reply, out = d.launch(net, ["/usr/bin/python3", "-c", "print('ran')"])
        result = d.call("wait", {"id": reply["id"], "timeout": 30})
        assert read_all(out).strip() == "ran" and result["exit_code"] == 0, result
    finally:
        _end(d)
