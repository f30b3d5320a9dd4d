"""Persistent records of registered and launched skills: <state_root>/registry/journal.

The journal is append-only: one line per change, `put` (the whole record) or
`delete` (its id), each line {"format": 1, "op": ..., "sha256": ...,
"record": {...}} with the checksum taken over the op and the canonical JSON
of the record. A change is one write(2) of one line to a file opened with
O_APPEND (registrations that arrive together: one write of their lines,
`save_many`), made before the change is acknowledged: once write() returns, the
line is in the page cache and survives a SIGKILL of the daemon. Creating a
file per record (temporary file and rename) cost 0.1-0.5 ms on the
development VM's ext4, more than the rest of a registration; an append
costs a few microseconds.

There is no fsync: a record only matters while its processes live, and what
would lose unsynced data (a kernel crash, a power cut) ends every skill too;
after a reboot the boot id differs and every record is dropped anyway. A line
that does not parse or fails its checksum (torn by a crash, a disk error, an
edit by hand) is reported, copied aside to journal.corrupt-<time> and never
trusted; the lines before and after it still count.

At start the journal is read and rewritten compacted (live records only,
temporary file and rename(2), so a reader sees the old journal or the new
one), and again whenever dead lines outnumber live ones by a margin, so it
stays proportional to the live skills. Records of older daemons, one file
<id>.json each (same checksum format, without "op"), are read once, moved
into the journal and removed; such a file that is torn or corrupt is
reported and moved aside as <id>.json.corrupt-<time>.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

FORMAT = 1
_SUFFIX = ".json"
JOURNAL = "journal"
PUT, DELETE = "put", "delete"
COMPACT_SLACK = 1000  # dead lines tolerated beyond the live ones before compacting


class RegistryError(RuntimeError):
    pass


# json.dumps(record, sort_keys=True, separators=(",", ":")) builds this
# encoder on every call; one kept here gives the same bytes, cheaper.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def canonical(record: dict) -> bytes:
    return _CANONICAL.encode(record).encode()


def encode_record(record: dict) -> bytes:
    """The content of a legacy per-record file: the canonical JSON is written
    as is, so one serialisation serves both the checksum and the file. Pure."""
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    return b'{"format":%d,"sha256":"%s","record":%s}\n' % (FORMAT, digest.encode(), body)


def decode_record(data: bytes) -> dict:
    """The record in a legacy file's `data`, or RegistryError saying what is wrong. Pure."""
    document = _parse(data)
    want = hashlib.sha256(canonical(document["record"])).hexdigest()
    if document.get("sha256") != want:
        raise RegistryError("checksum mismatch: the record was changed or torn")
    return document["record"]


def _entry_digest(op: str, body: bytes) -> str:
    return hashlib.sha256(op.encode() + b"\0" + body).hexdigest()


def encode_entry(op: str, record: dict) -> bytes:
    """One journal line. Pure."""
    body = canonical(record)
    return b'{"format":%d,"op":"%s","sha256":"%s","record":%s}\n' % (
        FORMAT, op.encode(), _entry_digest(op, body).encode(), body)


def decode_entry(line: bytes) -> tuple[str, dict]:
    """(op, record) of one journal line, or RegistryError saying what is wrong. Pure."""
    document = _parse(line)
    op = document.get("op")
    if op not in (PUT, DELETE):
        raise RegistryError(f"unknown op {op!r}")
    record = document["record"]
    if document.get("sha256") != _entry_digest(op, canonical(record)):
        raise RegistryError("checksum mismatch: the line was changed or torn")
    skill_id = record.get("id")
    if not isinstance(skill_id, str) or not _valid_id(skill_id):
        raise RegistryError(f"bad record id {skill_id!r}")
    return op, record


def _parse(data: bytes) -> dict:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"not valid JSON ({exc}): torn or corrupt") from None
    if not isinstance(document, dict) or not isinstance(document.get("record"), dict):
        raise RegistryError("no record object")
    if document.get("format") != FORMAT:
        raise RegistryError(f"format {document.get('format')!r} is not {FORMAT}")
    return document


def _valid_id(skill_id: str) -> bool:
    return bool(skill_id) and "/" not in skill_id and not skill_id.startswith(".") and len(skill_id) <= 128


@dataclass
class LoadReport:
    records: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)  # (file name or "journal line N", why, moved to)


def read_journal(data: bytes) -> tuple[dict, list]:
    """({id: put line} of the live records in order, [(line number, why, line)]). Pure."""
    live: dict[str, bytes] = {}
    bad = []
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            op, record = decode_entry(line)
        except RegistryError as exc:
            bad.append((number, str(exc), line))
            continue
        live.pop(record["id"], None)
        if op == PUT:
            live[record["id"]] = line if line.endswith(b"\n") else line + b"\n"
    return live, bad


def read_records(state_root: str) -> list[dict]:
    """The live records under `state_root`, read only (for tools and tests)."""
    try:
        with open(os.path.join(state_root, "registry", JOURNAL), "rb") as fh:
            live, _ = read_journal(fh.read())
    except FileNotFoundError:
        return []
    return [decode_entry(line)[1] for line in live.values()]


class Registry:
    def __init__(self, state_root: str):
        self.directory = os.path.join(state_root, "registry")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.journal = os.path.join(self.directory, JOURNAL)
        self._live: dict[str, bytes] = {}  # id -> its put line
        self._lines = 0  # lines in the journal file
        self._fd: Optional[int] = None

    @staticmethod
    def _check_id(skill_id: str) -> None:
        if not isinstance(skill_id, str) or not _valid_id(skill_id):
            raise RegistryError(f"bad record id {skill_id!r}")

    def path(self, skill_id: str) -> str:
        """Where an older daemon kept this record (one file per record)."""
        self._check_id(skill_id)
        return os.path.join(self.directory, skill_id + _SUFFIX)

    # -- changes --

    def save(self, skill_id: str, record: dict) -> None:
        self._check_id(skill_id)
        if record.get("id") != skill_id:
            raise RegistryError(f"record id {record.get('id')!r} is not {skill_id!r}")
        line = encode_entry(PUT, record)
        self._append(line)
        self._live.pop(skill_id, None)
        self._live[skill_id] = line

    def save_many(self, records: list) -> None:
        """save() of several (id, record) pairs with one write(2) of their lines.
        Each line keeps its own checksum: a write cut short by a crash tears
        one line, which is caught at load; the lines before it stand."""
        lines = []
        for skill_id, record in records:
            self._check_id(skill_id)
            if record.get("id") != skill_id:
                raise RegistryError(f"record id {record.get('id')!r} is not {skill_id!r}")
            lines.append(encode_entry(PUT, record))
        self._append(b"".join(lines), len(lines))
        for (skill_id, _record), line in zip(records, lines):
            self._live.pop(skill_id, None)
            self._live[skill_id] = line

    def remove(self, skill_id: str) -> None:
        if self._live.pop(skill_id, None) is None:
            return
        self._append(encode_entry(DELETE, {"id": skill_id}))
        if self._lines > 2 * len(self._live) + COMPACT_SLACK:
            self.compact()

    def _append(self, line: bytes, count: int = 1) -> None:
        if self._fd is None:
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # One write of a small buffer to a regular file: complete or not at
        # all when the daemon is killed (a short write only on ENOSPC/EIO,
        # which raise here or leave a torn line that the checksum catches).
        written = os.write(self._fd, line)
        self._lines += count
        if written != len(line):
            raise OSError(f"registry: short write to {self.journal} ({written} of {len(line)} bytes)")

    def compact(self) -> None:
        """Rewrite the journal with the live records only (temporary file, rename)."""
        tmp = f"{self.journal}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(b"".join(self._live.values()))
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, self.journal)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lines = len(self._live)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- start --

    def load_all(self) -> LoadReport:
        """Every live record (older per-record files first, then the journal),
        with what was corrupt; leaves a compacted journal and no per-record files."""
        report = LoadReport()
        legacy = []
        now = int(time.time())
        for name in sorted(os.listdir(self.directory)):
            full = os.path.join(self.directory, name)
            if ".tmp-" in name:
                # A write that never reached its rename: the old content (if any) stands.
                os.unlink(full)
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                with open(full, "rb") as fh:
                    record = decode_record(fh.read())
                if record.get("id") != name[: -len(_SUFFIX)]:
                    raise RegistryError(f"record id {record.get('id')!r} does not match the file name")
            except (RegistryError, OSError) as exc:
                moved = f"{full}.corrupt-{now}"
                try:
                    os.rename(full, moved)
                except OSError:
                    moved = None
                report.corrupt.append((name, str(exc), moved))
                continue
            self._live[record["id"]] = encode_entry(PUT, record)
            legacy.append(full)
        try:
            with open(self.journal, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = b""
        live, bad = read_journal(data)
        for skill_id, line in live.items():
            self._live.pop(skill_id, None)
            self._live[skill_id] = line
        if bad:
            moved = f"{self.journal}.corrupt-{now}"
            try:
                with open(moved, "ab") as fh:
                    fh.write(b"".join(line for _n, _why, line in bad))
            except OSError:
                moved = None
            for number, why, _line in bad:
                report.corrupt.append((f"{JOURNAL} line {number}", why, moved))
        self.compact()
        for full in legacy:
            os.unlink(full)
        report.records = [decode_entry(line)[1] for line in self._live.values()]
        return report


def process_start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (starttime, clock ticks since boot; proc(5)),
    which tells a process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself contain ") ".
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])


def same_process(pid: int, start_time: Optional[int]) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


_BOOT_ID: Optional[str] = None


def boot_id() -> str:
    """This boot's id (random per boot, proc(5)): after a reboot no recorded pid is ours.
    Read once per process: it cannot change while the process runs."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                _BOOT_ID = fh.read().strip()
        except OSError:
            return ""
    return _BOOT_ID
