"""The ReadAt / WriteAt protocol and the Extent value.

Every object that holds bytes (a local file, a ZFile's decompressed view, a remote blob, a
layer, a whole image) is a :class:`ReadAt`. Writable things add ``pwrite`` and ``flush``.
A virtual disk that can be served (an image, a writable layer) is a :class:`BlockDevice`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class ReadAt(Protocol):
    """Random-access, read-only bytes.

    ``pread(offset, length)`` returns at most ``length`` bytes starting at ``offset``;
    it returns fewer only at the end of the object (and ``b""`` at or past the end).
    """

    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@runtime_checkable
class WriteAt(ReadAt, Protocol):
    """Random-access, writable bytes. ``flush`` makes every earlier write durable."""

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


class ExtentKind(enum.Enum):
    """What a range of a virtual disk holds.

    DATA: stored bytes. ZERO: an explicit zeroed segment (reads as zeros, masks lower
    layers). HOLE: nothing mapped by any layer (reads as zeros).
    """

    DATA = "data"
    ZERO = "zero"
    HOLE = "hole"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of a virtual disk: ``length`` bytes at ``offset`` of one ``kind``.

    ``depth`` is the layer serving the run, 0 for the topmost (the writable upper when
    there is one); ``None`` for holes.
    """

    offset: int
    length: int
    kind: ExtentKind
    depth: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def reads_zero(self) -> bool:
        return self.kind is not ExtentKind.DATA


def merge_extents(extents: Iterator[Extent] | list[Extent]) -> Iterator[Extent]:
    """Join adjacent extents of equal kind and depth."""
    cur: Extent | None = None
    for e in extents:
        if e.length == 0:
            continue
        if cur is not None and cur.end == e.offset and cur.kind is e.kind and cur.depth == e.depth:
            cur = Extent(cur.offset, cur.length + e.length, cur.kind, cur.depth)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


@dataclass(frozen=True, slots=True)
class FileRange:
    """``length`` bytes at ``offset`` of the open file ``fd``: a part of a read that a
    server can send straight from the file (``os.sendfile``) instead of copying it."""

    fd: int
    offset: int
    length: int


class BlockDevice(WriteAt, Protocol):
    """A virtual disk that can be served: an image (stack) or a single layer.

    Offsets and lengths of ``pwrite``, ``discard`` and ``write_zeroes`` are multiples of 512
    for LSMT-backed devices; ``pread`` accepts any range inside ``size()``.
    ``readonly`` devices raise :class:`obd.errors.ReadOnlyError` on every write.
    """

    @property
    def readonly(self) -> bool: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]: ...
