"""Image config files: ``config.v1.json`` (FORMATS.md §6.1).

Relative paths in a config are taken relative to the config file's folder (upstream
takes them relative to the daemon's working directory; absolute paths behave the same).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from obd.errors import ConfigError, FileAccessError

log = logging.getLogger(__name__)

_LAYER_KEYS = {
    "file": str,
    "dir": str,
    "digest": str,
    "size": int,
    "targetFile": str,
    "targetDigest": str,
    "gzipIndex": str,
}
_UPPER_KEYS = {"index": str, "data": str, "target": str, "gzipIndex": str}
_DOWNLOAD_KEYS = {
    "enable": bool,
    "delay": int,
    "delayExtra": int,
    "maxMBps": int,
    "tryCnt": int,
    "blockSize": int,
}
_TOP_KEYS = {
    "repoBlobUrl": str,
    "lowers": list,
    "upper": dict,
    "resultFile": str,
    "download": dict,
    "accelerationLayer": bool,
    "recordTracePath": str,
}


@dataclass(frozen=True)
class LayerConfig:
    file: str = ""
    dir: str = ""
    digest: str = ""
    size: int = 0
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
class DownloadConfig:
    enable: bool = False
    delay: int = 300
    delayExtra: int = 30
    maxMBps: int = 100
    tryCnt: int = 5
    blockSize: int = 262144


@dataclass(frozen=True)
class ImageConfig:
    path: str
    repoBlobUrl: str = ""
    lowers: tuple[LayerConfig, ...] = ()
    upper: UpperConfig = field(default_factory=UpperConfig)
    resultFile: str = ""
    download: DownloadConfig | None = None  # None: inherited from the global config
    accelerationLayer: bool = False
    recordTracePath: str = ""


def _typed(obj: dict[str, Any], keys: Mapping[str, type], path: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        t = keys.get(k)
        if t is None:
            log.warning("%s: unknown key %s%s ignored", path, where, k)
            continue
        ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
        if t is int and ok and v < 0:
            raise ConfigError(f"key {where}{k} must not be negative", path=path)
        if not ok:
            raise ConfigError(
                f"key {where}{k} must be of type {_TYPE_NAMES[t]}, not {type(v).__name__}",
                path=path,
            )
        out[k] = v
    return out


_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}


def _resolve(base: str, p: str) -> str:
    return p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def parse_image_config(doc: Any, path: str) -> ImageConfig:
    if not isinstance(doc, dict):
        raise ConfigError("an image config must be a JSON object", path=path)
    top = _typed(doc, _TOP_KEYS, path, "")
    base = os.path.dirname(os.path.abspath(path))
    lowers = []
    for i, item in enumerate(top.get("lowers", [])):
        if not isinstance(item, dict):
            raise ConfigError(f"key lowers[{i}] must be an object", path=path)
        lc = _typed(item, _LAYER_KEYS, path, f"lowers[{i}].")
        for k in ("file", "dir", "targetFile", "gzipIndex"):
            if k in lc:
                lc[k] = _resolve(base, lc[k])
        lowers.append(LayerConfig(**lc))
    up = _typed(top.get("upper", {}), _UPPER_KEYS, path, "upper.")
    for k in up:
        up[k] = _resolve(base, up[k])
    download = None
    if "download" in top:
        download = DownloadConfig(**_typed(top["download"], _DOWNLOAD_KEYS, path, "download."))
    return ImageConfig(
        path=path,
        repoBlobUrl=top.get("repoBlobUrl", ""),
        lowers=tuple(lowers),
        upper=UpperConfig(**up),
        resultFile=_resolve(base, top.get("resultFile", "")),
        download=download,
        accelerationLayer=top.get("accelerationLayer", False),
        recordTracePath=_resolve(base, top.get("recordTracePath", "")),
    )


def load_image_config(path: str | os.PathLike[str]) -> ImageConfig:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileAccessError("no such image config", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileAccessError(f"cannot read image config: {e}", path=p) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"bad JSON at line {e.lineno} column {e.colno}: {e.msg}", path=p
        ) from None
    return parse_image_config(doc, p)


def is_image_config(head: bytes) -> bool:
    """Whether a file that starts with ``head`` looks like a JSON image config."""
    return head.lstrip()[:1] == b"{"
