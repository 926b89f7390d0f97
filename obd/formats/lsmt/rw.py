"""Writable LSMT layers: log-structured and sparse; sealing in place (docs/formats.md §2).

A log-structured layer appends every write to its data file and every mapping to its
index file (later records win on reopen). A sparse layer writes in place at
``4096 + offset`` of its data file and rebuilds its index from SEEK_DATA/SEEK_HOLE.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from obd.errors import ObdError, UsageError
from obd.formats import uuid as uuidmod
from obd.formats.lsmt import (
    ENTRY_SIZE,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    FLAG_SPARSE,
    HT_OFF,
    HT_SECTORS,
    HT_SLOT,
    INVALID_OFFSET,
    MAX_RW_INDEX_RECORDS,
    MAX_SEGMENT_SECTORS,
    SECTOR,
    HeaderTrailer,
    Mappings,
    decode_entries,
    encode_entries,
    encode_entry,
    iter_runs,
    read_view,
)
from obd.formats.lsmt.ro import disagreements, header_problems, padding_problems
from obd.formats.problem import CORRUPTION, NOTE, WARNING, Problem, raise_first
from obd.io.base import ReadAt
from obd.io.file import LocalFile
from obd.io.lock import lock_writer

log = logging.getLogger(__name__)

MAX_IO_SECTORS = (4 << 20) // SECTOR  # writes are split into 4 MiB pieces


class MutableIndex:
    """An overlap-resolving, sorted index: a newer mapping replaces what it covers.

    Segments (sectors) are kept in chunks of at most ``2 * LOAD`` entries, each as
    parallel Python lists, with the first start of every chunk in ``_firsts`` for
    bisection: an insert moves O(LOAD) entries, not O(n), so a layer with millions of
    segments still takes writes quickly. Trimming the front of a data segment advances its
    ``moffset``; trimming a zeroed one does not (as upstream does).
    """

    LOAD = 512
    __slots__ = ("_chunks", "_firsts", "_n")

    def __init__(self) -> None:
        # each chunk: [starts, ends, moffs, zeroed], never empty
        self._chunks: list[list[list[Any]]] = []
        self._firsts: list[int] = []
        self._n = 0

    @classmethod
    def from_sorted(
        cls, starts: list[int], ends: list[int], moffs: list[int], zeroed: list[bool]
    ) -> MutableIndex:
        idx = cls()
        step = cls.LOAD
        for k in range(0, len(starts), step):
            idx._chunks.append(
                [
                    starts[k : k + step],
                    ends[k : k + step],
                    moffs[k : k + step],
                    zeroed[k : k + step],
                ]
            )
            idx._firsts.append(starts[k])
        idx._n = len(starts)
        return idx

    def __len__(self) -> int:
        return self._n

    # flat views (O(n): for tests and bulk export)
    def _flat(self, k: int) -> list[Any]:
        out: list[Any] = []
        for c in self._chunks:
            out.extend(c[k])
        return out

    @property
    def starts(self) -> list[int]:
        return self._flat(0)

    @property
    def ends(self) -> list[int]:
        return self._flat(1)

    @property
    def moffs(self) -> list[int]:
        return self._flat(2)

    @property
    def zeroed(self) -> list[bool]:
        return self._flat(3)

    def _locate(self, sector: int) -> tuple[int, int]:
        """(chunk, index) of the first segment whose end is past ``sector``."""
        chunks = self._chunks
        if not chunks:
            return 0, 0
        ci = bisect_right(self._firsts, sector) - 1
        if ci < 0:
            return 0, 0
        c = chunks[ci]
        i = bisect_right(c[0], sector) - 1
        if i < 0 or c[1][i] <= sector:
            i += 1
        if i == len(c[0]) and ci + 1 < len(chunks):
            return ci + 1, 0
        return ci, i

    def insert(self, off: int, length: int, moff: int, zeroed: bool, *, hole: bool = False) -> None:
        """Map ``[off, off+length)``; with ``hole``, unmap it instead (nothing is stored)."""
        if length <= 0:
            return
        end = off + length
        chunks = self._chunks
        if not chunks:
            if hole:
                return
            chunks.append([[off], [end], [moff], [zeroed]])
            self._firsts.append(off)
            self._n = 1
            return
        ci, i = self._locate(off)
        # collect the overlapped run [ci:i .. cj:j) and the pieces to keep around it
        new_s: list[int] = []
        new_e: list[int] = []
        new_m: list[int] = []
        new_z: list[bool] = []
        last: tuple[int, int, int, bool] = (0, 0, 0, False)
        cj, j = ci, i
        first = True
        removed = 0
        while cj < len(chunks):
            c = chunks[cj]
            cs, ce, cm, cz = c
            while j < len(cs) and cs[j] < end:
                if first and cs[j] < off:  # head of the first overlapped segment
                    new_s.append(cs[j])
                    new_e.append(off)
                    new_m.append(cm[j])
                    new_z.append(cz[j])
                first = False
                last = (cs[j], ce[j], cm[j], cz[j])
                j += 1
                removed += 1
            if j < len(cs) or cj + 1 == len(chunks):
                break
            cj += 1
            j = 0
        if not hole:
            new_s.append(off)
            new_e.append(end)
            new_m.append(moff)
            new_z.append(zeroed)
        if removed and last[1] > end:  # tail of the last overlapped segment
            ls, le, lm, lz = last
            new_s.append(end)
            new_e.append(le)
            new_m.append(lm if lz else lm + (end - ls))
            new_z.append(lz)
        # splice: keep chunk ci's entries before i, chunk cj's entries from j
        c0 = chunks[ci]
        parts: tuple[list[Any], ...] = (new_s, new_e, new_m, new_z)
        if cj == ci:
            for k, part in enumerate(parts):
                c0[k][i:j] = part
            merged = [ci]
        else:
            cl = chunks[cj]
            for k, part in enumerate(parts):
                c0[k][i:] = part
                del cl[k][:j]
            del chunks[ci + 1 : cj]
            del self._firsts[ci + 1 : cj]
            merged = [ci, ci + 1]
        self._n += len(new_s) - removed
        for k in reversed(merged):
            self._fix(k)

    def _fix(self, ci: int) -> None:
        """Drop an empty chunk, split an oversized one, refresh its first start."""
        c = self._chunks[ci]
        n = len(c[0])
        if n == 0:
            del self._chunks[ci]
            del self._firsts[ci]
            return
        if n > 2 * self.LOAD:
            half = n // 2
            right = [lst[half:] for lst in c]
            for lst in c:
                del lst[half:]
            self._chunks.insert(ci + 1, right)
            self._firsts.insert(ci + 1, right[0][0])
        self._firsts[ci] = c[0][0]

    @classmethod
    def from_log(cls, log: Mappings) -> MutableIndex:
        """The index that inserting ``log``'s records in order would build (later wins):
        :func:`replay_log`, in the chunked form."""
        s, e, mo, z = replay_log(log)
        return cls.from_sorted(s.tolist(), e.tolist(), mo.tolist(), z.tolist())

    def mappings(self, tag: int = 0) -> Mappings:
        starts = self.starts
        m = Mappings.from_lists(starts, self.ends, self.moffs, self.zeroed, tag)
        m.length = m.length - m.offset
        return m

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """The same walk as :meth:`SegmentIndex.runs`, over the segments in range."""
        s: list[int] = []
        e: list[int] = []
        mo: list[int] = []
        z: list[bool] = []
        chunks = self._chunks
        ci, i = self._locate(start)
        while ci < len(chunks):
            cs, ce, cm, cz = chunks[ci]
            j = i
            while j < len(cs) and cs[j] < end:
                j += 1
            s += cs[i:j]
            e += ce[i:j]
            mo += cm[i:j]
            z += cz[i:j]
            if j < len(cs):
                break
            ci += 1
            i = 0
        return iter_runs(s, e, mo, z, None, start, end)


def replay_log(log: Mappings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sorted, non-overlapping segments ``(starts, ends, moffsets, zeroed)`` (int64,
    int64, int64, bool) that inserting ``log``'s records in order into a
    :class:`MutableIndex` builds: later records win, zero-length records are ignored.

    In bulk, with no Python step per record: the records' ends cut the sector line into
    elementary intervals; each interval's owner is the newest record covering it (a
    range-max segment tree, filled level by level for every record at once); runs of one
    owner become one segment, whose ``moffset`` advances by the part trimmed off the
    owner's front unless it is zeroed (as :meth:`MutableIndex.insert` trims).
    """
    keep = log.length > 0
    off = log.offset[keep].astype(np.int64)
    end = off + log.length[keep].astype(np.int64)
    mos = log.moffset[keep].astype(np.int64)
    zs = log.zeroed[keep]
    n = len(off)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e.copy(), e.copy(), np.zeros(0, dtype=bool)
    # the distinct ends, sorted, and each record's [lo, hi) as indexes into them
    cut = np.concatenate((off, end))
    order = np.argsort(cut)
    ranked = cut[order]
    distinct = np.ones(len(ranked), dtype=bool)
    distinct[1:] = ranked[1:] != ranked[:-1]
    points = ranked[distinct]
    where = np.empty(len(cut), dtype=np.int64)
    where[order] = np.cumsum(distinct) - 1
    nint = len(points) - 1  # elementary intervals [points[k], points[k+1])
    size = 1 << max(0, (nint - 1).bit_length())
    tree = np.full(2 * size, -1, dtype=np.int64)
    lo = where[:n] + size
    hi = where[n:] + size
    rec = np.arange(n, dtype=np.int64)
    # each record's interval range [lo, hi) as O(log n) tree nodes, all records per level
    while len(rec):
        odd = (lo & 1).astype(bool)
        np.maximum.at(tree, lo[odd], rec[odd])
        lo = lo + odd
        odd = (hi & 1).astype(bool)
        hi = hi - odd
        np.maximum.at(tree, hi[odd], rec[odd])
        lo >>= 1
        hi >>= 1
        more = lo < hi
        lo, hi, rec = lo[more], hi[more], rec[more]
    # push every node's newest record down to the leaves
    width = 1
    while width < size:
        kids = np.arange(2 * width, 4 * width)
        np.maximum(tree[kids], tree[kids >> 1], out=tree[2 * width : 4 * width])
        width *= 2
    owner = tree[size : size + nint]
    ks = np.flatnonzero(owner >= 0)
    own = owner[ks]
    first = np.ones(len(ks), dtype=bool)
    first[1:] = (own[1:] != own[:-1]) | (ks[1:] != ks[:-1] + 1)
    last = np.ones(len(ks), dtype=bool)
    last[:-1] = first[1:]
    o = own[first]
    starts = points[ks[first]]
    ends = points[ks[last] + 1]
    zeroed = zs[o]
    moffs = np.where(zeroed, mos[o], mos[o] + (starts - off[o]))
    return starts, ends, moffs, zeroed


class LSMTWritable:
    """A writable layer (log-structured or sparse) over its data and index files.

    Thread-safe: writes are serialized by a lock; reads take it briefly.
    ``tag`` is written into index records (upstream writes the number of read-only
    layers below when stacked); it is reset to 0 on load.
    """

    def __init__(
        self,
        data: LocalFile,
        index: LocalFile | None,
        header: HeaderTrailer,
        idx: MutableIndex,
        *,
        readonly: bool = False,
    ) -> None:
        self.data = data
        self.index_file = index
        self.header = header
        self.idx = idx
        self.sparse = header.is_sparse
        self._vsize = header.virtual_size
        self._readonly = readonly
        self.lock = threading.RLock()
        self.tag = 0
        # Appends go to the next whole sector past the data file's end: a torn append may
        # have left a partial sector, and the index stores sector offsets (§2.1).
        dsize = data.size()
        self._data_end = dsize + (-dsize % SECTOR)
        # Index records go right after the last whole record (see :meth:`open`).
        self._index_end = index.size() if index is not None and not self.sparse else 0
        self._dirty = False

    # -- creation and opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        data: LocalFile,
        index: LocalFile | None,
        virtual_size: int,
        *,
        uuid: str | None = None,
        parent_uuid: str | None = None,
        sparse: bool = False,
    ) -> LSMTWritable:
        """Write fresh headers into empty ``data`` / ``index`` files (§2.1, §2.3)."""
        if virtual_size % SECTOR:
            raise UsageError(f"virtual size {virtual_size} is not a multiple of 512")
        uid = uuidmod.normalize(uuid) if uuid else uuidmod.generate()
        hdr = HeaderTrailer(
            flags=FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE if sparse else 0),
            virtual_size=virtual_size,
            uuid=uid,
            parent_uuid=uuidmod.normalize(parent_uuid),
        )
        data.pwrite(0, hdr.pack())
        if sparse:
            data.truncate(HT_SLOT + virtual_size)
        else:
            assert index is not None
            index.pwrite(0, hdr.with_(flags=FLAG_HEADER, index_offset=HT_SLOT).pack())
        return cls(data, index, hdr, MutableIndex())

    @classmethod
    def open(
        cls, data: LocalFile, index: LocalFile | None, *, readonly: bool = False
    ) -> LSMTWritable:
        """Reopen a writable layer, rebuilding its index (§2.2, §2.3).

        A writer (``readonly=False``) first takes the exclusive writer's lock on the data
        file. What a crash before a flush can leave at the end of the files is the tail of
        unacknowledged appends: a partial index record, index records whose data never
        reached the data file (they point past its end: they and every record after them),
        a partial data sector. Readers ignore that tail; a writer also cuts the index
        file back to its last good record (logged once), so that new records follow it.
        """
        if not readonly:
            lock_writer(data.fd, data.path)
        facts = RwFacts()
        raise_first(data_problems(data, facts, deep=False), data.path)
        if _has_trailer(data):
            raise UsageError(f"{data.path}: this layer is sealed; open it as a read-only layer")
        hdr = facts.header
        assert hdr is not None
        dsize = facts.data_size
        idx = MutableIndex()
        if hdr.is_sparse:
            end = HT_SLOT + hdr.virtual_size
            for a, b in data.data_extents(HT_SLOT, min(dsize, end)):
                a -= a % SECTOR
                b += -b % SECTOR
                sec = a // SECTOR
                nsec = (b - a) // SECTOR
                while nsec > 0:
                    step = min(nsec, MAX_SEGMENT_SECTORS)
                    idx.insert(sec - HT_SECTORS, step, sec, False)
                    sec += step
                    nsec -= step
            return cls(data, index, hdr, idx, readonly=readonly)
        if index is None:
            raise UsageError("a log-structured layer needs its index file")
        raise_first(index_problems(index, facts, deep=False, data_path=data.path), index.path)
        ihdr, m = facts.index_header, facts.records
        assert ihdr is not None and m is not None
        n, keep = len(m), facts.keep
        dropped = n - keep
        torn = facts.torn
        if dropped or torn:
            log.warning(
                "%s: %s %d index record(s) of writes lost before a flush%s",
                index.path,
                "ignoring" if readonly else "cutting off",
                dropped,
                f" and a torn record of {torn} bytes" if torn else "",
            )
            if not readonly:
                index.truncate(HT_SLOT + keep * ENTRY_SIZE)
                index.flush()
        m = m.select(np.arange(n) < keep)
        valid = (m.offset != np.uint64(INVALID_OFFSET)) & (m.length > 0)
        idx = MutableIndex.from_log(m.select(valid))
        # vsize and uuid of a log-structured layer come from the index file header
        hdr = hdr.with_(
            virtual_size=ihdr.virtual_size, uuid=ihdr.uuid, parent_uuid=ihdr.parent_uuid
        )
        layer = cls(data, index, hdr, idx, readonly=readonly)
        layer._index_end = HT_SLOT + keep * ENTRY_SIZE
        return layer

    # -- properties -----------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        return self._vsize

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def parent_uuid(self) -> str:
        return self.header.parent_uuid

    @property
    def readonly(self) -> bool:
        return self._readonly

    def size(self) -> int:
        return self._vsize

    def mappings(self) -> Mappings:
        with self.lock:
            return self.idx.mappings()

    def garbage_bytes(self) -> int:
        """Data-file bytes written but no longer referenced (log-structured layers)."""
        if self.sparse:
            return 0
        with self.lock:
            m = self.idx.mappings()
            used = int(m.length[~m.zeroed].sum()) * SECTOR
            return max(0, self._data_end - HT_SLOT - used)

    # -- reads ------------------------------------------------------------------------

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        with self.lock:
            return iter(list(self.idx.runs(start, end)))

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            return read_view(self.idx, [self.data], offset, length, self._vsize)

    # -- writes ---------------------------------------------------------------------

    def _check(self, offset: int, length: int, what: str) -> None:
        if self._readonly:
            from obd.errors import ReadOnlyError

            raise ReadOnlyError("layer is opened read-only")
        if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
            raise UsageError(f"{what} at {offset}+{length} is not 512-byte aligned")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), "write")
        with self.lock:
            pos = 0
            total = len(view)
            while pos < total:
                n = min(total - pos, MAX_IO_SECTORS * SECTOR)
                piece = view[pos : pos + n]
                sec = (offset + pos) // SECTOR
                if self.sparse:
                    self.data.pwrite(HT_SLOT + offset + pos, piece)
                    self.idx.insert(sec, n // SECTOR, HT_SECTORS + sec, False)
                else:
                    at = self._data_end
                    self.data.pwrite(at, piece)
                    self._data_end = at + n
                    rec = (sec, n // SECTOR, at // SECTOR, False)
                    self._log(rec)
                pos += n
            self._vsize = max(self._vsize, offset + total)
            self._dirty = True

    def discard(self, offset: int, length: int) -> None:
        """Drop a range's data without storing any.

        Log-structured: a zeroed segment, which reads as zeros and masks the layers below.
        Sparse: a punched hole, which the index forgets at once, so the layers below show
        through, now and after a reopen alike (the hole is all a reopen can see; upstream
        keeps a zeroed segment in memory until then, so its reads change on reopen).
        """
        self._check(offset, length, "discard")
        with self.lock:
            sec = offset // SECTOR
            nsec = length // SECTOR
            while nsec > 0:
                step = min(nsec, MAX_SEGMENT_SECTORS)
                if self.sparse:
                    self.data.punch_hole(HT_SLOT + sec * SECTOR, step * SECTOR)
                    self.idx.insert(sec, step, 0, False, hole=True)
                else:
                    self._log((sec, step, self._data_end // SECTOR, True))
                sec += step
                nsec -= step
            self._dirty = True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros, masking the layers below, durably across reopens.

        Log-structured: a zeroed segment (as :meth:`discard`). Sparse: zeros written in
        place, since a hole would let the layers below show through after a reopen.
        """
        if not self.sparse:
            self.discard(offset, length)
            return
        self._check(offset, length, "write-zeroes")
        zero = bytes(min(length, MAX_IO_SECTORS * SECTOR))
        pos = 0
        while pos < length:
            n = min(len(zero), length - pos)
            self.pwrite(offset + pos, memoryview(zero)[:n])
            pos += n

    def _log(self, rec: tuple[int, int, int, bool]) -> None:
        """Append one mapping to the index file and apply it (under ``self.lock``)."""
        assert self.index_file is not None
        self.index_file.pwrite(self._index_end, encode_entry(*rec, tag=self.tag))
        self._index_end += ENTRY_SIZE
        self.idx.insert(*rec)

    def flush(self) -> None:
        """Make every write that returned before this call durable.

        The data file is synced before the index file, so a durable index record never
        points at data that is not. The fsyncs run outside the layer lock: reads and
        further writes go on meanwhile (those writes are not covered by this flush).
        """
        with self.lock:
            self._dirty = False
        if self._readonly:
            return
        self.data.flush()
        if self.index_file is not None and not self.sparse:
            self.index_file.flush()

    def update_vsize(self, vsize: int) -> None:
        """Rewrite the virtual size in the headers of both files (§2.1).

        A layer opened read-only only takes the new size in memory.
        """
        with self.lock:
            self._vsize = vsize
            self.header = self.header.with_(virtual_size=vsize)
            if self._readonly:
                return
            self.data.pwrite(0, self.header.pack())
            if self.sparse:
                self.data.truncate(HT_SLOT + vsize)
            elif self.index_file is not None:
                self.index_file.pwrite(
                    0, self.header.with_(flags=FLAG_HEADER, index_offset=HT_SLOT).pack()
                )

    def seal(self) -> None:
        """Append the sorted index and a trailer to the data file (§2.4)."""
        with self.lock:
            if self._readonly:
                from obd.errors import ReadOnlyError

                raise ReadOnlyError("layer is opened read-only")
            m = self.idx.mappings()
            raw = encode_entries(m)
            # the next whole sector past the data (a torn append may end mid-sector)
            index_offset = self._data_end
            pad = -len(raw) % SECTOR
            self.data.pwrite(index_offset, raw + bytes(pad))
            # the index is durable before the trailer that makes it the layer's index
            self.data.flush()
            trailer = self.header.with_(
                flags=FLAG_DATA | FLAG_SEALED | (FLAG_SPARSE if self.sparse else 0),
                index_offset=index_offset,
                index_size=len(m),
            )
            self.data.pwrite(index_offset + len(raw) + pad, trailer.pack())
            self.data.flush()
            self._readonly = True

    def close(self) -> None:
        self.data.close()
        if self.index_file is not None:
            self.index_file.close()

    def __enter__(self) -> LSMTWritable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RwFacts:
    """What :func:`data_problems` and :func:`index_problems` learnt."""

    header: HeaderTrailer | None = None  # the data file's
    data_size: int = 0
    index_header: HeaderTrailer | None = None
    records: Mappings | None = None  # every whole record of the index file
    torn: int = 0  # bytes of a partial record after them
    keep: int = 0  # leading records whose data reached the data file (see whole_records)


def _header_of(
    view: ReadAt, file: str, code: str, *, deep: bool
) -> tuple[HeaderTrailer | None, list[Problem]]:
    """The header of a writable layer's data or index ``file`` and what is wrong with it
    on its own; ``None`` when it cannot be decoded (too small, bad magic)."""
    size = view.size()
    if size < HT_SLOT:
        return None, [Problem(CORRUPTION, code, f"too small for an LSMT {file} file ({size} bytes)", 0)]  # fmt: skip
    h, found = header_problems(view.pread(0, HT_SLOT), 0, "header", deep=deep)
    return h, found


def data_problems(data: ReadAt, facts: RwFacts, *, deep: bool = True) -> Iterator[Problem]:
    """What is wrong with a writable layer's data file (§2.1, §2.3); ``deep=False``
    checks what :meth:`LSMTWritable.open` refuses (it raises the first corruption)."""
    dsize = facts.data_size = data.size()
    h, found = _header_of(data, "data", "lsmt_header", deep=deep)
    yield from found
    if h is None:
        return
    facts.header = h
    if not h.is_header or not h.is_data_file:
        yield Problem(
            CORRUPTION, "lsmt_header",
            f"flags {h.flags:#x} are not a writable data-file header", HT_OFF["flags"],
        )  # fmt: skip
        return
    if h.is_sealed and not _has_trailer(data):
        # sealing leaves the header as it was and appends a trailer (§2.4)
        yield Problem(
            CORRUPTION, "lsmt_header",
            f"header flags {h.flags:#x} say sealed, but the file has no trailer", HT_OFF["flags"],
        )  # fmt: skip
    if not deep:
        return
    if h.is_sparse:
        if dsize < HT_SLOT + h.virtual_size:
            yield Problem(
                WARNING, "sparse_size",
                f"sparse data file is {dsize} bytes, shorter than {HT_SLOT} + virtual size "
                f"{h.virtual_size} (the rest reads as zeros)",
                dsize,
            )  # fmt: skip
    elif dsize % SECTOR:
        # writers append at the next whole sector: the stray bytes are never read
        yield Problem(
            NOTE, "data_tail",
            f"data file size {dsize} is not a multiple of {SECTOR}: {dsize % SECTOR} stray "
            "bytes of an interrupted append (harmless; the next append starts at the "
            "next sector)",
            dsize - dsize % SECTOR,
        )  # fmt: skip


def index_problems(
    index: ReadAt, facts: RwFacts, *, deep: bool = True, data_path: str | None = None
) -> Iterator[Problem]:
    """What is wrong with a log-structured layer's index file (§2.2), given its data
    file's facts (:func:`data_problems` first; without them, as for an index file given
    alone, records are not checked against the data file); offsets are in the index
    file. ``deep=False`` checks what :meth:`LSMTWritable.open` refuses (it raises the
    first corruption)."""
    h = facts.header
    isize = index.size()
    ih, found = _header_of(index, "index", "rw_index_header", deep=deep)
    yield from found
    if ih is None:
        return
    facts.index_header = ih
    flags_wrong = ""
    if not ih.is_header or ih.is_data_file:
        what = "a data file" if ih.is_data_file else f"flags {ih.flags:#x}"
        flags_wrong = f"not an LSMT index file ({what})"
    elif ih.is_sealed:
        flags_wrong = "index file header is marked sealed"
    if flags_wrong:
        yield Problem(CORRUPTION, "rw_index_header", flags_wrong, HT_OFF["flags"])
    if ih.index_offset != HT_SLOT:
        yield Problem(
            CORRUPTION, "rw_index_header",
            f"index file header has index_offset {ih.index_offset}, expected {HT_SLOT}",
            HT_OFF["index_offset"],
        )  # fmt: skip
    body = isize - HT_SLOT
    n = body // ENTRY_SIZE
    facts.torn = body % ENTRY_SIZE
    if deep and facts.torn:
        yield Problem(
            NOTE, "rw_index_torn",
            f"torn tail: {facts.torn} bytes after the last complete record "
            "(an interrupted append; readers ignore it, a writer cuts it off)",
            HT_SLOT + n * ENTRY_SIZE,
        )  # fmt: skip
    if n > MAX_RW_INDEX_RECORDS:
        yield Problem(
            CORRUPTION, "rw_index_records",
            f"index file holds {n} records, more than {MAX_RW_INDEX_RECORDS}", HT_SLOT,
        )  # fmt: skip
        return
    if h is None:
        raw = index.pread(HT_SLOT, n * ENTRY_SIZE)
        if deep:
            yield from padding_problems(raw, decode_entries(raw), HT_SLOT)
        return
    if ih.uuid != h.uuid:
        yield Problem(
            CORRUPTION, "rw_index_header",
            f"index file belongs to layer {ih.uuid}, but data file {data_path} is layer {h.uuid}",
            HT_OFF["uuid"],
        )  # fmt: skip
    if deep:
        what = "data header and index header"
        yield from disagreements(h, ih, ("parent_uuid",), at=0, what=what)
        yield from disagreements(h, ih, ("virtual_size",), at=0, what=what, severity=WARNING)
    raw = index.pread(HT_SLOT, n * ENTRY_SIZE)
    m = facts.records = decode_entries(raw)
    if deep:
        yield from padding_problems(raw, m, HT_SLOT)
    yield from whole_records(m, facts, deep=deep)


def whole_records(m: Mappings, facts: RwFacts, *, deep: bool = True) -> Iterator[Problem]:
    """The crash rule: how many leading records of a writable index are whole
    (``facts.keep``), and the records that break it.

    Data is appended in order, so the records whose data did not reach the data file (a
    crash before a flush) are a suffix: from the first record that points past the data
    file's end, every non-empty record must too. A record pointing into the header, or a
    record inside the data file after one past its end, is corruption.
    """
    data_size = facts.data_size
    live = (m.offset != np.uint64(INVALID_OFFSET)) & (m.length > 0)
    low = np.flatnonzero(live & (m.moffset < HT_SECTORS)).tolist()
    for i in low if deep else low[:1]:
        yield Problem(
            CORRUPTION, "rw_index_record",
            f"index record {i} maps into the data file's header (moffset {int(m.moffset[i])}, "
            f"length {int(m.length[i])}{', zeroed' if m.zeroed[i] else ''})",
            HT_SLOT + i * ENTRY_SIZE,
        )  # fmt: skip
    if low:
        return
    # data must lie in whole sectors of the file; a zeroed record's moffset is the append
    # point when it was written, the file's end rounded up to a sector
    whole = np.uint64(data_size // SECTOR)
    append_point = np.uint64(-(-data_size // SECTOR))
    past = live & np.where(m.zeroed, m.moffset > append_point, m.mend() > whole)
    if not past.any():
        facts.keep = len(m)
        return
    first = int(np.flatnonzero(past)[0])
    inside = live[first:] & ~past[first:]
    if inside.any():
        i = first + int(np.flatnonzero(inside)[0])
        yield Problem(
            CORRUPTION, "rw_index_record",
            f"index record {first} maps past the data file's end but record {i} after it "
            "does not: not a crash's lost appends",
            HT_SLOT + first * ENTRY_SIZE,
        )  # fmt: skip
        return
    facts.keep = first
    if deep:
        yield Problem(
            NOTE, "rw_index_lost",
            f"{len(m) - first} index record(s) from record {first} on point past the data "
            "file's end: writes lost before a flush (readers ignore them, a writer cuts them off)",
            HT_SLOT + first * ENTRY_SIZE,
        )  # fmt: skip


def _has_trailer(data: ReadAt) -> bool:
    size = data.size()
    if size < 2 * HT_SLOT:
        return False
    try:
        t = HeaderTrailer.unpack(data.pread(size - HT_SLOT, HT_SLOT))
    except ObdError:
        return False
    return not t.is_header and t.is_sealed


__all__ = [
    "LSMTWritable",
    "MutableIndex",
    "RwFacts",
    "data_problems",
    "index_problems",
    "replay_log",
    "whole_records",
]
