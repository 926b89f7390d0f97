"""The image config's ``resultFile`` (docs/formats.md §6.5).

The file holds ``success`` once the device is open, or ``failed:<reason>`` with one of
upstream's reasons; no trailing newline. It is replaced atomically and durably
(:class:`~obd.io.file.AtomicOutput`: temporary file in the same folder, fsync, rename,
fsync of the folder), so a reader never sees half of it, nor loses it in a crash.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from obd.errors import CorruptError, FileAccessError, ObdError, RemoteError, UnsupportedError
from obd.io.file import AtomicOutput

if TYPE_CHECKING:
    from obd.image.config import ImageConfig

SUCCESS = "success"
FAILED_PREFIX = "failed:"

# upstream's reasons (src/image_service.cpp, src/image_file.cpp)
REASON_CREATE = "failed to create overlaybd device"
REASON_EMPTY_REPO = "empty repoBlobUrl"


def reason_open_layer(index: int) -> str:
    return f"failed to open layer {index}"


def reason_local_file(path: str) -> str:
    return f"failed to open local file {path}"


def reason_remote(url: str, msg: str) -> str:
    return f"failed to open remote file {url}: {msg}"


def reason_duplicated(dev_id: str) -> str:
    return f"duplicated dev id: {dev_id}"


def write_result(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (no newline added), atomically and durably.

    Raises OSError when it cannot.
    """
    if not path:
        return
    try:
        with AtomicOutput(path, force=True, mode=0o644) as out:
            out.pwrite(0, text.encode("utf-8"))
    except FileAccessError as e:
        raise OSError(str(e)) from None


def write_success(path: str) -> None:
    write_result(path, SUCCESS)


def write_failure(path: str, reason: str) -> None:
    write_result(path, FAILED_PREFIX + reason.replace("\n", " "))


def report(path: str, ok: bool, reason: str, log: logging.Logger, who: str = "") -> None:
    """Write ``success`` (``ok``) or ``failed:<reason>`` to the resultFile ``path`` ("": the
    config names none). A file that cannot be written is logged on ``log`` (the line starts
    with ``who``), not raised: the device is served, or refused, all the same."""
    if not path:
        return
    try:
        if ok:
            write_success(path)
        else:
            write_failure(path, reason)
    except OSError as e:
        log.error("%scannot write resultFile %s: %s", who, path, e)


def failure_reason(
    err: BaseException,
    layer_files: Sequence[str] = (),
    upper_files: Sequence[str] = (),
    repo_blob_url: str | None = None,
) -> str:
    """Upstream's resultFile reason for an image that failed to open with ``err``.

    ``layer_files`` are the lowers' local paths bottom first ("" for a remote layer):
    a corrupt or unsupported layer is ``failed to open layer <i>``; a missing or
    unreadable local file is ``failed to open local file <path>``.
    """
    path = getattr(err, "path", None)
    if isinstance(err, RemoteError):  # the registry client's errors name the blob URL
        return reason_remote(path or "", getattr(err, "reason", "") or err.message)
    norm = os.path.normpath(path) if path else None
    index = None
    if norm is not None:
        for i, f in enumerate(layer_files):
            if f and os.path.normpath(f) == norm:
                index = i
                break
    if isinstance(err, FileAccessError):
        if norm is not None and (index is not None or norm in map(os.path.normpath, upper_files)):
            return reason_local_file(path or "")
        if repo_blob_url == "" and any(not f for f in layer_files):
            return REASON_EMPTY_REPO
        if path:
            return reason_local_file(path)
        return REASON_CREATE
    if isinstance(err, CorruptError | UnsupportedError) and index is not None:
        return reason_open_layer(index)
    if isinstance(err, ObdError | OSError) and index is not None:
        return reason_open_layer(index)
    return REASON_CREATE


def config_failure_reason(err: BaseException, cfg: ImageConfig) -> str:
    """:func:`failure_reason` for the image of ``cfg`` that failed to open with ``err``."""
    from obd.image.layers import local_layer_path

    return failure_reason(
        err,
        # "" for a layer read from the registry (§6.5's empty repoBlobUrl case)
        [local_layer_path(lc) or "" for lc in cfg.lowers],
        [cfg.upper.data, cfg.upper.index],
        cfg.repoBlobUrl,
    )
