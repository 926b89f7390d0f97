"""The registry side of a server run: one client, one cache, one fetch pool, the stats.

:class:`RemoteContext` is what ``obd serve`` hands down to :mod:`obd.image` to open
layers that live only in a registry: :meth:`RemoteContext.open_blob` turns
``repoBlobUrl`` + digest (§8.1) into a :class:`~obd.registry.blob.RemoteBlob`, checking the
blob's size with the registry first (§8.2 step 5: opening a blob requires it). With a
P2P proxy that answers (§8.3, the client's ``p2p_active()`` at open) the local cache is
bypassed for that blob: the proxy is the cache. Background downloads (§8.5) are queued
on a :class:`BackgroundDownloader` per image (:meth:`RemoteContext.downloader`).

It is built from plain values (the caller converts the global config), so this package
never imports the server's config.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from obd.registry.blob import RegistryStats, RemoteBlob
from obd.registry.cache import Audit, FileCache
from obd.registry.download import BackgroundDownloader, DownloadSettings

log = logging.getLogger("obd.registry")


class BlobClient(Protocol):
    """What a registry client offers the blob reader (:class:`obd.registry.client.RegistryClient`)."""

    def blob_size(self, loc: Any) -> int: ...

    def read_range(self, loc: Any, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class CacheSettings:
    """``cacheConfig`` as plain values; ``capacity`` in bytes (``cacheSizeGB`` GiB)."""

    cache_type: str = "file"
    cache_dir: str = "/opt/overlaybd/registry_cache"
    capacity: int = 4 << 30
    refill_size: int = 262144


@dataclass
class RemoteContext:
    """Opens registry blobs for one server run; :meth:`close` ends it."""

    client: BlobClient
    locate: Callable[[str, str], Any]  # (repoBlobUrl, digest) -> the client's location
    cache: FileCache | None = None
    threads: int = 8
    audit: Audit | None = None
    stats: RegistryStats = field(default_factory=RegistryStats)
    default_download: DownloadSettings = field(default_factory=DownloadSettings)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="fetch")
        self.downloaders: list[BackgroundDownloader] = []
        self._lock = threading.Lock()
        if self.cache is not None:
            self.stats.caches.append(self.cache)

    @classmethod
    def build(
        cls,
        client: BlobClient,
        locate: Callable[[str, str], Any],
        *,
        cache: CacheSettings | None,
        audit: Audit | None = None,
        download: DownloadSettings | None = None,
        threads: int = 8,
    ) -> RemoteContext:
        """A context with a ``file`` cache under ``cache.cache_dir`` (none for other types:
        ``ocf`` is not implemented; ``download`` caches nothing but the layer's own file)."""
        fc = None
        if cache is not None and cache.cache_type in ("file", ""):
            fc = FileCache(
                cache.cache_dir,
                capacity=cache.capacity,
                refill_size=cache.refill_size,
                audit=audit,
            )
        elif cache is not None:
            log.warning(
                "cacheType %r is not supported: registry reads are not cached", cache.cache_type
            )
        return cls(
            client,
            locate,
            fc,
            threads,
            audit,
            default_download=download or DownloadSettings(),
        )

    @classmethod
    def from_config(
        cls, cfg: Any, *, audit: Audit | None = None, plain_http: bool | None = None
    ) -> RemoteContext:
        """From the global config (any object with :class:`obd.serve.config.GlobalConfig`'s
        attributes): credentialConfig (or the legacy credentialFilePath), certConfig,
        p2pConfig, userAgent, the effective cache keys and ``download``."""
        from obd.registry.auth import CredentialSource
        from obd.registry.client import BlobLocation, RegistryClient

        creds = CredentialSource.from_config(cfg.credentialConfig, cfg.credentialFilePath)
        cert = (
            (cfg.certConfig.certFile, cfg.certConfig.keyFile) if cfg.certConfig.certFile else None
        )
        client = RegistryClient(
            credentials=creds,
            plain_http=plain_http,
            cert=cert,
            p2p=cfg.p2pConfig.address if cfg.p2pConfig.enable else None,
            user_agent=cfg.userAgent,
        )
        try:
            dl = cfg.download
            return cls.build(
                client,
                BlobLocation.from_url,
                cache=CacheSettings(
                    cfg.effective_cache_type,
                    cfg.effective_cache_dir,
                    cfg.effective_cache_size_gb << 30,
                    cfg.cacheConfig.refillSize,
                ),
                audit=audit,
                download=DownloadSettings(
                    dl.enable, dl.delay, dl.delayExtra, dl.maxMBps, dl.tryCnt, dl.blockSize
                ),
            )
        except BaseException:
            client.close()
            raise

    def open_blob(self, repo_blob_url: str, digest: str, size: int = 0) -> RemoteBlob:
        """The blob ``digest`` of ``repoBlobUrl`` as a ReadAt (its size checked first)."""
        from obd.registry.url import blob_url

        loc = self.locate(repo_blob_url, digest)
        real = self.client.blob_size(loc)
        url = blob_url(repo_blob_url, digest)
        if size and size != real:
            log.warning("layer %s: config says %d bytes, the registry %d", url, size, real)
        use_cache = self.cache
        p2p_active = getattr(self.client, "p2p_active", None)
        if p2p_active is not None and p2p_active():
            use_cache = None  # §8.3: the proxy is the cache

        def fetch(offset: int, length: int) -> bytes:
            return self.client.read_range(loc, offset, length)

        return RemoteBlob(
            fetch,
            real,
            name=url,
            cache=use_cache,
            key=digest,
            pool=self.pool,
            stats=self.stats,
            audit=self.audit,
        )

    def downloader(self, settings: DownloadSettings | None = None) -> BackgroundDownloader:
        """A background downloader for one image (started by the caller once it opened)."""
        d = BackgroundDownloader(
            settings or self.default_download, stats=self.stats, audit=self.audit
        )
        with self._lock:
            self.downloaders.append(d)
        return d

    def close(self) -> None:
        with self._lock:
            downloaders, self.downloaders = self.downloaders, []
        for d in downloaders:
            d.stop()
        if self.cache is not None:
            self.cache.stopping()  # queued readahead gives its units back at once
        self.pool.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


__all__ = ["BlobClient", "CacheSettings", "RemoteContext"]
