"""Read-only LSMT layers: commit outputs and sealed files (docs/formats.md §1.5, §1.6).

:func:`validate_ro` yields every problem of a read-only layer; :class:`LSMTReadOnly`
raises the first corruption it finds (with ``deep=False``: the checks reads depend on),
``obd check`` reports them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from obd.formats import uuid as uuidmod
from obd.formats.lsmt.index import SegmentIndex, read_view
from obd.formats.lsmt.layout import (
    ENTRY_SIZE,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HT_OFF,
    HT_SECTORS,
    HT_SLOT,
    INVALID_OFFSET,
    MAX_RO_INDEX_SIZE,
    MAX_VIRTUAL_SIZE,
    SECTOR,
    HeaderTrailer,
    Mappings,
    decode_entries,
    drop_invalid,
    referenced_bytes,
    sectors_of,
)
from obd.formats.problem import CORRUPTION, LEAK, NOTE, WARNING, Problem, raise_first
from obd.io.base import ReadAt

# header and trailer of a read-only layer carry the same values (§1.8, §2.4)
SAME_IN_HEADER_AND_TRAILER = (
    "uuid",
    "parent_uuid",
    "virtual_size",
    "version",
    "sub_version",
    "user_tag",
)


def header_problems(
    raw: bytes, at: int, what: str, *, deep: bool = True
) -> tuple[HeaderTrailer | None, list[Problem]]:
    """Decode the header or trailer slot ``raw`` (at ``at``) and what is wrong with it
    on its own. ``None`` when it cannot be decoded (truncated, bad magic)."""
    code = f"lsmt_{what}"
    if len(raw) < HT_SLOT:
        return None, [Problem(CORRUPTION, code, f"LSMT {what} is truncated", at)]
    ht = HeaderTrailer.unpack_or_none(raw)
    if ht is None:
        return None, [Problem(CORRUPTION, code, f"LSMT {what} has a bad magic", at)]
    out: list[Problem] = []
    size = HeaderTrailer.LAYOUT.unpack_field(raw, "size")
    n = HeaderTrailer.STRUCT.size
    if ht.virtual_size > MAX_VIRTUAL_SIZE:
        out.append(Problem(
            CORRUPTION, code,
            f"LSMT {what} virtual size {ht.virtual_size} is larger than an LSMT index can "
            f"address ({MAX_VIRTUAL_SIZE})",
            at + HT_OFF["virtual_size"],
        ))  # fmt: skip
    if not deep:
        return ht, out
    if size != n:
        out.append(Problem(CORRUPTION, code, f"LSMT {what} size field is {size}, not {n}", at + HT_OFF["size"]))  # fmt: skip
    if any(raw[n:]):
        out.append(Problem(WARNING, code, f"LSMT {what} has non-zero bytes after its {n}-byte struct", at + n))  # fmt: skip
    if (ht.version, ht.sub_version) != (1, 1):
        out.append(Problem(
            WARNING, code, f"LSMT {what} version {ht.version}.{ht.sub_version} (writers use 1.1)",
            at + HT_OFF["version"],
        ))  # fmt: skip
    for name in ("uuid", "parent_uuid"):
        text = getattr(ht, name)
        if text and not uuidmod.is_valid(text):
            out.append(Problem(
                CORRUPTION, code, f"LSMT {what} {name} {text!r} is not a valid uuid",
                at + HT_OFF[name],
            ))  # fmt: skip
    return ht, out


def disagreements(
    a: HeaderTrailer,
    b: HeaderTrailer,
    names: tuple[str, ...],
    *,
    at: int,
    what: str,
    where_b: str = "",
    severity: str = CORRUPTION,
) -> Iterator[Problem]:
    """One problem per field of ``names`` on which ``a`` (at ``at``) and ``b`` differ."""
    for name in names:
        va, vb = getattr(a, name), getattr(b, name)
        same = va.upper() == vb.upper() if name in ("uuid", "parent_uuid") else va == vb
        if not same:
            # "the virtual size" is what the reader has always said (writers copy it)
            label = "the virtual size (virtual_size)" if name == "virtual_size" else name
            yield Problem(
                severity, "header_trailer_mismatch",
                f"{what} disagree on {label}: {va!r} vs {vb!r}{where_b}", at + HT_OFF[name],
            )  # fmt: skip


def padding_problems(raw: bytes, m: Mappings, at: int) -> Iterator[Problem]:
    """Entries with the padding offset must be all padding (§1.4)."""
    words = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    pad = m.offset == np.uint64(INVALID_OFFSET)
    for i in np.flatnonzero(pad & ((m.length != 0) | (words[:, 1] != 0))).tolist():
        yield Problem(
            CORRUPTION, "index_entry", f"index entry {i} has the padding offset but other fields set",
            at + i * ENTRY_SIZE,
        )  # fmt: skip


@dataclass
class RoFacts:
    """What :func:`validate_ro` decoded, for the reader and ``obd check``."""

    header: HeaderTrailer | None = None
    trailer: HeaderTrailer | None = None
    raw_entries: Mappings | None = None  # every on-disk entry, padding included
    mappings: Mappings | None = None  # the same (the reader drops the padding)
    valid_entries: int = 0


def validate_ro(
    view: ReadAt, facts: RoFacts | None = None, *, deep: bool = True
) -> Iterator[Problem]:
    """Every problem of the read-only layer in ``view`` (§1.5, §1.6), in file order.

    Past upstream (no upstream file breaks them): header and trailer agree on the virtual
    size, an index can address it, and no entry maps past it. ``deep`` adds what a read
    does not depend on: the size field, uuid texts, versions, the other header/trailer
    fields, padding entries, zero-length entries, stored data shared by two entries and
    data no entry references (a leak, or the garbage of a file sealed in place).
    """
    facts = facts if facts is not None else RoFacts()
    fsize = view.size()
    if fsize < 2 * HT_SLOT:
        yield Problem(
            CORRUPTION, "lsmt_header", f"too small to be an LSMT layer ({fsize} bytes)", 0
        )
        return
    if deep and fsize % SECTOR:
        yield Problem(WARNING, "lsmt_trailer", f"file size {fsize} is not a multiple of 512", fsize)
    h, found = header_problems(view.pread(0, HT_SLOT), 0, "header", deep=deep)
    yield from found
    if h is None and not deep:
        return
    if h is not None and (not h.flags & FLAG_HEADER or not h.flags & FLAG_DATA):
        yield Problem(
            CORRUPTION, "lsmt_header", f"LSMT header flags {h.flags:#x} are not a data-file header",
            HT_OFF["flags"],
        )  # fmt: skip
    toff = fsize - HT_SLOT
    t, found = header_problems(view.pread(toff, HT_SLOT), toff, "trailer", deep=deep)
    yield from found
    if t is None:
        return
    facts.header, facts.trailer = h, t
    if t.flags & FLAG_HEADER or not t.flags & FLAG_DATA or not t.flags & FLAG_SEALED:
        yield Problem(
            CORRUPTION, "lsmt_trailer",
            f"LSMT trailer flags {t.flags:#x} are not a sealed data-file trailer (a writable "
            "layer must be committed or sealed first)",
            toff + HT_OFF["flags"],
        )  # fmt: skip
    if h is not None:
        names = SAME_IN_HEADER_AND_TRAILER if deep else ("virtual_size",)
        yield from disagreements(h, t, names, at=0, what="header and trailer")
        if deep and h.flags & FLAG_SEALED and (h.index_offset or h.index_size):
            yield Problem(
                WARNING, "lsmt_header", "committed header carries index fields (writers leave them 0)",
                HT_OFF["index_offset"],
            )  # fmt: skip
    n, ioff = t.index_size, t.index_offset
    if n > MAX_RO_INDEX_SIZE:
        yield Problem(
            CORRUPTION, "index_bounds", f"index has {n} entries, more than {MAX_RO_INDEX_SIZE}",
            toff + HT_OFF["index_size"],
        )  # fmt: skip
        return
    if ioff % SECTOR or (deep and ioff < HT_SLOT) or ioff > toff or n * ENTRY_SIZE > toff - ioff:
        yield Problem(
            CORRUPTION, "index_bounds",
            f"index ({n} entries at offset {ioff}) does not fit between the header and the "
            f"trailer at {toff}" + (" or is not 512-aligned" if ioff % SECTOR else ""),
            toff + HT_OFF["index_offset"],
        )  # fmt: skip
        return
    raw = view.pread(ioff, n * ENTRY_SIZE)
    if len(raw) != n * ENTRY_SIZE:
        yield Problem(CORRUPTION, "index_bounds", "index is truncated", ioff + len(raw))
        return
    m = facts.raw_entries = facts.mappings = decode_entries(raw)
    if deep:
        yield from padding_problems(raw, m, ioff)
    valid = np.flatnonzero(m.offset != np.uint64(INVALID_OFFSET))
    facts.valid_entries = len(valid)
    vm = m if len(valid) == len(m) else m.select(valid)
    yield from entry_problems(vm, valid, ioff, t.virtual_size, deep=deep)
    if not deep:
        return
    area = ioff - HT_SLOT
    used = referenced_bytes(vm)
    if area > used and h is not None and not h.flags & FLAG_SEALED:
        # sealed in place (§2.4): the writable layer's garbage stays, as upstream's
        yield Problem(
            NOTE, "garbage",
            f"{area - used} bytes of the data area are overwritten data no longer referenced "
            "(sealed in place; a commit drops them)",
            HT_SLOT, area - used,
        )  # fmt: skip
    elif area > used:
        # a compacted commit copies referenced data only (§1.8): nothing explains these
        yield Problem(
            LEAK, "unreferenced",
            f"{area - used} bytes of the data area are not referenced by the index (a commit "
            "writes none)",
            HT_SLOT, area - used,
        )  # fmt: skip


def entry_problems(
    vm: Mappings, pos: np.ndarray, ioff: int, vsize: int, *, deep: bool = True
) -> Iterator[Problem]:
    """Order, overlap, moffset ranges (§1.5) and, past upstream, entries past the virtual
    size (what they should map would read wrong); ``deep`` adds zero-length entries and
    stored data shared by two entries. ``pos[i]`` is entry i's number in the file."""

    def at(i: int) -> int:
        return ioff + int(pos[i]) * ENTRY_SIZE

    off, ln, mo, ze = vm.offset, vm.length, vm.moffset, vm.zeroed  # uint64: no overflow here
    end = off + ln
    # sorted and disjoint (the usual case) is one comparison; only a broken index pays for
    # telling order from overlap
    if len(off) > 1 and bool((end[:-1] > off[1:]).any()):
        off, end = off.astype(np.int64), end.astype(np.int64)
        prev_end = np.maximum.accumulate(end)[:-1]
        for i in (np.flatnonzero(off[1:] < off[:-1]) + 1).tolist():
            yield Problem(
                CORRUPTION, "index_order",
                f"index entry {int(pos[i])} is out of order (offset {int(off[i])} < previous "
                f"offset {int(off[i - 1])} sectors)",
                at(i),
            )  # fmt: skip
        for i in (np.flatnonzero((off[1:] < prev_end) & (off[1:] >= off[:-1])) + 1).tolist():
            yield Problem(
                CORRUPTION, "index_overlap",
                f"index entry {int(pos[i])} overlaps an earlier entry (offset {int(off[i])} < "
                f"end {int(prev_end[i - 1])} sectors)",
                at(i),
            )  # fmt: skip
    b, e = HT_SECTORS, ioff // SECTOR
    mend = np.where(ze, mo, mo + ln)
    data_bad = (~ze) & ((mo < b) | (mo >= e) | (mend <= b) | (mend > e))
    zero_bad = ze & ((mo < b) | (mo > e))
    for i in np.flatnonzero(data_bad | zero_bad).tolist():
        yield Problem(
            CORRUPTION, "index_moffset",
            f"index entry {int(pos[i])} maps outside the data area [{b}, {e}) sectors "
            f"(moffset {int(mo[i])}, length {int(ln[i])}{', zeroed' if ze[i] else ''})",
            at(i),
        )  # fmt: skip
    if deep:
        for i in np.flatnonzero(ln == 0).tolist():
            yield Problem(WARNING, "index_entry", f"index entry {int(pos[i])} has length 0", at(i))
    for i in np.flatnonzero((ln > 0) & (end > sectors_of(vsize))).tolist():
        yield Problem(
            CORRUPTION, "index_entry",
            f"index entry {int(pos[i])} maps past the virtual size (sectors [{int(off[i])}, "
            f"{int(end[i])}) of a {vsize}-byte disk)",
            at(i),
        )  # fmt: skip
    data = np.flatnonzero(~ze & (ln > 0))
    if deep and len(data) > 1:
        order = data[np.argsort(mo[data], kind="stable")]
        s, f = mo[order], mo[order] + ln[order]
        prev = np.maximum.accumulate(f)[:-1]
        for k in (np.flatnonzero(s[1:] < prev) + 1).tolist():
            i = int(order[k])
            yield Problem(
                CORRUPTION, "index_shared",
                f"index entry {int(pos[i])} maps stored data another entry maps too "
                f"(moffset {int(mo[i])} sectors)",
                at(i),
            )  # fmt: skip


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
        facts = RoFacts()
        raise_first(validate_ro(file, facts, deep=False), path)
        assert facts.header is not None and facts.trailer is not None
        assert facts.raw_entries is not None and facts.mappings is not None
        self.header, self.trailer = facts.header, facts.trailer
        self.trailer_offset = file.size() - HT_SLOT
        self.raw_entries = facts.raw_entries
        self.mappings = m = drop_invalid(facts.mappings)
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
