"""Persistent records of registered and launched skills: <state_root>/registry/<id>.json.

Each file holds {"format": 1, "sha256": ..., "record": {...}}, the checksum
taken over the canonical JSON of "record". Writes go to a temporary file in
the same directory and are renamed over the old one (rename(2) is atomic),
so a reader sees the old record or the new one, never half of each; a
daemon killed mid-write leaves only a temporary file, removed at the next
start. There is no fsync: a record only matters while its processes live,
and what would lose unsynced data (a kernel crash, a power cut) ends every
skill too; an emptied or torn file after such an event fails its checksum.
A file that fails to parse or whose checksum does not match (a torn write,
a disk error, an edit by hand) is reported and moved aside as
<id>.json.corrupt-<time>, never trusted.
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


class RegistryError(RuntimeError):
    pass


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def encode_record(record: dict) -> bytes:
    """The file content for `record`: the canonical JSON is written as is, so
    one serialisation serves both the checksum and the file. Pure."""
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    return b'{"format":%d,"sha256":"%s","record":%s}\n' % (FORMAT, digest.encode(), body)


def decode_record(data: bytes) -> dict:
    """The record in `data`, or RegistryError saying what is wrong. Pure."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"not valid JSON ({exc}): torn or corrupt") from None
    if not isinstance(document, dict) or not isinstance(document.get("record"), dict):
        raise RegistryError("no record object")
    if document.get("format") != FORMAT:
        raise RegistryError(f"format {document.get('format')!r} is not {FORMAT}")
    want = hashlib.sha256(canonical(document["record"])).hexdigest()
    if document.get("sha256") != want:
        raise RegistryError("checksum mismatch: the record was changed or torn")
    return document["record"]


@dataclass
class LoadReport:
    records: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)  # (file name, why, moved to)


class Registry:
    def __init__(self, state_root: str):
        self.directory = os.path.join(state_root, "registry")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    @staticmethod
    def _check_id(skill_id: str) -> None:
        if not skill_id or "/" in skill_id or skill_id.startswith(".") or len(skill_id) > 128:
            raise RegistryError(f"bad record id {skill_id!r}")

    def path(self, skill_id: str) -> str:
        self._check_id(skill_id)
        return os.path.join(self.directory, skill_id + _SUFFIX)

    def save(self, skill_id: str, record: dict) -> None:
        target = self.path(skill_id)
        tmp = f"{target}.tmp-{os.getpid()}"
        data = encode_record(record)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, target)

    def remove(self, skill_id: str) -> None:
        try:
            os.unlink(self.path(skill_id))
        except FileNotFoundError:
            return

    def load_all(self) -> LoadReport:
        report = LoadReport()
        for name in sorted(os.listdir(self.directory)):
            full = os.path.join(self.directory, name)
            if ".tmp-" in name:
                # A write that never reached its rename: the old record (if any) stands.
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
                moved = f"{full}.corrupt-{int(time.time())}"
                try:
                    os.rename(full, moved)
                except OSError:
                    moved = None
                report.corrupt.append((name, str(exc), moved))
                continue
            report.records.append(record)
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


def boot_id() -> str:
    """This boot's id (random per boot, proc(5)): after a reboot no recorded pid is ours."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""
