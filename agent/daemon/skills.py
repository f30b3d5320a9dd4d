"""In-memory state of one confined skill (launched or registered) and its
persistent record. Pure data; the daemon owns the kernel objects."""
from __future__ import annotations

import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

RECENT_VIOLATIONS = 100
RECENT_NOTES = 50


_random = bytearray()  # os.urandom() read ahead: one getrandom(2) per 512 ids, not one each


def _forget_random() -> None:
    _random.clear()  # a forked child must not hand out the ids its parent will


os.register_at_fork(after_in_child=_forget_random)


def new_id(kind: str) -> str:
    if len(_random) < 8:
        _random[:] = secrets.token_bytes(4096)
    token = _random[-8:].hex()
    del _random[-8:]
    return ("l-" if kind == "launched" else "r-") + token


@dataclass(slots=True)  # one made per request; slots: no per-instance dict to grow to 33 keys
class Skill:
    id: str
    kind: str  # "launched" | "registered"
    name: str
    manifest_text: str
    source: str  # policy file path, "inline", or a package path
    policy: object = None  # agent.manifest.model.Policy
    created: float = field(default_factory=time.time)
    state: str = "starting"  # starting | running | exited | failed
    boot_id: str = ""
    # launched
    supervisor_pid: Optional[int] = None
    supervisor_start: Optional[int] = None
    pid: Optional[int] = None  # host pid of the skill's PID-namespace init
    argv: tuple = ()
    cgroup_paths: tuple = ()
    cgroup_id: Optional[int] = None
    exit_code: Optional[int] = None
    wait_status: Optional[int] = None
    error: Optional[dict] = None
    # registered
    pids: tuple = ()
    layers: dict = field(default_factory=dict)
    required: tuple = ()
    tree: bool = False
    attachment: object = None
    # runtime only
    pidfd: Optional[int] = None
    adopted: bool = False  # re-adopted after a daemon restart
    violations: deque = field(default_factory=lambda: deque(maxlen=RECENT_VIOLATIONS))  # Violation objects
    notes: deque = field(default_factory=lambda: deque(maxlen=RECENT_NOTES))
    violation_count: int = 0
    waiters: list = field(default_factory=list)
    started_waiters: list = field(default_factory=list)
    ended_at: Optional[float] = None
    supervisor_gone: bool = False

    @property
    def live(self) -> bool:
        return self.state in ("starting", "running")

    def to_record(self) -> dict:
        record = {"id": self.id, "kind": self.kind, "name": self.name,
                  "manifest_text": self.manifest_text, "source": self.source,
                  "created": self.created, "boot_id": self.boot_id,
                  "cgroup_paths": list(self.cgroup_paths), "cgroup_id": self.cgroup_id}
        if self.kind == "launched":
            record.update(supervisor_pid=self.supervisor_pid, supervisor_start=self.supervisor_start,
                          pid=self.pid, argv=list(self.argv))
        else:
            record.update(pids=list(self.pids), layers=dict(self.layers),
                          required=list(self.required), tree=self.tree)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Skill":
        skill = cls(id=record["id"], kind=record["kind"], name=record["name"],
                    manifest_text=record["manifest_text"], source=record.get("source", "inline"),
                    created=record.get("created", 0.0), boot_id=record.get("boot_id", ""),
                    cgroup_paths=tuple(record.get("cgroup_paths", ())),
                    cgroup_id=record.get("cgroup_id"))
        if skill.kind == "launched":
            skill.supervisor_pid = record.get("supervisor_pid")
            skill.supervisor_start = record.get("supervisor_start")
            skill.pid = record.get("pid")
            skill.argv = tuple(record.get("argv", ()))
        else:
            skill.pids = tuple(record.get("pids", ()))
            skill.layers = dict(record.get("layers", {}))
            skill.required = tuple(record.get("required", ()))
            skill.tree = bool(record.get("tree", False))
        return skill

    def summary(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "skill": self.name, "state": self.state,
               "created": self.created, "violations": self.violation_count, "adopted": self.adopted}
        if self.kind == "launched":
            out.update(pid=self.pid, supervisor_pid=self.supervisor_pid, argv=list(self.argv))
            if self.exit_code is not None:
                out["exit_code"] = self.exit_code
        else:
            out.update(pids=list(self.pids))
        return out

    def detail(self) -> dict:
        out = self.summary()
        out.update(source=self.source, cgroup_paths=list(self.cgroup_paths), cgroup_id=self.cgroup_id,
                   recent_violations=[v.to_dict() for v in self.violations], notes=list(self.notes))
        if self.kind == "registered":
            out.update(layers=dict(self.layers), required=list(self.required), tree=self.tree)
        if self.error is not None:
            out["error"] = self.error
        if self.policy is not None:
            out["mode"] = getattr(self.policy, "mode", None)
            out["version"] = getattr(self.policy, "version", None)
        return out
