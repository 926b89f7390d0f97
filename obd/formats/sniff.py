"""Peel the wrappers of a layer blob (FORMATS.md §0.4).

A blob is read as ``[optional tar wrapper] -> [optional ZFile] -> payload``; detection
happens in that order. Anything without the tar header is not tar; anything without the
ZFile magic is plain. (LSMT validation is the caller's business.)
"""

from __future__ import annotations

from obd.errors import CorruptError
from obd.formats.tar import TarView, is_tar
from obd.formats.zfile import ZFileReader, is_zfile
from obd.io.base import ReadAt


def unwrap(file: ReadAt, *, cache_blocks: int = 64) -> tuple[ReadAt, list[str]]:
    """Return the innermost view of ``file`` and the wrappers found, outermost first.

    E.g. ``(ZFileReader(TarView(file)), ["tar", "zfile"])`` or ``(file, [])``. Closing
    the returned view closes ``file`` too. A ZFile or tar that is recognised but broken
    raises :class:`obd.errors.CorruptError` (or ``UnsupportedError``), never falls back
    to plain.
    """
    found: list[str] = []
    view: ReadAt = file
    if is_tar(view.pread(0, 512)):
        view = TarView(view)
        found.append("tar")
    if is_zfile(view.pread(0, 512)):
        view = ZFileReader(view, cache_blocks=cache_blocks)
        found.append("zfile")
    return view, found


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
    return ZFileReader(view, cache_blocks=cache_blocks, path=path)
