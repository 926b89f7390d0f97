"""Byte layouts declared once: field names, struct codes, offsets and flag names.

A format module declares each on-disk structure as one :class:`Layout` (the ordered
``(name, struct code)`` pairs of the spec's table) beside the frozen dataclass that
packs and unpacks it; readers, ``obd inspect`` and ``obd check`` take field offsets
(``LAYOUT.offset("flags")``) and flag names (:func:`flag_names`) from there, never from
literals. ``tests/test_layouts.py`` checks every layout against the spec's tables.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

FlagNames = tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Layout:
    """A packed little-endian structure: ``struct`` plus each field's byte offset."""

    fields: tuple[tuple[str, str], ...]
    struct: struct.Struct = field(init=False, repr=False)
    offsets: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets: dict[str, int] = {}
        pos = 0
        for name, code in self.fields:
            offsets[name] = pos
            pos += struct.calcsize("<" + code)
        object.__setattr__(self, "struct", struct.Struct("<" + "".join(c for _, c in self.fields)))
        object.__setattr__(self, "offsets", offsets)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def size(self) -> int:
        return self.struct.size

    def offset(self, name: str) -> int:
        """Byte offset of field ``name`` in the structure."""
        return self.offsets[name]

    def unpack_field(self, data: bytes | bytearray | memoryview, name: str) -> object:
        """One field of ``data`` (which starts at the structure's first byte)."""
        code = dict(self.fields)[name]
        return struct.unpack_from("<" + code, data, self.offsets[name])[0]


class FlagBit:
    """A read-only ``bool`` attribute: whether ``mask`` is set in the owner's ``flags``.

    Header/trailer classes declare their flag properties with it
    (``is_sealed = FlagBit(FLAG_SEALED)``) instead of writing each one out.
    """

    __slots__ = ("mask",)

    def __init__(self, mask: int) -> None:
        self.mask = mask

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> FlagBit: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> bool: ...
    def __get__(self, obj: Any, owner: type | None = None) -> FlagBit | bool:
        if obj is None:
            return self
        return bool(obj.flags & self.mask)


def flag_names(value: int, table: FlagNames, bits: int) -> list[str]:
    """Names of the set bits of ``value`` among ``bits``; unnamed bits as ``bitN``."""
    out = [name for mask, name in table if value & mask & bits]
    known = sum(m for m, _ in table)
    for b in range(bits.bit_length()):
        if value & bits & ~known & (1 << b):
            out.append(f"bit{b}")
    return out


def differing(a: object, b: object, names: Sequence[str]) -> list[str]:
    """The fields among ``names`` on which ``a`` and ``b`` disagree."""
    return [n for n in names if getattr(a, n) != getattr(b, n)]
