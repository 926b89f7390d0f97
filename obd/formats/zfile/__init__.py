"""ZFile, overlaybd's seekable block compression (docs/formats.md §4, all of it).

Layout: a 512-byte header slot, optional dictionary (never used; unsupported here), one
stored record per ``block_size`` chunk of the plain file (compressed bytes, then a u32 raw
CRC32C seed 100007 when ``verify``), the u32 jump table of record lengths, and a 512-byte
trailer slot. :class:`HeaderTrailer` is the 96-byte structure at the start of both slots.
Modules: :mod:`.layout` (header/trailer, flags), :mod:`.reader`, :mod:`.writer`; their
names are importable from here.

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

import importlib
from typing import TYPE_CHECKING, Any

from obd.formats.zfile.layout import (
    _HT,
    DEFAULT_BLOCK_SIZE,
    FLAG_BITS,
    FLAG_DATA,
    FLAG_DIGEST,
    FLAG_HEADER,
    FLAG_HEADER_OVERWRITE,
    FLAG_INDEX_COMPRESSION,
    FLAG_NAMES,
    FLAG_SEALED,
    FLAGS_INITIAL_HEADER,
    FLAGS_OVERWRITTEN_HEADER,
    FLAGS_TRAILER,
    HT_OFF,
    HT_SIZE,
    INDEX_FIELDS,
    LAYOUT,
    MAGIC0,
    MAGIC1,
    MAX_BLOCK_SIZE,
    MAX_INDEX_SIZE,
    SHAPE_FIELDS,
    SLOT_SIZE,
    WRITER_BLOCK_SIZES,
    HeaderTrailer,
    Progress,
    is_zfile,
    slot_digest,
)

if TYPE_CHECKING:
    from obd.formats.zfile.reader import ZFileReader, decompress_to, verify_blocks
    from obd.formats.zfile.writer import ZFileWriter, compress_file

# The reader (and the validator) and the writer load on first use: ``obd zfile``
# compressing never needs the reader, and commands that only sniff a file need neither.
_LAZY = {
    "ZFileReader": "reader",
    "decompress_to": "reader",
    "verify_blocks": "reader",
    "ZFileWriter": "writer",
    "compress_file": "writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FLAGS_INITIAL_HEADER",
    "FLAGS_OVERWRITTEN_HEADER",
    "FLAGS_TRAILER",
    "FLAG_BITS",
    "FLAG_DATA",
    "FLAG_DIGEST",
    "FLAG_HEADER",
    "FLAG_HEADER_OVERWRITE",
    "FLAG_INDEX_COMPRESSION",
    "FLAG_NAMES",
    "FLAG_SEALED",
    "HT_OFF",
    "HT_SIZE",
    "INDEX_FIELDS",
    "LAYOUT",
    "MAGIC0",
    "MAGIC1",
    "MAX_BLOCK_SIZE",
    "MAX_INDEX_SIZE",
    "SHAPE_FIELDS",
    "SLOT_SIZE",
    "WRITER_BLOCK_SIZES",
    "_HT",
    "HeaderTrailer",
    "Progress",
    "ZFileReader",
    "ZFileWriter",
    "compress_file",
    "decompress_to",
    "is_zfile",
    "slot_digest",
    "verify_blocks",
]
