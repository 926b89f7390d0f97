"""Compaction: the read-only LSMT file written by commit and merge (docs/formats.md §1.8).

The output is streamed (header, data, index, trailer in order) into a sink with
``write(bytes)``, so a ZFile writer or a tar wrapper can take it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from obd.errors import UsageError
from obd.formats import uuid as uuidmod
from obd.formats.lsmt import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HT_SECTORS,
    INVALID_OFFSET,
    MAX_SEGMENT_SECTORS,
    SECTOR,
    HeaderTrailer,
    Mappings,
    encode_entries,
)
from obd.io.base import ReadAt

COPY_STEP_SECTORS = 64  # data is copied (and indexed) in 32 KiB steps
READ_CHUNK = 4 << 20
INDEX_PAD_ENTRIES = 256


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> object: ...


class FileSink:
    """A sequential writer over a WriteAt, with a buffer."""

    def __init__(self, out: object, buffer_size: int = 4 << 20) -> None:
        self.out = out
        self.pos = 0
        self.buf = bytearray()
        self.limit = buffer_size
        self.copy_ok = hasattr(os, "copy_file_range")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.buf += data
        if len(self.buf) >= self.limit:
            self._drain()
        return len(data)

    def copy_from(self, fd: int, offset: int, length: int) -> bool:
        """Copy ``length`` bytes at ``offset`` of ``fd`` in the kernel; False if it can't."""
        copy_in = getattr(self.out, "copy_in", None)
        if copy_in is None or not self.copy_ok:
            return False
        self._drain()
        try:
            if os.fstat(fd).st_size < offset + length:
                return False  # past EOF must read as zeros: take the slow path
            copy_in(fd, offset, length, self.pos)
        except OSError:
            self.copy_ok = False
            return False
        self.pos += length
        return True

    def _drain(self) -> None:
        if self.buf:
            self.out.pwrite(self.pos, self.buf)  # type: ignore[attr-defined]
            self.pos += len(self.buf)
            self.buf = bytearray()

    def close(self) -> None:
        self._drain()


def commit_header(
    *,
    virtual_size: int,
    uuid: str | None,
    parent_uuid: str | None,
    source_parent_uuid: str,
    message: bytes = b"",
) -> HeaderTrailer:
    """The header of a commit output (§1.8 step 1)."""
    if len(message) > 256:
        raise UsageError(f"commit message is {len(message)} bytes, more than 256")
    parent = uuidmod.normalize(parent_uuid) if uuidmod.is_valid(parent_uuid) else source_parent_uuid
    return HeaderTrailer(
        flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        virtual_size=virtual_size,
        uuid=uuidmod.normalize(uuid),
        parent_uuid=parent,
        user_tag=message,
    )


def compact(
    m: Mappings,
    sources: Sequence[ReadAt],
    header: HeaderTrailer,
    sink: Sink,
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the compacted layer of mappings ``m`` (sorted by offset) into ``sink``.

    ``sources[tag]`` holds the data of each mapping. Returns the bytes written.
    """
    sink.write(header.pack())
    cursor = HT_SECTORS
    # Output entries, before the greedy merge, as parallel lists.
    o_off: list[int] = []
    o_len: list[int] = []
    o_mo: list[int] = []
    o_ze: list[bool] = []
    o_tag: list[int] = []
    offs = m.offset.tolist()
    lens = m.length.tolist()
    mos = m.moffset.tolist()
    zs = m.zeroed.tolist()
    tags = m.tag.tolist()
    step = COPY_STEP_SECTORS
    copy_from = getattr(sink, "copy_from", None)
    for k in range(len(offs)):
        off, ln, tag = offs[k], lens[k], tags[k]
        if ln == 0:
            continue
        if zs[k]:
            o_off.append(off)
            o_len.append(ln)
            o_mo.append(cursor)
            o_ze.append(True)
            o_tag.append(tag)
            continue
        src = sources[tag]
        src_fd = getattr(src, "fd", None) if copy_from is not None else None
        done = 0
        while done < ln:
            chunk = min(ln - done, READ_CHUNK // SECTOR)
            want = chunk * SECTOR
            at = (mos[k] + done) * SECTOR
            if src_fd is None or copy_from is None or not copy_from(src_fd, at, want):
                data = src.pread(at, want)
                if len(data) < want:
                    data = bytes(data) + bytes(want - len(data))  # past EOF reads as zeros
                sink.write(data)
            if progress is not None:
                progress(want)
            # index entries of 64-sector steps
            s = 0
            while s < chunk:
                n = min(step, chunk - s)
                o_off.append(off + done + s)
                o_len.append(n)
                o_mo.append(cursor)
                o_ze.append(False)
                o_tag.append(tag)
                cursor += n
                s += n
            done += chunk
    merged = _greedy_merge(o_off, o_len, o_mo, o_ze, o_tag)
    index_offset = cursor * SECTOR
    count = len(merged)
    padded = -(-count // INDEX_PAD_ENTRIES) * INDEX_PAD_ENTRIES
    raw = encode_entries(merged)
    if padded > count:
        pad = Mappings(
            np.full(padded - count, INVALID_OFFSET, dtype=np.uint64),
            np.zeros(padded - count, dtype=np.uint64),
            np.zeros(padded - count, dtype=np.uint64),
            np.zeros(padded - count, dtype=bool),
            np.zeros(padded - count, dtype=np.uint8),
        )
        raw += encode_entries(pad)
    sink.write(raw)
    trailer = header.with_(
        flags=FLAG_DATA | FLAG_SEALED, index_offset=index_offset, index_size=padded
    )
    sink.write(trailer.pack())
    return index_offset + len(raw) + len(trailer.pack())


def _greedy_merge(
    off: list[int], ln: list[int], mo: list[int], ze: list[bool], tg: list[int]
) -> Mappings:
    """Left-to-right merge of §1.8 step 4 (merged length stays below 16383)."""
    r_off: list[int] = []
    r_len: list[int] = []
    r_mo: list[int] = []
    r_ze: list[bool] = []
    r_tg: list[int] = []
    if off:
        c_off, c_len, c_mo, c_ze, c_tg = off[0], ln[0], mo[0], ze[0], tg[0]
        for i in range(1, len(off)):
            n_off, n_len, n_mo, n_ze, n_tg = off[i], ln[i], mo[i], ze[i], tg[i]
            c_mend = c_mo if c_ze else c_mo + c_len
            if (
                c_off + c_len == n_off
                and c_mend == n_mo
                and c_ze == n_ze
                and c_tg == n_tg
                and c_len + n_len < MAX_SEGMENT_SECTORS
            ):
                c_len += n_len
                continue
            r_off.append(c_off)
            r_len.append(c_len)
            r_mo.append(c_mo)
            r_ze.append(c_ze)
            r_tg.append(c_tg)
            c_off, c_len, c_mo, c_ze, c_tg = n_off, n_len, n_mo, n_ze, n_tg
        r_off.append(c_off)
        r_len.append(c_len)
        r_mo.append(c_mo)
        r_ze.append(c_ze)
        r_tg.append(c_tg)
    return Mappings.from_lists(r_off, r_len, r_mo, r_ze, r_tg)
