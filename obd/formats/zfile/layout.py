"""ZFile byte layout: the header/trailer slot, flags, digests (docs/formats.md §4.2-§4.4)."""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from obd.errors import CorruptError
from obd.formats import crc
from obd.formats.layout import FlagBit, FlagNames, Layout

if TYPE_CHECKING:
    import numpy as np

#: a progress callback, given the plain bytes done since its last call
Progress = Callable[[int], Any]

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
assert array("I").itemsize == 4


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

    @property
    def magic_ok(self) -> bool:
        return self.magic0 == MAGIC0 and self.magic1 == MAGIC1

    # flag bits (0-4 only)
    is_header = FlagBit(FLAG_HEADER)
    is_data_file = FlagBit(FLAG_DATA)
    is_sealed = FlagBit(FLAG_SEALED)
    header_overwrite = FlagBit(FLAG_HEADER_OVERWRITE)
    digest_enabled = FlagBit(FLAG_DIGEST)


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
    import numpy as np  # only big jump tables need it (see _u32_array)

    return np.frombuffer(data, dtype="<u4")


def _u32_array(data: bytes | bytearray | memoryview) -> array:
    """A little-endian u32 table as an ``array('I')`` (a copy; no numpy)."""
    entries = array("I", data)
    if not _LITTLE:
        entries.byteswap()
    return entries


def _table_bytes(entries: array) -> bytes:
    if not _LITTLE:
        entries = array("I", entries)
        entries.byteswap()
    return entries.tobytes()
