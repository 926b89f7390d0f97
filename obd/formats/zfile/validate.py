"""What is wrong with a ZFile (docs/formats.md §4.2-§4.8): one validator for the reader and ``obd check``.

:func:`validate_zfile` yields every problem of a ZFile's structure (header, trailer,
jump table); :class:`~obd.formats.zfile.reader.ZFileReader` raises the first one it
meets with ``deep=False`` (the checks reads depend on), ``obd check`` reports them all
(``deep=True``) and then :func:`block_problems` decodes every block through the
reader's decode path (:meth:`Codec.decompress_blocks`).
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from obd.errors import UnsupportedError
from obd.formats import crc
from obd.formats.codecs import PROBLEM_CRC, Codec, get_codec
from obd.formats.problem import CORRUPTION, ERROR, LEAK, Problem
from obd.formats.zfile.bufio import read_into
from obd.formats.zfile.layout import (
    FLAG_BITS,
    HT_OFF,
    INDEX_FIELDS,
    MAX_BLOCK_SIZE,
    MAX_INDEX_SIZE,
    SHAPE_FIELDS,
    SLOT_SIZE,
    HeaderTrailer,
    _u32_array,
    _u32_table,
    slot_digest,
)
from obd.io.base import ReadAt

if TYPE_CHECKING:
    import numpy as np

UNSUPPORTED = "unsupported"  # the code of an ERROR problem: a reader raises UnsupportedError
_TABLE_CHUNK = 16 << 20  # the jump table is read in pieces of this size
# Jump tables of up to this many blocks (512 MiB of 4 KiB blocks) are decoded without
# numpy, whose import costs a CLI run ~50 ms, more than such a table takes in Python
# (~15 ms at the limit; a 4 KiB file: microseconds); bigger ones are decoded with numpy.
SMALL_TABLE = 1 << 17


@dataclass
class ZFacts:
    """What :func:`validate_zfile` learnt (filled as far as it got)."""

    header: HeaderTrailer | None = None
    trailer: HeaderTrailer | None = None
    info: HeaderTrailer | None = None  # where the jump table is described
    codec: Codec | None = None
    data_start: int = SLOT_SIZE
    # stored length of each block (u32), and the file offset of each block and of the
    # end (int64): array('I') and list for small tables, numpy arrays for big ones
    lengths: array[int] | np.ndarray | None = None
    offsets: list[int] | np.ndarray | None = None
    structure_ok: bool = False  # every block can be located


def validate_zfile(
    src: ReadAt, facts: ZFacts | None = None, *, deep: bool = True
) -> Iterator[Problem]:
    """Every problem of the ZFile at ``src`` (offsets in ``src``).

    ``deep=False`` checks what :class:`ZFileReader` refuses (it raises the first
    corruption or unsupported feature, an ``error`` with code ``unsupported``: see
    :func:`raise_first_zfile`) and does not look at the trailer of a file whose header
    was overwritten. ``deep`` also checks that trailer, header/trailer agreement and
    unreferenced bytes (leaks), and goes on past an unsupported algorithm.
    """
    facts = facts if facts is not None else ZFacts()
    total = src.size()
    if total < SLOT_SIZE:
        yield Problem(CORRUPTION, "zfile_header", f"not a ZFile: only {total} bytes", 0)
        return
    head = src.pread(0, SLOT_SIZE)
    h = facts.header = HeaderTrailer.unpack(head)
    if not h.magic_ok:
        yield Problem(CORRUPTION, "zfile_header", "not a ZFile (no ZFile magic)", 0)
        return
    flags_at = HT_OFF["flags"]
    if not h.is_header:
        yield Problem(CORRUPTION, "zfile_header", "ZFile header lacks the header flag", flags_at)
    if h.digest_enabled:
        want = slot_digest(head)
        if want != h.digest:
            yield Problem(
                CORRUPTION, "zfile_digest",
                f"ZFile header digest mismatch: stored {h.digest:#010x}, computed {want:#010x}",
                HT_OFF["digest"],
            )  # fmt: skip
    if not h.is_data_file and not h.header_overwrite:
        yield Problem(CORRUPTION, "zfile_header", "ZFile header lacks the data-file flag", flags_at)
    toff = total - SLOT_SIZE
    t: HeaderTrailer | None = None
    if total >= 2 * SLOT_SIZE and (deep or not h.header_overwrite):
        tail = src.pread(toff, SLOT_SIZE)
        tt = HeaderTrailer.unpack(tail)
        if tt.magic_ok:
            t = facts.trailer = tt
            if tt.is_header or not tt.is_data_file or not tt.is_sealed:
                yield Problem(
                    CORRUPTION, "zfile_trailer",
                    f"bad ZFile trailer flags {tt.flags & FLAG_BITS:#x} (want data and sealed, "
                    "not header)",
                    toff + flags_at,
                )  # fmt: skip
            # Upstream never checks the trailer digest; we do when the trailer says it
            # has one (every writer since the digest exists fills it in correctly).
            if tt.digest_enabled and slot_digest(tail) != tt.digest:
                yield Problem(
                    CORRUPTION, "zfile_digest",
                    f"ZFile trailer digest mismatch: stored {tt.digest:#010x}, computed "
                    f"{slot_digest(tail):#010x}",
                    toff + HT_OFF["digest"],
                )  # fmt: skip
    if t is None and (deep or not h.header_overwrite):
        msg = (
            f"ZFile trailer missing (no ZFile magic in the last {SLOT_SIZE} bytes): "
            "the file is truncated"
        )
        if not h.header_overwrite:
            yield Problem(CORRUPTION, "zfile_trailer", msg + "; the jump table cannot be located", max(toff, 0))  # fmt: skip
            return
        yield Problem(CORRUPTION, "zfile_trailer", msg, toff)
    info = facts.info = h if h.header_overwrite else t
    assert info is not None
    if deep and t is not None:
        names = (INDEX_FIELDS if h.header_overwrite else ()) + SHAPE_FIELDS
        for name in names:
            if getattr(h, name) != getattr(t, name):
                yield Problem(
                    CORRUPTION, "zfile_header_trailer",
                    f"ZFile header and trailer disagree on {name} "
                    f"(header {getattr(h, name)}, trailer {getattr(t, name)})",
                    HT_OFF[name],
                )  # fmt: skip
    if h.dict_size:
        yield Problem(ERROR, UNSUPPORTED, f"ZFile with a dictionary (dict_size {h.dict_size}) is not supported")  # fmt: skip
        return
    bs = h.block_size
    if bs == 0 or bs & (bs - 1):
        yield Problem(CORRUPTION, "zfile_header", f"bad ZFile block size {bs}", HT_OFF["block_size"])  # fmt: skip
        return
    if bs > MAX_BLOCK_SIZE:
        yield Problem(ERROR, UNSUPPORTED, f"ZFile block size {bs} is larger than {MAX_BLOCK_SIZE}")  # fmt: skip
        return
    try:
        facts.codec = get_codec(h.algo)
    except UnsupportedError as e:
        if not deep:
            yield Problem(ERROR, UNSUPPORTED, e.message, HT_OFF["algo"])
            return
        yield Problem(ERROR, UNSUPPORTED, e.message + "; blocks not checked", HT_OFF["algo"])
    codec = facts.codec
    verify = bool(h.verify)
    data_start = facts.data_start = SLOT_SIZE + h.dict_size
    limit = toff if t is not None else total
    info_at = 0 if info is h else toff
    n, size, ioff = info.index_size, info.original_file_size, info.index_offset
    if n > MAX_INDEX_SIZE:
        yield Problem(
            CORRUPTION, "zfile_jump_table", f"ZFile index_size {n} is larger than {MAX_INDEX_SIZE}",
            info_at + HT_OFF["index_size"],
        )  # fmt: skip
        return
    if -(-size // bs) != n:
        yield Problem(
            CORRUPTION, "zfile_jump_table",
            f"ZFile jump table has {n} blocks but original_file_size {size} needs "
            f"{-(-size // bs)} blocks of {bs}",
            info_at + HT_OFF["index_size"],
        )  # fmt: skip
    if ioff < data_start or ioff + 4 * n > limit:
        yield Problem(
            CORRUPTION, "zfile_jump_table",
            f"ZFile jump table [{ioff}, {ioff + 4 * n}) lies outside [{data_start}, {limit}): "
            "truncated or bad index_offset",
            ioff if ioff < total else info_at + HT_OFF["index_offset"],
        )  # fmt: skip
        return
    table = bytearray()
    pos, end = ioff, ioff + 4 * n
    while pos < end:
        chunk = src.pread(pos, min(_TABLE_CHUNK, end - pos))
        if not chunk:
            yield Problem(CORRUPTION, "zfile_jump_table", "ZFile jump table is truncated", pos)
            return
        table += chunk
        pos += len(chunk)
    if info.digest_enabled:
        got = crc.raw(table, 0)
        if got != info.index_crc:
            yield Problem(
                CORRUPTION, "zfile_index_crc",
                f"ZFile jump table checksum mismatch (index_crc): stored {info.index_crc:#010x}, "
                f"computed {got:#010x}",
                ioff,
            )  # fmt: skip
    minimum = 5 if verify else 1
    maximum = (codec.bound(bs) if codec else bs + bs // 8 + 64) + (4 if verify else 0)
    lengths: array[int] | np.ndarray
    offsets: list[int] | np.ndarray
    if n <= SMALL_TABLE:
        lengths, offsets, wrong = _small_table(table, data_start, minimum, maximum)
    else:
        lengths, offsets, wrong = _numpy_table(table, data_start, minimum, maximum)
    for b in wrong:
        yield Problem(
            CORRUPTION, "zfile_jump_table",
            f"ZFile jump table entry {b} has impossible stored length {int(lengths[b])}",
            ioff + 4 * b,
        )  # fmt: skip
    blocks_end = int(offsets[-1])
    if blocks_end > ioff:
        yield Problem(
            CORRUPTION, "zfile_jump_table",
            f"ZFile jump table points past the end of the data: blocks end at {blocks_end}, "
            f"jump table starts at {ioff}",
            ioff,
        )  # fmt: skip
        return
    if deep and blocks_end < ioff:
        gap = ioff - blocks_end
        yield Problem(LEAK, "zfile_gap", f"{gap} unreferenced bytes after the last block", blocks_end, gap)  # fmt: skip
    if deep and ioff + 4 * n < limit:
        gap = limit - ioff - 4 * n
        yield Problem(LEAK, "zfile_gap", f"{gap} unreferenced bytes after the jump table", ioff + 4 * n, gap)  # fmt: skip
    if wrong:
        return
    facts.lengths, facts.offsets = lengths, offsets
    facts.structure_ok = True


def _small_table(
    table: bytearray, data_start: int, minimum: int, maximum: int
) -> tuple[array[int], list[int], list[int]]:
    """Lengths, offsets and out-of-range entries of a jump table, without numpy."""
    lengths = _u32_array(table)
    wrong: list[int] = []
    if lengths and (min(lengths) < minimum or max(lengths) > maximum):
        wrong = [b for b, x in enumerate(lengths) if not minimum <= x <= maximum]
    return lengths, list(accumulate(lengths, initial=data_start)), wrong


def _numpy_table(
    table: bytearray, data_start: int, minimum: int, maximum: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """:func:`_small_table` for big tables: the same, vectorised."""
    import numpy as np

    lengths = _u32_table(table)
    wrong: list[int] = np.flatnonzero((lengths < minimum) | (lengths > maximum)).tolist()
    offsets = np.empty(len(lengths) + 1, dtype=np.int64)
    offsets[0] = data_start
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    offsets[1:] += data_start
    return lengths, offsets, wrong


def raise_first_zfile(problems: Iterator[Problem], path: str | None) -> None:
    """What a reader does with :func:`validate_zfile`: raise the first corruption
    (:class:`CorruptError`) or unsupported feature (:class:`UnsupportedError`)."""
    for p in problems:
        if p.severity == CORRUPTION:
            raise p.error(path)
        if p.severity == ERROR:
            raise UnsupportedError(p.message, path=path)


def block_problems(
    src: ReadAt,
    facts: ZFacts,
    *,
    progress: Callable[[int], Any] | None = None,
    threads: int = 1,
) -> Iterator[Problem]:
    """CRC and decompress every block of a validated ZFile (``facts.structure_ok``),
    batches in parallel, with the reader's decode path; one problem per bad block."""
    h, codec, offsets, lengths = facts.header, facts.codec, facts.offsets, facts.lengths
    assert h is not None and facts.info is not None
    if codec is None or offsets is None or lengths is None:
        return
    n, bs, verify = len(lengths), h.block_size, bool(h.verify)
    if n == 0:
        return
    per = max(1, (4 << 20) // bs)
    ranges = [(s, min(s + per, n)) for s in range(0, n, per)]
    local = threading.local()
    last_raw = facts.info.original_file_size - (n - 1) * bs
    if not 0 < last_raw <= bs:  # original_file_size disagrees with the block count (reported)
        last_raw = bs

    def work(r: tuple[int, int]) -> tuple[int, list[tuple[int, str]], int]:
        s, e = r
        so, eo = int(offsets[s]), int(offsets[e])
        # per-thread buffers, recycled: the stored run is read into one in place
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < per * bs:
            buf = local.buf = bytearray(per * bs)
        room = getattr(local, "stored", None)
        if room is None or len(room) < eo - so:
            room = local.stored = bytearray(eo - so + (1 << 16))
        stored = memoryview(room)[: read_into(src, so, memoryview(room)[: eo - so])]
        lens = lengths[s:e]  # an array or numpy slice: the batch call takes it as it is
        if len(stored) < eo - so:
            # truncated: check what is there, report the rest
            sizes: list[int] = lens.tolist()
            have, pos, k = len(stored), 0, 0
            while k < len(sizes) and pos + sizes[k] <= have:
                pos += sizes[k]
                k += 1
            bad = [(i, "truncated (past the end of the file)") for i in range(k, len(sizes))]
            if k:
                bad = codec.decompress_blocks(stored[:pos], sizes[:k], buf, bs, bs, verify) + bad
            return s, bad, eo - so
        lr = last_raw if e == n else bs
        return s, codec.decompress_blocks(stored, lens, buf, bs, lr, verify), eo - so

    def report(res: tuple[int, list[tuple[int, str]], int]) -> Iterator[Problem]:
        s, bad, nbytes = res
        for i, problem in bad:
            b = s + i
            code = "zfile_block_crc" if PROBLEM_CRC in problem else "zfile_block"
            yield Problem(CORRUPTION, code, f"ZFile block {b}: {problem}", int(offsets[b]))
        if progress is not None:
            progress(nbytes)

    if threads <= 1 or len(ranges) < 2:
        for r in ranges:
            yield from report(work(r))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="check") as pool:
        for res in pool.map(work, ranges):
            yield from report(res)
