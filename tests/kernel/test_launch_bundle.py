"""agent/bundle.py: the launch path's modules from one file, only while it is
valid. Each test works on a copy of the agent's code in a root-owned
temporary directory, so the real tree is not touched."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, require

PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from agent import bundle
used = bundle.install()
import agent.launch.supervisor as supervisor
import agent.launch.notify as notify
print(json.dumps({"used": used, "file": supervisor.__file__,
                  "loader": type(supervisor.__spec__.loader).__name__,
                  "notify_file": notify.__file__, "os": "os" in sys.modules}))
"""


@pytest.fixture(scope="module", autouse=True)
def _root():
    require(os.geteuid() == 0, "needs root (euid 0): the bundle is root's only")


@pytest.fixture
def tree():
    root = Path(tempfile.mkdtemp(prefix="sg-bundle-"))
    root.chmod(0o755)
    shutil.copytree(REPO_ROOT / "agent", root / "agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def build(root: Path) -> subprocess.CompletedProcess:
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from agent import bundle; "
              "raise SystemExit(0 if bundle.build() else 1)")
    return subprocess.run([PYTHON, "-IS", "-c", script, str(root)], capture_output=True, text=True)


def probe(root: Path) -> dict:
    out = subprocess.run([PYTHON, "-IS", "-c", PROBE, str(root)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def bundle_file(root: Path) -> Path:
    return next((root / "agent" / "__pycache__").glob("launch-bundle.*"))


def test_a_built_bundle_serves_the_launch_modules_with_their_own_paths(tree):
    assert build(tree).returncode == 0
    seen = probe(tree)
    assert seen["used"] is True
    assert seen["loader"] == "_Finder"
    assert seen["file"] == str(tree / "agent" / "launch" / "supervisor.py")
    assert seen["notify_file"] == str(tree / "agent" / "launch" / "notify.py")
    assert seen["os"] is False  # the launch path does not load `os` (agent/oslite.py)


def test_without_a_bundle_modules_load_the_usual_way(tree):
    seen = probe(tree)
    assert seen["used"] is False
    assert seen["loader"] == "SourceFileLoader"


def test_a_changed_source_makes_the_bundle_unused(tree):
    assert build(tree).returncode == 0
    source = tree / "agent" / "enforce" / "cgroup.py"
    source.write_text(source.read_text() + "\n# changed\n")
    seen = probe(tree)
    assert seen["used"] is False and seen["loader"] == "SourceFileLoader"


@pytest.mark.parametrize("loosen", ["file", "directory"])
def test_a_bundle_others_could_write_is_not_trusted(tree, loosen):
    assert build(tree).returncode == 0
    target = bundle_file(tree)
    (target if loosen == "file" else target.parent).chmod(0o666 if loosen == "file" else 0o777)
    assert probe(tree)["used"] is False


def test_a_torn_bundle_is_not_used(tree):
    assert build(tree).returncode == 0
    target = bundle_file(tree)
    target.write_bytes(target.read_bytes()[:1000])
    assert probe(tree)["used"] is False


def test_a_bundle_is_not_built_into_a_directory_others_can_write(tree):
    cache = tree / "agent" / "__pycache__"
    cache.mkdir()
    cache.chmod(0o777)
    assert build(tree).returncode == 1
    assert not list(cache.glob("launch-bundle.*"))
