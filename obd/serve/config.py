"""The global config: ``/etc/overlaybd/overlaybd.json`` (docs/formats.md §6.2).

Every key upstream reads, with upstream's default. Missing keys and missing nested
objects take the defaults; a present key of the wrong type, bad JSON, an unknown cache
type or an out-of-range value is a :class:`~obd.errors.ConfigError` naming the file and
the key; unknown keys are logged as warnings and ignored.

Upstream key names are kept (``logConfig.logSizeMB``, ``exporterConfig.uriPrefix``...)
so a config can be compared field by field. This is the server's configuration (logs,
audit, exporter, and the cache and credential keys the registry will read); it lives
beside the servers. ``download`` has the image config's shape
(:class:`obd.image.config.DownloadConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from obd.errors import ConfigError
from obd.image.config import DownloadConfig
from obd.image.jsonconfig import load_json, parse, u32, u64

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/overlaybd/overlaybd.json"
CACHE_TYPES = ("file", "ocf", "download")
CREDENTIAL_MODES = ("", "file", "http", "https", "uds")


@dataclass(frozen=True)
class CredentialConfig:
    mode: str = ""
    path: str = ""
    timeout: int = 1
    client_cert_path: str = ""
    client_key_path: str = ""
    server_ca_path: str = ""


@dataclass(frozen=True)
class LogConfig:
    logLevel: int = u32(1)
    logPath: str = ""
    logSizeMB: int = u32(10)
    logRotateNum: int = 3


@dataclass(frozen=True)
class P2PConfig:
    enable: bool = False
    address: str = "http://localhost:9731/accelerator"


@dataclass(frozen=True)
class ExporterConfig:
    enable: bool = False
    uriPrefix: str = "/metrics"
    port: int = 9863
    updateInterval: int = u64(60000000)  # µs; parsed, unused (as upstream)


@dataclass(frozen=True)
class CacheConfig:
    cacheType: str = ""
    cacheDir: str = "/opt/overlaybd/registry_cache"
    cacheSizeGB: int = u32(4)
    refillSize: int = u32(262144)
    blockSize: int = u32(65536)


@dataclass(frozen=True)
class GzipCacheConfig:
    enable: bool = False
    cacheDir: str = "/opt/overlaybd/gzip_cache"
    cacheSizeGB: int = u32(4)
    refillSize: int = u32(1048576)


@dataclass(frozen=True)
class PrefetchConfig:
    concurrency: int = 16


@dataclass(frozen=True)
class CertConfig:
    certFile: str = ""
    keyFile: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    enable: bool = False
    address: str = "http://127.0.0.1:9862"


@dataclass(frozen=True)
class GlobalConfig:
    """The parsed global config. ``path`` is the file it came from ("" for defaults)."""

    registryCacheDir: str = "/opt/overlaybd/registry_cache"
    registryCacheSizeGB: int = u32(4)
    cacheType: str = "file"
    credentialFilePath: str = "/opt/overlaybd/cred.json"
    credentialConfig: CredentialConfig = field(default_factory=CredentialConfig)
    ioEngine: int = u32(0)
    logLevel: int = u32(1)
    logPath: str = "/var/log/overlaybd.log"
    logConfig: LogConfig = field(default_factory=LogConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    enableAudit: bool = True
    auditPath: str = "/var/log/overlaybd-audit.log"
    enableThread: bool = False
    p2pConfig: P2PConfig = field(default_factory=P2PConfig)
    exporterConfig: ExporterConfig = field(default_factory=ExporterConfig)
    registryFsVersion: str = "v2"
    cacheConfig: CacheConfig = field(default_factory=CacheConfig)
    gzipCacheConfig: GzipCacheConfig = field(default_factory=GzipCacheConfig)
    prefetchConfig: PrefetchConfig = field(default_factory=PrefetchConfig)
    certConfig: CertConfig = field(default_factory=CertConfig)
    userAgent: str = "overlaybd/0.0.0-undefined"
    serviceConfig: ServiceConfig = field(default_factory=ServiceConfig)
    path: str = field(default="", metadata={"internal": True})

    # -- what the rest of obd asks ----------------------------------------------------
    @property
    def effective_cache_type(self) -> str:
        """``cacheConfig.cacheType``, or the legacy ``cacheType`` when that is empty."""
        return self.cacheConfig.cacheType or self.cacheType

    @property
    def effective_cache_dir(self) -> str:
        return self.cacheConfig.cacheDir if self.cacheConfig.cacheType else self.registryCacheDir

    @property
    def effective_cache_size_gb(self) -> int:
        if self.cacheConfig.cacheType:
            return self.cacheConfig.cacheSizeGB
        return self.registryCacheSizeGB

    @property
    def effective_log(self) -> LogConfig:
        """``logConfig`` when its ``logPath`` is set, else the legacy keys (10 MiB x 3)."""
        if self.logConfig.logPath:
            return self.logConfig
        return LogConfig(logLevel=self.logLevel, logPath=self.logPath, logSizeMB=10, logRotateNum=3)


def _validate(cfg: GlobalConfig, path: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"key {key} {msg}", path=path)

    if cfg.cacheConfig.cacheType and cfg.cacheConfig.cacheType not in CACHE_TYPES:
        raise bad(
            "cacheConfig.cacheType",
            f"is {cfg.cacheConfig.cacheType!r}; expected one of {', '.join(CACHE_TYPES)} or empty",
        )
    if not cfg.cacheConfig.cacheType and cfg.cacheType not in CACHE_TYPES:
        raise bad("cacheType", f"is {cfg.cacheType!r}; expected one of {', '.join(CACHE_TYPES)}")
    if cfg.ioEngine > 2:
        raise bad("ioEngine", f"is {cfg.ioEngine}; expected 0 (psync), 1 (libaio) or 2 (posix aio)")
    if cfg.credentialConfig.mode not in CREDENTIAL_MODES:
        raise bad(
            "credentialConfig.mode",
            f"is {cfg.credentialConfig.mode!r}; expected file, http, https, uds or empty",
        )
    if cfg.effective_cache_type == "file":
        r = cfg.cacheConfig.refillSize
        if r == 0 or r & (r - 1) or r % 4096:
            raise bad(
                "cacheConfig.refillSize", f"is {r}; must be a power of 2 and a multiple of 4096"
            )
        if cfg.enableThread:
            raise bad("enableThread", "cannot be true with the file cache type")
    if not 0 <= cfg.exporterConfig.port <= 65535:
        raise bad("exporterConfig.port", f"is {cfg.exporterConfig.port}; not a TCP port")
    if cfg.exporterConfig.enable and not cfg.exporterConfig.uriPrefix.startswith("/"):
        raise bad("exporterConfig.uriPrefix", "must start with /")
    if cfg.logConfig.logRotateNum < 0:
        raise bad("logConfig.logRotateNum", "must not be negative")


def parse_global_config(doc: Any, path: str = "") -> GlobalConfig:
    """Build a :class:`GlobalConfig` from a decoded JSON document."""
    cfg = parse(GlobalConfig, doc, path or "(global config)")
    cfg = dataclasses.replace(cfg, path=path)
    _validate(cfg, path or "(global config)")
    return cfg


def load_global_config(path: str | os.PathLike[str] | None = None) -> GlobalConfig:
    """Read the global config at ``path``.

    With ``path`` None, :data:`DEFAULT_PATH` is read when it exists and the defaults are
    used when it does not; a ``path`` given explicitly must exist.
    """
    explicit = path is not None
    p = os.fspath(path) if path is not None else DEFAULT_PATH
    if not explicit and not os.path.exists(p):
        return GlobalConfig()
    doc = load_json(p, "global config")
    return parse_global_config(doc, p)


__all__ = [
    "DEFAULT_PATH",
    "CacheConfig",
    "CertConfig",
    "CredentialConfig",
    "DownloadConfig",
    "ExporterConfig",
    "GlobalConfig",
    "GzipCacheConfig",
    "LogConfig",
    "P2PConfig",
    "PrefetchConfig",
    "ServiceConfig",
    "load_global_config",
    "parse_global_config",
]
