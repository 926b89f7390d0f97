"""LSMT layers (docs/formats.md §1, §2): byte layouts, lookups, read-only, writable, commit.

* :mod:`.layout`: ``HeaderTrailer``, index entries (``Mappings``), limits and flags;
* :mod:`.index`: runs over sorted segments, merged views (§3.2), the read dispatcher;
* :mod:`.ro`: :class:`LSMTReadOnly` and the validator ``obd check`` shares with it;
* :mod:`.rw`: writable layers (§2); :mod:`.commit`: compaction (§1.8).

The names of ``layout``, ``index`` and ``ro`` are importable from here.
"""

from __future__ import annotations

from obd.formats.lsmt.index import (
    RUN_DATA,
    RUN_HOLE,
    RUN_ZERO,
    RunSource,
    SegmentIndex,
    iter_runs,
    merge_layers,
    read_view,
)
from obd.formats.lsmt.layout import (
    ENTRY_SIZE,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_NAMES,
    FLAG_SEALED,
    FLAG_SPARSE,
    HT_OFF,
    HT_SECTORS,
    HT_SLOT,
    INVALID_ENTRY,
    INVALID_OFFSET,
    MAGIC0,
    MAGIC1,
    MAX_LAYERS,
    MAX_RO_INDEX_SIZE,
    MAX_RW_INDEX_RECORDS,
    MAX_SEGMENT_SECTORS,
    MAX_VIRTUAL_SIZE,
    SECTOR,
    HeaderTrailer,
    Mappings,
    check_virtual_size,
    decode_entries,
    drop_invalid,
    encode_entries,
    encode_entry,
    is_lsmt,
    referenced_bytes,
    sectors_of,
)
from obd.formats.lsmt.ro import (
    LSMTReadOnly,
    RoFacts,
    validate_ro,
)

__all__ = [
    "ENTRY_SIZE",
    "FLAG_DATA",
    "FLAG_HEADER",
    "FLAG_NAMES",
    "FLAG_SEALED",
    "FLAG_SPARSE",
    "HT_OFF",
    "HT_SECTORS",
    "HT_SLOT",
    "INVALID_ENTRY",
    "INVALID_OFFSET",
    "MAGIC0",
    "MAGIC1",
    "MAX_LAYERS",
    "MAX_RO_INDEX_SIZE",
    "MAX_RW_INDEX_RECORDS",
    "MAX_SEGMENT_SECTORS",
    "MAX_VIRTUAL_SIZE",
    "RUN_DATA",
    "RUN_HOLE",
    "RUN_ZERO",
    "SECTOR",
    "HeaderTrailer",
    "LSMTReadOnly",
    "Mappings",
    "RoFacts",
    "RunSource",
    "SegmentIndex",
    "check_virtual_size",
    "decode_entries",
    "drop_invalid",
    "encode_entries",
    "encode_entry",
    "is_lsmt",
    "iter_runs",
    "merge_layers",
    "read_view",
    "referenced_bytes",
    "sectors_of",
    "validate_ro",
]
