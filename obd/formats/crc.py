"""Raw CRC32C: Castagnoli, reflected, no initial and no final inversion (docs/formats.md §0.3).

Standard CRC-32C (the ``crc32c`` package) inverts the register on entry and on exit;
the raw variant is ``~S(data, ~seed)``. Seeds used by overlaybd: 0 (ZFile header and
trailer digest, ``index_crc``, gzip index, trace) and 100007 (ZFile per-block CRC).

Computed by the compiled extension (``_zbatch.crc32c``, the raw variant itself) when it
is built and allowed (:func:`obd.formats._ext.load_ext`), else by the ``crc32c``
package, imported only then (its import costs a CLI run ~20 ms).
"""

from __future__ import annotations

from collections.abc import Callable

from obd.formats._ext import load_ext

SEED_DIGEST = 0
SEED_BLOCK = 100007
_MASK = 0xFFFFFFFF

Buffer = bytes | bytearray | memoryview


def _package_raw() -> Callable[[Buffer, int], int]:
    from crc32c import crc32c

    def raw(data: Buffer, seed: int = 0) -> int:
        return ~crc32c(data, ~seed & _MASK) & _MASK

    return raw


def _pick() -> tuple[str, Callable[[Buffer, int], int]]:
    ext = load_ext()
    if ext is not None:
        return "zbatch", ext.crc32c
    return "crc32c", _package_raw()


# Picked at the first checksum, not at import: a command that computes none (a plain
# commit) then loads neither the extension (which maps liblz4 and libzstd) nor the package.
_backend: tuple[str, Callable[[Buffer, int], int]] | None = None


def _impl() -> Callable[[Buffer, int], int]:
    global _backend
    if _backend is None:
        _backend = _pick()
    return _backend[1]


def backend() -> str:
    """Which implementation :func:`raw` runs: "zbatch" (the extension) or "crc32c"."""
    _impl()
    assert _backend is not None
    return _backend[0]


def raw(data: Buffer, seed: int = 0) -> int:
    """Raw CRC32C of ``data`` starting from register value ``seed``."""
    return (_backend[1] if _backend is not None else _impl())(data, seed & _MASK)


def block_crc(data: Buffer) -> int:
    """The ZFile per-block checksum (seed 100007) of the stored compressed bytes."""
    return (_backend[1] if _backend is not None else _impl())(data, SEED_BLOCK)
