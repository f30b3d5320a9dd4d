"""Helpers for kernel tests that launch skills with `python -m agent run`:
the kernel features a launch needs, a state root, manifests, the launch
command, and the run's outcome with the JSON-lines events it wrote.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from conftest import REPO_ROOT, require

PYTHON = sys.executable


def require_launch_features() -> None:
    """Root, seccomp user notification and Landlock: what every launch needs."""
    require(os.geteuid() == 0, "needs root (euid 0)")
    try:
        actions = Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        actions = []
    require("user_notif" in actions, f"seccomp user notification missing (actions: {actions})")
    from agent.enforce.landlock import abi_version

    require(abi_version() >= 1, "Landlock is not available")


@contextlib.contextmanager
def temp_state_root(prefix: str) -> Iterator[str]:
    """A state root under /var/tmp: outside the skill's private /tmp, so that
    "another skill's state dir" is a real directory a skill could name."""
    root = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    os.chmod(root, 0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_manifest(directory: Path, name: str, dirs: list[str], *, permissions: str = "",
                   resources: dict | None = None) -> Path:
    """<directory>/<name>.yaml granting `dirs` (entries like "/x:rw"); `permissions`
    is more YAML under `permissions:` (indented two spaces), `resources` the limits."""
    lines = [f"name: {name}", 'version: "1"', "permissions:", "  fs:", "    dirs:"]
    lines += [f"      - {entry}" for entry in dirs]
    text = "\n".join(lines) + "\n" + permissions
    text += "resources:\n" + "".join(f"  {key}: {value}\n"
                                     for key, value in (resources or {"timeout": "30s"}).items())
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def read_events(path: Path) -> list[dict]:
    """The JSON-lines events a launch wrote (none if it wrote no file)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def launch_command(manifest: Path, events: Path, state_root: str, *, audit: bool = False) -> list[str]:
    """`python -m agent run ... --`: append the skill's argv."""
    cmd = [PYTHON, "-m", "agent", "run", "--manifest", str(manifest), "--events", str(events),
           "--state-root", str(state_root)]
    if audit:
        cmd.append("--audit")
    return cmd + ["--"]


class Run:
    """A finished launch: exit code, output, and the events it wrote."""

    def __init__(self, proc: subprocess.CompletedProcess, events_path: Path):
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.events = read_events(events_path)

    def layer(self, layer: str) -> list[dict]:
        return [e for e in self.events if e["layer"] == layer]

    def json(self) -> dict:
        """The last line the skill printed, as JSON."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_skill(directory: Path, state_root: str, manifest: Path, argv: list[str], *,
              audit: bool = False, env: dict | None = None, timeout: float = 60) -> Run:
    """Launch argv under manifest and wait; the events file goes in directory."""
    events = directory / f"events-{time.monotonic_ns()}.jsonl"
    proc = subprocess.run(launch_command(manifest, events, state_root, audit=audit) + argv,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Run(proc, events)


@contextlib.contextmanager
def launch_area(prefix: str) -> Iterator[Path]:
    """A temporary directory under /var/tmp (0755) with a state root
    (`state`, 0711) and a `work` directory for a launch; removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        root.chmod(0o755)
        (root / "state").mkdir(mode=0o711)
        (root / "work").mkdir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
