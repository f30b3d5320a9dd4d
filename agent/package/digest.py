"""The canonical digest of a skill package.

A package is a directory, or a tar archive (`.skill`, any compression
tarfile reads) of one, holding `manifest.yaml` and the skill's files. Its
digest covers every entry but the root-level signature file:

    skillguard-package/1
    ["bin","dir","0755",""]
    ["bin/tool","file","0755","<sha256 of the contents>"]
    ["lib","symlink","0000","bin"]
    ["manifest.yaml","file","0644","<sha256>"]

one JSON line per entry, sorted by path (code-point order, which is UTF-8
byte order); the digest is the sha256 of those bytes. Owners, times and
link counts are not part of it, so the same tree as a directory or as a tar
has the same digest. Adding, removing, renaming or changing a file, or
changing a mode (the 0o7777 bits), changes the digest.

Refused, for a directory and a tar alike (PackageError "invalid-package"):
device files, FIFOs and sockets; hard links (a second name could change the
file behind the package's back, and tar hard-link members name another
member rather than carry contents); symlinks whose target is absolute or
climbs out of the package; names that are not UTF-8; and, in tars, absolute
or `..` members, duplicate members, members under a symlink or a file, and
members whose directory has no entry of its own (its mode would be unknown).

Only reads: nothing is extracted or written.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Optional

from agent.package import PackageError

HEADER = b"skillguard-package/1\n"
MANIFEST = "manifest.yaml"
SIGNATURE = "SIGNATURE"  # a directory package's detached signature; not digested
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    path: str  # relative, `/`-separated, no `.` or `..`
    kind: str  # "dir", "file" or "symlink"
    mode: int  # permission bits (0o7777); 0 for symlinks
    payload: str  # sha256 hex of a file's contents, a symlink's target, "" for a dir

    def line(self) -> bytes:
        return json.dumps([self.path, self.kind, f"{self.mode:04o}", self.payload],
                          ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class PackageDigest:
    digest: str  # sha256 hex of the canonical listing
    entries: tuple[Entry, ...]
    manifest_text: bytes  # the manifest exactly as digested: load the policy from this
    embedded_signature: Optional[bytes]  # a root-level SIGNATURE member, if any

    def canonical(self) -> bytes:
        return canonical_bytes(self.entries)


def canonical_bytes(entries) -> bytes:
    return HEADER + b"".join(e.line() for e in sorted(entries, key=lambda e: e.path))


def _invalid(detail: str) -> PackageError:
    return PackageError("invalid-package", detail)


def _check_name(path: str) -> str:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{path.encode('utf-8', 'surrogateescape')!r}: file name is not UTF-8") from None
    if "\n" in path or "\0" in path:
        raise _invalid(f"{path!r}: file name holds a newline or NUL")
    return path


def _check_symlink(path: str, target: str) -> str:
    _check_name(target)
    if target.startswith("/"):
        raise _invalid(f"{path}: symlink to the absolute path {target!r} leaves the package")
    # `..` is allowed only as a leading run, and no deeper than the link's own
    # directory (whose components are real directories): after any other
    # component `..` would climb from wherever a symlink led (a link to `.`
    # makes `s/../x` mean `../x`), which a lexical check cannot see.
    parts = [p for p in target.split("/") if p not in ("", ".")]
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    if ".." in parts[climbs:]:
        raise _invalid(f"{path}: symlink to {target!r}: '..' is allowed only at the start")
    if climbs > path.count("/"):
        raise _invalid(f"{path}: symlink to {target!r} climbs out of the package")
    return target


def _finish(entries: list[Entry], manifest_text: Optional[bytes],
            embedded_signature: Optional[bytes] = None) -> PackageDigest:
    kinds = {e.path: e.kind for e in entries}
    if kinds.get(MANIFEST) != "file" or manifest_text is None:
        raise _invalid(f"no {MANIFEST} file at the top of the package")
    ordered = tuple(sorted(entries, key=lambda e: e.path))
    return PackageDigest(hashlib.sha256(canonical_bytes(ordered)).hexdigest(), ordered,
                         manifest_text, embedded_signature)


# ------------------------------------------------------------------ directories


def _hash_fd(fd: int, keep: bool) -> tuple[str, Optional[bytes]]:
    h = hashlib.sha256()
    kept = bytearray() if keep else None
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        h.update(chunk)
        if kept is not None:
            if len(kept) + len(chunk) > MAX_MANIFEST_BYTES:
                raise _invalid(f"{MANIFEST} is larger than 1 MiB")
            kept += chunk
    return h.hexdigest(), (bytes(kept) if kept is not None else None)


def _digest_dir(root: str) -> PackageDigest:
    entries: list[Entry] = []
    manifest_text = None
    try:
        root_st = os.stat(root)
    except OSError as exc:
        raise _invalid(f"{root}: {exc.strerror}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise _invalid(f"{root}: not a directory")
    # fwalk works on directory fds and never follows symlinks down, so a
    # directory swapped for a link while we read cannot lead outside.
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        relative_dir = os.path.relpath(dirpath, root)
        relative_dir = "" if relative_dir == "." else relative_dir.replace(os.sep, "/")
        for name in sorted(dirnames + filenames):
            path = _check_name(f"{relative_dir}/{name}" if relative_dir else name)
            if path == SIGNATURE:
                continue
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(path, "dir", mode, ""))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dirfd)
                entries.append(Entry(path, "symlink", 0, _check_symlink(path, target)))
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    raise _invalid(f"{path}: a hard link ({st.st_nlink} names); copy the file instead")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dirfd)
                try:
                    again = os.fstat(fd)
                    if (again.st_ino, again.st_dev) != (st.st_ino, st.st_dev):
                        raise _invalid(f"{path}: changed while it was being read")
                    sha, text = _hash_fd(fd, keep=(path == MANIFEST))
                finally:
                    os.close(fd)
                if text is not None:
                    manifest_text = text
                entries.append(Entry(path, "file", mode, sha))
            else:
                raise _invalid(f"{path}: {_kind_word(st.st_mode)} is not allowed in a package")
    return _finish(entries, manifest_text)


def _kind_word(mode: int) -> str:
    for test, word in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "this file type"


# ------------------------------------------------------------------ tar archives


def _member_path(name: str) -> str:
    """The member's package-relative path ("" for the root); refuses escapes."""
    if name.startswith("/"):
        raise _invalid(f"tar member {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _invalid(f"tar member {name!r}: '..' in the path")
    return _check_name("/".join(parts))


def _digest_tar(path: str) -> PackageDigest:
    import tarfile

    try:
        archive = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise _invalid(f"{path}: not a readable tar archive: {exc}") from None
    with archive:
        try:
            members = archive.getmembers()
        except (OSError, tarfile.TarError) as exc:
            raise _invalid(f"{path}: corrupt tar archive: {exc}") from None
        named: dict[str, object] = {}
        for member in members:
            relative = _member_path(member.name)
            if relative in named:
                raise _invalid(f"tar member {member.name!r} appears twice")
            named[relative] = member
        prefix = _wrapping_dir(named)
        entries: list[Entry] = []
        manifest_text = None
        embedded_signature = None
        kinds: dict[str, str] = {}
        for relative in sorted(named):
            member = named[relative]
            if prefix:
                if relative == prefix[:-1]:
                    continue  # the wrapping directory itself stands for the root
                relative = relative[len(prefix):]
            if relative == "":
                continue
            parent = posixpath.dirname(relative)
            if parent and kinds.get(parent) != "dir":
                what = "has no entry of its own" if parent not in kinds else f"is a {kinds[parent]}"
                raise _invalid(f"tar member {member.name!r}: its directory {parent!r} {what}")
            if relative == SIGNATURE:
                if member.isfile():
                    embedded_signature = _read_member(archive, member, relative)
                kinds[relative] = "file"
                continue
            mode = member.mode & 0o7777
            if member.isdir():
                entry = Entry(relative, "dir", mode, "")
            elif member.issym():
                entry = Entry(relative, "symlink", 0, _check_symlink(relative, member.linkname))
            elif member.islnk():
                raise _invalid(f"tar member {member.name!r}: a hard link; store the file itself")
            elif member.isfile():
                data = _read_member(archive, member, relative)
                if relative == MANIFEST:
                    if len(data) > MAX_MANIFEST_BYTES:
                        raise _invalid(f"{MANIFEST} is larger than 1 MiB")
                    manifest_text = data
                entry = Entry(relative, "file", mode, hashlib.sha256(data).hexdigest())
            else:
                raise _invalid(f"tar member {member.name!r}: a device, FIFO or other special "
                               "file is not allowed in a package")
            kinds[relative] = entry.kind
            entries.append(entry)
    return _finish(entries, manifest_text, embedded_signature)


def _wrapping_dir(named: dict) -> str:
    """`pkg/` when the archive holds one directory with the package in it, else ""."""
    if MANIFEST in named:
        return ""
    tops = {p.split("/", 1)[0] for p in named if p}
    if len(tops) == 1:
        top = tops.pop()
        member = named.get(top)
        if member is not None and member.isdir() and f"{top}/{MANIFEST}" in named:
            return top + "/"
    return ""


def _read_member(archive, member, relative: str) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise _invalid(f"tar member {relative!r}: cannot be read")
    with handle:
        return handle.read()


# ------------------------------------------------------------------ entry point


def is_archive(path: str) -> bool:
    return not os.path.isdir(path)


def digest_package(path: str) -> PackageDigest:
    """The canonical digest of the package at `path` (a directory or a tar archive)."""
    if not os.path.exists(path):
        raise _invalid(f"{path}: no such file or directory")
    return _digest_tar(path) if is_archive(path) else _digest_dir(path)
