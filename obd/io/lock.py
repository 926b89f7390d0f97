"""Exclusive locks for writers of a writable layer.

A writable layer has exactly one writer: two appenders to one data file interleave their
records and corrupt each other. Every writer takes ``flock(LOCK_EX)`` on the data file's
open file description (so two writers in one process conflict too); the lock goes with
the descriptor when it is closed or the process dies. Readers take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os

from obd.errors import FileAccessError


def _holder_pid(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, read from ``/proc/locks`` (Linux)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "->" marks a waiter
                if "->" in parts:
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    return int(parts[4])
    except (OSError, ValueError):
        return None
    return None


def lock_writer(fd: int, path: str) -> None:
    """Take the writer's lock on ``fd`` or raise :class:`FileAccessError` naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FileAccessError(f"cannot lock: {e.strerror}", path=path) from None
        pid = _holder_pid(fd)
        who = f"process {pid}" if pid is not None else "another process"
        if pid == os.getpid():
            who = "this process (opened twice)"
        raise FileAccessError(
            f"in use by {who}, which has it open for writing", path=path
        ) from None
