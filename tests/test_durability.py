"""Writable layers after a crash, beside another writer, and opened read-only (issue 8).

Each test here reproduces a way the writable layer lost or corrupted data before:
a torn index tail or data tail followed by more writes, records of appends a crash lost,
a second writer, a size-0 upper opened read-only, a mismatched data/index pair, a flush
that stalled reads, a seal over a torn data tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from obd.errors import CorruptError, FileAccessError
from obd.formats.lsmt import ENTRY_SIZE, HT_SLOT
from obd.image import open_image, ops
from obd.image.layers import open_ro_layer, open_rw_layer
from obd.io.file import LocalFile
from tests.conftest import REPO, assert_one_line_error, run_obd

MiB = 1 << 20


@pytest.fixture
def layer(tmp_path):
    d, i = str(tmp_path / "l.data"), str(tmp_path / "l.index")
    ops.create(d, i, 4 * MiB)
    return d, i


def _fill(d: str, i: str, writes: list[tuple[int, bytes]]) -> None:
    with open_rw_layer(d, i) as lay:
        for off, data in writes:
            lay.pwrite(off, data)
        lay.flush()


def test_torn_index_tail_then_more_writes(layer):
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096)])
    with open(i, "ab") as f:
        f.write(b"\1\2\3\4\5")  # a crash tore the next record
    _fill(d, i, [(8192, b"b" * 4096)])
    assert (os.path.getsize(i) - HT_SLOT) % ENTRY_SIZE == 0  # the writer cut the torn bytes
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, 12288) == b"a" * 4096 + bytes(4096) + b"b" * 4096


def test_torn_index_tail_is_left_alone_by_readers(layer):
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096)])
    with open(i, "ab") as f:
        f.write(b"\1\2\3")
    before = os.path.getsize(i)
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, 4096) == b"a" * 4096
    assert os.path.getsize(i) == before


def test_unaligned_data_tail_then_more_writes(layer, tmp_path):
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096)])
    with open(d, "ab") as f:
        f.write(b"\xee" * 100)  # a torn append
    _fill(d, i, [(8192, b"b" * 4096), (4096, b"c" * 512)])
    with open_rw_layer(d, i, readonly=True) as lay:
        want = b"a" * 4096 + b"c" * 512 + bytes(3584) + b"b" * 4096
        assert lay.pread(0, 12288) == want
    out = tmp_path / "o.lsmt"
    ops.commit(d, i, str(out))
    with open_ro_layer(str(out)) as ro:
        assert ro.pread(0, 12288) == want
    ops.seal(d, i)  # the index goes to the next whole sector
    with open_ro_layer(d) as sealed:
        assert sealed.pread(0, 12288) == want


def test_appends_lost_in_a_crash_are_dropped_and_cut(layer):
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096)])
    acked = os.path.getsize(d)
    _fill(d, i, [(4096, b"b" * 4096), (0, b"c" * 512)])
    os.truncate(d, acked)  # the data of the last two writes never reached the disk
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, 8192) == b"a" * 4096 + bytes(4096)
    _fill(d, i, [(1 << 20, b"d" * 8192)])  # a writer cuts them off, then appends
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, 8192) == b"a" * 4096 + bytes(4096)
        assert lay.pread(1 << 20, 8192) == b"d" * 8192


def test_a_good_record_after_one_past_the_end_is_corruption(layer, tmp_path):
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096), (4096, b"b" * 4096)])
    raw = bytearray(Path(i).read_bytes())
    first, second = HT_SLOT, HT_SLOT + ENTRY_SIZE
    # swap the records: the one that maps past the (truncated) end now comes first
    raw[first:second], raw[second : second + ENTRY_SIZE] = (
        raw[second : second + ENTRY_SIZE],
        raw[first:second],
    )
    Path(i).write_bytes(raw)
    os.truncate(d, HT_SLOT + 4096)
    with pytest.raises(CorruptError, match="past the data file's end"):
        open_rw_layer(d, i, readonly=True)
    r = run_obd("commit", d, i, tmp_path / "o")
    assert_one_line_error(r, 4, i, "past the data file's end")


def test_data_and_index_of_different_layers_are_refused(tmp_path, layer):
    d, _ = layer
    d2, i2 = str(tmp_path / "m.data"), str(tmp_path / "m.index")
    ops.create(d2, i2, 4 * MiB)
    with pytest.raises(CorruptError, match="belongs to layer"):
        open_rw_layer(d, i2)
    r = run_obd("commit", d, i2, tmp_path / "o")
    assert_one_line_error(r, 4, i2, "belongs to layer")


def test_second_writer_in_one_process_is_refused(layer):
    d, i = layer
    with open_rw_layer(d, i):
        with pytest.raises(FileAccessError, match="in use by this process"):
            open_rw_layer(d, i)
        with open_rw_layer(d, i, readonly=True) as ro:  # readers take no lock
            assert ro.pread(0, 512) == bytes(512)
    with open_rw_layer(d, i):  # the lock went with the first writer
        pass


_HOLDER = r"""
import sys, time
from obd.image.layers import open_rw_layer
lay = open_rw_layer(sys.argv[1], sys.argv[2])
lay.pwrite(0, b"h" * 4096)
lay.flush()
print("ready", flush=True)
time.sleep(60)
"""


def test_second_writer_in_another_process_is_refused(layer, tmp_path):
    d, i = layer
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, d, i], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        before = hashlib.sha256(Path(d).read_bytes()).hexdigest()
        r = run_obd("commit", "--seal", d, i)
        assert_one_line_error(r, 3, d, f"in use by process {p.pid}")
        assert hashlib.sha256(Path(d).read_bytes()).hexdigest() == before
        # a reader (commit into a new file) still works beside the writer
        r = run_obd("commit", d, i, tmp_path / "o.lsmt")
        assert r.code == 0, r.err
    finally:
        p.kill()
        p.wait(timeout=10)
    r = run_obd("commit", "--seal", d, i)  # the holder is gone: its lock too
    assert r.code == 0, r.err


def test_zero_size_upper_opened_read_only_writes_nothing(tmp_path):
    base_d, base_i = str(tmp_path / "b.data"), str(tmp_path / "b.index")
    ops.create(base_d, base_i, 2 * MiB)
    _fill(base_d, base_i, [(0, b"z" * 8192)])
    ops.commit(base_d, base_i, str(tmp_path / "b.lsmt"))
    up_d, up_i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    r = run_obd("create", up_d, up_i, "0")
    assert r.code == 0, r.err
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(
        json.dumps({"lowers": [{"file": "b.lsmt"}], "upper": {"data": up_d, "index": up_i}})
    )
    before = [Path(p).read_bytes() for p in (up_d, up_i)]
    r = run_obd("map", cfg)
    assert r.code == 0, r.err
    r = run_obd("merge", "--raw", cfg, tmp_path / "disk.raw")
    assert r.code == 0, r.err
    assert (tmp_path / "disk.raw").read_bytes() == b"z" * 8192 + bytes(2 * MiB - 8192)
    with open_image(str(cfg), readonly=True) as img:
        assert img.virtual_size == 2 * MiB
    assert [Path(p).read_bytes() for p in (up_d, up_i)] == before


def test_flush_does_not_stall_reads(layer, monkeypatch):
    """A slow fsync must not hold the layer lock: reads (and writes) go on meanwhile."""
    d, i = layer
    _fill(d, i, [(0, b"a" * 4096)])
    in_fsync = threading.Event()
    release = threading.Event()
    real_flush = LocalFile.flush

    def slow_flush(self: LocalFile) -> None:
        in_fsync.set()
        release.wait(10)
        real_flush(self)

    with open_rw_layer(d, i) as lay:
        lay.pwrite(4096, b"b" * 4096)
        monkeypatch.setattr(LocalFile, "flush", slow_flush)
        t = threading.Thread(target=lay.flush)
        t.start()
        try:
            assert in_fsync.wait(10)
            t0 = time.monotonic()
            assert lay.pread(0, 8192) == b"a" * 4096 + b"b" * 4096
            lay.pwrite(8192, b"c" * 512)
            assert time.monotonic() - t0 < 5
        finally:
            release.set()
            t.join(10)
        monkeypatch.setattr(LocalFile, "flush", real_flush)
        lay.flush()
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(8192, 512) == b"c" * 512


def test_flush_syncs_data_before_index(layer, monkeypatch):
    d, i = layer
    order: list[str] = []
    real_flush = LocalFile.flush

    def record(self: LocalFile) -> None:
        order.append(os.path.basename(self.path))
        real_flush(self)

    with open_rw_layer(d, i) as lay:
        lay.pwrite(0, b"x" * 512)
        monkeypatch.setattr(LocalFile, "flush", record)
        lay.flush()
    assert order == ["l.data", "l.index"]


def test_create_renames_the_data_file_before_the_index(tmp_path, monkeypatch):
    """After a crash between the two renames, an index never names a missing data file."""
    import obd.io.file as iofile

    renamed: list[str] = []
    real_link = os.link

    def link(src, dst, *a, **k):
        renamed.append(os.path.basename(dst))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(iofile.os, "link", link)
    ops.create(str(tmp_path / "n.data"), str(tmp_path / "n.index"), MiB)
    assert renamed == ["n.data", "n.index"]


def test_two_servers_on_one_upper(tmp_path):
    """A second ``obd serve`` of an image whose upper is already served is refused."""
    from tests.nbd_helpers import ServeProcess, serve_config, writable_image

    cfg = writable_image(tmp_path, "vm")
    gcfg = serve_config(tmp_path)
    with ServeProcess(["--config", str(gcfg), "--listen", "127.0.0.1:0", str(cfg)]) as first:
        assert (tmp_path / "vm.result").read_text() == "success"
        (tmp_path / "vm.result").unlink()
        r = run_obd("serve", "--nbd", "--config", gcfg, "--listen", "127.0.0.1:0", cfg, timeout=30)
        assert r.code == 3, r.err
        assert f"vm.data: in use by process {first.pid}" in r.err.splitlines()[-1]
        assert (tmp_path / "vm.result").read_text().startswith("failed:")


def test_sparse_upper_over_a_lower_reads_the_same_after_reopen(tmp_path):
    """Write-zeroes masks the lower across reopens; a discard shows it, before and after."""
    base_d, base_i = str(tmp_path / "b.data"), str(tmp_path / "b.index")
    ops.create(base_d, base_i, 2 * MiB)
    _fill(base_d, base_i, [(0, b"L" * (64 << 10))])
    ops.commit(base_d, base_i, str(tmp_path / "b.lsmt"))
    up_d, up_i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    ops.create(up_d, up_i, 2 * MiB, sparse=True)
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(
        json.dumps({"lowers": [{"file": "b.lsmt"}], "upper": {"data": up_d, "index": up_i}})
    )
    want = bytearray(b"L" * (64 << 10))
    want[0:8192] = b"U" * 8192
    want[4096:8192] = bytes(4096)  # zeroed over the upper's own data
    want[16384:24576] = bytes(8192)  # zeroed over the lower
    # discarded: the lower shows through (32768..40960 was written in the upper, then dropped)
    with open_image(str(cfg)) as img:
        img.pwrite(0, b"U" * 8192)
        img.pwrite(32768, b"U" * 8192)
        img.write_zeroes(4096, 4096)
        img.write_zeroes(16384, 8192)
        img.discard(32768, 8192)
        assert img.pread(0, 64 << 10) == bytes(want)
    for _ in range(2):
        with open_image(str(cfg)) as img:
            assert img.pread(0, 64 << 10) == bytes(want)


def test_sealed_flag_without_a_trailer_is_corruption(layer, tmp_path):
    d, i = layer
    raw = bytearray(Path(d).read_bytes())
    raw[28] |= 0x04  # FLAG_SEALED in the data file's header, but no trailer was appended
    Path(d).write_bytes(raw)
    with pytest.raises(CorruptError, match="no trailer"):
        open_rw_layer(d, i)
    r = run_obd("commit", d, i, tmp_path / "o")
    assert_one_line_error(r, 4, d, "no trailer")


def test_output_writeback_asks_for_the_span_written_and_ends_before_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs start writeback of what was written since last time (not the whole file
    each time: that cost a 1 GiB commit seconds of system time), from a thread that has
    handed every range over before the output's fsync."""
    import obd.io.file as file_mod

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(file_mod, "start_writeback", lambda fd, a, n: calls.append((a, n)))
    monkeypatch.setattr(file_mod, "WRITEBACK_CHUNK", 1 << 20)
    synced_after: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        file_mod.os, "fsync", lambda fd: (synced_after.append(len(calls)), real_fsync(fd))[1]
    )
    with file_mod.AtomicOutput(str(tmp_path / "o")) as out:
        for i in range(5):
            out.pwrite(i << 20, b"x" * (1 << 20))
    assert calls == [(i << 20, 1 << 20) for i in range(5)]
    assert synced_after and synced_after[0] == 5
    assert (tmp_path / "o").stat().st_size == 5 << 20


def test_direct_writes_reach_the_open_file_whatever_its_path_became(tmp_path: Path) -> None:
    """Direct writes go through a second descriptor of the same open file: after the
    path was renamed away and another file put in its place, they still land in the
    open file, never in the file that now has its name."""
    import mmap

    import obd.io.file as file_mod

    with file_mod.open_file(str(tmp_path / "probe"), writable=True, create=True) as f:
        if not f.can_direct():
            pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    p, moved = tmp_path / "out", tmp_path / "moved"
    with file_mod.open_file(str(p), writable=True, create=True) as f:
        os.rename(p, moved)  # before the direct descriptor is opened
        p.write_bytes(b"other" * 1000)
        buf = mmap.mmap(-1, 8192)
        buf[:] = b"d" * 8192
        assert f.pwritev_direct(4096, [memoryview(buf)])
        f.flush()
    assert moved.read_bytes() == bytes(4096) + b"d" * 8192
    assert p.read_bytes() == b"other" * 1000
