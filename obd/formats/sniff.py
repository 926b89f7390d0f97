"""What a blob is: peel its wrappers and name its kind (docs/formats.md §0.4).

A blob is read as ``[optional tar wrapper] -> [optional ZFile] -> payload``; detection
happens in that order. Anything without the tar header is not tar; anything without the
ZFile magic is plain. The payload's kind comes from its LSMT header flags and trailer
(§1, §2): a committed read-only layer (header flags say sealed), a writable data file
sealed in place (a trailer follows the index), a writable data file (log-structured or
sparse) or a writable index file. :func:`open_blob` is the one place that does this;
readers, ``obd inspect``, ``obd check``, merge and serve call it. (Validating the LSMT
layer itself is the reader's business.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from obd.errors import CorruptError
from obd.formats.tar import TarView, is_tar
from obd.formats.zfile.layout import is_zfile
from obd.io.base import ReadAt

if TYPE_CHECKING:
    from obd.formats.lsmt.layout import HeaderTrailer
    from obd.formats.zfile.reader import ZFileReader

# The LSMT package (numpy) and the ZFile reader are imported where they are used, so
# that commands which only peel a wrapper (``obd zfile``) start fast.

# kinds (the innermost content; wrappers are listed separately, outermost first)
KIND_LSMT_RO = "lsmt_ro"  # committed read-only layer (header flags 0x07)
KIND_LSMT_SEALED = "lsmt_sealed"  # writable data file sealed in place (§2.4)
KIND_LSMT_RW = "lsmt_rw"  # writable log-structured data file (needs its index file)
KIND_LSMT_RW_SPARSE = "lsmt_rw_sparse"  # writable sparse data file (§2.3)
KIND_LSMT_RW_INDEX = "lsmt_rw_index"  # writable index file (§2.1)
KIND_ZFILE = "zfile"  # a ZFile whose payload is not an LSMT layer
KIND_IMAGE = "image_config"  # a JSON image config (found by obd.image.config, not here)
KIND_UNKNOWN = "unknown"

#: kinds a read-only layer can be opened from (:class:`obd.formats.lsmt.LSMTReadOnly`)
RO_KINDS = (KIND_LSMT_RO, KIND_LSMT_SEALED)
#: kinds of a writable data file (opened with its index file, or alone when sparse)
RW_DATA_KINDS = (KIND_LSMT_RW, KIND_LSMT_RW_SPARSE)


@dataclass(frozen=True)
class Blob:
    """A blob opened down to its innermost content; ``close()`` closes ``file`` too."""

    file: ReadAt  # the blob as given
    view: ReadAt  # innermost view (ZFileReader / TarView / ``file`` itself)
    kind: str
    wrappers: tuple[str, ...] = ()  # outermost first: ("tar", "zfile")
    tar: TarView | None = None  # the TarView when wrapped
    zfile: ZFileReader | None = None  # the ZFileReader when compressed
    header: HeaderTrailer | None = None  # the payload's LSMT header, when it has one
    path: str | None = None

    def close(self) -> None:
        self.view.close()

    def __enter__(self) -> Blob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lsmt_kind(view: ReadAt) -> tuple[str, HeaderTrailer | None]:
    """Which LSMT file ``view`` is, by its header flags and trailer (see module doc)."""
    from obd.formats.lsmt.layout import (
        FLAG_DATA,
        FLAG_HEADER,
        FLAG_SEALED,
        FLAG_SPARSE,
        HT_SLOT,
        HeaderTrailer,
    )

    hdr = HeaderTrailer.unpack_or_none(view.pread(0, HT_SLOT))
    if hdr is None:
        return KIND_UNKNOWN, None
    if not hdr.flags & FLAG_HEADER:
        return KIND_UNKNOWN, hdr
    if not hdr.flags & FLAG_DATA:
        return KIND_LSMT_RW_INDEX, hdr
    if hdr.flags & FLAG_SEALED:
        return KIND_LSMT_RO, hdr
    size = view.size()
    if size >= 2 * HT_SLOT:
        t = HeaderTrailer.unpack_or_none(view.pread(size - HT_SLOT, HT_SLOT))
        if t is not None and not t.flags & FLAG_HEADER:
            return KIND_LSMT_SEALED, hdr
    return (KIND_LSMT_RW_SPARSE if hdr.flags & FLAG_SPARSE else KIND_LSMT_RW), hdr


def _peel(
    file: ReadAt, *, path: str | None, cache_blocks: int
) -> tuple[ReadAt, TarView | None, ZFileReader | None]:
    """The wrappers of ``file``, outermost first: (innermost view, tar, zfile)."""
    from obd.formats.zfile.reader import ZFileReader

    tar = zfile = None
    view: ReadAt = file
    if is_tar(view.pread(0, 512)):
        view = tar = TarView(view, path=path)
    if is_zfile(view.pread(0, 512)):
        view = zfile = ZFileReader(view, cache_blocks=cache_blocks, path=path)
    return view, tar, zfile


def open_blob(file: ReadAt, *, path: str | None = None, cache_blocks: int = 64) -> Blob:
    """Peel the wrappers of ``file`` (tar, ZFile) and classify what is inside.

    A ZFile or tar that is recognised but broken raises its :class:`CorruptError` (or
    ``UnsupportedError``), never falls back to plain; ``file`` is left open then (the
    caller owns it). Closing the returned :class:`Blob` closes ``file`` too.
    """
    view, tar, zfile = _peel(file, path=path, cache_blocks=cache_blocks)
    wrappers = tuple(w for w, o in (("tar", tar), ("zfile", zfile)) if o is not None)
    kind, header = lsmt_kind(view)
    if kind == KIND_UNKNOWN and zfile is not None:
        kind = KIND_ZFILE
    return Blob(file, view, kind, wrappers, tar, zfile, header, path)


def open_blob_path(path: str, *, cache_blocks: int = 64) -> Blob:
    """:func:`open_blob` on the local file ``path`` (closed again when opening fails)."""
    from obd.io.file import open_file

    f = open_file(path)
    try:
        return open_blob(f, path=path, cache_blocks=cache_blocks)
    except BaseException:
        f.close()
        raise


def unwrap(file: ReadAt, *, cache_blocks: int = 64) -> tuple[ReadAt, list[str]]:
    """Return the innermost view of ``file`` and the wrappers found, outermost first.

    E.g. ``(ZFileReader(TarView(file)), ["tar", "zfile"])`` or ``(file, [])``; the
    payload is not read (see :func:`open_blob` for its kind).
    """
    view, tar, zfile = _peel(file, path=None, cache_blocks=cache_blocks)
    return view, [w for w, o in (("tar", tar), ("zfile", zfile)) if o is not None]


def peel_tar(file: ReadAt, *, required: bool = False, path: str | None = None) -> ReadAt:
    """``file`` without its tar wrapper (``file`` itself when there is none).

    With ``required``, a file that is not tar is a :class:`CorruptError`.
    """
    if is_tar(file.pread(0, 512)):
        return TarView(file, path=path)
    if required:
        raise CorruptError("not a tar file (no valid ustar header)", path=path)
    return file


def open_zfile(
    file: ReadAt, *, tar_required: bool = False, path: str | None = None, cache_blocks: int = 64
) -> ZFileReader:
    """The ZFile in ``file`` (tar wrapper peeled); :class:`CorruptError` when it is none."""
    view = peel_tar(file, required=tar_required, path=path)
    if not is_zfile(view.pread(0, 512)):
        raise CorruptError("not a ZFile (no ZFile magic)", path=path)
    from obd.formats.zfile.reader import ZFileReader

    return ZFileReader(view, cache_blocks=cache_blocks, path=path)


__all__ = [
    "KIND_IMAGE",
    "KIND_LSMT_RO",
    "KIND_LSMT_RW",
    "KIND_LSMT_RW_INDEX",
    "KIND_LSMT_RW_SPARSE",
    "KIND_LSMT_SEALED",
    "KIND_UNKNOWN",
    "KIND_ZFILE",
    "RO_KINDS",
    "RW_DATA_KINDS",
    "Blob",
    "lsmt_kind",
    "open_blob",
    "open_blob_path",
    "open_zfile",
    "peel_tar",
    "unwrap",
]
