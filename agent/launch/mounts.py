"""The skill's mount namespace: read-only root, private /tmp, its own /proc,
writable only where the manifest says.

`setup` runs in the launched child after unshare(CLONE_NEWNS), as root:

1. `/` becomes recursively private, so nothing we mount leaks back to the
   host and host mounts made later do not appear here.
2. Each granted directory (and the state dir) is cloned as a detached mount
   with open_tree(2) *before* anything is covered, and given its flags with
   mount_setattr(2): read-only for `ro` grants, an idmapping for grants the
   skill's uid does not own (below).
3. The whole tree is made read-only and nosuid (mount_setattr AT_RECURSIVE).
4. A fresh tmpfs goes on /tmp (0700, owned by the skill) and a fresh procfs
   on /proc (the caller's new PID namespace: only the skill's processes).
5. The clones are attached with move_mount(2) at their own paths; grants
   that lived under /tmp are re-created inside the private /tmp first.

Idmapped mounts (mount_setattr(2), MOUNT_ATTR_IDMAP): the skill runs as a
uid of its own, so a directory owned by the user who granted it would be
unwritable (and, at 0700, unreadable) through DAC even though Landlock grants
it. Each such grant is mounted with an idmapping from the directory's owner
to the skill's uid/gid: the skill sees it as its own, and files it creates
land on disk owned by the original owner. Files of any other owner show as
the overflow uid (nobody) and keep their "other" permissions.
"""
import errno
import posix
import _struct as struct  # the C module `struct` re-exports: one import less

from agent import oslite
from agent.enforce.libc import CLONE_NEWUSER, clone_exiting, syscall

# A bind is a tuple (path, writable, origin, userns_fd): path absolute,
# mounted over itself (or re-created under the private /tmp); origin like
# "manifest:/data:rw" or "state-dir"; userns_fd the idmapping owner -> skill,
# or None. The mount plan is a dict: binds, uid, gid, tmp_size (bytes; None:
# tmpfs default, half of RAM), resolv_conf (a file bound read-only over
# /etc/resolv.conf, agent/launch/netns.py, or None).

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = posix.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
# include/uapi/linux/mount.h
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18



class MountError(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(f"mount namespace: {reason}")


# struct mount_attr: attr_set, attr_clr, propagation, userns_fd (u64 each)
_MOUNT_ATTR = struct.Struct("=4Q")


def _c(path: str) -> bytes:
    return oslite.fsencode(path)


def _mount(source, target, fstype, flags, data=None) -> None:
    syscall("mount", source and source.encode(), _c(target), fstype and fstype.encode(),
            flags, data and data.encode())


def _setattr(dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0,
             userns_fd: int | None = None) -> None:
    attr = _MOUNT_ATTR.pack(attr_set, attr_clr, 0, userns_fd if userns_fd is not None else 0)
    syscall("mount_setattr", dirfd, _c(path), flags, attr, _MOUNT_ATTR.size)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _clone(bind: tuple) -> int:
    path, writable, origin, userns_fd = bind
    try:
        fd = syscall("open_tree", AT_FDCWD, _c(path),
                     OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    except OSError as exc:
        raise MountError(f"{origin}: cannot clone {path}: {posix.strerror(exc.errno)}") from None
    attr_set = MOUNT_ATTR_NOSUID | (0 if writable else MOUNT_ATTR_RDONLY)
    attr_clr = MOUNT_ATTR_RDONLY if writable else 0
    if userns_fd is not None:
        attr_set |= MOUNT_ATTR_IDMAP
    try:
        _setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, attr_set, attr_clr, userns_fd)
    except OSError as exc:
        posix.close(fd)
        hint = " (filesystem does not support idmapped mounts)" \
            if userns_fd is not None and exc.errno == errno.EINVAL else ""
        raise MountError(f"{origin}: mount_setattr on {path}: "
                         f"{posix.strerror(exc.errno)}{hint}") from None
    return fd


def _make_mountpoint(path: str, is_dir: bool) -> None:
    parent = oslite.dirname(path)
    oslite.makedirs(parent, 0o755)
    if is_dir:
        oslite.makedirs(path, 0o755)
    elif not oslite.exists(path):
        posix.close(posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o600))


def setup(plan: dict) -> None:
    """Build the skill's view of the filesystem. Call in the child, as root,
    after unshare(CLONE_NEWNS) and inside the new PID namespace."""
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise MountError(f"making / private: {posix.strerror(exc.errno)}") from None
    # Outer paths first so an inner grant lands on top of an outer one.
    ordered = sorted(plan["binds"], key=lambda b: (b[0].count("/"), b[0]))
    clones = [(bind, oslite.isdir(bind[0]), _clone(bind)) for bind in ordered]
    if plan["resolv_conf"]:
        clones.append(_resolv_conf_clone(plan["resolv_conf"]))
    try:
        _setattr(AT_FDCWD, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    except OSError as exc:
        raise MountError(f"read-only root: mount_setattr: {posix.strerror(exc.errno)}") from None
    tmp_options = f"mode=0700,uid={plan['uid']},gid={plan['gid']}"
    if plan["tmp_size"]:
        tmp_options += f",size={plan['tmp_size']}"
    try:
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    except OSError as exc:
        raise MountError(f"private /tmp: mount tmpfs: {posix.strerror(exc.errno)}") from None
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as exc:
        raise MountError(f"/proc: mount procfs: {posix.strerror(exc.errno)}") from None
    for (path, _writable, origin, _userns), is_dir, fd in clones:
        try:
            if _under(path, "/tmp"):
                _make_mountpoint(path, is_dir)
            syscall("move_mount", fd, b"", AT_FDCWD, _c(path), MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as exc:
            raise MountError(f"{origin}: attaching {path}: "
                             f"{posix.strerror(exc.errno)}") from None
        finally:
            posix.close(fd)


def _resolv_conf_clone(source: str) -> tuple:
    """(bind, False, fd): `source` cloned read-only, to go over the file that
    /etc/resolv.conf names (often a symlink into /run; move_mount(2) does not
    follow a symlink in the target's last component)."""
    from os.path import realpath  # network launches only

    target = realpath("/etc/resolv.conf")
    if not oslite.isfile(target):
        raise MountError(f"resolv.conf: /etc/resolv.conf resolves to {target}, which is not a file; "
                         "the skill's resolver cannot be put in place")
    fd = _clone((source, False, "resolv.conf", None))
    return (target, False, "resolv.conf", None), False, fd


def idmap_userns(owner_uid: int, owner_gid: int, uid: int, gid: int) -> int:
    """An fd of a user namespace mapping owner_uid/gid (on disk) to uid/gid.

    A user namespace lives only while something holds it, so a helper
    process is born in a new one and exits at once (libc.clone_exiting: no
    copy of this process); we write its maps (uid_map "inside outside
    count": inside = the id on disk, outside = the skill's id) and keep an
    fd. That works until the helper is reaped, alive or a zombie: the
    namespace hangs off the task's credentials, which a zombie keeps until
    release_task() (fs/proc/base.c proc_id_map_open,
    kernel/user_namespace.c userns_get: task_cred_xxx(task, user_ns)).
    """
    try:
        pid = clone_exiting(CLONE_NEWUSER)
    except OSError as exc:
        raise MountError(f"idmap: cannot create a user namespace: {exc.strerror}") from None
    try:
        for name, line in (("uid_map", f"{owner_uid} {uid} 1\n"), ("gid_map", f"{owner_gid} {gid} 1\n")):
            fd = posix.open(f"/proc/{pid}/{name}", posix.O_WRONLY | posix.O_CLOEXEC)
            try:
                posix.write(fd, line.encode())
            finally:
                posix.close(fd)
        return posix.open(f"/proc/{pid}/ns/user", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"idmap {owner_uid}:{owner_gid} -> {uid}:{gid}: "
                         f"{posix.strerror(exc.errno)}") from None
    finally:
        posix.waitpid(pid, 0)


def close_userns_fds(binds) -> None:
    """Close the user-namespace fds that idmapped binds held open; idempotent."""
    for _path, _writable, _origin, userns_fd in binds:
        if userns_fd is not None:
            try:
                posix.close(userns_fd)
            except OSError:
                pass
