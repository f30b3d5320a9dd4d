"""Human units for `resources`: sizes, CPU shares and durations.

Each parser takes the YAML value (int, float or str) and returns the number
or raises ValueError with what was expected.
"""
from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

SIZE_HINT = "a size like 512M, 1.5GiB, 200MB or a number of bytes"
CPU_HINT = "a number of CPUs (0.5, 2), a percentage of one CPU ('50%') or millicpus ('500m')"
DURATION_HINT = "a duration like 30s, 5m, 1h30m, 250ms or a number of seconds (0: none)"


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HINT}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected {SIZE_HINT}, got {value!r}")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def parse_cpu(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {CPU_HINT}")
    if isinstance(value, (int, float)):
        cpus = float(value)
    else:
        text = str(value).strip()
        try:
            if text.endswith("%"):
                cpus = float(text[:-1]) / 100
            elif text.endswith("m"):
                cpus = float(text[:-1]) / 1000
            else:
                cpus = float(text)
        except ValueError:
            raise ValueError(f"expected {CPU_HINT}, got {value!r}") from None
    if not 0.01 <= cpus <= 1024:
        raise ValueError(f"{cpus:g} CPUs is out of range (0.01 to 1024)")
    return cpus


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HINT}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds
