"""On-disk memo of pure results (loaded manifests, compiled filters and rulesets).

`skillguard run` is a fresh interpreter per launch. Parsing YAML and
compiling with libseccomp cost more than everything the kernel does for a
launch, and give the same bytes for the same inputs (compilers are pure), so
their results are kept under `<state root>/cache/`, keyed by a digest of

    the inputs the caller names + the code that computes them

where "the code" is the version plus the name, size and mtime of every file
under agent/ and policies/: editing a compiler or a base profile invalidates
every entry, with no version bump to forget.

Entries are pickles, so they are read only from a directory that belongs to
the current user and nobody else can write (mode 0700, checked on the open
fd and on the directory), never through a symlink. Anything unexpected (a
foreign owner, a loose mode, a truncated or unreadable entry) is a miss:
the value is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Callable, Optional, TypeVar

T = TypeVar("T")
CACHE_ENV = "SKILLGUARD_NO_CACHE"  # set to 1 to compute everything afresh
_fingerprint: list[bytes] = []


def code_fingerprint() -> bytes:
    """Digest of the version and the (path, size, mtime) of every source and profile file."""
    if not _fingerprint:
        from agent import __version__
        from agent.launch.plan_cache import code_stamp

        _fingerprint.append(hashlib.sha256(__version__.encode() + b"\0" + code_stamp()).digest())
    return _fingerprint[0]


def _owned_dir(path: str, loose_bits: int) -> bool:
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & loose_bits


def _private_dir(path: str) -> bool:
    return _owned_dir(path, 0o077)


def _ensure_dir(path: str) -> bool:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return _private_dir(path)


def memo(kind: str, key: bytes, compute: Callable[[], T], *, root: Optional[str]) -> T:
    """`compute()`, or its earlier result for the same `kind`, `key` and code.

    `root` is the state root (the cache lives in `<root>/cache`); None, a
    root that is not private to this user, or $SKILLGUARD_NO_CACHE=1
    disables the cache.
    """
    # The state root is 0711 (skills traverse it to their state dirs): it
    # must only be unwritable by others; the cache dir itself is 0700.
    if root is None or os.environ.get(CACHE_ENV) == "1" or not _owned_dir(root, 0o022):
        return compute()
    directory = os.path.join(root, "cache")
    name = hashlib.sha256(kind.encode() + b"\0" + code_fingerprint() + b"\0" + key).hexdigest()
    path = os.path.join(directory, f"{kind}-{name[:40]}.pickle")
    found = _read(path)
    if found is not None:
        return found[0]
    value = compute()
    if _ensure_dir(directory):
        _write(path, value)
    return value


def _read(path: str) -> Optional[tuple]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            record = pickle.load(fh)
    except Exception:  # noqa: BLE001 - a damaged entry is a miss, never an error
        return None
    finally:
        os.close(fd)
    return record if isinstance(record, tuple) and len(record) == 1 else None


def _write(path: str, value) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((value,), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.rename(temporary, path)
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower
        try:
            os.unlink(temporary)
        except OSError:
            pass


def key_of(*parts) -> bytes:
    """A stable key from parts whose repr() shows their whole value (frozen
    dataclasses of tuples, str, int, bytes). Not pickle: its bytes depend on
    which equal objects happen to be shared, so an unpickled policy would key
    differently from a freshly parsed one."""
    return hashlib.sha256(repr(parts).encode()).digest()
