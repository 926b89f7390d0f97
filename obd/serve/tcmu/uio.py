"""A TCMU device's ``/dev/uioN`` (docs/tcmu.md): found through ``/sys/class/uio/uioN/name``
(``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``), mapped whole (``maps/map0/size``: the
mailbox, the command ring and the data area). A 4-byte ``read`` blocks until the kernel
queued commands; a 4-byte ``write`` makes the kernel reap completed entries.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
from collections.abc import Iterator
from dataclasses import dataclass

from obd.errors import FileAccessError

SYS_UIO = "/sys/class/uio"
NAME_PREFIX = "tcm-user/"


@dataclass(frozen=True)
class UioName:
    """The parts of a TCMU UIO name."""

    hba: int
    dev: str
    subtype: str
    cfgstring: str

    @classmethod
    def parse(cls, name: str) -> UioName | None:
        """``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``; None for another UIO device."""
        if not name.startswith(NAME_PREFIX):
            return None
        parts = name[len(NAME_PREFIX) :].split("/", 3)
        if len(parts) != 4 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2], parts[3])


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def scan(sys_uio: str = SYS_UIO) -> Iterator[tuple[int, str]]:
    """(minor, name) of each UIO device there is now."""
    try:
        entries = os.listdir(sys_uio)
    except FileNotFoundError:
        return
    for e in sorted(entries):
        if not e.startswith("uio") or not e[3:].isdigit():
            continue
        try:
            yield int(e[3:]), _read(f"{sys_uio}/{e}/name")
        except OSError:
            continue  # removed while we looked


class Uio:
    """``/dev/uio<minor>`` opened and mapped."""

    def __init__(self, minor: int, *, sys_uio: str = SYS_UIO, dev: str = "/dev") -> None:
        self.minor = minor
        self.path = f"{dev}/uio{minor}"
        size_path = f"{sys_uio}/uio{minor}/maps/map0/size"
        try:
            self.size = int(_read(size_path), 16)
        except (OSError, ValueError) as e:
            raise FileAccessError(f"cannot read the map size: {e}", path=size_path) from None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise FileAccessError(
                f"cannot open: {e.strerror} (errno {e.errno})", path=self.path
            ) from None
        try:
            self.map = mmap.mmap(
                self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as e:
            os.close(self.fd)
            raise FileAccessError(
                f"cannot map {self.size} bytes: {e.strerror} (errno {e.errno})", path=self.path
            ) from None
        self.closed = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the kernel signals new commands (or ``timeout`` seconds pass);
        False once the device is gone."""
        try:
            if timeout is not None:
                p = select.poll()
                p.register(self.fd, select.POLLIN)
                events = p.poll(int(timeout * 1000))
                if not events:
                    return True
                if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    return False
            os.read(self.fd, 4)
        except OSError as e:
            return e.errno == errno.EINTR
        return True

    def kick(self) -> None:
        """Tell the kernel completions are in the ring."""
        try:
            os.write(self.fd, b"\0\0\0\0")
        except OSError as e:
            if e.errno not in (errno.EIO, errno.ENODEV, errno.EBADF):
                raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still exported: the mapping goes with the process
        os.close(self.fd)


__all__ = ["Uio", "UioName", "scan"]
