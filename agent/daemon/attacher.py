"""The daemon's side of `register`: agent.attach (eBPF hooks, cgroup move,
nftables socket-cgroup rules) driven from the event loop.

The hooks load once, at the daemon's start, and their event fds are read by
the loop. If they cannot load, `register` is refused with the reason
(fail closed): a registered process is only confined by them.
"""
from __future__ import annotations

import time
from typing import Optional

from agent.daemon import protocol


class Attacher:
    def __init__(self, daemon):
        self.daemon = daemon
        self.hooks = None
        self.problem: Optional[str] = None
        self._readers: list[int] = []
        try:
            import agent.attach  # noqa: F401
        except ImportError as exc:
            self.problem = f"eBPF hooks are not available: {exc}"
            return
        config = daemon.config
        try:
            from agent.daemon.hookloader import load_hooks

            self.hooks = load_hooks(pin_dir=config.bpf_pin_dir, subtree=config.cgroup_subtree,
                                    nft_table=config.nft_cgroup_table,
                                    resolvers=list(config.dns_upstream) or None,
                                    emit=self._on_violation,
                                    note=lambda text: daemon.log(f"hooks: {text}"))
        except Exception as exc:  # noqa: BLE001 - any load failure refuses register, not the daemon
            self.problem = f"eBPF hooks failed to load: {exc}"
            self.daemon.log(f"register disabled: {self.problem}")
            return
        self._lost_seen = 0
        for fd in self.hooks.fds():
            self.daemon.loop.add_reader(fd, self._on_readable)
            self._readers.append(fd)
        # Skill cgroups made ahead by a helper process (agent/attach/cgroup_pool.py);
        # without it each registration makes its own, as before.
        try:
            pool = self.hooks.start_pool()
        except OSError as exc:
            self.daemon.log(f"hooks: no cgroup pool ({exc.strerror or exc}); cgroups are made per registration")
        else:
            self.daemon.loop.add_reader(pool.fileno(), self._on_pool_readable)
            self._readers.append(pool.fileno())

    def _on_pool_readable(self) -> None:
        pool = self.hooks.pool
        if pool is None:
            return
        fd = pool.fileno() if pool.sock is not None else None
        try:
            pool.on_readable()
        except Exception as exc:  # noqa: BLE001 - a bad answer stops the pool, not the daemon
            pool.stop(f"{type(exc).__name__}: {exc}")
        if pool.sock is None and fd is not None:
            self.daemon.loop.remove_reader(fd)
            self._readers.remove(fd)
            self.daemon.log(f"hooks: cgroup pool stopped ({pool.problem}); cgroups are made per registration")

    def _on_readable(self) -> None:
        try:
            self.hooks.poll(0)
        except Exception as exc:  # noqa: BLE001
            self.daemon.log(f"hooks: poll failed: {type(exc).__name__}: {exc}")
        try:
            lost = self.hooks.lost_events()
        except Exception:  # noqa: BLE001
            return
        if lost > self._lost_seen:
            self.daemon.pipeline.count_lost("kernel_ring_buffer", lost - self._lost_seen)
            self._lost_seen = lost

    def _on_violation(self, violation) -> None:
        skill = next((s for s in self.daemon.skills.values()
                      if s.kind == "registered" and s.live and s.name == violation.skill), None)
        self.daemon.publish(violation, skill)

    # -- operations --

    def available(self) -> Optional[str]:
        return None if self.hooks is not None else self.problem

    def attach(self, skill, policy, pids, tree: bool, require) -> dict:
        if self.hooks is None:
            raise protocol.RpcError(protocol.LAYER_UNAVAILABLE,
                                    f"register: {self.problem}; nothing was changed")
        started = time.monotonic()
        attachment = self.hooks.attach(policy, list(pids), tree=tree, require=tuple(require))
        self.daemon.metrics.attach_seconds.observe(time.monotonic() - started)
        return attachment

    def layer_names(self) -> tuple:
        from agent.attach import ALL_LAYERS

        return tuple(ALL_LAYERS)

    def detach(self, skill) -> list[str]:
        problems = []
        if self.hooks is not None:
            attach_id = _attach_id(skill)
            if self.hooks.attached(attach_id):
                try:
                    self.hooks.detach(attach_id)
                except Exception as exc:  # noqa: BLE001
                    problems.append(str(exc))
        # Never kill here: unregistering releases processes, it does not end them.
        from agent.daemon.cgroups import rmdir_if_empty

        problems.extend(rmdir_if_empty(skill.cgroup_paths))
        return problems

    def readopt(self, skill) -> Optional[str]:
        """Take over a registered skill after a restart; None on success, else why not.

        Its programs, maps and nft rules never went away (pinned); Hooks.load()
        found it by cgroup id as an orphan. Here it gets its policy back, so
        its fs events are checked against its rules again.
        """
        from agent.daemon.cgroups import cgroup_populated

        if not cgroup_populated(skill.cgroup_paths):
            return "its processes have all exited"
        if self.hooks is None:
            return self.problem
        found = self.hooks.attachment_of_cgroup(skill.cgroup_id)
        if found is None:
            return (f"cgroup {skill.cgroup_id} is not in the pinned eBPF maps: its hooks were "
                    "removed while the daemon was down")
        skill.attachment = found
        adopt = getattr(self.hooks, "adopt", None)
        if callable(adopt):
            try:
                adopt(found.skill_id, skill.policy)
            except Exception as exc:  # noqa: BLE001
                return f"adopting {found.skill_id}: {exc}"
        return None

    def alive(self, skill) -> bool:
        from agent.daemon.cgroups import cgroup_populated

        return cgroup_populated(skill.cgroup_paths)

    def network_counts(self, skill) -> dict:
        """{"dropped": n}: connects/sends the cgroup hooks refused plus packets the
        nft socket-cgroup rules rejected. Allowed traffic is not counted by them."""
        if self.hooks is None or skill.attachment is None:
            return {}
        try:
            counters = self.hooks.counters(_attach_id(skill))
        except Exception:  # noqa: BLE001
            return {}
        return {"dropped": counters.get("net_denied", 0) + counters.get("nft_rejected", 0)}

    def close(self) -> None:
        """Stop reading events; the pinned hooks keep enforcing (never unloaded here)."""
        for fd in self._readers:
            self.daemon.loop.remove_reader(fd)
        self._readers.clear()
        if self.hooks is not None:
            self.hooks.close(unload=False)


def _attach_id(skill) -> str:
    attachment = skill.attachment
    return getattr(attachment, "skill_id", None) or skill.id
