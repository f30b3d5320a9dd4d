"""Load the eBPF hooks in a short-lived child and take over its fds.

Compiling with bcc maps clang/LLVM into the process for good (about 70 MiB
of RSS here, file-backed and anonymous, that never goes back). The daemon
instead forks a child that compiles, loads and pins everything
(agent.enforce.bpf_hooks.load), receives the map, program and link fds over
a socketpair (SCM_RIGHTS) and exits; the daemon builds its `Hooks` from
those fds. The kernel objects stay alive through the daemon's fds and the
pins (bpf(2): an object lives while an fd or a pin refers to it).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

_MAX_MESSAGE = 1 << 16


class HookLoadError(RuntimeError):
    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


def _child(sock: socket.socket, cgroup_root: Path, pin_dir: str) -> None:
    from agent.attach.hooks import AttachError, load_programs

    try:
        try:
            loaded = load_programs(cgroup_root, pin_dir)
        except AttachError as exc:
            raise HookLoadError(exc.layer, exc.reason) from None
        names, fds = {}, []
        for group in ("map_fds", "cgroup_prog_fds", "tp_prog_fds", "link_fds"):
            names[group] = []
            for name, fd in getattr(loaded, group).items():
                names[group].append(name)
                fds.append(fd)
        message = {"names": names, "replaced": list(loaded.replaced)}
        socket.send_fds(sock, [json.dumps(message).encode()], fds)
    except HookLoadError as exc:
        sock.send(json.dumps({"error": exc.reason, "layer": exc.layer}).encode())
    except BaseException as exc:  # noqa: BLE001 - a forked child must not return
        sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}", "layer": "bpf-connect"}).encode())


def load_hooks(*, pin_dir: str, subtree: str, nft_table, resolvers, emit, note):
    """A `Hooks` built from objects a child process loaded (see module doc)."""
    from agent.attach.hooks import AttachError, Hooks, hooks_cgroup_root
    from agent.enforce import bpf_hooks

    try:
        v2, cgroup_root = hooks_cgroup_root(subtree)
    except AttachError as exc:
        raise HookLoadError(exc.layer, exc.reason) from None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            _child(child, cgroup_root, pin_dir)
        finally:
            os._exit(0)
    child.close()
    try:
        message, fds, _flags, _addr = socket.recv_fds(parent, _MAX_MESSAGE, 253)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if not message:
        raise HookLoadError("bpf-connect", "the loader process died without an answer")
    info = json.loads(message)
    if "error" in info:
        for fd in fds:
            os.close(fd)
        raise HookLoadError(info.get("layer", "bpf-connect"), info["error"])
    groups = {}
    index = 0
    for group in ("map_fds", "cgroup_prog_fds", "tp_prog_fds", "link_fds"):
        groups[group] = {}
        for name in info["names"][group]:
            groups[group][name] = fds[index]
            index += 1
    loaded = bpf_hooks.LoadedHooks(pin_dir, cgroup_root, groups["map_fds"], groups["cgroup_prog_fds"],
                                   groups["tp_prog_fds"], link_fds=groups["link_fds"],
                                   replaced=list(info.get("replaced", [])))
    return Hooks.from_loaded(loaded, subtree=subtree, v2_mount=v2, nft_table=nft_table,
                             resolvers=resolvers, emit=emit, note=note)
