"""Writing ZFiles: the streaming :class:`ZFileWriter` and :func:`compress_file` (docs/formats.md §4.8)."""

from __future__ import annotations

import functools
import mmap
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TypedDict, Unpack

from obd.errors import UsageError
from obd.formats import crc
from obd.formats.codecs import (
    get_codec,
)
from obd.formats.zfile.bufio import read_into
from obd.formats.zfile.layout import (
    DEFAULT_BLOCK_SIZE,
    FLAGS_INITIAL_HEADER,
    FLAGS_OVERWRITTEN_HEADER,
    FLAGS_TRAILER,
    SLOT_SIZE,
    WRITER_BLOCK_SIZES,
    HeaderTrailer,
    Progress,
    _table_bytes,
)
from obd.io.base import ReadAt, WriteAt
from obd.io.file import LocalFile

#: called by :meth:`ZFileWriter.feed` once it no longer needs a buffer (None: nothing)
Release = Callable[[], None] | None

# ----------------------------------------------------------------------------- writer


class ZFileWriter:
    """A streaming ZFile sink (§4.8 stream builder) over a WriteAt.

    ``write`` takes any sizes and buffers into full blocks; ``close`` compresses the last
    partial block, writes the jump table right after the last block, the trailer
    (flags 0x16) and, with ``overwrite_header``, rewrites the header (0x1B). The streamed
    header has flags 0x13. Positions start at 0 of ``out``; the writer tracks them itself.

    ``threads`` counts the caller: with ``threads > 1``, pool workers compress batches
    of blocks while the calling thread feeds them and writes results. With the compiled
    batch path (:attr:`Codec.releases_gil`) there are ``threads`` workers, since the
    caller mostly waits in I/O; without it ``threads - 1`` (measured on 2 cores: one
    worker plus the caller beats two workers, whose GIL hand-offs at every 4 KiB block
    cost more than they gain). A bounded number of batches is in flight and results are
    written in order, so the file is byte-identical to a single-threaded one.

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
        # in flight: a batch's result and what to call once it is written (see feed)
        self._pending: deque[tuple[Future[tuple[memoryview, list[int]]], Release]] = deque()
        self._inflight = 4 * self.threads + 4
        self._free: deque[bytearray] = deque()
        workers = self.threads if self.codec.releases_gil else self.threads - 1
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(workers, thread_name_prefix="zfile") if self.threads > 1 else None
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

    def feed(self, data: memoryview, release: Release) -> None:
        """:meth:`write` without copying: the writer owns ``data`` (which must not change)
        until it calls ``release()``, once every batch cut from it is compressed and
        written (at once with one thread; a bulk reader recycles its buffers so)."""
        n = len(data)
        whole = n // self._batch * self._batch if not self._fill else 0
        if self._closed or not whole:
            self.write(data)
            if release is not None:
                release()
            return
        self.bytes_in += whole
        batch = self._batch
        for off in range(0, whole, batch):
            self._submit(data[off : off + batch], release if off + batch == whole else None)
        if whole < n:
            self.write(data[whole:])

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

    def _submit(self, chunk: bytes | memoryview, release: Release = None) -> None:
        if self._pool is None:
            self._emit(self._compress(chunk))
            if release is not None:
                release()
            return
        self._pending.append((self._pool.submit(self._compress, chunk), release))
        while len(self._pending) > self._inflight:
            self._emit_next()

    def _emit_next(self) -> None:
        """Wait for the oldest batch in flight and write it."""
        fut, release = self._pending.popleft()
        self._emit(fut.result())
        if release is not None:
            release()

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
                self._emit_next()
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


class WriterOptions(TypedDict, total=False):
    """The keywords :func:`compress_file` passes on to :class:`ZFileWriter` (its defaults)."""

    algorithm: str | int
    block_size: int
    verify: bool
    overwrite_header: bool
    threads: int


def compress_file(
    src: ReadAt,
    out: WriteAt,
    *,
    progress: Progress | None = None,
    **options: Unpack[WriterOptions],
) -> ZFileWriter:
    """Compress all of ``src`` into ``out`` as a ZFile; returns the closed writer.

    ``options`` are :class:`ZFileWriter`'s keywords (:class:`WriterOptions`), with its
    defaults.
    """
    total = src.size()
    mapped = src.map_readonly() if isinstance(src, LocalFile) and total > 0 else None
    if mapped is not None:
        return _compress_mapped(mapped, total, out, progress, options)
    with ZFileWriter(out, **options) as w:
        chunk = max(_READ_CHUNK, w.block_size)
        # Input buffers are recycled (no fresh, page-faulting 4 MiB per read) and handed
        # to the writer without a copy; it gives each back once compressed and written.
        free: deque[bytearray] = deque()
        made = 0
        pos = 0
        while pos < total:
            while not free and made >= _READ_BUFFERS and w._pending:
                w._emit_next()
            if free:
                buf = free.pop()
            else:
                buf, made = bytearray(chunk), made + 1
            n = read_into(src, pos, memoryview(buf)[: min(chunk, total - pos)])
            if not n:
                break
            w.feed(memoryview(buf)[:n], functools.partial(free.append, buf))
            pos += n
            if progress is not None:
                progress(n)
    return w


_READ_CHUNK = 4 << 20
_READ_BUFFERS = 4


def _compress_mapped(
    m: mmap.mmap,
    total: int,
    out: WriteAt,
    progress: Progress | None,
    options: WriterOptions,
) -> ZFileWriter:
    """:func:`compress_file` from a mapping of the source: the workers compress straight
    from the source's page cache, with no read into a buffer (one copy of the whole
    input less). The source must not shrink meanwhile (SIGBUS), as for a commit."""
    view = memoryview(m)
    try:
        with ZFileWriter(out, **options) as w:
            chunk = max(_READ_CHUNK, w.block_size)
            for pos in range(0, total, chunk):
                n = min(chunk, total - pos)
                w.feed(view[pos : pos + n], None)
                if progress is not None:
                    progress(n)
    finally:
        try:
            view.release()
            m.close()
        except BufferError:  # a failed worker's traceback still holds a view: GC unmaps
            pass
    return w
