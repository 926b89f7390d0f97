"""LSMT lookups: runs over sorted segments, merged views, the read dispatcher (docs/formats.md §1.7, §3.2)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from obd.formats.lsmt.layout import (
    SECTOR,
    Mappings,
)
from obd.io.base import ReadAt

RUN_HOLE = 0
RUN_ZERO = 1
RUN_DATA = 2


def iter_runs(
    starts: list[int],
    ends: list[int],
    moffsets: list[int],
    zeroed: list[bool],
    tags: list[int] | None,
    start: int,
    end: int,
) -> Iterator[tuple[int, int, int, int, int]]:
    """Walk sorted segments over ``[start, end)``: ``(kind, sector, count, moffset, tag)``.

    Holes (no segment) have kind RUN_HOLE; ``tags`` None means every tag is 0.
    """
    i = bisect_right(starts, start) - 1
    if i < 0 or ends[i] <= start:
        i += 1
    pos = start
    n = len(starts)
    while pos < end:
        if i >= n or starts[i] >= end:
            yield (RUN_HOLE, pos, end - pos, 0, 0)
            return
        s = starts[i]
        if s > pos:
            yield (RUN_HOLE, pos, s - pos, 0, 0)
            pos = s
        e = min(ends[i], end)
        tag = tags[i] if tags is not None else 0
        if zeroed[i]:
            yield (RUN_ZERO, pos, e - pos, 0, tag)
        else:
            yield (RUN_DATA, pos, e - pos, moffsets[i] + (pos - s), tag)
        pos = e
        i += 1


class SegmentIndex:
    """An immutable, sorted, non-overlapping index for lookups (sectors).

    Lookups use ``bisect`` on plain Python lists built once from the arrays.
    ``tag`` selects the source file of a data run (0 = topmost layer of a merged view).
    """

    __slots__ = ("ends", "m", "moffsets", "starts", "tags", "zeroed")

    def __init__(self, m: Mappings) -> None:
        self.m = m
        self.starts: list[int] = m.offset.tolist()
        self.ends: list[int] = (m.offset + m.length).tolist()
        self.moffsets: list[int] = m.moffset.tolist()
        self.zeroed: list[bool] = m.zeroed.tolist()
        self.tags: list[int] = m.tag.tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Yield ``(kind, sector, count, moffset, tag)`` covering ``[start, end)``."""
        return iter_runs(self.starts, self.ends, self.moffsets, self.zeroed, self.tags, start, end)


def merge_layers(indexes: list[Mappings], tag_offsets: list[int] | None = None) -> Mappings:
    """Merge layer indexes, given **top first**, into one view (§3.2).

    The top layer wins; a zeroed segment masks what lies below it; gaps of an upper
    layer are filled from the layers below. Each result entry's ``tag`` is its own tag
    plus ``tag_offsets[d]`` of the layer it came from, by default the layer's depth
    (0 = top), which for single layers (tags 0) is the depth itself.
    """
    if not indexes:
        return Mappings.empty()
    if tag_offsets is None:
        tag_offsets = list(range(len(indexes)))
    top = _Lists.of(indexes[0], tag_offsets[0])
    for depth in range(1, len(indexes)):
        top = _overlay(top, _Lists.of(indexes[depth], tag_offsets[depth]))
    return Mappings.from_lists(top.off, top.ln, top.mo, top.ze, top.tg)


@dataclass(slots=True)
class _Lists:
    off: list[int]
    ln: list[int]
    mo: list[int]
    ze: list[bool]
    tg: list[int]

    @classmethod
    def of(cls, m: Mappings, tag_offset: int) -> _Lists:
        return cls(
            m.offset.tolist(),
            m.length.tolist(),
            m.moffset.tolist(),
            m.zeroed.tolist(),
            (m.tag.astype(np.int64) + tag_offset).tolist(),
        )


def _overlay(top: _Lists, low: _Lists) -> _Lists:
    """``top`` plus the parts of ``low`` in its gaps, trimmed to them."""
    out = _Lists([], [], [], [], [])
    l_off, l_ln, l_mo, l_ze, l_tg = low.off, low.ln, low.mo, low.ze, low.tg
    nl = len(l_off)
    j = 0

    def fill(gs: int, ge: int, j: int) -> int:
        while j < nl and l_off[j] + l_ln[j] <= gs:
            j += 1
        while j < nl and l_off[j] < ge:
            lo = l_off[j]
            le = lo + l_ln[j]
            s = max(lo, gs)
            e = min(le, ge)
            out.off.append(s)
            out.ln.append(e - s)
            out.mo.append(l_mo[j] if l_ze[j] else l_mo[j] + (s - lo))
            out.ze.append(l_ze[j])
            out.tg.append(l_tg[j])
            if le > ge:
                break
            j += 1
        return j

    pos = 0
    for i in range(len(top.off)):
        o = top.off[i]
        if o > pos:
            j = fill(pos, o, j)
        out.off.append(o)
        out.ln.append(top.ln[i])
        out.mo.append(top.mo[i])
        out.ze.append(top.ze[i])
        out.tg.append(top.tg[i])
        pos = o + top.ln[i]
    fill(pos, 1 << 62, j)
    return out


class RunSource(Protocol):
    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]: ...


def read_view(index: RunSource, files: list[ReadAt], offset: int, length: int, vsize: int) -> bytes:
    """Read ``[offset, offset+length)`` of a virtual disk described by ``index``.

    ``files[tag]`` holds the data of segments with that tag. Any byte range is accepted;
    it is clipped at ``vsize``. The one run-walker of the readers: a layer passes its
    index and file, :class:`obd.image.stack.Stack` itself and a file per depth.
    """
    if offset >= vsize or length <= 0:
        return b""
    if length > vsize - offset:
        length = vsize - offset
    # shifts by 9 are SECTOR arithmetic (asserted below): this loop is every read's path
    s0 = offset >> 9
    s1 = (offset + length + 511) >> 9
    out = bytearray((s1 - s0) << 9)
    for kind, sec, cnt, moff, tag in index.runs(s0, s1):
        if kind == RUN_DATA:
            data = files[tag].pread(moff << 9, cnt << 9)
            dst = (sec - s0) << 9
            out[dst : dst + len(data)] = data
    head = offset - (s0 << 9)
    if head == 0 and len(out) == length:
        return bytes(out)
    return bytes(out[head : head + length])


assert SECTOR == 1 << 9  # read_view shifts by 9
