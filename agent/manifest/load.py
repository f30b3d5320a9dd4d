"""Load skill manifests: YAML text -> validated, frozen Policy.

    result = load_manifest("skill.yaml")
    if result.errors: print(result.format_errors())

Every problem is reported at once with file:line:column and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from agent.manifest.model import Policy
from agent.manifest.nodes import Pos, YamlError, parse_yaml
from agent.manifest.parse import Checker, Problem, policy_from

MAX_MANIFEST_BYTES = 1 << 20


@dataclass
class LoadResult:
    source: str
    policy: Optional[Policy] = None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.policy is not None and not self.errors

    def format(self, problems: list[Problem], level: str) -> list[str]:
        return [f"{self.source}:{p.pos.line}:{p.pos.column}: {level}: {p.field or '(document)'}: {p.message}"
                for p in sorted(problems, key=lambda p: (p.pos.line, p.pos.column))]


def load_text(text: str, source: str = "<string>") -> LoadResult:
    from agent.manifest.lint import lint

    result = LoadResult(source)
    try:
        root = parse_yaml(text)
    except YamlError as exc:
        result.errors.append(Problem(exc.pos, exc.field, f"invalid YAML: {exc}" if not exc.field else str(exc)))
        return result
    if root is None:
        result.errors.append(Problem(Pos(1, 1), "", "the manifest is empty"))
        return result
    checker = Checker()
    policy = policy_from(checker, root, source)
    result.errors = checker.errors
    if policy is not None:
        result.policy = policy
        result.warnings = lint(policy, checker.positions)
    return result


def load_manifest(path: str | Path) -> LoadResult:
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        return LoadResult(source, errors=[Problem(Pos(1, 1), "", f"cannot read: {exc.strerror}")])
    if len(data) > MAX_MANIFEST_BYTES:
        return LoadResult(source, errors=[Problem(Pos(1, 1), "", "larger than 1 MiB")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LoadResult(source, errors=[Problem(Pos(1, 1), "", f"not UTF-8: {exc.reason} at byte {exc.start}")])
    return load_text(text, source)

