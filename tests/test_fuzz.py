"""Fuzzing every reader (issue 8): truncated and bit-flipped layers through every command.

Every input (the upstream vectors when present, and small files obd makes itself, so the
test runs without ``../shared``) is cut at each header / index / trailer / jump-table /
tar boundary and a few bytes either side, and bit-flipped at many seeded places (half of
them inside those structures). Each mutant goes through ``inspect``, ``check``, ``map``,
``merge --raw``, ``zfile -x`` (the real command functions, in-process) and through
serving (``open_image`` and a read of the whole disk). What must hold:

* no traceback (``obd: internal error``, or an exception that is not an ``ObdError``),
  no hang (every run is timed), only the exit codes each command documents;
* a CRC-protected ZFile (and a layer or stack holding one) never gives a wrong byte
  with exit 0: every byte read is compared with the known-good disk (the manifest's
  digests, or obd's read of the intact file once it matches them);
* ``check`` never says clean (or leaks only) when a read gives wrong bytes that a
  checksum covers, nor when a reader refuses the file;
* the inputs are never modified (hashed before and after).

Plain LSMT layers and ZFiles without block CRCs have no checksum over their data or
index: a flip there can read wrong and still be a well-formed file. Those reads are
counted ("undetectable") and printed, not failed. A handful of mutants also go through
the real CLI in subprocesses, and a few are served by ``obd serve --nbd`` and read with
``nbdcopy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from commands.main import main as obd_main
from obd.errors import CorruptError, ObdError
from obd.formats import lsmt
from obd.formats import zfile as zf
from obd.formats.tar import TarView, is_tar
from obd.io.file import data_extents, open_file
from tests.conftest import run_obd
from tests.vectors import have_vectors, manifest, require_vectors, sha256_file

BLOCK = 4096  # granularity of the known-good disk
DELTAS = (-3, -1, 0, 1, 3)  # cuts around each boundary
FLIPS = 40  # seeded bit-flip mutants per file
SLOW = 10.0  # seconds: a run slower than this counts as a hang

# Exit codes each command documents (obd(1), obd-check(1)); anything else is a defect.
ALLOWED = {
    "inspect": {0, 4, 6},
    "check": {0, 1, 2, 3},
    "map": {0, 2, 4, 6},
    "merge": {0, 2, 4, 6},
    "zfile": {0, 4, 6},
}


# ------------------------------------------------------------------------ known-good disk

Pread = Callable[[int, int], bytes]


@dataclass
class GoodDisk:
    """The expected content of a virtual disk: its size and its non-zero 4 KiB blocks."""

    size: int
    blocks: dict[int, bytes]

    @classmethod
    def read(cls, pread: Pread, size: int, ranges: Iterable[tuple[int, int]]) -> GoodDisk:
        blocks: dict[int, bytes] = {}
        for b0, b1 in _block_runs(_blocks_of(ranges, size)):
            data = pread(b0 * BLOCK, min(b1 * BLOCK, size) - b0 * BLOCK)
            for b in range(b0, b1):
                chunk = data[(b - b0) * BLOCK : (b - b0 + 1) * BLOCK]
                if any(chunk):
                    blocks[b] = chunk
        return cls(size, blocks)

    @classmethod
    def of_bytes(cls, data: bytes) -> GoodDisk:
        return cls.read(lambda o, n: data[o : o + n], len(data), [(0, len(data))])

    def sha256(self) -> str:
        """Digest of the whole disk (zeros included), as the manifest gives it."""
        h = hashlib.sha256()
        zero = memoryview(bytes(8 << 20))
        pos = 0
        for b in sorted(self.blocks):
            _zeros(h, zero, b * BLOCK - pos)
            h.update(self.blocks[b])
            pos = b * BLOCK + len(self.blocks[b])
        _zeros(h, zero, self.size - pos)
        return h.hexdigest()

    def mismatch(
        self, pread: Pread, size: int, data_ranges: Iterable[tuple[int, int]]
    ) -> str | None:
        """None when a reader of ``size`` bytes gives this disk; else what differs.

        Read: every block that holds data here, and every block the reader says holds
        data (``data_ranges``), and its last block; everywhere else both are zeros (holes,
        zeroed ranges). A reader that fails raises (its error is the caller's business):
        a wrong size counts only when every read succeeds.
        """
        want = {b for b in self.blocks if b * BLOCK < size} | _blocks_of(data_ranges, size)
        if size:
            want.add((size - 1) // BLOCK)
        bad = None
        for b0, b1 in _block_runs(want):
            end = min(b1 * BLOCK, size)
            got = pread(b0 * BLOCK, end - b0 * BLOCK)
            if len(got) != end - b0 * BLOCK:
                return f"short read at {b0 * BLOCK}: {len(got)} of {end - b0 * BLOCK} bytes"
            exp = b"".join(self.blocks.get(b, bytes(BLOCK)) for b in range(b0, b1))
            cut = max(0, min(end, self.size) - b0 * BLOCK)
            if bad is None and got[:cut] != exp[:cut]:
                at = next(i for i, (x, y) in enumerate(zip(got, exp, strict=False)) if x != y)
                bad = f"wrong bytes at {b0 * BLOCK + at}"
        if bad is None and size != self.size:
            bad = f"size {size}, expected {self.size}"
        return bad


def _zeros(h: Any, zero: memoryview, n: int) -> None:
    while n > 0:
        k = min(n, len(zero))
        h.update(zero[:k])
        n -= k


def _blocks_of(ranges: Iterable[tuple[int, int]], size: int) -> set[int]:
    out: set[int] = set()
    for off, length in ranges:
        end = min(off + length, size)
        if end > off:
            out.update(range(off // BLOCK, -(-end // BLOCK)))
    return out


def _block_runs(blocks: set[int], most: int = 1024) -> Iterator[tuple[int, int]]:
    """Sorted blocks as ``[b0, b1)`` runs of at most ``most`` blocks."""
    run: list[int] = []
    for b in sorted(blocks):
        if run and (b != run[-1] + 1 or len(run) == most):
            yield run[0], run[-1] + 1
            run = []
        run.append(b)
    if run:
        yield run[0], run[-1] + 1


# -------------------------------------------------------------------------------- corpus


@dataclass
class Target:
    """Something obd reads: a layer file, a plain ZFile, a writable layer or a stack."""

    name: str
    kind: str  # "layer", "zfile", "rw", "stack", "other"
    files: list[Path]  # the files it is made of (a stack: bottom first; rw: data, index)
    subjects: list[Path]  # which of them get mutated
    good: GoodDisk | None = None  # the disk (layer, rw, stack) or plain content (zfile)
    payload_sha: str | None = None  # what `zfile -x` gives (ZFile kinds)


@dataclass
class Subject:
    """One file of a target to mutate, laid out in a work folder with its partners."""

    target: Target
    original: Path
    crc: bool  # the file is a ZFile with per-block CRCs: wrong bytes are never allowed
    layout: Layout  # cut points, structure regions (flip targets), fields to set
    payload_sha: str | None  # what `zfile -x` of the intact file gives (a ZFile)


def _layer_ranges(path: Path) -> list[tuple[int, int]]:
    """Where the virtual disk of a read-only layer holds data (from its index)."""
    from obd.image.layers import open_ro_layer

    with open_ro_layer(str(path)) as lay:
        m = lay.mappings
        return [
            (int(o) * 512, int(n) * 512)
            for o, n, z in zip(m.offset.tolist(), m.length.tolist(), m.zeroed.tolist(), strict=True)
            if not z
        ]


def _stack_good(config: Path) -> GoodDisk:
    from obd.image import open_image
    from obd.io.base import ExtentKind

    with open_image(str(config), readonly=True) as st:
        ranges = [(e.offset, e.length) for e in st.extents() if e.kind is ExtentKind.DATA]
        return GoodDisk.read(st.pread, st.size(), ranges)


def _config(
    folder: Path, name: str, lowers: list[Path], upper: tuple[Path, Path] | None = None
) -> Path:
    doc: dict[str, Any] = {"lowers": [{"file": str(p)} for p in lowers]}
    if upper is not None:
        doc["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def vector_targets(scratch: Path) -> list[Target]:
    """Every upstream vector (the known-good disk checked against the manifest)."""
    vec = require_vectors()
    out: list[Target] = []
    for v in manifest()["vectors"]:
        kind, f = v["kind"], v["files"]
        if kind in ("lsmt_ro", "lsmt_ro_zfile", "lsmt_sealed"):
            p = vec / f["layer"]
            t = Target(v["name"], "layer", [p], [p])
            payload = (v.get("zfile") or {}).get("decompressed_sha256")
            t.payload_sha = payload
        elif kind in ("zfile", "zfile_tar"):
            p = vec / f["zfile"]
            src = (vec / v["source"]).read_bytes()
            t = Target(v["name"], "zfile", [p], [p], GoodDisk.of_bytes(src), v["sha256"])
        elif kind in ("lsmt_rw", "lsmt_rw_sparse"):
            d, i = vec / f["data"], vec / f["index"]
            # the sparse layer's index file is empty and never read: nothing to mutate
            t = Target(v["name"], "rw", [d, i], [d] if kind == "lsmt_rw_sparse" else [d, i])
        elif kind == "lsmt_stack":
            layers = [vec / n for n in f["layers_bottom_to_top"]]
            t = Target(v["name"], "stack", layers, layers)
        else:  # pragma: no cover - a new kind of vector
            continue
        if t.good is None:
            t.good = _stack_good(_target_config(t, scratch))
            assert t.good.sha256() == v["sha256"], f"{v['name']}: obd's read differs"
        out.append(t)
    # a file that is no overlaybd file at all (a plain tar of an application layer)
    p = vec / "apply_layer.tar"
    if p.exists():
        out.append(Target("apply_layer", "other", [p], [p]))
    return out


def own_targets(folder: Path) -> list[Target]:
    """Small files obd makes itself (a writable layer, its commits, ZFiles, a stack)."""
    from obd.formats.tar import wrap
    from obd.image import ops
    from obd.image.layers import open_rw_layer

    rnd = random.Random(8)
    size = 2 << 20
    model = bytearray(size)
    d, i = folder / "own.data", folder / "own.index"
    ops.create(str(d), str(i), size, uuid="6f766c62-6400-4000-8000-0000000f0001")
    with open_rw_layer(str(d), str(i)) as lay:
        for k in range(40):
            off = rnd.randrange(0, size // 512 - 64) * 512
            n = rnd.randrange(1, 64) * 512
            if k % 7 == 6:
                lay.discard(off, n)
                model[off : off + n] = bytes(n)
            else:
                # half noise, half text: blocks of every compressibility
                data = rnd.randbytes(n // 2) + (b"obd fuzz %d " % k * n)[: n - n // 2]
                lay.pwrite(off, data)
                model[off : off + n] = data
        lay.flush()
    plain = folder / "own.lsmt"
    ops.commit(str(d), str(i), str(plain), uuid="6f766c62-6400-4000-8000-0000000f0002")
    zlayer = folder / "own_lz4.zfile"
    ops.commit(
        str(d),
        str(i),
        str(zlayer),
        uuid="6f766c62-6400-4000-8000-0000000f0002",  # its payload is own.lsmt, byte for byte
        zfile=ops.ZFileOptions(threads=1),
    )
    sealed_d, sealed_i = folder / "own_sealed.data", folder / "own_sealed.index"
    shutil.copy(d, sealed_d)
    shutil.copy(i, sealed_i)
    ops.seal(str(sealed_d), str(sealed_i))
    sealed_i.unlink()
    first = GoodDisk.of_bytes(bytes(model))  # the disk of the one-layer files
    payload = bytes(model[:300_001])
    src = folder / "own.bin"
    src.write_bytes(payload)
    zplain = folder / "own_zstd.zfile"
    with open_file(src) as s, open_file(zplain, writable=True, create=True) as o:
        zf.compress_file(s, o, algorithm="zstd", block_size=8192)
    znocrc = folder / "own_nocrc.zfile"
    with open_file(src) as s, open_file(znocrc, writable=True, create=True) as o:
        zf.compress_file(s, o, verify=False)
    ztar = folder / "own_zfile.tar"
    with open_file(zplain) as s, open_file(ztar, writable=True, create=True) as o:
        wrap(s, o)
    # a second layer on top of the plain one, compressed: a two-layer stack
    d2, i2 = folder / "own2.data", folder / "own2.index"
    ops.create(str(d2), str(i2), size, parent_uuid="6f766c62-6400-4000-8000-0000000f0002")
    with open_rw_layer(str(d2), str(i2)) as lay:
        for _ in range(10):
            off = rnd.randrange(0, size // 512 - 16) * 512
            data = rnd.randbytes(8192)
            lay.pwrite(off, data)
            model[off : off + 8192] = data
        lay.discard(0, 4096)
        model[0:4096] = bytes(4096)
        lay.flush()
    top = folder / "own_top.zfile"
    ops.commit(str(d2), str(i2), str(top), zfile=ops.ZFileOptions(algorithm="zstd", threads=1))
    d2.unlink()
    i2.unlink()
    disk = GoodDisk.of_bytes(bytes(model))
    plain_sha = sha256_file(plain)
    content, content_sha = GoodDisk.of_bytes(payload), sha256_file(src)
    targets = [
        Target("own_rw", "rw", [d, i], [d, i], first),
        Target("own_plain", "layer", [plain], [plain], first),
        Target("own_lz4", "layer", [zlayer], [zlayer], first, plain_sha),
        Target("own_sealed", "layer", [sealed_d], [sealed_d], first),
        Target("own_zstd", "zfile", [zplain], [zplain], content, content_sha),
        Target("own_nocrc", "zfile", [znocrc], [znocrc], content, content_sha),
        Target("own_tar", "zfile", [ztar], [ztar], content, content_sha),
        Target("own_stack", "stack", [plain, top], [plain, top], disk),
    ]
    # obd's reads of the intact files give the model (the reference here)
    for t in targets:
        if t.kind in ("layer", "rw", "stack"):
            got = _stack_good(_target_config(t, folder))
            assert got == t.good, f"{t.name}: obd's read differs from the model"
    return targets


def _target_config(t: Target, folder: Path, files: list[Path] | None = None) -> Path:
    files = files or t.files
    if t.kind == "rw":
        return _config(folder, t.name, [], (files[0], files[1]))
    return _config(folder, t.name, files)


# ------------------------------------------------------------------------ structure map

Fix = Callable[[bytearray], None]  # re-seals a checksum after a field was changed


@dataclass
class Field:
    """An integer field of a structure: a mutation sets it, then ``fixes`` re-seal the
    checksums over it (so the mutant gets past the digest and into the deeper checks)."""

    name: str
    offset: int
    width: int  # bytes, little-endian; 0 for a 16-byte LSMT entry (see ``part``)
    fixes: list[Fix] = field(default_factory=list)
    part: str = ""  # of an LSMT entry: "offset", "length", "moffset", "zeroed", "tag"


@dataclass
class Layout:
    cuts: set[int] = field(default_factory=set)
    regions: list[tuple[int, int]] = field(default_factory=list)
    fields: list[Field] = field(default_factory=list)
    texts: list[tuple[str, int, bytes, Fix | None]] = field(default_factory=list)


def _zslot_fix(at: int) -> Fix:
    """Recompute the digest of the ZFile slot at ``at`` (when its digest bit is set)."""

    def fix(data: bytearray) -> None:
        slot = data[at : at + zf.SLOT_SIZE]
        if len(slot) == zf.SLOT_SIZE and zf.HeaderTrailer.unpack(slot).digest_enabled:
            struct.pack_into("<I", data, at + 28, zf.slot_digest(slot))

    return fix


def _index_crc_fix(table_at: int, n: int, slots: list[int]) -> Fix:
    """Recompute ``index_crc`` of a jump table in the slots that carry it."""
    from obd.formats import crc

    def fix(data: bytearray) -> None:
        value = crc.raw(bytes(data[table_at : table_at + 4 * n]), 0)
        for at in slots:
            struct.pack_into("<I", data, at + 64, value)
            _zslot_fix(at)(data)

    return fix


def _tar_fix(at: int) -> Fix:
    def fix(data: bytearray) -> None:
        block = data[at : at + 512]
        block[148:156] = b" " * 8
        data[at + 148 : at + 156] = b"%6o \0" % sum(block)

    return fix


_ZFIELDS = (
    ("flags", 32, 8),
    ("index_offset", 40, 8),
    ("index_size", 48, 8),
    ("original_file_size", 56, 8),
    ("block_size", 72, 4),
    ("algo", 76, 1),
    ("dict_size", 84, 4),
    ("verify", 88, 1),
)
_LFIELDS = (("flags", 28, 4), ("index_offset", 32, 8), ("index_size", 40, 8), ("vsize", 48, 8))


def structure(path: Path) -> Layout:
    """Boundaries (cut points), structure regions (flip targets) and the integer fields of
    an intact file's headers, trailers, jump tables and indexes (field mutations)."""
    raw_size = path.stat().st_size
    lay = Layout(cuts={0, raw_size})
    with open_file(path) as f:
        base = 0
        view: Any = f
        if is_tar(f.pread(0, 512)):
            tv = TarView(f)
            base = tv.offset
            lay.cuts |= {512, 1024, base, base + tv.size(), base + tv.size() + 512}
            lay.regions.append((0, base))
            view = tv
            pax = base > 512
            lay.texts.append(("tar size", 124, b"%11o " % 0, _tar_fix(0)))
            if pax:
                lay.texts.append(("pax record", 512, b"", None))
                lay.texts.append(("tar member size", 1024 + 124, b"", _tar_fix(1024)))
        size = view.size()
        head = view.pread(0, 4096)
        if zf.is_zfile(head):
            _zfile_layout(view, base, size, lay)
        elif lsmt.is_lsmt(head):
            _lsmt_layout(view, size, lay)
    lay.cuts = {c for c in lay.cuts if 0 <= c <= raw_size}
    lay.regions = [(a, b) for a, b in lay.regions if b > a]
    return lay


def _zfile_layout(view: Any, base: int, size: int, lay: Layout) -> None:
    z = zf.ZFileReader(view, cache_blocks=0)
    offs = z.offsets.tolist()
    ioff, n, tail = base + z.index_offset, z.nblocks, base + size - zf.SLOT_SIZE
    lay.cuts |= {base + zf.HT_SIZE, base + zf.SLOT_SIZE, ioff, ioff + 4 * n}
    lay.cuts |= {tail, tail + zf.HT_SIZE} | {base + x for x in offs[:3] + offs[-3:]}
    lay.regions += [(base, base + zf.SLOT_SIZE), (ioff, ioff + 4 * n), (tail, tail + zf.SLOT_SIZE)]
    slots = [base, tail]
    for at in slots:
        for name, off, width in _ZFIELDS:
            lay.fields.append(Field(f"zfile {name}@{at - base}", at + off, width, [_zslot_fix(at)]))
    crc_slots = [tail] + ([base] if z.header.header_overwrite else [])
    for k in sorted({0, n // 2, n - 1}):
        if 0 <= k < n:
            fix = _index_crc_fix(ioff, n, crc_slots)
            lay.fields.append(Field(f"jump table [{k}]", ioff + 4 * k, 4, [fix]))


def _lsmt_layout(view: Any, size: int, lay: Layout) -> None:
    h = lsmt.HeaderTrailer.unpack(view.pread(0, lsmt.HT_SLOT))
    lay.cuts |= {lsmt.HeaderTrailer.STRUCT.size, lsmt.HT_SLOT}
    lay.regions.append((0, lsmt.HT_SLOT))
    lay.fields += [Field(f"lsmt header {n}", o, w) for n, o, w in _LFIELDS]
    t = None
    if size >= 2 * lsmt.HT_SLOT:
        with contextlib.suppress(CorruptError):
            t = lsmt.HeaderTrailer.unpack(view.pread(size - lsmt.HT_SLOT, lsmt.HT_SLOT))
    entries: list[int] = []
    if t is not None and not t.is_header:  # a read-only layer (committed or sealed)
        ioff, n, toff = t.index_offset, t.index_size, size - lsmt.HT_SLOT
        lay.cuts |= {ioff, ioff + 16 * n, toff, toff + 390}
        lay.regions += [(ioff, ioff + 16 * n), (toff, size)]
        lay.fields += [Field(f"lsmt trailer {n}", toff + o, w) for n, o, w in _LFIELDS]
        m = lsmt.decode_entries(view.pread(ioff, 16 * n))
        valid = [i for i in range(n) if int(m.offset[i]) != lsmt.INVALID_OFFSET]
        data = [int(m.moffset[i]) * 512 for i in valid if not m.zeroed[i]]
        lay.cuts |= set(data[:2] + data[-2:])
        some = {*valid[:1], *valid[len(valid) // 2 :][:1], *valid[-1:]}  # first, middle, last
        entries = [ioff + 16 * i for i in sorted(some)]
    elif not h.is_data_file:  # a writable index file: records of 16 bytes
        n = (size - lsmt.HT_SLOT) // 16
        lay.cuts |= {lsmt.HT_SLOT + 16 * k for k in (1, 2, n - 1, n) if 0 < k <= n}
        lay.regions.append((lsmt.HT_SLOT, size))
        entries = [lsmt.HT_SLOT + 16 * k for k in sorted({0, n // 2, n - 1}) if 0 <= k < n]
    # a writable data file: its header, then appended data (cut at its end above)
    for at in entries:
        for part in ("offset", "length", "moffset", "zeroed"):
            lay.fields.append(Field(f"entry@{at} {part}", at, 0, part=part))


def subjects_of(t: Target) -> list[Subject]:
    out = []
    for p in t.subjects:
        crc, payload = _zfile_facts(p)
        if len(t.files) == 1 or payload is None:
            payload = t.payload_sha if t.payload_sha is not None else payload
        out.append(Subject(t, p, crc, structure(p), payload))
    return out


def _zfile_facts(path: Path) -> tuple[bool, str | None]:
    """(has block CRCs, sha256 of the payload) of an intact ZFile; (False, None) else.

    The payload digest comes from obd's own read: it is used only for files whose disk
    (a layer of a stack) was checked against the manifest or the model.
    """
    from obd.formats.sniff import open_zfile

    try:
        with open_file(path) as f, open_zfile(f) as z:
            return z.verify, hashlib.sha256(z.pread(0, z.size())).hexdigest()
    except CorruptError:
        return False, None


# ----------------------------------------------------------------------------- mutants


@dataclass
class Mutant:
    what: str  # "intact", "cut 4096", "flip 1234.5 ...", "set <field> = <value>"
    data: bytes


_ENTRY_BITS = {"offset": (0, 50), "length": (50, 14), "moffset": (64, 55), "zeroed": (119, 1)}


def _values(old: int, bits: int, rnd: random.Random) -> list[int]:
    top = (1 << bits) - 1
    vals = {0, top, (old + 1) & top, old ^ (1 << (bits - 1))}
    vals.add(rnd.getrandbits(bits))
    vals.discard(old)
    return sorted(vals)


def _set_field(data: bytearray, f: Field, rnd: random.Random) -> Iterator[tuple[str, bytes]]:
    if f.part:
        lo, bits = _ENTRY_BITS[f.part]
        word = int.from_bytes(data[f.offset : f.offset + 16], "little")
        old = (word >> lo) & ((1 << bits) - 1)
        for v in _values(old, bits, rnd):
            new = word & ~(((1 << bits) - 1) << lo) | (v << lo)
            out = bytearray(data)
            out[f.offset : f.offset + 16] = new.to_bytes(16, "little")
            yield f"{v:#x}", bytes(out)
        return
    old = int.from_bytes(data[f.offset : f.offset + f.width], "little")
    for v in _values(old, 8 * f.width, rnd):
        out = bytearray(data)
        out[f.offset : f.offset + f.width] = v.to_bytes(f.width, "little")
        for fix in f.fixes:
            fix(out)
        yield f"{v:#x}", bytes(out)


_TEXTS = (b"77777777777 ", b"-1", b"abc", b"0", b"99999999999999999999999999")


def _set_text(data: bytearray, name: str, at: int, fix: Fix | None) -> Iterator[tuple[str, bytes]]:
    """Tar numbers and the pax ``size=`` record, set to extremes and junk."""
    for text in _TEXTS:
        out = bytearray(data)
        if name == "pax record":
            rec = b" size=" + text.strip() + b"\n"
            rec = str(len(rec) + 3).encode() + rec
            out[at : at + 512] = rec + bytes(512 - len(rec))
        else:
            out[at : at + 12] = (text + b" " * 12)[:12]
        if fix is not None:
            fix(out)
        yield text.decode(), bytes(out)


def mutants(s: Subject, flips: int = FLIPS) -> Iterator[Mutant]:
    raw = s.original.read_bytes()
    n = len(raw)
    yield Mutant("intact", raw)
    cuts = sorted({c + d for c in s.layout.cuts for d in DELTAS if 0 <= c + d < n})
    for c in cuts:
        yield Mutant(f"cut {c}", raw[:c])
    rnd = random.Random(f"fuzz:{s.target.name}:{s.original.name}")
    for f in s.layout.fields:
        for v, data in _set_field(bytearray(raw), f, rnd):
            yield Mutant(f"set {f.name} = {v}", data)
    for name, at, _, fix in s.layout.texts:
        for v, data in _set_text(bytearray(raw), name, at, fix):
            yield Mutant(f"set {name} = {v}", data)
    regions = s.layout.regions
    for _ in range(flips):
        data = bytearray(raw)
        where = []
        for _ in range(1 if rnd.random() < 0.7 else rnd.randint(2, 4)):
            if regions and rnd.random() < 0.5:
                a, b = rnd.choice(regions)
                off = rnd.randrange(a, b)
            else:
                off = rnd.randrange(n)
            bit = rnd.randrange(8)
            data[off] ^= 1 << bit
            where.append(f"{off}.{bit}")
        yield Mutant("flip " + " ".join(where), bytes(data))


# ------------------------------------------------------------------------------ running


@dataclass
class Tally:
    mutants: int = 0
    runs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    undetectable: int = 0  # wrong bytes, exit 0, no checksum covers them (plain files)
    undetectable_clean: int = 0  # ... of which check said clean
    stricter: int = 0  # check says corrupt, yet every read gave the right bytes
    defects: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")

    def defect(self, where: str, what: str) -> None:
        self.defects.append(f"{where}: {what}")

    def summary(self, label: str, seconds: float) -> str:
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.codes.items()))
        return (
            f"fuzz[{label}]: {self.mutants} mutants, {self.runs} runs, "
            f"{len(self.defects)} defects, {self.undetectable} undetectable wrong reads "
            f"(no checksum; check clean on {self.undetectable_clean}), {self.stricter} "
            f"check-stricter, {seconds:.1f} s; "
            f"slowest run {self.slowest[0]:.2f} s ({self.slowest[1]}); exit codes: {codes}"
        )


def cli(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``obd ARGS`` in-process, exactly as the command line runs it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            obd_main([os.fspath(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


class Runner:
    """Runs every command on the mutants of one subject, in a work folder."""

    def __init__(
        self,
        s: Subject,
        work: Path,
        tally: Tally,
        cli: Callable[..., tuple[int, str, str]] = cli,
    ) -> None:
        self.s = s
        self.t = s.target
        self.tally = tally
        self.cli = cli
        self.dir = work / f"{self.t.name}.{s.original.name}"
        self.dir.mkdir()
        self.out = work / "out"
        self.out.mkdir(exist_ok=True)
        # the target's files, copied under their own names (X.data finds X.index)
        self.files = []
        for p in self.t.files:
            q = self.dir / p.name
            shutil.copyfile(p, q)
            self.files.append(q)
        self.path = self.dir / s.original.name
        self.partners = {p: p.read_bytes() for p in self.files if p != self.path}
        self.config = _target_config(self.t, self.dir, self.files)
        self.where = ""

    def unchanged(self, m: Mutant) -> bool:
        """Every input still holds what was written before the runs (byte for byte)."""
        return all(
            p.read_bytes() == (m.data if p == self.path else self.partners[p]) for p in self.files
        )

    def run(self, m: Mutant) -> None:
        self.path.write_bytes(m.data)
        self.where = f"{self.t.name}/{self.s.original.name} [{m.what}]"
        self.tally.mutants += 1
        crc = self.s.crc
        wrong: list[str] = []  # reads that gave wrong bytes with exit 0
        refused: list[str] = []  # readers that refused the file (corrupt)
        main_file = self.files[0] if self.t.kind == "rw" else self.path
        whole = self.config if self.t.kind in ("rw", "stack") else main_file

        code, _, _ = self.cmd("inspect", "--json", self.path)
        code, out, _ = self.cmd("check", "--json", "--threads", "1", whole)
        check_code = code
        if code in ALLOWED["check"] and out.strip():
            doc = json.loads(out)
            if doc["exit_code"] != code:
                self.defect(f"check --json says exit_code {doc['exit_code']} but exits {code}")
        self.cmd("map", "--json", whole)

        raw = self.out / "disk.raw"
        args = ("--raw", whole, raw) if whole == self.config else ("--raw", "-o", raw, whole)
        code, _, err = self.cmd("merge", *args)
        disk = self.t.kind in ("layer", "rw", "stack")  # a virtual disk to merge
        if code == 0:
            bad = self.file_mismatch(raw, self.t.good) if disk and self.t.good else "not a disk"
            if bad:
                wrong.append(f"merge --raw: {bad}")
        elif code == 4 and disk:
            refused.append("merge --raw: " + err.strip())
        with contextlib.suppress(FileNotFoundError):
            raw.unlink()

        x = self.out / "x.out"
        code, _, err = self.cmd("zfile", "-x", "--threads", "1", self.path, x)
        if code == 0:
            sha = sha256_file(x)
            if self.s.payload_sha is None or sha != self.s.payload_sha:
                wrong.append(f"zfile -x: output sha256 {sha[:12]}")
        elif code == 4 and self.s.payload_sha is not None:
            refused.append("zfile -x: " + err.strip())
        with contextlib.suppress(FileNotFoundError):
            x.unlink()

        bad, why = self.serve()
        if bad:
            wrong.append(f"serve: {bad}")
        elif why:
            refused.append(f"serve: {why}")

        if not self.unchanged(m):
            self.defect("an input file was modified")
        self.judge(m, crc, check_code, wrong, refused)

    def judge(
        self, m: Mutant, crc: bool, check_code: int, wrong: list[str], refused: list[str]
    ) -> None:
        if m.what == "intact" and self.t.kind != "other":
            if wrong or refused or check_code != 0:
                self.defect(f"the intact file fails: check {check_code}, {wrong + refused}")
            return
        if wrong and crc:
            self.defect(f"wrong bytes with exit 0 from a CRC-protected ZFile: {wrong}")
        elif wrong:
            self.tally.undetectable += 1
            self.tally.undetectable_clean += check_code == 0
        if check_code in (0, 3) and refused:
            self.defect(f"check exits {check_code} but a reader refuses: {refused[0]}")
        if check_code == 2 and not wrong and not refused:
            self.tally.stricter += 1

    def cmd(self, name: str, *args: Any) -> tuple[int, str, str]:
        t0 = time.monotonic()
        code, out, err = self.cli(name, *args)
        self.timed(time.monotonic() - t0, name)
        self.tally.codes[f"{name}:{code}"] += 1
        if "internal error" in err or "Traceback" in err:
            _, _, trace = self.cli("--debug", name, *args)
            self.defect(f"obd {name}: {err.strip()}\n{trace}")
        elif code not in ALLOWED[name]:
            allowed = sorted(ALLOWED[name])
            self.defect(f"obd {name} exits {code}, not one of {allowed}: {err.strip()}")
        elif name == "check":
            # every problem of a file is a finding (stdout); an error line on stderr is a
            # failure of the command itself (e.g. an OSError of a reader)
            if "obd: error" in err:
                self.defect(f"obd check failed instead of reporting: {err.strip()}")
        elif code != 0:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            if len(lines) != 1 or not lines[0].startswith("obd: error: "):
                self.defect(f"obd {name} exits {code} without one error line: {err!r}")
        return code, out, err

    def timed(self, seconds: float, what: str) -> None:
        self.tally.runs += 1
        if seconds > self.tally.slowest[0]:
            self.tally.slowest = (seconds, f"{what} {self.where}")
        if seconds > SLOW:
            self.defect(f"{what} took {seconds:.1f} s")

    def defect(self, what: str) -> None:
        self.tally.defect(self.where, what)

    def file_mismatch(self, path: Path, good: GoodDisk) -> str | None:
        with open_file(path) as f:
            ranges = [(a, b - a) for a, b in data_extents(f.fd, 0, f.size())]
            return good.mismatch(f.pread, f.size(), ranges)

    def serve(self) -> tuple[str | None, str | None]:
        """Open the mutant as the server does and read its whole disk: (wrong, refused)."""
        from obd.formats.sniff import open_zfile
        from obd.image import open_image
        from obd.io.base import ExtentKind

        t0 = time.monotonic()
        try:
            if self.t.kind in ("zfile", "other"):
                with open_file(self.path) as f, open_zfile(f) as z:
                    size = z.size()
                    if self.t.good is None:
                        z.pread(0, size)
                        return "a file that is no ZFile read as one", None
                    return self.t.good.mismatch(z.pread, size, [(0, size)]), None
            with open_image(str(self.config), readonly=True) as st:
                ext = [(e.offset, e.length) for e in st.extents() if e.kind is ExtentKind.DATA]
                assert self.t.good is not None
                return self.t.good.mismatch(st.pread, st.size(), ext), None
        except ObdError as e:
            return None, str(e)
        except Exception as e:
            import traceback

            self.defect(f"serve: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return None, None
        finally:
            self.tally.codes["serve"] += 1
            self.timed(time.monotonic() - t0, "serve")


def fuzz(targets: list[Target], work: Path, flips: int = FLIPS) -> Tally:
    tally = Tally()
    for t in targets:
        for s in subjects_of(t):
            r = Runner(s, work, tally)
            for m in mutants(s, flips):
                r.run(m)
    return tally


@contextlib.contextmanager
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder on tmpfs when there is one (outputs are fsynced: cheap there)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="obd-fuzz-", dir=base or tmp_path))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def report(tally: Tally, label: str, seconds: float) -> None:
    print(tally.summary(label, seconds))
    for d in tally.defects[:20]:
        print("DEFECT", d)
    assert not tally.defects, f"{len(tally.defects)} defects, first: {tally.defects[0]}"


# --------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> list[Target]:
    return own_targets(tmp_path_factory.mktemp("own"))


@pytest.mark.timeout(300)
def test_fuzz_own_files(own: list[Target], tmp_path: Path) -> None:
    """obd's own small files: runs even without the upstream vectors."""
    t0 = time.monotonic()
    with workdir(tmp_path) as work:
        tally = fuzz(own, work)
    report(tally, "own files", time.monotonic() - t0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_vectors(tmp_path: Path) -> None:
    """Every upstream vector."""
    if not have_vectors():
        pytest.skip(
            "upstream reference vectors not found (set OBD_VECTORS); obd's own files are "
            "fuzzed by test_fuzz_own_files"
        )
    t0 = time.monotonic()
    with workdir(tmp_path) as work:
        targets = vector_targets(work)
        tally = fuzz(targets, work)
    report(tally, "vectors", time.monotonic() - t0)


def _pick(targets: list[Target], name: str, file: str | None = None) -> Subject:
    (t,) = [t for t in targets if t.name == name]
    return next(s for s in subjects_of(t) if file is None or s.original.name == file)


def _block_flip(s: Subject) -> Mutant:
    """One bit flipped in the middle of the first block's stored bytes of a ZFile."""
    raw = bytearray(s.original.read_bytes())
    with open_file(s.original) as f, zf.ZFileReader(f, cache_blocks=0) as z:
        off = int(z.offsets[0]) + int(z.lengths[0]) // 2
    raw[off] ^= 0x10
    return Mutant(f"flip {off}.4 (block 0)", bytes(raw))


def _some(s: Subject, *prefixes: str) -> list[Mutant]:
    """The first mutant of ``s`` whose description starts with each prefix."""
    out = []
    for p in prefixes:
        out.append(next(m for m in mutants(s) if m.what.startswith(p)))
    return out


def test_harness_catches_a_silent_change(own: list[Target], tmp_path: Path) -> None:
    """The test can fail: a valid ZFile holding other content (one byte changed, then
    compressed again, CRCs and all) read with exit 0 is reported as a defect."""
    s = _pick(own, "own_zstd")
    assert s.crc and s.target.good is not None
    plain = bytearray(s.target.good.size)
    for b, chunk in s.target.good.blocks.items():
        plain[b * BLOCK : b * BLOCK + len(chunk)] = chunk
    plain[123_456] ^= 1
    other = tmp_path / "other.zfile"
    with open_file(other, writable=True, create=True) as o:
        w = zf.ZFileWriter(o, algorithm="zstd", block_size=8192)
        w.write(bytes(plain))
        w.close()
    tally = Tally()
    with workdir(tmp_path) as work:
        Runner(s, work, tally).run(Mutant("silent change", other.read_bytes()))
    assert tally.codes["check:0"] == 1, tally.codes
    assert any("wrong bytes with exit 0 from a CRC-protected ZFile" in d for d in tally.defects)


def sub_cli(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    r = run_obd(*args, timeout=60)
    return r.code, r.out, r.err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_real_cli(own: list[Target], tmp_path: Path) -> None:
    """A handful of mutants through the real ``obd`` in subprocesses: the same exit codes
    as the in-process runs, one error line, no traceback, the same invariants."""
    picks: list[tuple[Subject, list[Mutant]]] = []
    s = _pick(own, "own_lz4")
    picks.append((s, [*_some(s, "intact", "cut", "set zfile original_file_size"), _block_flip(s)]))
    s = _pick(own, "own_rw", "own.index")
    picks.append((s, _some(s, "cut 4097", "set entry")))
    s = _pick(own, "own_tar")
    picks.append((s, _some(s, "set pax record = -1", "set tar size = 99")))
    s = _pick(own, "own_sealed")
    picks.append((s, _some(s, "set lsmt trailer vsize = 0xffff")))
    t0 = time.monotonic()
    real, here = Tally(), Tally()
    with workdir(tmp_path) as work:
        for s, ms in picks:
            (work / "real").mkdir(exist_ok=True)
            (work / "here").mkdir(exist_ok=True)
            r1, r2 = Runner(s, work / "real", real, sub_cli), Runner(s, work / "here", here)
            for m in ms:
                r1.run(m)
                r2.run(m)
    report(real, "real CLI", time.monotonic() - t0)
    assert real.codes == here.codes, (real.codes, here.codes)
    assert real.mutants == 9


@pytest.mark.timeout(300)
def test_fuzz_served_over_nbd(own: list[Target], tmp_path: Path) -> None:
    """A few mutants served by ``obd serve --nbd`` and read with ``nbdcopy``: a CRC
    failure is an I/O error (never a wrong byte), an image that cannot be opened fails
    only its export, and the server keeps serving the others."""
    from tests.nbd_helpers import ServeProcess, image_config, require_tools

    require_tools("nbdcopy")
    lz4 = _pick(own, "own_lz4")
    stack = _pick(own, "own_stack", "own_top.zfile")
    plain = _pick(own, "own_plain")
    cases = [
        (lz4, Mutant("intact", lz4.original.read_bytes())),
        (lz4, _block_flip(lz4)),
        (lz4, _some(lz4, "set jump table [0]")[0]),
        (stack, _block_flip(stack)),
        (plain, _some(plain, "cut 4096")[0]),  # cannot be opened: its export fails
        (plain, _some(plain, "flip")[0]),
    ]
    args = ["--listen", "127.0.0.1:0"]
    for i, (s, m) in enumerate(cases):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        files = []
        for p in s.target.files:
            q = folder / p.name
            q.write_bytes(m.data if p == s.original else p.read_bytes())
            files.append(str(q))
        cfg = image_config(folder, f"m{i}", lowers=files)
        args.append(f"{cfg}=m{i}")
    outcomes = []
    with ServeProcess(args) as sp:
        for i, (s, m) in enumerate([*cases, cases[0]]):  # the intact one again at the end
            out = tmp_path / f"m{i % len(cases)}.raw"
            r = subprocess.run(
                ["nbdcopy", sp.uri(f"m{i % len(cases)}"), str(out)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert s.target.good is not None
            bad = None
            if r.returncode == 0:
                with open_file(out) as f:
                    bad = s.target.good.mismatch(f.pread, f.size(), [(0, f.size())])
                out.unlink()
            outcomes.append((m.what, r.returncode, bad))
            if r.returncode == 0 and bad:
                assert not s.crc, f"{m.what}: nbdcopy read wrong bytes from a CRC-protected ZFile"
        status = sp.stop()
    print("nbd:", outcomes)
    assert status == 0, sp.stderr
    assert "Traceback" not in sp.stderr
    assert outcomes[0][1:] == (0, None) and outcomes[-1][1:] == (0, None)
    assert outcomes[1][1] != 0 and outcomes[3][1] != 0  # a bad block: an I/O error
    assert outcomes[4][1] != 0  # the export whose image failed to open


# ------------------------------------------------- what the fuzzer found (each one fixed)


@pytest.mark.parametrize("text", [b"-1", b"+7", b"1_0", b"7 7", b"abc"])
def test_tar_number_that_is_not_octal_is_corrupt(
    own: list[Target], text: bytes, tmp_path: Path
) -> None:
    """Found: a tar size field ``-1`` (checksum fixed) passed int(x, 8) and the negative
    size reached os.pread: ``OSError: Invalid argument``, exit 3, in every command."""
    s = _pick(own, "own_tar")
    data = bytearray(s.original.read_bytes())
    data[124:136] = (text + b" " * 12)[:12]
    _tar_fix(0)(data)
    assert is_tar(bytes(data[:512]))
    p = tmp_path / "t.tar"
    p.write_bytes(bytes(data))
    with open_file(p) as f, pytest.raises(CorruptError, match="bad number"):
        TarView(f, path=str(p))
    code, _, err = cli("inspect", p)
    assert code == 4 and "bad number" in err and str(p) in err, err


def test_tar_pax_size_record_must_be_digits(own: list[Target], tmp_path: Path) -> None:
    s = _pick(own, "own_tar")
    for text in (b"-1", b"+1", b" 1", b"\xd9\xa1"):  # the last: an Arabic-Indic digit one
        data = bytearray(s.original.read_bytes())
        rec = b" size=" + text + b"\n"
        rec = str(len(rec) + 2).encode() + rec
        data[512:1024] = rec + bytes(512 - len(rec))
        p = tmp_path / "t.tar"
        p.write_bytes(bytes(data))
        code, _, err = cli("zfile", "-x", p, tmp_path / "out")
        assert code == 4 and "bad pax size record" in err, err


@pytest.mark.parametrize("which", ["own_plain", "own_sealed", "own_rw"])
def test_huge_virtual_size_is_corrupt(own: list[Target], which: str, tmp_path: Path) -> None:
    """Found: a virtual_size of 2**63 or more (header and trailer alike) opened, and
    ``merge --raw`` died in ftruncate with ``OverflowError`` (an internal error)."""
    (t,) = [t for t in own if t.name == which]
    files = []
    for p in t.files:
        q = tmp_path / p.name
        data = bytearray(p.read_bytes())
        if data[:8] == lsmt.MAGIC0:
            for at in (0, len(data) - lsmt.HT_SLOT) if t.kind == "layer" else (0,):
                struct.pack_into("<Q", data, at + 48, (1 << 64) - 1)
        q.write_bytes(bytes(data))
        files.append(q)
    cfg = _target_config(t, tmp_path, files)
    code, _, err = cli("merge", "--raw", cfg, tmp_path / "out.raw")
    assert code == 4 and "larger than an LSMT index can address" in err, err
    code, out, _ = cli("check", cfg)
    assert code == 2 and "larger than an LSMT index can address" in out, out


def test_header_and_trailer_disagree_on_the_virtual_size(own: list[Target], tmp_path: Path) -> None:
    """A damaged trailer virtual_size (larger: the disk grows; smaller: entries fall
    off) is refused: writers copy the header's value into the trailer."""
    from obd.image.layers import open_ro_layer

    s = _pick(own, "own_plain")
    data = bytearray(s.original.read_bytes())
    at = len(data) - lsmt.HT_SLOT + 48
    struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] * 2)
    p = tmp_path / "l.lsmt"
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptError, match="disagree on the virtual size"):
        open_ro_layer(str(p))
    code, out, _ = cli("check", p)
    assert code == 2 and "virtual_size" in out
