"""Skill manifests: YAML text -> validated, frozen Policy (see load.py).

    from agent.manifest import load_manifest
    result = load_manifest("skill.yaml")

The loader (PyYAML, the checker) is imported on first use, so code that only
needs the Policy types (`agent.manifest.model`, e.g. to unpickle a cached
policy) does not pay for it.
"""
from __future__ import annotations

__all__ = ["LoadResult", "Policy", "Problem", "load_manifest", "load_text"]


def __getattr__(name: str):
    if name in __all__:
        from agent.manifest import load

        return getattr(load, name)
    raise AttributeError(f"module 'agent.manifest' has no attribute {name!r}")
