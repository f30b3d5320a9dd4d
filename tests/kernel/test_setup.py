"""The set-up (scripts/setup.sh) left a working host, and the unit file verifies."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require

SETUP = REPO_ROOT / "scripts" / "setup.sh"
UNIT = REPO_ROOT / "systemd" / "skillguard.service"
VENV = REPO_ROOT / ".venv"


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, **kwargs)


def render_unit(tmp_path: Path, exec_start_prefix: str) -> Path:
    rendered = tmp_path / "skillguard.service"
    rendered.write_text(UNIT.read_text().replace("/opt/skillguard/", exec_start_prefix))
    return rendered


@pytest.mark.root
def test_setup_check_reports_nothing_to_do_and_is_quick():
    started = time.monotonic()
    result = run([str(SETUP), "--check"])
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"setup.sh --check wants to change things:\n{result.stderr}"
    assert "nothing to do" in result.stderr
    assert elapsed < 5, f"a no-op set-up check took {elapsed:.1f}s"


@pytest.mark.root
def test_setup_refuses_non_root():
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(SETUP), "--check"])
    assert result.returncode == 1
    assert "must run as root" in result.stderr


@pytest.mark.root
def test_setup_refuses_non_debian(tmp_path):
    fake = tmp_path / "os-release"
    fake.write_text('ID=fedora\nID_LIKE="rhel centos"\n')
    result = run([str(SETUP), "--check"], env={**os.environ, "SKILLGUARD_OS_RELEASE": str(fake)})
    assert result.returncode == 1
    assert "unsupported OS 'fedora'" in result.stderr


def test_venv_is_built_on_system_python_with_system_site_packages():
    config = (VENV / "pyvenv.cfg").read_text().splitlines()
    assert "include-system-site-packages = true" in config
    assert "home = /usr/bin" in config


def test_debian_only_bindings_import_in_the_venv():
    result = run([str(VENV / "bin" / "python"), "-c", "import bcc, nftables, pyseccomp, yaml, agent"])
    assert result.returncode == 0, result.stderr


def test_policies_are_found_next_to_the_installed_package():
    # The agent runs from the checkout through an editable install.
    result = run(
        [str(VENV / "bin" / "python"), "-c", "import agent, pathlib; print(pathlib.Path(agent.__file__).resolve().parent.parent)"],
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO_ROOT
    assert (REPO_ROOT / "policies").is_dir()


@pytest.mark.root
def test_bcc_compiles_against_linked_headers_and_attaches_a_tracepoint():
    build = Path("/lib/modules", os.uname().release, "build")
    require(build.is_dir(), f"{build} missing: bcc has no kernel headers (run scripts/setup.sh)")
    program = r"""
from bcc import BPF
filter_program = BPF(text='''
#include <linux/sched.h>
int probe(struct __sk_buff *skb) { return 0; }
''')
filter_program.load_func("probe", BPF.SOCKET_FILTER)
filter_program.cleanup()
tracepoint = BPF(text="TRACEPOINT_PROBE(syscalls, sys_enter_nanosleep) { return 0; }")
assert tracepoint.num_open_tracepoints() == 1
tracepoint.cleanup()
"""
    result = run([str(VENV / "bin" / "python"), "-c", program])
    assert result.returncode == 0, result.stderr[-2000:]


def _verify(unit: Path) -> subprocess.CompletedProcess:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed (apt package systemd)")
    return run(["systemd-analyze", "verify", str(unit)])


@pytest.mark.root
def test_unit_file_verifies_cleanly_for_this_checkout(tmp_path):
    require((VENV / "bin" / "skillguard").exists(), "no console script .venv/bin/skillguard (pip install -e . not run)")
    result = _verify(render_unit(tmp_path, f"{REPO_ROOT}/"))
    # verify exits 0 on some problems (an unparsable value is only "ignoring"),
    # so any diagnostic counts as a failure.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@pytest.mark.root
def test_unit_verification_catches_a_missing_binary_and_a_bad_value(tmp_path):
    missing = _verify(render_unit(tmp_path, "/nonexistent/skillguard/"))
    assert missing.returncode != 0
    assert "not executable" in missing.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    unit = render_unit(broken, f"{REPO_ROOT}/")
    text = unit.read_text()
    assert "\nType=" in text
    unit.write_text(re.sub(r"(?m)^Type=.*$", "Type=bogus", text))
    assert "Failed to parse service type" in _verify(unit).stderr
