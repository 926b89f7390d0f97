"""The server's logs: the main log (``logConfig``) and the audit log (docs/formats.md §6.2, §8.8).

Audit lines keep Photon's format::

    2026/01/02 03:04:05.123456|AUDIT|th=00007f12345678ab|file:pread[pathname=...][offset=0][size=4096][latency=12000]

The time is UTC, ``latency`` is in microseconds. Both logs rotate by size (``logSizeMB``
x ``logRotateNum``; the audit log 10 MiB x 3) and are reopened by :func:`reopen_logs`
(SIGHUP), so an outside logrotate can move them away.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import logging.handlers
import os
import threading

from obd.errors import FileAccessError
from obd.serve.config import GlobalConfig, LogConfig

AUDIT_MAX_BYTES = 10 << 20
AUDIT_BACKUPS = 3
PREAD_AUDIT_US = 10_000  # file:pread is audited from 10 ms on (as upstream)

# upstream logLevel: 0 DEBUG, 1 INFO, 2 WARN, 3 ERROR, 4 FATAL
_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}


def python_level(level: int) -> int:
    return _LEVELS.get(level, logging.CRITICAL)


class ReopenableRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotating file handler whose file can be reopened (after logrotate)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                with contextlib.suppress(OSError):
                    self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def _open_handler(path: str, max_bytes: int, backups: int) -> ReopenableRotatingFileHandler:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        # backupCount 0 would mean "never rotate": keep at least the current file.
        return ReopenableRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=max(backups, 0), encoding="utf-8"
        )
    except OSError as e:
        raise FileAccessError(f"cannot open log file: {e.strerror or e}", path=path) from None


class _PhotonFormatter(logging.Formatter):
    """``YYYY/MM/DD HH:MM:SS.uuuuuu|LEVEL|th=<hex>|name:message`` (UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        t = _dt.datetime.fromtimestamp(record.created, _dt.UTC)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        level = {"WARNING": "WARN", "CRITICAL": "FATAL"}.get(record.levelname, record.levelname)
        return f"{t:%Y/%m/%d %H:%M:%S.%f}|{level}|th={record.thread or 0:016x}|{record.name}:{msg}"


class AuditLog:
    """Writes audit events; thread-safe; ``None``-safe helpers live in :class:`Logs`."""

    def __init__(self, path: str, max_bytes: int = AUDIT_MAX_BYTES, backups: int = AUDIT_BACKUPS):
        self.path = path
        self.handler = _open_handler(path, max_bytes, backups)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def event(self, name: str, **fields: object) -> None:
        """Log ``name`` with ``[k=v]`` fields in the order given."""
        t = _dt.datetime.now(_dt.UTC)
        parts = "".join(f"[{k}={v}]" for k, v in fields.items())
        line = f"{t:%Y/%m/%d %H:%M:%S.%f}|AUDIT|th={threading.get_ident():016x}|{name}{parts}"
        record = logging.LogRecord("obd.audit", logging.INFO, "", 0, line, None, None)
        self.handler.handle(record)

    def pread(self, pathname: str, offset: int, size: int, latency_us: int) -> None:
        """The ``file:pread`` event (only for slow reads, as upstream)."""
        if latency_us >= PREAD_AUDIT_US:
            self.event(
                "file:pread", pathname=pathname, offset=offset, size=size, latency=latency_us
            )

    def reopen(self) -> None:
        self.handler.reopen()

    def close(self) -> None:
        self.handler.close()


class Logs:
    """The main log handler and the audit log of one server run."""

    def __init__(self, main: ReopenableRotatingFileHandler | None, audit: AuditLog | None):
        self.main = main
        self.audit = audit

    def reopen(self) -> None:
        if self.main is not None:
            self.main.reopen()
        if self.audit is not None:
            self.audit.reopen()

    def close(self) -> None:
        if self.main is not None:
            logging.getLogger("obd").removeHandler(self.main)
            self.main.close()
            self.main = None
        if self.audit is not None:
            self.audit.close()
            self.audit = None


def setup_logs(cfg: GlobalConfig, *, use_files: bool = True) -> Logs:
    """Attach the main log file to the ``obd`` logger and open the audit log.

    ``use_files`` False (no global config file was found) keeps logging on stderr only
    and writes no audit log, so a bare ``obd serve`` never writes to ``/var/log``.
    """
    if not use_files:
        return Logs(None, None)
    lc: LogConfig = cfg.effective_log
    main = None
    if lc.logPath:
        main = _open_handler(lc.logPath, lc.logSizeMB << 20, lc.logRotateNum)
        main.setFormatter(_PhotonFormatter())
        main.setLevel(python_level(lc.logLevel))
        logger = logging.getLogger("obd")
        logger.addHandler(main)
        if logger.level == logging.NOTSET or logger.level > main.level:
            logger.setLevel(main.level)
    audit = None
    if cfg.enableAudit and cfg.auditPath:
        try:
            audit = AuditLog(cfg.auditPath)
        except BaseException:
            if main is not None:
                logging.getLogger("obd").removeHandler(main)
                main.close()
            raise
    return Logs(main, audit)
