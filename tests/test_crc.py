"""Raw CRC32C (docs/formats.md §0.3)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from obd.formats import crc
from obd.formats._ext import load_ext
from tests.conftest import REPO


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


def _package_raw(data: bytes | bytearray | memoryview, seed: int) -> int:
    return ~crc32c.crc32c(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


def _ext() -> Any:
    ext = load_ext()
    if ext is None:
        pytest.skip("the batch extension is not built or is disabled (OBD_NO_EXT)")
    return ext


@given(st.binary(max_size=3000), st.integers(0, 0xFFFFFFFF), st.integers(0, 40))
def test_extension_matches_package(data: bytes, seed: int, cut: int) -> None:
    """``_zbatch.crc32c`` (what ``raw`` runs when it is built) is the raw CRC32C of the
    crc32c package, on bytes, bytearrays and memoryview slices, table code included."""
    ext = _ext()
    view = memoryview(data)[cut:]
    for s in (0, 100007, seed):
        want = _package_raw(data, s)
        assert ext.crc32c(data, s) == ext.crc32c(bytearray(data), s) == want
        assert ext.crc32c(data, s, table=True) == want
        assert ext.crc32c(view, s) == _package_raw(bytes(view), s) == crc.raw(view, s)


def test_backend_is_the_extension_when_built() -> None:
    _ext()
    assert crc.backend() == "zbatch"


def test_package_fallback_without_the_extension() -> None:
    """``OBD_NO_EXT``: the crc32c package, same values (a fresh interpreter)."""
    code = (
        "import sys\n"
        "from obd.formats import crc\n"
        "a, b = crc.raw(b'123456789', 0), crc.block_crc(memoryview(b'0123456789')[1:])\n"
        "print(crc.backend(), 'crc32c' in sys.modules, a, b)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OBD_NO_EXT": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["crc32c", "True", str(0x58E3FA20), str(0x3C9BD4E0)]
