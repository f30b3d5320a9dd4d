"""Confine processes that are already running: `Hooks.attach(policy, pids)`.

Only cgroup-scoped controls reach a running process. Attaching a skill is:
compile the policy into map entries (pure, bpf_policy), create the skill's
cgroup with its resource limits, write the map entries and the nftables
chain, attach the syscall tracepoints if this is the first skill that needs
them, then move the processes. Nothing is compiled on that path: the BPF
programs were loaded once by `Hooks.load()` at the root of the subtree.
`Hooks.attach_many()` attaches several skills in those same steps, with the
nftables elements of all of them in one transaction.

Everything is keyed by the cgroup id, so a restarted agent finds the skills
a dead one left in the pinned `skills` map ("orphans") and can detach them.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from agent.compile.bpf_policy import SKILL_DNS, SKILL_FS_KILL, SKILL_FS_OBSERVE, BpfPolicy, FsRules
from agent.enforce import bpf_hooks
from agent.enforce.cgroup import ROOT_NAME, CgroupError, SkillCgroup, cgroup_id
from agent.attach import procs
from agent.attach.cgroup_pool import limits_key, new_instance

ACTIVE = "active"
NEEDS_LAUNCH = "needs launch: "
UNAVAILABLE = "unavailable: "
PARTIAL = "partial: "

# Layers a launch applies and an attach never can: a process can only
# restrict itself (seccomp(2), landlock_restrict_self(2), unshare(2),
# execve's environment), so these are set between fork and exec.
LAUNCH_ONLY = {
    "seccomp": "a seccomp filter can only be installed by the process itself",
    "landlock": "a Landlock domain can only be entered by the process itself",
    "namespaces": "a running process keeps its mount, PID, IPC and network namespaces",
    "env": "the environment was fixed when the process was executed",
    "identity": "the process keeps its uid, gid and capabilities",
    "timeout": "the wall-clock limit is enforced by the launcher that owns the process",
}
ATTACH_LAYERS = ("cgroup", "resources", "bpf-connect", "nftables-cgroup", "fs-observe", "fs-kill",
                 "fs-deny", "network-names")
ALL_LAYERS = ATTACH_LAYERS + tuple(LAUNCH_ONLY)


class AttachError(RuntimeError):
    """Attach refused or failed; `layer` names the step. Nothing was changed."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


# Immutable records made for every attach: a NamedTuple costs a third of a
# frozen dataclass to construct (whose __init__ goes through object.__setattr__).
class Attachment(NamedTuple):
    skill_id: str
    name: str
    pids: tuple[int, ...]
    cgroup_path: str
    cgroup_id: int
    layers: dict[str, str]

    def to_dict(self) -> dict:
        return {"skill_id": self.skill_id, "name": self.name, "pids": list(self.pids),
                "cgroup_path": self.cgroup_path, "cgroup_id": self.cgroup_id,
                "layers": dict(self.layers)}


class AttachRequest(NamedTuple):
    """One skill to attach (see Hooks.attach_many)."""
    policy: object
    pids: tuple
    tree: bool = False
    require: tuple = ()
    observe_fs: bool = True


@dataclass
class _Skill:
    attachment: Attachment
    cgroup: Optional[SkillCgroup]  # None for an orphan found after a restart
    v2_dir: str
    bpf: Optional[BpfPolicy]
    fs_rules: FsRules
    flags: int
    origins: dict[int, dict[str, str]] = field(default_factory=dict)  # pid -> task_cgroups()
    fs_violations: int = 0
    adopted: bool = False  # an orphan whose policy the daemon gave back (adopt())
    found: object = None  # an orphan's entries as read back from the maps (bpf_maps.FoundEntries)


def _default_resolvers() -> list[str]:
    out = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    out.append(words[1].split("%")[0])
    except OSError:
        pass
    return out


def hooks_cgroup_root(subtree: str) -> tuple[Path, Path]:
    """(the cgroup v2 mount, <mount>/<subtree>): where the hooks attach."""
    from agent.enforce.cgroupfs import cgroup_mounts

    v2 = cgroup_mounts().v2
    if v2 is None:
        raise AttachError("cgroup", "no cgroup v2 mount: cgroup BPF hooks need one")
    return v2, v2 / subtree


def load_programs(root: Path, pin_dir: str) -> bpf_hooks.LoadedHooks:
    """Create the hooks' cgroup and compile, load, attach and pin the programs at it."""
    try:
        root.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise AttachError("cgroup", f"mkdir {root}: {exc.strerror}") from None
    try:
        return bpf_hooks.load(root, pin_dir)
    except bpf_hooks.BpfError as exc:
        raise AttachError("bpf-connect", str(exc)) from None


class Hooks:
    """The loaded programs plus every skill attached through them."""

    def __init__(self, loaded: bpf_hooks.LoadedHooks, *, subtree: str, v2_mount: Path,
                 nft_table: Optional[str], resolvers: list[str],
                 emit: Callable, note: Callable[[str], None]):
        from agent.attach.nft_cgroup import NftCgroupTable, NftError
        from agent.enforce.bpf_maps import PolicyMaps

        self.loaded = loaded
        self.subtree = subtree
        self.v2_mount = v2_mount
        self.maps = PolicyMaps(loaded.map_fds)
        self.resolvers = resolvers
        self.emit = emit
        self.note = note
        from agent.enforce.cgroupfs import cgroup_mounts

        self.mounts = cgroup_mounts()
        self._compiled: dict = {}
        self._plans: dict = {}  # (id(policy), observe_fs) -> (policy, bpf, layers, limits)
        self._tracepoints_on: Optional[bool] = None  # None: look at the pins
        self._skills: dict[str, _Skill] = {}
        self._by_cgroup: dict[int, _Skill] = {}
        self._observing = 0  # attached skills with SKILL_FS_OBSERVE
        self.tracepoints_busy = False  # attach_tracepoints() runs in another thread
        self._noted: set[str] = set()
        self._limits_noted: Optional[dict] = None  # limits_applied() of the last "resources:" note
        # <mount>/<subtree>/<skill>/<instance>: the depth `socket cgroupv2 level` matches
        self._skill_level = len(Path(subtree).parts) + 2
        self.nft = None
        self.nft_problem = ""
        if nft_table:
            try:
                self.nft = NftCgroupTable(nft_table)
            except ImportError as exc:
                self.nft_problem = f"python3-nftables missing ({exc})"
        else:
            self.nft_problem = "disabled"
        self._nft_error = NftError
        self.pool = None  # CgroupPool once start_pool() ran
        self._own_pid = os.getpid()
        self.maps.set_resolvers(resolvers)
        self._reader = bpf_hooks.RingReader(loaded.map_fds["events"], self._on_event)
        for stale in loaded.stale:
            note(f"programs of another map layout are still attached from {stale}; they keep "
                 "enforcing the skills in their own maps until those are detached")
        self._adopt_orphans()

    # ---- life cycle ----

    @classmethod
    def load(cls, *, pin_dir: str = bpf_hooks.DEFAULT_PIN_DIR, subtree: str = ROOT_NAME,
             nft_table: Optional[str] = "skillguard_cg", resolvers: Optional[Sequence[str]] = None,
             emit: Optional[Callable] = None, note: Optional[Callable[[str], None]] = None) -> "Hooks":
        """Load the programs once and attach them at <cgroup v2>/<subtree>."""
        v2, root = hooks_cgroup_root(subtree)
        return cls.from_loaded(load_programs(root, pin_dir), subtree=subtree, v2_mount=v2,
                               nft_table=nft_table, resolvers=resolvers, emit=emit, note=note)

    @classmethod
    def from_loaded(cls, loaded: bpf_hooks.LoadedHooks, *, subtree: str, v2_mount: Path,
                    nft_table: Optional[str], resolvers: Optional[Sequence[str]],
                    emit: Optional[Callable], note: Optional[Callable[[str], None]]) -> "Hooks":
        """Hooks over programs already loaded (here, or by agent.daemon.hookloader's child)."""
        return cls(loaded, subtree=subtree, v2_mount=v2_mount, nft_table=nft_table,
                   resolvers=list(resolvers if resolvers is not None else _default_resolvers()),
                   emit=emit or (lambda v: None), note=note or (lambda text: None))

    def start_pool(self):
        """Fork the helper that makes skill cgroups ahead of attach (agent.attach.cgroup_pool).
        Give `pool.fileno()` to the event loop and call `pool.on_readable()` when it is readable."""
        from agent.attach.cgroup_pool import CgroupPool

        if self.pool is None:
            self.pool = CgroupPool(self.mounts, self.subtree)
        return self.pool

    def close(self, *, unload: bool = False) -> None:
        """Stop reading events. With unload, detach every skill and remove every
        program, link, pin and the nft table; without, enforcement stays.
        Spare cgroups of the pool are removed either way."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if unload:
            for skill_id in list(self._skills):
                self.detach(skill_id)
            if self.nft is not None:
                self.nft.drop_table()
        self._reader.close()
        if self.nft is not None:
            self.nft.close()
        if unload:
            bpf_hooks.unload(self.loaded, unpin=True)
            remove_subtree(self.subtree)

    def fds(self) -> list[int]:
        """Readable when events are waiting: give them to the event loop, then call poll()."""
        return [self._reader.fd]

    def poll(self, timeout_ms: int = 0) -> None:
        """Read every waiting event (waiting up to timeout_ms for the first) and emit violations."""
        self._reader.poll(timeout_ms)

    def lost_events(self) -> int:
        return bpf_hooks.lost_events(self.loaded.map_fds["lost"])

    @property
    def restarted(self) -> bool:
        """True when links from an earlier agent were found and their programs replaced."""
        return bool(self.loaded.replaced)

    def attachments(self) -> list[Attachment]:
        return [s.attachment for s in self._skills.values()]

    # ---- attach ----

    def plan_layers(self, policy, bpf: BpfPolicy) -> dict[str, str]:
        layers = {"cgroup": ACTIVE, "resources": ACTIVE, "bpf-connect": ACTIVE}
        layers["nftables-cgroup"] = ACTIVE if self.nft is not None else UNAVAILABLE + self.nft_problem
        layers["fs-observe"] = ACTIVE if bpf.flags & SKILL_FS_OBSERVE else "off"
        if policy.fs.on_violation == "kill":
            layers["fs-kill"] = ACTIVE if bpf.flags & SKILL_FS_KILL and policy.mode == "enforce" \
                else "off: audit mode reports instead of killing"
        layers["fs-deny"] = NEEDS_LAUNCH + ("syscall tracepoints observe and cannot deny; "
                                            "BPF-LSM is not used; Landlock denies in a launch")
        if bpf.names:
            layers["network-names"] = NEEDS_LAUNCH + (
                "host names are admitted by the DNS stub of a launched skill's network namespace; "
                "a registered process reaches literal addresses only")
        for layer, why in LAUNCH_ONLY.items():
            layers[layer] = NEEDS_LAUNCH + why
        return layers

    def prepare(self, policy, observe_fs: bool = True) -> BpfPolicy:
        """Compile a policy's map entries ahead of attach (the daemon does it when
        it loads its policies); attach() compiles only what was not prepared."""
        from agent.compile.bpf_policy import compile_bpf_policy

        key = (policy, observe_fs)
        bpf = self._compiled.get(key)
        if bpf is None:
            try:
                bpf = compile_bpf_policy(policy, observe_fs=observe_fs)
            except ValueError as exc:
                raise AttachError("compile", str(exc)) from None
            if len(self._compiled) > 4096:
                self._compiled.clear()
            self._compiled[key] = bpf
        return bpf

    def _plan(self, policy, observe_fs: bool) -> tuple:
        """(map entries, layer report, cgroup limits) of a policy, kept per policy
        object: the daemon hands the same Policy for the same manifest, and
        hashing a Policy (a tree of frozen dataclasses) for `prepare`'s cache
        costs more than the lookup saves. The entry holds the policy, so its
        id() is not reused while the entry lives."""
        key = (id(policy), observe_fs)
        entry = self._plans.get(key)
        if entry is None or entry[0] is not policy:
            from agent.compile.rlimits import compile_limits

            bpf = self.prepare(policy, observe_fs)
            entry = (policy, bpf, self.plan_layers(policy, bpf), compile_limits(policy.resources))
            if len(self._plans) > 4096:
                self._plans.clear()
            self._plans[key] = entry
        return entry[1], dict(entry[2]), entry[3]

    def spare_wait(self, requests: Sequence["AttachRequest"]) -> list[bool]:
        """For each request, True when attaching it now would make its cgroup
        here although the pool's helper is making one for it (it then pays
        for a mkdir in four hierarchies that the helper does anyway); the
        caller may hold such a request back until spares arrive. Asks the
        helper for more where few are left."""
        if self.pool is None or self.pool.sock is None:
            return [False] * len(requests)
        wanted: dict = {}
        out = []
        for request in requests:
            try:
                _bpf, _layers, limits = self._plan(request.policy, request.observe_fs)
            except AttachError:
                out.append(False)  # refused by attach, at once
                continue
            key = (request.policy.name, limits_key(limits))
            wanted[key] = wanted.get(key, 0) + 1
            have = self.pool.ready(request.policy.name, limits)
            out.append(wanted[key] > have and self.pool.coming(request.policy.name, limits))
        return out

    def attach(self, policy, pids: Iterable[int], tree: bool = False,
               require: Iterable[str] = (), observe_fs: bool = True) -> Attachment:
        result = self.attach_many([AttachRequest(policy, tuple(pids), tree, tuple(require), observe_fs)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def attach_many(self, requests: Sequence["AttachRequest"]) -> list:
        """Attach several skills at once; each result is the request's
        Attachment, or the exception that refused it (an AttachError naming
        the layer; nothing of that request is left). One refusal does not
        touch the others. The pids of the requests must be disjoint.

        Every request goes through the same steps, in the same order, as a
        single attach: map entries, nftables elements, then the move, so a
        process is never in its cgroup before its grants and refusals are in
        place. Only the nftables elements of all the requests are written
        together, in one netlink transaction (all or none: on an error each
        request's are written alone, so only the one at fault is refused).
        A `tree` request is attached on its own, after those before it: its
        move takes descendants, which a request beside it might name."""
        results: list = [None] * len(requests)
        group: list[int] = []
        for index, request in enumerate(requests):
            if request.tree and group:
                self._attach_group(requests, group, results)
                group = []
            group.append(index)
            if request.tree:
                self._attach_group(requests, group, results)
                group = []
        if group:
            self._attach_group(requests, group, results)
        return results

    def _attach_group(self, requests, indexes: list[int], results: list) -> None:
        prepared = []  # (index, request, _Skill, done steps)
        for index in indexes:
            try:
                skill, done = self._prepare(requests[index])
            except Exception as exc:  # noqa: BLE001 - refused; nothing of it is left
                results[index] = exc
                continue
            prepared.append((index, requests[index], skill, done))
        if self.nft is not None and prepared:
            failed = self._nft_add_all([skill for _i, _r, skill, _d in prepared])
            kept = []
            for (index, request, skill, done), error in zip(prepared, failed):
                if error is None:
                    done.append("nft")
                    kept.append((index, request, skill, done))
                    continue
                results[index] = self._undone(skill, done, AttachError("nftables-cgroup", str(error)))
            prepared = kept
        for index, request, skill, done in prepared:
            try:
                self._register(skill)
                done.append("registered")
                moved = self._move_in(skill, list(skill.attachment.pids), request.tree)
            except Exception as exc:  # noqa: BLE001
                results[index] = self._undone(skill, done, exc)
                continue
            except BaseException:
                self._undo(skill, done)
                raise
            try:
                layers = self._sockets_held_before(skill, moved, skill.attachment.layers, list(request.require))
            except AttachError as exc:  # refused, and undone there
                results[index] = exc
                continue
            a = skill.attachment
            skill.attachment = Attachment(a.skill_id, a.name, tuple(moved), a.cgroup_path, a.cgroup_id, layers)
            results[index] = skill.attachment

    def _undone(self, skill: _Skill, done: list[str], exc: Exception) -> Exception:
        """Undo what was done for a refused request; the exception to report."""
        try:
            self._undo(skill, done)
        except AttachError as undo_error:
            self.note(f"undoing {skill.attachment.skill_id}: {undo_error}")
        return exc

    def _prepare(self, request: "AttachRequest") -> tuple[_Skill, list[str]]:
        """Check a request, take its cgroup and write its map entries: its
        _Skill and the steps done. Raises AttachError with nothing left."""
        policy = request.policy
        pids = list(dict.fromkeys(int(p) for p in request.pids))
        require = list(request.require)
        unknown = [r for r in require if r not in ALL_LAYERS]
        if unknown:
            raise AttachError("require", f"unknown layer(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(ALL_LAYERS)}")
        if not pids:
            raise AttachError("pids", "no process given")
        origins = {pid: self._check_pid(pid) for pid in pids}
        bpf, layers, limits = self._plan(policy, request.observe_fs)
        missing = [f"{r} ({layers[r]})" for r in require if layers.get(r) != ACTIVE]
        if missing:
            raise AttachError("require", "required layer(s) cannot be applied to a running process: "
                                         + "; ".join(missing))
        for text in bpf.notes:
            self.note(text)

        # A spare made ahead by the pool's helper process, else one made here.
        cgroup = self.pool.take(policy.name, limits) if self.pool is not None else None
        if cgroup is None:
            try:
                cgroup = SkillCgroup.create(policy.name, new_instance(), limits,
                                            mounts=self.mounts, root=self.subtree)
            except CgroupError as exc:
                raise AttachError("resources" if exc.controller in ("memory", "pids", "cpu") else "cgroup",
                                  exc.reason) from None
        skill_id = f"{policy.name}:{os.path.basename(cgroup.v2 or '')}"
        v2_dir = cgroup.v2
        if v2_dir is None:
            cgroup.remove()  # still empty
            raise AttachError("cgroup", "no cgroup v2 directory for the skill")
        cg = cgroup.id if cgroup.id is not None else cgroup_id(v2_dir)
        applied = cgroup.limits_applied()
        if applied != self._limits_noted:  # else its text is noted already: not built again
            self._limits_noted = applied
            self._note_once("resources: " + ", ".join(f"{c}: {w}" for c, w in applied.items()))
        attachment = Attachment(skill_id, policy.name, tuple(pids), v2_dir, cg, layers)
        skill = _Skill(attachment, cgroup, v2_dir, bpf, bpf.fs_rules, bpf.flags, origins)
        done: list[str] = []
        try:
            if bpf.flags & SKILL_FS_OBSERVE and not self._tracepoints_attached():
                self.attach_tracepoints()
            try:
                self.maps.install(cg, bpf)  # all entries or none
            except OSError as exc:
                raise AttachError("bpf-connect", f"writing the skill's map entries: {exc.strerror or exc}"
                                  ) from None
            done.append("maps")
        except BaseException:
            self._undo(skill, done)
            raise
        return skill, done

    def _nft_add_all(self, skills: list[_Skill]) -> list:
        """Write the nftables elements of every skill; per skill None or the error."""
        items = [(s.v2_dir, s.attachment.cgroup_id, s.flags, s.bpf.net4, s.bpf.net6) for s in skills]
        return self.nft.add_many(items, self._skill_level, self.resolvers)

    def _sockets_held_before(self, skill: _Skill, moved: list[int], layers: dict,
                             require: list[str]) -> dict:
        """A socket keeps the cgroup it was created in (sk_cgrp_data, set in
        sk_alloc()), and both the cgroup hooks and `socket cgroupv2` look at
        that: sockets a process already holds are not confined. Say so in the
        layer report, and refuse when those layers were required."""
        held = {pid: n for pid in moved if (n := procs.inet_socket_count(pid))}
        if not held:
            return layers
        why = (PARTIAL + f"{sum(held.values())} inet socket(s) opened before the attach "
               f"(pids {', '.join(map(str, sorted(held)))}) keep the cgroup they were created "
               "in and are not confined; new sockets are")
        layers = dict(layers)
        for layer in ("bpf-connect", "nftables-cgroup"):
            if layers.get(layer) == ACTIVE:
                layers[layer] = why
        self.note(f"network: {why}")
        refused = [r for r in require if r in ("bpf-connect", "nftables-cgroup")]
        if refused:
            self._undo(skill, ["maps", "nft", "registered"], moving_out=True)
            raise AttachError("require", f"required layer(s) {', '.join(refused)}: {why}; "
                                         "the process was moved back")
        return layers

    def _check_pid(self, pid: int) -> dict[str, str]:
        """Refuse pids that cannot be attached; where the process is now (task_cgroups)."""
        if pid <= 1 or pid == self._own_pid:
            raise AttachError("pids", f"refusing to attach pid {pid}")
        try:
            # A kernel thread has no executable (proc(5) /proc/PID/exe): one
            # readlink tells most processes apart without reading their stat.
            os.readlink(f"/proc/{pid}/exe")
            kernel_thread = False
        except OSError:
            kernel_thread = procs.is_kernel_thread(pid)
        if kernel_thread is None:
            raise AttachError("pids", f"no process {pid}")
        if kernel_thread:
            raise AttachError("pids", f"pid {pid} is a kernel thread")
        try:
            origin = procs.task_cgroups(pid)
        except (FileNotFoundError, ProcessLookupError):
            raise AttachError("pids", f"no process {pid}") from None
        where = origin.get("", "")
        if where == f"/{self.subtree}" or where.startswith(f"/{self.subtree}/"):
            raise AttachError("pids", f"pid {pid} is already confined ({where})")
        return origin

    def _note_once(self, text: str) -> None:
        """Note what is the same for most attaches (where limits went) when it changes, not each time."""
        if text not in self._noted:
            if len(self._noted) > 64:
                self._noted.clear()
                self._limits_noted = None
            self._noted.add(text)
            self.note(text)

    def adopt(self, skill_id: str, policy) -> None:
        """Give an orphan found after a restart its policy back, so its fs
        events are checked against its rules again. Its map entries stay as
        the earlier agent wrote them, and are removed as found (`found`)."""
        skill = self._skills.get(skill_id)
        if skill is None:
            raise AttachError("adopt", f"no attached skill {skill_id!r}")
        bpf = self.prepare(policy, bool(skill.flags & SKILL_FS_OBSERVE))
        skill.fs_rules = bpf.fs_rules
        skill.attachment = Attachment(skill.attachment.skill_id, policy.name, skill.attachment.pids,
                                      skill.attachment.cgroup_path, skill.attachment.cgroup_id,
                                      self.plan_layers(policy, bpf))
        skill.adopted = True

    def attached(self, skill_id: str) -> bool:
        return skill_id in self._skills

    def attachment_of_cgroup(self, cgroup_id: int) -> Optional[Attachment]:
        skill = self._by_cgroup.get(cgroup_id)
        return skill.attachment if skill is not None else None

    def _register(self, skill: _Skill) -> None:
        self._skills[skill.attachment.skill_id] = skill
        self._by_cgroup[skill.attachment.cgroup_id] = skill
        if skill.flags & SKILL_FS_OBSERVE:
            self._observing += 1

    def _unregister(self, skill: _Skill) -> None:
        if self._skills.pop(skill.attachment.skill_id, None) is not None:
            self._by_cgroup.pop(skill.attachment.cgroup_id, None)
            if skill.flags & SKILL_FS_OBSERVE:
                self._observing -= 1

    def _move_in(self, skill: _Skill, pids: list[int], tree: bool) -> list[int]:
        """Write each tgid into cgroup.procs: v2 and v1 both move every thread of
        the group (cgroup-v2.rst "Processes", cgroup-v1/cgroups.rst 2.3).
        With tree, repeat until no descendant is left outside: a child forked
        after a move is born inside; one forked before is found on the next pass."""
        moved: list[int] = []
        todo = list(pids)
        try:
            while todo:
                pid = todo.pop(0)
                if pid in moved:
                    continue
                try:
                    if pid not in skill.origins:
                        skill.origins[pid] = procs.task_cgroups(pid)
                    skill.cgroup.add(pid)
                except (CgroupError, FileNotFoundError, ProcessLookupError) as exc:
                    if not procs.exists(pid) and pid not in pids:
                        continue  # a descendant that exited meanwhile
                    raise AttachError("cgroup", f"moving pid {pid}: {exc}") from None
                moved.append(pid)
                if tree:
                    todo.extend(c for c in procs.descendants(pid) if c not in moved)
        finally:
            skill.cgroup.close_held()  # a spare's fds from the pool: later moves open the files
        return moved

    # ---- detach ----

    def detach(self, skill_id: str) -> None:
        skill = self._skills.get(skill_id)
        if skill is None:
            raise AttachError("detach", f"no attached skill {skill_id!r}")
        # Events of its processes still in the ring buffer (a kill is
        # submitted before the process dies, so before its cgroup empties)
        # are read while the cgroup id still names the skill.
        self.poll(0)
        self._undo(skill, ["maps", "nft", "registered"], moving_out=True)

    def _undo(self, skill: _Skill, done: list[str], moving_out: bool = False) -> None:
        if skill.cgroup is not None:
            skill.cgroup.close_held()
        cg = skill.attachment.cgroup_id
        errors = []
        if skill.bpf is not None:
            net4, net6 = skill.bpf.net4, skill.bpf.net6
        else:  # an orphan: its grants are still in the maps
            if skill.found is None:
                skill.found = self.maps.scan({cg})[cg]
            net4, net6 = skill.found.net4, skill.found.net6
        if "maps" in done:
            # `skills` entry first: enforcement stops here
            self.maps.remove(cg, skill.bpf, skill.found if skill.bpf is None else None)
        if "nft" in done and self.nft is not None:
            try:
                self.nft.remove(skill.v2_dir, cg, skill.flags, net4, net6)
            except self._nft_error as exc:
                errors.append(str(exc))
        self._move_out(skill)
        # Never SkillCgroup.remove(): it kills members, and detaching must not.
        dirs = [skill.v2_dir] + (list(skill.cgroup.v1_paths.values()) if skill.cgroup else [])
        left = {pid for d in dirs for pid in _members(d)}
        if left:
            errors.append(f"pids {sorted(left)} could not be moved out of {skill.v2_dir}")
        else:
            for d in dirs:
                _rmdir_quiet(d)
        if "registered" in done:
            self._unregister(skill)
        self._maybe_stop_tracepoints()
        if self.nft is not None and not self._skills and not self.maps.skills():
            try:
                self.nft.drop_table()
            except self._nft_error as exc:
                errors.append(str(exc))
        if errors:
            raise AttachError("detach", "; ".join(errors))

    def _move_out(self, skill: _Skill) -> None:
        """Move every member back where it came from (or to the hierarchy root)."""
        mounts = self.mounts
        fallback = next(iter(skill.origins.values()), {})
        dirs = [("", skill.v2_dir, mounts.v2)]
        if skill.cgroup is not None:
            dirs += [(c, p, mounts.v1.get(c)) for c, p in skill.cgroup.v1_paths.items()]
        for attempt in range(20):
            stray = False
            for controller, here, mount in dirs:
                for pid in _members(here):
                    stray = True
                    origin = skill.origins.get(pid, fallback)
                    target = _origin_dir(mount, origin, controller)
                    for candidate in (target, mount):
                        if candidate is not None and _write_pid(candidate, pid):
                            break
            if not stray:
                return
            # The next pass normally finds the cgroups empty at once; only a
            # process that keeps forking into them makes it wait (and the
            # event loop with it), briefly.
            if attempt:
                time.sleep(0.002)

    def _tracepoints_attached(self) -> bool:
        # Only this agent attaches and detaches them (their pins are in its
        # pin directory): after one look at the pins, its own flag says.
        if self._tracepoints_on is None:
            self._tracepoints_on = bpf_hooks.tracepoints_attached(self.loaded)
        return self._tracepoints_on

    def tracepoints_wanted(self, requests: Sequence["AttachRequest"]) -> bool:
        """Some of these requests observe files and the syscall tracepoints are not attached."""
        return any(r.observe_fs for r in requests) and not self._tracepoints_attached()

    def attach_tracepoints(self) -> None:
        """Attach the syscall tracepoints ahead of the attaches that need them.

        Right after the last observing skill left, the kernel is still
        unregistering them from a workqueue, one RCU grace period each under
        the trace event mutex, and perf_event_open waits for it (50-175 ms
        through the daemon). So the daemon runs this in a worker thread (the
        waits are in syscalls, without the GIL) with `tracepoints_busy` set
        on the loop until it is done: no detach runs meanwhile."""
        try:
            bpf_hooks.attach_tracepoints(self.loaded)
        except bpf_hooks.BpfError as exc:
            raise AttachError("fs-observe", str(exc)) from None
        self._tracepoints_on = True

    def _maybe_stop_tracepoints(self) -> None:
        # Counted here, not read back from the `skills` map: every skill in
        # the map is in self._skills (orphans are adopted at start), and a
        # scan of the map per detach made detaching 1,000 skills take 20 s.
        if self._observing > 0 or self.tracepoints_busy:
            return
        self._tracepoints_on = None
        bpf_hooks.detach_tracepoints(self.loaded)

    # ---- restart ----

    def _adopt_orphans(self) -> None:
        """Skills a previous agent attached are still enforced; make them detachable."""
        mounts = self.mounts
        root = self.v2_mount / self.subtree
        by_id: dict[int, Path] = {}
        for skill_dir in _subdirs(root):
            for inst in _subdirs(skill_dir):
                by_id[cgroup_id(inst)] = inst
        for cg, flags in self.maps.skills().items():
            path = by_id.get(cg)
            if path is None:
                self.maps.remove(cg, None)  # its cgroup is gone: nothing to enforce on
                continue
            skill_id = f"{path.parent.name}:{path.name}"
            attachment = Attachment(skill_id, path.parent.name, tuple(_members(path)), str(path), cg,
                                    {"cgroup": ACTIVE, "bpf-connect": ACTIVE})
            rel = path.relative_to(self.v2_mount)
            v1 = {c: m / rel for c, m in mounts.v1.items() if c in ("memory", "pids", "cpu", "freezer")
                  and (m / rel).is_dir()}
            cgroup = SkillCgroup(path, v1, {}, cg)
            skill = _Skill(attachment, cgroup, str(path), None, FsRules(()), flags)
            self._register(skill)
            self.note(f"found skill {skill_id} (cgroup {cg}) attached by an earlier agent")
        if self._skills:
            # One pass over the maps for every orphan, not one per detach.
            found = self.maps.scan(set(self._by_cgroup))
            for cg, skill in self._by_cgroup.items():
                skill.found = found[cg]
        from agent.attach.cgroup_pool import remove_stale_spares

        stale = remove_stale_spares(self.v2_mount, mounts.v1, self.subtree, set(self._by_cgroup))
        if stale:
            self.note(f"removed {stale} spare cgroup(s) an earlier agent made and did not use")
        self._rebuild_nft_if_needed()
        self._maybe_stop_tracepoints()

    def _rebuild_nft_if_needed(self) -> None:
        """Skills found in the maps keep their nft elements across a restart;
        if the table is gone or has an older layout, rebuild it from the maps
        in one transaction (the old table stays until the new one replaces it)."""
        if self.nft is None or not self._skills or self.nft.layout_current():
            return
        skills = [(s.v2_dir, s.flags, s.found.net4, s.found.net6) for s in self._skills.values()]
        try:
            self.nft.rebuild(self._skill_level, self.resolvers, skills)
        except self._nft_error as exc:
            self.note(f"nftables-cgroup: rebuilding the table for {len(skills)} skill(s) failed: {exc}")
            return
        self.note(f"nftables-cgroup: table {self.nft.table} rebuilt for {len(skills)} skill(s)")

    # ---- events and counters ----

    def _on_event(self, data: bytes) -> None:
        from agent.attach.fs_check import to_violation
        from agent.enforce.bpf_maps import EV_NET, decode_event

        event = decode_event(data)
        skill = self._by_cgroup.get(event.cgroup_id)
        name = skill.attachment.name if skill else f"cgroup:{event.cgroup_id}"
        if skill is not None and skill.bpf is None and not skill.adopted and event.kind != EV_NET \
                and event.decision != "killed":
            return  # an orphan's fs rules are unknown: only kills are reported
        violation = to_violation(name, event, skill.fs_rules if skill else FsRules(()),
                                 bool(skill and skill.flags & SKILL_DNS))
        if violation is None:
            return
        if skill is not None and violation.layer == "fs":
            skill.fs_violations += 1
        self.emit(violation)

    def counters(self, skill_id: str) -> dict[str, int]:
        skill = self._skills.get(skill_id)
        if skill is None:
            raise AttachError("counters", f"no attached skill {skill_id!r}")
        kernel = self.maps.counters(skill.attachment.cgroup_id)
        out = {"net_denied": kernel.net_denied if kernel else 0,
               "fs_events": kernel.fs_events if kernel else 0,
               "fs_killed": kernel.fs_killed if kernel else 0,
               "fs_violations": skill.fs_violations,
               "lost_events": self.lost_events()}
        if self.nft is not None:
            out["nft_rejected_all_skills"] = self.nft.counter("rejected")
        return out

    def members(self, skill_id: str) -> list[int]:
        skill = self._skills.get(skill_id)
        return _members(skill.v2_dir) if skill else []


def remove_subtree(subtree: str) -> None:
    """rmdir the subtree's root in v2 and in every v1 hierarchy, where empty
    (launched skills may still live in it)."""
    from agent.enforce.cgroupfs import cgroup_mounts

    mounts = cgroup_mounts()
    for mount in [mounts.v2] + sorted(set(mounts.v1.values())):
        if mount is not None:
            try:
                os.rmdir(mount / subtree)
            except OSError:
                pass


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def _members(cgroup_dir) -> list[int]:
    try:
        return [int(x) for x in procs.read_proc(os.path.join(cgroup_dir, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _origin_dir(mount: Optional[Path], origin: dict[str, str], controller: str) -> Optional[Path]:
    if mount is None:
        return None
    for key, path in origin.items():
        if (controller == "" and key == "") or (controller and controller in key.split(",")):
            return mount / path.lstrip("/")
    return None


def _write_pid(cgroup_dir, pid: int) -> bool:
    try:
        fd = os.open(os.path.join(cgroup_dir, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        return exc.errno == errno.ESRCH  # gone: nothing left to move


def _rmdir_quiet(path) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                break
            time.sleep(0.01)
            continue
        break
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
