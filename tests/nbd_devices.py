"""Simple block devices for the NBD server tests (plain files, no LSMT)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from obd.errors import ReadOnlyError
from obd.io.base import Extent, ExtentKind
from obd.io.file import data_extents, punch_hole


class RawFileDevice:
    """A :class:`~obd.io.base.BlockDevice` over a plain file: holes are sparse regions."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self._size = os.fstat(self.fd).st_size
        self.flushes = 0
        self._lock = threading.Lock()

    @property
    def readonly(self) -> bool:
        return self._readonly

    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _writable(self) -> None:
        if self._readonly:
            raise ReadOnlyError("read-only device", path=self.path)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable()
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def discard(self, offset: int, length: int) -> None:
        self._writable()
        punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)

    def flush(self) -> None:
        self._writable()
        with self._lock:
            self.flushes += 1
        os.fsync(self.fd)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        end = self._size if length is None else min(self._size, offset + length)
        pos = offset
        for d, h in data_extents(self.fd, offset, end):
            if d > pos:
                yield Extent(pos, d - pos, ExtentKind.HOLE)
            yield Extent(d, h - d, ExtentKind.DATA, 0)
            pos = h
        if pos < end:
            yield Extent(pos, end - pos, ExtentKind.HOLE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def make_raw(path: str, size: int, chunks: dict[int, bytes] | None = None) -> str:
    """A sparse file of ``size`` bytes with ``chunks`` (offset -> bytes) written in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in (chunks or {}).items():
            f.seek(off)
            f.write(data)
    return path
