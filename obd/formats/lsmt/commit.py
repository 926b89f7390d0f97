"""Compaction: the read-only LSMT file written by commit and merge (docs/formats.md §1.8).

The output is streamed (header, data, index, trailer in order) into a sink with
``write(bytes)``, so a ZFile writer or a tar wrapper can take it unchanged.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from obd.io.file import DIRECT_ALIGN, IOV_MAX, LocalFile

COPY_STEP_SECTORS = 64  # data is indexed in 32 KiB steps (§1.8 step 3)
INDEX_PAD_ENTRIES = 256
DIRECT_QUEUE = 3  # direct writes in flight at once (each waits for the disk)
GATHER = 8 << 20  # data is gathered into buffers of this size (a multiple of a ZFile batch)
COPY_MIN = 1 << 20  # a source run at least this long is copied in the kernel when it can be
# copy_file_range cannot copy between these two files: copy by reading instead
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> object: ...


class FileSink:
    """A sequential writer over a WriteAt, with a buffer.

    Over a :class:`LocalFile` it can also take a gather list (:meth:`write_vec`, one
    ``pwritev`` for many short pieces) and kernel copies (:meth:`copy_from`). The
    writeback of an output as it grows, and its fsync, are the output's own
    (:class:`AtomicOutput`).
    """

    def __init__(self, out: object, buffer_size: int = 4 << 20) -> None:
        self.out = out
        self.pos = 0
        self.buf = bytearray()
        self.limit = buffer_size
        self.local = isinstance(out, LocalFile)
        self.copy_ok = hasattr(os, "copy_file_range") and self.local
        # direct I/O is tried for gather lists (write_vec(direct=True)) until refused
        self.direct = self.local
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[Future[None]] = deque()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(memoryview(data).cast("B"))
        if not self.buf and n >= self.limit:
            self._put(data, n)  # big pieces go straight out, without a copy
            return n
        self.buf += data
        if len(self.buf) >= self.limit:
            self._drain()
        return n

    def write_vec(
        self, buffers: list[bytes | bytearray | memoryview], nbytes: int, direct: bool = False
    ) -> None:
        """Append ``buffers`` (``nbytes`` in all) back to back; with ``direct``, by direct
        I/O where the output takes it (the caller keeps its alignment rules, see
        :meth:`LocalFile.pwritev_direct`), else through the page cache.

        Direct writes after the first are asynchronous: up to ``DIRECT_QUEUE`` of them
        are in flight in threads (a direct write waits for the disk); the buffers must
        stay unchanged until :meth:`wait`, which also raises their errors."""
        self._drain()
        out = self.out
        pos, self.pos = self.pos, self.pos + nbytes
        if not self.local:
            out.pwrite(pos, b"".join(buffers))  # type: ignore[attr-defined]
        elif direct and self.direct and self._pool is not None:
            self._inflight.append(self._pool.submit(self._write_direct, pos, buffers))
            while len(self._inflight) > DIRECT_QUEUE:
                self._inflight.popleft().result()
        elif direct and self.direct:
            self._write_direct(pos, buffers)  # the first: finds whether it can, at once
            if self.direct:
                self._pool = ThreadPoolExecutor(DIRECT_QUEUE, thread_name_prefix="obd-direct")
        else:
            out.pwritev(pos, buffers)  # type: ignore[attr-defined]

    def _write_direct(self, pos: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        if not self.out.pwritev_direct(pos, buffers):  # type: ignore[attr-defined]
            self.direct = False
            self.out.pwritev(pos, buffers)  # type: ignore[attr-defined]

    def wait(self) -> None:
        """Wait for every direct write in flight; raise the first one's error."""
        try:
            while self._inflight:
                self._inflight.popleft().result()
        finally:
            self._stop()

    def _stop(self) -> None:
        """Wait for the writes in flight, whatever they did, and end the threads."""
        for f in self._inflight:
            f.cancel()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def copy_from(self, fd: int, offset: int, length: int) -> bool:
        """Copy ``length`` bytes at ``offset`` of ``fd`` in the kernel (``copy_file_range``);
        False when it cannot between these files (the caller then copies by reading). The
        source must hold the whole range."""
        if not self.copy_ok:
            return False
        self._drain()
        try:
            self.out.copy_in(fd, offset, length, self.pos)  # type: ignore[attr-defined]
        except OSError as e:
            if e.errno is not None and e.errno not in _NO_KERNEL_COPY:
                raise
            self.copy_ok = False
            return False
        self.pos += length
        return True

    def _put(self, data: bytes | bytearray | memoryview, n: int) -> None:
        self.out.pwrite(self.pos, data)  # type: ignore[attr-defined]
        self.pos += n

    def _drain(self) -> None:
        if self.buf:
            buf, self.buf = self.buf, bytearray()
            self._put(buf, len(buf))

    def close(self) -> None:
        self.wait()
        self._drain()

    def abort(self) -> None:
        """Stop: wait for the direct writes in flight (their errors do not matter now)."""
        self._stop()


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
    """Write the compacted layer of mappings ``m`` (sorted by offset) into ``sink`` (§1.8).

    ``sources[tag]`` holds the data of each mapping; bytes past a source's end read as
    zeros. Returns the bytes written.

    The index is computed in bulk (numpy); the data goes in runs: mappings whose data
    lies back to back in one source (the output has it back to back too) are copied
    as one, a long run in the kernel (``copy_file_range``) when the sink is a local file,
    the rest gathered with one read per run into large buffers, which a sink with
    ``feed`` (a ZFile writer) takes without a copy.
    """
    lens = m.length.astype(np.int64)
    keep = lens > 0
    offs = m.offset.astype(np.int64)[keep]
    lens = lens[keep]
    mos = m.moffset.astype(np.int64)[keep]
    zs = m.zeroed[keep]
    tags = m.tag[keep]
    entries = _step_entries(offs, lens, zs, tags)
    merged = _greedy_merge(*entries)
    data = ~zs
    cursor = HT_SECTORS + int(lens[data].sum())
    _copy_runs(mos[data], lens[data], tags[data], sources, header.pack(), sink, progress)
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


def _step_entries(
    offs: np.ndarray, lens: np.ndarray, zs: np.ndarray, tags: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The output entries before the merge (§1.8 step 3): a zeroed mapping as one entry
    at the data cursor, a data mapping as one entry per 64-sector step of its data."""
    step = COPY_STEP_SECTORS
    data_lens = np.where(zs, 0, lens)
    cursor = HT_SECTORS + np.cumsum(data_lens) - data_lens  # the cursor at each mapping
    count = np.where(zs, 1, -(-lens // step))
    which = np.repeat(np.arange(len(lens)), count)
    first = np.cumsum(count) - count
    done = (np.arange(len(which)) - first[which]) * step  # sectors of the mapping before
    e_ze = zs[which]
    e_len = np.where(e_ze, lens[which], np.minimum(step, lens[which] - done))
    return offs[which] + done, e_len, cursor[which] + done, e_ze, tags[which]


def _greedy_merge(
    off: np.ndarray, ln: np.ndarray, mo: np.ndarray, ze: np.ndarray, tg: np.ndarray
) -> Mappings:
    """Left-to-right merge of §1.8 step 4 (merged length stays below 16383), in bulk.

    Entries that the rule's first four conditions link form chains; a chain shorter than
    the cap in total becomes one entry; a longer one is cut greedily, one
    ``searchsorted`` per output entry.
    """
    n = len(off)
    if n == 0:
        return Mappings.empty()
    cap = MAX_SEGMENT_SECTORS
    mend = np.where(ze, mo, mo + ln)
    link = np.zeros(n, dtype=bool)
    link[1:] = (
        (off[:-1] + ln[:-1] == off[1:])
        & (mend[:-1] == mo[1:])
        & (ze[:-1] == ze[1:])
        & (tg[:-1] == tg[1:])
    )
    heads = np.flatnonzero(~link)  # chain starts (entry 0 is never linked)
    totals = np.add.reduceat(ln, heads)
    cut = ~link
    bounds = np.append(heads, n)
    for c in np.flatnonzero(totals >= cap).tolist():
        a, b = int(bounds[c]), int(bounds[c + 1])
        sums = np.concatenate(([0], np.cumsum(ln[a:b])))
        s = 0
        while s < b - a:
            t = int(np.searchsorted(sums, sums[s] + cap, side="left")) - 1
            t = max(t, s + 1)
            cut[a + s] = True
            s = t
    starts = np.flatnonzero(cut)
    return Mappings(
        off[starts].astype(np.uint64),
        np.add.reduceat(ln, starts).astype(np.uint64),
        mo[starts].astype(np.uint64),
        ze[starts].astype(bool),
        tg[starts].astype(np.uint8),
    )


def _copy_runs(
    mos: np.ndarray,
    lens: np.ndarray,
    tags: np.ndarray,
    sources: Sequence[ReadAt],
    head: bytes,
    sink: Sink,
    progress: Callable[[int], None] | None,
) -> None:
    """Write ``head`` then the data of the data mappings ``(moffset, length, tag)``, in
    order, into ``sink``: one copy or read per run of mappings back to back in a source."""
    n = len(mos)
    if n:
        new = np.ones(n, dtype=bool)
        new[1:] = (mos[:-1] + lens[:-1] != mos[1:]) | (tags[:-1] != tags[1:])
        starts = np.flatnonzero(new)
        r_at = (mos[starts] * SECTOR).tolist()
        r_len = (np.add.reduceat(lens, starts) * SECTOR).tolist()
        r_tag = tags[starts].tolist()
    else:
        r_at, r_len, r_tag = [], [], []
    if isinstance(sink, FileSink) and sink.local:
        _copy_mapped(r_at, r_len, r_tag, sources, head, sink, progress)
        return
    g = _Gather(sink, progress)
    g.put(head)
    sizes = [s.size() for s in sources]
    fds = [s.fd if isinstance(s, LocalFile) else -1 for s in sources]
    copy_from = getattr(sink, "copy_from", None)
    preadv = os.preadv
    for at, length, tag in zip(r_at, r_len, r_tag, strict=True):
        fd = fds[tag]
        fill = g.fill
        if (  # the common case, inline: a short run of a local file into the buffer
            fd >= 0
            and length < COPY_MIN
            and fill + length < GATHER
            and at + length <= sizes[tag]
            and preadv(fd, [g.view[fill : fill + length]], at) == length
        ):
            g.fill = fill + length
            g.done += length
            continue
        if (
            copy_from is not None
            and fd >= 0
            and length >= COPY_MIN
            and at + length <= sizes[tag]
            and g.flush_partial()
            and copy_from(fd, at, length)
        ):
            g.progressed(length)
            g.flush_partial()
            continue
        g.read(sources[tag], fd, at, length, sizes[tag])
    g.flush_partial()


def _copy_mapped(
    r_at: list[int],
    r_len: list[int],
    r_tag: list[int],
    sources: Sequence[ReadAt],
    head: bytes,
    sink: FileSink,
    progress: Callable[[int], None] | None,
) -> None:
    """:func:`_copy_runs` into a local output: the runs of local sources are written
    straight from read-only mappings of the sources, up to ``IOV_MAX`` of them in one
    ``pwritev`` (no read into a buffer, no system call per run).

    Where the output takes direct I/O the disk reads the runs from the sources' page
    cache itself: no copy into the output's page cache, no writeback at the fsync, a
    fraction of the CPU (docs/commit.md). Lists start and end on ``DIRECT_ALIGN``
    boundaries: what passes the last one waits for the next list, and the data's last
    partial block goes through the page cache (then the index and the trailer, which
    follow it). A list holding a piece not in a mapping (the header, a run past its
    source's end, a run of a source that is not a local file, read into ``bytes``) goes
    through the page cache too, so no block is ever written both ways.
    Without direct I/O a long run is copied in the kernel (``copy_file_range``).

    A source is mapped only once it is known to hold the run; a run past its end, of a
    source that is not a local file or of one that cannot be mapped, is read (bytes past
    the end read as zeros).
    """
    maps: dict[int, mmap.mmap | None] = {}
    views: dict[int, memoryview] = {}
    sizes = [s.size() for s in sources]
    fds = [s.fd if isinstance(s, LocalFile) else -1 for s in sources]
    sink.write_vec([head], len(head))  # alone: the lists after it can go direct
    iov: list[bytes | bytearray | memoryview] = []
    fill = 0
    done = 0  # data bytes in iov

    def send(final: bool) -> None:
        nonlocal iov, fill, done
        if sink.direct:
            cut = fill - (sink.pos + fill) % DIRECT_ALIGN
            first, rest = _split(iov, cut)
            if cut:
                # only pieces of the source mappings can go direct (bytes, and slices
                # of them, are not aligned): a list holding the header or a read run
                # goes through the page cache, whole 4 KiB blocks still, so that no
                # block is written both ways
                sink.write_vec(first, cut, direct=all(_mapped(p) for p in first))
            iov, fill = rest, fill - cut
            if not final:
                return
        if iov:
            sink.write_vec(iov, fill)
        iov, fill = [], 0

    try:
        for at, length, tag in zip(r_at, r_len, r_tag, strict=True):
            fd = fds[tag]
            inside = fd >= 0 and at + length <= sizes[tag]
            if inside and length >= COPY_MIN and not sink.direct and sink.copy_ok:
                send(True)
                if sink.copy_from(fd, at, length):
                    done += length
                    continue
            piece: bytes | memoryview
            view = views.get(tag) if inside else None
            if inside and view is None and tag not in maps:
                m = sources[tag].map_readonly()  # type: ignore[attr-defined]
                maps[tag] = m  # None: this source cannot be mapped, its runs are read
                if m is not None:
                    view = views[tag] = memoryview(m)
            if view is not None:
                piece = view[at : at + length]
            else:
                piece = _read_padded(sources[tag], at, length)
            iov.append(piece)
            fill += length
            done += length
            if len(iov) >= IOV_MAX or fill >= GATHER:
                send(False)
                if progress is not None:
                    progress(done)
                    done = 0
        send(True)
        sink.wait()
        if progress is not None and done:
            progress(done)
    finally:
        sink.abort()  # no write in flight still reads the mappings (after wait: a no-op)
        iov = []
        piece = b""
        try:
            for v in views.values():
                v.release()
            for m in maps.values():
                if m is not None:
                    m.close()
        except BufferError:  # a failed write's traceback still holds a piece: GC unmaps
            pass


def _mapped(piece: bytes | bytearray | memoryview) -> bool:
    """Whether ``piece`` lies in a source mapping (page-aligned memory, sector offsets)."""
    return isinstance(piece, memoryview) and isinstance(piece.obj, mmap.mmap)


def _split(
    iov: list[bytes | bytearray | memoryview], cut: int
) -> tuple[list[bytes | bytearray | memoryview], list[bytes | bytearray | memoryview]]:
    """``iov`` cut after its first ``cut`` bytes (a piece across the cut is sliced)."""
    first: list[bytes | bytearray | memoryview] = []
    for i, piece in enumerate(iov):
        n = len(piece)
        if cut >= n:
            first.append(piece)
            cut -= n
            continue
        if cut:
            v = memoryview(piece)
            first.append(v[:cut])
            return first, [v[cut:], *iov[i + 1 :]]
        return first, list(iov[i:])
    return first, []


def _read_padded(src: ReadAt, at: int, length: int) -> bytes:
    """``length`` bytes at ``at`` of ``src``; past its end, zeros."""
    data = src.pread(at, length)
    return data + bytes(length - len(data)) if len(data) < length else data


class _Gather:
    """Fills ``GATHER``-byte buffers from sources and hands them to a sink: whole ones by
    ``feed`` (the sink owns the buffer until it calls back) when the sink has it, else
    by ``write`` (the buffer is reused at once)."""

    def __init__(self, sink: Sink, progress: Callable[[int], None] | None) -> None:
        self.sink = sink
        self.progress = progress
        self.feed = getattr(sink, "feed", None)
        self.free: list[bytearray] = []
        self.buf = bytearray(GATHER)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.done = 0  # data bytes not yet told to ``progress``

    def put(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, GATHER - self.fill)
            self.view[self.fill : self.fill + n] = data[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == GATHER:
                self._hand_over()

    def read(self, src: ReadAt, fd: int, at: int, length: int, size: int) -> None:
        """Append ``length`` bytes at ``at`` of ``src`` (its file ``fd``, or -1)."""
        done = 0
        while done < length:
            n = min(length - done, GATHER - self.fill)
            dst = self.view[self.fill : self.fill + n]
            got = 0
            if fd >= 0:
                want = max(0, min(n, size - (at + done)))
                while got < want:
                    k = os.preadv(fd, [dst[got:want]], at + done + got)
                    if k <= 0:
                        break
                    got += k
            else:
                data = src.pread(at + done, n)
                got = len(data)
                dst[:got] = data
            if got < n:
                dst[got:] = bytes(n - got)  # past the source's end reads as zeros
            self.fill += n
            done += n
            if self.fill == GATHER:
                self._hand_over()
        self.progressed(length)

    def progressed(self, n: int) -> None:
        """Count ``n`` bytes of data done; told to ``progress`` once per buffer."""
        self.done += n

    def _report(self) -> None:
        if self.progress is not None and self.done:
            self.progress(self.done)
        self.done = 0

    def flush_partial(self) -> bool:
        """Hand over what is gathered (before a kernel copy, and at the end). True."""
        if self.fill:
            self.sink.write(self.view[: self.fill])
            self.fill = 0
        self._report()
        return True

    def _hand_over(self) -> None:
        if self.feed is None:
            self.sink.write(self.view)
        else:
            buf = self.buf
            self.feed(self.view, lambda: self.free.append(buf))
            self.buf = self.free.pop() if self.free else bytearray(GATHER)
            self.view = memoryview(self.buf)
        self.fill = 0
        self._report()
