"""Block-device servers: NBD (see :mod:`obd.serve.nbd`).

:class:`NbdService` is what ``obd serve --nbd`` runs: it opens one export per image
config (a failing image fails only its export, with a resultFile reason), sets up the
logs, the audit log and the Prometheus exporter of the global config, and serves until
:meth:`NbdService.stop`, which answers every request already received, flushes every
writable image and closes everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from obd.errors import ObdError, UsageError
from obd.io.base import BlockDevice
from obd.serve.audit import Logs, setup_logs
from obd.serve.config import GlobalConfig
from obd.serve.nbd import Export, NbdServer, ReadHook, flush_all
from obd.serve.result import (
    REASON_CREATE,
    config_failure_reason,
    failure_reason,
    reason_duplicated,
    report,
)

if TYPE_CHECKING:
    from obd.image.config import ImageConfig
    from obd.registry.remote import RemoteContext

log = logging.getLogger("obd.serve")

REMOTE_WORKERS = 8
"""Worker threads per connection by default when an image reads from a registry."""

Opener = Callable[[str], BlockDevice]
"""Opens the image an image config path names (default: :func:`obd.image.open_image`)."""
RemoteFactory = Callable[[Callable[..., None] | None], "RemoteContext"]
"""Builds the registry side (client, cache) given the audit writer; called on first need."""
Resolver = Callable[[str, "RemoteContext"], "ImageConfig"]
"""Turns an image reference into the image config that serves it."""


@dataclass(frozen=True)
class ImageSpec:
    """An image to serve: its config path and its export name."""

    config_path: str
    name: str
    reference: bool = False  # config_path is an image reference (host/repo:tag)

    @classmethod
    def parse(cls, arg: str) -> ImageSpec:
        """``CONFIG`` (name = the file's stem) or ``CONFIG=NAME``."""
        if "=" in arg and not os.path.exists(arg):
            path, name = arg.rsplit("=", 1)
            if not path or not name:
                raise UsageError(f"{arg!r}: expected IMAGE_CONFIG or IMAGE_CONFIG=NAME")
        else:
            path = arg
            name = os.path.splitext(os.path.basename(arg))[0]
        return cls(path, name)


@dataclass
class ExportStatus:
    """How opening one image went."""

    name: str
    config_path: str
    ok: bool
    reason: str = ""
    error: BaseException | None = None
    readonly: bool = False
    size: int = 0
    result_file: str = ""


class NbdService:
    """One ``obd serve --nbd`` run. ``start()`` then ``stop()`` (or use as a context)."""

    def __init__(
        self,
        images: Sequence[ImageSpec],
        *,
        global_config: GlobalConfig | None = None,
        use_log_files: bool = True,
        tcp: tuple[str, int] | None = None,
        unix: str | None = None,
        workers: int | None = None,
        metrics_host: str = "127.0.0.1",
        opener: Opener | None = None,
        remote: RemoteFactory | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        if not images:
            raise UsageError("no image config to serve")
        if tcp is None and unix is None:
            tcp = ("127.0.0.1", 10809)
        self.images = list(images)
        self.config = global_config or GlobalConfig()
        self.use_log_files = use_log_files
        self.tcp = tcp
        self.unix = unix
        self.workers = workers
        self.metrics_host = metrics_host
        self.opener = opener
        self.remote_factory = remote
        self.resolve = resolve
        self.remote: RemoteContext | None = None
        self.statuses: list[ExportStatus] = []
        self.exports: list[Export] = []
        self.server: NbdServer | None = None
        self.logs: Logs | None = None
        self.exporter: object | None = None
        self.addresses: list[str] = []

    # -- start --------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Open the images and start serving; returns the listen addresses (nbd URIs).

        Raises the first image's error when no image could be opened, and
        FileAccessError / UsageError when the server cannot listen.
        """
        self.logs = setup_logs(self.config, use_files=self.use_log_files)
        try:
            self._open_images()
            good = [s for s in self.statuses if s.ok]
            if not good:
                first = self.statuses[0].error
                if isinstance(first, ObdError):
                    raise first
                raise ObdError(f"no image could be opened: {self.statuses[0].reason}")
            hook = self._read_hook()
            failed = {s.name: s.reason for s in self.statuses if not s.ok}
            workers = self.workers
            if workers is None:  # requests of a registry image wait on the network: overlap
                workers = REMOTE_WORKERS if self.remote is not None else 0
            self.server = NbdServer(self.exports, failed=failed, workers=workers, read_hook=hook)
            if self.tcp is not None:
                self.server.listen_tcp(*self.tcp)
            if self.unix is not None:
                self.server.listen_unix(self.unix)
            self.server.start()
            self.addresses = list(self.server.addresses)
            for addr in self.addresses:
                log.info("listening on %s", addr)
            return self.addresses
        except BaseException:
            self.stop()
            raise

    def _remote(self) -> RemoteContext:
        """The registry side, built on first need (a local-only run never creates the
        cache folder)."""
        if self.remote is None:
            if self.remote_factory is None:
                from obd.registry.remote import RemoteContext

                audit = self.logs.audit if self.logs is not None else None
                self.remote = RemoteContext.from_config(
                    self.config, audit=audit.event if audit is not None else None
                )
            else:
                self.remote = self.remote_factory(
                    self.logs.audit.event if self.logs and self.logs.audit else None
                )
        return self.remote

    def _open(self, spec: ImageSpec, cfg: ImageConfig) -> BlockDevice:
        if self.opener is not None:
            return self.opener(spec.config_path)
        from obd.image.layers import local_layer_path
        from obd.image.open import open_config

        remote = None
        if cfg.repoBlobUrl and any(
            local_layer_path(lc) is None and lc.digest for lc in cfg.stacked_lowers
        ):
            remote = self._remote()
        return open_config(cfg, remote=remote)

    def _open_images(self) -> None:
        from obd.image.config import load_image_config

        names: set[str] = set()
        for spec in self.images:
            st = ExportStatus(spec.name, spec.config_path, ok=False)
            self.statuses.append(st)
            try:
                if spec.reference:
                    if self.resolve is None:
                        raise UsageError(f"{spec.config_path}: image references need a resolver")
                    cfg = self.resolve(spec.config_path, self._remote())
                else:
                    cfg = load_image_config(spec.config_path)
                st.result_file = cfg.resultFile
            except ObdError as e:
                st.error = e
                st.reason = failure_reason(e) if spec.reference else REASON_CREATE
                log.error("export %r: %s", spec.name, e)
                continue
            if spec.name in names:
                st.reason = reason_duplicated(spec.name)
                st.error = UsageError(f"two images are served as {spec.name!r}")
                self._result(st)
                log.error("export %r (%s): %s", spec.name, spec.config_path, st.reason)
                continue
            names.add(spec.name)
            t0 = time.monotonic()
            try:
                device = self._open(spec, cfg)
            except (ObdError, OSError) as e:
                st.error = e
                st.reason = config_failure_reason(e, cfg)
                self._result(st)
                log.error("export %r: %s (%s)", spec.name, st.reason, e)
                continue
            try:
                export = Export(spec.name, device, description=spec.config_path)
            except Exception as e:
                with contextlib.suppress(Exception):
                    device.close()
                st.error = e
                st.reason = REASON_CREATE
                log.error("export %r: %s", spec.name, e)
                self._result(st)
                continue
            self.exports.append(export)
            st.ok = True
            st.readonly = export.readonly
            st.size = export.size
            self._result(st)
            log.info(
                "export %r: %s, %d bytes, %s, opened in %.3f s",
                spec.name, spec.config_path, export.size,
                "read-only" if export.readonly else "writable", time.monotonic() - t0,
            )  # fmt: skip

    def _result(self, st: ExportStatus) -> None:
        report(st.result_file, st.ok, st.reason, log, f"export {st.name!r}: ")

    def _read_hook(self) -> ReadHook | None:
        hooks: list[ReadHook] = []
        ec = self.config.exporterConfig
        if ec.enable:
            from obd.serve.metrics import Exporter, Metrics

            metrics = Metrics()
            if self.remote is not None:
                metrics.registry = self.remote.stats
                self.remote.stats.on_fetch = lambda n, ns: metrics.record("download", n, ns)
            self.exporter = Exporter(
                metrics, port=ec.port, uri_prefix=ec.uriPrefix, host=self.metrics_host
            )
            log.info("metrics on %s", self.exporter.url)
            hooks.append(metrics.read_hook)
        audit = self.logs.audit if self.logs is not None else None
        if audit is not None:
            paths = {s.name: s.config_path for s in self.statuses}

            def audit_hook(export: str, offset: int, length: int, latency_ns: int) -> None:
                audit.pread(paths.get(export, export), offset, length, latency_ns // 1000)

            hooks.append(audit_hook)
        if not hooks:
            return None
        if len(hooks) == 1:
            return hooks[0]

        def both(export: str, offset: int, length: int, latency_ns: int) -> None:
            for h in hooks:
                h(export, offset, length, latency_ns)

        return both

    # -- run ------------------------------------------------------------------------------
    def reopen_logs(self) -> None:
        if self.logs is not None:
            self.logs.reopen()
            log.info("logs reopened")

    def stop(self, timeout: float = 30.0) -> list[tuple[str, BaseException]]:
        """Drain, flush every writable export, close everything.

        Connections still open after ``timeout`` seconds are cut. A device with a call
        still running in it (a stuck disk) is flushed but not closed: closing its files
        under that call could hand it another file's bytes through a reused descriptor;
        the process exit closes it.

        Returns ``(export, error)`` for each export whose flush or close failed.
        """
        failures: list[tuple[str, BaseException]] = []
        busy: dict[str, int] = {}
        if self.server is not None:
            self.server.shutdown(timeout)
            busy = self.server.busy()
            self.server = None
        failures += flush_all(self.exports)
        for e in self.exports:
            if e.name in busy:
                log.warning(
                    "export %r: %d requests still running; its files stay open until exit",
                    e.name, busy[e.name],
                )  # fmt: skip
                continue
            try:
                e.device.close()
            except Exception as exc:
                failures.append((e.name, exc))
        self.exports = []
        if self.remote is not None:
            try:
                self.remote.close()
            except Exception as exc:
                log.error("registry: close failed: %s", exc)
            self.remote = None
        for name, err in failures:
            log.error("export %r: flush/close failed: %s", name, err)
        if self.exporter is not None:
            self.exporter.close()  # type: ignore[attr-defined]
            self.exporter = None
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        return failures

    def __enter__(self) -> NbdService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ExportStatus", "ImageSpec", "NbdService", "Opener"]
