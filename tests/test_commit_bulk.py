"""Commit in bulk (issue 10): the writable index replayed with numpy, data copied in runs.

The reference models live here only: the per-record replay that ``MutableIndex.from_log``
used before (a heap sweep, one Python step per record), sequential ``insert``, and a
plain transcription of the compaction of docs/formats.md §1.8 (one read per 64-sector
step, a Python greedy merge). The bulk code must build the very same index and write the
very same bytes, through every sink: a local file (kernel copies and gathered reads), a
sink with only ``write``, and the real ZFile writer (buffers handed over by ``feed``).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from obd.formats.lsmt import (
    ENTRY_SIZE,
    HT_SECTORS,
    HT_SLOT,
    INVALID_OFFSET,
    MAX_SEGMENT_SECTORS,
    SECTOR,
    Mappings,
    decode_entries,
    encode_entries,
    encode_entry,
)
from obd.formats.lsmt import commit as commit_mod
from obd.formats.lsmt.commit import FileSink, commit_header, compact
from obd.formats.lsmt.rw import MutableIndex, replay_log
from obd.formats.zfile import ZFileReader, ZFileWriter
from obd.image import ops
from obd.image.layers import open_ro_layer, open_rw_layer
from obd.io.file import AtomicOutput, open_file
from tests.conftest import REPO

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- reference models ----------------------------------------------------------------


def old_from_log(offs, lens, mos, zs):
    """The replay before issue 10: a sweep over the records' ends with a heap of the
    covering records, newest on top; one Python step per record and per end."""
    ends = [o + n for o, n in zip(offs, lens, strict=True)]
    n = len(offs)
    o_s: list[int] = []
    o_e: list[int] = []
    o_m: list[int] = []
    o_z: list[bool] = []
    if n == 0:
        return o_s, o_e, o_m, o_z
    points = sorted(set(offs) | set(ends))
    starts_at: dict[int, list[int]] = {}
    for r in range(n):
        starts_at.setdefault(offs[r], []).append(r)
    heap: list[int] = []
    cur = -1
    for k, pos in enumerate(points):
        for r in starts_at.get(pos, ()):
            heapq.heappush(heap, -r)
        while heap and ends[-heap[0]] <= pos:
            heapq.heappop(heap)
        owner = -heap[0] if heap else -1
        if k + 1 == len(points):
            break
        nxt = points[k + 1]
        if owner < 0:
            cur = -1
            continue
        if owner == cur and o_e and o_e[-1] == pos:
            o_e[-1] = nxt
            continue
        cur = owner
        o_s.append(pos)
        o_e.append(nxt)
        o_m.append(mos[owner] if zs[owner] else mos[owner] + (pos - offs[owner]))
        o_z.append(zs[owner])
    return o_s, o_e, o_m, o_z


def model_compact(m: Mappings, sources: list[bytes], header) -> bytes:
    """§1.8, transcribed: header; per mapping, 64-sector steps of data (past a source's
    end: zeros) or one zeroed entry; greedy merge below 16383; padding to 256; trailer."""
    out = bytearray(header.pack())
    cursor = HT_SECTORS
    ents: list[list[int]] = []
    for off, ln, mo, z, tag in zip(
        m.offset.tolist(), m.length.tolist(), m.moffset.tolist(), m.zeroed.tolist(),
        m.tag.tolist(), strict=True,
    ):  # fmt: skip
        if ln == 0:
            continue
        if z:
            ents.append([off, ln, cursor, 1, tag])
            continue
        done = 0
        while done < ln:
            n = min(64, ln - done)
            at = (mo + done) * SECTOR
            piece = sources[tag][at : at + n * SECTOR]
            out += piece + bytes(n * SECTOR - len(piece))
            ents.append([off + done, n, cursor, 0, tag])
            cursor += n
            done += n
    merged: list[list[int]] = []
    for e in ents:
        if merged:
            c = merged[-1]
            c_mend = c[2] if c[3] else c[2] + c[1]
            if (
                c[0] + c[1] == e[0]
                and c_mend == e[2]
                and c[3] == e[3]
                and c[4] == e[4]
                and c[1] + e[1] < MAX_SEGMENT_SECTORS
            ):
                c[1] += e[1]
                continue
        merged.append(list(e))
    index_offset = cursor * SECTOR
    raw = b"".join(encode_entry(o, n, mo, bool(z), tag=t) for o, n, mo, z, t in merged)
    padded = -(-len(merged) // 256) * 256
    raw += encode_entry(INVALID_OFFSET, 0, 0, False) * (padded - len(merged))
    out += raw
    out += header.with_(flags=0x06, index_offset=index_offset, index_size=padded).pack()
    return bytes(out)


# -- the replay ------------------------------------------------------------------------

log_records = st.lists(
    st.tuples(
        st.integers(0, 3000),  # offset
        st.integers(0, 700),  # length (0: ignored)
        st.integers(8, 1 << 40),  # moffset
        st.booleans(),  # zeroed
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(recs=log_records)
def test_replay_matches_the_per_record_models(recs):
    offs = [r[0] for r in recs]
    lens = [r[1] for r in recs]
    mos = [r[2] for r in recs]
    zs = [r[3] for r in recs]
    s, e, mo, z = replay_log(Mappings.from_lists(offs, lens, mos, zs))
    got = (s.tolist(), e.tolist(), mo.tolist(), z.tolist())
    keep = [k for k in range(len(recs)) if lens[k] > 0]
    old = old_from_log(*([col[k] for k in keep] for col in (offs, lens, mos, zs)))
    assert got == tuple(old)
    seq = MutableIndex()
    for off, ln, moff, zero in recs:
        seq.insert(off, ln, moff, zero)
    assert got == (seq.starts, seq.ends, seq.moffs, seq.zeroed)


def test_replay_of_many_records_on_few_sectors():
    """Deep overlaps (each sector rewritten ~100 times), the tree's every level."""
    rng = np.random.default_rng(5)
    n = 20_000
    offs = rng.integers(0, 1000, n).tolist()
    lens = rng.integers(1, 40, n).tolist()
    mos = (np.arange(n) * 64 + 8).tolist()
    zs = (rng.random(n) < 0.2).tolist()
    s, e, mo, z = replay_log(Mappings.from_lists(offs, lens, mos, zs))
    assert (s.tolist(), e.tolist(), mo.tolist(), z.tolist()) == tuple(
        old_from_log(offs, lens, mos, zs)
    )


# -- writable layers on disk: lost appends, torn tails ---------------------------------

VSIZE = 384 << 10
layer_ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "discard"]),
        st.integers(0, VSIZE // SECTOR - 1),  # sector
        st.integers(1, 80),  # sectors
        st.integers(0, 1 << 30),  # data seed
    ),
    min_size=1,
    max_size=40,
)


def _write_layer(folder: Path, ops_list) -> tuple[str, str, bytearray]:
    d, i = str(folder / "l.data"), str(folder / "l.index")
    ops.create(d, i, VSIZE, force=True)
    model = bytearray(VSIZE)
    with open_rw_layer(d, i) as lay:
        for kind, sec, n, seed in ops_list:
            n = min(n, VSIZE // SECTOR - sec)
            a, b = sec * SECTOR, (sec + n) * SECTOR
            if kind == "write":
                data = random.Random(seed).randbytes(b - a)
                lay.pwrite(a, data)
                model[a:b] = data
            else:
                lay.discard(a, b - a)
                model[a:b] = bytes(b - a)
        lay.flush()
    return d, i, model


@SETTINGS
@given(
    ops_list=layer_ops,
    lost=st.lists(st.tuples(st.integers(0, 700), st.integers(1, 60), st.booleans()), max_size=4),
    torn=st.integers(0, ENTRY_SIZE - 1),
    stray=st.integers(0, SECTOR - 1),
)
def test_layer_after_a_crash_reads_and_commits_as_the_model(
    tmp_path_factory, ops_list, lost, torn, stray
):
    """Records of appends a crash lost (a suffix pointing past the data file's end), a
    torn record and a torn data sector: readers ignore them (docs/durability.md); the
    replay and the commit of what is left agree with the models."""
    folder = tmp_path_factory.mktemp("layer")
    d, i, model = _write_layer(folder, ops_list)
    dsize = os.path.getsize(d)
    past = -(-(dsize + stray) // SECTOR)  # the append point after the stray bytes
    with open(i, "ab") as f:
        for sec, n, zero in lost:  # data never written: past the end (zeroed: beyond it)
            f.write(encode_entry(sec, n, past + 1 if zero else past, zero))
        f.write(os.urandom(torn))
    with open(d, "ab") as f:
        f.write(os.urandom(stray))
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, VSIZE) == bytes(model)
        raw = Path(i).read_bytes()[HT_SLOT:]
        recs = decode_entries(raw[: len(raw) // ENTRY_SIZE * ENTRY_SIZE])
        kept = len(recs) - len(lost)
        offs, lens, mos = (a.tolist()[:kept] for a in (recs.offset, recs.length, recs.moffset))
        zs = recs.zeroed.tolist()[:kept]
        live = [k for k in range(kept) if lens[k] and offs[k] != INVALID_OFFSET]
        old = old_from_log(*([c[k] for k in live] for c in (offs, lens, mos, zs)))
        assert (lay.idx.starts, lay.idx.ends, lay.idx.moffs, lay.idx.zeroed) == tuple(old)
        m = lay.mappings()
        header = commit_header(
            virtual_size=VSIZE, uuid=None, parent_uuid=None, source_parent_uuid=lay.parent_uuid
        )
        want = model_compact(m, [Path(d).read_bytes()], header)
    out = str(folder / "out.lsmt")
    ops.commit(d, i, out, force=True)
    assert Path(out).read_bytes() == want
    with open_ro_layer(out) as ro:
        assert ro.pread(0, VSIZE) == bytes(model)


# -- compaction through every sink ------------------------------------------------------

SRC_SECTORS = 6000  # sources hold 3 MiB; mappings may point past their end


@st.composite
def mapping_lists(draw):
    """Sorted, non-overlapping mappings over 3 sources: data (some back to back in their
    source, some past its end) and zeroed (some long: chains over the 16383 cap), with
    gaps."""
    n = draw(st.integers(0, 24))
    pos, src_pos = 0, [HT_SECTORS] * 3
    offs, lens, mos, zs, tags = [], [], [], [], []
    for _ in range(n):
        pos += draw(st.sampled_from([0, 0, 0, 1, 7, 500]))
        zero = draw(st.integers(0, 4)) == 0
        if zero:
            ln = draw(st.sampled_from([1, 64, 8192, 16383]))
        else:
            ln = draw(st.sampled_from([1, 8, 63, 64, 65, 200, 2100]))
        tag = draw(st.integers(0, 2))
        if zero:
            mo = draw(st.integers(HT_SECTORS, SRC_SECTORS))
        elif draw(st.booleans()):  # back to back with this source's previous mapping
            mo = src_pos[tag]
        else:
            mo = draw(st.integers(HT_SECTORS, SRC_SECTORS + 100))
        if not zero:
            src_pos[tag] = mo + ln
        offs.append(pos)
        lens.append(ln)
        mos.append(mo)
        zs.append(zero)
        tags.append(tag)
        pos += ln
    return Mappings.from_lists(offs, lens, mos, zs, tags)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    paths = []
    for k in range(3):
        p = folder / f"s{k}"
        p.write_bytes(random.Random(k).randbytes(SRC_SECTORS * SECTOR))
        paths.append(str(p))
    return paths


class ListSink:
    """A sink with only ``write`` (as a tar writer would be)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)


HEADER = commit_header(
    virtual_size=1 << 30, uuid=None, parent_uuid=None, source_parent_uuid="", message=b"m"
)


def _page_cache_sink(f) -> FileSink:
    """A FileSink that writes through the page cache (as where there is no direct I/O)."""
    sink = FileSink(f)
    sink.direct = False
    return sink


def _check_every_sink(folder: Path, sources: list[str], m: Mappings) -> None:
    srcs = [open_file(p) for p in sources]
    try:
        want = model_compact(m, [Path(p).read_bytes() for p in sources], HEADER)
        for direct in (True, False):  # direct I/O where the file system takes it, and not
            out = folder / f"plain{int(direct)}"
            with open_file(str(out), writable=True, create=True) as f:
                sink = FileSink(f) if direct else _page_cache_sink(f)
                assert compact(m, srcs, HEADER, sink) == len(want)
                sink.close()
            assert out.read_bytes() == want
        ls = ListSink()
        compact(m, srcs, HEADER, ls)
        assert b"".join(ls.parts) == want
        zpath = folder / "z"
        with open_file(str(zpath), writable=True, create=True) as f:
            w = ZFileWriter(f, algorithm="lz4", block_size=4096, verify=True, threads=2)
            compact(m, srcs, HEADER, w)
            w.close()
        with ZFileReader(open_file(str(zpath))) as r:
            assert r.pread(0, r.size()) == want
    finally:
        for s in srcs:
            s.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(m=mapping_lists())
def test_compact_writes_the_model_bytes_through_every_sink(tmp_path_factory, sources, m):
    _check_every_sink(tmp_path_factory.mktemp("out"), sources, m)


def test_compact_of_long_data_chains(tmp_path, sources):
    """Data back to back in a source and on the disk for more than 16383 sectors (the
    merge cuts it greedily), across a gathering buffer's end, partly past the source's
    end, beside the other sources."""
    offs = [0, 7000, 14000, 21100, 30000, 31000]
    lens = [7000, 7000, 7100, 8000, 1000, 64]
    mos = [8, 7008, 14008, 21108, 100, 8]
    tags = [0, 0, 0, 0, 1, 2]
    _check_every_sink(tmp_path, sources, Mappings.from_lists(offs, lens, mos, [False] * 6, tags))


@pytest.mark.parametrize(
    "lens",
    [
        [16000, 383],  # exactly the cap: two entries
        [16000, 382],  # one under: one entry
        [16383, 64, 8192, 8191, 1, 16383],  # a whole-cap entry, then cuts at the cap
        [64] * 300,
    ],
)
@pytest.mark.parametrize("zeroed", [False, True])
def test_merge_cuts_at_the_cap(tmp_path, sources, lens, zeroed):
    offs = np.concatenate(([0], np.cumsum(lens)[:-1])).tolist()
    mos = (np.array(offs) + 8).tolist()
    n = len(lens)
    _check_every_sink(tmp_path, sources, Mappings.from_lists(offs, lens, mos, [zeroed] * n))


def _many_short_runs(n: int = 40) -> Mappings:
    """Short runs in no order across the three sources (none back to back)."""
    rng = random.Random(5)
    offs = [k * 16 for k in range(n)]
    lens = [rng.choice([1, 7, 8, 15]) for _ in range(n)]
    mos = [HT_SECTORS + rng.randrange(0, SRC_SECTORS - 20) for _ in range(n)]
    tags = [rng.randrange(3) for _ in range(n)]
    return Mappings.from_lists(offs, lens, mos, [False] * n, tags)


def test_gather_lists_are_cut_at_iov_max(tmp_path, sources, monkeypatch):
    """Many short runs go out as gather lists of at most IOV_MAX pieces each."""
    import obd.io.file as file_mod

    calls: list[int] = []
    real = os.pwritev

    def counting(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(commit_mod, "IOV_MAX", 4)
    monkeypatch.setattr(file_mod, "IOV_MAX", 4)
    monkeypatch.setattr(file_mod.os, "pwritev", counting)
    _check_every_sink(tmp_path, sources, _many_short_runs())
    assert calls and max(calls) <= 4 and len(calls) >= 10


def test_a_short_gather_write_is_finished(tmp_path, sources, monkeypatch):
    """pwritev may write less than asked: the rest is written, nothing is skipped."""
    import obd.io.file as file_mod

    real = os.pwritev

    def short(fd, buffers, offset):  # writes at most 1000 bytes a call
        data = b"".join(bytes(b) for b in buffers)[:1000]
        return real(fd, [data], offset)

    monkeypatch.setattr(file_mod.os, "pwritev", short)
    _check_every_sink(tmp_path, sources, _many_short_runs())


def _direct_io_works(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _direct_recorder(monkeypatch) -> list[tuple[int, int]]:
    """(offset, length) of every gather list the output took by direct I/O."""
    import obd.io.file as file_mod

    taken: list[tuple[int, int]] = []
    real = file_mod.LocalFile.pwritev_direct

    def record(self, offset, buffers):
        # only pieces mapped from a source go direct: bytes (the header, a run read
        # from a non-local source or past its end) and slices of them are not aligned
        assert all(isinstance(b, memoryview) and isinstance(b.obj, mmap.mmap) for b in buffers)
        ok = real(self, offset, buffers)
        if ok:
            taken.append((offset, sum(len(b) for b in buffers)))
        return ok

    monkeypatch.setattr(file_mod.LocalFile, "pwritev_direct", record)
    return taken


@pytest.mark.parametrize("mappings", ["short", "long", "past_end"])
def test_data_goes_by_direct_io_in_whole_blocks(tmp_path, sources, monkeypatch, mappings):
    """Where the file system takes direct I/O, the data mapped from local sources goes
    so, every write on 4 KiB boundaries (pieces cut across lists); the list holding the
    header, lists holding runs read (past a source's end), the last partial block and
    the index go through the page cache; the bytes are the model's."""
    if not _direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    monkeypatch.setattr(commit_mod, "GATHER", 64 << 10)  # many lists, cuts inside runs
    taken = _direct_recorder(monkeypatch)
    m = {
        "short": _many_short_runs(400),
        "long": _long_runs(None),
        # a read run cut across lists, mapped data after it
        "past_end": Mappings.from_lists(
            [0, 9000, 13000], [5000, 3001, 3000], [8, 5500, 8], [False] * 3, [0, 1, 2]
        ),
    }[mappings]
    _check_every_sink(tmp_path, sources, m)
    assert len(taken) >= (1 if mappings == "past_end" else 2)
    assert all(a % 4096 == 0 and n % 4096 == 0 for a, n in taken)
    taken.sort()  # written by threads, in any order; never the header's list, no overlap
    assert taken[0][0] > 0
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(taken))


def _direct_writes_fail(tmp_path, monkeypatch, err: int, fails) -> list[int]:
    """Direct writes (on an O_DIRECT descriptor) raise ``err`` when ``fails(k)`` holds
    for the k-th (from 1); returns the offsets of every direct write tried. Skips where
    the file system takes no O_DIRECT. Gather lists are 64 KiB, so there are many."""
    import obd.io.file as file_mod

    if not _direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    monkeypatch.setattr(commit_mod, "GATHER", 64 << 10)
    real = os.pwritev
    tried: list[int] = []

    def pwritev(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            tried.append(offset)
            if fails(len(tried)):
                raise OSError(err, os.strerror(err))
        return real(fd, buffers, offset)

    monkeypatch.setattr(file_mod.os, "pwritev", pwritev)
    return tried


def test_sources_that_cannot_be_mapped_are_read(tmp_path, sources, monkeypatch):
    """A source file system that maps nothing: its runs are read, same bytes, none of
    them direct (they are not in a mapping)."""
    import obd.io.file as file_mod

    monkeypatch.setattr(file_mod.LocalFile, "map_readonly", lambda self: None)
    taken = _direct_recorder(monkeypatch)
    _check_every_sink(tmp_path, sources, _many_short_runs(400))
    _check_every_sink(tmp_path, sources, _long_runs(sources))
    assert taken == []


def test_direct_io_refused_midway_goes_through_the_page_cache(tmp_path, sources, monkeypatch):
    """A direct write refused (EINVAL) after others were taken: that list and the rest
    go through the page cache, nothing lost or doubled."""
    tried = _direct_writes_fail(tmp_path, monkeypatch, errno.EINVAL, lambda k: k >= 3)
    _check_every_sink(tmp_path, sources, _many_short_runs(400))
    assert len(tried) >= 3


def test_a_failed_direct_write_fails_the_commit(tmp_path, sources, monkeypatch):
    """EIO from a direct write (in a writer thread) is the command's error; no output."""
    tried = _direct_writes_fail(tmp_path, monkeypatch, errno.EIO, lambda k: k == 2)
    srcs = [open_file(p) for p in sources]
    try:
        with (
            pytest.raises(OSError, match=os.strerror(errno.EIO)),
            AtomicOutput(str(tmp_path / "o")) as f,
        ):
            sink = FileSink(f)
            compact(_many_short_runs(400), srcs, HEADER, sink)
            sink.close()
    finally:
        for s in srcs:
            s.close()
    assert not (tmp_path / "o").exists() and len(tried) >= 2


def _long_runs(sources) -> Mappings:
    """Long runs back to back in a source: copied in the kernel when it can."""
    return Mappings.from_lists(
        [0, 3000, 6000, 7000], [3000, 2500, 1000, 900], [8, 3008, 8, 20], [False] * 4, [0, 0, 1, 2]
    )


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_falls_back_to_reading_where_the_kernel_cannot(tmp_path, sources, monkeypatch, err):
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(err, os.strerror(err))

    m = _long_runs(sources)
    want = model_compact(m, [Path(p).read_bytes() for p in sources], HEADER)
    monkeypatch.setattr(os, "copy_file_range", refuse)
    srcs = [open_file(p) for p in sources]
    with AtomicOutput(str(tmp_path / "o")) as f:
        sink = _page_cache_sink(f)
        compact(m, srcs, HEADER, sink)
        sink.close()
    for s in srcs:
        s.close()
    assert len(calls) == 1  # tried once, then copies by reading
    assert (tmp_path / "o").read_bytes() == want


def test_adjacent_mappings_are_one_kernel_copy_and_io_errors_are_not_swallowed(
    tmp_path, sources, monkeypatch
):
    m = _long_runs(sources)
    want = model_compact(m, [Path(p).read_bytes() for p in sources], HEADER)
    real = os.copy_file_range
    calls = []

    def count(src, dst, n, a, b):
        calls.append(n)
        return real(src, dst, n, a, b)

    monkeypatch.setattr(os, "copy_file_range", count)
    srcs = [open_file(p) for p in sources]
    with AtomicOutput(str(tmp_path / "o")) as f:
        sink = _page_cache_sink(f)
        compact(m, srcs, HEADER, sink)
        sink.close()
    assert (tmp_path / "o").read_bytes() == want
    # the first two mappings are back to back in source 0: one run of 5500 sectors; the
    # last two are in other sources and under 1 MiB each: gathered by reading
    assert sum(calls) == 5500 * SECTOR and len(calls) <= 2

    def fail(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", fail)
    with pytest.raises(OSError, match="I/O error"), AtomicOutput(str(tmp_path / "o2")) as f:
        compact(m, srcs, HEADER, _page_cache_sink(f))
    for s in srcs:
        s.close()
    assert not (tmp_path / "o2").exists()


def test_writeback_is_started_as_the_output_grows(tmp_path, sources, monkeypatch):
    """The output's writeback follows every way the sink writes (gather lists, kernel
    copies, buffers), so the final fsync has little left to write."""
    import obd.io.file as file_mod

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(file_mod, "start_writeback", lambda fd, a, n: started.append((a, n)))
    monkeypatch.setattr(file_mod, "WRITEBACK_CHUNK", 1 << 20)
    m = _long_runs(sources)
    srcs = [open_file(p) for p in sources]
    with AtomicOutput(str(tmp_path / "o")) as f:
        sink = _page_cache_sink(f)
        compact(m, srcs, HEADER, sink)
        sink.close()
        size = sink.pos
    for s in srcs:
        s.close()
    assert started and started[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(started))
    assert all(n >= 1 << 20 for _, n in started)
    assert size - sum(n for _, n in started) < 1 << 20  # at most the last step's worth


# -- imports ---------------------------------------------------------------------------

_PROBE = """
import sys
from commands.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
libs = [l.split()[-1] for l in open('/proc/self/maps') if 'lz4' in l or 'zstd' in l]
mods = [m for m in sys.modules if m.split('.')[0] in ('lz4', 'zstandard', 'zstd')]
print(bool(libs or mods))
"""


def test_plain_commit_loads_no_codec(tmp_path):
    d, i = str(tmp_path / "l.data"), str(tmp_path / "l.index")
    ops.create(d, i, 1 << 20)
    with open_rw_layer(d, i) as lay:
        lay.pwrite(0, b"x" * 4096)
        lay.flush()
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def codec_loaded(*args: str) -> bool:
        p = subprocess.run(
            [sys.executable, "-c", _PROBE, "commit", "-f", *args, d, i, str(tmp_path / "o")],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return p.stdout.strip() == "True"

    assert not codec_loaded()
    assert codec_loaded("-z")  # the probe sees a codec when there is one


def test_encode_entries_pad_is_what_the_model_pads_with():
    """The model pads with encode_entry(INVALID, 0, 0, False); so does compact."""
    pad = Mappings(
        np.full(1, INVALID_OFFSET, dtype=np.uint64),
        np.zeros(1, dtype=np.uint64),
        np.zeros(1, dtype=np.uint64),
        np.zeros(1, dtype=bool),
        np.zeros(1, dtype=np.uint8),
    )
    assert encode_entries(pad) == encode_entry(INVALID_OFFSET, 0, 0, False)
