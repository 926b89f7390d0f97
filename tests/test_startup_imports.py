"""Start-up of short commands: the numpy-free jump table that keeps ``obd zfile`` of a
small file fast gives what the numpy one gives, and when numpy is loaded after all.

What short commands do not import is checked in fresh subprocesses by
tests/test_zfile_cli.py (``obd zfile``) and tests/test_cli_main.py (``obd --help``).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from obd.formats import crc
from obd.formats._ext import load_ext
from obd.formats.codecs import get_codec
from obd.formats.zfile import HeaderTrailer, ZFileReader, decompress_to, validate, verify_blocks
from obd.formats.zfile.validate import ZFacts, block_problems, validate_zfile
from tests.test_zfile import MemFile, assemble, rewrite_trailer, zcompress
from tests.test_zfile_cli import _heavy_loaded
from tests.vectors import fill_mixed

BS = 4096


def _many_blocks(n: int) -> bytes:
    """A ZFile of ``n`` zero blocks (one stored record repeated), made directly."""
    rec = get_codec("lz4").compress(bytes(BS))
    return assemble([rec] * n, block_size=BS, original_size=n * BS)


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    """Just over :data:`validate.SMALL_TABLE` blocks: the numpy table path."""
    return _many_blocks(validate.SMALL_TABLE + 5)


def test_when_zfile_loads_numpy_or_crc32c(
    tmp_path: Any, big_blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of tests/test_zfile_cli.py's no-heavy-module test (and proof its
    probe sees them): a jump table past SMALL_TABLE entries is decoded with numpy, and
    without the extension the crc32c package computes the CRCs."""
    small = tmp_path / "small.zfile"
    small.write_bytes(_many_blocks(3))
    big = tmp_path / "big.zfile"
    big.write_bytes(big_blob)
    if load_ext() is not None:
        assert _heavy_loaded("zfile", "--verify", str(small)) == []
    assert "numpy" in _heavy_loaded("zfile", "--verify", str(big))
    monkeypatch.setenv("OBD_NO_EXT", "1")
    assert "crc32c" in _heavy_loaded("zfile", "--verify", str(small))


# ------------------------------------------------------- the two jump-table paths


def _flip(blob: bytes, pos: int) -> bytes:
    b = bytearray(blob)
    b[pos] ^= 0x40
    return bytes(b)


def _blobs() -> dict[str, bytes]:
    data = fill_mixed(11, 10 * BS + 123)
    good = zcompress(data)
    t = ZFileReader(MemFile(good))
    ioff, offs = t.index_offset, t.offsets.tolist()
    codec = get_codec("lz4")
    bad_len = assemble([b"", codec.compress(b"x")], block_size=BS, original_size=BS + 1)
    two = assemble([codec.compress(data[:BS])] * 2, block_size=BS, original_size=2 * BS)
    at = HeaderTrailer.unpack(two[-512:]).index_offset  # its second entry made longer
    table = bytearray(two[at : at + 8])
    struct.pack_into("<I", table, 4, struct.unpack_from("<I", table, 4)[0] + 10)
    past = two[:at] + bytes(table) + two[at + 8 :]
    past = rewrite_trailer(past, index_crc=crc.raw(bytes(table), 0))
    gap = good[:ioff] + bytes(100) + good[ioff:]
    gap = rewrite_trailer(gap, index_offset=ioff + 100)
    return {
        "good": good,
        "zstd": zcompress(data, algorithm="zstd"),
        "flipped block": _flip(good, offs[3] + 2),
        "flipped last block": _flip(good, offs[-2] + 1),
        "impossible length": bad_len,
        "past the end": past,
        "gap before the table": gap,
        "empty": zcompress(b""),
    }


def _everything(blob: bytes) -> dict[str, Any]:
    """What the validator, the reader, verify and check make of ``blob``."""
    facts = ZFacts()
    got: dict[str, Any] = {"problems": list(validate_zfile(MemFile(blob), facts, deep=True))}
    got["lengths"] = None if facts.lengths is None else [int(x) for x in facts.lengths]
    got["offsets"] = None if facts.offsets is None else [int(x) for x in facts.offsets]
    got["ok"] = facts.structure_ok
    if facts.structure_ok:
        got["blocks"] = list(block_problems(MemFile(blob), facts, threads=2))
    try:
        r = ZFileReader(MemFile(blob), cache_blocks=0)
    except Exception as e:
        got["open"] = repr(e)
        return got
    got["offsets_np"] = r.offsets.tolist()
    got["lengths_np"] = r.lengths.tolist()
    try:
        got["verify"] = verify_blocks(MemFile(blob))
    except Exception as e:
        got["verify"] = repr(e)
    out = MemFile()
    try:
        decompress_to(r, out, threads=2)
        got["content"] = bytes(out.buf)
    except Exception as e:
        got["content"] = repr(e)
    for at, n in ((0, 1), (BS - 1, 2), (3 * BS, 5 * BS)):
        try:
            got[f"pread {at}"] = r.pread(at, n)
        except Exception as e:
            got[f"pread {at}"] = repr(e)
    return got


@pytest.mark.parametrize("name", list(_blobs()))
def test_small_and_numpy_tables_agree(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = _blobs()[name]
    small = _everything(blob)
    assert small["offsets"] is None or not isinstance(small["offsets"], np.ndarray)
    monkeypatch.setattr(validate, "SMALL_TABLE", -1)  # every table: numpy
    assert _everything(blob) == small
    if name == "good":
        assert small["ok"] and small["verify"] == [] and small["problems"] == []
    if name == "flipped block":
        assert [b for b, _, _ in small["verify"]] == [3]


def test_tables_agree_past_the_limit(big_blob: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = ZFacts()
    assert list(validate_zfile(MemFile(big_blob), facts)) == []
    assert isinstance(facts.offsets, np.ndarray)
    monkeypatch.setattr(validate, "SMALL_TABLE", 1 << 30)  # every table: no numpy
    small = ZFacts()
    assert list(validate_zfile(MemFile(big_blob), small)) == []
    assert isinstance(small.offsets, list)
    assert small.offsets == facts.offsets.tolist()
    assert small.lengths is not None and facts.lengths is not None
    assert list(small.lengths) == facts.lengths.tolist()
    r = ZFileReader(MemFile(big_blob), cache_blocks=0)
    assert r.pread((r.nblocks - 1) * BS, 2 * BS) == bytes(BS)
    assert verify_blocks(MemFile(big_blob)) == []


def test_reader_tables_are_numpy_on_demand() -> None:
    r = ZFileReader(MemFile(zcompress(fill_mixed(5, 3 * BS))))
    assert r.offsets.dtype == np.int64 and r.lengths.dtype == np.uint32
    assert r.offsets is r.offsets  # built once
    assert np.diff(r.offsets).tolist() == r.lengths.tolist()
