"""Reading ZFiles: :class:`ZFileReader`, bulk decompression, block CRC verification (docs/formats.md §4.7, §4.8)."""

from __future__ import annotations

import mmap
import os
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from obd.errors import CorruptError, UnsupportedError
from obd.formats.codecs import (
    ALGO_NAMES,
    PROBLEM_CRC,
    Codec,
    bad_crcs,
)
from obd.formats.zfile.bufio import read_into
from obd.formats.zfile.layout import HeaderTrailer, Progress
from obd.formats.zfile.validate import ZFacts, raise_first_zfile, validate_zfile
from obd.io import trace as _trace
from obd.io.base import ReadAt, WriteAt
from obd.io.file import DIRECT_ALIGN, WRITEBACK_CHUNK, LocalFile, start_writeback

if TYPE_CHECKING:
    import numpy as np

# numpy is imported only where it is needed (big jump tables, ``read_blocks``, the
# ``offsets`` / ``lengths`` attributes): extracting or verifying a small ZFile, and
# ``obd inspect`` of one, run without it (its import is ~50 ms of a ~0.2 s command).

# ----------------------------------------------------------------------------- reader

_LOCAL = threading.local()  # per-thread scratch of bulk reads (ZFileReader._stored_buffer)


class ZFileReader:
    """A ZFile's decompressed content as a ReadAt (§4.7).

    Everything is validated here at open: magics, flags, digest, trailer, index bounds,
    ``index_crc``, block lengths, jump table ending past the data. ``pread`` checks every
    block CRC (when the file has them) and the decompressed size; on a failure it re-reads
    the block (evicting it first when the source has ``evict(offset, length)``) up to
    three times, then raises :class:`CorruptError` naming the block and its offset. It
    never returns wrong bytes. Decoded blocks are kept in a small LRU cache for small
    reads; large reads are decoded in bulk.

    ``close()`` closes the source too.
    """

    RETRIES = 3
    _BULK_STORED = 4 << 20  # stored bytes per bulk fetch

    def __init__(self, src: ReadAt, *, cache_blocks: int = 64, path: str | None = None) -> None:
        self._src = src
        self.path = path if path is not None else getattr(src, "path", None)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = max(0, cache_blocks)
        self._closed = False
        # A cached source (``evict(offset, length)``) may hold a bad copy: evict it all
        # and open again, twice at most (upstream does the same when the index fails).
        evict = getattr(src, "evict", None)
        for attempt in range(3 if evict is not None else 1):
            try:
                self._open()
                break
            except CorruptError:
                if evict is None or attempt == 2:
                    raise
                evict(0, src.size())

    # -- open ------------------------------------------------------------------------

    def _corrupt(self, message: str, offset: int | None = None) -> CorruptError:
        return CorruptError(message, path=self.path, offset=offset)

    def _open(self) -> None:
        facts = ZFacts()
        raise_first_zfile(validate_zfile(self._src, facts, deep=False), self.path)
        assert facts.header is not None and facts.info is not None and facts.codec is not None
        assert facts.lengths is not None and facts.offsets is not None
        header = self.header = facts.header
        info = self.info = facts.info
        self.trailer: HeaderTrailer | None = facts.trailer
        self.codec: Codec = facts.codec
        self.block_size = header.block_size
        self.verify = bool(header.verify)
        self.data_start = facts.data_start
        self.original_file_size = info.original_file_size
        self.index_offset = info.index_offset
        self._lengths: array[int] | np.ndarray = facts.lengths
        offsets = facts.offsets
        self._offsets_np = None if isinstance(offsets, list) else offsets
        self._lengths_np: np.ndarray | None = None
        self.nblocks = info.index_size
        # plain ints (no numpy scalars per request); bisect finds blocks in it
        self._offsets_list: list[int] = offsets if isinstance(offsets, list) else offsets.tolist()

    @property
    def offsets(self) -> np.ndarray:
        """File offset of each block and of the end of the last one (numpy int64)."""
        if self._offsets_np is None:
            import numpy as np

            self._offsets_np = np.asarray(self._offsets_list, dtype=np.int64)
        return self._offsets_np

    @property
    def lengths(self) -> np.ndarray:
        """Stored length of each block, CRC included (numpy u32): the jump table."""
        if self._lengths_np is None:
            import numpy as np

            self._lengths_np = np.asarray(self._lengths, dtype=np.uint32)
        return self._lengths_np

    # -- ReadAt ----------------------------------------------------------------------

    @property
    def algorithm(self) -> str:
        return ALGO_NAMES[self.header.algo]

    @property
    def source(self) -> ReadAt:
        return self._src

    def size(self) -> int:
        return self.original_file_size

    def raw_size(self, block: int) -> int:
        """Plain bytes held by ``block`` (``block_size`` except for the last block)."""
        return min(self.block_size, self.original_file_size - block * self.block_size)

    def pread(self, offset: int, length: int) -> bytes:
        data = self.pread_view(offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    def pread_view(self, offset: int, length: int) -> bytes | memoryview:
        """:meth:`pread` without the final copy of a bulk read: a view of the freshly
        decoded blocks (never shared, never reused), for a server to send as it is."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.original_file_size)
        if offset >= end:
            return b""
        bs = self.block_size
        b0, b1 = offset // bs, (end - 1) // bs
        if b1 - b0 < 2 and self._cache_blocks:
            parts = []
            for b in range(b0, b1 + 1):
                blk = self._cached_block(b)
                lo = offset - b * bs if b == b0 else 0
                hi = end - b * bs if b == b1 else len(blk)
                parts.append(blk[lo:hi] if lo or hi != len(blk) else blk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        data = self.read_blocks(b0, b1 + 1)
        return data[offset - b0 * bs : end - b0 * bs]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache.clear()
            self._src.close()

    def __enter__(self) -> ZFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ZFileReader({self.path or self._src!r}, {self.algorithm}, bs={self.block_size}, "
            f"blocks={self.nblocks}, size={self.original_file_size})"
        )

    # -- blocks ----------------------------------------------------------------------

    def _cached_block(self, b: int) -> bytes:
        with self._lock:
            blk = self._cache.get(b)
            if blk is not None:
                self._cache.move_to_end(b)
                return blk
        blk = self._decode_block(b)
        with self._lock:
            self._cache[b] = blk
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return blk

    def _decode_block(self, b: int) -> bytes:
        """Decode one block, checked (CRC, size) in one batch call; a failure goes to
        :meth:`_retry_block`."""
        so = self._offsets_list[b]
        n = self._offsets_list[b + 1] - so
        stored = self._src.pread(so, n)
        if len(stored) < n:
            return self._retry_block(b, "truncated")
        want = self.raw_size(b)
        out = bytearray(want)
        bad = self.codec.decompress_blocks(stored, (n,), out, want, want, self.verify)
        if bad:
            return self._retry_block(b, bad[0][1])
        return bytes(out)

    def blocks_span(self, first: int, end: int) -> int:
        """Plain bytes held by blocks ``[first, end)``."""
        return min(end * self.block_size, self.original_file_size) - first * self.block_size

    def read_blocks(self, first: int, end: int) -> memoryview:
        """Decoded content of blocks ``[first, end)``, checked, as one writable buffer."""
        import numpy as np

        # uninitialised memory: every byte is overwritten by the decoded blocks
        out = np.empty(self.blocks_span(first, end), dtype=np.uint8).data
        self.read_blocks_into(first, end, out)
        return out

    def read_blocks_into(self, first: int, end: int, out: memoryview | bytearray) -> None:
        """Decode blocks ``[first, end)`` into ``out`` (at least ``blocks_span`` bytes)."""
        if not 0 <= first <= end <= self.nblocks:
            raise ValueError(f"block range [{first}, {end}) outside [0, {self.nblocks})")
        bs = self.block_size
        view = memoryview(out).cast("B")
        if len(view) < self.blocks_span(first, end):
            raise ValueError("output buffer too small")
        offsets = self._offsets_list
        s = first
        while s < end:
            # as many blocks as fit in one bulk fetch (at least one)
            e = bisect_right(offsets, offsets[s] + self._BULK_STORED) - 1
            e = min(max(e, s + 1), end)
            so, eo = offsets[s], offsets[e]
            stored = self._stored_buffer(eo - so)
            got = read_into(self._src, so, stored)
            lengths = self._lengths[s:e]
            dst = view[(s - first) * bs :]
            if got < eo - so:
                bad = [(i, "truncated") for i in range(len(lengths))]
            else:
                bad = self.codec.decompress_blocks(
                    stored, lengths, dst, bs, self.raw_size(e - 1), self.verify
                )
            for i, problem in bad:
                b = s + i
                blk = self._retry_block(b, problem)
                dst[i * bs : i * bs + len(blk)] = blk
            s = e

    def _stored_buffer(self, n: int) -> memoryview:
        """``n`` bytes of this thread's recycled buffer for stored records (a bulk read
        fills it in place: no fresh allocation, no page faults per fetch)."""
        buf: bytearray | None = getattr(_LOCAL, "stored", None)
        if buf is None or len(buf) < n:
            # grown by powers of two from 256 KiB as reads need it: a server thread that
            # only ever reads 128 KiB holds 256 KiB, not the 4 MiB of a bulk fetch
            buf = _LOCAL.stored = bytearray(max(1 << 18, 1 << (n - 1).bit_length()))
        return memoryview(buf)[:n]

    def _retry_block(self, b: int, problem: str) -> bytes:
        """Re-read block ``b`` up to RETRIES times; raise CorruptError if it stays bad."""
        so, n = self._offsets_list[b], int(self._lengths[b])
        evict = getattr(self._src, "evict", None)
        want = self.raw_size(b)
        for _ in range(self.RETRIES):
            if evict is not None:
                evict(so, n)
            stored = self._src.pread(so, n)
            if len(stored) < n:
                problem = "truncated"
                continue
            out = bytearray(self.block_size)
            bad = self.codec.decompress_blocks(stored, [n], out, self.block_size, want, self.verify)
            if not bad:
                return bytes(memoryview(out)[:want])
            problem = bad[0][1]
        raise self._corrupt(f"ZFile block {b}: {problem}", so)


def decompress_to(
    reader: ZFileReader,
    out: WriteAt,
    progress: Progress | None = None,
    *,
    threads: int = 1,
    offset: int = 0,
) -> int:
    """Write the whole decompressed content of ``reader`` to ``out`` at ``offset``.

    Every block is checked (CRC, size). Returns the number of bytes written. ``threads``
    counts the caller, as in :class:`ZFileWriter`: workers decode runs of blocks while
    the calling thread writes them in order; ``threads`` workers with the compiled batch
    path (:attr:`Codec.releases_gil`, the caller mostly waits in ``pwrite``), else
    ``threads - 1``.
    """
    n, bs = reader.nblocks, reader.block_size
    per = max(1, (4 << 20) // bs)
    ranges = [(b, min(b + per, n)) for b in range(0, n, per)]
    if _decode_direct(reader, out, offset, ranges, progress, threads):
        return reader.size()
    mapped = _map_output(out, offset, reader.size())
    if mapped is not None:
        _decode_mapped(reader, getattr(out, "fd", -1), mapped, offset, ranges, progress, threads)
        return reader.size()
    _preallocate(out, offset, reader.size())
    # Output buffers are recycled: no fresh (page-faulting) allocation per batch.
    free: deque[memoryview] = deque()

    def decode(b: int, e: int) -> tuple[memoryview, int]:
        try:
            buf = free.pop()
        except IndexError:
            buf = memoryview(bytearray(per * bs))
        length = reader.blocks_span(b, e)
        reader.read_blocks_into(b, e, buf[:length])
        return buf, length

    def put(b: int, decoded: tuple[memoryview, int]) -> None:
        buf, length = decoded
        out.pwrite(offset + b * bs, buf[:length])
        if progress is not None:
            progress(length)
        free.append(buf)

    workers = threads if reader.codec.releases_gil else threads - 1
    if threads <= 1 or len(ranges) < 2:
        for b, e in ranges:
            put(b, decode(b, e))
        return reader.size()
    with ThreadPoolExecutor(workers, thread_name_prefix="unzfile") as pool:
        pending: deque[tuple[int, Future[tuple[memoryview, int]]]] = deque()
        try:
            for b, e in ranges:
                pending.append((b, pool.submit(decode, b, e)))
                while len(pending) > 2 * threads:
                    pb, fut = pending.popleft()
                    put(pb, fut.result())
            while pending:
                pb, fut = pending.popleft()
                put(pb, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()
    return reader.size()


def _decode_direct(
    reader: ZFileReader,
    out: WriteAt,
    offset: int,
    ranges: list[tuple[int, int]],
    progress: Progress | None,
    threads: int,
) -> bool:
    """:func:`decompress_to` by direct I/O, where ``out`` is a local file whose file
    system takes it (False, nothing written, where not).

    Workers decode a run into recycled page-aligned buffers and write it themselves
    (``O_DIRECT``): the disk reads the buffer, the output's page cache is never filled
    (no zeroing of fresh pages, no dirty pages to write back at the fsync). Runs start
    on block boundaries (whole 4 KiB multiples); the last block's partial 4 KiB goes
    through the page cache. One more worker than ``threads``: each also waits for the
    disk. The output is still fsynced by its owner before it is renamed."""
    size = reader.size()
    if (
        not isinstance(out, LocalFile)
        or offset % DIRECT_ALIGN
        or reader.block_size % DIRECT_ALIGN
        or size < DIRECT_ALIGN
        or not out.can_direct()
    ):
        return False
    _preallocate(out, offset, size)
    bs = reader.block_size
    run = (ranges[0][1] - ranges[0][0]) * bs
    free: deque[mmap.mmap] = deque()

    def work(r: tuple[int, int]) -> int:
        b, e = r
        try:
            m = free.pop()
        except IndexError:
            m = mmap.mmap(-1, run)
        view = memoryview(m)
        try:
            length = reader.blocks_span(b, e)
            reader.read_blocks_into(b, e, view[:length])
            at = offset + b * bs
            whole = length - length % DIRECT_ALIGN
            if whole and not out.pwritev_direct(at, [view[:whole]]):
                out.pwrite(at, view[:whole])  # refused after all: through the page cache
            if whole < length:
                out.pwrite(at + whole, view[whole:length])
        finally:
            view.release()
            free.append(m)
        return length

    workers = (threads if reader.codec.releases_gil else max(1, threads - 1)) + 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="unzfile")
    try:
        for length in pool.map(work, ranges):
            if progress is not None:
                progress(length)
    finally:
        # a bad block stops the rest: nothing more is decoded or written
        pool.shutdown(wait=True, cancel_futures=True)
    return True


def _map_output(out: WriteAt, offset: int, length: int) -> tuple[mmap.mmap, int] | None:
    """A shared writable mapping over ``[offset, offset+length)`` of a local file, and
    where ``offset`` lies in it; None when not possible (then pwrite is used).

    Workers decode straight into the page cache through it: no buffer, no ``pwrite``
    copy, both cores filling pages (measured on this 2-core VM under I/O load from other
    processes: extract of 256 MiB, median of 10, 1.15 s wall / 0.33 CPU-s against
    ~4 s / 1.1 CPU-s with pwrite, whose writes stall in dirty-page throttling). The
    blocks are reserved first (fallocate), so a page fault never finds the disk full
    (which would be SIGBUS, not an error); write-back errors still come from
    ``msync``/``fsync``. Not used under an I/O tracer, which sees only ``pwrite``."""
    if not isinstance(out, LocalFile) or _trace.tracer is not None or length <= 0:
        return None
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        os.posix_fallocate(out.fd, offset, length)
        m = mmap.mmap(out.fd, offset + length - base, mmap.MAP_SHARED, offset=base)
    except (OSError, ValueError, OverflowError):
        return None
    return m, offset - base


def _decode_mapped(
    reader: ZFileReader,
    fd: int,
    mapped: tuple[mmap.mmap, int],
    offset: int,
    ranges: list[tuple[int, int]],
    progress: Progress | None,
    threads: int,
) -> None:
    m, at = mapped
    bs = reader.block_size
    started = 0
    whole = memoryview(m)

    def decode(r: tuple[int, int]) -> int:
        b, e = r
        length = reader.blocks_span(b, e)
        reader.read_blocks_into(b, e, whole[at + b * bs : at + b * bs + length])
        return length

    workers = threads if reader.codec.releases_gil else threads - 1
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="unzfile")
    try:
        for (_, e), length in zip(ranges, pool.map(decode, ranges), strict=True):
            if progress is not None:
                progress(length)
            end = e * bs
            if end - started >= WRITEBACK_CHUNK:
                start_writeback(fd, offset + started, end - started)
                started = end
        m.flush()
    finally:
        # a bad block stops the rest: nothing more is decoded
        pool.shutdown(wait=True, cancel_futures=True)
        del decode
        try:
            whole.release()
            m.close()
        except BufferError:  # a failed worker's traceback still holds a view: GC unmaps
            pass


def _preallocate(out: WriteAt, offset: int, length: int) -> None:
    """Best effort: reserve the output's blocks up front (much faster writes on ext4)."""
    fd = getattr(out, "fd", None)
    if not isinstance(fd, int) or fd < 0 or length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except (OSError, AttributeError):
        pass


def verify_blocks(src: ReadAt, *, path: str | None = None) -> list[tuple[int, int, str]]:
    """Check every block CRC of a ZFile without decompressing (§4.8 ``--verify``).

    Returns ``(block_no, file_offset, problem)`` for each bad block (empty: all good).
    The structure itself (header, trailer, jump table) must be valid, or
    :class:`CorruptError` is raised; a file without per-block CRCs (verify = 0) is an
    :class:`UnsupportedError`, as upstream fails on it. ``src`` is not closed.
    """
    r = ZFileReader(src, cache_blocks=0, path=path)
    if not r.verify:
        raise UnsupportedError(
            "ZFile has no per-block checksums (verify = 0); it cannot be verified",
            path=r.path,
        )
    problems: list[tuple[int, int, str]] = []
    offsets, lengths = r._offsets_list, r._lengths
    n = r.nblocks
    s = 0
    room = bytearray()  # recycled: each run's stored bytes are read into it in place
    while s < n:
        e = min(max(bisect_right(offsets, offsets[s] + (8 << 20)) - 1, s + 1), n)
        so, eo = offsets[s], offsets[e]
        if len(room) < eo - so:
            room = bytearray(max(eo - so, (8 << 20) + (1 << 17)))
        stored = memoryview(room)[: read_into(src, so, memoryview(room)[: eo - so])]
        if len(stored) < eo - so:  # the source shrank under us: the rest is missing
            got = so + len(stored)
            e = max(bisect_right(offsets, got) - 1, s)
            for i in bad_crcs(stored[: offsets[e] - so], lengths[s:e]):
                problems.append((s + i, offsets[s + i], PROBLEM_CRC))
            problems.extend((b, offsets[b], "truncated") for b in range(e, n))
            break
        for i in bad_crcs(stored, lengths[s:e]):
            problems.append((s + i, offsets[s + i], PROBLEM_CRC))
        s = e
    return problems
