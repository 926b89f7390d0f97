"""Image config files: ``config.v1.json`` (docs/formats.md §6.1).

Relative paths in a config are taken relative to the config file's folder (upstream
takes them relative to the daemon's working directory; absolute paths behave the same).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from obd.image.jsonconfig import load_json, parse, u32, u64


@dataclass(frozen=True)
class DownloadConfig:
    """``download``: background download of remote layers (the global config's own
    ``download`` key has the same shape and is the default for an image's)."""

    enable: bool = False
    delay: int = 300
    delayExtra: int = 30
    maxMBps: int = 100
    tryCnt: int = 5
    blockSize: int = u32(262144)


@dataclass(frozen=True)
class LayerConfig:
    file: str = ""
    dir: str = ""
    digest: str = ""
    size: int = u64(0)
    targetFile: str = ""
    targetDigest: str = ""
    gzipIndex: str = ""


@dataclass(frozen=True)
class UpperConfig:
    index: str = ""
    data: str = ""
    target: str = ""
    gzipIndex: str = ""

    @property
    def present(self) -> bool:
        return bool(self.index and self.data)


@dataclass(frozen=True)
class ImageConfig:
    repoBlobUrl: str = ""
    lowers: tuple[LayerConfig, ...] = field(default=(), metadata={"items": LayerConfig})
    upper: UpperConfig = field(default_factory=UpperConfig)
    resultFile: str = ""
    # None: inherited from the global config's ``download``
    download: DownloadConfig | None = field(default=None, metadata={"kind": DownloadConfig})
    accelerationLayer: bool = False
    recordTracePath: str = ""
    path: str = field(default="", metadata={"internal": True})

    @property
    def stacked_lowers(self) -> tuple[LayerConfig, ...]:
        """The lowers that make the disk, bottom first: with ``accelerationLayer`` the
        last lower carries a trace (§6.1), not data, and is not stacked."""
        if self.accelerationLayer and self.lowers:
            return self.lowers[:-1]
        return self.lowers


def _resolve(base: str, p: str) -> str:
    return p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def parse_image_config(doc: Any, path: str) -> ImageConfig:
    cfg: ImageConfig = parse(ImageConfig, doc, path)
    base = os.path.dirname(os.path.abspath(path))

    def paths(obj: Any, *keys: str) -> Any:
        return dataclasses.replace(obj, **{k: _resolve(base, getattr(obj, k)) for k in keys})

    return dataclasses.replace(
        cfg,
        path=path,
        lowers=tuple(paths(lc, "file", "dir", "targetFile", "gzipIndex") for lc in cfg.lowers),
        upper=paths(cfg.upper, "index", "data", "target", "gzipIndex"),
        resultFile=_resolve(base, cfg.resultFile),
        recordTracePath=_resolve(base, cfg.recordTracePath),
    )


def load_image_config(path: str | os.PathLike[str]) -> ImageConfig:
    p = os.fspath(path)
    return parse_image_config(load_json(p, "image config"), p)


def is_image_config(head: bytes) -> bool:
    """Whether a file that starts with ``head`` looks like a JSON image config."""
    return head.lstrip()[:1] == b"{"
