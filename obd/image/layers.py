"""Opening layer files: local paths to read-only or writable layers, and remote lowers.

A read-only layer blob may be wrapped (tar, then ZFile, docs/formats.md §0.4); writable
layers are a data file plus an index file (§2). A lower found nowhere locally (§6.1
lookup order: ``file``, ``dir/overlaybd.commit``, ``dir/.commit``, ``dir/overlaybd.sealed``)
is read from the registry (``repoBlobUrl`` + ``digest``, §8.1) through the
:class:`~obd.registry.remote.RemoteContext` the server passes down.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from obd.errors import CorruptError, FileAccessError, ObdError, UnsupportedError
from obd.formats.lsmt import LSMTReadOnly
from obd.formats.lsmt.rw import LSMTWritable
from obd.formats.sniff import KIND_UNKNOWN, KIND_ZFILE, open_blob
from obd.image.config import LayerConfig
from obd.io.base import ReadAt
from obd.io.file import LocalFile, open_file

if TYPE_CHECKING:
    from obd.registry.download import BackgroundDownloader
    from obd.registry.remote import RemoteContext


def open_ro_layer(path: str) -> LSMTReadOnly:
    """Open a read-only layer file of any nesting (tar / ZFile / plain LSMT)."""
    return open_ro_blob(open_file(path), path)


def open_ro_blob(f: ReadAt, path: str) -> LSMTReadOnly:
    """A read-only layer of any nesting over the open blob ``f`` (closed on failure)."""
    try:
        blob = open_blob(f, path=path)
        if blob.kind in (KIND_UNKNOWN, KIND_ZFILE):  # no LSMT header inside the wrappers
            what = " inside " + "/".join(blob.wrappers) if blob.wrappers else ""
            raise CorruptError(f"not an overlaybd layer (no LSMT header{what})", path=path)
        return LSMTReadOnly(blob.view, path=path)
    except ObdError as e:
        f.close()
        raise e.with_path(path) from None
    except BaseException:
        f.close()
        raise


def open_rw_layer(
    data_path: str, index_path: str | None, *, readonly: bool = False
) -> LSMTWritable:
    data = open_file(data_path, writable=not readonly)
    index: LocalFile | None = None
    try:
        if index_path:
            index = open_file(index_path, writable=not readonly)
        return LSMTWritable.open(data, index, readonly=readonly)
    except BaseException:
        data.close()
        if index is not None:
            index.close()
        raise


LOCAL_NAMES = ("overlaybd.commit", ".commit", "overlaybd.sealed")


def local_layer_path(layer: LayerConfig) -> str | None:
    """Where a configured lower layer lives locally, if it does (§6.1 lookup order)."""
    if layer.file:
        return layer.file
    if layer.dir:
        for name in LOCAL_NAMES:
            p = os.path.join(layer.dir, name)
            if os.path.exists(p):
                return p
    return None


def open_lower(
    layer: LayerConfig,
    index: int,
    *,
    config_path: str,
    repo_blob_url: str = "",
    remote: RemoteContext | None = None,
    downloader: BackgroundDownloader | None = None,
) -> LSMTReadOnly:
    """Open lower ``index``: locally when §6.1's lookup finds it, else from the registry
    (``remote``), queueing a background download into ``layer.dir`` on ``downloader``."""
    path = local_layer_path(layer)
    if path is None:
        if layer.digest:
            return _open_remote(layer, index, config_path, repo_blob_url, remote, downloader)
        if layer.dir:
            raise FileAccessError(
                f"layer {index}: no overlaybd.commit, .commit or overlaybd.sealed in {layer.dir}",
                path=config_path,
            )
        raise FileAccessError(f"layer {index} has neither file, dir nor digest", path=config_path)
    if not os.path.exists(path):
        raise FileAccessError(f"layer {index}: no such file", path=path)
    return open_ro_layer(path)


def _open_remote(
    layer: LayerConfig,
    index: int,
    config_path: str,
    repo_blob_url: str,
    remote: RemoteContext | None,
    downloader: BackgroundDownloader | None,
) -> LSMTReadOnly:
    if not repo_blob_url:
        raise FileAccessError(
            f"layer {index} ({layer.digest}) is remote and repoBlobUrl is empty", path=config_path
        )
    if remote is None:
        raise UnsupportedError(
            f"layer {index} ({layer.digest}) is remote; only obd serve reads registry layers",
            path=config_path,
        )
    blob = remote.open_blob(repo_blob_url, layer.digest, layer.size)
    lsmt = open_ro_blob(blob, blob.path)
    if downloader is not None and layer.dir:
        downloader.add(blob, blob.raw_fetch, dir=layer.dir, digest=layer.digest, size=blob.size())
    return lsmt
