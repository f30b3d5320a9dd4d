"""The policy directory: manifests loaded and validated at start and on reload.

A file that fails to load or compile is rejected with its errors; if an
earlier version of the same file was valid, that version keeps working
(running skills are never affected either way: each holds its own copy).
Skills are addressed by the manifest's `name`; two files with one name:
the first in sorted order wins and the other is rejected.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    path: str
    text: str
    sha256: str
    policy: object  # agent.manifest.model.Policy


@dataclass
class ReloadReport:
    loaded: list = field(default_factory=list)  # names (re)loaded from changed files
    unchanged: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)  # path -> [error lines]
    kept_previous: list = field(default_factory=list)  # names whose previous version stays

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "unchanged": self.unchanged, "removed": self.removed,
                "rejected": self.rejected, "kept_previous": self.kept_previous}


def load_policy_text(text: str, source: str):
    """(Policy, []) or (None, [error lines]): load, then compile every artifact
    once so a manifest that cannot become kernel controls is refused here."""
    from agent.manifest import load_text

    result = load_text(text, source)
    if not result.ok:
        return None, result.format(result.errors, "error")
    try:
        from agent.compile import compile_policy

        compile_policy(result.policy)
    except Exception as exc:  # noqa: BLE001 - every compile failure is a policy error
        return None, [f"{source}: error: compile: {exc}"]
    return result.policy, []


class PolicyStore:
    def __init__(self, directory: str):
        self.directory = directory
        self.by_name: dict[str, PolicyEntry] = {}
        self.errors: dict[str, list[str]] = {}  # path -> the errors of its latest version

    def get(self, name: str) -> Optional[PolicyEntry]:
        return self.by_name.get(name)

    def reload(self) -> ReloadReport:
        report = ReloadReport()
        try:
            names = sorted(n for n in os.listdir(self.directory)
                           if n.endswith((".yaml", ".yml")) and not n.startswith("."))
        except FileNotFoundError:
            names = []
        except OSError as exc:
            report.rejected[self.directory] = [f"{self.directory}: {exc.strerror}"]
            self.errors = dict(report.rejected)
            return report
        by_path = {entry.path: entry for entry in self.by_name.values()}
        fresh: dict[str, PolicyEntry] = {}
        errors: dict[str, list[str]] = {}
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                errors[path] = [f"{path}: {getattr(exc, 'strerror', None) or exc}"]
                self._keep(by_path.get(path), fresh, report)
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            previous = by_path.get(path)
            if previous is not None and previous.sha256 == digest:
                entry = previous
                report.unchanged.append(entry.name)
            else:
                policy, problems = load_policy_text(text, path)
                if policy is None:
                    errors[path] = problems
                    self._keep(previous, fresh, report)
                    continue
                entry = PolicyEntry(policy.name, path, text, digest, policy)
                report.loaded.append(entry.name)
            if entry.name in fresh:
                errors[path] = [f"{path}:1:1: error: name: skill {entry.name!r} is already "
                                f"defined by {fresh[entry.name].path}"]
                continue
            fresh[entry.name] = entry
        for name, entry in self.by_name.items():
            if name not in fresh and entry.path not in errors:
                report.removed.append(name)
        self.by_name = fresh
        self.errors = errors
        report.rejected = errors
        return report

    @staticmethod
    def _keep(previous: Optional[PolicyEntry], fresh: dict, report: ReloadReport) -> None:
        if previous is not None and previous.name not in fresh:
            fresh[previous.name] = previous
            report.kept_previous.append(previous.name)
