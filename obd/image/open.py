"""Open the layers an image config names and stack them."""

from __future__ import annotations

from obd.formats.lsmt import LSMTReadOnly
from obd.formats.lsmt.rw import LSMTWritable
from obd.image.config import ImageConfig
from obd.image.layers import local_layer_path, open_lower, open_rw_layer
from obd.image.stack import Stack


def open_config(cfg: ImageConfig, *, readonly: bool = False) -> Stack:
    lowers: list[LSMTReadOnly] = []
    upper: LSMTWritable | None = None
    try:
        layers = cfg.stacked_lowers
        for i, layer in enumerate(layers):
            lowers.append(open_lower(layer, i, config_path=cfg.path))
        if cfg.upper.present:
            upper = open_rw_layer(cfg.upper.data, cfg.upper.index, readonly=readonly)
        names = [local_layer_path(lc) or lc.digest for lc in layers]
        return Stack(lowers, upper, readonly=readonly, names=names)
    except BaseException:
        for lay in lowers:
            lay.close()
        if upper is not None:
            upper.close()
        raise
