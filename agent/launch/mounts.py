"""The skill's mount namespace: what the supervisor prepares for it.

The init (init/skillguard-init.c `setup_mounts`) builds the skill's view
after unshare(CLONE_NEWNS), as root:

1. `/` becomes recursively private, so nothing we mount leaks back to the
   host and host mounts made later do not appear here.
2. Each granted directory (and the state dir) is cloned as a detached mount
   with open_tree(2) *before* anything is covered, and given its flags with
   mount_setattr(2): read-only for `ro` grants, an idmapping for grants the
   skill's uid does not own (below).
3. The whole tree is made read-only and nosuid (mount_setattr AT_RECURSIVE).
4. A fresh tmpfs goes on /tmp (0700, owned by the skill) and a fresh procfs
   on /proc (the init's new PID namespace: only the skill's processes).
5. The clones are attached with move_mount(2) at their own paths, outer
   paths first; grants that lived under /tmp are re-created inside the
   private /tmp first.

Idmapped mounts (mount_setattr(2), MOUNT_ATTR_IDMAP): the skill runs as a
uid of its own, so a directory owned by the user who granted it would be
unwritable (and, at 0700, unreadable) through DAC even though Landlock grants
it. Each such grant is mounted with an idmapping from the directory's owner
to the skill's uid/gid: the skill sees it as its own, and files it creates
land on disk owned by the original owner. Files of any other owner show as
the overflow uid (nobody) and keep their "other" permissions. For a
standalone launch skillguard-init makes the user namespaces for those
idmappings itself (`make_idmap`, before it clones the init); a pre-started
init gets them with its plan, made here (`idmap_userns`) or kept by the
daemon.
"""
import posix

from agent.enforce.libc import CLONE_NEWUSER, clone_exiting

MS_REC, MS_PRIVATE = 0x4000, 1 << 18


class MountError(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(f"mount namespace: {reason}")


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
