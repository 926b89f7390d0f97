"""create / commit / merge from the command line, and every bad input they meet."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from obd.formats.lsmt import HT_SLOT, HeaderTrailer
from obd.image import open_image
from obd.image.layers import open_ro_layer, open_rw_layer
from tests.conftest import REPO, assert_one_line_error, run_obd
from tests.vectors import require_vectors


def _layer(tmp_path, name="l", size="4M", *extra):
    d, i = tmp_path / f"{name}.data", tmp_path / f"{name}.index"
    r = run_obd("create", *extra, d, i, size)
    assert r.code == 0, r.err
    return d, i


# -- create ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expect"),
    [
        ("64M", 64 << 20),
        ("1", 1 << 30),
        ("512K", 512 << 10),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1536B", 1536),
    ],
)
def test_create_sizes(tmp_path, size, expect):
    d, i = _layer(tmp_path, "l", size)
    with open_rw_layer(str(d), str(i), readonly=True) as lay:
        assert lay.virtual_size == expect
    assert os.path.getsize(d) == HT_SLOT and os.path.getsize(i) == HT_SLOT


def test_create_headers_match_upstream_layout(tmp_path):
    d, i = _layer(tmp_path, "l", "1G", "-u", "6f766c62-6400-4000-8000-000000000f00")
    hd = HeaderTrailer.unpack(d.read_bytes()[:HT_SLOT])
    hi = HeaderTrailer.unpack(i.read_bytes()[:HT_SLOT])
    assert (hd.flags, hi.flags, hi.index_offset, hd.index_offset) == (3, 1, 4096, 0)
    assert hd.parent_uuid == "6F766C62-6400-4000-8000-000000000F00"
    assert hd.uuid == hi.uuid and hd.uuid == hd.uuid.upper() and len(hd.uuid) == 36
    assert (hd.version, hd.sub_version) == (1, 1)


def test_create_sparse(tmp_path):
    d, _ = _layer(tmp_path, "s", "8M", "-s")
    assert os.path.getsize(d) == HT_SLOT + (8 << 20)
    assert HeaderTrailer.unpack(d.read_bytes()[:HT_SLOT]).flags == 0x13


def test_create_refuses_unaligned_size_and_existing_files(tmp_path):
    r = run_obd("create", tmp_path / "a", tmp_path / "b", "1000K")
    assert r.code == 0  # 1000 KiB is a multiple of 512
    r = run_obd("create", tmp_path / "c", tmp_path / "d", "1000B")
    assert_one_line_error(r, 2, "512")
    assert not (tmp_path / "c").exists()
    r = run_obd("create", tmp_path / "a", tmp_path / "x", "1M")
    assert_one_line_error(r, 5, "already exists")
    assert not (tmp_path / "x").exists()
    r = run_obd("create", "-f", tmp_path / "a", tmp_path / "b", "2M")
    assert r.code == 0
    r = run_obd("create", tmp_path / "e", tmp_path / "f", "lots")
    assert r.code == 2 and "Traceback" not in r.err


def test_create_from_raw_round_trips_and_skips_zero_blocks(tmp_path):
    rng = random.Random(7)
    raw = bytearray(3 << 20)
    for _ in range(40):
        off = rng.randrange(0, len(raw) - 9000)
        raw[off : off + rng.randrange(1, 9000)] = rng.randbytes(9000)[: rng.randrange(1, 9000)]
    raw = raw[: 3 << 20]
    (tmp_path / "disk.raw").write_bytes(bytes(raw) + b"tail")  # not a multiple of 512
    d, i = tmp_path / "l.data", tmp_path / "l.index"
    r = run_obd("create", "--from", tmp_path / "disk.raw", d, i)
    assert r.code == 0, r.err
    with open_rw_layer(str(d), str(i), readonly=True) as lay:
        size = lay.virtual_size
        assert size == -(-(len(raw) + 4) // 512) * 512
        assert lay.pread(0, size) == (bytes(raw) + b"tail").ljust(size, b"\0")
        m = lay.mappings()
        stored = int(m.length[~m.zeroed].sum())
    nonzero_blocks = sum(1 for k in range(0, len(raw), 4096) if any(raw[k : k + 4096])) + 1
    assert stored * 512 <= nonzero_blocks * 4096
    r = run_obd("create", "--from", tmp_path / "disk.raw", tmp_path / "s.d", tmp_path / "s.i", "1M")
    assert_one_line_error(r, 2, "more than the layer size")


# -- commit / merge round trips -------------------------------------------------------


def _fill(stack_cfg, writes):
    with open_image(str(stack_cfg)) as img:
        for off, data in writes:
            img.pwrite(off, data)


def _config(tmp_path, lowers, upper=None, name="config.v1.json"):
    cfg = {"lowers": [{"file": str(p)} for p in lowers]}
    if upper:
        cfg["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return p


def test_commit_merge_raw_round_trip(tmp_path):
    rng = random.Random(1)
    model = bytearray(4 << 20)
    lowers = []
    for n in range(3):
        up = _layer(tmp_path, f"u{n}")
        cfg = _config(tmp_path, lowers, up)
        writes = []
        for _ in range(20):
            off = rng.randrange(0, 8000) * 512
            data = rng.randbytes(rng.randrange(1, 64) * 512)
            data = data[: len(model) - off]
            writes.append((off, data))
            model[off : off + len(data)] = data
        _fill(cfg, writes)
        out = tmp_path / f"l{n}.lsmt"
        r = run_obd("commit", "-m", f"layer {n}", *up, out)
        assert r.code == 0, r.err
        lowers.append(out)
    cfg = _config(tmp_path, lowers)
    r = run_obd("merge", "--compress=false", cfg, tmp_path / "m.lsmt")
    assert r.code == 0, r.err
    r = run_obd("merge", "--compress=false", "-o", tmp_path / "m2.lsmt", *lowers)
    assert r.code == 0, r.err
    assert (tmp_path / "m.lsmt").read_bytes() == (tmp_path / "m2.lsmt").read_bytes()
    with open_ro_layer(str(tmp_path / "m.lsmt")) as m:
        assert m.pread(0, len(model)) == bytes(model)
        assert m.uuid == "00000000-0000-0000-0000-000000000000"
    r = run_obd("merge", "--raw", "-o", tmp_path / "disk.raw", tmp_path / "m.lsmt")
    assert r.code == 0, r.err
    assert (tmp_path / "disk.raw").read_bytes() == bytes(model)


# -- bad input ---------------------------------------------------------------------


@pytest.fixture
def ro_layer(tmp_path):
    d = require_vectors()
    data = (d / "ro_basic.lsmt").read_bytes()
    return data


def _corrupt(tmp_path, data: bytes, at: int, xor: int = 0xFF) -> str:
    b = bytearray(data)
    b[at] ^= xor
    p = tmp_path / "bad.lsmt"
    p.write_bytes(bytes(b))
    return str(p)


def _trailer_offset(data: bytes) -> int:
    return len(data) - HT_SLOT


def _index_offset(data: bytes) -> int:
    return HeaderTrailer.unpack(data[-HT_SLOT:]).index_offset


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("header_magic", "no LSMT header"),
        ("header_flags", "flags"),
        ("trailer_magic", "bad magic"),
        ("trailer_flags", "flags"),
        ("trailer_index_size", "entries"),
        ("index_order", "out of order"),
        ("index_moffset", "outside the data area"),
    ],
)
def test_corrupt_read_only_layer(tmp_path, ro_layer, where, needle):
    t = _trailer_offset(ro_layer)
    ix = _index_offset(ro_layer)
    at, xor = {
        "header_magic": (1, 0xFF),
        "header_flags": (28, 0x02),
        "trailer_magic": (t + 3, 0xFF),
        "trailer_flags": (t + 28, 0x04),
        "trailer_index_size": (t + 43, 0x10),
        "index_order": (ix + 16 * 3 + 5, 0x40),  # offset of entry 3 jumps ahead
        "index_moffset": (ix + 16 * 2 + 14, 0x40),  # moffset of entry 2 far past the data
    }[where]
    bad = _corrupt(tmp_path, ro_layer, at, xor)
    before = Path(bad).read_bytes()
    r = run_obd("merge", "--raw", "-o", tmp_path / "out.raw", bad)
    assert_one_line_error(r, 4, "bad.lsmt", needle)
    assert not (tmp_path / "out.raw").exists()
    assert Path(bad).read_bytes() == before  # inputs never change


@pytest.mark.parametrize("keep", [0, 100, 4096, 8000, -4096, -1])
def test_truncated_layer(tmp_path, ro_layer, keep):
    p = tmp_path / "short.lsmt"
    p.write_bytes(ro_layer[:keep])
    r = run_obd("merge", "--raw", "-o", tmp_path / "o.raw", p)
    assert_one_line_error(r, 4, "short.lsmt")


def test_data_file_given_as_index_and_missing_files(tmp_path):
    d, i = _layer(tmp_path)
    r = run_obd("commit", d, d, tmp_path / "o")
    assert_one_line_error(r, 4, "not an LSMT index file")
    r = run_obd("commit", i, d, tmp_path / "o")
    assert_one_line_error(r, 4, "not a writable data-file header")
    r = run_obd("commit", tmp_path / "nope", i, tmp_path / "o")
    assert_one_line_error(r, 3, "nope", "no such file")
    r = run_obd("merge", "--raw", "-o", tmp_path / "o", tmp_path / "missing.lsmt")
    assert_one_line_error(r, 3, "missing.lsmt")
    assert not (tmp_path / "o").exists()


def test_commit_output_exists_and_message_too_long(tmp_path):
    d, i = _layer(tmp_path)
    (tmp_path / "o").write_bytes(b"keep me")
    r = run_obd("commit", d, i, tmp_path / "o")
    assert_one_line_error(r, 5, "already exists")
    assert (tmp_path / "o").read_bytes() == b"keep me"
    r = run_obd("commit", "-m", "x" * 257, d, i, tmp_path / "p")
    assert r.code == 2 and "256" in r.err
    r = run_obd("commit", "-f", d, i, tmp_path / "o")
    assert r.code == 0
    assert open_ro_layer(str(tmp_path / "o")).virtual_size == 4 << 20


def test_bad_image_configs(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    r = run_obd("merge", "--raw", tmp_path / "a.json", tmp_path / "o")
    assert_one_line_error(r, 7, "a.json", "bad JSON")
    (tmp_path / "b.json").write_text(json.dumps({"lowers": [{"file": 5}]}))
    r = run_obd("merge", "--raw", tmp_path / "b.json", tmp_path / "o")
    assert_one_line_error(r, 7, "lowers[0].file")
    (tmp_path / "c.json").write_text(
        json.dumps({"repoBlobUrl": "https://r/v2/x/blobs", "lowers": [{"digest": "sha256:00"}]})
    )
    r = run_obd("merge", "--raw", tmp_path / "c.json", tmp_path / "o")
    assert_one_line_error(r, 6, "remote")
    assert not (tmp_path / "o").exists()


def test_torn_index_record_is_dropped_with_warning(tmp_path):
    d, i = _layer(tmp_path)
    with open_rw_layer(str(d), str(i)) as lay:
        lay.pwrite(0, b"a" * 4096)
        lay.pwrite(8192, b"b" * 4096)
        lay.flush()
    with open(i, "ab") as f:
        f.write(b"\x01" * 9)  # a torn third record
    r = run_obd("commit", d, i, tmp_path / "o")
    assert r.code == 0, r.err
    assert "torn" in r.err
    with open_ro_layer(str(tmp_path / "o")) as ro:
        assert ro.pread(0, 12288) == b"a" * 4096 + bytes(4096) + b"b" * 4096


_WRITER = r"""
import sys
from obd.image.layers import open_rw_layer
lay = open_rw_layer(sys.argv[1], sys.argv[2])
n = 0
while True:
    lay.pwrite((n % 1000) * 4096, bytes([n % 251 + 1]) * 4096)
    n += 1
    if n % 50 == 0:
        lay.flush()
        print(n, flush=True)
"""


def test_kill_9_loses_nothing_flushed(tmp_path):
    d, i = _layer(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(d), str(i)], stdout=subprocess.PIPE, env=env
    )
    try:
        flushed = 0
        deadline = time.monotonic() + 30
        assert p.stdout is not None
        while flushed < 400 and time.monotonic() < deadline:
            flushed = int(p.stdout.readline())
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    assert flushed >= 400
    with open_rw_layer(str(d), str(i), readonly=True) as lay:
        for n in range(max(0, flushed - 1000), flushed):
            # the last flushed write of this block, or a later one that also landed
            ok = {bytes([m % 251 + 1]) * 4096 for m in range(n, n + 5000, 1000)}
            assert lay.pread((n % 1000) * 4096, 4096) in ok


def test_merge_image_with_upper_and_zero_size_upper(tmp_path):
    """An upper created with size 0 takes the lowers' size; merge flattens upper too."""
    rng = random.Random(3)
    base = _layer(tmp_path, "b", "2M")
    model = bytearray(2 << 20)
    with open_rw_layer(str(base[0]), str(base[1])) as lay:
        data = rng.randbytes(1 << 20)
        lay.pwrite(0, data)
        model[: 1 << 20] = data
    assert run_obd("commit", *base, tmp_path / "b.lsmt").code == 0
    up = _layer(tmp_path, "u", "0")
    cfg = _config(tmp_path, [tmp_path / "b.lsmt"], up)
    with open_image(str(cfg)) as img:
        assert img.virtual_size == 2 << 20
        img.pwrite(4096, b"x" * 8192)
        img.discard(65536, 65536)
        model[4096 : 4096 + 8192] = b"x" * 8192
        model[65536 : 65536 + 65536] = bytes(65536)
    with open_rw_layer(str(up[0]), str(up[1]), readonly=True) as lay:
        assert lay.virtual_size == 2 << 20  # the headers were rewritten
    for args in (["--compress=false"], []):
        out = tmp_path / f"m{len(args)}"
        r = run_obd("merge", *args, cfg, out)
        assert r.code == 0, r.err
        with open_ro_layer(str(out)) as m:
            assert m.pread(0, len(model)) == bytes(model)
    r = run_obd("merge", "--raw", cfg, tmp_path / "disk.raw")
    assert r.code == 0, r.err
    assert (tmp_path / "disk.raw").read_bytes() == bytes(model)


def test_read_only_image_refuses_writes(tmp_path):
    d = require_vectors()
    cfg = _config(tmp_path, [d / "ro_basic.lsmt"])
    from obd.errors import ReadOnlyError

    with open_image(str(cfg)) as img:
        assert img.readonly
        with pytest.raises(ReadOnlyError):
            img.pwrite(0, bytes(512))
        with pytest.raises(ReadOnlyError):
            img.discard(0, 512)
