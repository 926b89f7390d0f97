"""Raw CRC32C (docs/formats.md §0.3)."""

from __future__ import annotations

import crc32c
from hypothesis import given
from hypothesis import strategies as st

from obd.formats import crc


def test_spec_vectors() -> None:
    assert crc.raw(b"123456789", 0) == 0x58E3FA20
    assert crc.raw(b"123456789", 100007) == 0x3C9BD4E0
    assert crc.block_crc(b"123456789") == 0x3C9BD4E0
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the standard variant, for contrast


def test_empty_is_seed() -> None:
    assert crc.raw(b"", 0) == 0
    assert crc.raw(b"", 100007) == 100007


def test_accepts_buffers() -> None:
    data = bytearray(b"123456789")
    assert crc.raw(memoryview(data), 0) == crc.raw(bytes(data), 0) == 0x58E3FA20


def _bitwise(data: bytes, seed: int) -> int:
    reg = seed
    for b in data:
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ (0x82F63B78 if reg & 1 else 0)
    return reg


@given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF))
def test_matches_bitwise_definition(data: bytes, seed: int) -> None:
    assert crc.raw(data, seed) == _bitwise(data, seed)


@given(st.binary(max_size=100), st.binary(max_size=100), st.integers(0, 0xFFFFFFFF))
def test_chains(a: bytes, b: bytes, seed: int) -> None:
    assert crc.raw(a + b, seed) == crc.raw(b, crc.raw(a, seed))
