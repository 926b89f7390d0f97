"""The compiled batch extension ``_zbatch.c``, when it is built and allowed.

One place decides whether it is used: :mod:`obd.formats.codecs` (batch block coding)
and :mod:`obd.formats.crc` (raw CRC32C) both ask :func:`load_ext`.
"""

from __future__ import annotations

import os
from typing import Any


def load_ext() -> Any:
    """The compiled batch path (``_zbatch.c``), or None when it is not built or when
    ``OBD_NO_EXT`` (or ``OBD_NO_SYSTEM_CODECS``) is set."""
    if os.environ.get("OBD_NO_EXT") or os.environ.get("OBD_NO_SYSTEM_CODECS"):
        return None
    try:
        from obd.formats import _zbatch  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _zbatch
