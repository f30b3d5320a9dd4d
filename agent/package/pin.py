"""Entrypoint pinning: open the program once, check its sha256 on that open file.

The launcher executes the returned descriptor with execveat(fd, "",
AT_EMPTY_PATH) (init/skillguard-init.c), so the kernel runs exactly the inode
whose contents were hashed: renaming another file over the path after the
check changes nothing.

Only ELF programs can be pinned. A script would be started by its
interpreter, which the kernel finds by the path in `#!` (not pinned), and
which must then re-open the script as /dev/fd/N: that needs the descriptor
left open in the skill and a /dev/fd inside its mount namespace. Rather than
claim a pin it does not hold, the launcher refuses to pin a script.

Not covered: a writer allowed to write the file itself (not swap it) can
change it between the check and execveat; the kernel refuses writes only
once the file is being executed (ETXTBSY). Keep pinned programs writable by
root only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat

ELF_MAGIC = b"\x7fELF"


class PinError(Exception):
    pass


def open_pinned(path: str, expected_sha256: str) -> int:
    """An O_RDONLY|O_CLOEXEC fd on `path` whose contents hash to `expected_sha256`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise PinError(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PinError(f"{path}: not a regular file")
        digest = hashlib.sha256()
        head = b""
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            if offset == 0:
                head = chunk[:4]
            digest.update(chunk)
            offset += len(chunk)
        actual = digest.hexdigest()
        if not hmac.compare_digest(actual, expected_sha256.lower()):
            raise PinError(f"{path} has sha256 {actual}, not the pinned {expected_sha256.lower()}")
        if head != ELF_MAGIC:
            what = "a script (#!)" if head[:2] == b"#!" else "not an ELF program"
            raise PinError(f"{path} is {what}; only ELF programs can be pinned (the interpreter "
                           "of a script is found by path and would not be pinned)")
        return fd
    except BaseException:
        os.close(fd)
        raise
