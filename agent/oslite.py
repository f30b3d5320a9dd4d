"""The few `os` and `os.path` functions the launch path needs, on `posix` alone.

`import os` costs ~2 ms of every `skillguard run` here (it loads
`_collections_abc` for `os.environ`); the launch path's modules import
`posix`, the C module `os` re-exports, and this. Each function behaves as its
`os`/`os.path` namesake for POSIX paths (tests/unit/test_oslite.py compares
them).
"""
import posix
import sys

_ENCODING = sys.getfilesystemencoding()


def fsencode(path: str) -> bytes:
    return path.encode(_ENCODING, "surrogateescape") if isinstance(path, str) else path


def _decode(value: bytes) -> str:
    return value.decode(_ENCODING, "surrogateescape")


def getenv(name: str, default=None):
    value = posix.environ.get(fsencode(name))
    return default if value is None else _decode(value)


def environ() -> dict:
    """A copy of the process environment, decoded as `os.environ` decodes it."""
    return {_decode(k): _decode(v) for k, v in posix.environ.items()}


def join(first: str, *rest: str) -> str:
    path = first
    for part in rest:
        if part.startswith("/"):
            path = part
        elif not path or path.endswith("/"):
            path += part
        else:
            path += "/" + part
    return path


def dirname(path: str) -> str:
    head = path[:path.rfind("/") + 1]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head


def normpath(path: str) -> str:
    if not path:
        return "."
    # POSIX allows one implementation-defined meaning for exactly two leading slashes.
    initial = 2 if path.startswith("//") and not path.startswith("///") else \
        1 if path.startswith("/") else 0
    parts: list = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != ".." or (not initial and not parts) or (parts and parts[-1] == ".."):
            parts.append(part)
        elif parts:
            parts.pop()
    return "/" * initial + "/".join(parts) or "."


def abspath(path: str) -> str:
    return normpath(path if path.startswith("/") else join(posix.getcwd(), path))


def exists(path: str) -> bool:
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _mode(path: str):
    try:
        return posix.stat(path).st_mode
    except (OSError, ValueError):
        return None


def isdir(path: str) -> bool:
    mode = _mode(path)
    return mode is not None and mode & 0o170000 == 0o040000


def isfile(path: str) -> bool:
    mode = _mode(path)
    return mode is not None and mode & 0o170000 == 0o100000


def read_root_only(path: str, dir_loose: int, file_loose: int):
    """The bytes of `path` when its directory and the file itself are root's
    and have none of the `*_loose` mode bits; never through a symlink at the
    end; None otherwise or on any error. For files whose contents a root
    process trusts (agent/bundle.py, agent/launch/plan_cache.py)."""
    try:
        st = posix.stat(dirname(path) or ".")
        if st.st_uid != 0 or st.st_mode & dir_loose:
            return None
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = posix.fstat(fd)
        if st.st_uid != 0 or st.st_mode & file_loose:
            return None
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    except OSError:
        return None
    finally:
        posix.close(fd)


def makedirs(path: str, mode: int = 0o777) -> None:
    """os.makedirs(path, mode, exist_ok=True): `mode` for the leaf, 0o777
    (less the umask) for the directories made on the way, as since Python 3.7."""
    try:
        posix.mkdir(path, mode)
    except FileExistsError:
        if not isdir(path):
            raise
    except FileNotFoundError:
        parent = dirname(path.rstrip("/"))
        if not parent or parent == path:
            raise
        makedirs(parent)
        try:
            posix.mkdir(path, mode)
        except FileExistsError:
            if not isdir(path):
                raise


# The directory holding agent/ (the repository the agent runs from).
REPO_ROOT = dirname(dirname(abspath(__file__)))
