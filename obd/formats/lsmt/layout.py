"""LSMT byte layouts: header/trailer, index entries (SegmentMapping) (docs/formats.md §1.2-§1.5).

Names follow overlaybd: ``HeaderTrailer``, ``SegmentMapping``, ``index_offset``,
``index_size`` (a count of 16-byte entries), ``virtual_size``. Mapping fields are in
512-byte sectors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np

from obd.errors import CorruptError
from obd.formats import uuid as uuidmod
from obd.formats.layout import FlagBit, FlagNames, Layout

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

    is_header = FlagBit(FLAG_HEADER)
    is_data_file = FlagBit(FLAG_DATA)
    is_sealed = FlagBit(FLAG_SEALED)
    is_sparse = FlagBit(FLAG_SPARSE)

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

    @classmethod
    def unpack_or_none(cls, raw: bytes) -> HeaderTrailer | None:
        """The header or trailer in ``raw``, or None when it is none (short, bad magic)."""
        try:
            return cls.unpack(raw)
        except CorruptError:
            return None

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


def referenced_bytes(m: Mappings) -> int:
    """Bytes of the data area that data entries reference (overlaps counted once)."""
    keep = ~m.zeroed & (m.length > 0)
    if not keep.any():
        return 0
    s = m.moffset[keep].astype(np.int64)
    e = s + m.length[keep].astype(np.int64)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    prev_max = np.maximum.accumulate(e)
    start = s.copy()
    start[1:] = np.maximum(s[1:], prev_max[:-1])
    return int(np.clip(e - start, 0, None).sum()) * SECTOR
