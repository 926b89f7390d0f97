"""A registry blob as a ReadAt: ranged fetches through the cache, swappable to a local file.

:class:`RemoteBlob` reads a blob of known size through a ``fetch(offset, length)``
callable (the registry client's ranged GET), keeping what it fetched in a
:class:`~obd.registry.cache.CachedBlob` when there is a cache (§8.4; with a P2P proxy the
cache is bypassed, §8.3). Missing refill units of one read are fetched concurrently on a
small shared pool. ``evict(offset, length)`` drops a bad copy (the ZFile reader calls it
when a block's CRC fails, then reads again). :meth:`RemoteBlob.switch_to` swaps the
backing to a local file once the background download (§8.5) has it: reads in flight
finish on the old backing, later ones go to the file.

:class:`RegistryStats` counts what the metrics exporter shows (§8.7).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from obd.errors import ObdError, RemoteError
from obd.io.base import ReadAt
from obd.registry.cache import Audit, CachedBlob, Fetch, FileCache


@dataclass
class DownloadProgress:
    """One background download (§8.5)."""

    digest: str
    size: int
    done: int = 0
    state: str = "waiting"  # waiting, running, done, failed
    attempts: int = 0


@dataclass
class RegistryStats:
    """What the server's registry side did, for the metrics exporter (§8.7)."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    fetched: int = 0  # bytes read from the registry (or the P2P proxy)
    requests: int = 0  # ranged requests made
    errors: int = 0  # requests that failed (after the client's retries)
    max_latency_us: float = 0.0
    downloads: dict[str, DownloadProgress] = field(default_factory=dict)
    caches: list[FileCache] = field(default_factory=list)
    on_fetch: Callable[[int, int], None] | None = None  # (bytes, latency ns)

    def fetch_done(self, nbytes: int, latency_ns: int) -> None:
        with self.lock:
            self.fetched += nbytes
            self.requests += 1
            self.max_latency_us = max(self.max_latency_us, latency_ns / 1000)
        if self.on_fetch is not None:
            self.on_fetch(nbytes, latency_ns)

    def fetch_failed(self) -> None:
        with self.lock:
            self.errors += 1


class RemoteBlob:
    """The bytes of one registry blob (``size`` bytes) as a :class:`ReadAt`.

    ``fetch`` raises an :class:`ObdError` (a :class:`RemoteError` for registry faults);
    a failed read caches nothing and raises it. ``name`` (the blob URL) names the blob in
    errors and audit lines. ``close()`` releases the cache handle and the local file.
    """

    def __init__(
        self,
        fetch: Fetch,
        size: int,
        *,
        name: str,
        cache: FileCache | None = None,
        key: str = "",
        pool: Executor | None = None,
        stats: RegistryStats | None = None,
        audit: Audit | None = None,
    ) -> None:
        self._raw_fetch = fetch
        self._size = size
        self.path = name
        self.key = key
        self.pool = pool
        self.stats = stats
        self.audit = audit
        self._cached: CachedBlob | None = cache.open(key, size) if cache is not None else None
        self._local: ReadAt | None = None
        self._closed = False

    # -- ReadAt ---------------------------------------------------------------------------
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        local = self._local
        if local is not None:
            return local.pread(offset, length)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        cached = self._cached
        if cached is not None:
            return cached.read(offset, end - offset, self.fetch, self.pool)
        return self.fetch(offset, end - offset)

    def fetch(self, offset: int, length: int) -> bytes:
        """One ranged read from the source, counted and audited (``download``)."""
        t0 = time.monotonic_ns()
        try:
            data = self._raw_fetch(offset, length)
        except ObdError:
            if self.stats is not None:
                self.stats.fetch_failed()
            raise
        except OSError as e:
            if self.stats is not None:
                self.stats.fetch_failed()
            raise RemoteError(
                f"read of {length} bytes at {offset} failed: {e}", path=self.path
            ) from None
        dt = time.monotonic_ns() - t0
        if len(data) != length:
            if self.stats is not None:
                self.stats.fetch_failed()
            raise RemoteError(
                f"asked for {length} bytes at {offset}, got {len(data)}", path=self.path
            )
        if self.stats is not None:
            self.stats.fetch_done(length, dt)
        if self.audit is not None:
            self.audit(
                "download", pathname=self.path, offset=offset, size=length, latency=dt // 1000
            )
        return data

    @property
    def raw_fetch(self) -> Fetch:
        """The source itself: no cache, no counting (the background download reads it)."""
        return self._raw_fetch

    def evict(self, offset: int, length: int) -> None:
        """Forget the cached copy of a range (it failed a check); the next read fetches it."""
        cached = self._cached
        if cached is not None and self._local is None:
            cached.evict(offset, length)

    def cached(self, offset: int, length: int) -> bool:
        c = self._cached
        return self._local is not None or (c is not None and c.cached(offset, length))

    # -- background download --------------------------------------------------------------
    @property
    def local(self) -> ReadAt | None:
        return self._local

    def switch_to(self, local: ReadAt) -> None:
        """Serve every later read from ``local`` (the verified downloaded blob)."""
        if self._closed:
            local.close()
            raise RemoteError("the layer was closed before its download finished", path=self.path)
        if local.size() != self._size:
            raise RemoteError(
                f"local copy has {local.size()} bytes, expected {self._size}", path=self.path
            )
        # the cache handle stays open until close(): reads in flight may still use it
        self._local = local

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cached, self._cached = self._cached, None
        if cached is not None:
            cached.close()
        local, self._local = self._local, None
        if local is not None:
            local.close()

    def __repr__(self) -> str:
        return f"RemoteBlob({self.path!r}, {self._size})"


__all__ = ["DownloadProgress", "RegistryStats", "RemoteBlob"]
