"""A signal sent to a skill's init while it is still being set up is not lost.

As PID 1 of its namespace, the init discards every signal it has no handler
for (pid_namespaces(7)); the supervisor therefore clones it with the
forwarded signals blocked, and the init holds what arrives during set-up
until the skill exists, then passes it on. A SIGTERM before the skill's
exec ends the launch with 143, and the skill's program never runs.

The driver sends SIGTERM to the init as soon as it exists (it may not have
installed its handlers yet) or once it has been sent its plan
(handlers in place, no skill yet); the control sends nothing.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require
from launching import launch_area

DRIVER = r"""
import json, os, signal, sys
from agent.launch.supervisor import RunOptions, Supervisor, _await_init
from agent.manifest import load_manifest

manifest, state_root, when = sys.argv[1:4]
result = load_manifest(manifest)
assert result.ok, result.errors

class EarlySignal(Supervisor):
    def _send_plan(self, plan, pid, sock, launcher=None, err_r=None):
        if pid is None:
            pid = _await_init(launcher, sock, err_r)
        if when == "at-clone":
            os.kill(pid, signal.SIGTERM)
        pid = super()._send_plan(plan, pid, sock)
        if when == "during-set-up":
            os.kill(pid, signal.SIGTERM)
        return pid

outcome = EarlySignal(result.policy, RunOptions(state_root=state_root),
                      lambda v: None, lambda t: None).run()
print(json.dumps({"exit": outcome.exit_code}), flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def _root():
    require(os.geteuid() == 0, "needs root (euid 0)")


@pytest.fixture
def area():
    with launch_area("skillguard-early-signal-") as root:
        yield root


def launch(area: Path, when: str) -> dict:
    manifest = area / "m.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        name: early-signal-{os.getpid()}
        version: "1"
        entrypoint: ["/bin/sh", "-c", ": > {area}/work/ran"]  # no exec after sh
        permissions:
          fs:
            dirs: ["{area}/work:rw"]
        resources:
          timeout: 20s
        """))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(manifest), str(area / "state"), when],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("when", ["at-clone", "during-set-up"])
def test_sigterm_before_the_skill_starts_ends_the_launch(area, when):
    assert launch(area, when) == {"exit": 128 + 15}
    assert not (area / "work" / "ran").exists()


def test_control_without_a_signal_runs_the_skill(area):
    assert launch(area, "none") == {"exit": 0}
    assert (area / "work" / "ran").exists()
