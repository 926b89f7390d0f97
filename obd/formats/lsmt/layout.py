"""LSMT layer files: header/trailer, index entries, read-only layers (FORMATS.md §1).

Names follow overlaybd: ``HeaderTrailer``, ``SegmentMapping``, ``index_offset``,
``index_size`` (a count of 16-byte entries), ``virtual_size``. Mapping fields are in
512-byte sectors.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from obd.errors import CorruptError
from obd.formats import uuid as uuidmod
from obd.formats.layout import FlagNames, Layout
from obd.io.base import ReadAt

SECTOR = 512
HT_SLOT = 4096  # bytes a header or trailer occupies
HT_SECTORS = HT_SLOT // SECTOR  # B of §1.5: data starts at sector 8

MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")

FLAG_HEADER = 0x01  # clear: trailer
FLAG_DATA = 0x02  # clear: index file
FLAG_SEALED = 0x04
FLAG_SPARSE = 0x10
# every bit the format doc names (bits 3 and 5 are neither set nor read by upstream)
FLAG_NAMES: FlagNames = (
    (FLAG_HEADER, "header"),
    (FLAG_DATA, "data"),
    (FLAG_SEALED, "sealed"),
    (0x08, "gc_layer"),
    (FLAG_SPARSE, "sparse"),
    (0x20, "info_valid"),
)

MAX_RO_INDEX_SIZE = 1_000_000  # MAX_LSMT_RO_INDEX_SIZE
MAX_RW_INDEX_RECORDS = 128_000_000
MAX_SEGMENT_SECTORS = (1 << 14) - 1  # 16383
MAX_LAYERS = 255

INVALID_OFFSET = (1 << 50) - 1
ENTRY_SIZE = 16
# The largest disk an index can address: entry offsets are 50-bit sector numbers (the
# all-ones value marks padding). A larger virtual_size is a damaged field (no file
# offset or NBD size could hold it anyway).
MAX_VIRTUAL_SIZE = INVALID_OFFSET * SECTOR

_OFFSET_MASK = (1 << 50) - 1
_MOFFSET_MASK = (1 << 55) - 1


@dataclass(frozen=True, slots=True)
class HeaderTrailer:
    """The 390-byte struct at the start of a 4096-byte header or trailer slot (§1.2)."""

    LAYOUT = Layout(
        (
            ("magic0", "8s"),
            ("magic1", "16s"),
            ("size", "I"),
            ("flags", "I"),
            ("index_offset", "Q"),
            ("index_size", "Q"),
            ("virtual_size", "Q"),
            ("uuid", "37s"),
            ("parent_uuid", "37s"),
            ("reserved", "H"),
            ("version", "B"),
            ("sub_version", "B"),
            ("user_tag", "256s"),
        )
    )
    STRUCT = LAYOUT.struct

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = uuidmod.NULL_UUID
    parent_uuid: str = uuidmod.NULL_UUID
    version: int = 1
    sub_version: int = 1
    user_tag: bytes = b""
    reserved: int = 0

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
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    def pack(self) -> bytes:
        if len(self.user_tag) > 256:
            raise ValueError("user tag longer than 256 bytes")
        raw = self.STRUCT.pack(
            MAGIC0,
            MAGIC1,
            self.STRUCT.size,
            self.flags,
            self.index_offset,
            self.index_size,
            self.virtual_size,
            uuidmod.encode_field(self.uuid),
            uuidmod.encode_field(self.parent_uuid),
            self.reserved,
            self.version,
            self.sub_version,
            self.user_tag,
        )
        return raw + bytes(HT_SLOT - len(raw))

    @classmethod
    def unpack(
        cls, raw: bytes, *, path: str | None = None, offset: int = 0, what: str = "header"
    ) -> HeaderTrailer:
        if len(raw) < cls.STRUCT.size:
            raise CorruptError(f"truncated LSMT {what}", path=path, offset=offset)
        (m0, m1, _size, flags, ioff, isize, vsize, uid, puid, rsv, ver, sub, tag) = (
            cls.STRUCT.unpack_from(raw)
        )
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise CorruptError(f"not an LSMT {what} (bad magic)", path=path, offset=offset)
        return cls(
            flags=flags,
            index_offset=ioff,
            index_size=isize,
            virtual_size=vsize,
            uuid=uuidmod.decode_field(uid),
            parent_uuid=uuidmod.decode_field(puid),
            version=ver,
            sub_version=sub,
            user_tag=tag.rstrip(b"\0"),
            reserved=rsv,
        )

    def with_(self, **changes: object) -> HeaderTrailer:
        return replace(self, **changes)  # type: ignore[arg-type]


HT_OFF = HeaderTrailer.LAYOUT.offsets  # byte offset of each header/trailer field


def is_lsmt(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) is an LSMT header."""
    if len(head) < HeaderTrailer.STRUCT.size:
        return False
    if head[:8] != MAGIC0 or head[8:24] != MAGIC1:
        return False
    return bool(HeaderTrailer.LAYOUT.unpack_field(head, "flags") & FLAG_HEADER)  # type: ignore[operator]


# -- index entries (SegmentMapping, §1.4) ---------------------------------------------


@dataclass(slots=True)
class Mappings:
    """Parallel arrays of segment mappings (sectors), the bulk form of an index.

    ``pos`` is each entry's position in the file it was decoded from (for messages).
    """

    offset: np.ndarray  # uint64
    length: np.ndarray  # uint64
    moffset: np.ndarray  # uint64
    zeroed: np.ndarray  # bool
    tag: np.ndarray  # uint8
    pos: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offset)

    @classmethod
    def empty(cls) -> Mappings:
        z = np.zeros(0, dtype=np.uint64)
        return cls(z, z.copy(), z.copy(), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.uint8))

    @classmethod
    def from_lists(
        cls,
        offset: list[int],
        length: list[int],
        moffset: list[int],
        zeroed: list[bool],
        tag: list[int] | int = 0,
    ) -> Mappings:
        n = len(offset)
        tags = (
            np.full(n, tag, dtype=np.uint8)
            if isinstance(tag, int)
            else np.array(tag, dtype=np.uint8)
        )
        return cls(
            np.array(offset, dtype=np.uint64),
            np.array(length, dtype=np.uint64),
            np.array(moffset, dtype=np.uint64),
            np.array(zeroed, dtype=bool),
            tags,
        )

    def mend(self) -> np.ndarray:
        return np.where(self.zeroed, self.moffset, self.moffset + self.length)

    def end(self) -> np.ndarray:
        return self.offset + self.length

    def select(self, keep: np.ndarray) -> Mappings:
        return Mappings(
            self.offset[keep],
            self.length[keep],
            self.moffset[keep],
            self.zeroed[keep],
            self.tag[keep],
            None if self.pos is None else self.pos[keep],
        )


def decode_entries(raw: bytes | memoryview) -> Mappings:
    """Decode 16-byte entries in bulk (invalid padding entries included)."""
    n = len(raw) // ENTRY_SIZE
    words = np.frombuffer(raw, dtype="<u8", count=n * 2).reshape(n, 2)
    w0 = words[:, 0]
    w1 = words[:, 1]
    return Mappings(
        offset=w0 & np.uint64(_OFFSET_MASK),
        length=w0 >> np.uint64(50),
        moffset=w1 & np.uint64(_MOFFSET_MASK),
        zeroed=((w1 >> np.uint64(55)) & np.uint64(1)).astype(bool),
        tag=(w1 >> np.uint64(56)).astype(np.uint8),
        pos=np.arange(n, dtype=np.int64),
    )


def encode_entries(m: Mappings) -> bytes:
    words = np.empty((len(m), 2), dtype="<u8")
    words[:, 0] = (m.offset & np.uint64(_OFFSET_MASK)) | (m.length << np.uint64(50))
    words[:, 1] = (
        (m.moffset & np.uint64(_MOFFSET_MASK))
        | (m.zeroed.astype(np.uint64) << np.uint64(55))
        | (m.tag.astype(np.uint64) << np.uint64(56))
    )
    return words.tobytes()


def encode_entry(offset: int, length: int, moffset: int, zeroed: bool, tag: int = 0) -> bytes:
    return struct.pack("<QQ", offset | (length << 50), moffset | (int(zeroed) << 55) | (tag << 56))


INVALID_ENTRY = encode_entry(INVALID_OFFSET, 0, 0, False)


def drop_invalid(m: Mappings) -> Mappings:
    keep = m.offset != np.uint64(INVALID_OFFSET)
    out = m if bool(keep.all()) else m.select(keep)
    out.tag = np.zeros(len(out), dtype=np.uint8)
    return out


def validate_ro_index(
    m: Mappings,
    index_offset: int,
    *,
    path: str | None,
    entries_at: int | None = None,
    virtual_size: int | None = None,
) -> None:
    """Check order, overlap and moffset ranges of a read-only index (§1.5), and (with
    ``virtual_size``) that no entry maps past the end of the layer's disk.

    Upstream does not check the last rule, but its writers never break it (writes are
    bounded by the device size, and commit takes the size from the same header): an
    entry past the end is a damaged offset or length, and the range it should have
    mapped would read as zeros or as a lower layer's data. Refusing it is the only way
    not to return wrong bytes.
    """
    at = index_offset if entries_at is None else entries_at

    def num(i: int) -> int:  # the entry's number in the file (padding counted)
        return int(m.pos[i]) if m.pos is not None else i

    def where(i: int) -> int:
        return at + num(i) * ENTRY_SIZE

    n = len(m)
    if n == 0:
        return
    end = m.end()
    bad = np.nonzero(end[:-1] > m.offset[1:])[0]
    if len(bad):
        i = int(bad[0]) + 1
        raise CorruptError(
            f"index entry {num(i)} out of order or overlapping (offset {int(m.offset[i])} < previous end {int(end[i - 1])} sectors)",
            path=path,
            offset=where(i),
        )
    b = HT_SECTORS
    e = index_offset // SECTOR
    mend = m.mend()
    data_bad = (~m.zeroed) & ((m.moffset < b) | (m.moffset >= e) | (mend <= b) | (mend > e))
    zero_bad = m.zeroed & ((m.moffset < b) | (m.moffset > e))
    bad = np.nonzero(data_bad | zero_bad)[0]
    if len(bad):
        i = int(bad[0])
        raise CorruptError(
            f"index entry {num(i)} maps outside the data area (moffset {int(m.moffset[i])}, length {int(m.length[i])} sectors)",
            path=path,
            offset=where(i),
        )
    if virtual_size is not None:
        bad = np.nonzero((m.length > 0) & (end > np.uint64(sectors_of(virtual_size))))[0]
        if len(bad):
            i = int(bad[0])
            raise CorruptError(
                f"index entry {num(i)} maps past the virtual size (sectors [{int(m.offset[i])}, "
                f"{int(end[i])}) of a {virtual_size}-byte disk)",
                path=path,
                offset=where(i),
            )


def check_virtual_size(vsize: int, *, path: str | None, offset: int) -> None:
    """Refuse a ``virtual_size`` field (at file ``offset``) no index could address."""
    if vsize > MAX_VIRTUAL_SIZE:
        raise CorruptError(
            f"virtual size {vsize} is larger than an LSMT index can address ({MAX_VIRTUAL_SIZE})",
            path=path,
            offset=offset,
        )


def sectors_of(size: int) -> int:
    """Sectors a disk of ``size`` bytes spans (a partial last sector counts)."""
    return -(-size // SECTOR)


# -- lookups -----------------------------------------------------------------------

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


# -- read-only layer ---------------------------------------------------------------


class LSMTReadOnly:
    """A read-only LSMT layer (a commit output or a sealed writable data file).

    ``file`` is the ReadAt holding the LSMT bytes (a local file, a ZFile's payload...).
    Opening checks everything of §1.6, and (stricter than upstream, which no upstream
    file breaks) that header and trailer agree on the virtual size, that an index can
    address it, and that no entry maps past it: each is a CorruptError, never wrong
    bytes. ``pread`` reads the layer's own virtual disk (holes and zeroed segments as
    zeros).
    """

    def __init__(self, file: ReadAt, *, path: str | None = None) -> None:
        self.file = file
        self.path = path
        fsize = file.size()
        if fsize < 2 * HT_SLOT:
            raise CorruptError(f"too small to be an LSMT layer ({fsize} bytes)", path=path)
        self.header = HeaderTrailer.unpack(file.pread(0, HT_SLOT), path=path, what="header")
        if not self.header.is_header or not self.header.is_data_file:
            raise CorruptError(
                f"LSMT header flags 0x{self.header.flags:x} are not a data-file header",
                path=path,
                offset=HT_OFF["flags"],
            )
        toff = fsize - HT_SLOT
        self.trailer_offset = toff
        self.trailer = HeaderTrailer.unpack(
            file.pread(toff, HT_SLOT), path=path, offset=toff, what="trailer"
        )
        t = self.trailer
        if t.is_header or not t.is_data_file or not t.is_sealed:
            raise CorruptError(
                f"LSMT trailer flags 0x{t.flags:x} are not a sealed data-file trailer "
                "(a writable layer must be committed or sealed first)",
                path=path,
                offset=toff + HT_OFF["flags"],
            )
        check_virtual_size(t.virtual_size, path=path, offset=toff + HT_OFF["virtual_size"])
        if self.header.virtual_size != t.virtual_size:
            # writers copy it from one header to the other (§1.8, §2.4): one is damaged
            raise CorruptError(
                f"header and trailer disagree on the virtual size ({self.header.virtual_size}"
                f" vs {t.virtual_size})",
                path=path,
                offset=toff + HT_OFF["virtual_size"],
            )
        if t.index_size > MAX_RO_INDEX_SIZE:
            raise CorruptError(
                f"index has {t.index_size} entries, more than {MAX_RO_INDEX_SIZE}",
                path=path,
                offset=toff + HT_OFF["index_size"],
            )
        if t.index_offset > toff or t.index_size * ENTRY_SIZE > toff - t.index_offset:
            raise CorruptError(
                f"index ({t.index_size} entries at {t.index_offset}) runs past the trailer",
                path=path,
                offset=toff + HT_OFF["index_offset"],
            )
        if t.index_offset % SECTOR:
            raise CorruptError(
                f"index offset {t.index_offset} is not 512-aligned",
                path=path,
                offset=toff + HT_OFF["index_offset"],
            )
        raw = file.pread(t.index_offset, t.index_size * ENTRY_SIZE)
        if len(raw) != t.index_size * ENTRY_SIZE:
            raise CorruptError("index truncated", path=path, offset=t.index_offset)
        self.raw_entries = decode_entries(raw)
        m = drop_invalid(self.raw_entries)
        validate_ro_index(m, t.index_offset, path=path, virtual_size=t.virtual_size)
        self.mappings = m
        self.index = SegmentIndex(m)

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def uuid(self) -> str:
        return self.trailer.uuid

    @property
    def parent_uuid(self) -> str:
        return self.trailer.parent_uuid

    def size(self) -> int:
        return self.virtual_size

    def pread(self, offset: int, length: int) -> bytes:
        return read_view(self.index, [self.file], offset, length, self.virtual_size)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> LSMTReadOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunSource(Protocol):
    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]: ...


def read_view(index: RunSource, files: list[ReadAt], offset: int, length: int, vsize: int) -> bytes:
    """Read ``[offset, offset+length)`` of a virtual disk described by ``index``.

    ``files[tag]`` holds the data of segments with that tag. Any byte range is accepted;
    it is clipped at ``vsize``.
    """
    if offset >= vsize or length <= 0:
        return b""
    length = min(length, vsize - offset)
    end = offset + length
    s0 = offset // SECTOR
    s1 = -(-end // SECTOR)
    out = bytearray((s1 - s0) * SECTOR)
    for kind, sec, cnt, moff, tag in index.runs(s0, s1):
        if kind == RUN_DATA:
            want = cnt * SECTOR
            data = files[tag].pread(moff * SECTOR, want)
            dst = (sec - s0) * SECTOR
            out[dst : dst + len(data)] = data
    head = offset - s0 * SECTOR
    if head == 0 and len(out) == length:
        return bytes(out)
    return bytes(out[head : head + length])
