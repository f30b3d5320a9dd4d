"""The one record type for every refusal skillguard sees, and a JSON-lines sink.

Every source (seccomp notifications, cgroup counters, the launcher's timeout,
the environment filter, later eBPF and nftables) builds a `Violation`; sinks
turn it into one line of JSON each, so a log reader never has to know which
layer produced it.
"""
import posix
import sys
import time

# Not `json` or `dataclasses`: a launch that reports an event (a refused
# environment variable, say) must not pay their imports (bench/launch).
# _json itself (a shared library) is loaded at the first event.


def _json_string(text: str) -> str:
    global _json_string
    from _json import encode_basestring_ascii as _json_string

    return _json_string(text)

LAYERS = ("seccomp", "landlock", "cgroup", "timeout", "env", "network", "launch", "invoke",
          "exec", "fs")
DECISIONS = ("denied", "killed", "audited")


FIELDS = ("skill", "pid", "layer", "operation", "decision", "rule", "time", "detail")


class Violation:
    """One refusal: skill; pid (in the supervisor's PID namespace; None when
    no process applies); layer (one of LAYERS); operation ("socket(AF_INET)",
    "ptrace", "/etc/shadow", ...); decision (one of DECISIONS); rule (the
    manifest rule, or the absence of one, that decided it); time (seconds
    since the epoch, UTC; default now); detail (optional). Immutable."""

    __slots__ = FIELDS

    def __init__(self, skill: str, pid, layer: str, operation: str, decision: str, rule: str,
                 time: float | None = None, detail: str = ""):
        if layer not in LAYERS:
            raise ValueError(f"violation: unknown layer {layer!r} (one of {LAYERS})")
        if decision not in DECISIONS:
            raise ValueError(f"violation: unknown decision {decision!r} (one of {DECISIONS})")
        values = (skill, pid, layer, operation, decision, rule,
                  _now() if time is None else time, detail)
        for name, value in zip(FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Violation is immutable: cannot set {name}")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in FIELDS)

    def __eq__(self, other) -> bool:
        return isinstance(other, Violation) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Violation(" + ", ".join(f"{n}={v!r}" for n, v in zip(FIELDS, self._values())) + ")"

    def fields(self) -> dict:
        """The raw fields (time as a float): Violation(**v.fields()) == v."""
        return dict(zip(FIELDS, self._values()))

    def to_dict(self) -> dict:
        record = self.fields()
        record["time"] = _iso8601(self.time)
        if not self.detail:
            del record["detail"]
        return record

    def to_json(self) -> str:
        """Compact JSON with sorted keys, as json.dumps(..., sort_keys=True,
        separators=(",", ":")) writes it."""
        return "{" + ",".join(f"{_json_string(k)}:{_json_value(v)}"
                              for k, v in sorted(self.to_dict().items())) + "}"


def _now() -> float:
    return time.time()


def _json_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    return _json_string(str(value))


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

    def __init__(self, stream=None, *, path: str | None = None):
        if (stream is None) == (path is None):
            raise ValueError("JsonLinesSink: give exactly one of stream or path")
        self._fd: int | None = None
        self._stream = stream
        if path is not None:
            self._fd = posix.open(path, posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
        self.count = 0

    @classmethod
    def stderr(cls) -> "JsonLinesSink":
        return cls(sys.stderr)

    def emit(self, violation: Violation) -> None:
        line = violation.to_json() + "\n"
        if self._fd is not None:
            posix.write(self._fd, line.encode())
        else:
            self._stream.write(line)
            self._stream.flush()
        self.count += 1

    def close(self) -> None:
        if self._fd is not None:
            posix.close(self._fd)
            self._fd = None


def read_json_lines(text: str) -> list[dict]:
    """Parse a JSON-lines log; blank lines and non-JSON lines are skipped."""
    import json

    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
