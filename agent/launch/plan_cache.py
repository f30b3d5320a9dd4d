"""Stored launch plans: the next `skillguard run` of the same manifest, with
the same command, working directory, host configuration and agent code,
reuses the plan instead of compiling it again (agent/launch/plan.py).

A stored record is used only when all of this holds, else the launch
compiles afresh (and stores the new plan):
- the directory `<state root>/cache` is root's and writable by no one else,
  and the record file is root's, mode 0600 (the same rule as agent/cache.py);
- the record's inputs equal this launch's byte for byte (the file name is
  only a checksum of them);
- every witness still holds: each path the compilers looked at has the
  same stat() (mode, device, inode, owner; size and mtime for files and
  listed directories);
- the kernel is the same release (the plan's Landlock rights were fitted to
  its ABI; the child checks the ABI again before it restricts itself).

Records are marshal data (plain values only; marshal.loads builds no
objects of other types), written atomically. $SKILLGUARD_NO_CACHE=1 turns
storing and loading off.
"""
import marshal
import posix
import zlib

from agent import oslite

RECORD_VERSION = 1
NO_CACHE_ENV = "SKILLGUARD_NO_CACHE"
# Environment variables that change where or how a launch happens.
INPUT_ENV = ("SKILLGUARD_STATE_ROOT", "SKILLGUARD_UID_RANGE", "SKILLGUARD_CONFIG",
             "SKILLGUARD_SOCKET")
DEFAULT_CONFIG = "/etc/skillguard/agent.yaml"


def code_stamp() -> bytes:
    """(path, size, mtime) of every source and profile file of the agent."""
    entries = []
    for top in ("agent", "policies"):
        stack = [oslite.join(oslite.REPO_ROOT, top)]
        while stack:
            directory = stack.pop()
            try:
                scan = list(posix.scandir(directory))
            except OSError:
                continue
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":
                        stack.append(entry.path)
                elif entry.name.endswith((".py", ".yaml", ".json", ".c")):
                    st = entry.stat(follow_symlinks=False)
                    entries.append((entry.path, st.st_size, st.st_mtime_ns))
    entries.sort()
    return marshal.dumps(entries)


def stat_key(path: str, listed: bool = False):
    """What a witness remembers of `path`: None when it does not exist; its
    type, identity and owner; for a file, or a directory whose entries were
    listed, also its size and mtime (a directory's mtime changes when an
    entry is added, removed or renamed). A granted directory whose contents
    change keeps its witness."""
    try:
        st = posix.stat(path)
    except OSError:
        return None
    key = (st.st_mode, st.st_dev, st.st_ino, st.st_uid, st.st_gid)
    if listed or st.st_mode & 0o170000 != 0o040000:  # S_ISDIR, without importing stat
        key += (st.st_size, st.st_mtime_ns)
    return key


def witness_holds(witness: list) -> bool:
    for path, key in witness:
        if stat_key(path, len(key or ()) > 5) != key:
            return False
    return True


def _config_bytes() -> bytes | None:
    path = oslite.getenv("SKILLGUARD_CONFIG") or DEFAULT_CONFIG
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def inputs(manifest_path: str, manifest_bytes: bytes, command: list, audit: bool) -> bytes:
    """Everything a stored plan must have been built from, as bytes."""
    return marshal.dumps((
        RECORD_VERSION, oslite.abspath(manifest_path), manifest_bytes, list(command),
        posix.getcwd(), bool(audit), [oslite.getenv(name) for name in INPUT_ENV],
        _config_bytes(), code_stamp(), posix.uname().release,
    ))


def _cache_dir(state_root: str) -> str:
    return oslite.join(state_root, "cache")


def _path(state_root: str, material: bytes) -> str:
    return oslite.join(_cache_dir(state_root), f"plan-{zlib.crc32(material):08x}-{len(material)}")


def _root_only(st, loose_bits: int) -> bool:
    return st.st_uid == 0 and not st.st_mode & loose_bits


def load(state_root: str, material: bytes) -> dict | None:
    """The stored record ({"plan", "warnings", "socket"}) for these inputs, or None."""
    if oslite.getenv(NO_CACHE_ENV) == "1":
        return None
    data = oslite.read_root_only(_path(state_root, material), 0o022, 0o077)
    if data is None:
        return None
    try:
        stored_material, record = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        return None
    if stored_material != material or not isinstance(record, dict):
        return None
    plan = record.get("plan")
    if not isinstance(plan, dict) or not witness_holds(plan["witness"]):
        return None
    return record


def store(state_root: str, material: bytes, record: dict) -> None:
    """Store `record` for these inputs if its plan may be stored; best effort."""
    if oslite.getenv(NO_CACHE_ENV) == "1" or not record["plan"].get("cacheable"):
        return
    directory = _cache_dir(state_root)
    try:
        oslite.makedirs(directory, 0o700)
        if not _root_only(posix.stat(directory), 0o022):
            return
        path = _path(state_root, material)
        tmp = f"{path}.{posix.getpid()}.tmp"
        fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o600)
        with open(fd, "wb") as fh:
            fh.write(marshal.dumps((material, record)))
        posix.rename(tmp, path)
    except (OSError, ValueError):
        pass
