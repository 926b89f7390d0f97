"""The registry cache, type ``file`` (docs/formats.md §8.4): blob ranges kept on local disk.

Layout under ``cacheDir``, per blob (``key`` = the blob URL's basename, ``sha256:<hex>``):

* ``<key>``: a sparse data file truncated to the blob size (upstream's name and shape);
* ``<key>.units``: a journal saying which ``refillSize`` units of the data file hold the
  blob's bytes. Upstream has no journal (presence is FIEMAP: an allocated range counts as
  cached, which a crash mid-fill can leave allocated but unwritten); here a unit is cached
  only once the journal says so, and a journal record is written only after an fsync of
  the data file returned. A ``kill -9`` or a power cut mid-fill therefore never leaves a
  range that reads as cached but holds zeros or old bytes: such a unit is fetched again.

Journal: a 32-byte header ``<8s magic "OBDcache"><u32 version 1><u32 unit size><u64 blob
size><u32 crc32 of the first 24 bytes><u32 0>``, then 16-byte records ``<4s "OBDu"><u32
first unit><u32 count | 1<<31 when dropped><u32 crc32 of the first 12 bytes>`` applied in
order (records never straddle a 512-byte sector; a torn or lost record is skipped: it
can only forget units). A header that does not match (torn, another unit size, another
size) resets the blob.

Fills are whole units, aligned to ``refillSize``, clipped to the blob size. A unit is
readable in this process as soon as its bytes are written (the page cache holds them);
it becomes durable, and visible to a later run, when the committer thread has fsynced
the data file and appended its record (group commit: one data fsync and one journal
fsync cover every fill since the previous round). Concurrent readers of one missing unit
fetch it once. A write that fails (ENOSPC...) still returns the data, uncached. A miss
that continues the units just before it (cached or being fetched) is sequential: it also
starts fetching the next units in the background, a window that doubles with each
sequential miss up to READAHEAD_UNITS and drops to none on a miss elsewhere; a read that reaches
the first unit of the last window starts the next one, so a sequential reader does not
stall at each window's end (registries answer a range in milliseconds whatever its size:
one large request beats many small ones).

Capacity (bytes; ``cacheSizeGB`` GiB from the config): watermark = max(0.9 C, C - 50 GiB),
risk mark = max(C - 5 GiB, (watermark + C) / 2). A timer pass every 10 s evicts
max(usage - watermark, reserve - free disk) (reserve 1 GiB), at most the usage; a fill
that takes usage past the risk mark runs a pass at once. Eviction is LRU of whole blobs:
the journal is emptied and fsynced first, then the data is dropped (an open blob is
emptied and moved to the most recently used end, a closed one is unlinked). Each pass
that evicts writes an ``eviction`` audit line (§8.8). Usage counts cached units (each
rounded up to 4 KiB); files found at startup count their allocated blocks.

One process uses a cache folder at a time (``flock`` of ``<cacheDir>/.lock``): a second
one gets a :class:`~obd.errors.FileAccessError` naming the holder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from obd.errors import FileAccessError, RemoteError
from obd.io.file import LocalFile, _fsync_dir, _unlink, open_file
from obd.io.lock import lock_writer

log = logging.getLogger("obd.registry.cache")

GiB = 1 << 30
HEADER = struct.Struct("<8sIIQII")
RECORD = struct.Struct("<4sIII")
MAGIC = b"OBDcache"
RECORD_MAGIC = b"OBDu"
VERSION = 1
DROP = 1 << 31
JOURNAL_SUFFIX = ".units"
PAGE = 4096
MAX_SPAN_UNITS = 16  # units per fetch request (4 MiB with the default refill size)
READAHEAD_UNITS = 128  # the most a run of sequential misses fetches ahead (32 MiB)
_KEY = re.compile(r"^[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+$")

Fetch = Callable[[int, int], bytes]
"""``fetch(offset, length) -> bytes``: the source of a blob (exactly ``length`` bytes)."""
Audit = Callable[..., None]
"""``audit(event, **fields)``: an audit-log writer (:meth:`obd.serve.audit.AuditLog.event`)."""


def watermarks(capacity: int) -> tuple[int, int]:
    """(watermark, risk mark) of a cache of ``capacity`` bytes (§8.4)."""
    wm = max(capacity * 9 // 10, capacity - 50 * GiB)
    risk = max(capacity - 5 * GiB, (wm + capacity) // 2)
    return wm, risk


@dataclass
class CacheStats:
    """Counters of one cache (read by the metrics exporter)."""

    hits: int = 0  # bytes served from the cache
    misses: int = 0  # bytes that had to be fetched for a read
    hit_reads: int = 0
    miss_reads: int = 0
    fetched: int = 0  # bytes fetched into the cache
    fetches: int = 0
    evictions: int = 0  # eviction passes that evicted something
    evicted: int = 0  # bytes evicted
    write_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def _header(unit: int, size: int) -> bytes:
    head = struct.pack("<8sIIQ", MAGIC, VERSION, unit, size)
    return head + struct.pack("<II", zlib.crc32(head), 0)


def _record(first: int, count: int) -> bytes:
    head = struct.pack("<4sII", RECORD_MAGIC, first, count)
    return head + struct.pack("<I", zlib.crc32(head))


def read_journal(raw: bytes, unit: int, size: int) -> bytearray | None:
    """The units a journal says are cached (1 per unit), or None when its header does not
    match ``unit`` / ``size`` (the blob is then reset)."""
    if len(raw) < HEADER.size:
        return None
    magic, version, u, sz, crc, _ = HEADER.unpack_from(raw)
    if (magic, version, u, sz) != (MAGIC, VERSION, unit, size) or crc != zlib.crc32(raw[:24]):
        return None
    n = (size + unit - 1) // unit
    present = bytearray(n)
    for at in range(HEADER.size, len(raw) - RECORD.size + 1, RECORD.size):
        rm, first, count, rcrc = RECORD.unpack_from(raw, at)
        if rm != RECORD_MAGIC or rcrc != zlib.crc32(raw[at : at + 12]):
            continue  # torn or lost: forgets units, never invents them
        value = 0 if count & DROP else 1
        count &= ~DROP
        if first >= n:
            continue
        end = min(first + count, n)
        present[first:end] = bytes([value]) * (end - first)
    return present


@dataclass
class _Entry:
    """What the cache knows of one blob (open or not)."""

    key: str
    used: int = 0  # bytes counted in the usage
    blob: CachedBlob | None = None


class FileCache:
    """The cache of every blob under ``cache_dir``, bounded by ``capacity`` bytes.

    ``reserve`` is the free disk space the timer keeps (1 GiB as upstream);
    ``interval`` the timer period in seconds (None: no timer, call :meth:`evict_pass`).
    """

    def __init__(
        self,
        cache_dir: str,
        *,
        capacity: int,
        refill_size: int = 262144,
        reserve: int = GiB,
        interval: float | None = 10.0,
        audit: Audit | None = None,
        commit_delay: float = 0.0,
    ) -> None:
        r = refill_size
        if r <= 0 or r & (r - 1) or r % PAGE:
            raise ValueError(f"refillSize {r} must be a power of 2 and a multiple of 4096")
        self.dir = cache_dir
        self.capacity = capacity
        self.unit = refill_size
        self.reserve = reserve
        self.audit = audit
        self.stats = CacheStats()
        self.watermark, self.risk = watermarks(capacity)
        self.lock = threading.RLock()
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self.usage = 0
        self._evicting = threading.Lock()
        self._closed = threading.Event()
        self._commit_wake = threading.Event()
        self._commit_delay = commit_delay
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise FileAccessError(
                f"cannot create the cache folder: {e.strerror}", path=cache_dir
            ) from None
        # one process per cache folder: another one's eviction would punch bytes this one
        # still counts as cached
        self._lockf = open_file(os.path.join(cache_dir, ".lock"), writable=True, create=True)
        try:
            lock_writer(self._lockf.fd, cache_dir)
        except BaseException:
            self._lockf.close()
            raise
        self._scan()
        self._committer = threading.Thread(
            target=self._commit_loop, name="cache-commit", daemon=True
        )
        self._committer.start()
        self._timer: threading.Thread | None = None
        if interval is not None:
            self._timer = threading.Thread(
                target=self._timer_loop, args=(interval,), name="cache-evict", daemon=True
            )
            self._timer.start()

    # -- startup --------------------------------------------------------------------------
    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        names = set(os.listdir(self.dir))
        for name in names:
            if name.endswith(JOURNAL_SUFFIX):
                key = name[: -len(JOURNAL_SUFFIX)]
                if key not in names:  # a journal without its data: an eviction cut short
                    with contextlib.suppress(OSError):
                        _unlink(os.path.join(self.dir, name))
                continue
            if not _KEY.match(name):
                continue
            try:
                st = os.stat(os.path.join(self.dir, name))
            except OSError:
                continue
            jpath = os.path.join(self.dir, name + JOURNAL_SUFFIX)
            mtime = st.st_mtime
            with contextlib.suppress(OSError):
                mtime = max(mtime, os.stat(jpath).st_mtime)
            found.append((mtime, name, st.st_blocks * 512))
        for _, key, used in sorted(found):
            self.entries[key] = _Entry(key, used)
            self.usage += used

    # -- blobs ----------------------------------------------------------------------------
    def open(self, key: str, size: int) -> CachedBlob:
        """The cached view of blob ``key`` (``sha256:<hex>``) of ``size`` bytes.

        Each call must be matched by a :meth:`CachedBlob.close`.
        """
        if not _KEY.match(key):
            raise ValueError(f"bad cache key {key!r}")
        with self.lock:
            e = self.entries.get(key)
            if e is None:
                e = self.entries[key] = _Entry(key)
            self.entries.move_to_end(key)
            if e.blob is not None:
                if e.blob.size != size:
                    raise RemoteError(
                        f"blob {key} opened with size {size}, already open with {e.blob.size}"
                    )
                e.blob.refs += 1
                return e.blob
            blob = CachedBlob(self, e, size)
            try:
                blob._load()
            except BaseException:
                blob._close_files()
                raise
            self.usage += blob.used_bytes() - e.used
            e.used = blob.used_bytes()
            e.blob = blob
            return blob

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key)

    def _touch(self, e: _Entry) -> None:
        # under self.lock
        if self.entries.get(e.key) is e:
            self.entries.move_to_end(e.key)

    def _grew(self, e: _Entry, nbytes: int) -> bool:
        """Count ``nbytes`` more for ``e``; True when the risk mark is passed."""
        with self.lock:
            e.used += nbytes
            self.usage += nbytes
            return self.usage > self.risk

    # -- eviction -------------------------------------------------------------------------
    def free_disk(self) -> int:
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return self.reserve
        return st.f_bavail * st.f_frsize

    def evict_pass(self) -> int:
        """One eviction pass (§8.4); returns the bytes evicted."""
        with self._evicting:
            with self.lock:
                by_cache = max(0, self.usage - self.watermark)
                usage = self.usage
            by_disk = max(0, self.reserve - self.free_disk())
            want = min(max(by_cache, by_disk), usage)
            if want <= 0:
                return 0
            freed = 0
            with self.lock:
                order = list(self.entries.values())
            for e in order:
                if freed >= want:
                    break
                freed += self._drop_entry(e)
            with self.lock:
                total = self.usage
            self.stats.add(evictions=1, evicted=freed)
            log.info(
                "cache eviction: %d bytes (by cache %d, by disk %d), %d bytes used",
                freed, by_cache, by_disk, total,
            )  # fmt: skip
            if self.audit is not None:
                self.audit(
                    "eviction",
                    actualEvict=freed,
                    evictByCache=by_cache,
                    evictByDisk=by_disk,
                    totalUsed_=total,
                )
            return freed

    def _drop_entry(self, e: _Entry) -> int:
        with self.lock:
            blob = e.blob
            if blob is None:
                freed = e.used
                self.usage -= e.used
                e.used = 0
                if self.entries.get(e.key) is e:
                    del self.entries[e.key]
        if blob is not None:
            freed = blob._reset()
            with self.lock:
                self._touch(e)
            return freed
        # not open: journal first (a data file without its journal caches nothing)
        for name in (e.key + JOURNAL_SUFFIX, e.key):
            with contextlib.suppress(FileNotFoundError):
                _unlink(self._path(name))
        _fsync_dir(self.dir)
        return freed

    def _timer_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.evict_pass()
            except Exception as exc:  # keep the timer alive; say why
                log.error("cache eviction failed: %s", exc)

    def _kick(self) -> None:
        """A fill passed the risk mark: evict now (in this thread, once at a time)."""
        if self._evicting.locked():
            return
        try:
            self.evict_pass()
        except Exception as exc:
            log.error("cache eviction failed: %s", exc)

    # -- commit ---------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            self._commit_wake.wait()
            if self._commit_delay:
                time.sleep(self._commit_delay)
            self._commit_wake.clear()
            self.commit()
            if self._closed.is_set():
                return

    def commit(self) -> None:
        """Make every fill so far durable (data fsync, then journal records, then fsync)."""
        with self.lock:
            blobs = [e.blob for e in self.entries.values() if e.blob is not None and e.blob.pending]
        for b in blobs:
            try:
                b._commit()
            except OSError as exc:
                log.error("cache %s: cannot commit fills: %s", b.key, exc)

    def stopping(self) -> None:
        """No more readahead starts (queued ones give their units back)."""
        self._closed.set()

    def close(self) -> None:
        """Make every fill durable and stop the threads. Blobs still open keep their files
        (a read may be running in them; closing a descriptor under it could hand it
        another file's bytes); they close with :meth:`CachedBlob.close` or the process."""
        self._closed.set()
        self._commit_wake.set()
        self._committer.join(30)
        self.commit()
        self._lockf.close()


@dataclass
class _Fill:
    """A unit being fetched by one reader; others wait on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)


class CachedBlob:
    """One blob's cached view. ``read(offset, length, fetch)`` fills what is missing."""

    def __init__(self, cache: FileCache, entry: _Entry, size: int) -> None:
        self.cache = cache
        self.entry = entry
        self.key = entry.key
        self.size = size
        self.unit = cache.unit
        self.nunits = (size + self.unit - 1) // self.unit
        self.refs = 1
        self.present = bytearray(self.nunits)
        self.pending: list[tuple[int, int]] = []  # (first unit, count) written, not journaled
        self.inflight: dict[int, _Fill] = {}
        self.ra_window = 0  # units fetched ahead of a sequential miss
        self.ra_trigger = -1  # first unit of the last window: a read there starts the next
        self.ra_next = 0  # the unit after the last window
        self.gen = 0  # bumped by every drop: a read that saw another gen retries
        self.epoch = 0  # bumped by a whole reset: fills of an older epoch are not kept
        self.jlock = threading.Lock()  # journal writers (commit, drop, reset)
        self.data: LocalFile | None = None
        self.journal: LocalFile | None = None

    # -- files ----------------------------------------------------------------------------
    def _load(self) -> None:
        c = self.cache
        dpath, jpath = c._path(self.key), c._path(self.key + JOURNAL_SUFFIX)
        created = not os.path.exists(dpath) or not os.path.exists(jpath)
        self.data = open_file(dpath, writable=True, create=True)
        self.journal = open_file(jpath, writable=True, create=True)
        raw = b""
        if not created:
            jsize = self.journal.size()
            raw = self.journal.pread(0, jsize)
        present = read_journal(raw, self.unit, self.size)
        if present is None:  # new, torn header, other unit or size: start empty
            self.journal.truncate(0)
            self.journal.pwrite(0, _header(self.unit, self.size))
            self.journal.flush()
            self.data.truncate(0)
            self.data.truncate(self.size)
            _fsync_dir(c.dir)
        else:
            self.present = present
            if self.data.size() != self.size:
                self.data.truncate(self.size)
            # drop what a crash left written but not journaled (space, not bytes, matters)
            for s, e in list(self.data.data_extents(0, self.size)):
                self._punch_absent(s, e)

    def _punch_absent(self, start: int, end: int) -> None:
        assert self.data is not None
        u, unit = start // self.unit, self.unit
        while u * unit < end:
            if not self.present[u]:
                v = u
                while v * unit < end and not self.present[v]:
                    v += 1
                s = max(u * unit, start)
                self.data.punch_hole(s, min(v * unit, end) - s)
                u = v
            else:
                u += 1

    def _close_files(self) -> None:
        for f in (self.data, self.journal):
            if f is not None:
                f.close()
        self.data = self.journal = None

    def unit_len(self, u: int) -> int:
        return min(self.unit, self.size - u * self.unit)

    def used_bytes(self) -> int:
        n = 0
        for u in range(self.nunits):
            if self.present[u]:
                n += (self.unit_len(u) + PAGE - 1) // PAGE * PAGE
        return n

    def _bytes_of(self, first: int, count: int) -> int:
        return sum(
            (self.unit_len(u) + PAGE - 1) // PAGE * PAGE for u in range(first, first + count)
        )

    # -- reads ----------------------------------------------------------------------------
    def cached(self, offset: int, length: int) -> bool:
        """Whether every byte of the range is in the cache now."""
        end = min(offset + length, self.size)
        if offset >= end:
            return True
        with self.cache.lock:
            return all(self.present[offset // self.unit : (end - 1) // self.unit + 1])

    def read(self, offset: int, length: int, fetch: Fetch, pool: Executor | None = None) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end), from the cache or ``fetch``.

        Missing units are fetched whole (in spans of up to 16 units, concurrently on
        ``pool`` when given) and kept. A fetch error is raised; nothing is cached then.
        """
        end = min(offset + length, self.size)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if offset >= end:
            return b""
        c = self.cache
        unit = self.unit
        u0, u1 = offset // unit, (end - 1) // unit + 1
        data = self.data
        with c.lock:  # the usual case, all cached: one pread, no copies
            whole = data is not None and all(self.present[u0:u1])
            if whole:
                c._touch(self.entry)
                gen = self.gen
        if whole:
            assert data is not None
            hot = data.pread(offset, end - offset)
            if self.gen == gen and len(hot) == end - offset:
                c.stats.add(hits=len(hot), hit_reads=1)
                return hot
        out = bytearray(end - offset)
        todo = list(range(u0, u1))
        hit = miss = 0
        for _round in range(8):
            with c.lock:
                c._touch(self.entry)
                gen = self.gen
                have = [u for u in todo if self.present[u]]
                absent = [u for u in todo if not self.present[u]]
                claim = [u for u in absent if u not in self.inflight]
                for u in claim:
                    self.inflight[u] = _Fill()
                waits = [self.inflight[u] for u in absent if u not in claim]
                ahead = self._readahead(claim, u0, u1) if pool is not None else []
            if ahead:
                assert pool is not None
                self._prefetch(ahead, fetch, pool)
            got: set[int] = set()
            if have:
                got |= self._read_present(have, offset, end, out, gen)
                hit += sum(self._clip(u, offset, end) for u in got)
            if claim:
                self._fill(claim, offset, end, out, fetch, pool)
                got |= set(claim)
                miss += sum(self._clip(u, offset, end) for u in claim)
            for w in waits:
                w.done.wait()
            todo = [u for u in todo if u not in got]
            if not todo:
                break
        else:  # pragma: no cover - needs eviction to beat 8 rounds of fills
            raise RemoteError(f"cache {self.key}: a read kept losing its units to eviction")
        c.stats.add(hits=hit, hit_reads=int(hit > 0), misses=miss, miss_reads=int(miss > 0))
        return bytes(out)

    def _clip(self, u: int, offset: int, end: int) -> int:
        return min(end, (u + 1) * self.unit) - max(offset, u * self.unit)

    def _read_present(
        self, units: list[int], offset: int, end: int, out: bytearray, gen: int
    ) -> set[int]:
        """Copy cached units into ``out``; the set of units read while none was dropped."""
        assert self.data is not None
        done: set[int] = set()
        for first, count in _runs(units):
            s = max(offset, first * self.unit)
            e = min(end, (first + count) * self.unit)
            data = self.data.pread(s, e - s)
            if self.gen != gen or len(data) != e - s:
                return done  # dropped meanwhile: read those again
            out[s - offset : e - offset] = data
            done.update(range(first, first + count))
        return done

    def _fill(self, units: list[int], offset: int, end: int, out: bytearray, fetch: Fetch, pool: Executor | None) -> None:  # fmt: skip
        spans: list[tuple[int, int]] = []
        for first, count in _runs(units):
            while count:
                n = min(count, MAX_SPAN_UNITS)
                spans.append((first, n))
                first += n
                count -= n
        c = self.cache
        with c.lock:
            epoch = self.epoch
        futures: list[Future[bytes]] = []
        try:
            if pool is not None and len(spans) > 1:
                futures = [pool.submit(self._fetch, fetch, f, n) for f, n in spans[1:]]
                results = [self._fetch(fetch, *spans[0])]
                results += [f.result() for f in futures]
            else:
                results = [self._fetch(fetch, f, n) for f, n in spans]
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:  # no fetch may write after the claims are released
                with contextlib.suppress(BaseException):
                    f.result()
            self._release(units)
            raise
        try:
            for (first, count), data in zip(spans, results, strict=True):
                lo = first * self.unit
                s, e = max(offset, lo), min(end, lo + len(data))
                out[s - offset : e - offset] = data[s - lo : e - lo]
                self._store(first, count, data, epoch)
        finally:
            self._release(units)

    def _readahead(self, claim: list[int], u0: int, u1: int) -> list[int]:
        """Under the lock: units to fetch ahead (claimed here), see the module doc."""
        if claim:
            first = claim[0]
            if not (first > 0 and (self.present[first - 1] or first - 1 in self.inflight)):
                self.ra_window = 0  # a miss elsewhere
                return []
            start = u1
        elif self.ra_window and u0 <= self.ra_trigger < u1:
            start = self.ra_next  # the reader entered the last window: start the next one
        else:
            return []
        self.ra_window = min(max(1, self.ra_window * 2), READAHEAD_UNITS)
        end = min(start + self.ra_window, self.nunits)
        ahead = []
        for u in range(start, end):
            if not self.present[u] and u not in self.inflight:
                self.inflight[u] = _Fill()
                ahead.append(u)
        self.ra_trigger, self.ra_next = start, end
        return ahead

    def _prefetch(self, units: list[int], fetch: Fetch, pool: Executor) -> None:
        """Fetch and keep ``units`` on ``pool``, nobody waiting but later readers."""

        def run(first: int, count: int, epoch: int) -> None:
            try:
                if self.cache._closed.is_set() or self.data is None:
                    return
                self._store(first, count, self._fetch(fetch, first, count), epoch)
            except Exception as exc:  # a reader that needs these units fetches them itself
                log.debug("cache %s: readahead failed: %s", self.key, exc)
            finally:
                self._release(range(first, first + count))

        with self.cache.lock:
            epoch = self.epoch
        for first, count in _runs(units):
            while count:
                n = min(count, MAX_SPAN_UNITS)
                try:
                    pool.submit(run, first, n, epoch)
                except RuntimeError:  # the pool is shut down: the server is stopping
                    self._release(range(first, first + n))
                first += n
                count -= n

    def _fetch(self, fetch: Fetch, first: int, count: int) -> bytes:
        lo = first * self.unit
        n = min(count * self.unit, self.size - lo)
        data = fetch(lo, n)
        if len(data) != n:
            raise RemoteError(f"blob {self.key}: asked for {n} bytes at {lo}, got {len(data)}")
        self.cache.stats.add(fetched=n, fetches=1)
        return data

    def _store(self, first: int, count: int, data: bytes, epoch: int) -> None:
        c = self.cache
        assert self.data is not None
        try:
            self.data.pwrite(first * self.unit, data)
        except OSError as exc:  # ENOSPC...: the reader still gets its data
            c.stats.add(write_errors=1)
            log.warning("cache %s: cannot write %d bytes: %s", self.key, len(data), exc)
            return
        with c.lock:
            if self.epoch != epoch:
                return  # reset meanwhile: these bytes may have been punched
            for u in range(first, first + count):
                self.present[u] = 1
            self.pending.append((first, count))
        c._commit_wake.set()
        if c._grew(self.entry, self._bytes_of(first, count)):
            c._kick()

    def _release(self, units: Iterable[int]) -> None:
        with self.cache.lock:
            for u in units:
                f = self.inflight.pop(u, None)
                if f is not None:
                    f.done.set()

    # -- durability -----------------------------------------------------------------------
    def _commit(self) -> None:
        c = self.cache
        with self.jlock:
            with c.lock:
                spans, self.pending = self.pending, []
                epoch = self.epoch
            if not spans or self.data is None or self.journal is None:
                return
            self.data.flush()  # the bytes first...
            with c.lock:
                if self.epoch != epoch:
                    return
                # ...then the records of the units still cached (a drop since removed some)
                recs = b"".join(
                    _record(f, n)
                    for first, count in spans
                    for f, n in _runs([u for u in range(first, first + count) if self.present[u]])
                )
            if recs:
                self.journal.append(recs)
                self.journal.flush()

    # -- drops ----------------------------------------------------------------------------
    def evict(self, offset: int, length: int) -> None:
        """Drop the units covering ``[offset, offset+length)`` (a bad copy): durably
        forgotten before this returns, fetched again by the next read."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        c = self.cache
        u0, u1 = offset // self.unit, (end - 1) // self.unit + 1
        with self.jlock:
            with c.lock:
                dropped = [u for u in range(u0, u1) if self.present[u]]
                for u in dropped:
                    self.present[u] = 0
                self.gen += 1
                freed = sum(self._bytes_of(u, 1) for u in dropped)
                self.entry.used -= freed
                c.usage -= freed
            if not dropped or self.journal is None or self.data is None:
                return
            self.journal.append(b"".join(_record(f, n | DROP) for f, n in _runs(dropped)))
            self.journal.flush()
            for f, n in _runs(dropped):
                self.data.punch_hole(f * self.unit, min(n * self.unit, self.size - f * self.unit))
        log.warning("cache %s: dropped %d bytes at %d (bad copy)", self.key, end - offset, offset)

    def _reset(self) -> int:
        """Empty this blob's cache (eviction of an open blob); returns the bytes freed."""
        c = self.cache
        with self.jlock:
            with c.lock:
                freed = self.entry.used
                self.present = bytearray(self.nunits)
                self.pending = []
                self.gen += 1
                self.epoch += 1
                c.usage -= freed
                self.entry.used = 0
            if self.journal is not None and self.data is not None:
                self.journal.truncate(HEADER.size)
                self.journal.flush()  # forgotten before the bytes go
                self.data.punch_hole(0, self.size)
        return freed

    def close(self, timeout: float = 60.0) -> None:
        """Drop one reference; the last one waits for the fills in flight (readahead
        included), commits them and closes the files."""
        c = self.cache
        with c.lock:
            self.refs -= 1
            if self.refs > 0:
                return
        deadline = time.monotonic() + timeout
        while True:
            with c.lock:
                fill = next(iter(self.inflight.values()), None)
            if fill is None or time.monotonic() > deadline:
                break
            fill.done.wait(max(0.0, deadline - time.monotonic()))
        if fill is not None:  # a fetch hangs: leave the files to the process exit
            log.warning("cache %s: fills still running at close; files left open", self.key)
            return
        self._commit()
        with c.lock:
            if self.refs > 0:  # opened again meanwhile
                return
            self._close_files()
            if self.entry.blob is self:
                self.entry.blob = None


def _runs(units: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted unit numbers as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for u in sorted(units):
        if out and out[-1][0] + out[-1][1] == u:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((u, 1))
    return out


__all__ = ["CacheStats", "CachedBlob", "Fetch", "FileCache", "read_journal", "watermarks"]
