"""Open the layers an image config (or a list of layer files) names and stack them.

What was opened is closed again when a later layer or the stack fails.
"""

from __future__ import annotations

import contextlib

from obd.image.config import ImageConfig
from obd.image.layers import local_layer_path, open_lower, open_ro_layer, open_rw_layer
from obd.image.stack import Stack


def open_config(cfg: ImageConfig, *, readonly: bool = False) -> Stack:
    layers = cfg.stacked_lowers
    with contextlib.ExitStack() as opened:
        lowers = [
            opened.enter_context(open_lower(lc, i, config_path=cfg.path))
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
    return stack


def open_layers(paths: list[str]) -> Stack:
    """A read-only stack of the read-only layer files ``paths`` (bottom first)."""
    with contextlib.ExitStack() as opened:
        stack = Stack([opened.enter_context(open_ro_layer(p)) for p in paths], readonly=True)
        opened.pop_all()
    return stack
