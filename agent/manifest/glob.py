"""The one place where skillguard's glob semantics live.

A pattern is a sequence of segments: path components (split on `/`), DNS
labels (split on `.`) or command words (split on white space). A segment
that is exactly `*` matches one segment; `**` matches any number, zero
included. Every other segment matches itself literally: a `*` inside a
segment (`foo*`) is rejected by `check_segments`, so no pattern means more
than it appears to.

Skill names in `invoke_policy` are single segments, so there `*` matches
any run of characters (`fs-*`); see `match_name`.
"""
from __future__ import annotations

import fnmatch
import ipaddress
from functools import lru_cache
from typing import Optional, Sequence

ONE = "*"
ANY = "**"


def check_segments(segments: Sequence[str], what: str) -> Optional[str]:
    """Return why `segments` is not a valid pattern, or None."""
    for seg in segments:
        if seg in (ONE, ANY):
            continue
        if "*" in seg:
            return f"'{seg}': '*' must be a whole {what} ('*' one, '**' any number)"
    return None


def match_segments(pattern: Sequence[str], subject: Sequence[str]) -> bool:
    return _match(tuple(pattern), tuple(subject))


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    if not pattern:
        return not subject
    head, rest = pattern[0], pattern[1:]
    if head == ANY:
        return any(_match(rest, subject[i:]) for i in range(len(subject) + 1))
    if not subject:
        return False
    if head == ONE or head == subject[0]:
        return _match(rest, subject[1:])
    return False


def path_segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def match_path(pattern: str, path: str) -> bool:
    """`/data/*/src` matches `/data/a/src`; `/data/**` matches `/data` and below."""
    return match_segments(path_segments(pattern), path_segments(path))


def match_host(pattern: str, host: str) -> bool:
    """`*.example.com` matches `api.example.com`, not `a.b.example.com`."""
    return match_segments(pattern.lower().rstrip(".").split("."),
                          host.lower().rstrip(".").split("."))


def match_command(pattern: Sequence[str], argv: Sequence[str]) -> bool:
    """`git **` matches `git`, `git status`, `git log -1`."""
    return match_segments(pattern, argv)


def match_name(pattern: str, name: str) -> bool:
    """Skill-name globs: `*` matches any run of characters within the name."""
    return fnmatch.fnmatchcase(name, pattern)


def ipv4_wildcard(text: str) -> Optional[ipaddress.IPv4Network]:
    """`10.0.0.*` -> 10.0.0.0/24; `10.*.*.*` -> 10.0.0.0/8; `*` -> 0.0.0.0/0.

    Returns None when `text` is not an IPv4 wildcard; raises ValueError when it
    looks like one but cannot be a CIDR (`10.*.0.1`, `300.0.0.*`).
    """
    parts = text.split(".")
    if text == ONE:
        return ipaddress.IPv4Network("0.0.0.0/0")
    if len(parts) != 4 or ONE not in parts:
        return None
    if not all(p == ONE or p.isdigit() for p in parts):
        return None
    fixed = 0
    while fixed < 4 and parts[fixed] != ONE:
        fixed += 1
    if any(p != ONE for p in parts[fixed:]):
        raise ValueError(f"'{text}': '*' may only replace trailing octets")
    octets = [int(p) for p in parts[:fixed]]
    if any(o > 255 for o in octets):
        raise ValueError(f"'{text}': octet out of range")
    base = ".".join(str(o) for o in octets + [0] * (4 - fixed))
    return ipaddress.IPv4Network(f"{base}/{8 * fixed}")
