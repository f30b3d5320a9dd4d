"""sd_notify(3) by hand: one datagram to $NOTIFY_SOCKET. No python3-systemd needed."""
from __future__ import annotations

import os
import socket
from typing import Optional


def notify(state: str, env=os.environ) -> bool:
    """Send `state` ("READY=1", "WATCHDOG=1", "STATUS=...") if systemd asked for it."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace (sd_notify(3))
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), path)
        return True
    except OSError:
        return False


def watchdog_interval(env=os.environ) -> Optional[float]:
    """Half of WatchdogSec in seconds when the watchdog is on for this process, else None
    (sd_watchdog_enabled(3): WATCHDOG_USEC, and WATCHDOG_PID if set must be us)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
