"""File descriptors passed over unix sockets as SCM_RIGHTS (unix(7)): the
ancillary item to send with sendmsg(), the fds in what recvmsg() returned.
Shared by the launch zygote and the cgroup pool's helper."""
import _socket
import posix
import struct

_FD = struct.Struct("i")
FD_SIZE = _FD.size


def rights(fds) -> list:
    """sendmsg() ancillary data passing `fds` (none: an empty list)."""
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []


def fds_of(ancillary) -> list[int]:
    """The fds in recvmsg() ancillary data, in the order sent; a truncated
    trailing int (MSG_CTRUNC) is dropped."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_SIZE
            fds.extend(struct.unpack(f"{usable // FD_SIZE}i", data[:usable]))
    return fds


def close_all(fds) -> None:
    """Close each fd, ignoring those already closed."""
    for fd in fds or ():
        try:
            posix.close(fd)
        except OSError:
            pass
