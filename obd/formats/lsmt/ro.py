"""Read-only LSMT layers: commit outputs and sealed files (FORMATS.md §1.6)."""

from __future__ import annotations

import numpy as np

from obd.errors import CorruptError
from obd.formats.lsmt.index import (
    SegmentIndex,
    read_view,
)
from obd.formats.lsmt.layout import (
    ENTRY_SIZE,
    HT_OFF,
    HT_SECTORS,
    HT_SLOT,
    MAX_RO_INDEX_SIZE,
    SECTOR,
    HeaderTrailer,
    Mappings,
    check_virtual_size,
    decode_entries,
    drop_invalid,
    sectors_of,
)
from obd.io.base import ReadAt


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
