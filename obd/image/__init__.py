"""Images: stacks of layers described by image configs, and what is done with them."""

from __future__ import annotations

from obd.image.config import ImageConfig, load_image_config
from obd.image.stack import Stack


def open_image(config_path: str, *, readonly: bool = False) -> Stack:
    """Open the image an image config describes, as a :class:`Stack` (a BlockDevice)."""
    from obd.image.open import open_config

    return open_config(load_image_config(config_path), readonly=readonly)


def open_layers(paths: list[str]) -> Stack:
    """A read-only :class:`Stack` of read-only layer files, listed bottom first."""
    from obd.image.open import open_layers as _open_layers

    return _open_layers(paths)


__all__ = ["ImageConfig", "Stack", "load_image_config", "open_image", "open_layers"]
