"""ZFile (docs/formats.md §4): vectors, byte-compatibility, round trips, corruption."""

from __future__ import annotations

import functools
import hashlib
import os
import random
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.errors import CorruptError, ObdError, UnsupportedError, UsageError
from obd.formats import crc
from obd.formats.codecs import get_codec, python_codec
from obd.formats.sniff import unwrap
from obd.formats.zfile import (
    _HT,
    FLAGS_INITIAL_HEADER,
    FLAGS_OVERWRITTEN_HEADER,
    FLAGS_TRAILER,
    HT_SIZE,
    HeaderTrailer,
    ZFileReader,
    ZFileWriter,
    compress_file,
    decompress_to,
    is_zfile,
    verify_blocks,
)
from obd.io.file import LocalFile, open_file
from tests.vectors import VECTORS, fill_mixed, fill_text, require_vectors, vector_params


class MemFile:
    """An in-memory ReadAt/WriteAt."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.buf = bytearray(data)
        self.closed = False
        self.reads = 0

    def size(self) -> int:
        return len(self.buf)

    def pread(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, offset: int, data: Any) -> None:
        data = bytes(data)
        if len(self.buf) < offset + len(data):
            self.buf.extend(bytes(offset + len(data) - len(self.buf)))
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def zcompress(data: bytes, **kw: Any) -> bytes:
    out = MemFile()
    w = ZFileWriter(out, **kw)
    w.write(data)
    w.close()
    assert w.bytes_in == len(data)
    assert w.bytes_out == len(out.buf)
    return bytes(out.buf)


def zread(blob: bytes, **kw: Any) -> ZFileReader:
    return ZFileReader(MemFile(blob), **kw)


def assemble(
    records: list[bytes],
    *,
    block_size: int,
    original_size: int,
    algo: int = 1,
    verify: bool = True,
    **header: Any,
) -> bytes:
    """Build a ZFile from stored records (CRC appended here when ``verify``)."""
    body = bytearray()
    lengths = []
    for r in records:
        rec = r + (struct.pack("<I", crc.block_crc(r)) if verify else b"")
        body += rec
        lengths.append(len(rec))
    table = struct.pack(f"<{len(lengths)}I", *lengths)
    t = HeaderTrailer(block_size=block_size, algo=algo, verify=int(verify), **header)
    final = replace(
        t,
        index_offset=512 + len(body),
        index_size=len(lengths),
        original_file_size=original_size,
        index_crc=crc.raw(table, 0),
    )
    return (
        replace(t, flags=FLAGS_INITIAL_HEADER).pack_slot()
        + bytes(body)
        + table
        + replace(final, flags=FLAGS_TRAILER).pack_slot()
    )


def rewrite_trailer(blob: bytes, **fields: Any) -> bytes:
    t = HeaderTrailer.unpack(blob[-512:])
    return blob[:-512] + replace(t, **fields).pack_slot()


def mixed(n: int, seed: int = 7) -> bytes:
    return fill_mixed(seed, n)


# --------------------------------------------------------------------------- struct


def test_struct_size_and_fields() -> None:
    assert _HT.size == HT_SIZE == 96
    ht = HeaderTrailer(flags=0x13, block_size=8192, algo=2, verify=1, index_offset=12345)
    raw = ht.pack()
    assert len(raw) == 96
    assert raw[:8] == b"ZFile\x00\x01\x00" and raw[8:24] == b"tuji.yyf@Alibaba"
    assert struct.unpack_from("<I", raw, 72)[0] == 8192 and raw[76] == 2 and raw[88] == 1
    assert HeaderTrailer.unpack(raw) == ht
    slot = ht.pack_slot()
    assert len(slot) == 512 and slot[96:] == bytes(416)


def test_flags_only_low_bits() -> None:
    ht = HeaderTrailer(flags=0x7FFEA4640B43)  # the 2021 sample's garbage header flags
    assert ht.is_header and ht.is_data_file and not ht.is_sealed
    assert not ht.header_overwrite and not ht.digest_enabled


def test_is_zfile() -> None:
    blob = zcompress(b"abc")
    assert is_zfile(blob[:512])
    assert not is_zfile(blob[-512:])  # the trailer lacks the header bit
    assert not is_zfile(b"\0" * 512)
    assert not is_zfile(b"ZFile")


# -------------------------------------------------------------------------- vectors


def _path(v: dict[str, Any]) -> str:
    return os.path.join(VECTORS, next(iter(v["files"].values())))


@pytest.mark.parametrize("v", vector_params("zfile", "zfile_tar", "lsmt_ro_zfile"))
def test_vector_reads_to_digest(v: dict[str, Any]) -> None:
    require_vectors()
    view, wrappers = unwrap(open_file(_path(v)))
    try:
        assert wrappers == (["tar", "zfile"] if v["kind"] == "zfile_tar" else ["zfile"])
        assert isinstance(view, ZFileReader)
        z = v["zfile"]
        assert view.algorithm == z["algorithm"]
        assert view.block_size == z["block_size"]
        assert view.verify == z["per_block_crc"]
        data = view.pread(0, view.size() + 100)
        if v["kind"] == "lsmt_ro_zfile":
            assert len(data) == z["decompressed_size"]
            assert hashlib.sha256(data).hexdigest() == z["decompressed_sha256"]
        else:
            assert len(data) == v["virtual_size"]
            assert hashlib.sha256(data).hexdigest() == v["sha256"]
    finally:
        view.close()


@pytest.mark.parametrize("v", vector_params("zfile"))
def test_vector_random_reads(v: dict[str, Any]) -> None:
    vdir = require_vectors()
    plain = (vdir / v["source"]).read_bytes()
    rnd = random.Random(v["name"])
    with ZFileReader(open_file(_path(v)), cache_blocks=8) as r:
        for _ in range(300):
            off = rnd.randrange(0, len(plain) + 10)
            n = rnd.choice([0, 1, 17, 511, 4096, 5000, 70000, 300000])
            assert r.pread(off, n) == plain[off : off + n]


def _skip_unless_vector_codecs(algo: str) -> None:
    c = get_codec(algo)
    if not c.matches_vectors():
        pytest.skip(
            f"{algo} backend {c.backend} (library version {c.version()}) is not the one the "
            "vectors were made with (system liblz4 1.9.4 / libzstd 1.5.4): bytes may differ"
        )


@pytest.mark.parametrize("v", vector_params("zfile"))
@pytest.mark.parametrize("threads", [1, 3])
def test_vector_reproduced_byte_for_byte(v: dict[str, Any], threads: int) -> None:
    vdir = require_vectors()
    z = v["zfile"]
    _skip_unless_vector_codecs(z["algorithm"])
    out = MemFile()
    with open_file(vdir / v["source"]) as src:
        compress_file(
            src,
            out,
            algorithm=z["algorithm"],
            block_size=z["block_size"],
            verify=z["per_block_crc"],
            threads=threads,
        )
    expected = (vdir / v["files"]["zfile"]).read_bytes()
    assert HeaderTrailer.unpack(out.buf).flags == 0x13
    assert bytes(out.buf) == expected


@pytest.mark.parametrize("v", vector_params("lsmt_ro_zfile"))
def test_layer_vector_reproduced(v: dict[str, Any]) -> None:
    """commit -z (header rewritten, 0x1B) and merge (0x13) outputs, from their payload."""
    require_vectors()
    with open(_path(v), "rb") as f:
        expected = f.read()
    r = zread(expected)
    _skip_unless_vector_codecs(r.algorithm)
    got = zcompress(
        r.pread(0, r.size()),
        algorithm=r.algorithm,
        block_size=r.block_size,
        overwrite_header=r.header.header_overwrite,
        threads=2,
    )
    assert got == expected


# ------------------------------------------------------------------------ round trip

SIZES = [0, 1, -1, 0, +1, 3, 5]  # relative to block size where marked below


def _data(kind: str, n: int) -> bytes:
    if kind == "random":
        return random.Random(n).randbytes(n)
    if kind == "zeros":
        return bytes(n)
    return fill_text(3, n)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [4096, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("verify", [True, False])
def test_round_trip(algorithm: str, block_size: int, verify: bool) -> None:
    for kind in ("random", "zeros", "text"):
        for n in (0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5):
            data = _data(kind, n)
            blob = zcompress(data, algorithm=algorithm, block_size=block_size, verify=verify)
            r = zread(blob)
            assert r.size() == n and r.nblocks == -(-n // block_size)
            assert r.verify == verify and r.algorithm == algorithm
            assert r.pread(0, n + 1) == data
            assert r.pread(n, 10) == b""
            if n:
                assert r.pread(n - 1, 5) == data[-1:]
            out = MemFile()
            assert decompress_to(r, out) == n
            assert bytes(out.buf) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=40000)
    | st.builds(lambda n, s: fill_mixed(s, n), st.integers(0, 70000), st.integers(0, 9)),
    algorithm=st.sampled_from(["lz4", "zstd"]),
    block_size=st.sampled_from([4096, 8192, 65536]),
    chunks=st.lists(st.integers(1, 20000), max_size=8),
    reads=st.lists(st.tuples(st.integers(0, 80000), st.integers(0, 30000)), max_size=10),
    threads=st.sampled_from([1, 2]),
)
def test_hypothesis_round_trip(
    data: bytes,
    algorithm: str,
    block_size: int,
    chunks: list[int],
    reads: list[tuple[int, int]],
    threads: int,
) -> None:
    out = MemFile()
    w = ZFileWriter(out, algorithm=algorithm, block_size=block_size, threads=threads)
    pos = 0
    for c in chunks:  # writes of arbitrary sizes, then the rest
        w.write(bytearray(data[pos : pos + c]))
        pos += c
    w.write(data[pos:])
    w.close()
    assert bytes(out.buf) == zcompress(data, algorithm=algorithm, block_size=block_size)
    r = zread(bytes(out.buf), cache_blocks=2)
    for off, n in reads:
        assert r.pread(off, n) == data[off : off + n]
    assert r.pread(0, len(data)) == data


def test_threads_identical_and_streaming() -> None:
    data = mixed(3 << 20) + b"tail"
    one = zcompress(data, threads=1)
    for threads in (2, 4):
        out = MemFile()
        with ZFileWriter(out, threads=threads) as w:
            for i in range(0, len(data), 777_777):
                w.write(data[i : i + 777_777])
        assert bytes(out.buf) == one
    r = zread(one)
    for threads in (1, 3):
        o = MemFile()
        decompress_to(r, o, threads=threads)
        assert bytes(o.buf) == data


def test_compress_file_from_local_file_identical(tmp_path: Any) -> None:
    """compress_file compresses a local file straight from a mapping of it (feed, no
    copy): same bytes for 1-3 threads as plain writes, a size that is not a multiple of
    the read chunk or the batch; a source without a descriptor is read into recycled
    buffers, same bytes."""
    data = mixed(9 << 20) + b"tail" * 1000
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    for algorithm in ("lz4", "zstd"):
        want = zcompress(data, algorithm=algorithm, threads=1)
        for threads in (1, 2, 3):
            out = MemFile()
            with open_file(p) as src:
                compress_file(src, out, algorithm=algorithm, threads=threads)
            assert bytes(out.buf) == want, (algorithm, threads)
            # a source without a file descriptor takes the pread path
            out2 = MemFile()
            compress_file(MemFile(data), out2, algorithm=algorithm, threads=threads)
            assert bytes(out2.buf) == want
    assert zread(want).pread(0, len(data)) == data


def test_feed_releases_every_buffer_once() -> None:
    data = mixed(5 << 20) + b"x" * 123
    released: list[int] = []
    for threads in (1, 2):
        released.clear()
        out = MemFile()
        with ZFileWriter(out, threads=threads) as w:
            chunk = 2 << 20
            for k, i in enumerate(range(0, len(data), chunk)):
                w.feed(memoryview(data)[i : i + chunk], functools.partial(released.append, k))
        assert sorted(released) == list(range(3))
        assert bytes(out.buf) == zcompress(data)


def _takes_direct_io(folder: Any) -> bool:
    try:
        fd = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("path", ["direct", "mapped"])
@pytest.mark.parametrize("offset", [0, 5000, 1 << 16])
@pytest.mark.parametrize("bs", [4096, 65536])
def test_decompress_to_local_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, offset: int, path: str, bs: int
) -> None:
    """A local output is written by direct I/O (workers decode into aligned buffers and
    write them; an offset that is not a 4 KiB multiple cannot) or else through a shared
    mapping (workers decode into the page cache): right bytes at ``offset``, a last
    partial block, what lies before untouched, and a bad block raises CorruptError like
    the pwrite path (MemFile)."""
    import obd.formats.zfile.reader as reader_mod

    direct_ok = _takes_direct_io(tmp_path)
    if path == "direct" and not direct_ok:
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    if path == "mapped":
        monkeypatch.setattr(reader_mod, "_decode_direct", lambda *a: False)
    taken: list[tuple[int, int]] = []
    real = LocalFile.pwritev_direct

    def record(self: LocalFile, at: int, buffers: list[Any]) -> bool:
        ok = real(self, at, buffers)
        taken.append((at, sum(len(b) for b in buffers)))
        return ok

    monkeypatch.setattr(LocalFile, "pwritev_direct", record)
    data = mixed(6 << 20) + b"end"
    blob = zcompress(data, block_size=bs)
    p = tmp_path / "out.bin"
    for threads in (1, 2):
        taken.clear()
        p.write_bytes(b"\xaa" * offset)
        with open_file(p, writable=True) as o:
            assert decompress_to(zread(blob), o, threads=threads, offset=offset) == len(data)
        got = p.read_bytes()
        assert got[:offset] == b"\xaa" * offset and got[offset:] == data
        direct = path == "direct" and offset % 4096 == 0
        assert bool(taken) == direct
        if direct:  # whole 4 KiB blocks tiling the output but its partial last block
            assert all(a % 4096 == 0 and n % 4096 == 0 for a, n in taken)
            assert sum(n for _, n in taken) == len(data) // 4096 * 4096
    r = zread(blob)
    bad = bytearray(blob)
    bad[int(r.offsets[len(data) // bs // 2]) + 3] ^= 0xFF
    for threads in (1, 2):
        with open_file(p, writable=True) as o, pytest.raises(CorruptError, match="block"):
            decompress_to(zread(bytes(bad)), o, threads=threads)


def test_decompress_to_direct_io_refused_goes_through_the_page_cache(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct write refused after the file said it takes them: that run is written
    through the page cache, the output is whole."""
    if not _takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    calls: list[int] = []

    def refuse_some(self: LocalFile, at: int, buffers: list[Any]) -> bool:
        calls.append(at)
        return len(calls) % 2 == 0 and real(self, at, buffers)

    real = LocalFile.pwritev_direct
    monkeypatch.setattr(LocalFile, "pwritev_direct", refuse_some)
    data = mixed(9 << 20) + b"x" * 100
    p = tmp_path / "out.bin"
    with open_file(p, writable=True, create=True) as o:
        decompress_to(zread(zcompress(data)), o, threads=2)
    assert p.read_bytes() == data and len(calls) >= 3


def test_write_accepts_any_buffer() -> None:
    arr = np.arange(5000, dtype="<u4")
    out = MemFile()
    with ZFileWriter(out, algorithm="zstd", threads=2) as w:
        w.write(arr.data)
        w.write(arr[:10])  # type: ignore[arg-type]  # any buffer, a numpy array too
        w.write(b"")
    assert w.bytes_in == 5010 * 4
    assert zread(bytes(out.buf)).pread(0, 1 << 20) == arr.tobytes() + arr[:10].tobytes()


def test_overwrite_header() -> None:
    data = mixed(50000)
    blob = zcompress(data, overwrite_header=True, algorithm="zstd")
    h = HeaderTrailer.unpack(blob)
    t = HeaderTrailer.unpack(blob[-512:])
    assert h.flags == FLAGS_OVERWRITTEN_HEADER and t.flags == FLAGS_TRAILER
    assert (h.index_offset, h.index_size, h.original_file_size, h.index_crc) == (
        t.index_offset,
        t.index_size,
        t.original_file_size,
        t.index_crc,
    )
    assert h.index_offset + 4 * h.index_size == len(blob) - 512
    assert zread(blob).pread(0, len(data)) == data
    plain = zcompress(data, algorithm="zstd")
    assert HeaderTrailer.unpack(plain).flags == FLAGS_INITIAL_HEADER
    assert HeaderTrailer.unpack(plain).index_size == 0


def test_writer_rejects_bad_options() -> None:
    with pytest.raises(UsageError):
        ZFileWriter(MemFile(), block_size=128 << 10)
    with pytest.raises(UnsupportedError, match="brotli"):
        ZFileWriter(MemFile(), algorithm="brotli")
    with pytest.raises(UnsupportedError, match="algorithm 0"):
        ZFileWriter(MemFile(), algorithm=0)


def test_python_codecs_interoperate() -> None:
    data = mixed(100_000)
    for algo in ("lz4", "zstd"):
        sys_c, py_c = get_codec(algo), python_codec(algo)
        for a, b in ((sys_c, py_c), (py_c, sys_c)):
            stored, lengths = a.compress_blocks(data, 4096, True)
            out = bytearray(len(data))
            assert b.decompress_blocks(stored, lengths, out, 4096, len(data) % 4096, True) == []
            assert bytes(out) == data
            one = a.compress(data[:4096])
            assert b.decompress(one, 4096) == data[:4096]
            with pytest.raises(ValueError):
                b.decompress(one, 4095)


def test_lru_cache_bounded() -> None:
    data = mixed(40 * 4096)
    r = zread(zcompress(data), cache_blocks=4)
    for i in range(0, len(data), 1000):
        assert r.pread(i, 10) == data[i : i + 10]
    assert len(r._cache) <= 4
    src = r.source
    assert isinstance(src, MemFile)
    before = src.reads
    r.pread(len(data) - 5, 5)
    r.pread(len(data) - 100, 5)
    assert src.reads == before  # served from the cache


def test_close_closes_source() -> None:
    src = MemFile(zcompress(b"x"))
    ZFileReader(src).close()
    assert src.closed


def test_jump_table_is_numpy() -> None:
    r = zread(zcompress(mixed(20000)))
    assert isinstance(r.offsets, np.ndarray) and r.offsets[0] == 512
    assert int(r.offsets[-1]) == r.index_offset


# ------------------------------------------------------------------------ corruption

BS = 4096
DATA = fill_mixed(11, 10 * BS + 123)


@pytest.fixture(scope="module")
def good() -> bytes:
    return zcompress(DATA)


def _flip(blob: bytes, pos: int) -> bytes:
    b = bytearray(blob)
    b[pos] ^= 0x40
    return bytes(b)


def test_flipped_block_byte(good: bytes) -> None:
    r = zread(good)
    b = 3
    pos = int(r.offsets[b]) + 2
    bad = zread(_flip(good, pos))  # still opens: only block 3 is bad
    assert bad.pread(0, 3 * BS) == DATA[: 3 * BS]
    with pytest.raises(CorruptError, match="block 3") as ei:
        bad.pread(3 * BS + 10, 10)
    assert ei.value.offset == int(r.offsets[b])
    with pytest.raises(CorruptError, match="block 3"):
        bad.pread(0, len(DATA))
    with pytest.raises(CorruptError):
        decompress_to(bad, MemFile(), threads=2)
    problems = verify_blocks(MemFile(_flip(good, pos)))
    assert problems == [(3, int(r.offsets[b]), "checksum mismatch")]
    assert verify_blocks(MemFile(good)) == []


def test_flipped_jump_table(good: bytes) -> None:
    r = zread(good)
    with pytest.raises(CorruptError, match="jump table checksum"):
        zread(_flip(good, r.index_offset + 5))


@pytest.mark.parametrize("pos", [0, 10, 40, 72, 76, 88, 300])
def test_flipped_header(good: bytes, pos: int) -> None:
    with pytest.raises(CorruptError):
        zread(_flip(good, pos))


@pytest.mark.parametrize("back", [512, 500, 470, 460, 440, 200])
def test_flipped_trailer(good: bytes, back: int) -> None:
    with pytest.raises(CorruptError):
        zread(_flip(good, len(good) - back))


@pytest.mark.parametrize("cut", [1, 100, 512, 600, 2000, 4000])
def test_truncated(good: bytes, cut: int) -> None:
    with pytest.raises(CorruptError):
        zread(good[:-cut])
    with pytest.raises(CorruptError):
        zread(good[:cut])


def test_jump_table_points_past_end() -> None:
    codec = get_codec("lz4")
    recs = [codec.compress(DATA[i : i + BS]) for i in range(0, 2 * BS, BS)]
    blob = assemble(recs, block_size=BS, original_size=2 * BS)
    assert zread(blob).pread(0, 2 * BS) == DATA[: 2 * BS]
    t = HeaderTrailer.unpack(blob[-512:])
    table = bytearray(blob[t.index_offset : t.index_offset + 8])
    struct.pack_into("<I", table, 4, struct.unpack_from("<I", table, 4)[0] + 10)
    bad = blob[: t.index_offset] + bytes(table) + blob[t.index_offset + 8 :]
    bad = rewrite_trailer(bad, index_crc=crc.raw(bytes(table), 0))
    with pytest.raises(CorruptError, match="past the end"):
        zread(bad)
    # index beyond the trailer / before the data
    with pytest.raises(CorruptError, match="jump table"):
        zread(rewrite_trailer(blob, index_offset=len(blob)))
    with pytest.raises(CorruptError, match="jump table"):
        zread(rewrite_trailer(blob, index_offset=100))
    with pytest.raises(CorruptError, match="needs"):
        zread(rewrite_trailer(blob, original_file_size=5 * BS))


def test_block_decompresses_to_wrong_size() -> None:
    codec = get_codec("lz4")
    recs = [codec.compress(DATA[:BS]), codec.compress(DATA[BS : 2 * BS - 7])]
    blob = assemble([*recs, codec.compress(DATA[:100])], block_size=BS, original_size=2 * BS + 100)
    r = zread(blob)
    assert r.pread(0, BS) == DATA[:BS]
    with pytest.raises(CorruptError, match="block 1: decompressed to the wrong size"):
        r.pread(BS, 10)
    zcodec = get_codec("zstd")
    zblob = assemble([zcodec.compress(DATA[: BS - 1])], block_size=BS, original_size=BS, algo=2)
    with pytest.raises(CorruptError, match="block 0"):
        zread(zblob).pread(0, BS)


def test_garbage_block_without_crc() -> None:
    blob = assemble([b"\xff" * 50], block_size=BS, original_size=BS, verify=False)
    with pytest.raises(CorruptError, match="block 0: decompression failed"):
        zread(blob).pread(0, 1)


def test_block_size_128k_unsupported() -> None:
    codec = get_codec("lz4")
    bs = 128 << 10
    blob = assemble([codec.compress(bytes(bs))], block_size=bs, original_size=bs)
    with pytest.raises(UnsupportedError, match="131072"):
        zread(blob)
    with pytest.raises(CorruptError, match="block size"):
        zread(assemble([codec.compress(b"abc")], block_size=3000, original_size=3))


def test_unsupported_algorithm_and_dict() -> None:
    with pytest.raises(UnsupportedError, match="algorithm 0"):
        zread(assemble([b"xx"], block_size=BS, original_size=2, algo=0))
    with pytest.raises(UnsupportedError, match="algorithm id 9"):
        zread(assemble([b"xx"], block_size=BS, original_size=2, algo=9))
    with pytest.raises(UnsupportedError, match="dictionary"):
        zread(assemble([b"xx"], block_size=BS, original_size=2, dict_size=16))


def test_impossible_lengths() -> None:
    codec = get_codec("lz4")
    blob = assemble([b"", codec.compress(b"x")], block_size=BS, original_size=BS + 1)
    with pytest.raises(CorruptError, match="entry 0"):
        zread(blob)


def test_not_a_zfile() -> None:
    with pytest.raises(CorruptError, match="not a ZFile"):
        zread(b"\0" * 4096)
    with pytest.raises(CorruptError, match="not a ZFile"):
        zread(b"ZFile")


class Flaky(MemFile):
    """Returns a damaged copy of one range for the first ``bad_reads`` reads of it."""

    def __init__(self, data: bytes, pos: int, bad_reads: int) -> None:
        super().__init__(data)
        self.pos, self.bad_reads, self.evicted = pos, bad_reads, 0

    def pread(self, offset: int, length: int) -> bytes:
        data = super().pread(offset, length)
        if offset <= self.pos < offset + length and self.bad_reads > 0:
            self.bad_reads -= 1
            return _flip(data, self.pos - offset)
        return data

    def evict(self, offset: int, length: int) -> None:
        self.evicted += 1


def test_retry_then_success(good: bytes) -> None:
    r0 = zread(good)
    pos = int(r0.offsets[2]) + 1
    for bad_reads in (1, 3):  # first read + up to 3 retries
        src = Flaky(good, pos, bad_reads)
        r = ZFileReader(src)
        assert r.pread(0, len(DATA)) == DATA
        assert src.evicted == bad_reads
    src = Flaky(good, pos, 4)
    with pytest.raises(CorruptError, match="block 2"):
        ZFileReader(src).pread(2 * BS, 1)


def test_open_retries_after_evict(good: bytes) -> None:
    r0 = zread(good)
    src = Flaky(good, r0.index_offset + 3, 2)  # the jump table reads bad twice
    assert ZFileReader(src).pread(0, len(DATA)) == DATA
    assert src.evicted == 2
    src = Flaky(good, 40, 3)  # the header stays bad: three opens, then the error
    with pytest.raises(CorruptError, match="digest"):
        ZFileReader(src)
    assert src.evicted == 2
    with pytest.raises(CorruptError, match="digest"):  # no evict: no retry
        ZFileReader(MemFile(_flip(good, 40)))


def test_verify_blocks_needs_crc() -> None:
    blob = zcompress(b"abc" * 5000, verify=False)
    with pytest.raises(UnsupportedError, match="verify = 0"):
        verify_blocks(MemFile(blob))


def test_errors_are_obd_errors(good: bytes) -> None:
    """Random damage never leaks struct.error/IndexError/ValueError or wrong bytes."""
    rnd = random.Random(5)
    for _ in range(200):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 3)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        try:
            r = zread(bytes(b))
            got = r.pread(0, len(DATA))
        except ObdError:
            continue
        assert got == DATA


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_u16_group_deltas_cannot_overflow(algorithm: str) -> None:
    """§4.6: upstream keeps u16 deltas per 64 KiB group; worst-case blocks must fit."""
    codec = get_codec(algorithm)
    for bs in (4096, 8192, 16384, 32768, 65536):
        group = 65536 // bs
        assert (group - 1) * (codec.bound(bs) + 4) < 65535
    # and real incompressible data stays under the bound
    data = random.Random(1).randbytes(16 * 4096)
    _, lengths = codec.compress_blocks(data, 4096, True)
    assert max(lengths) <= codec.bound(4096) + 4


def test_concurrent_preads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = mixed(400_000, seed=3)
    for algorithm in ("lz4", "zstd"):
        r = zread(zcompress(data, algorithm=algorithm), cache_blocks=4)

        def check(seed: int, r: ZFileReader = r) -> bool:
            rnd = random.Random(seed)
            for _ in range(200):
                off, n = rnd.randrange(len(data)), rnd.choice([1, 100, 4096, 9000, 70000])
                if r.pread(off, n) != data[off : off + n]:
                    return False
            return True

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(check, range(8)))


def test_verify_blocks_source_shrinks(good: bytes) -> None:
    r = zread(good)

    class Shrinking(MemFile):
        opened = False

        def pread(self, offset: int, length: int) -> bytes:
            data = super().pread(offset, length)
            if self.opened:  # after open: cut inside block 4
                data = data[: max(0, int(r.offsets[4]) + 3 - offset)]
            return data

    src = Shrinking(good)
    zr = ZFileReader(src)
    src.opened = True
    with pytest.MonkeyPatch.context() as mp:  # reuse the reader opened before the cut
        mp.setattr("obd.formats.zfile.reader.ZFileReader", lambda *a, **k: zr)
        problems = verify_blocks(src)
    assert [p[0] for p in problems] == list(range(4, r.nblocks))
    assert all(p[2] == "truncated" for p in problems)
