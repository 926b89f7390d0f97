"""Typed JSON config files as frozen dataclasses (the image and global configs, §6).

A dataclass declares the keys, their types and upstream's defaults; :func:`parse` builds
it from a decoded JSON object. A present key of the wrong type is a ConfigError naming
the file and the key (as ``a.b`` or ``lowers[2].file``); unknown keys are logged as
warnings and ignored; missing keys and missing nested objects take the defaults.
Field metadata: ``kind`` ("uint32", "uint64" or a dataclass, overriding the annotation),
``items`` (a dataclass: the key is a JSON array of such objects, kept as a tuple) and
``internal`` (not a JSON key).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import field
from typing import Any, get_type_hints

from obd.errors import ConfigError, FileAccessError
from obd.io.file import open_file

log = logging.getLogger(__name__)

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1


def u32(default: int) -> Any:
    return field(default=default, metadata={"kind": "uint32"})


def u64(default: int) -> Any:
    return field(default=default, metadata={"kind": "uint64"})


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def _type_name(kind: Any) -> str:
    if dataclasses.is_dataclass(kind):
        return "object"
    names = {str: "string", int: "integer", bool: "boolean", float: "number",
             "uint32": "unsigned integer", "uint64": "unsigned integer"}  # fmt: skip
    return names.get(kind, str(kind))


def _scalar(kind: Any, value: Any, name: str, path: str) -> Any:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, "uint32", "uint64"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(
            f"key {name} must be of type {_type_name(kind)}, not {json_type(value)}", path=path
        )
    if kind == "uint32" and not 0 <= value <= UINT32_MAX:
        raise ConfigError(f"key {name} must be between 0 and {UINT32_MAX}, not {value}", path=path)
    if kind == "uint64" and not 0 <= value <= UINT64_MAX:
        raise ConfigError(f"key {name} must not be negative, not {value}", path=path)
    return value


def parse(cls: type, obj: Any, path: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from the JSON object ``obj`` read from ``path``."""
    if not isinstance(obj, dict):
        where = prefix.rstrip(".") or "(top)"
        raise ConfigError(f"key {where} must be an object, not {json_type(obj)}", path=path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            log.warning("%s: unknown key %s%s ignored", path, prefix, key)
            continue
        name = prefix + key
        items = f.metadata.get("items")
        kind: Any = f.metadata.get("kind", hints[key])
        if items is not None:
            if not isinstance(value, list):
                raise ConfigError(
                    f"key {name} must be of type array, not {json_type(value)}", path=path
                )
            values[key] = tuple(parse(items, v, path, f"{name}[{i}].") for i, v in enumerate(value))
        elif dataclasses.is_dataclass(kind):
            values[key] = parse(kind, value, path, name + ".")  # type: ignore[arg-type]
        else:
            values[key] = _scalar(kind, value, name, path)
    return cls(**values)


def load_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read and decode a JSON file; errors name the file (FileAccessError, ConfigError)."""
    p = os.fspath(path)
    try:
        # open_file refuses what is not a regular file (a FIFO would block open())
        with open_file(p) as f:
            text = f.pread(0, f.size()).decode("utf-8")
    except FileAccessError as e:
        if not os.path.lexists(p):
            raise FileAccessError(f"no such {what}", path=p) from None
        raise FileAccessError(f"cannot read {what}: {e.message}", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileAccessError(f"cannot read {what}: {e}", path=p) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"bad JSON at line {e.lineno} column {e.colno}: {e.msg}", path=p
        ) from None
