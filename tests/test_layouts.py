"""Every byte layout is declared once; here it is checked against the spec's tables.

Offsets and sizes below are copied from FORMATS.md §1.2 (LSMT header/trailer) and §4.2
(ZFile header/trailer), not derived from the code.
"""

from __future__ import annotations

from obd.formats import lsmt
from obd.formats import zfile as zf
from obd.formats.layout import Layout, flag_names

LSMT_SPEC = {
    "magic0": 0,
    "magic1": 8,
    "size": 24,
    "flags": 28,
    "index_offset": 32,
    "index_size": 40,
    "virtual_size": 48,
    "uuid": 56,
    "parent_uuid": 93,
    "reserved": 130,
    "version": 132,
    "sub_version": 133,
    "user_tag": 134,
}
ZFILE_SPEC = {
    "magic0": 0,
    "magic1": 8,
    "size": 24,
    "digest": 28,
    "flags": 32,
    "index_offset": 40,
    "index_size": 48,
    "original_file_size": 56,
    "index_crc": 64,
    "reserved_0": 68,
    "block_size": 72,
    "algo": 76,
    "level": 77,
    "use_dict": 78,
    "padding": 79,
    "reserved": 80,
    "dict_size": 84,
    "verify": 88,
    "padding2": 89,
}


def test_lsmt_header_trailer_layout() -> None:
    lay = lsmt.HeaderTrailer.LAYOUT
    assert lay.struct.size == lsmt.HeaderTrailer.STRUCT.size == 390
    assert lay.offsets == LSMT_SPEC
    assert lsmt.HT_OFF is lay.offsets


def test_zfile_header_trailer_layout() -> None:
    assert zf.LAYOUT.struct.size == zf.HT_SIZE == 96
    assert zf.LAYOUT.offsets == ZFILE_SPEC


def test_fields_sit_where_the_layout_says() -> None:
    """A packed header holds each value at its declared offset (no hidden padding)."""
    ht = lsmt.HeaderTrailer(flags=0x07, index_offset=8192, index_size=3, virtual_size=1 << 30)
    raw = ht.pack()
    lay = lsmt.HeaderTrailer.LAYOUT
    assert lay.unpack_field(raw, "flags") == 0x07
    assert lay.unpack_field(raw, "index_offset") == 8192
    assert lay.unpack_field(raw, "index_size") == 3
    assert lay.unpack_field(raw, "virtual_size") == 1 << 30
    assert lay.unpack_field(raw, "size") == 390
    z = zf.HeaderTrailer(flags=0x16, index_offset=4096, block_size=65536, algo=2, verify=1)
    zraw = z.pack()
    assert zf.LAYOUT.unpack_field(zraw, "flags") == 0x16
    assert zf.LAYOUT.unpack_field(zraw, "block_size") == 65536
    assert zf.LAYOUT.unpack_field(zraw, "algo") == 2
    assert zf.LAYOUT.unpack_field(zraw, "verify") == 1


def test_layout_offsets_follow_the_codes() -> None:
    lay = Layout((("a", "B"), ("b", "Q"), ("c", "3s"), ("d", "H")))
    assert lay.offsets == {"a": 0, "b": 1, "c": 9, "d": 12}
    assert lay.size == 14


def test_flag_names() -> None:
    assert flag_names(0x07, lsmt.FLAG_NAMES, 0xFFFFFFFF) == ["header", "data", "sealed"]
    assert flag_names(0x13 | 0x40, zf.FLAG_NAMES, 0x3F) == ["header", "data", "digest"]
    assert flag_names(0x40 | 0x01, lsmt.FLAG_NAMES, 0xFFFFFFFF) == ["header", "bit6"]
