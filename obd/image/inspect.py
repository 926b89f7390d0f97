"""What an overlaybd file or image holds: ``obd inspect`` and ``obd inspect --map``.

A file's kind and wrappers come from :func:`obd.formats.sniff.open_blob` (the one place
that peels tar and ZFile and reads the LSMT flags); a file whose first byte is ``{`` is
read as an image config (§6.1).

Nothing here re-declares a byte layout: headers are decoded by the format modules
(:class:`obd.formats.lsmt.HeaderTrailer`, :class:`obd.formats.zfile.ZFileReader`,
:class:`obd.formats.tar.TarView`). Every result is a dataclass with ``to_json()``; the
documents are described in ``obd-inspect(1)``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from obd.errors import CorruptError, ObdError, UsageError
from obd.formats import lsmt
from obd.formats import uuid as uuidmod
from obd.formats import zfile as zf
from obd.formats.layout import flag_names
from obd.formats.lsmt import (
    ENTRY_SIZE,
    FLAG_SPARSE,
    HT_SLOT,
    INVALID_OFFSET,
    SECTOR,
    HeaderTrailer,
    LSMTReadOnly,
    Mappings,
    decode_entries,
    referenced_bytes,
)
from obd.formats.sniff import (
    KIND_LSMT_RW,
    KIND_LSMT_RW_INDEX,
    KIND_UNKNOWN,
    KIND_ZFILE,
    RO_KINDS,
    RW_DATA_KINDS,
    open_blob_path,
)
from obd.image.config import ImageConfig, is_image_config, load_image_config
from obd.io.base import Extent, ExtentKind, ReadAt
from obd.io.file import open_file

JSON_VERSION = 1


def uuid_or_none(text: str) -> str | None:
    """A header uuid for output: ``None`` for the null uuid (or an empty field)."""
    return None if not text or text == uuidmod.NULL_UUID else text


def same_uuid(a: str | None, b: str | None) -> bool:
    return (a or "").upper() == (b or "").upper()


# ------------------------------------------------------------------------ detection


def sibling_index(data_path: str) -> str | None:
    """The index file of a writable data file, when it is named the usual way.

    ``X.data`` -> ``X.index``, ``writable_data`` -> ``writable_index`` (the overlaybd
    snapshotter's names), else the last ``data`` in the name replaced by ``index``.
    """
    folder, name = os.path.split(data_path)
    cands = []
    if name.endswith(".data"):
        cands.append(name[:-5] + ".index")
    if "data" in name:
        i = name.rfind("data")
        cands.append(name[:i] + "index" + name[i + 4 :])
    for c in cands:
        p = os.path.join(folder, c)
        if c != name and os.path.isfile(p):
            return p
    return None


def looks_like_config(path: str) -> bool:
    """True when ``path`` is a regular file that starts like an image config.

    Opened as every input is (:func:`obd.io.file.open_file`): a FIFO never blocks, and
    what cannot be opened is not a config (opening it again gives the error).
    """
    try:
        with open_file(path) as f:
            head = f.pread(0, 64)
    except (ObdError, OSError):
        return False
    return is_image_config(head)


# ---------------------------------------------------------------------------- results


@dataclass
class TarInfo:
    payload_offset: int
    payload_size: int
    member: str

    def to_json(self) -> dict[str, Any]:
        return {
            "payload_offset": self.payload_offset,
            "payload_size": self.payload_size,
            "member": self.member,
        }


@dataclass
class ZFileInfo:
    algorithm: str
    block_size: int
    blocks: int
    crc: bool
    digest: bool
    header_flags: list[str]
    compressed_size: int
    original_size: int

    @property
    def ratio(self) -> float:
        """original / compressed (2.0 means half the size)."""
        return round(self.original_size / self.compressed_size, 3) if self.compressed_size else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "block_size": self.block_size,
            "blocks": self.blocks,
            "crc": self.crc,
            "digest": self.digest,
            "header_flags": self.header_flags,
            "compressed_size": self.compressed_size,
            "original_size": self.original_size,
            "ratio": self.ratio,
        }


@dataclass
class LsmtInfo:
    format_version: str
    header_flags: list[str]
    trailer_flags: list[str] | None
    uuid: str | None
    parent_uuid: str | None
    virtual_size: int
    user_tag: str
    index_entries: int | None = None  # on-disk entries / index-file records, padding included
    valid_entries: int | None = None
    padding_entries: int | None = None
    mapped_bytes: int | None = None  # stored data the layer references
    zeroed_bytes: int | None = None  # zeroed (discarded) segments
    garbage_bytes: int | None = None  # data-file bytes no entry references
    index_file: str | None = None
    torn_bytes: int = 0  # trailing bytes of an index file that make no full record

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "header_flags": self.header_flags,
            "trailer_flags": self.trailer_flags,
            "uuid": self.uuid,
            "parent_uuid": self.parent_uuid,
            "virtual_size": self.virtual_size,
            "user_tag": self.user_tag,
            "index_entries": self.index_entries,
            "valid_entries": self.valid_entries,
            "padding_entries": self.padding_entries,
            "mapped_bytes": self.mapped_bytes,
            "zeroed_bytes": self.zeroed_bytes,
            "garbage_bytes": self.garbage_bytes,
            "index_file": self.index_file,
            "torn_bytes": self.torn_bytes,
        }


@dataclass
class FileInfo:
    """One file: its kind, wrappers and what each layer of it says."""

    path: str
    kind: str = KIND_UNKNOWN
    file_size: int = 0
    wrappers: list[str] = field(default_factory=list)
    tar: TarInfo | None = None
    zfile: ZFileInfo | None = None
    lsmt: LsmtInfo | None = None
    error: str | None = None  # why some of the above could not be gathered
    note: str | None = None  # something the reader should know (not a failure)

    @property
    def virtual_size(self) -> int | None:
        if self.lsmt is not None:
            return self.lsmt.virtual_size
        if self.zfile is not None:
            return self.zfile.original_size
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "file",
            "path": self.path,
            "kind": self.kind,
            "file_size": self.file_size,
            "wrappers": self.wrappers,
            "virtual_size": self.virtual_size,
            "tar": None if self.tar is None else self.tar.to_json(),
            "zfile": None if self.zfile is None else self.zfile.to_json(),
            "lsmt": None if self.lsmt is None else self.lsmt.to_json(),
            "error": self.error,
            "note": self.note,
        }


@dataclass
class LayerRow:
    """One layer of an image config (``position`` counts from 0 at the bottom)."""

    position: int
    role: str  # "lower" or "upper"
    source: str  # local path, or the digest of a remote layer
    info: FileInfo | None  # None: remote layer (not inspected)

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "role": self.role,
            "source": self.source,
            "info": None if self.info is None else self.info.to_json(),
        }


@dataclass
class ChainProblem:
    position: int  # the layer whose parent uuid does not match
    parent_uuid: str
    below_uuid: str

    @property
    def message(self) -> str:
        return (
            f"broken chain: layer {self.position} has parent uuid {self.parent_uuid} but "
            f"layer {self.position - 1} below has uuid {self.below_uuid}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "parent_uuid": self.parent_uuid,
            "below_uuid": self.below_uuid,
            "message": self.message,
        }


@dataclass
class ImageInfo:
    path: str
    virtual_size: int | None
    layers: list[LayerRow]
    chain: list[ChainProblem]
    read_only: bool

    @property
    def chain_ok(self) -> bool:
        return not self.chain

    @property
    def error(self) -> str | None:
        bad = [r for r in self.layers if r.info is not None and r.info.error]
        return bad[0].info.error if bad and bad[0].info is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "image",
            "path": self.path,
            "virtual_size": self.virtual_size,
            "read_only": self.read_only,
            "layers": [r.to_json() for r in self.layers],
            "chain_ok": self.chain_ok,
            "chain_problems": [c.to_json() for c in self.chain],
        }


Item = FileInfo | ImageInfo


def document(items: list[Item]) -> dict[str, Any]:
    """The ``obd inspect --json`` document."""
    return {"version": JSON_VERSION, "items": [it.to_json() for it in items]}


# ------------------------------------------------------------------------- gathering


def _mapping_totals(m: Mappings) -> tuple[int, int]:
    data = int(m.length[~m.zeroed].sum()) * SECTOR
    zero = int(m.length[m.zeroed].sum()) * SECTOR
    return data, zero


def _ht_info(h: HeaderTrailer, t: HeaderTrailer | None) -> LsmtInfo:
    src = t if t is not None else h
    return LsmtInfo(
        format_version=f"{src.version}.{src.sub_version}",
        header_flags=flag_names(h.flags, lsmt.FLAG_NAMES, 0xFFFFFFFF),
        trailer_flags=None if t is None else flag_names(t.flags, lsmt.FLAG_NAMES, 0xFFFFFFFF),
        uuid=uuid_or_none(src.uuid),
        parent_uuid=uuid_or_none(src.parent_uuid),
        virtual_size=src.virtual_size,
        user_tag=src.user_tag.decode("utf-8", "replace"),
    )


def _ro_info(view: ReadAt, path: str, info: FileInfo) -> None:
    """A read-only layer (committed or sealed): opened with every §1.6 check."""
    hdr = HeaderTrailer.unpack(view.pread(0, HT_SLOT), path=path)
    try:
        layer = LSMTReadOnly(view, path=path)
    except ObdError as e:
        info.lsmt = _ht_info(hdr, None)
        info.error = str(e.with_path(path))
        return
    li = info.lsmt = _ht_info(layer.header, layer.trailer)
    raw = layer.raw_entries
    li.index_entries = len(raw)
    li.valid_entries = len(layer.mappings)
    li.padding_entries = len(raw) - len(layer.mappings)
    li.mapped_bytes, li.zeroed_bytes = _mapping_totals(layer.mappings)
    data_area = max(0, layer.trailer.index_offset - HT_SLOT)
    li.garbage_bytes = max(0, data_area - referenced_bytes(layer.mappings))


def _index_file_info(view: ReadAt, path: str, info: FileInfo) -> None:
    hdr = HeaderTrailer.unpack(view.pread(0, HT_SLOT), path=path)
    li = info.lsmt = _ht_info(hdr, None)
    body = max(0, view.size() - HT_SLOT)
    n = body // ENTRY_SIZE
    li.torn_bytes = body % ENTRY_SIZE
    m = decode_entries(view.pread(HT_SLOT, n * ENTRY_SIZE))
    valid = m.offset != np.uint64(INVALID_OFFSET)
    li.index_entries = n
    li.valid_entries = int(valid.sum())
    li.padding_entries = n - li.valid_entries


def _rw_info(path: str, index: str | None, info: FileInfo) -> None:
    from obd.image.layers import open_rw_layer

    hdr_file = open_file(path)
    with hdr_file:
        hdr = HeaderTrailer.unpack(hdr_file.pread(0, HT_SLOT), path=path)
    sparse = bool(hdr.flags & FLAG_SPARSE)
    if not sparse and index is None:
        index = sibling_index(path)
    info.lsmt = _ht_info(hdr, None)
    if not sparse and index is None:
        info.note = "index file not found (name it with --index); showing the data header only"
        return
    try:
        layer = open_rw_layer(path, None if sparse else index, readonly=True)
    except ObdError as e:
        info.lsmt.index_file = index
        info.error = str(e)
        return
    with layer:
        li = info.lsmt = _ht_info(layer.header, None)
        li.index_file = None if sparse else index
        m = layer.mappings()
        # sparse layers have no index file: count the segments rebuilt from the extents
        li.index_entries = li.valid_entries = len(m)
        li.padding_entries = 0
        li.mapped_bytes, li.zeroed_bytes = _mapping_totals(m)
        li.garbage_bytes = layer.garbage_bytes()
        li.virtual_size = layer.virtual_size
    if not sparse and index is not None:
        with open_file(index) as ix:
            tmp = FileInfo(index)
            _index_file_info(ix, index, tmp)
        assert tmp.lsmt is not None
        li.index_entries = tmp.lsmt.index_entries
        li.valid_entries = tmp.lsmt.valid_entries
        li.padding_entries = tmp.lsmt.padding_entries
        li.torn_bytes = tmp.lsmt.torn_bytes


def inspect_file(path: str, *, index: str | None = None) -> FileInfo:
    """Gather a :class:`FileInfo`; problems opening a part are put in ``error``.

    Raises :class:`ObdError` only when ``path`` cannot be opened at all.
    """
    info = FileInfo(path)
    with open_file(path) as f:
        info.file_size = f.size()
    try:
        op = open_blob_path(path)
    except ObdError as e:
        info.error = str(e.with_path(path))
        return info
    try:
        info.wrappers = list(op.wrappers)
        info.kind = op.kind
        if op.tar is not None:
            t = op.tar
            info.tar = TarInfo(t.offset, t.size(), t.member.name.decode("utf-8", "replace"))
        if op.zfile is not None:
            z = op.zfile
            info.zfile = ZFileInfo(
                algorithm=z.algorithm,
                block_size=z.block_size,
                blocks=z.nblocks,
                crc=z.verify,
                digest=z.info.digest_enabled,
                header_flags=flag_names(z.header.flags, zf.FLAG_NAMES, 0x3F),
                compressed_size=z.source.size(),
                original_size=z.original_file_size,
            )
        if op.kind in RO_KINDS:
            _ro_info(op.view, path, info)
        elif op.kind == KIND_LSMT_RW_INDEX:
            _index_file_info(op.view, path, info)
        elif op.kind in RW_DATA_KINDS:
            if op.wrappers:
                info.lsmt = _ht_info(op.header, None) if op.header else None
                info.error = "a writable layer inside a wrapper cannot be opened"
            else:
                _rw_info(path, index, info)
        elif op.kind == KIND_UNKNOWN:
            inside = f" inside the {'/'.join(op.wrappers)} wrapper" if op.wrappers else ""
            info.error = f"not an overlaybd file (no ZFile or LSMT header{inside})"
            if info.file_size == 0:
                info.error = "empty file (the index file of a sparse layer is empty)"
    except ObdError as e:
        info.error = str(e.with_path(path))
    finally:
        op.close()
    return info


def _image_vsize(rows: list[LayerRow]) -> int | None:
    """§3.1/§3.4: the upper's size when set, else the topmost lower's non-zero size."""
    for r in reversed(rows):
        vs = r.info.virtual_size if r.info is not None else None
        if vs:
            return vs
    return None


def chain_problems(rows: list[tuple[int, str | None, str | None]]) -> list[ChainProblem]:
    """Check ``(position, uuid, parent_uuid)`` rows (bottom first): each parent uuid must
    equal the uuid of the layer below, where both are set and not null."""
    out = []
    for below, cur in itertools.pairwise(rows):
        _, below_uuid, _ = below
        pos, _, parent = cur
        if below_uuid and parent and not same_uuid(below_uuid, parent):
            out.append(ChainProblem(pos, parent, below_uuid))
    return out


def inspect_image(cfg: ImageConfig) -> ImageInfo:
    from obd.image.layers import local_layer_path

    rows: list[LayerRow] = []
    layers = cfg.stacked_lowers
    for i, lc in enumerate(layers):
        p = local_layer_path(lc)
        if p is None or not os.path.exists(p):
            rows.append(LayerRow(i, "lower", p or lc.digest or "?", None))
            continue
        rows.append(LayerRow(i, "lower", p, inspect_file(p)))
    if cfg.upper.present:
        rows.append(
            LayerRow(
                len(rows),
                "upper",
                cfg.upper.data,
                inspect_file(cfg.upper.data, index=cfg.upper.index),
            )
        )
    ids = [
        (
            r.position,
            r.info.lsmt.uuid if r.info and r.info.lsmt else None,
            r.info.lsmt.parent_uuid if r.info and r.info.lsmt else None,
        )
        for r in rows
    ]
    return ImageInfo(
        path=cfg.path,
        virtual_size=_image_vsize(rows),
        layers=rows,
        chain=chain_problems(ids),
        read_only=not cfg.upper.present,
    )


def inspect_paths(paths: list[str], *, index: str | None = None) -> list[Item]:
    """Inspect files and image configs; ``index`` names the index file of a single
    writable data file."""
    if index is not None and len(paths) != 1:
        raise UsageError("--index goes with exactly one writable data file")
    items: list[Item] = []
    for p in paths:
        if looks_like_config(p):
            items.append(inspect_image(load_image_config(p)))
        else:
            items.append(inspect_file(p, index=index))
    return items


# ------------------------------------------------------------------------------- map


@dataclass
class ExtentMap:
    """The extents of one virtual disk; ``layers[depth]`` names the layer at a depth."""

    path: str
    virtual_size: int
    layers: list[str]
    extents: list[Extent]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "virtual_size": self.virtual_size,
            "layers": self.layers,
            "extents": [
                {"offset": e.offset, "length": e.length, "kind": e.kind.value, "depth": e.depth}
                for e in self.extents
            ],
        }


def map_document(maps: list[ExtentMap]) -> dict[str, Any]:
    """The ``obd inspect --map --json`` document."""
    return {"version": JSON_VERSION, "maps": [m.to_json() for m in maps]}


def _stack_map(path: str, stack: Any, layers: list[str]) -> ExtentMap:
    return ExtentMap(path, stack.virtual_size, layers, list(stack.extents()))


def map_path(path: str, *, index: str | None = None) -> ExtentMap:
    """Extents of a layer file (any wrapping), a writable layer or an image config."""
    from obd.image import open_image
    from obd.image.layers import local_layer_path, open_ro_layer, open_rw_layer
    from obd.image.stack import Stack

    if looks_like_config(path):
        cfg = load_image_config(path)
        with open_image(path, readonly=True) as st:
            lowers = cfg.stacked_lowers
            names = [local_layer_path(lc) or lc.digest for lc in lowers][::-1]
            if cfg.upper.present:
                names.insert(0, cfg.upper.data)
            return _stack_map(path, st, names)
    with open_blob_path(path) as op:
        kind, size = op.kind, op.view.size()
    if kind == KIND_ZFILE:
        ext = [Extent(0, size, ExtentKind.DATA, 0)] if size else []
        return ExtentMap(path, size, [path], ext)
    if kind in RO_KINDS:
        with Stack([open_ro_layer(path)], readonly=True) as st:
            return _stack_map(path, st, [path])
    if kind in RW_DATA_KINDS:
        if kind == KIND_LSMT_RW and index is None:
            index = sibling_index(path)
            if index is None:
                raise UsageError(f"{path}: index file not found; name it with --index")
        up = open_rw_layer(path, index if kind == KIND_LSMT_RW else None, readonly=True)
        with Stack([], up, readonly=True) as st:
            return _stack_map(path, st, [path])
    if kind == KIND_LSMT_RW_INDEX:
        raise UsageError(f"{path} is a writable index file; map its data file instead")
    raise CorruptError("not an overlaybd layer or image config", path=path)


def map_paths(paths: list[str], *, index: str | None = None) -> list[ExtentMap]:
    if index is not None and len(paths) != 1:
        raise UsageError("--index goes with exactly one writable data file")
    return [map_path(p, index=index) for p in paths]


def iter_items(items: list[Item]) -> Iterator[FileInfo]:
    """Every FileInfo, those of image layers included."""
    for it in items:
        if isinstance(it, FileInfo):
            yield it
        else:
            for r in it.layers:
                if r.info is not None:
                    yield r.info
