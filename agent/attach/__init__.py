"""Attach: confine processes that are already running (cgroup-scoped layers only)."""
from agent.attach.hooks import ALL_LAYERS, AttachError, Attachment, Hooks

__all__ = ["ALL_LAYERS", "AttachError", "Attachment", "Hooks"]
