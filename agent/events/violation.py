"""The one record type for every refusal skillguard sees, and a JSON-lines sink.

Every source (seccomp notifications, cgroup counters, the launcher's timeout,
the environment filter, later eBPF and nftables) builds a `Violation`; sinks
turn it into one line of JSON each, so a log reader never has to know which
layer produced it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Optional

LAYERS = ("seccomp", "landlock", "cgroup", "timeout", "env", "network", "launch", "invoke",
          "exec", "fs")
DECISIONS = ("denied", "killed", "audited")


@dataclass(frozen=True)
class Violation:
    skill: str
    pid: Optional[int]  # in the supervisor's PID namespace; None when no process applies
    layer: str  # one of LAYERS
    operation: str  # "socket(AF_INET)", "ptrace", "fork (pids.max)", "/etc/shadow", ...
    decision: str  # one of DECISIONS
    rule: str  # the manifest rule, or the absence of one, that decided it
    time: float = field(default_factory=time.time)  # seconds since the epoch, UTC
    detail: str = ""

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"violation: unknown layer {self.layer!r} (one of {LAYERS})")
        if self.decision not in DECISIONS:
            raise ValueError(f"violation: unknown decision {self.decision!r} (one of {DECISIONS})")

    def to_dict(self) -> dict:
        record = asdict(self)
        record["time"] = _iso8601(self.time)
        if not self.detail:
            del record["detail"]
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _iso8601(seconds: float) -> str:
    whole = int(seconds)
    micros = int(round((seconds - whole) * 1_000_000))
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


class JsonLinesSink:
    """Writes each violation as one JSON line and flushes at once.

    One write(2) per record (O_APPEND for files), so concurrent writers to the
    same file never interleave within a line.
    """

    def __init__(self, stream: IO[str] | None = None, *, path: str | None = None):
        if (stream is None) == (path is None):
            raise ValueError("JsonLinesSink: give exactly one of stream or path")
        self._fd: Optional[int] = None
        self._stream = stream
        if path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.count = 0

    @classmethod
    def stderr(cls) -> "JsonLinesSink":
        return cls(sys.stderr)

    def emit(self, violation: Violation) -> None:
        line = violation.to_json() + "\n"
        if self._fd is not None:
            os.write(self._fd, line.encode())
        else:
            self._stream.write(line)
            self._stream.flush()
        self.count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_json_lines(text: str) -> list[dict]:
    """Parse a JSON-lines log; blank lines and non-JSON lines are skipped."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
