"""Resource limits: cgroup limits and setrlimit(2) values from `resources`.

The cgroup carries the real memory, CPU and pids limits for the whole skill.
rlimits add what a cgroup cannot say: no core dumps (they would write the
skill's memory to disk), a file-descriptor ceiling, and RLIMIT_NPROC as a
backstop fork bound. RLIMIT_NPROC counts every process of the real uid
(each skill has its own, so across that skill's instances) and the kernel
checks it before the pids cgroup (kernel/fork.c copy_process), so it sits at
twice `pids`: at the same value a fork bomb would stop unseen, without the
pids cgroup counting the refusal that reports it. RLIMIT_AS is not set: runtimes such
as Node and the JVM reserve far more address space than they use; the
memory cgroup limits what is actually used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from agent.manifest.model import Resources


@dataclass(frozen=True)
class Limits:
    """Cgroup limits for the whole skill. None: no limit asked for."""

    memory_bytes: Optional[int]
    cpu: Optional[float]  # CPUs' worth: 0.5 -> quota 50000 / period 100000
    pids: Optional[int]

    def __post_init__(self):
        for name in ("memory_bytes", "cpu", "pids"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be positive or None, got {value!r}")

    def requested(self, controller: str) -> bool:
        return self.value_for(controller) is not None

    def value_for(self, controller: str):
        return {"memory": self.memory_bytes, "cpu": self.cpu, "pids": self.pids}[controller]


@dataclass(frozen=True)
class Rlimit:
    name: str  # as in the `resource` module, e.g. "RLIMIT_NOFILE"
    soft: int
    hard: int


NOFILE = 4096
MEMLOCK = 64 * 1024


def compile_limits(resources: Resources) -> Limits:
    return Limits(resources.memory_bytes, resources.cpu, resources.pids)


def compile_rlimits(resources: Resources) -> tuple[Rlimit, ...]:
    return (
        Rlimit("RLIMIT_CORE", 0, 0),
        Rlimit("RLIMIT_NOFILE", NOFILE, NOFILE),
        Rlimit("RLIMIT_NPROC", 2 * resources.pids, 2 * resources.pids),
        Rlimit("RLIMIT_MEMLOCK", MEMLOCK, MEMLOCK),
    )
