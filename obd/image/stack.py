"""The merged view of a stack of layers: an image (docs/formats.md §3).

Layer precedence, said once: lowers are listed bottom first; **the top layer wins**: a
range mapped by an upper layer hides every layer below it, a **zeroed segment masks**
what lies below and reads as zeros, and a range no layer maps (a hole) reads as zeros.
The writable upper, when present, sits above every lower; all writes go to it.
"""

from __future__ import annotations

import functools
import os
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator

from obd.errors import ObdError, ReadOnlyError, UsageError
from obd.formats.lsmt import (
    MAX_LAYERS,
    RUN_DATA,
    RUN_HOLE,
    RUN_ZERO,
    SECTOR,
    LSMTReadOnly,
    Mappings,
    SegmentIndex,
    merge_layers,
    read_view,
)
from obd.formats.lsmt.rw import LSMTWritable
from obd.io.base import Extent, ExtentKind, FileRange, ReadAt, merge_extents
from obd.io.file import LocalFile


def _swap(pread: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    return lambda length, offset: pread(offset, length)


_KINDS = {RUN_DATA: ExtentKind.DATA, RUN_ZERO: ExtentKind.ZERO, RUN_HOLE: ExtentKind.HOLE}


class Stack:
    """A virtual disk made of read-only ``lowers`` (bottom first) and an optional ``upper``.

    Implements :class:`obd.io.base.BlockDevice`. Reads are thread-safe and run in
    parallel; writes are serialized by the upper layer's lock.
    """

    def __init__(
        self,
        lowers: list[LSMTReadOnly],
        upper: LSMTWritable | None = None,
        *,
        readonly: bool = False,
        names: list[str] | None = None,
    ) -> None:
        if len(lowers) > MAX_LAYERS:
            raise UsageError(f"{len(lowers)} layers: at most {MAX_LAYERS} can be stacked")
        self.lowers = lowers
        self.upper = upper
        self.names = names or []
        top_first = list(reversed(lowers))
        self.lower_mappings: Mappings = merge_layers([lay.mappings for lay in top_first])
        self.lower_index = SegmentIndex(self.lower_mappings)
        self.lower_files: list[ReadAt] = [lay.file for lay in top_first]
        # os.pread-shaped readers, (length, offset): local files skip a Python frame
        self._lower_raw = [
            functools.partial(os.pread, f.fd) if isinstance(f, LocalFile) else _swap(f.pread)
            for f in self.lower_files
        ]
        lower_vsize = next((lay.virtual_size for lay in top_first if lay.virtual_size > 0), 0)
        if upper is not None:
            upper.tag = len(lowers)
            if upper.virtual_size == 0 and lower_vsize:
                upper.update_vsize(lower_vsize)
            self._vsize = upper.virtual_size
        else:
            self._vsize = lower_vsize
        self._readonly = readonly or upper is None or upper.readonly
        # a sparse upper over lowers is written in whole blocks of this size (0: as is)
        self._grain = (
            max(SECTOR, min(upper.data.block_size(), 1 << 20))
            if upper is not None and upper.sparse and lowers and not self._readonly
            else 0
        )
        self._lock = upper.lock if upper is not None else threading.RLock()
        # any byte range: the readers' one run-walker over :meth:`runs`, whose depth
        # indexes these files (the upper's data file is depth 0); bound once, no frame
        files = self.lower_files if upper is None else [upper.data, *self.lower_files]
        self._pread: Callable[[int, int], bytes] = functools.partial(
            read_view, self, files, vsize=self._vsize
        )
        if upper is None:
            self.pread = self._pread_lowers  # type: ignore[method-assign]
        else:
            self.pread = self._pread  # type: ignore[method-assign]

    # -- BlockDevice ------------------------------------------------------------------

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def virtual_size(self) -> int:
        return self._vsize

    def size(self) -> int:
        return self._vsize

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """``(kind, sector, count, moffset, depth)``: depth 0 is the topmost layer.

        With an upper, depth 0 is the upper and lower depths shift by one.
        """
        if self.upper is None:
            yield from self.lower_index.runs(start, end)
            return
        for run in self.upper.runs(start, end):
            if run[0] == RUN_HOLE:
                for kind, sec, cnt, moff, tag in self.lower_index.runs(run[1], run[1] + run[2]):
                    yield (kind, sec, cnt, moff, tag + 1 if kind != RUN_HOLE else 0)
            else:
                yield run

    def _pread_lowers(self, offset: int, length: int) -> bytes:
        """``pread`` of a stack without an upper, with a fast path for one segment."""
        if not (offset | length) & (SECTOR - 1) and offset + length <= self._vsize:
            idx = self.lower_index
            s = offset >> 9
            i = bisect_right(idx.starts, s) - 1
            e = s + (length >> 9)
            if i >= 0 and idx.ends[i] >= e:
                if idx.zeroed[i]:
                    return bytes(length)
                data = self._lower_raw[idx.tags[i]](
                    length, (idx.moffsets[i] + s - idx.starts[i]) << 9
                )
                if len(data) == length:
                    return data
            elif (i < 0 or idx.ends[i] <= s) and (
                i + 1 >= len(idx.starts) or idx.starts[i + 1] >= e
            ):
                return bytes(length)  # a hole
        return self._pread(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        return self._pread(offset, length)

    def read_plan(self, offset: int, length: int) -> list[bytes | memoryview | FileRange] | None:
        """``[offset, offset+length)`` as parts to send in order, without copying what
        need not be copied: zeros as ``bytes``, data of plain local layer files as
        :class:`FileRange`, data of compressed layers as the views their readers decode
        into (``pread_view``). ``None`` when a layer's file offers neither, or when the
        stack has an upper (whose data may move under a concurrent write): then use
        :meth:`pread`. Whole sectors inside the disk only."""
        if self.upper is not None or (offset | length) & (SECTOR - 1):
            return None
        if offset < 0 or length <= 0 or offset + length > self._vsize:
            return None
        files = self.lower_files
        parts: list[bytes | memoryview | FileRange] = []
        for kind, _sec, cnt, moff, tag in self.lower_index.runs(
            offset >> 9, (offset + length) >> 9
        ):
            if kind != RUN_DATA:
                parts.append(bytes(cnt << 9))
                continue
            f = files[tag]
            if isinstance(f, LocalFile):
                parts.append(FileRange(f.fd, moff << 9, cnt << 9))
                continue
            view = getattr(f, "pread_view", None)
            if view is None:
                return None
            data = view(moff << 9, cnt << 9)
            if len(data) != cnt << 9:
                return None  # short: pread says why
            parts.append(data)
        return parts

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents of ``[offset, offset+length)``, adjacent equal ones merged."""
        vsize = self._vsize
        if length is None:
            length = vsize - offset
        end = min(vsize, offset + length)
        if offset >= end:
            return iter(())
        s0 = offset // SECTOR
        s1 = -(-end // SECTOR)

        def gen() -> Iterator[Extent]:
            for kind, sec, cnt, _moff, depth in self.runs(s0, s1):
                a = max(sec * SECTOR, offset)
                b = min((sec + cnt) * SECTOR, end)
                if b > a:
                    yield Extent(a, b - a, _KINDS[kind], None if kind == RUN_HOLE else depth)

        return merge_extents(gen())

    def _writable(self) -> LSMTWritable:
        if self._readonly or self.upper is None:
            raise ReadOnlyError("image is read-only (no writable upper layer)")
        return self.upper

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._vsize:
            raise UsageError(f"range {offset}+{length} is outside the disk ({self._vsize} bytes)")

    # A sparse upper's index is rebuilt on reopen from the data file's allocated blocks
    # (SEEK_DATA), whole file-system blocks: a sector never written but sharing a block
    # with a written one would come back as zeros, hiding the layers below. So over
    # lowers, a sparse upper is written in whole blocks, the sectors around a write
    # filled with what the disk reads there now (under the upper's lock).

    def _write_blocks(self, up: LSMTWritable, offset: int, data: bytes | bytearray | memoryview, grain: int) -> None:  # fmt: skip
        end = offset + len(data)
        a = offset - offset % grain
        b = min(-(-end // grain) * grain, self._vsize)
        if a == offset and b == end:
            up.pwrite(offset, data)
            return
        head = self._pread(a, offset - a) if a < offset else b""
        tail = self._pread(end, b - end) if end < b else b""
        up.pwrite(a, b"".join((head, data, tail)))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        up = self._writable()
        self._bounds(offset, len(data))
        grain = self._grain
        if not grain:
            up.pwrite(offset, data)
            return
        with up.lock:
            self._write_blocks(up, offset, data, grain)

    def discard(self, offset: int, length: int) -> None:
        up = self._writable()
        self._bounds(offset, length)
        grain = self._grain
        if not grain:
            up.discard(offset, length)
            return
        # whole blocks become holes; the part-blocks at the ends read as zeros (a
        # discard's content is undefined), written as whole blocks
        end = offset + length
        a = -(-offset // grain) * grain
        b = end - end % grain
        with up.lock:
            if a >= b:
                self._write_blocks(up, offset, bytes(length), grain)
                return
            if offset < a:
                self._write_blocks(up, offset, bytes(a - offset), grain)
            up.discard(a, b - a)
            if b < end:
                self._write_blocks(up, b, bytes(end - b), grain)

    def write_zeroes(self, offset: int, length: int) -> None:
        up = self._writable()
        self._bounds(offset, length)
        grain = self._grain
        if not grain:
            up.write_zeroes(offset, length)
            return
        end = offset + length
        a = min(-(-offset // grain) * grain, end)
        b = max(end - end % grain, a)
        with up.lock:
            if offset < a:
                self._write_blocks(up, offset, bytes(a - offset), grain)
            if a < b:
                up.write_zeroes(a, b - a)
            if b < end:
                self._write_blocks(up, b, bytes(end - b), grain)

    def flush(self) -> None:
        if self.upper is not None and not self.upper.readonly:
            self.upper.flush()

    def close(self) -> None:
        errors: list[BaseException] = []
        if self.upper is not None:
            try:
                if not self.upper.readonly:
                    self.upper.flush()
            except (OSError, ObdError) as e:
                errors.append(e)
            self.upper.close()
        for lay in self.lowers:
            lay.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what merge and inspect need ---------------------------------------------------

    def merged_mappings(self) -> tuple[Mappings, list[ReadAt]]:
        """The whole view as one sorted mapping list and its sources, for flattening.

        Tags index the returned sources: 0 is the topmost read-only layer and the upper
        (when present) is last, as upstream orders them (§3.4, §3.5).
        """
        sources = list(self.lower_files)
        if self.upper is None:
            return self.lower_mappings, sources
        n = len(self.lowers)
        with self._lock:
            upper_m = self.upper.idx.mappings(tag=n)
        sources.append(self.upper.data)
        return merge_layers([upper_m, self.lower_mappings], [0, 0]), sources
