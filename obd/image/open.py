"""Open the layers an image config (or a list of layer files) names and stack them.

What was opened is closed again when a later layer or the stack fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

from obd.image.config import ImageConfig
from obd.image.layers import local_layer_path, open_lower, open_ro_layer, open_rw_layer
from obd.image.stack import Stack

if TYPE_CHECKING:
    from obd.registry.remote import RemoteContext


def open_config(
    cfg: ImageConfig, *, readonly: bool = False, remote: RemoteContext | None = None
) -> Stack:
    """The image ``cfg`` describes; remote lowers are read through ``remote`` (none: a
    remote lower is an :class:`~obd.errors.UnsupportedError`), and with the image's (or
    the server's) ``download.enable`` copied into their ``dir`` in the background."""
    layers = cfg.stacked_lowers
    downloader = None
    if remote is not None:
        from obd.registry.download import DownloadSettings

        dl = remote.default_download
        if cfg.download is not None:
            dl = DownloadSettings(**dataclasses.asdict(cfg.download))
        if dl.enable and not cfg.recordTracePath:
            downloader = remote.downloader(dl)
    with contextlib.ExitStack() as opened:
        lowers = [
            opened.enter_context(
                open_lower(
                    lc,
                    i,
                    config_path=cfg.path,
                    repo_blob_url=cfg.repoBlobUrl,
                    remote=remote,
                    downloader=downloader,
                )
            )
            for i, lc in enumerate(layers)
        ]
        up = cfg.upper
        upper = (
            opened.enter_context(open_rw_layer(up.data, up.index, readonly=readonly))
            if up.present
            else None
        )
        names = [local_layer_path(lc) or lc.digest for lc in layers]
        stack = Stack(lowers, upper, readonly=readonly, names=names)
        opened.pop_all()
    if downloader is not None:
        downloader.start()
    return stack


def open_layers(paths: list[str]) -> Stack:
    """A read-only stack of the read-only layer files ``paths`` (bottom first)."""
    with contextlib.ExitStack() as opened:
        stack = Stack([opened.enter_context(open_ro_layer(p)) for p in paths], readonly=True)
        opened.pop_all()
    return stack
