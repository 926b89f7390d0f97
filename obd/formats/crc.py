"""Raw CRC32C: Castagnoli, reflected, no initial and no final inversion (docs/formats.md §0.3).

Standard CRC-32C (the ``crc32c`` package) inverts the register on entry and on exit;
the raw variant is ``~S(data, ~seed)``. Seeds used by overlaybd: 0 (ZFile header and
trailer digest, ``index_crc``, gzip index, trace) and 100007 (ZFile per-block CRC).
"""

from __future__ import annotations

from crc32c import crc32c as _crc32c

SEED_DIGEST = 0
SEED_BLOCK = 100007
_MASK = 0xFFFFFFFF


def raw(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Raw CRC32C of ``data`` starting from register value ``seed``."""
    return ~_crc32c(data, ~seed & _MASK) & _MASK


def block_crc(data: bytes | bytearray | memoryview) -> int:
    """The ZFile per-block checksum (seed 100007) of the stored compressed bytes."""
    return raw(data, SEED_BLOCK)
