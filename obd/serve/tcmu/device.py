"""One TCMU device served by obd (docs/tcmu.md "Devices").

Opening (docs/formats.md §7.1): the config path is the cfgstring after ``overlaybd/``
(an optional ``;dev_id`` is split off); the image is opened, the resultFile written
(``success`` or ``failed:<reason>``, §6.5). A failed open is answered to the kernel with
-EPERM, as upstream does.

Serving: one thread per device waits on ``/dev/uioN`` and polls the command ring (F1's
:class:`~obd.serve.tcmu.ring.CommandRing`); each command runs on a worker pool shared by
every device, so one device uses several cores (reads of ZFile layers decompress outside
the GIL) and one slow command does not hold the others. A handler error answers only its
own command; a broken ring stops only its own device.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from obd.errors import ObdError
from obd.io.base import BlockDevice
from obd.serve.result import REASON_CREATE, config_failure_reason, report
from obd.serve.tcmu import scsi
from obd.serve.tcmu.configfs import SUBTYPE, TARGET, parse_cfgstring
from obd.serve.tcmu.ring import Command, CommandRing
from obd.serve.tcmu.uio import Uio, UioName

log = logging.getLogger("obd.serve.tcmu")

Opener = Callable[[str], BlockDevice]
HandlerFactory = Callable[[BlockDevice, "TcmuDevice"], Callable[[Command], scsi.Response]]
"""(image, device) -> the SCSI command handler of that image."""

POLL_SECONDS = 0.2
"""How long the ring thread waits on /dev/uioN before it looks at its stop flag."""

NOT_OPEN = scsi.Response.check(scsi.NOT_READY, (0x04, 0x03))
"""Commands of a device whose image did not open: NOT READY, manual intervention required."""


def _default_opener(path: str) -> BlockDevice:
    from obd.image import open_image

    return open_image(path)


def _configfs_attr(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def scsi_disk(image: BlockDevice, dev: TcmuDevice) -> Callable[[Command], scsi.Response]:
    """The SCSI disk of ``image``: the unit serial configfs gave the device (obd attach
    sets a unique hex one; else one derived from the cfgstring) and its hw_max_sectors."""
    d = f"{TARGET}/core/user_{dev.name.hba}/{dev.name.dev}"
    serial = _configfs_attr(f"{d}/wwn/vpd_unit_serial").rpartition(":")[2].strip()
    if not serial:
        serial = hashlib.sha256(dev.name.cfgstring.encode()).hexdigest()[:32]
    sectors = _configfs_attr(f"{d}/attrib/hw_max_sectors")
    return scsi.ScsiDisk(
        image,
        serial=serial,
        max_transfer_blocks=int(sectors) if sectors.isdigit() and int(sectors) else 128,
        name=dev.label,
    )


@dataclass
class OpenResult:
    ok: bool
    reason: str = ""
    error: BaseException | None = None
    result_file: str = ""
    image: BlockDevice | None = None
    seconds: float = 0.0


def open_image_for(config_path: str, opener: Opener) -> OpenResult:
    """Open the image of ``config_path`` and write its resultFile."""
    from obd.image.config import load_image_config

    t0 = time.monotonic()
    try:
        cfg = load_image_config(config_path)
    except ObdError as e:
        return OpenResult(False, REASON_CREATE, e)
    res = OpenResult(False, result_file=cfg.resultFile)
    try:
        res.image = opener(config_path)
        res.ok = True
    except (ObdError, OSError) as e:
        res.error = e
        res.reason = config_failure_reason(e, cfg)
    res.seconds = time.monotonic() - t0
    report(res.result_file, res.ok, res.reason, log)
    return res


@dataclass
class TcmuDevice:
    """A TCMU device: its UIO name, the image and the ring thread."""

    minor: int
    name: UioName
    pool: Executor
    handler_factory: HandlerFactory = scsi_disk
    opener: Opener = _default_opener
    config_path: str = ""
    dev_id: str | None = None
    opened: OpenResult | None = None
    uio: Uio | None = None
    ring: CommandRing | None = None
    handler: Callable[[Command], scsi.Response] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _inflight: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)
    failed: str = ""

    def __post_init__(self) -> None:
        self.config_path, self.dev_id = parse_cfgstring(f"{SUBTYPE}/{self.name.cfgstring}")

    @property
    def label(self) -> str:
        return f"uio{self.minor} ({self.name.hba}/{self.name.dev})"

    def open(self) -> int:
        """Open the image; 0, or -errno for the kernel (-EPERM when it failed)."""
        self.opened = open_image_for(self.config_path, self.opener)
        if not self.opened.ok:
            log.error(
                "%s: %s: %s (%s)",
                self.label, self.config_path, self.opened.reason, self.opened.error,
            )  # fmt: skip
            return -errno.EPERM
        assert self.opened.image is not None
        img = self.opened.image
        log.info(
            "%s: %s, %d bytes, %s, opened in %.3f s",
            self.label, self.config_path, img.size(),
            "read-only" if img.readonly else "writable", self.opened.seconds,
        )  # fmt: skip
        return 0

    def start(self) -> None:
        """Map /dev/uioN and start the ring thread (also for a device that did not open:
        its commands are answered NOT READY rather than left to time out)."""
        self.uio = Uio(self.minor)
        try:
            self.ring = CommandRing(self.uio.map, name=f"/dev/uio{self.minor}")
        except BaseException:
            self.uio.close()
            self.uio = None
            raise
        if self.opened is not None and self.opened.image is not None:
            self.handler = self.handler_factory(self.opened.image, self)
        self._thread = threading.Thread(
            target=self._loop, name=f"tcmu-uio{self.minor}", daemon=True
        )
        self._thread.start()

    # -- serving ------------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.uio is not None and self.ring is not None
        try:
            while not self._stop.is_set():
                cmds = self.ring.poll()
                with self._idle:
                    self._inflight += len(cmds)
                # all but the last go to the pool; the last runs here (no thread handoff
                # for a lone command, the common case at queue depth 1)
                for cmd in cmds[:-1]:
                    try:
                        self.pool.submit(self._run, cmd)
                    except RuntimeError:  # the pool is shut down: we are stopping
                        self._run(cmd)
                if cmds:
                    self._run(cmds[-1])
                if not self.uio.wait(POLL_SECONDS):
                    log.info("%s: the device went away", self.label)
                    break
        except ObdError as e:
            self.failed = str(e)
            log.error("%s: stopped serving: %s", self.label, e)
        except Exception as e:
            self.failed = repr(e)
            log.exception("%s: ring thread failed", self.label)

    def _run(self, cmd: Command) -> None:
        try:
            if self.handler is None:
                self._finish(cmd, NOT_OPEN)
                return
            assert self.ring is not None
            moved = self.ring.run(cmd, self.handler)
            if moved and self.uio is not None:
                self.uio.kick()
        except Exception:
            log.exception("%s: completing %r failed", self.label, cmd)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _finish(self, cmd: Command, rsp: scsi.Response) -> None:
        assert self.ring is not None and self.uio is not None
        if self.ring.complete(cmd, rsp):
            self.uio.kick()

    # -- stopping -----------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> BaseException | None:
        """Stop the ring thread, wait for commands in flight (up to ``timeout`` s), flush
        and close the image, unmap /dev/uioN. Returns the flush/close error, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(0.1)
            busy = self._inflight
        err: BaseException | None = None
        image = self.opened.image if self.opened else None
        if image is not None:
            try:
                if not image.readonly:
                    image.flush()
            except Exception as e:
                err = e
                log.error("%s: flush failed: %s", self.label, e)
            if busy:
                log.warning("%s: %d commands still running; the image stays open", self.label, busy)
            else:
                with contextlib.suppress(Exception):
                    image.close()
        if self.ring is not None and not busy:
            self.ring.close()
        if self.uio is not None and not busy:
            self.uio.close()
        return err


__all__ = ["TcmuDevice", "open_image_for"]
