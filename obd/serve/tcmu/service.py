"""``TcmuService``: what ``obd serve --tcmu`` runs (docs/tcmu.md "Service").

It handles the TCMU devices of subtype ``overlaybd``: those already there when it starts
(found under /sys/class/uio) and those the kernel announces over netlink afterwards
(ADDED_DEVICE: open the image, answer 0 or -EPERM; REMOVED_DEVICE: flush, close, answer;
RECONFIG_DEVICE: answer whether the change is possible). Events are handled on a small
pool, so 64 devices attached at once open in parallel; one device failing (its image, its
ring) never takes the others down. Devices of other subtypes belong to another handler
(tcmu-runner): obd leaves them and their events alone.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from obd.io.base import BlockDevice
from obd.serve.audit import Logs, setup_logs
from obd.serve.config import GlobalConfig
from obd.serve.result import reason_duplicated, report
from obd.serve.tcmu import uapi, uio
from obd.serve.tcmu.configfs import SUBTYPE, require_tcmu
from obd.serve.tcmu.device import (
    HandlerFactory,
    Opener,
    TcmuDevice,
    _default_opener,
    scsi_disk,
)
from obd.serve.tcmu.netlink import DeviceEvent, NetlinkError, TcmuNetlink

log = logging.getLogger("obd.serve.tcmu")


class TcmuService:
    """Serve TCMU devices until :meth:`stop`."""

    def __init__(
        self,
        *,
        global_config: GlobalConfig | None = None,
        use_log_files: bool = True,
        workers: int = 0,
        opener: Opener | None = None,
        handler_factory: HandlerFactory | None = None,
        cmd_reply: bool = True,
    ) -> None:
        self.config = global_config or GlobalConfig()
        self.use_log_files = use_log_files
        self.workers = workers or min(32, 4 * (os.cpu_count() or 1))
        self.opener = opener or _default_opener
        self.handler_factory: HandlerFactory = handler_factory or scsi_disk
        self.cmd_reply = cmd_reply
        self.devices: dict[int, TcmuDevice] = {}  # by uio minor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._nl: TcmuNetlink | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._events: ThreadPoolExecutor | None = None
        self.logs: Logs | None = None

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Check the kernel, listen to netlink, pick up the devices already there.

        Raises TcmuUnavailableError (no target_core_user) or NetlinkError.
        """
        require_tcmu()
        self.logs = setup_logs(self.config, use_files=self.use_log_files)
        try:
            self._nl = TcmuNetlink()
            if self.cmd_reply:
                self._nl.set_features(True)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tcmu-io")
            self._events = ThreadPoolExecutor(8, thread_name_prefix="tcmu-event")
            self._thread = threading.Thread(target=self._listen, name="tcmu-netlink", daemon=True)
            self._thread.start()
            self.rescan()
        except BaseException:
            self.stop()
            raise
        log.info("tcmu: serving handler %r (%d devices at start)", SUBTYPE, len(self.devices))

    def rescan(self) -> None:
        """Pick up every ``overlaybd`` device under /sys/class/uio not served yet."""
        for minor, name in uio.scan():
            parsed = uio.UioName.parse(name)
            if parsed is None or parsed.subtype != SUBTYPE:
                continue
            with self._lock:
                if minor in self.devices:
                    continue
            self._add(minor, parsed, event=False)

    # -- events ---------------------------------------------------------------------------
    def _listen(self) -> None:
        assert self._nl is not None and self._events is not None
        while not self._stop.is_set():
            try:
                events = self._nl.recv_events(0.5)
            except NetlinkError as e:
                if self._stop.is_set():
                    return
                log.warning("tcmu: %s; rescanning /sys/class/uio", e)
                self.rescan()
                if e.errno != errno.ENOBUFS:
                    self._stop.wait(0.5)
                continue
            for ev in events:
                parsed = uio.UioName.parse(ev.device)
                if parsed is None or parsed.subtype != SUBTYPE:
                    continue
                try:
                    self._events.submit(self._handle, ev, parsed)
                except RuntimeError:
                    return

    def _handle(self, ev: DeviceEvent, name: uio.UioName) -> None:
        status = 0
        try:
            if ev.cmd == uapi.TCMU_CMD_ADDED_DEVICE:
                status = self._add(ev.minor, name, event=True)
            elif ev.cmd == uapi.TCMU_CMD_REMOVED_DEVICE:
                self._remove(ev.minor)
            elif ev.cmd == uapi.TCMU_CMD_RECONFIG_DEVICE:
                status = self._reconfig(ev)
        except Exception:
            log.exception("tcmu: %s of %s failed", uapi.TCMU_CMD_NAMES.get(ev.cmd), ev.device)
            status = -errno.EIO
        if self.cmd_reply and self._nl is not None:
            try:
                self._nl.reply(ev, status)
            except NetlinkError as e:
                log.error("tcmu: %s", e)

    def _add(self, minor: int, name: uio.UioName, *, event: bool) -> int:
        """Open and serve a device; the status for the kernel (0 or -errno).

        A device the kernel announced (``event``) whose image fails is refused (the kernel
        fails its enable); one found already enabled is served with every command answered
        NOT READY, since nothing can refuse it any more."""
        assert self._pool is not None
        dev = TcmuDevice(minor, name, self._pool, self.handler_factory, self.opener)
        with self._lock:
            if minor in self.devices:
                return 0
            dup = dev.dev_id is not None and any(
                d.dev_id == dev.dev_id for d in self.devices.values()
            )
            self.devices[minor] = dev
        if dup:
            assert dev.dev_id is not None
            log.error("%s: duplicated dev id %s", dev.label, dev.dev_id)
            self._fail_result(dev, reason_duplicated(dev.dev_id))
            status = -errno.EPERM
        else:
            status = dev.open()
        if status and event and self.cmd_reply:
            # the kernel fails the enable: nothing to serve
            with self._lock:
                self.devices.pop(minor, None)
            dev.stop()
            return status
        try:
            dev.start()
        except Exception as e:
            log.error("%s: cannot serve: %s", dev.label, e)
            with self._lock:
                self.devices.pop(minor, None)
            dev.stop()
            return -errno.EIO
        return 0

    def _fail_result(self, dev: TcmuDevice, reason: str) -> None:
        from obd.image.config import load_image_config

        try:
            path = load_image_config(dev.config_path).resultFile
        except Exception as e:
            log.error("%s: cannot write its resultFile: %s", dev.label, e)
            return
        report(path, False, reason, log, f"{dev.label}: ")

    def _remove(self, minor: int) -> None:
        with self._lock:
            dev = self.devices.pop(minor, None)
        if dev is not None:
            err = dev.stop()
            log.info("%s: removed%s", dev.label, f" (flush failed: {err})" if err else "")

    def _reconfig(self, ev: DeviceEvent) -> int:
        with self._lock:
            dev = self.devices.get(ev.minor)
        if dev is None:
            return -errno.ENODEV
        if ev.dev_cfg is not None and ev.dev_cfg != f"{SUBTYPE}/{dev.name.cfgstring}":
            log.error("%s: a new dev_config (%s) is not supported", dev.label, ev.dev_cfg)
            return -errno.EINVAL
        image = dev.opened.image if dev.opened else None
        if ev.dev_size is not None and (image is None or ev.dev_size != image.size()):
            log.error("%s: dev_size %d is not the image's size", dev.label, ev.dev_size)
            return -errno.EINVAL
        return 0

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> list[tuple[str, BaseException]]:
        """Stop listening, stop every device (flushing writable images), close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._events is not None:
            self._events.shutdown(wait=True)
            self._events = None
        with self._lock:
            devices = list(self.devices.values())
            self.devices.clear()
        failures: list[tuple[str, BaseException]] = []
        for dev in devices:
            err = dev.stop()
            if err is not None:
                failures.append((dev.label, err))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._nl is not None:
            if self.cmd_reply:
                # nobody answers once we are gone: the kernel must not wait for us
                try:
                    self._nl.set_features(False)
                except NetlinkError as e:
                    log.warning("tcmu: %s", e)
            self._nl.close()
            self._nl = None
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        return failures

    def reopen_logs(self) -> None:
        if self.logs is not None:
            self.logs.reopen()

    def __enter__(self) -> TcmuService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["BlockDevice", "TcmuService"]
