"""The Prometheus exporter (docs/formats.md §8.7), served with prometheus_client.

Upstream's metric families, all gauges: ``OverlayBD_Alive`` (1, label ``node`` = host
name), and per source tag (``pread``: reads served to clients; ``download``: fetches
from a registry, none here) ``OverlayBD_Read_Throughtput`` (sic, bytes/s),
``OverlayBD_QPS``, ``OverlayBD_MaxLatency`` (µs) and ``OverlayBD_Count`` (cumulative
bytes), with upstream's label placement: the tag sits in ``node``, ``type`` and ``mode``
are empty. Rates and the maximum latency cover the time since the previous scrape.

With registry layers, obd adds its own families (not upstream's) from the registry
side's :class:`~obd.registry.blob.RegistryStats`: ``obd_registry_fetched_bytes``,
``obd_registry_requests``, ``obd_registry_errors``, ``obd_registry_cache_hit_bytes``,
``obd_registry_cache_miss_bytes``, ``obd_registry_cache_usage_bytes``,
``obd_registry_cache_capacity_bytes``, ``obd_registry_cache_evictions``,
``obd_registry_cache_evicted_bytes``, and per background download (label ``digest``)
``obd_registry_download_done_bytes``, ``obd_registry_download_size_bytes`` and
``obd_registry_download_state`` (0 waiting, 1 running, 2 done, 3 failed); the ``download``
tag of the upstream families counts the registry fetches.

The HTTP server answers ``uriPrefix`` only (404 elsewhere) on ``exporterConfig.port``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from obd.errors import FileAccessError

TAGS = ("pread", "download")


class _Source:
    __slots__ = ("count", "lock", "max_latency_us", "ops", "window_bytes", "window_start")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.window_bytes = 0
        self.ops = 0
        self.max_latency_us = 0.0
        self.window_start = time.monotonic()


class Metrics:
    """Counters fed by the server (``record``) and read by the collector."""

    def __init__(self) -> None:
        self.sources = {tag: _Source() for tag in TAGS}
        self.hostname = socket.gethostname()
        self.registry: Any = None  # obd.registry.blob.RegistryStats, when images are remote

    def record(self, tag: str, nbytes: int, latency_ns: int) -> None:
        s = self.sources[tag]
        us = latency_ns / 1000.0
        with s.lock:
            s.count += nbytes
            s.window_bytes += nbytes
            s.ops += 1
            if us > s.max_latency_us:
                s.max_latency_us = us

    def read_hook(self, export: str, offset: int, length: int, latency_ns: int) -> None:
        """An :data:`obd.serve.nbd.ReadHook` counting every read as ``pread``."""
        self.record("pread", length, latency_ns)

    def snapshot(self) -> dict[str, tuple[float, float, float, float]]:
        """``tag -> (bytes/s, ops/s, max latency µs, cumulative bytes)``; starts a new window."""
        now = time.monotonic()
        out = {}
        for tag, s in self.sources.items():
            with s.lock:
                dt = max(now - s.window_start, 1e-9)
                out[tag] = (s.window_bytes / dt, s.ops / dt, s.max_latency_us, float(s.count))
                s.window_bytes = 0
                s.ops = 0
                s.max_latency_us = 0.0
                s.window_start = now
        return out


class OverlayBDCollector:
    """A prometheus_client collector rendering upstream's families and labels."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        alive = GaugeMetricFamily("OverlayBD_Alive", "", labels=["node"])
        alive.add_metric([self.metrics.hostname], 1.0)
        yield alive
        families = [
            GaugeMetricFamily("OverlayBD_Read_Throughtput", "Bytes / sec", labels=["node", "type", "mode"]),
            GaugeMetricFamily("OverlayBD_QPS", "", labels=["node", "type", "mode"]),
            GaugeMetricFamily("OverlayBD_MaxLatency", "us", labels=["node", "type", "mode"]),
            GaugeMetricFamily("OverlayBD_Count", "Bytes", labels=["node", "type"]),
        ]  # fmt: skip
        for tag, (bps, qps, maxlat, count) in self.metrics.snapshot().items():
            families[0].add_metric([tag, "", ""], bps)
            families[1].add_metric([tag, "", ""], qps)
            families[2].add_metric([tag, "", ""], maxlat)
            families[3].add_metric([tag, ""], count)
        yield from families
        if self.metrics.registry is not None:
            yield from _registry_families(self.metrics.registry)


_DOWNLOAD_STATES = {"waiting": 0, "running": 1, "done": 2, "failed": 3}


def _registry_families(r: Any) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    caches = list(r.caches)

    def total(attr: str) -> float:
        return float(sum(getattr(c.stats, attr) for c in caches))

    plain = [
        ("obd_registry_fetched_bytes", "Bytes read from registries", float(r.fetched)),
        ("obd_registry_requests", "Ranged requests to registries", float(r.requests)),
        ("obd_registry_errors", "Registry reads that failed", float(r.errors)),
        ("obd_registry_cache_hit_bytes", "Bytes read from the cache", total("hits")),
        ("obd_registry_cache_miss_bytes", "Bytes fetched for reads", total("misses")),
        ("obd_registry_cache_usage_bytes", "Cache usage", float(sum(c.usage for c in caches))),
        ("obd_registry_cache_capacity_bytes", "Cache capacity", float(sum(c.capacity for c in caches))),
        ("obd_registry_cache_evictions", "Eviction passes", total("evictions")),
        ("obd_registry_cache_evicted_bytes", "Bytes evicted", total("evicted")),
    ]  # fmt: skip
    for name, doc, value in plain:
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], value)
        yield g
    with r.lock:
        downloads = list(r.downloads.values())
    fams = [
        GaugeMetricFamily("obd_registry_download_done_bytes", "Bytes downloaded", labels=["digest"]),
        GaugeMetricFamily("obd_registry_download_size_bytes", "Blob size", labels=["digest"]),
        GaugeMetricFamily("obd_registry_download_state", "0 waiting 1 running 2 done 3 failed", labels=["digest"]),
    ]  # fmt: skip
    for d in downloads:
        fams[0].add_metric([d.digest], float(d.done))
        fams[1].add_metric([d.digest], float(d.size))
        fams[2].add_metric([d.digest], float(_DOWNLOAD_STATES.get(d.state, 0)))
    yield from fams


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
        t.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class Exporter:
    """The HTTP endpoint: ``http://host:port<uri_prefix>``."""

    def __init__(self, metrics: Metrics, *, port: int, uri_prefix: str = "/metrics",
                 host: str = "127.0.0.1") -> None:  # fmt: skip
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.metrics = metrics
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(OverlayBDCollector(metrics))
        inner = make_wsgi_app(self.registry)
        prefix = uri_prefix.rstrip("/") or "/"

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "") or "/"
            if path.rstrip("/") != prefix.rstrip("/") and path != prefix:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"Not Found\n"]
            environ = dict(environ, QUERY_STRING="")
            return inner(environ, start_response)

        try:
            self.httpd = make_server(
                host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler
            )
        except OSError as e:
            raise FileAccessError(
                f"cannot listen for metrics on {host}:{port}: {e.strerror or e}"
            ) from None
        self.port = self.httpd.server_address[1]
        self.host = host
        self.uri_prefix = prefix
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.uri_prefix}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
