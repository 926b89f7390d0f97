"""The registry cache (docs/formats.md §8.4) and RemoteBlob, against plain fetch callables.

A model test drives random reads, drops, eviction passes and restarts against the blobs'
bytes; the crash tests kill a filling process with SIGKILL and replay recorded fills at
simulated power cuts (tests/crashsim.py): a unit the journal calls cached always holds
the blob's bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.errors import CorruptError, RemoteError
from obd.registry.blob import RegistryStats, RemoteBlob
from obd.registry.cache import JOURNAL_SUFFIX, FileCache, GiB, read_journal, watermarks
from tests.crashsim import CrashSim, CrashState, recording

REPO = Path(__file__).resolve().parent.parent
UNIT = 4096


def blob_bytes(seed: int, size: int) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{n}".encode()).digest()
        n += 1
    return bytes(out[:size])


def key_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Source:
    """A blob's bytes served by ``fetch`` with a log of every request."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.fail = False

    def fetch(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.calls.append((offset, length))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RemoteError("registry down (test)")
        return self.data[offset : offset + length]

    @property
    def fetched(self) -> int:
        return sum(n for _, n in self.calls)


def check_on_disk(folder: Path, blobs: dict[str, bytes], unit: int = UNIT) -> int:
    """Every unit a journal calls cached holds the blob's bytes; returns the units checked."""
    checked = 0
    for key, data in blobs.items():
        jpath, dpath = folder / (key + JOURNAL_SUFFIX), folder / key
        if not jpath.exists() or not dpath.exists():
            continue
        present = read_journal(jpath.read_bytes(), unit, len(data))
        if present is None:
            continue
        raw = dpath.read_bytes()
        for u, p in enumerate(present):
            if p:
                lo, hi = u * unit, min((u + 1) * unit, len(data))
                assert raw[lo:hi] == data[lo:hi], f"{key} unit {u} is cached with wrong bytes"
                checked += 1
    return checked


# -- watermarks ------------------------------------------------------------------------------


def test_watermarks_follow_upstream() -> None:
    assert watermarks(4 * GiB) == (int(4 * GiB * 0.9), int(4 * GiB * 0.95))
    wm, risk = watermarks(100 * GiB)
    assert (wm, risk) == (90 * GiB, 95 * GiB)
    wm, risk = watermarks(1000 * GiB)
    assert wm == 950 * GiB and risk == 995 * GiB  # C - 50 GiB; C - 5 GiB


# -- the model test ----------------------------------------------------------------------------

SIZES = [5 * UNIT + 123, 9 * UNIT, 3 * UNIT + 1, 12 * UNIT - 7]
BLOBS = {key_of(d): d for d in (blob_bytes(i, s) for i, s in enumerate(SIZES))}
KEYS = sorted(BLOBS)


class InlineExecutor(Executor):
    """Runs each task at submit: spans and readahead happen in a known order."""

    def submit(self, fn, /, *args, **kwargs):
        f: Future[object] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


op = st.one_of(
    st.tuples(
        st.just("read"), st.integers(0, 3), st.integers(0, 12 * UNIT), st.integers(0, 6 * UNIT)
    ),
    st.tuples(st.just("seq"), st.integers(0, 3), st.integers(0, 11), st.integers(1, 8)),
    st.tuples(
        st.just("evict"), st.integers(0, 3), st.integers(0, 12 * UNIT), st.integers(1, 3 * UNIT)
    ),
    st.tuples(st.just("pass")),
    st.tuples(st.just("restart")),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, min_size=1, max_size=25), capacity_units=st.integers(6, 40))
def test_cache_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple], capacity_units: int
) -> None:
    folder = tmp_path_factory.mktemp("cache")
    capacity = capacity_units * UNIT
    sources = {k: Source(d) for k, d in BLOBS.items()}
    inline = InlineExecutor()
    cache = FileCache(str(folder), capacity=capacity, refill_size=UNIT, reserve=0, interval=None)
    handles = {k: cache.open(k, len(d)) for k, d in BLOBS.items()}
    try:
        for o in ops:
            if o[0] == "read":
                _, b, off, n = o
                key = KEYS[b]
                data, h, src = BLOBS[key], handles[key], sources[key]
                before = len(src.calls)
                was_cached = h.cached(off, n)
                got = h.read(off, n, src.fetch)
                assert got == data[off : off + n]
                if was_cached:
                    assert len(src.calls) == before, "a cached range was fetched"
                for lo, ln in src.calls[before:]:
                    assert lo % UNIT == 0 and (ln % UNIT == 0 or lo + ln == len(data))
                assert cache.usage <= max(cache.risk, 0), (cache.usage, cache.risk)
            elif o[0] == "seq":  # unit by unit, with readahead
                _, b, first, n = o
                key = KEYS[b]
                data, h, src = BLOBS[key], handles[key], sources[key]
                for u in range(first, first + n):
                    got = h.read(u * UNIT, UNIT, src.fetch, inline)
                    assert got == data[u * UNIT : (u + 1) * UNIT]
                assert not h.inflight
                assert cache.usage <= max(cache.risk, 0), (cache.usage, cache.risk)
            elif o[0] == "evict":
                _, b, off, n = o
                handles[KEYS[b]].evict(off, n)
                assert not handles[KEYS[b]].cached(off, min(n, 1)) or off >= len(BLOBS[KEYS[b]])
            elif o[0] == "pass":
                cache.evict_pass()
                assert cache.usage <= cache.watermark
            else:  # a clean restart keeps what was cached
                had = {k: bytes(h.present) for k, h in handles.items()}
                for h in handles.values():
                    h.close()
                cache.close()
                cache = FileCache(
                    str(folder), capacity=capacity, refill_size=UNIT, reserve=0, interval=None
                )
                handles = {k: cache.open(k, len(d)) for k, d in BLOBS.items()}
                assert {k: bytes(h.present) for k, h in handles.items()} == had
            assert cache.usage == sum(h.used_bytes() for h in handles.values())
        check_on_disk(folder, BLOBS)
    finally:
        for h in handles.values():
            h.close()
        cache.close()
    check_on_disk(folder, BLOBS)


# -- fills ----------------------------------------------------------------------------------


def test_concurrent_readers_fetch_a_unit_once(tmp_path: Path) -> None:
    data = blob_bytes(7, 64 * UNIT)
    src = Source(data, delay=0.2)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=16 * UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    results: list[bytes] = []

    def reader(i: int) -> None:
        results.append(blob.read(1000 + i * 100, 3000, src.fetch))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert src.calls == [(0, 16 * UNIT)]
    assert sorted(results) == sorted(data[1000 + i * 100 : 4000 + i * 100] for i in range(8))
    blob.close()
    cache.close()


def test_missing_units_of_one_read_are_fetched_concurrently(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = blob_bytes(8, 256 * UNIT)
    src = Source(data, delay=0.2)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    stats = RegistryStats()
    with ThreadPoolExecutor(8) as pool:
        rb = RemoteBlob(src.fetch, len(data), name="test://blob", cache=cache, key=key_of(data), pool=pool, stats=stats)  # fmt: skip
        t0 = time.monotonic()
        assert rb.pread(0, len(data)) == data  # 16 spans of 16 units
        took = time.monotonic() - t0
        rb.close()
    assert len(src.calls) == 16 and took < 16 * 0.2 / 2, took
    assert stats.requests == 16 and stats.fetched == len(data)
    cache.close()


def test_sequential_misses_read_ahead_random_ones_do_not(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = blob_bytes(11, 400 * UNIT)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    with ThreadPoolExecutor(4) as pool:
        blob = cache.open(key_of(data), len(data))
        src = Source(data)
        for off in range(0, 200 * UNIT, UNIT):  # one unit at a time, front to back
            assert blob.read(off, UNIT, src.fetch, pool) == data[off : off + UNIT]
        assert len(src.calls) < 40, len(src.calls)  # the window grew: few, larger requests
        assert max(n for _, n in src.calls) > 8 * UNIT
        rnd = Source(data)
        rng = random.Random(1)
        for _ in range(20):
            off = rng.randrange(200, 400) * UNIT
            assert blob.read(off + 7, 100, rnd.fetch, pool) == data[off + 7 : off + 107]
        pool.shutdown(wait=True)
        assert rnd.fetched <= 20 * 2 * UNIT  # at most a unit ahead of a lucky neighbour
        blob.close()
    cache.close()
    assert check_on_disk(tmp_path, {key_of(data): data}) > 200


def test_close_waits_for_readahead_in_flight(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = blob_bytes(12, 64 * UNIT)
    gate = threading.Event()

    def fetch(offset: int, length: int) -> bytes:
        # readahead runs on the pool; a one-unit read fetches in the reader's thread (a
        # gate on offsets raced: a readahead span could start below it and reach past)
        if threading.current_thread() is not threading.main_thread():
            gate.wait(10)
        return data[offset : offset + length]

    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    with ThreadPoolExecutor(4) as pool:
        blob = cache.open(key_of(data), len(data))
        for off in (0, UNIT):  # the second miss is sequential: unit 2 is read ahead
            assert blob.read(off, UNIT, fetch, pool) == data[off : off + UNIT]
        assert blob.inflight  # readahead is fetching
        closer = threading.Thread(target=blob.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive() and blob.data is not None  # waits for it
        gate.set()
        closer.join(10)
        assert not blob.inflight and blob.data is None
    cache.close()
    assert check_on_disk(tmp_path, {key_of(data): data}) == 3  # the readahead was kept too


def test_sequential_readahead_reaches_128_units(tmp_path: Path) -> None:
    """A sequential reader keeps up to 128 units (32 MiB with 256 KiB units) fetched ahead:
    a registry answers a range in ~10-25 ms whatever its size, so the cold sequential read
    is bound by the requests in flight (8 units gave 2 of 4 MiB on average)."""
    from concurrent.futures import ThreadPoolExecutor

    data = blob_bytes(13, 600 * UNIT)
    src = Source(data)
    pos = [0]
    ahead = [0]

    def fetch(offset: int, length: int) -> bytes:
        ahead[0] = max(ahead[0], (offset + length - pos[0]) // UNIT)
        return src.fetch(offset, length)

    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    with ThreadPoolExecutor(4) as pool:
        blob = cache.open(key_of(data), len(data))
        for off in range(0, len(data), UNIT):
            pos[0] = off
            assert blob.read(off, UNIT, fetch, pool) == data[off : off + UNIT]
        blob.close()
    cache.close()
    assert 128 <= ahead[0] <= 2 * 128 + 16, ahead[0]
    assert src.fetched == len(data)  # each unit fetched once


def test_fetch_error_caches_nothing_and_the_next_read_succeeds(tmp_path: Path) -> None:
    data = blob_bytes(9, 10 * UNIT)
    src = Source(data)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    src.fail = True
    with pytest.raises(RemoteError):
        blob.read(0, 5 * UNIT, src.fetch)
    assert not any(blob.present) and cache.usage == 0
    src.fail = False
    assert blob.read(0, 5 * UNIT, src.fetch) == data[: 5 * UNIT]
    blob.close()
    cache.close()
    assert check_on_disk(tmp_path, {key_of(data): data}) == 5


def test_short_fetch_is_an_error_never_cached(tmp_path: Path) -> None:
    data = blob_bytes(10, 4 * UNIT)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    with pytest.raises(RemoteError, match="got 100"):
        blob.read(0, UNIT, lambda o, n: data[o : o + 100])
    assert not any(blob.present)
    blob.close()
    cache.close()


# -- eviction -------------------------------------------------------------------------------


def test_eviction_is_lru_of_whole_blobs_with_audit_lines(tmp_path: Path) -> None:
    lines: list[tuple[str, dict[str, object]]] = []
    blobs = [blob_bytes(20 + i, 10 * UNIT) for i in range(3)]
    cache = FileCache(
        str(tmp_path), capacity=25 * UNIT, refill_size=UNIT, reserve=0, interval=None,
        audit=lambda ev, **f: lines.append((ev, f)),
    )  # fmt: skip
    wm, _ = watermarks(25 * UNIT)
    a, b, c = (cache.open(key_of(d), len(d)) for d in blobs)
    a.read(0, 10 * UNIT, Source(blobs[0]).fetch)
    b.read(0, 10 * UNIT, Source(blobs[1]).fetch)
    a.read(0, 10, Source(blobs[0]).fetch)  # a is now the most recently used
    b.close()  # closed: evicted by unlinking
    assert cache.usage == 20 * UNIT and not lines
    c.read(0, 5 * UNIT, Source(blobs[2]).fetch)  # 25 units > risk: evict at once
    assert lines and lines[0][0] == "eviction"
    f = lines[0][1]
    assert list(f) == ["actualEvict", "evictByCache", "evictByDisk", "totalUsed_"]
    assert f["actualEvict"] == 10 * UNIT and f["totalUsed_"] == 15 * UNIT
    assert cache.usage <= wm
    assert not (tmp_path / key_of(blobs[1])).exists()  # b (LRU, closed) is gone
    assert not (tmp_path / (key_of(blobs[1]) + JOURNAL_SUFFIX)).exists()
    assert all(a.present) and cache.stats.evicted == 10 * UNIT
    # an open blob is emptied in place, reads still right
    cache.capacity, (cache.watermark, cache.risk) = 4 * UNIT, watermarks(4 * UNIT)
    cache.evict_pass()
    assert not any(a.present) and (tmp_path / key_of(blobs[0])).exists()
    assert os.stat(tmp_path / key_of(blobs[0])).st_blocks == 0
    assert a.read(0, 3 * UNIT, Source(blobs[0]).fetch) == blobs[0][: 3 * UNIT]
    for h in (a, c):
        h.close()
    cache.close()


def test_timer_evicts_down_to_the_watermark_and_disk_reserve(tmp_path: Path) -> None:
    data = blob_bytes(30, 40 * UNIT)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, reserve=0, interval=0.05)
    blob = cache.open(key_of(data), len(data))
    blob.read(0, len(data), Source(data).fetch)
    assert cache.usage == 40 * UNIT
    cache.reserve = cache.free_disk() + (1 << 40)  # never that much free: evict it all
    deadline = time.monotonic() + 5
    while not (cache.usage == 0 and cache.stats.evictions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.usage == 0 and cache.stats.evictions >= 1
    blob.close()
    cache.close()


def test_startup_scan_counts_existing_files_and_evicts_them(tmp_path: Path) -> None:
    data = blob_bytes(31, 20 * UNIT)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    blob.read(0, len(data), Source(data).fetch)
    blob.close()
    cache.close()
    cache = FileCache(str(tmp_path), capacity=10 * UNIT, refill_size=UNIT, reserve=0, interval=None)
    assert cache.usage >= 20 * UNIT
    cache.evict_pass()
    assert cache.usage == 0 and not (tmp_path / key_of(data)).exists()
    cache.close()


def test_one_process_per_cache_folder(tmp_path: Path) -> None:
    from obd.errors import FileAccessError

    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    with pytest.raises(FileAccessError, match="in use by this process"):
        FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    cache.close()
    FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None).close()


def test_other_refill_size_resets_the_blob(tmp_path: Path) -> None:
    data = blob_bytes(32, 20 * UNIT)
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    blob.read(0, len(data), Source(data).fetch)
    blob.close()
    cache.close()
    cache = FileCache(str(tmp_path), capacity=GiB, refill_size=2 * UNIT, interval=None)
    blob = cache.open(key_of(data), len(data))
    assert not any(blob.present)
    src = Source(data)
    assert blob.read(0, len(data), src.fetch) == data and src.fetched == len(data)
    blob.close()
    cache.close()


# -- corrupt copies ---------------------------------------------------------------------------


def zfile_bytes(tmp_path: Path, plain: bytes) -> bytes:
    from obd.formats.zfile.writer import ZFileWriter
    from obd.io.file import open_file

    p = tmp_path / "z.zfile"
    out = open_file(p, writable=True, create=True)
    with ZFileWriter(out, block_size=4096) as w:
        w.write(plain)
    out.close()
    return p.read_bytes()


def test_corrupt_cached_block_is_dropped_and_fetched_again_once(tmp_path: Path) -> None:
    from obd.formats.zfile import ZFileReader

    plain = blob_bytes(40, 64 * 1024) + bytes(64 * 1024)
    z = zfile_bytes(tmp_path, plain)
    key = key_of(z)
    cdir = tmp_path / "cache"
    src = Source(z)
    cache = FileCache(str(cdir), capacity=GiB, refill_size=UNIT, interval=None)
    rb = RemoteBlob(src.fetch, len(z), name="test://z", cache=cache, key=key)
    with ZFileReader(rb) as r:
        assert r.pread(0, len(plain)) == plain
        block_at = int(r.offsets[3])
    cache.close()
    # flip a byte of block 3 in the cache file: the journal still says cached
    with open(cdir / key, "r+b") as f:
        f.seek(block_at + 10)
        b = f.read(1)
        f.seek(block_at + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    src.calls.clear()
    cache = FileCache(str(cdir), capacity=GiB, refill_size=UNIT, interval=None)
    rb = RemoteBlob(src.fetch, len(z), name="test://z", cache=cache, key=key)
    with ZFileReader(rb) as r:
        assert r.pread(3 * 4096, 4096) == plain[3 * 4096 : 4 * 4096]
        assert r.pread(0, len(plain)) == plain
    assert 1 <= len(src.calls) <= 2 and all(
        off <= block_at < off + n + UNIT for off, n in src.calls
    )
    cache.close()
    assert check_on_disk(cdir, {key: z}) > 0


def test_corrupt_source_is_reported_not_looped(tmp_path: Path) -> None:
    from obd.formats.zfile import ZFileReader

    plain = blob_bytes(41, 32 * 1024)
    z = bytearray(zfile_bytes(tmp_path, plain))
    cache = FileCache(str(tmp_path / "c"), capacity=GiB, refill_size=UNIT, interval=None)
    good = bytes(z)
    src = Source(good)
    rb = RemoteBlob(src.fetch, len(z), name="test://z", cache=cache, key=key_of(good))
    r = ZFileReader(rb)
    at = int(r.offsets[2])
    z[at + 5] ^= 0xFF
    src.data = bytes(z)  # the registry now serves a bad block (and the cache is cold)
    rb.evict(0, len(z))
    with pytest.raises(CorruptError, match="block 2"):
        r.pread(2 * 4096, 100)
    assert len(src.calls) < 12  # bounded retries
    r.close()
    cache.close()


# -- crashes --------------------------------------------------------------------------------

CHILD = r"""
import hashlib, os, random, sys, time
sys.path.insert(0, {repo!r})
from obd.registry.cache import FileCache
from tests.test_registry_cache import blob_bytes, key_of
folder, seed = sys.argv[1], int(sys.argv[2])
blobs = [blob_bytes(s, 48 * 4096 + 17 * s) for s in range(3)]
cache = FileCache(folder, capacity=80 * 4096, refill_size=4096, reserve=0, interval=None)
hs = [cache.open(key_of(d), len(d)) for d in blobs]
rng = random.Random(seed)
def fetch_of(d):
    def fetch(o, n):
        time.sleep(rng.random() * 0.002)
        return d[o:o + n]
    return fetch
print("ready", flush=True)
while True:
    i = rng.randrange(3)
    d = blobs[i]
    off = rng.randrange(len(d))
    if rng.random() < 0.1:
        hs[i].evict(off, rng.randrange(1, 5 * 4096))
    else:
        got = hs[i].read(off, 9000, fetch_of(d))
        assert got == d[off:off + 9000]
"""


def test_sigkill_mid_fill_never_leaves_a_bad_cached_range(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    blobs = {key_of(d): d for d in (blob_bytes(s, 48 * 4096 + 17 * s) for s in range(3))}
    folder = tmp_path / "cache"
    rng = random.Random(5)
    checked = 0
    for round_ in range(4):
        p = subprocess.Popen([sys.executable, str(script), str(folder), str(round_)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        err = p.stderr.read() if p.stderr else ""
        assert "Traceback" not in err, err
        checked += check_on_disk(folder, blobs)
        # and a new run reads right from what was left
        cache = FileCache(
            str(folder), capacity=80 * 4096, refill_size=4096, reserve=0, interval=None
        )
        for key, d in blobs.items():
            h = cache.open(key, len(d))
            src = Source(d)
            assert h.read(0, len(d), src.fetch) == d
            h.close()
        cache.close()
    assert checked > 0, "no round left cached units to check"


def _record_fills(folder: Path, blobs: dict[str, bytes]) -> CrashSim:
    (ka, da), (kb, db) = blobs.items()
    with recording(folder) as rec:
        cache = FileCache(
            str(folder), capacity=40 * UNIT, refill_size=UNIT, reserve=0, interval=None
        )
        a, b = cache.open(ka, len(da)), cache.open(kb, len(db))
        a.read(0, 8 * UNIT, Source(da).fetch)
        cache.commit()
        b.read(3 * UNIT, 9 * UNIT, Source(db).fetch)
        a.read(10 * UNIT, 6 * UNIT, Source(da).fetch)
        cache.commit()
        a.evict(2 * UNIT, 3 * UNIT)
        a.read(0, 8 * UNIT, Source(da).fetch)
        b.read(0, 24 * UNIT, Source(db).fetch)  # past the risk mark: a is reset
        cache.commit()
        a.read(0, 24 * UNIT, Source(da).fetch)
        a.close()
        b.close()
        cache.close()
    return CrashSim(rec, "registry cache")


def _crash_check(blobs: dict[str, bytes]) -> Callable[[CrashState], str | None]:
    def check(state: CrashState) -> str | None:
        check_on_disk(state.dir, blobs)
        c = FileCache(
            str(state.dir), capacity=40 * UNIT, refill_size=UNIT, reserve=0, interval=None
        )
        try:
            for k, d in blobs.items():
                h = c.open(k, len(d))
                if h.read(0, len(d), Source(d).fetch) != d:
                    return f"{k}: wrong bytes after the crash"
                h.close()
        finally:
            c.close()
        return None

    return check


CRASH_BLOBS = {key_of(d): d for d in (blob_bytes(60 + s, 24 * UNIT + s) for s in range(2))}


def test_power_cut_at_any_point_leaves_no_bad_cached_unit(tmp_path: Path) -> None:
    """Recorded fills, drops and an eviction replayed at simulated crashes (crashsim)."""
    folder = tmp_path / "c"
    folder.mkdir()
    sim = _record_fills(folder, CRASH_BLOBS)
    report = sim.explore(_crash_check(CRASH_BLOBS), points=40, subsets=6, seed=3)
    report.assert_clean()
    assert report.states > 20


def test_missing_data_fsync_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the data fsync before the journal records, some crash reads a bad unit."""
    from obd.io.file import LocalFile

    real = LocalFile.flush

    def flush(self: LocalFile) -> None:
        if not self.path.endswith(JOURNAL_SUFFIX):
            return
        real(self)

    monkeypatch.setattr(LocalFile, "flush", flush)
    folder = tmp_path / "c"
    folder.mkdir()
    sim = _record_fills(folder, CRASH_BLOBS)
    monkeypatch.setattr(LocalFile, "flush", real)
    report = sim.explore(_crash_check(CRASH_BLOBS), points=40, subsets=6, seed=3)
    assert report.violations, "the crash simulator missed a disabled data fsync"


# -- background download ------------------------------------------------------------------


def test_background_download_verifies_renames_and_switches(tmp_path: Path) -> None:
    from obd.registry.download import BackgroundDownloader, DownloadSettings

    data = blob_bytes(70, 40 * UNIT + 5)
    src = Source(data)
    lines: list[str] = []
    stats = RegistryStats()
    rb = RemoteBlob(src.fetch, len(data), name="test://d", stats=stats)
    dl = BackgroundDownloader(
        DownloadSettings(enable=True, delay=0, delayExtra=1, maxMBps=1, blockSize=8 * UNIT),
        stats=stats, audit=lambda ev, **f: lines.append(ev),
    )  # fmt: skip
    layer_dir = tmp_path / "layer"
    dl.add(rb, rb.raw_fetch, dir=str(layer_dir), digest=key_of(data), size=len(data))
    t0 = time.monotonic()
    dl.start()
    reads = 0
    while rb.local is None and time.monotonic() - t0 < 10:
        assert rb.pread(reads * 7, 5000) == data[reads * 7 : reads * 7 + 5000]
        reads += 1
    took = time.monotonic() - t0
    dl.stop()
    assert rb.local is not None and reads > 0
    assert took >= len(data) / (1 << 20) * 0.8  # maxMBps 1
    assert (layer_dir / "overlaybd.commit").read_bytes() == data
    assert not (layer_dir / ".download").exists()
    before = len(src.calls)
    assert rb.pread(0, len(data)) == data and len(src.calls) == before
    assert stats.downloads[key_of(data)].state == "done"
    assert stats.downloads[key_of(data)].done == len(data)
    assert lines.count("bk_download") == 6
    rb.close()


def test_background_download_with_a_wrong_digest_retries_then_gives_up(tmp_path: Path) -> None:
    from obd.registry.download import BackgroundDownloader, DownloadSettings

    data = blob_bytes(71, 10 * UNIT)
    src = Source(data)
    stats = RegistryStats()
    rb = RemoteBlob(src.fetch, len(data), name="test://d", stats=stats)
    dl = BackgroundDownloader(
        DownloadSettings(enable=True, delay=0, delayExtra=1, maxMBps=0, tryCnt=3), stats=stats
    )
    wrong = key_of(data + b"x")
    dl.add(rb, rb.raw_fetch, dir=str(tmp_path), digest=wrong, size=len(data))
    dl.start()
    assert dl.thread is not None
    dl.thread.join(10)
    p = stats.downloads[wrong]
    assert p.state == "failed" and p.attempts == 3
    assert not (tmp_path / "overlaybd.commit").exists() and rb.local is None
    assert src.fetched == 3 * len(data)  # each retry after a mismatch copies everything
    rb.close()
