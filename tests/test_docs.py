"""docs/formats.md against the code: the layout tables cannot drift silently.

Every table marked ``<!-- layout: KEY -->`` lists ``offset | size | type | name |
meaning`` rows; each row must match the code's declaration of that structure (field
order, names, offsets, sizes and integer widths). The ``<!-- bits: ... -->`` table of the
LSMT index entry must match what ``encode_entry`` writes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import fields
from pathlib import Path

import pytest

from obd.formats import lsmt, zfile
from obd.formats.layout import Layout
from obd.serve.nbd import proto

DOC = Path(__file__).resolve().parent.parent / "docs" / "formats.md"

# doc type -> struct code (char[N] is N raw bytes)
_INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}

NBD_LAYOUTS = {
    "nbd.Handshake": proto.Handshake,
    "nbd.OptionHeader": proto.OptionHeader,
    "nbd.OptionReply": proto.OptionReply,
    "nbd.InfoExport": proto.InfoExport,
    "nbd.Request": proto.Request,
    "nbd.SimpleReply": proto.SimpleReply,
    "nbd.StructuredReply": proto.StructuredReply,
    "nbd.BlockDescriptor": proto.BlockDescriptor,
}
DISK_LAYOUTS: dict[str, Layout] = {
    "lsmt.HeaderTrailer": lsmt.HeaderTrailer.LAYOUT,
    "zfile.HeaderTrailer": zfile.LAYOUT,
}


def _tables(kind: str) -> dict[str, list[list[str]]]:
    """``{key: rows}`` of every table after a ``<!-- kind: key -->`` marker."""
    out: dict[str, list[list[str]]] = {}
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(rf"<!-- {kind}: (\S+) -->", line.strip())
        if not m:
            continue
        rows = []
        for row in lines[i + 3 :]:  # marker, header row, separator row
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        assert m.group(1) not in out, f"two tables for {m.group(1)}"
        out[m.group(1)] = rows
    return out


def _code(doc_type: str, size: int) -> str:
    if doc_type in _INT_CODES:
        return _INT_CODES[doc_type]
    m = re.fullmatch(r"char\[(\d+)\]", doc_type)
    assert m, f"unknown type {doc_type!r} in docs/formats.md"
    assert int(m.group(1)) == size, f"{doc_type} with size {size}"
    return f"{size}s"


def _rows(key: str) -> list[tuple[int, int, str, str]]:
    rows = _tables("layout").get(key)
    assert rows, f"docs/formats.md has no table for {key}"
    return [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]


def test_every_declared_layout_has_a_table() -> None:
    assert set(_tables("layout")) == set(NBD_LAYOUTS) | set(DISK_LAYOUTS)


@pytest.mark.parametrize("key", sorted(DISK_LAYOUTS))
def test_disk_layout_tables_match_the_code(key: str) -> None:
    layout = DISK_LAYOUTS[key]
    rows = _rows(key)
    assert [name for _, _, _, name in rows] == list(layout.names)
    for offset, size, doc_type, name in rows:
        code = dict(layout.fields)[name]
        assert offset == layout.offset(name), (key, name)
        assert size == struct.calcsize("<" + code), (key, name)
        assert struct.calcsize("<" + _code(doc_type, size)) == size
        assert _code(doc_type, size) == code, (key, name, doc_type, code)
    last = rows[-1]
    assert last[0] + last[1] == layout.size


def test_header_sizes_the_docs_state() -> None:
    assert lsmt.HeaderTrailer.LAYOUT.size == 390
    assert zfile.LAYOUT.size == zfile.HT_SIZE == 96


@pytest.mark.parametrize("key", sorted(NBD_LAYOUTS))
def test_nbd_layout_tables_match_the_code(key: str) -> None:
    cls = NBD_LAYOUTS[key]
    rows = _rows(key)
    assert [name for _, _, _, name in rows] == [f.name for f in fields(cls)]
    pos = 0
    codes = ""
    for offset, size, doc_type, name in rows:
        assert offset == pos, (key, name)
        code = _code(doc_type, size)
        assert struct.calcsize(">" + code) == size
        codes += code
        pos += size
    assert cls.STRUCT.format == ">" + codes
    assert cls.STRUCT.size == pos


def test_segment_mapping_bits_match_encode_entry() -> None:
    rows = _tables("bits")["lsmt.SegmentMapping"]
    args = {"offset": 0, "length": 0, "moffset": 0, "zeroed": False, "tag": 0}
    seen = set()
    for word, bits, width, name, _ in rows:
        lo, _, hi = bits.partition("-")
        first, last = int(lo), int(hi or lo)
        assert last - first + 1 == int(width), name
        value = {**args, name: True if name == "zeroed" else (1 << int(width)) - 1}
        w0, w1 = struct.unpack("<QQ", lsmt.encode_entry(**value))
        got = w0 if word == "w0" else w1
        other = w1 if word == "w0" else w0
        assert got == ((1 << int(width)) - 1) << first, name
        assert other == 0, name
        seen.add(name)
    assert seen == set(args)
    assert int(rows[0][2]) + int(rows[1][2]) == 64 == sum(int(r[2]) for r in rows[2:])
