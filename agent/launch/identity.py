"""Each skill's own uid/gid and state directory.

A skill name gets one uid (and the gid with the same number) from a
configurable range, for good: the allocation is persisted in
`<state root>/uids.json`, read and rewritten under flock(2) on
`<state root>/uids.lock` and replaced by an atomic rename, so two launches
racing for new names never hand out the same uid. Uids present in the
password database are skipped: they belong to someone else.

Defaults: state root /var/lib/skillguard, range 200000000-200999999.
Overrides (tests, packagers): SKILLGUARD_STATE_ROOT, SKILLGUARD_UID_RANGE
("first-last"), or the arguments of `allocate`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

DEFAULT_STATE_ROOT = "/var/lib/skillguard"
DEFAULT_UID_RANGE = (200_000_000, 200_999_999)
STATE_ROOT_ENV = "SKILLGUARD_STATE_ROOT"
UID_RANGE_ENV = "SKILLGUARD_UID_RANGE"


class IdentityError(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(f"identity: {reason}")


@dataclass(frozen=True)
class Identity:
    skill: str
    uid: int
    gid: int
    state_dir: str  # <root>/state/<safe name>, 0700, owned by uid:gid
    user: str  # the name the skill sees in USER/LOGNAME


def state_root(override: str | None = None) -> str:
    root = override or os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT
    if not root.startswith("/"):
        raise IdentityError(f"state root {root!r} is not absolute")
    return os.path.normpath(root)


def uid_range(override: tuple[int, int] | str | None = None) -> tuple[int, int]:
    value = override if override is not None else os.environ.get(UID_RANGE_ENV)
    if value is None:
        return DEFAULT_UID_RANGE
    if isinstance(value, str):
        try:
            first, last = (int(part) for part in value.split("-"))
        except ValueError:
            raise IdentityError(f"uid range {value!r}: expected FIRST-LAST") from None
    else:
        first, last = value
    # 0..999 are system accounts; 65534 is the overflow uid; 2^32-1 is "-1".
    if not (1000 <= first <= last <= 0xFFFFFFFE) or first <= 65534 <= last:
        raise IdentityError(f"uid range {first}-{last}: must lie in 1000..4294967294 "
                            "and not contain 65534 (nobody)")
    return first, last


def _taken_by_system(uid: int) -> bool:
    import pwd
    import grp

    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _make_private_dir(path: str, mode: int) -> None:
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror}") from None
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise IdentityError(f"{path} must be a real directory owned by root")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _load_table(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    skills = document.get("skills") if isinstance(document, dict) else None
    if not isinstance(skills, dict) or not all(isinstance(v, int) for v in skills.values()):
        raise IdentityError(f"{path}: expected {{\"version\": 1, \"skills\": {{name: uid}}}}")
    return dict(skills)


def _store_table(path: str, skills: dict[str, int]) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    data = json.dumps({"version": 1, "skills": skills}, indent=1, sort_keys=True) + "\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def allocate_uid(skill: str, root: str, first_last: tuple[int, int]) -> int:
    """The uid of `skill`: the persisted one, or the lowest free one in range."""
    import fcntl

    first, last = first_last
    lock_fd = os.open(os.path.join(root, "uids.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        table_path = os.path.join(root, "uids.json")
        table = _load_table(table_path)
        uid = table.get(skill)
        if uid is not None and first <= uid <= last:
            return uid
        used = set(table.values())
        for candidate in range(first, last + 1):
            if candidate not in used and not _taken_by_system(candidate):
                table[skill] = candidate
                _store_table(table_path, table)
                return candidate
        raise IdentityError(f"uid range {first}-{last} is exhausted ({len(used)} skills)")
    finally:
        os.close(lock_fd)


def _prepare_state_dir(path: str, uid: int, gid: int) -> None:
    """Create or fix <root>/state/<name>: a directory (never a symlink), 0700, uid:gid."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise IdentityError(f"cannot create state dir {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise IdentityError(f"state dir {path} is not a plain directory: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if st.st_mode & 0o7777 != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def allocate(skill: str, *, root: str | None = None,
             range_: tuple[int, int] | str | None = None) -> Identity:
    """Allocate (or look up) `skill`'s uid/gid and prepare its state dir. Needs root."""
    from agent.enforce.cgroup import safe_name

    root = state_root(root)
    first_last = uid_range(range_)
    # 0711: the skill may traverse to its own state dir, not list the others.
    _make_private_dir(root, 0o711)
    _make_private_dir(os.path.join(root, "state"), 0o711)
    uid = allocate_uid(skill, root, first_last)
    state_dir = os.path.join(root, "state", safe_name(skill))
    _prepare_state_dir(state_dir, uid, uid)
    return Identity(skill=skill, uid=uid, gid=uid, state_dir=state_dir,
                    user=f"skill-{safe_name(skill)}"[:32])
