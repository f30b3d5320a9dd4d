"""YAML with positions: every value keeps the file:line:column it came from.

PyYAML's composer gives nodes with marks; we construct scalars one by one so
that a wrong type, an unknown key or a duplicate key can be pinned to the
exact place in the file. Duplicate keys are errors here (PyYAML would keep
the last one silently, which could drop a permission without a word).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import yaml


@dataclass(frozen=True)
class Pos:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Value:
    """A YAML value with its position: mapping, list or scalar."""

    data: Any  # dict[str, Value] | list[Value] | scalar
    pos: Pos
    raw: Optional[str] = None  # the scalar's text as written
    key_pos: Optional[dict] = None  # for mappings: key -> Pos of the key

    def kind(self) -> str:
        if isinstance(self.data, dict):
            return "mapping"
        if isinstance(self.data, list):
            return "list"
        return describe(self.data)


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


class YamlError(Exception):
    def __init__(self, message: str, pos: Pos, field: str = ""):
        super().__init__(message)
        self.pos = pos
        self.field = field


def _pos(mark) -> Pos:
    return Pos(mark.line + 1, mark.column + 1)


def parse_yaml(text: str) -> Optional[Value]:
    """Parse one YAML document into Values; raise YamlError with a position."""
    # libyaml when present: the pure-Python parser is ~10x slower.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _convert(loader, node, set(), "")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = _pos(mark) if mark else Pos(1, 1)
        raise YamlError(exc.problem or str(exc), pos) from None
    finally:
        loader.dispose()


def _convert(loader, node: yaml.Node, seen: set, path: str) -> Value:
    pos = _pos(node.start_mark)
    if id(node) in seen:  # aliases may repeat a node, but never recurse into themselves
        raise YamlError("recursive alias", pos)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<` merge keys
        out: dict[str, Value] = {}
        key_pos: dict[str, Pos] = {}
        for knode, vnode in node.value:
            kpos = _pos(knode.start_mark)
            if not isinstance(knode, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain strings", kpos)
            key = loader.construct_object(knode)
            if not isinstance(key, str):
                key = knode.value  # `on:` or `1:` as keys: keep the text written
            if key in out:
                raise YamlError(f"duplicate key (first at line {key_pos[key].line})", kpos,
                                f"{path}.{key}" if path else key)
            key_pos[key] = kpos
            out[key] = _convert(loader, vnode, seen | {id(node)}, f"{path}.{key}" if path else key)
        return Value(out, pos, key_pos=key_pos)
    if isinstance(node, yaml.SequenceNode):
        return Value([_convert(loader, n, seen | {id(node)}, f"{path}[{i}]")
                      for i, n in enumerate(node.value)], pos)
    return Value(loader.construct_object(node), pos, raw=node.value)
