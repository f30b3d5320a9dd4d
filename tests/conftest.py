"""Shared test plumbing.

Kernel tests must not hide a missing feature behind a skip on CI: `require()`
fails there (CI=true) and skips elsewhere, with the reason either way.
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Suites in the order `make test` wants them: cheap and pure first.
SUITE_ORDER = ("unit", "kernel", "e2e")
_SUITE_COUNTS = pytest.StashKey[dict]()


def on_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(feature_ok: bool, why: str) -> None:
    """Stop the current test unless feature_ok: fail on CI, skip elsewhere."""
    if feature_ok:
        return
    if on_ci():
        pytest.fail(f"required on CI: {why}", pytrace=False)
    pytest.skip(why)  # off CI only: on CI (CI=true) the line above fails instead


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def root() -> None:
    """Use as a fixture argument for tests that need euid 0."""
    require(is_root(), "needs root (euid 0)")


def _suite_of(item: pytest.Item) -> str | None:
    try:
        relative = Path(str(item.path)).resolve().relative_to(REPO_ROOT / "tests")
    except ValueError:
        return None
    top = relative.parts[0] if len(relative.parts) > 1 else None
    return top if top in SUITE_ORDER else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        suite = _suite_of(item)
        if suite is not None:
            item.add_marker(getattr(pytest.mark, suite))
    # Stable sort: within a suite, pytest's own order is kept.
    rank = {suite: index for index, suite in enumerate(SUITE_ORDER)}
    items.sort(key=lambda item: rank.get(_suite_of(item), len(SUITE_ORDER)))
    counts: dict[str, int] = {}
    for item in items:
        suite = _suite_of(item) or "other"
        counts[suite] = counts.get(suite, 0) + 1
    config.stash[_SUITE_COUNTS] = counts


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require(is_root(), "needs root (euid 0)")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line with how many tests each suite collected, so an empty suite shows."""
    counts = config.stash.get(_SUITE_COUNTS, {})
    parts = ", ".join(f"{suite}={counts.get(suite, 0)}" for suite in SUITE_ORDER)
    if counts.get("other"):
        parts += f", other={counts['other']}"
    terminalreporter.write_line(f"collected per suite: {parts} (CI={'true' if on_ci() else 'false'})")
