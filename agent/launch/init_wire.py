"""The plan message for the skill's init, init/skillguard-init.c.

The supervisor sends the init its part of the launch plan as one
SOCK_SEQPACKET message; the init reads it field by field in `read_plan()`,
in the order `encode()` writes it. Every number is a little-endian u64 (an
fd index of -1 is "none"); a string is its length including a final NUL,
then its bytes; bytes are their length, then themselves; a list is its
count, then its items. Pure: no system calls here.
"""
import _struct as struct  # the C module `struct` re-exports: one import less

FORMAT = 1  # skillguard-init.c WIRE_FORMAT
FLAG_STDIO = 1  # the first three fds passed are the skill's stdio
FLAG_NETWORK = 2  # the init waits for the supervisor to set up its netns
FLAG_LANDLOCK = 4  # a Landlock section follows the rlimits
# The Landlock rule path plan.py puts for a pinned entrypoint; the init
# opens the entrypoint's fd for it instead.
PINNED_EXEC_FD = "\0pinned-exec-fd"

_U64 = struct.Struct("<Q").pack
_MASK = (1 << 64) - 1


class _Writer:
    __slots__ = ("parts",)

    def __init__(self):
        self.parts = []

    def u64(self, value: int) -> None:
        self.parts.append(_U64(value & _MASK))

    def bytes(self, value: bytes) -> None:
        self.parts.append(_U64(len(value)))
        self.parts.append(value)

    def str(self, value: str) -> None:
        data = value.encode("utf-8", "surrogateescape")
        if b"\0" in data:
            raise ValueError(f"init plan: NUL byte in {value!r}")
        self.bytes(data + b"\0")

    def strs(self, values) -> None:
        self.u64(len(values))
        for value in values:
            self.str(value)


def encode(plan: dict, binds: list, env: dict, exec_fd_index, stdio: bool) -> bytes:
    """The init's plan message. `plan`: the supervisor's child plan
    (Supervisor.prepare); `binds`: [(path, writable, origin, fd index or
    None)], outer paths first; `env`: the filtered environment;
    `exec_fd_index`: the pinned entrypoint's fd among those passed, or None;
    `stdio`: the first three fds passed are the skill's stdio."""
    mounts = plan["mounts"]
    landlock = plan["landlock"]
    flags = (FLAG_STDIO if stdio else 0) | (FLAG_NETWORK if plan["wait_for_network"] else 0) \
        | (FLAG_LANDLOCK if landlock is not None else 0)
    w = _Writer()
    w.u64(FORMAT)
    w.u64(flags)
    w.str(plan["executable"])
    w.strs(plan["argv"])
    w.strs([f"{key}={value}" for key, value in env.items()])
    w.str(plan["cwd"])
    w.str(plan["hostname"])
    w.u64(plan["uid"])
    w.u64(plan["gid"])

    w.u64(mounts["tmp_size"] or 0)
    resolv = mounts.get("resolv_target")
    w.str(mounts["resolv_conf"] if resolv else "")
    w.str(resolv or "")
    w.u64(len(binds))
    for path, writable, origin, index in binds:
        w.str(path)
        w.u64(1 if writable else 0)
        w.str(origin)
        w.u64(-1 if index is None else index)

    w.u64(len(plan["rlimits"]))
    for number, soft, hard in plan["rlimits"]:
        w.u64(number)
        w.u64(soft)
        w.u64(hard)

    if landlock is not None:
        for key in ("abi", "fs", "net", "scoped"):
            w.u64(landlock[key])
        names = landlock.get("names", {})
        w.u64(len(landlock["rules"]))
        for path, bits, origin in landlock["rules"]:
            w.str("" if path == PINNED_EXEC_FD else path)
            w.u64(bits)
            w.str(origin)
            label = names.get(bits, hex(bits))
            w.str(label if isinstance(label, str) else ",".join(label))
        w.u64(len(landlock["ports"]))
        for port in landlock["ports"]:
            w.u64(port)
    w.bytes(plan["seccomp_bpf"])
    w.u64(-1 if exec_fd_index is None else exec_fd_index)
    return b"".join(w.parts)


def sorted_binds(binds: list) -> list:
    """Outer paths first, so an inner grant is attached on top of an outer one."""
    return sorted(binds, key=lambda bind: (bind[0].count("/"), bind[0]))
