"""One cgroup per running skill instance: membership, limits, kill.

Layout: `<mount>/skillguard/<skill>/<instance>` in the cgroup v2 hierarchy
and, on hybrid hosts, in each v1 hierarchy that has to hold a limit. A limit
goes through v2 when the v2 root offers its controller, else through the v1
hierarchy of that controller. A limit that was asked for and can be applied
nowhere makes `create` raise `CgroupError` (fail closed).

Kernel references: Documentation/admin-guide/cgroup-v2.rst,
Documentation/admin-guide/cgroup-v1/{memory,pids,freezer-subsystem}.rst,
Documentation/scheduler/sched-bwc.rst.
"""
import errno
import posix
import time

from agent import oslite

# Nothing heavy at import: the launcher's child and `skillguard run` use this
# module (bench/launch). Paths are strings; `v2_path`/`v1_paths` give Paths.

ROOT_NAME = "skillguard"
CPU_PERIOD_US = 100_000
CPU_MIN_QUOTA_US = 1_000  # the kernel refuses smaller CFS quotas (sched-bwc.rst)
LIMITED_CONTROLLERS = ("memory", "pids", "cpu")
# The group of cgroups made before their skill is known (create_neutral): `@`
# is never in a safe_name(), so no skill's directory can be this one.
NEUTRAL_GROUP = "@spare"
_NAME_MAX = 64
_SAFE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class CgroupError(RuntimeError):
    """A cgroup step failed; names the controller (or "cgroup") and why."""

    def __init__(self, controller: str, reason: str):
        super().__init__(f"cgroup {controller}: {reason}")
        self.controller = controller
        self.reason = reason


class CgroupExists(CgroupError):
    """The instance's directory is there already."""


def remove_leftover_instance(parts: tuple, instance: str, mounts, root: str = ROOT_NAME) -> None:
    """rmdir `<root>/<parts...>/<instance>` in every hierarchy. For a caller
    that names its instance after its own pid, a directory of that name was
    left by an earlier process with the same pid, killed with SIGKILL before
    it could remove it (pids come round: pid_max is 32768 here). rmdir
    refuses one with members (EBUSY): it stays, and creating still fails."""
    for mount in ([mounts.v2] if mounts.v2 is not None else []) + list(mounts.v1.values()):
        try:
            posix.rmdir(oslite.join(posix.fspath(mount), root, *parts, instance))
        except OSError:
            pass


# ---- pure conversions ------------------------------------------------------

def cpu_quota_us(cpu: float, period_us: int = CPU_PERIOD_US) -> int:
    """CPUs' worth of time -> CFS quota per period, at least the kernel minimum."""
    return max(CPU_MIN_QUOTA_US, round(cpu * period_us))


class LimitValues:
    """The three cgroup limits as plain numbers (None: not asked for); what
    `compile.rlimits.Limits` holds, without importing the compilers."""

    __slots__ = ("memory_bytes", "cpu", "pids")

    def __init__(self, memory_bytes=None, cpu=None, pids=None):
        self.memory_bytes, self.cpu, self.pids = memory_bytes, cpu, pids

    def requested(self, controller: str) -> bool:
        return self.value_for(controller) is not None

    def value_for(self, controller: str):
        return {"memory": self.memory_bytes, "cpu": self.cpu, "pids": self.pids}[controller]


def v2_limit_files(limits, controller: str) -> list[tuple[str, str]]:
    """(file, value) pairs that set `controller`'s limit in a v2 cgroup, in order."""
    value = limits.value_for(controller)
    if value is None:
        return []
    if controller == "memory":
        # memory.swap.max 0: the limit is on all memory; a skill cannot spill
        # into swap. Written only when the file exists (swap accounting on).
        return [("memory.max", str(value)), ("memory.swap.max", "0")]
    if controller == "cpu":
        return [("cpu.max", f"{cpu_quota_us(value)} {CPU_PERIOD_US}")]
    if controller == "pids":
        return [("pids.max", str(value))]
    raise ValueError(controller)


def v1_limit_files(limits, controller: str) -> list[tuple[str, str]]:
    """(file, value) pairs that set `controller`'s limit in a v1 cgroup, in order.

    memory: memsw (memory+swap) gets the same value as the memory limit, so the
    limit covers swap too; it must be written after memory.limit_in_bytes
    because the kernel requires memsw >= memory (cgroup-v1/memory.rst 2.5).
    cpu: the period is written before the quota.
    """
    value = limits.value_for(controller)
    if value is None:
        return []
    if controller == "memory":
        return [("memory.limit_in_bytes", str(value)),
                ("memory.memsw.limit_in_bytes", str(value))]
    if controller == "cpu":
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                ("cpu.cfs_quota_us", str(cpu_quota_us(value)))]
    if controller == "pids":
        return [("pids.max", str(value))]
    raise ValueError(controller)


OPTIONAL_LIMIT_FILES = {"memory.swap.max", "memory.memsw.limit_in_bytes"}


def safe_name(name: str) -> str:
    """A directory name for `name`: unsafe characters become `_`; when that
    changed anything (or the name is too long) a short hash of the original
    keeps distinct names distinct."""
    cleaned = "".join(c if c in _SAFE_NAME_CHARS else "_" for c in name).lstrip(".")
    if cleaned == name and 0 < len(name) <= _NAME_MAX:
        return name
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{cleaned[:_NAME_MAX] or 'x'}-{digest}"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse `key value` lines (memory.events, pids.events, cpu.stat, ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


# ---- file helpers ----------------------------------------------------------

def _write(path: str, value: str, controller: str) -> None:
    try:
        fd = posix.open(path, posix.O_WRONLY)
        try:
            posix.write(fd, value.encode())
        finally:
            posix.close(fd)
    except OSError as e:
        raise CgroupError(controller, f"writing {value!r} to {path}: {e.strerror}") from e


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _current(path: str):
    try:
        return _read(path).strip()
    except OSError:
        return None  # written (and its error reported) as usual


def _read_pids(procs_file: str) -> list[int]:
    # ENODEV: the cgroup is being removed (kernfs deactivated its files
    # before rmdir unlinks them); it has no members either way.
    try:
        return [int(x) for x in _read(procs_file).split()]
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def _mkdir_path(mount: str, parts: tuple[str, ...], controller: str,
                created: list[str]) -> str:
    """mkdir every level under `mount`, appending new ones to `created`.
    The leaf must be new: an instance name is unique per launch (CgroupExists
    otherwise)."""
    # The parents usually exist (an earlier instance made them): try the leaf
    # alone first, one mkdir instead of one per level.
    leaf = oslite.join(mount, *parts)
    try:
        posix.mkdir(leaf, 0o755)
        created.append(leaf)
        return leaf
    except FileExistsError:
        raise CgroupExists(controller, f"{leaf} already exists") from None
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CgroupError(controller, f"mkdir {leaf}: {e.strerror}") from e
    # A concurrent remove() of a sibling instance may rmdir a shared parent
    # between our mkdir of it and of its child: start over on ENOENT.
    for _ in range(5):
        path = mount
        try:
            for i, part in enumerate(parts):
                path = oslite.join(path, part)
                try:
                    posix.mkdir(path, 0o755)
                    created.append(path)
                except FileExistsError:
                    if i == len(parts) - 1:
                        raise CgroupExists(controller, f"{path} already exists") from None
            return path
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CgroupError(controller, f"mkdir {path}: {e.strerror}") from e
    raise CgroupError(controller, f"mkdir {path}: a parent keeps vanishing")


def _mounts():
    from agent.enforce.cgroupfs import cgroup_mounts  # lazy: keeps import light
    return cgroup_mounts()


# ---- the cgroup ------------------------------------------------------------

class SkillCgroup:
    """The cgroup(s) of one running skill instance."""

    def __init__(self, v2_path, v1_paths: dict, applied: dict[str, str], cgroup_id: int | None,
                 procs_fds: list[int] | None = None):
        self.v2 = posix.fspath(v2_path) if v2_path is not None else None
        self.v1 = {ctrl: posix.fspath(path) for ctrl, path in v1_paths.items()}
        self.id = cgroup_id  # inode of the v2 directory (cgroup id); None without v2
        self._applied = dict(applied)
        # Precomputed so that add() in a forked child only opens and writes.
        self._procs_files = [oslite.join(p, "cgroup.procs") for p in self._all_dirs()]
        # Write fds of _procs_files opened ahead (by the cgroup pool's helper),
        # used by add() until close_held(); None: add() opens the files.
        self._procs_fds = procs_fds if procs_fds and len(procs_fds) == len(self._procs_files) else None

    @property
    def v2_path(self):
        """The v2 directory as a Path (None without v2)."""
        from pathlib import Path

        return Path(self.v2) if self.v2 is not None else None

    @property
    def v1_paths(self) -> dict:
        from pathlib import Path

        return {ctrl: Path(path) for ctrl, path in self.v1.items()}

    # -- creation --

    @classmethod
    def create(cls, skill: str, instance: str, limits, mounts=None,
               root: str = ROOT_NAME) -> "SkillCgroup":
        mounts = mounts if mounts is not None else _mounts()
        return cls._create((root, safe_name(skill), safe_name(str(instance))), limits, mounts)

    @classmethod
    def create_neutral(cls, instance: str, mounts=None, root: str = ROOT_NAME) -> "SkillCgroup":
        """`<root>/@spare/<instance>`: a directory in v2 and in every v1
        hierarchy a limit could need, no limit written (`apply_limits` writes
        them once the skill is known). For an init started before its launch."""
        mounts = mounts if mounts is not None else _mounts()
        v2_offered = set()
        if mounts.v2 is not None:
            v2_offered = set(_read(oslite.join(posix.fspath(mounts.v2), "cgroup.controllers")).split())
        every = {c: (0 if c in v2_offered or c in mounts.v1 else None) for c in LIMITED_CONTROLLERS}
        placed = LimitValues(every["memory"], every["cpu"], every["pids"])
        return cls._create((root, NEUTRAL_GROUP, safe_name(instance)), placed, mounts, write=False)

    def apply_limits(self, limits) -> None:
        """Write `limits` into a cgroup from create_neutral (before anything
        of the skill runs in it); a requested limit with no directory to
        hold it raises CgroupError (fail closed)."""
        applied = {}
        for ctrl in LIMITED_CONTROLLERS:
            if not limits.requested(ctrl):
                applied[ctrl] = "not requested"
                continue
            where = self._applied.get(ctrl)
            if where == "v2" and self.v2 is not None:
                self._write_limits(self.v2, v2_limit_files(limits, ctrl), ctrl)
            elif where == "v1" and ctrl in self.v1:
                self._write_limits(self.v1[ctrl], v1_limit_files(limits, ctrl), ctrl)
            else:
                raise CgroupError(ctrl, "controller is neither offered by cgroup v2 nor mounted "
                                        "as a v1 hierarchy")
            applied[ctrl] = where
        self._applied = applied

    @classmethod
    def _create(cls, parts, limits, mounts, write: bool = True) -> "SkillCgroup":
        """Make the directories (and with `write`, the limits); on any
        failure remove every directory made here."""
        created: list[str] = []
        try:
            return cls._make(parts, limits, mounts, created, write)
        except BaseException:
            for path in reversed(created):
                try:
                    posix.rmdir(path)
                except OSError:
                    pass
            raise

    @classmethod
    def _make(cls, parts, limits, mounts, created: list[str], write: bool) -> "SkillCgroup":
        v2_mount = posix.fspath(mounts.v2) if mounts.v2 is not None else None
        v1_mounts = {ctrl: posix.fspath(path) for ctrl, path in mounts.v1.items()}
        v2_offered = set()
        if v2_mount is not None:
            v2_offered = set(_read(oslite.join(v2_mount, "cgroup.controllers")).split())
        placement: dict[str, str] = {}
        for ctrl in LIMITED_CONTROLLERS:
            if ctrl in v2_offered:
                placement[ctrl] = "v2"
            elif ctrl in v1_mounts:
                placement[ctrl] = "v1"
            elif limits.requested(ctrl):
                raise CgroupError(ctrl, "controller is neither offered by cgroup v2 "
                                        f"({v2_mount}) nor mounted as a v1 hierarchy")
            else:
                placement[ctrl] = "not requested"

        v2_path = None
        if v2_mount is not None:
            v2_ctrls = sorted(c for c, p in placement.items() if p == "v2" and limits.requested(c))
            v2_path = cls._make_v2(v2_mount, parts, v2_ctrls, created)
            for ctrl in v2_ctrls if write else ():
                cls._write_limits(v2_path, v2_limit_files(limits, ctrl), ctrl)

        v1_paths: dict[str, str] = {}
        for ctrl in LIMITED_CONTROLLERS:
            if placement[ctrl] == "v1" and limits.requested(ctrl):
                v1_paths[ctrl] = _mkdir_path(v1_mounts[ctrl], parts, ctrl, created)
                if write:
                    cls._write_limits(v1_paths[ctrl], v1_limit_files(limits, ctrl), ctrl)
        # Without v2 `cgroup.freeze` (< 5.2, or no v2), kill() needs the v1
        # freezer to stop forks while it signals.
        if v2_path is None or not oslite.exists(oslite.join(v2_path, "cgroup.freeze")):
            if "freezer" not in v1_mounts:
                raise CgroupError("freezer", "no cgroup v2 cgroup.freeze and no "
                                             "v1 freezer hierarchy: a skill could not be killed reliably")
            v1_paths["freezer"] = _mkdir_path(v1_mounts["freezer"], parts, "freezer", created)

        applied = {c: (placement[c] if limits.requested(c) else "not requested")
                   for c in LIMITED_CONTROLLERS}
        # The kernfs inode number is the cgroup id that bpf_get_current_cgroup_id()
        # returns (fs/kernfs: ino = kn->id on 64-bit).
        cgroup_id = posix.stat(v2_path).st_ino if v2_path is not None else None
        return cls(v2_path, v1_paths, applied, cgroup_id)

    @staticmethod
    def _make_v2(mount: str, parts, ctrls: list[str], created: list[str]) -> str:
        leaf = _mkdir_path(mount, parts, "cgroup", created)
        if ctrls:
            # Enable the controllers top-down for the children of each level
            # (cgroup-v2.rst "Enabling and Disabling"); the root is exempt
            # from the no-internal-process rule and our levels hold none.
            level = mount
            for part in parts:
                _enable_subtree(level, ctrls)
                level = oslite.join(level, part)
        return leaf

    @staticmethod
    def _write_limits(path: str, pairs: list[tuple[str, str]], ctrl: str) -> None:
        for name, value in pairs:
            target = oslite.join(path, name)
            if name in OPTIONAL_LIMIT_FILES and not oslite.exists(target):
                continue
            if name == "cpu.cfs_period_us" and _current(target) == value:
                # A new cgroup has the default period already; writing it
                # walks every task group on the host (tg_set_bandwidth).
                continue
            _write(target, value, ctrl)

    # -- membership --

    def _all_dirs(self) -> list[str]:
        dirs = list(self.v1.values())
        if self.v2 is not None:
            dirs.append(self.v2)
        return dirs

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into every hierarchy.

        Safe in a forked child before exec: only open/write/close.
        """
        data = str(pid).encode()
        held = self._procs_fds
        for index, procs in enumerate(self._procs_files):
            try:
                if held is not None:
                    # The write is checked against the opener's credentials
                    # (cgroup_procs_write_permission() uses of->file->f_cred),
                    # root's here as in this process.
                    posix.write(held[index], data)
                    continue
                fd = posix.open(procs, posix.O_WRONLY)
                try:
                    posix.write(fd, data)
                finally:
                    posix.close(fd)
            except OSError as e:
                raise CgroupError("cgroup", f"moving pid {pid} into {procs}: {e.strerror}") from e

    def init_join_files(self) -> tuple[list[str], str | None]:
        """What a launched init writes "0" (the writer itself) to, to join
        this cgroup (init/skillguard-init.c): the v1 `tasks` files, and the
        v2 `cgroup.procs` for when clone3 could not start it in the v2
        directory (kernels before 5.7)."""
        procs = oslite.join(self.v2, "cgroup.procs") if self.v2 is not None else None
        return [oslite.join(path, "tasks") for path in self.v1.values()], procs

    def open_v2(self) -> int | None:
        """An fd of the v2 directory for clone3(CLONE_INTO_CGROUP), or None without v2."""
        if self.v2 is None:
            return None
        try:
            return posix.open(self.v2, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
        except OSError as e:
            raise CgroupError("cgroup", f"open {self.v2}: {e.strerror}") from e

    @property
    def held_fds(self) -> int:
        return len(self._procs_fds) if self._procs_fds is not None else 0

    def close_held(self) -> None:
        """Close the cgroup.procs fds opened ahead; add() opens the files from now on."""
        held, self._procs_fds = self._procs_fds, None
        for fd in held or ():
            try:
                posix.close(fd)
            except OSError:
                pass

    def pids(self) -> list[int]:
        """Member processes (tgids), from every hierarchy, sorted."""
        members: set[int] = set()
        for procs in self._procs_files:
            members.update(_read_pids(procs))
        return sorted(members)

    def limits_applied(self) -> dict[str, str]:
        """controller -> "v2" | "v1" | "not requested". A requested limit that
        could not be applied never gets here: create() raised instead."""
        return dict(self._applied)

    # -- counters --

    def memory_events(self) -> dict[str, int]:
        """{"oom": OOM events, "oom_kill": processes the OOM killer killed},
        plus "max" (times usage hit the limit) where the kernel counts it.

        v1 has no OOM-event counter separate from kills, so there "oom" equals
        "oom_kill" (cgroup-v1/memory.rst, memory.oom_control). v1 gets no "max":
        memory.failcnt misses every hit once memsw holds the same limit, since
        the memsw counter is charged first and does not track failures
        (mm/memcontrol.c: `memory.track_failcnt = !memcg_on_dfl` only).
        """
        where = self._applied["memory"]
        if where == "v2":
            ev = parse_flat_keyed(_read(oslite.join(self.v2, "memory.events")))
            return {"max": ev.get("max", 0), "oom": ev.get("oom", 0),
                    "oom_kill": ev.get("oom_kill", 0)}
        if where == "v1":
            ctl = parse_flat_keyed(_read(oslite.join(self.v1["memory"], "memory.oom_control")))
            kills = ctl.get("oom_kill", 0)
            return {"oom": kills, "oom_kill": kills}
        return {"oom": 0, "oom_kill": 0}

    def pids_events(self) -> int:
        """How many forks the pids limit refused ("max" in pids.events)."""
        where = self._applied["pids"]
        if where == "v2":
            return parse_flat_keyed(_read(oslite.join(self.v2, "pids.events"))).get("max", 0)
        if where == "v1":
            return parse_flat_keyed(_read(oslite.join(self.v1["pids"], "pids.events"))).get("max", 0)
        return 0

    def cpu_stat(self) -> dict[str, int]:
        """CPU use and throttling: usage_usec (v2 cpu.stat, kept even without the
        cpu controller) merged with nr_periods/nr_throttled/throttled_* from
        wherever the cpu limit lives."""
        stat: dict[str, int] = {}
        if self.v2 is not None:
            stat.update(parse_flat_keyed(_read(oslite.join(self.v2, "cpu.stat"))))
        if self._applied["cpu"] == "v1":
            stat.update(parse_flat_keyed(_read(oslite.join(self.v1["cpu"], "cpu.stat"))))
        return stat

    # -- teardown --

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every member and wait until the cgroup is empty.

        v2 `cgroup.kill` (>= 5.14) kills atomically, forks included. Without it,
        freeze, signal every member, thaw, repeat until empty.
        """
        if self.v2 is not None and oslite.exists(oslite.join(self.v2, "cgroup.kill")):
            try:
                _write(oslite.join(self.v2, "cgroup.kill"), "1", "cgroup")
            except CgroupError as e:
                # Removed meanwhile (ENOENT), or being removed (ENODEV): its
                # members are gone already.
                if getattr(e.__cause__, "errno", None) in (errno.ENOENT, errno.ENODEV):
                    return
                raise
            # Members added to a v1 hierarchy only (should not happen): signal them.
            if not self._wait_empty(timeout):
                self._kill_with_signals(timeout)
        else:
            self._kill_with_signals(timeout)

    def _freeze_file(self) -> tuple[str, str, str]:
        if self.v2 is not None and oslite.exists(oslite.join(self.v2, "cgroup.freeze")):
            return oslite.join(self.v2, "cgroup.freeze"), "1", "0"
        if "freezer" in self.v1:
            return oslite.join(self.v1["freezer"], "freezer.state"), "FROZEN", "THAWED"
        raise CgroupError("freezer", "no v2 cgroup.freeze and no v1 freezer to stop forks while killing")

    def _kill_with_signals(self, timeout: float = 5.0) -> None:
        """Freeze so nothing forks between listing and signalling, SIGKILL each
        member, thaw so the v1 freezer lets the dying tasks exit; repeat."""
        if not self.pids():
            return
        freeze_file, frozen, thawed = self._freeze_file()
        deadline = time.monotonic() + timeout
        while True:
            members = self.pids()
            if not members:
                return
            if time.monotonic() > deadline:
                raise CgroupError("cgroup", f"members {members} still alive after {timeout}s of SIGKILL")
            _write(freeze_file, frozen, "freezer")
            try:
                for pid in self.pids():
                    try:
                        posix.kill(pid, 9)  # SIGKILL
                    except ProcessLookupError:
                        pass
            finally:
                _write(freeze_file, thawed, "freezer")
            self._wait_empty(0.2)

    def _wait_empty(self, timeout: float) -> bool:
        # SIGKILLed tasks leave cgroup.procs once they reach do_exit; zombies are
        # not listed (kernel/cgroup/cgroup.c css_task_iter_advance).
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def remove(self) -> None:
        """Kill members if any, then rmdir the instance directory everywhere and
        the skill's directory where it is left empty. Idempotent."""
        self.close_held()
        if self.pids():
            self.kill()
        for path in self._all_dirs():
            _rmdir_retrying(path)
            parent = oslite.dirname(path)
            try:
                posix.rmdir(parent)  # the skill level; other instances keep it busy
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY):
                    raise CgroupError("cgroup", f"rmdir {parent}: {e.strerror}") from e

    def __repr__(self) -> str:
        return f"SkillCgroup(v2={self.v2}, v1={self.v1}, id={self.id})"


def _running(pid: int) -> bool:
    """True unless `pid` is gone or a zombie: a killed supervisor whose own
    parent died too waits to be reaped by the host's init for a while, and
    it holds nothing (its cgroup's rmdir still fails while anything lives
    in it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return data[data.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def remove_stale_instances(skill: str, prefix: str, mounts, root: str = ROOT_NAME,
                           group: str | None = None) -> list[str]:
    """rmdir the instance directories `<root>/<skill>/<prefix><pid>` (or
    `<root>/<group>/...`, `group` used as it is: NEUTRAL_GROUP) whose
    process `pid` is gone, in every hierarchy: what a supervisor killed with
    SIGKILL could not remove. A live pid's (or a reused pid's) directory is
    left alone, and rmdir refuses a populated cgroup (EBUSY), so nothing in
    use is touched. Returns the directories removed."""
    removed = []
    dirs = ([mounts.v2] if mounts.v2 is not None else []) + list(mounts.v1.values())
    for mount in dirs:
        parent = oslite.join(posix.fspath(mount), root, group if group is not None else safe_name(skill))
        try:
            names = posix.listdir(parent)
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix) or not name[len(prefix):].isdigit():
                continue
            if _running(int(name[len(prefix):])):
                continue  # alive (or a reused pid): not ours to judge
            try:
                posix.rmdir(oslite.join(parent, name))
                removed.append(oslite.join(parent, name))
            except OSError:
                pass
        if removed:
            try:
                posix.rmdir(parent)  # the skill level, when nothing else is in it
            except OSError:
                pass
    return removed


def cgroup_id(v2_dir) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in `v2_dir`: the
    kernfs inode number (fs/kernfs: ino = kn->id on 64-bit)."""
    return posix.stat(v2_dir).st_ino


def task_cgroups(pid: int) -> dict[str, str]:
    """Where process `pid` is: hierarchy ("" for v2, else its controllers as
    listed, e.g. "memory" or "cpu,cpuacct") -> path in it (cgroups(7))."""
    out = {}
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def _rmdir_retrying(path: str, timeout: float = 2.0) -> None:
    # rmdir returns EBUSY while a just-killed task is still leaving the cgroup.
    deadline = time.monotonic() + timeout
    while True:
        try:
            posix.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError("cgroup", f"rmdir {path}: {e.strerror}") from e
            time.sleep(0.01)


def _enable_subtree(path: str, ctrls: list[str]) -> None:
    current = set(_read(oslite.join(path, "cgroup.subtree_control")).split())
    missing = [c for c in ctrls if c not in current]
    if missing:
        _write(oslite.join(path, "cgroup.subtree_control"), " ".join("+" + c for c in missing),
               ",".join(missing))
