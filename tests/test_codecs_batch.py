"""The compiled batch codec path (obd/formats/_zbatch.c) against the fallback path.

Both paths must write the same bytes (same system library, same CRC), read the same
bytes, and report the same bad blocks with the same problems; both must read every
upstream ZFile vector to its digest. Skips with a reason when the extension is not
built (no compiler or headers at install time) or the system libraries do not load.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.formats import codecs, crc
from obd.formats.codecs import (
    PROBLEM_CRC,
    PROBLEM_DECODE,
    PROBLEM_SIZE,
    Codec,
    fallback_codec,
    get_codec,
)
from obd.formats.zfile import ZFileReader
from obd.io.file import open_file
from tests.vectors import require_vectors, vector_params

ALGOS = ("lz4", "zstd")


def _ext() -> Any:
    if os.environ.get("OBD_NO_EXT"):
        pytest.skip("OBD_NO_EXT is set: the batch extension is disabled")
    ext = codecs._ext()
    if ext is None:
        pytest.skip("obd.formats._zbatch is not built (no compiler or liblz4/libzstd headers)")
    return ext


def _pair(algo: str) -> tuple[Codec, Codec]:
    """(extension codec, fallback codec); the fallback must be the same system library."""
    _ext()
    native, fallback = get_codec(algo), fallback_codec(algo)
    assert getattr(native, "batch", None) == "zbatch"
    if getattr(fallback, "batch", None) != "ctypes":
        pytest.skip(f"{algo}: no system library through ctypes to compare with")
    return native, fallback


def _data(seed: int, size: int) -> bytes:
    """Mixed content: random, text, zeros and runs, in random-length pieces."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    while len(out) < size:
        n = int(rng.integers(1, 9000))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            out += rng.bytes(n)
        elif kind == 1:
            out += (b"seed %d the quick brown fox jumps over the lazy dog\n" % seed) * (n // 50 + 1)
        elif kind == 2:
            out += bytes(n)
        else:
            out += bytes([int(rng.integers(0, 256))]) * n
    return bytes(out[:size])


# ---------------------------------------------------------------------------- CRC


def test_crc_spec_vectors() -> None:
    """docs/formats.md §0.3 test vectors, on the CPU instruction and on the table."""
    ext = _ext()
    for table in (False, True):
        assert ext.crc32c(b"123456789", 0, table=table) == 0x58E3FA20
        assert ext.crc32c(b"123456789", 100007, table=table) == 0x3C9BD4E0
        assert ext.crc32c(b"", 100007, table=table) == 100007


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 7))
@settings(max_examples=200, deadline=None)
def test_crc_matches_reference(data: bytes, seed: int, skew: int) -> None:
    """Any length and alignment: hardware, table and the crc32c package agree."""
    ext = _ext()
    view = memoryview(b"\0" * skew + data)[skew:]
    want = crc.raw(data, seed)
    assert ext.crc32c(view, seed) == want
    assert ext.crc32c(view, seed, table=True) == want


# ------------------------------------------------------------- random round trips

block_sizes = st.sampled_from([512, 4096, 8192, 16384, 65536])


@pytest.mark.parametrize("algo", ALGOS)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(0, 300_000),
    block_size=block_sizes,
    with_crc=st.booleans(),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_paths_agree_byte_for_byte(
    algo: str, seed: int, size: int, block_size: int, with_crc: bool
) -> None:
    native, fallback = _pair(algo)
    data = _data(seed, size)
    stored_n, lengths_n = native.compress_blocks(data, block_size, with_crc)
    stored_f, lengths_f = fallback.compress_blocks(data, block_size, with_crc)
    assert bytes(stored_n) == bytes(stored_f)
    assert lengths_n == lengths_f
    nblocks = len(lengths_n)
    if not size:
        return
    last_raw = size - (nblocks - 1) * block_size
    for decoder in (native, fallback):
        for lengths in (lengths_n, np.asarray(lengths_n, dtype=np.uint32)):
            out = bytearray(nblocks * block_size)
            assert (
                decoder.decompress_blocks(stored_n, lengths, out, block_size, last_raw, with_crc)
                == []
            )
            assert bytes(out[:size]) == data
    if with_crc:
        assert codecs.bad_crcs(stored_n, lengths_n) == []
        assert codecs._bad_crcs_python(stored_n, lengths_n) == []


@pytest.mark.parametrize("algo", ALGOS)
@given(
    seed=st.integers(0, 2**32 - 1),
    nblocks=st.integers(1, 40),
    with_crc=st.booleans(),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_paths_report_the_same_bad_blocks(
    algo: str, seed: int, nblocks: int, with_crc: bool, data: st.DataObject
) -> None:
    """Flipped bytes: the same (index, problem) list from both paths, and the good blocks
    decode the same."""
    native, fallback = _pair(algo)
    bs = 4096
    size = nblocks * bs - data.draw(st.integers(0, bs - 1))
    raw = _data(seed, size)
    stored, lengths = native.compress_blocks(raw, bs, with_crc)
    damaged = bytearray(stored)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    last_raw = size - (nblocks - 1) * bs
    outs, reports = [], []
    for decoder in (native, fallback):
        out = bytearray(nblocks * bs)
        reports.append(decoder.decompress_blocks(damaged, lengths, out, bs, last_raw, with_crc))
        outs.append(out)
    assert reports[0] == reports[1]
    bad = {i for i, _ in reports[0]}
    for i in range(nblocks):
        if i not in bad:
            piece = slice(i * bs, i * bs + (bs if i < nblocks - 1 else last_raw))
            assert outs[0][piece] == outs[1][piece]
    if with_crc:
        flagged = [i for i, problem in reports[0] if problem == PROBLEM_CRC]
        assert codecs.bad_crcs(damaged, lengths) == flagged
        assert codecs._bad_crcs_python(damaged, lengths) == flagged
        # CRC32C's Hamming distance is at least 4 up to 2**31 bits: 3 flips never escape
        changed = {
            i
            for i, (s, e) in enumerate(
                zip(np.cumsum([0, *lengths[:-1]]), np.cumsum(lengths), strict=True)
            )
            if damaged[s:e] != stored[s:e]
        }
        assert set(flagged) == changed


@pytest.mark.parametrize("algo", ALGOS)
def test_every_problem_is_reported_by_both(algo: str) -> None:
    """A CRC mismatch, a body that does not decode and one that decodes short."""
    native, fallback = _pair(algo)
    bs = 4096
    blocks = [_data(i, bs) for i in range(3)]
    short = native.compress(blocks[2][:100])  # a valid body of the wrong size
    parts = [native.compress(b) for b in blocks[:2]]
    records = [p + crc.block_crc(p).to_bytes(4, "little") for p in [*parts, short]]
    records[0] = records[0][:-1] + bytes([records[0][-1] ^ 0xFF])  # CRC mismatch
    garbage = b"\xff" * 40
    records.insert(1, garbage + crc.block_crc(garbage).to_bytes(4, "little"))
    stored = b"".join(records)
    lengths = [len(r) for r in records]
    want = [(0, PROBLEM_CRC), (1, PROBLEM_DECODE), (3, PROBLEM_SIZE)]
    for decoder in (native, fallback):
        out = bytearray(4 * bs)
        assert decoder.decompress_blocks(stored, lengths, out, bs, bs, True) == want
        assert out[2 * bs : 3 * bs] == blocks[1]
        with pytest.raises(ValueError, match=PROBLEM_DECODE):
            decoder.decompress(garbage, bs)
        with pytest.raises(ValueError, match=PROBLEM_SIZE):
            decoder.decompress(short, bs)
        assert decoder.decompress(parts[1], bs) == blocks[1]


@pytest.mark.parametrize("algo", ALGOS)
def test_buffers_too_small_are_refused(algo: str) -> None:
    """The C code never runs past a buffer: both paths refuse with the same message."""
    native, fallback = _pair(algo)
    stored, lengths = native.compress_blocks(_data(7, 3 * 4096), 4096, True)
    for decoder in (native, fallback):
        with pytest.raises(ValueError, match="stored buffer shorter"):
            decoder.decompress_blocks(stored[:-1], lengths, bytearray(3 * 4096), 4096, 4096, True)
        with pytest.raises(ValueError, match="output buffer too small"):
            decoder.decompress_blocks(stored, lengths, bytearray(3 * 4096 - 1), 4096, 4096, True)
        with pytest.raises(ValueError, match="shorter than its CRC"):
            decoder.decompress_blocks(b"\0" * 8, [3, 5], bytearray(8192), 4096, 4096, True)
    with pytest.raises(ValueError, match="output buffer too small"):
        _ext().compress_blocks(native.algo_id, b"x" * 5000, 4096, True, bytearray(100), 3)


@pytest.mark.parametrize("algo", ALGOS)
def test_empty_input(algo: str) -> None:
    """LZ4 makes no block of nothing; zstd makes one empty frame (as ZSTD_compress)."""
    native, fallback = _pair(algo)
    got = [
        (bytes(s), n) for s, n in (c.compress_blocks(b"", 4096, True) for c in (native, fallback))
    ]
    assert got[0] == got[1]
    assert len(got[0][1]) == (1 if algo == "zstd" else 0)


def test_ext_off_by_environment() -> None:
    _ext()
    code = (
        "from obd.formats.codecs import get_codec, have_extension;"
        "print(have_extension(), get_codec('lz4').batch, get_codec('zstd').batch)"
    )
    env = {**os.environ, "OBD_NO_EXT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "ctypes", "ctypes"]


# ------------------------------------------------------------------------ vectors


@pytest.mark.parametrize("v", vector_params("zfile", "lsmt_ro_zfile"))
def test_vector_blocks_both_paths(v: dict[str, Any]) -> None:
    """Every block run of every ZFile vector: same bytes from both paths, the vector's
    digest, no bad CRC; re-compressed, the same stored bytes from both paths (and the
    vector's own where the library is the one it was made with)."""
    vdir = require_vectors()
    name = v["files"].get("zfile") or v["files"]["layer"]
    digest = v["zfile"].get("decompressed_sha256") or v["sha256"]
    with ZFileReader(open_file(str(vdir / name))) as r, open_file(str(vdir / name)) as f:
        native, fallback = _pair(r.codec.name)
        offsets, lengths = r.offsets, r.lengths
        so, eo = int(offsets[0]), int(offsets[-1])
        stored = f.pread(so, eo - so)
        bs, n, size, verify = r.block_size, r.nblocks, r.original_file_size, r.verify
    last_raw = size - (n - 1) * bs
    outs = []
    for decoder in (native, fallback):
        out = bytearray(n * bs)
        assert decoder.decompress_blocks(stored, lengths, out, bs, last_raw, verify) == []
        outs.append(bytes(out[:size]))
    assert outs[0] == outs[1]
    assert hashlib.sha256(outs[0]).hexdigest() == digest
    if verify:
        assert codecs.bad_crcs(stored, lengths) == []
    again = [c.compress_blocks(outs[0], bs, verify) for c in (native, fallback)]
    assert bytes(again[0][0]) == bytes(again[1][0])
    assert again[0][1] == again[1][1]
    if native.matches_vectors():
        assert bytes(again[0][0]) == stored
