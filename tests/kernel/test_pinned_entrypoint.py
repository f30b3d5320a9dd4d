"""`entrypoint_sha256`: the launcher hashes the open program and executes that fd.

The swap tests rename another program over the entrypoint's path right after
the supervisor's pin check (`_complete`, while the child starts) and before
exec, inside a
driver process (a Supervisor may launch only once per process). With the pin
the original program runs; without it the swapped one does, which shows the
test can tell the two apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require

PYTHON = sys.executable

DRIVER = r"""
import json, os, sys
from agent.launch.supervisor import LaunchError, RunOptions, Supervisor
from agent.manifest import load_manifest

manifest, path, replacement, state_root = sys.argv[1:5]
result = load_manifest(manifest)
assert result.ok, result.errors

class SwapAfterCheck(Supervisor):
    def _complete(self):
        launch = super()._complete()
        os.rename(replacement, path)  # after the pin check, before exec
        return launch

try:
    outcome = SwapAfterCheck(result.policy, RunOptions(state_root=state_root),
                             lambda v: None, lambda t: None).run()
    print(json.dumps({"exit": outcome.exit_code}), flush=True)
except LaunchError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def _kernel_features():
    require(os.geteuid() == 0, "needs root (euid 0)")
    from agent.enforce.landlock import abi_version

    require(abi_version() >= 1, "Landlock is not available")


@pytest.fixture
def area():
    # Outside /tmp: the skill gets a private /tmp, and the unpinned control
    # must be able to reach the program by its path.
    root = Path(tempfile.mkdtemp(prefix="skillguard-pin-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "state").mkdir(mode=0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def programs(area: Path) -> tuple[Path, Path]:
    """prog: a copy of echo (the pinned one); prog.swap: a copy of false."""
    prog, swap = area / "prog", area / "prog.swap"
    shutil.copy2(shutil.which("echo"), prog)
    shutil.copy2(shutil.which("false"), swap)
    prog.chmod(0o755)
    swap.chmod(0o755)
    return prog, swap


def manifest(area: Path, name: str, prog: Path, pin: str | None) -> Path:
    path = area / f"{name}.yaml"
    text = textwrap.dedent(f"""\
        name: {name}
        version: "1"
        entrypoint: ["{prog}", "pinned-ran"]
        resources:
          timeout: 20s
        """)
    if pin:
        text += f"entrypoint_sha256: {pin}\n"
    path.write_text(text)
    return path


def drive(area: Path, m: Path, prog: Path, swap: Path) -> tuple[dict, str]:
    proc = subprocess.run([PYTHON, "-c", DRIVER, str(m), str(prog), str(swap), str(area / "state")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def cli_run(area: Path, m: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "agent", "run", "--manifest", str(m), "--state-root",
                           str(area / "state"), *extra], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_swapped_binary_after_the_check_is_not_run(area):
    prog, swap = programs(area)
    false_sha = sha256(swap)
    outcome, output = drive(area, manifest(area, "pin-swap", prog, sha256(prog)), prog, swap)
    # The path now names `false`, yet the pinned `echo` ran (with its argv).
    assert sha256(prog) == false_sha
    assert outcome == {"exit": 0}, outcome
    assert output == "pinned-ran"


def test_without_a_pin_the_swapped_binary_runs(area):
    # The control: the same swap with no pin runs `false` (exit 1, no output).
    prog, swap = programs(area)
    outcome, output = drive(area, manifest(area, "pin-control", prog, None), prog, swap)
    assert outcome == {"exit": 1}, outcome
    assert output == ""


def test_pinned_entrypoint_runs_through_the_cli(area):
    prog, _ = programs(area)
    run = cli_run(area, manifest(area, "pin-ok", prog, sha256(prog)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "pinned-ran"


def test_wrong_digest_is_refused_before_start(area):
    prog, swap = programs(area)
    m = manifest(area, "pin-wrong", swap, sha256(prog))  # pins echo, names false
    run = cli_run(area, m)
    assert run.returncode == 125, run.stderr
    assert "pin: entrypoint_sha256" in run.stderr and "not the pinned" in run.stderr
    assert "the skill was not started" in run.stderr


def test_a_command_line_override_must_match_the_pin_too(area):
    prog, _ = programs(area)
    run = cli_run(area, manifest(area, "pin-override", prog, sha256(prog)), "--", "/usr/bin/true")
    assert run.returncode == 125
    assert "/usr/bin/true has sha256" in run.stderr


def test_pinning_a_script_is_refused_with_a_clear_error(area):
    script = area / "skill.sh"
    script.write_text("#!/bin/sh\necho script-ran\n")
    script.chmod(0o755)
    run = cli_run(area, manifest(area, "pin-script", script, sha256(script)))
    assert run.returncode == 125
    assert "script" in run.stderr and "only ELF programs can be pinned" in run.stderr
    assert "script-ran" not in run.stdout


def test_signed_package_with_a_pinned_entrypoint_runs_under_require_signed(area):
    import tarfile

    from agent.package.sign import generate_keypair, sign_package

    prog, _ = programs(area)
    pkg = area / "pkg"
    pkg.mkdir()
    shutil.copy(manifest(area, "pin-package", prog, sha256(prog)), pkg / "manifest.yaml")
    keys = generate_keypair(str(area / "release"))
    config = area / "agent.yaml"
    config.write_text(f"require_signed: true\ntrusted_keys: [{keys.public_path}]\n")
    archive = area / "pin-package.skill"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pkg, arcname=".")
    sign_package(str(pkg), keys.private_path)
    sign_package(str(archive), keys.private_path)
    for source in (pkg, archive):
        run = cli_run_package(area, source, config)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "pinned-ran"
    # The same package once its manifest changes: refused, nothing runs.
    (pkg / "manifest.yaml").write_text((pkg / "manifest.yaml").read_text() + "description: x\n")
    run = cli_run_package(area, pkg, config)
    assert run.returncode == 125 and "package: tampered" in run.stderr
    assert run.stdout == ""


def cli_run_package(area: Path, package: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "agent", "run", "--package", str(package), "--config",
                           str(config), "--state-root", str(area / "state")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
