"""ZFile, overlaybd's seekable block compression (FORMATS.md §4, all of it).

Layout: a 512-byte header slot, optional dictionary (never used; unsupported here), one
stored record per ``block_size`` chunk of the plain file (compressed bytes, then a u32 raw
CRC32C seed 100007 when ``verify``), the u32 jump table of record lengths, and a 512-byte
trailer slot. :class:`HeaderTrailer` is the 96-byte structure at the start of both slots.

* :class:`ZFileReader` is a ReadAt over the decompressed content.
* :class:`ZFileWriter` is a streaming sink (``write`` / ``close``), multi-threaded with
  output identical to one thread.
* :func:`compress_file`, :func:`decompress_to`, :func:`verify_blocks` are the helpers
  behind ``obd zfile``.

Where we are stricter than upstream (each is a CorruptError, never wrong bytes): the
trailer digest is checked when the trailer's digest bit is set (upstream checks only the
header's); ``index_size`` must equal ``ceil(original_file_size / block_size)``; a stored
length must fit the codec's compress bound (+4 with CRC); the block size must be a power
of two. ``block_size > 64 KiB`` (upstream: opens, every read fails) and a dictionary are
UnsupportedError. Only flag bits 0-4 are looked at, so pre-2023 files with garbage in
the other bits, ``digest`` and the slot tail still open.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from obd.errors import CorruptError, UnsupportedError, UsageError
from obd.formats import crc
from obd.formats.codecs import (
    ALGO_NAMES,
    PROBLEM_CRC,
    Codec,
    bad_crcs,
    get_codec,
)
from obd.formats.layout import FlagNames, Layout
from obd.io.base import ReadAt, WriteAt

MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"
HT_SIZE = 96
SLOT_SIZE = 512

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_HEADER_OVERWRITE = 0x08
FLAG_DIGEST = 0x10
FLAG_INDEX_COMPRESSION = 0x20  # defined upstream, never set or read
FLAG_BITS = 0x1F  # readers look at bits 0-4 only (old files have garbage above)
FLAG_NAMES: FlagNames = (
    (FLAG_HEADER, "header"),
    (FLAG_DATA, "data"),
    (FLAG_SEALED, "sealed"),
    (FLAG_HEADER_OVERWRITE, "header_overwrite"),
    (FLAG_DIGEST, "digest"),
    (FLAG_INDEX_COMPRESSION, "index_compression"),
)

FLAGS_INITIAL_HEADER = FLAG_HEADER | FLAG_DATA | FLAG_DIGEST  # 0x13
FLAGS_TRAILER = FLAG_DATA | FLAG_SEALED | FLAG_DIGEST  # 0x16
FLAGS_OVERWRITTEN_HEADER = FLAGS_INITIAL_HEADER | FLAG_HEADER_OVERWRITE  # 0x1B

MAX_INDEX_SIZE = 1_000_000_000
MAX_BLOCK_SIZE = 65536
WRITER_BLOCK_SIZES = (4096, 8192, 16384, 32768, 65536)
DEFAULT_BLOCK_SIZE = 4096

LAYOUT = Layout(
    (
        ("magic0", "8s"),
        ("magic1", "16s"),
        ("size", "I"),
        ("digest", "I"),
        ("flags", "Q"),
        ("index_offset", "Q"),
        ("index_size", "Q"),
        ("original_file_size", "Q"),
        ("index_crc", "I"),
        ("reserved_0", "I"),
        ("block_size", "I"),
        ("algo", "B"),
        ("level", "B"),
        ("use_dict", "B"),
        ("padding", "B"),
        ("reserved", "I"),
        ("dict_size", "I"),
        ("verify", "B"),
        ("padding2", "7s"),
    )
)
_HT = LAYOUT.struct
HT_OFF = LAYOUT.offsets  # byte offset of each header/trailer field
assert _HT.size == HT_SIZE
# the header/trailer fields that say where the blocks are (header_overwrite copies them)
INDEX_FIELDS = ("index_offset", "index_size", "original_file_size", "index_crc")
# the fields that say how blocks are stored (the same in header and trailer)
SHAPE_FIELDS = ("block_size", "algo", "verify", "dict_size")

_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class HeaderTrailer:
    """The 96-byte ZFile header/trailer structure (§4.2). Field names are upstream's."""

    magic0: bytes = MAGIC0
    magic1: bytes = MAGIC1
    size: int = HT_SIZE
    digest: int = 0
    flags: int = 0
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    reserved_0: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    algo: int = 1
    level: int = 0
    use_dict: int = 0
    padding: int = 0
    reserved: int = 0
    dict_size: int = 0
    verify: int = 0
    padding2: bytes = bytes(7)

    def pack(self) -> bytes:
        """The 96 bytes, as they are (digest field included)."""
        return _HT.pack(
            self.magic0,
            self.magic1,
            self.size,
            self.digest,
            self.flags,
            self.index_offset,
            self.index_size,
            self.original_file_size,
            self.index_crc,
            self.reserved_0,
            self.block_size,
            self.algo,
            self.level,
            self.use_dict,
            self.padding,
            self.reserved,
            self.dict_size,
            self.verify,
            self.padding2,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> HeaderTrailer:
        if len(data) < HT_SIZE:
            raise CorruptError(f"ZFile header/trailer needs {HT_SIZE} bytes, got {len(data)}")
        return cls(*_HT.unpack_from(data, 0))

    def pack_slot(self) -> bytes:
        """The 512-byte slot with zeroed tail and a freshly computed ``digest`` (§4.4)."""
        body = bytearray(replace(self, digest=0).pack() + bytes(SLOT_SIZE - HT_SIZE))
        struct.pack_into("<I", body, HT_OFF["digest"], slot_digest(body))
        return bytes(body)

    # flag bits (0-4 only)
    @property
    def magic_ok(self) -> bool:
        return self.magic0 == MAGIC0 and self.magic1 == MAGIC1

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def header_overwrite(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def digest_enabled(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)


def slot_digest(slot: bytes | bytearray | memoryview) -> int:
    """Raw CRC32C (seed 0) of a 512-byte slot with bytes 28..31 taken as zero."""
    mv = memoryview(slot)
    if len(mv) != SLOT_SIZE:
        raise CorruptError(f"ZFile header/trailer slot must be {SLOT_SIZE} bytes")
    at = HT_OFF["digest"]
    c = crc.raw(mv[:at], 0)
    c = crc.raw(b"\0\0\0\0", c)
    return crc.raw(mv[at + 4 :], c)


def is_zfile(head: bytes | bytearray | memoryview) -> bool:
    """True when ``head`` (the first bytes of a file) starts a ZFile header.

    Only magics and the header bit are looked at; a bad digest is reported when the
    file is opened (:class:`ZFileReader` raises :class:`CorruptError`).
    """
    if len(head) < HT_SIZE:
        return False
    ht = HeaderTrailer.unpack(head)
    return ht.magic_ok and ht.is_header


def _u32_table(data: bytes | bytearray | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype="<u4")


def _table_bytes(entries: array) -> bytes:
    if not _LITTLE:
        entries = array("I", entries)
        entries.byteswap()
    return entries.tobytes()


# ----------------------------------------------------------------------------- reader


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
        src = self._src
        total = src.size()
        if total < SLOT_SIZE:
            raise self._corrupt(f"not a ZFile: only {total} bytes")
        head = src.pread(0, SLOT_SIZE)
        header = HeaderTrailer.unpack(head)
        if not header.magic_ok:
            raise self._corrupt("not a ZFile (no ZFile magic)", 0)
        if not header.is_header:
            raise self._corrupt("ZFile header lacks the header flag", HT_OFF["flags"])
        if header.digest_enabled:
            want = slot_digest(head)
            if want != header.digest:
                raise self._corrupt(
                    f"ZFile header digest mismatch: stored {header.digest:#010x}, "
                    f"computed {want:#010x}",
                    HT_OFF["digest"],
                )
        if header.header_overwrite:
            info = header
            limit = total
            self.trailer: HeaderTrailer | None = None
        else:
            if not header.is_data_file:
                raise self._corrupt("ZFile header lacks the data-file flag", HT_OFF["flags"])
            if total < 2 * SLOT_SIZE:
                raise self._corrupt(f"truncated ZFile: {total} bytes, no room for a trailer")
            toff = total - SLOT_SIZE
            tail = src.pread(toff, SLOT_SIZE)
            info = HeaderTrailer.unpack(tail)
            if not info.magic_ok:
                raise self._corrupt("ZFile trailer has no ZFile magic (truncated file?)", toff)
            if info.is_header or not info.is_data_file or not info.is_sealed:
                raise self._corrupt(f"bad ZFile trailer flags {info.flags & FLAG_BITS:#x}", toff)
            # Upstream never checks the trailer digest; we do when the trailer says it
            # has one (every writer since the digest exists fills it in correctly).
            if info.digest_enabled and slot_digest(tail) != info.digest:
                raise self._corrupt(
                    f"ZFile trailer digest mismatch: stored {info.digest:#010x}, "
                    f"computed {slot_digest(tail):#010x}",
                    toff + HT_OFF["digest"],
                )
            limit = toff
            self.trailer = info
        self.header = header
        self.info = info

        if header.dict_size != 0:
            raise UnsupportedError(
                f"ZFile with a dictionary (dict_size {header.dict_size}) is not supported",
                path=self.path,
            )
        bs = header.block_size
        if bs == 0 or bs & (bs - 1):
            raise self._corrupt(f"bad ZFile block size {bs}", HT_OFF["block_size"])
        if bs > MAX_BLOCK_SIZE:
            raise UnsupportedError(
                f"ZFile block size {bs} is larger than {MAX_BLOCK_SIZE}", path=self.path
            )
        try:
            self.codec: Codec = get_codec(header.algo)
        except UnsupportedError as e:
            raise e.with_path(self.path) if self.path else e from None
        self.block_size = bs
        self.verify = bool(header.verify)
        self.data_start = SLOT_SIZE + header.dict_size

        n = info.index_size
        self.original_file_size = size = info.original_file_size
        self.index_offset = ioff = info.index_offset
        if n > MAX_INDEX_SIZE:
            raise self._corrupt(
                f"ZFile index_size {n} is larger than {MAX_INDEX_SIZE}", HT_OFF["index_size"]
            )
        if -(-size // bs) != n:
            raise self._corrupt(
                f"ZFile index has {n} blocks but original_file_size {size} needs "
                f"{-(-size // bs)} blocks of {bs}",
                HT_OFF["index_size"],
            )
        if ioff < self.data_start or ioff + 4 * n > limit:
            raise self._corrupt(
                f"ZFile jump table [{ioff}, {ioff + 4 * n}) lies outside [{self.data_start}, "
                f"{limit})",
                ioff,
            )
        table = bytearray()
        pos, end = ioff, ioff + 4 * n
        while pos < end:
            chunk = src.pread(pos, min(16 << 20, end - pos))
            if not chunk:
                raise self._corrupt("ZFile jump table is truncated", pos)
            table += chunk
            pos += len(chunk)
        if info.digest_enabled:
            got = crc.raw(table, 0)
            if got != info.index_crc:
                raise self._corrupt(
                    f"ZFile jump table checksum mismatch: stored {info.index_crc:#010x}, "
                    f"computed {got:#010x}",
                    ioff,
                )
        lengths = _u32_table(table)
        minimum = 5 if self.verify else 1
        maximum = self.codec.bound(bs) + (4 if self.verify else 0)
        if n:
            bad = np.flatnonzero((lengths < minimum) | (lengths > maximum))
            if bad.size:
                b = int(bad[0])
                raise self._corrupt(
                    f"ZFile jump table entry {b} has impossible stored length {int(lengths[b])}",
                    ioff + 4 * b,
                )
        offsets = np.empty(n + 1, dtype=np.int64)
        offsets[0] = self.data_start
        np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
        offsets[1:] += self.data_start
        if int(offsets[-1]) > ioff:
            raise self._corrupt(
                f"ZFile jump table points past the end of the data: blocks end at "
                f"{int(offsets[-1])}, jump table starts at {ioff}",
                ioff,
            )
        self.lengths = lengths
        self.offsets = offsets
        self.nblocks = n
        # plain ints for the one-block path (no numpy scalars per request)
        self._offsets_list: list[int] = offsets.tolist()

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
        return bytes(data[offset - b0 * bs : end - b0 * bs])

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
        """Decode one block, checked (CRC, size); a failure goes to :meth:`_retry_block`."""
        so = self._offsets_list[b]
        n = self._offsets_list[b + 1] - so
        stored = self._src.pread(so, n)
        if len(stored) < n:
            return self._retry_block(b, "truncated")
        if self.verify:
            body = memoryview(stored)[: n - 4]
            if crc.block_crc(body) != int.from_bytes(stored[n - 4 :], "little"):
                return self._retry_block(b, PROBLEM_CRC)
        else:
            body = memoryview(stored)
        try:
            return self.codec.decompress(body, self.raw_size(b))
        except ValueError as e:
            return self._retry_block(b, str(e))

    def blocks_span(self, first: int, end: int) -> int:
        """Plain bytes held by blocks ``[first, end)``."""
        return min(end * self.block_size, self.original_file_size) - first * self.block_size

    def read_blocks(self, first: int, end: int) -> memoryview:
        """Decoded content of blocks ``[first, end)``, checked, as one writable buffer."""
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
        offsets = self.offsets
        s = first
        while s < end:
            # as many blocks as fit in one bulk fetch (at least one)
            limit = int(offsets[s]) + self._BULK_STORED
            e = int(np.searchsorted(offsets, limit, side="right")) - 1
            e = min(max(e, s + 1), end)
            so, eo = int(offsets[s]), int(offsets[e])
            stored = self._src.pread(so, eo - so)
            lengths = self.lengths[s:e]
            dst = view[(s - first) * bs :]
            if len(stored) < eo - so:
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

    def _retry_block(self, b: int, problem: str) -> bytes:
        """Re-read block ``b`` up to RETRIES times; raise CorruptError if it stays bad."""
        so, n = int(self.offsets[b]), int(self.lengths[b])
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


# ----------------------------------------------------------------------------- writer


class ZFileWriter:
    """A streaming ZFile sink (§4.8 stream builder) over a WriteAt.

    ``write`` takes any sizes and buffers into full blocks; ``close`` compresses the last
    partial block, writes the jump table right after the last block, the trailer
    (flags 0x16) and, with ``overwrite_header``, rewrites the header (0x1B). The streamed
    header has flags 0x13. Positions start at 0 of ``out``; the writer tracks them itself.

    ``threads`` counts the caller: with ``threads > 1``, ``threads - 1`` pool workers
    compress batches of blocks while the calling thread feeds them and writes results
    (measured on 2 cores: one worker plus the caller beats two workers, whose GIL
    hand-offs at every 4 KiB block cost more than they gain). At most ``2 * threads``
    batches are in flight and results are written in order, so the file is
    byte-identical to a single-threaded one.

    ``bytes_in`` counts plain bytes written, ``bytes_out`` the ZFile bytes so far.
    ``close`` does not close ``out``.
    """

    def __init__(
        self,
        out: WriteAt,
        *,
        algorithm: str | int = "lz4",
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify: bool = True,
        overwrite_header: bool = False,
        threads: int = 1,
    ) -> None:
        if block_size not in WRITER_BLOCK_SIZES:
            raise UsageError(
                f"ZFile block size must be 4, 8, 16, 32 or 64 KiB, not {block_size} bytes"
            )
        self.codec = get_codec(algorithm)
        self.out = out
        self.block_size = block_size
        self.verify = bool(verify)
        self.overwrite_header = overwrite_header
        self.threads = max(1, int(threads))
        self._batch = max(1, (1 << 20) // block_size) * block_size
        self._stage = bytearray(self._batch)  # plain bytes waiting for a full batch
        self._fill = 0
        self._index: array = array("I")
        self._pending: deque[Future[tuple[memoryview, list[int]]]] = deque()
        self._free: deque[bytearray] = deque()
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="zfile")
            if self.threads > 1
            else None
        )
        self._closed = False
        self.bytes_in = 0
        self._template = HeaderTrailer(
            block_size=block_size,
            algo=self.codec.algo_id,
            verify=1 if self.verify else 0,
        )
        head = replace(self._template, flags=FLAGS_INITIAL_HEADER).pack_slot()
        out.pwrite(0, head)
        self._pos = SLOT_SIZE
        self.index_offset: int | None = None

    @property
    def bytes_out(self) -> int:
        return self._pos

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed ZFileWriter")
        mv = memoryview(data).cast("B")  # count bytes, not items
        n = len(mv)
        self.bytes_in += n
        batch = self._batch
        pos = 0
        if not self._fill and n >= batch:
            # Fast path: cut whole batches straight from the caller's data.
            pos = n // batch * batch
            # Threads need data that cannot change after we return: bytes is immutable.
            src = mv if isinstance(data, bytes) or self._pool is None else bytes(mv[:pos])
            for off in range(0, pos, batch):
                self._submit(src[off : off + batch])
        stage, fill = self._stage, self._fill
        while pos < n:
            take = min(batch - fill, n - pos)
            stage[fill : fill + take] = mv[pos : pos + take]
            fill += take
            pos += take
            if fill == batch:
                self._submit_stage(fill)
                fill = 0
        self._fill = fill
        return n

    def _submit_stage(self, fill: int) -> None:
        view = memoryview(self._stage)[:fill]
        # One thread compresses the staging buffer in place; workers get a copy.
        self._submit(view if self._pool is None else bytes(view))

    def _compress(self, chunk: bytes | memoryview) -> tuple[memoryview, list[int]]:
        try:
            scratch: bytearray | None = self._free.pop()
        except IndexError:
            scratch = None
        return self.codec.compress_blocks(chunk, self.block_size, self.verify, scratch)

    def _submit(self, chunk: bytes | memoryview) -> None:
        if self._pool is None:
            self._emit(self._compress(chunk))
            return
        self._pending.append(self._pool.submit(self._compress, chunk))
        while len(self._pending) > 2 * self.threads:
            self._emit(self._pending.popleft().result())

    def _emit(self, result: tuple[memoryview, list[int]]) -> None:
        stored, lengths = result
        self.out.pwrite(self._pos, stored)
        self._pos += len(stored)
        self._index.extend(lengths)
        if isinstance(stored.obj, bytearray):
            self._free.append(stored.obj)  # recycle the output buffer

    def close(self) -> None:
        """Finish the file: last block, jump table, trailer (and header rewrite)."""
        if self._closed:
            return
        try:
            if self._fill:
                self._submit_stage(self._fill)
                self._fill = 0
            while self._pending:
                self._emit(self._pending.popleft().result())
        finally:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        table = _table_bytes(self._index)
        self.index_offset = ioff = self._pos
        self.out.pwrite(ioff, table)
        self._pos += len(table)
        final = replace(
            self._template,
            index_offset=ioff,
            index_size=len(self._index),
            original_file_size=self.bytes_in,
            index_crc=crc.raw(table, 0),
        )
        self.out.pwrite(self._pos, replace(final, flags=FLAGS_TRAILER).pack_slot())
        self._pos += SLOT_SIZE
        if self.overwrite_header:
            self.out.pwrite(0, replace(final, flags=FLAGS_OVERWRITTEN_HEADER).pack_slot())

    def abort(self) -> None:
        """Stop without finishing the file (the output is left incomplete)."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------- helpers

Progress = Callable[[int], Any]


def compress_file(
    src: ReadAt,
    out: WriteAt,
    *,
    algorithm: str | int = "lz4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    verify: bool = True,
    overwrite_header: bool = False,
    threads: int = 1,
    progress: Progress | None = None,
) -> ZFileWriter:
    """Compress all of ``src`` into ``out`` as a ZFile; returns the closed writer."""
    total = src.size()
    chunk = max(8 << 20, block_size)
    with ZFileWriter(
        out,
        algorithm=algorithm,
        block_size=block_size,
        verify=verify,
        overwrite_header=overwrite_header,
        threads=threads,
    ) as w:
        pos = 0
        while pos < total:
            data = src.pread(pos, min(chunk, total - pos))
            if not data:
                break
            w.write(data)
            pos += len(data)
            if progress is not None:
                progress(len(data))
    return w


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
    counts the caller, as in :class:`ZFileWriter`: ``threads - 1`` workers decode while
    the calling thread writes.
    """
    n, bs = reader.nblocks, reader.block_size
    per = max(1, (4 << 20) // bs)
    _preallocate(out, offset, reader.size())
    ranges = [(b, min(b + per, n)) for b in range(0, n, per)]
    # Output buffers are recycled: no fresh (page-faulting) allocation per batch.
    free: deque[memoryview] = deque()

    def decode(b: int, e: int) -> tuple[memoryview, int]:
        try:
            buf = free.pop()
        except IndexError:
            buf = np.empty(per * bs, dtype=np.uint8).data
        length = reader.blocks_span(b, e)
        reader.read_blocks_into(b, e, buf[:length])
        return buf, length

    def put(b: int, decoded: tuple[memoryview, int]) -> None:
        buf, length = decoded
        out.pwrite(offset + b * bs, buf[:length])
        if progress is not None:
            progress(length)
        free.append(buf)

    if threads <= 1 or len(ranges) < 2:
        for b, e in ranges:
            put(b, decode(b, e))
        return reader.size()
    with ThreadPoolExecutor(threads - 1, thread_name_prefix="unzfile") as pool:
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
    offsets, lengths = r.offsets, r.lengths
    n = r.nblocks
    s = 0
    while s < n:
        limit = int(offsets[s]) + (8 << 20)
        e = min(max(int(np.searchsorted(offsets, limit, side="right")) - 1, s + 1), n)
        so, eo = int(offsets[s]), int(offsets[e])
        stored = src.pread(so, eo - so)
        if len(stored) < eo - so:  # the source shrank under us: the rest is missing
            got = so + len(stored)
            e = max(int(np.searchsorted(offsets, got, side="right")) - 1, s)
            for i in bad_crcs(stored[: int(offsets[e]) - so], lengths[s:e]):
                problems.append((s + i, int(offsets[s + i]), PROBLEM_CRC))
            problems.extend((b, int(offsets[b]), "truncated") for b in range(e, n))
            break
        for i in bad_crcs(stored, lengths[s:e]):
            problems.append((s + i, int(offsets[s + i]), PROBLEM_CRC))
        s = e
    return problems
