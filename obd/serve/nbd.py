"""An NBD server for block devices (NetworkBlockDevice/nbd ``doc/proto.md``).

Fixed newstyle handshake only; options ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``,
``GO``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and ``SET_META_CONTEXT`` (one
context, ``base:allocation``); commands ``READ``, ``WRITE`` (+``FUA``), ``FLUSH``,
``TRIM``, ``WRITE_ZEROES`` (+``NO_HOLE``), ``BLOCK_STATUS`` (+``REQ_ONE``) and ``DISC``.

One thread per connection reads requests and runs them in order (with ``workers``, a
small pool per connection runs them, so a client that pipelines gets several at once).
Replies go out under a per-connection lock, header and payload in one ``sendmsg``.

Every export of a server shares one device object between its connections. Its ``flush``
makes every completed write durable (the :class:`~obd.io.base.BlockDevice` contract),
which is what ``NBD_FLAG_CAN_MULTI_CONN`` asks for, so that flag is set unless an export
opts out.

Errors: a bad request gets the protocol's error reply (option data over 64 KiB gets
``NBD_REP_ERR_TOO_BIG``); a bad magic, unknown client flags, an oversized write (its
payload cannot be skipped safely), option data past 16 MiB or a dropped connection ends
that connection only. Nothing a client sends stops the server; running out of file
descriptors makes it wait before accepting again, serving the connections it has.

FLUSH and FUA on a sequential connection (no ``--workers``) are fsynced by a helper
thread while the connection goes on serving; each is answered after an fsync that
started after it arrived, so every write answered before it is durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from obd.errors import FileAccessError, ObdError, ReadOnlyError, UsageError
from obd.io.base import BlockDevice, ExtentKind

log = logging.getLogger("obd.serve.nbd")

# --- magics -------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) ----------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags (16 bits) ------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# --- options ---------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# --- option replies --------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _REP_ERR + 1
NBD_REP_ERR_POLICY = _REP_ERR + 2
NBD_REP_ERR_INVALID = _REP_ERR + 3
NBD_REP_ERR_PLATFORM = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG = _REP_ERR + 9

# --- NBD_REP_INFO types ----------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands and command flags --------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# --- structured replies ----------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- error values (wire values, not the host's errno) ----------------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- base:allocation -------------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# --- limits ----------------------------------------------------------------------------
MIN_BLOCK_SIZE = 512
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 << 20  # largest READ / WRITE we serve (and advertise)
MAX_OPTION_DATA = 64 << 10  # longest option data we read (longer: NBD_REP_ERR_TOO_BIG)
MAX_OPTION_SKIP = 16 << 20  # longer option data than this ends the connection
MAX_STRING = 4096  # longest export name / query (proto.md "strings")
MAX_EXTENTS = 1 << 16  # descriptors in one block-status reply
HANDSHAKE_TIMEOUT = 60.0
ACCEPT_BACKOFF = (0.01, 1.0)  # first and longest wait after a failed accept (EMFILE...)
SHUTDOWN_GRACE = 5.0  # after the shutdown timeout: wait for device calls in flight

# --- wire layouts (all big-endian) -----------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeros)
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET_DATA_REPLY = struct.Struct(">IHHQIQ")  # structured header + offset
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length (+ message)
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

_ZEROES_124 = bytes(124)


class Request(NamedTuple):
    """A transmission-phase request header (28 bytes)."""

    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return REQUEST.pack(*self)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Request:
        return cls._make(REQUEST.unpack_from(buf))


class OptionHeader(NamedTuple):
    magic: int
    option: int
    length: int

    def pack(self) -> bytes:
        return OPTION_HEADER.pack(*self)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> OptionHeader:
        return cls._make(OPTION_HEADER.unpack_from(buf))


_COMMAND_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

ReadHook = Callable[[str, int, int, int], None]
"""``hook(export_name, offset, length, latency_ns)`` called after every served read."""


@dataclass(eq=False)
class Export:
    """One named export: a device shared by every connection to it.

    ``multi_conn`` says the device's ``flush`` covers the completed writes of every
    connection (true for one shared device object); read-only exports always allow it.
    """

    name: str
    device: BlockDevice
    description: str = ""
    multi_conn: bool = True
    readonly: bool = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.readonly = bool(self.device.readonly)
        self.size = int(self.device.size())
        if len(self.name.encode()) > MAX_STRING:
            raise UsageError(f"export name longer than {MAX_STRING} bytes: {self.name[:40]}...")

    def transmission_flags(self, structured: bool) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        if self.readonly:
            flags |= NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN
        else:
            flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
            if self.multi_conn:
                flags |= NBD_FLAG_CAN_MULTI_CONN
        if structured:
            flags |= NBD_FLAG_SEND_DF  # we never split a read reply
        return flags


class _ClientGone(Exception):
    """The peer closed the connection or broke the protocol: end this connection."""


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value a failed device call is reported with."""
    if isinstance(exc, ReadOnlyError):
        return NBD_EPERM
    if isinstance(exc, OSError) and not isinstance(exc, ObdError):
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return NBD_ENOSPC
        if code in (errno.EPERM, errno.EACCES, errno.EROFS):
            return NBD_EPERM
        if code == errno.EINVAL:
            return NBD_EINVAL
        if code == errno.ENOMEM:
            return NBD_ENOMEM
    if isinstance(exc, MemoryError):
        return NBD_ENOMEM
    return NBD_EIO


class _Connection:
    """One client: handshake, then the transmission phase."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self.structured = False
        self.meta_export: str | None = None  # export whose base:allocation is selected
        self.export: Export | None = None
        self.block_status = False
        self.thread: threading.Thread | None = None
        self._rbuf = bytearray(self._RBUF)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_bytes = 0
        self.gather = False  # set in the sequential transmission loop only
        # FLUSH and FUA of the sequential loop: fsynced by a helper thread, so the
        # connection goes on reading and serving requests meanwhile
        self.flush_async = False
        self.cut = False  # set by shutdown after its timeout: serve no more requests
        self._flush_cv = threading.Condition()
        self._flushq: list[int] = []  # cookies waiting for the next fsync
        self._flusher: threading.Thread | None = None
        self._flush_done = False

    # -- socket helpers ----------------------------------------------------------------
    # Reads go through a buffer: one recv can bring many pipelined requests. While
    # requests are waiting in it, replies are gathered (``_pending``) and go out together
    # just before the next recv would block, in one sendmsg.
    _RBUF = 256 << 10
    _PENDING_MAX = 1 << 20

    def recv_into(self, view: memoryview) -> None:
        want = len(view)
        got = 0
        if self._rend > self._rstart:
            got = min(want, self._rend - self._rstart)
            view[:got] = self._rview[self._rstart : self._rstart + got]
            self._rstart += got
        if got == want:
            return
        self.flush_replies()
        sock = self.sock
        while got < want:
            if want - got >= self._RBUF // 2:
                n = sock.recv_into(view[got:])  # a large payload: straight into place
                if n == 0:
                    raise _ClientGone("connection closed by peer")
                got += n
                continue
            n = sock.recv_into(self._rview)
            if n == 0:
                raise _ClientGone("connection closed by peer")
            take = min(n, want - got)
            view[got : got + take] = self._rview[:take]
            got += take
            self._rstart, self._rend = take, n

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        scratch = memoryview(bytearray(min(n, 64 << 10)))
        while n > 0:
            take = min(n, len(scratch))
            self.recv_into(scratch[:take])
            n -= take

    def buffered(self) -> int:
        return self._rend - self._rstart

    def flush_replies(self) -> None:
        if self._pending:  # only this connection's reader thread adds to it
            with self.send_lock:
                parts, self._pending, self._pending_bytes = self._pending, [], 0
                self._sendmsg(parts)

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            self.recv_into(memoryview(buf))
        return bytes(buf)

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send ``parts`` as one message (callers hold ``send_lock`` in transmission).

        When requests are already waiting in the receive buffer (and replies may be
        gathered), the parts join the pending replies instead.
        """
        if self.gather or self._pending:  # never overtake replies already gathered
            self._pending.extend(parts)
            self._pending_bytes += sum(len(p) for p in parts)
            if self.gather and self._pending_bytes < self._PENDING_MAX and len(self._pending) < 512:
                return
            parts = tuple(self._pending)
            self._pending, self._pending_bytes = [], 0
        self._sendmsg(parts)

    def _sendmsg(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts)
        if sent == total:
            return
        # Partial send: finish with sendall over what is left.
        for p in parts:
            if sent >= len(p):
                sent -= len(p)
                continue
            self.sock.sendall(memoryview(p)[sent:])
            sent = 0

    # -- run -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            export = self.handshake()
            if export is None:
                return
            self.sock.settimeout(None)
            self.export = export
            log.debug("%s: connected to export %r", self.peer, export.name)
            self.transmission(export)
        except _ClientGone as e:
            log.debug("%s: %s", self.peer, e)
        except (ConnectionError, TimeoutError) as e:
            log.debug("%s: connection ended: %s", self.peer, e)
        except OSError as e:
            if not self.server.stopping:
                log.info("%s: connection error: %s", self.peer, e)
        except Exception:
            log.exception("%s: unexpected error; closing this connection", self.peer)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server._forget(self)

    # -- handshake -----------------------------------------------------------------------
    def option_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)), data)

    def option_error(self, option: int, rtype: int, message: str) -> None:
        self.option_reply(option, rtype, message.encode()[:MAX_STRING])

    def handshake(self) -> Export | None:
        self.send(HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (cflags,) = CLIENT_FLAGS.unpack(self.recv(4))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise _ClientGone(f"unknown client flags 0x{cflags:x}")
        no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        while True:
            hdr = OptionHeader.unpack(self.recv(OPTION_HEADER.size))
            if hdr.magic != IHAVEOPT:
                raise _ClientGone(f"bad option magic 0x{hdr.magic:x}")
            opt = hdr.option
            if hdr.length > MAX_OPTION_DATA:
                # EXPORT_NAME cannot answer an error; data past MAX_OPTION_SKIP is abuse
                if opt == NBD_OPT_EXPORT_NAME or hdr.length > MAX_OPTION_SKIP:
                    raise _ClientGone(f"option {opt} data too long ({hdr.length} bytes)")
                self.skip(hdr.length)
                self.option_error(opt, NBD_REP_ERR_TOO_BIG, f"{hdr.length} bytes of option data")
                continue
            data = self.recv(hdr.length)
            if opt == NBD_OPT_EXPORT_NAME:
                export = self.server.find_export(data.decode(errors="replace"))
                if isinstance(export, str):
                    raise _ClientGone(f"NBD_OPT_EXPORT_NAME: {export}")
                flags = export.transmission_flags(self.structured)
                reply = EXPORT_NAME_REPLY.pack(export.size, flags)
                self.send(reply if no_zeroes else reply + _ZEROES_124)
                self.block_status = self.meta_export == export.name
                return export
            if opt == NBD_OPT_ABORT:
                with contextlib.suppress(OSError):
                    self.option_reply(opt, NBD_REP_ACK)
                return None
            if opt == NBD_OPT_LIST:
                if data:
                    self.option_error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                for name in self.server.export_names():
                    raw = name.encode()
                    self.option_reply(opt, NBD_REP_SERVER, U32.pack(len(raw)) + raw)
                self.option_reply(opt, NBD_REP_ACK)
            elif opt == NBD_OPT_STRUCTURED_REPLY:
                if data:
                    self.option_error(opt, NBD_REP_ERR_INVALID, "option takes no data")
                elif self.structured:
                    self.option_error(opt, NBD_REP_ERR_INVALID, "already negotiated")
                else:
                    self.structured = True
                    self.option_reply(opt, NBD_REP_ACK)
            elif opt in (NBD_OPT_INFO, NBD_OPT_GO):
                chosen = self.info(opt, data)
                if chosen is not None and opt == NBD_OPT_GO:
                    self.block_status = self.meta_export == chosen.name
                    return chosen
            elif opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                self.meta_context(opt, data)
            else:
                self.option_error(opt, NBD_REP_ERR_UNSUP, f"option {opt} is not supported")

    def info(self, opt: int, data: bytes) -> Export | None:
        """NBD_OPT_INFO / NBD_OPT_GO: describe the export (GO: and enter transmission)."""
        try:
            (nlen,) = U32.unpack_from(data, 0)
            name = data[4 : 4 + nlen].decode()
            (count,) = U16.unpack_from(data, 4 + nlen)
            wanted = [U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(count)]
            if len(data) != 6 + nlen + 2 * count:
                raise ValueError("length mismatch")
        except (struct.error, ValueError, UnicodeDecodeError):
            self.option_error(opt, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return None
        export = self.server.find_export(name)
        if isinstance(export, str):
            rtype = NBD_REP_ERR_SHUTDOWN if self.server.stopping else NBD_REP_ERR_UNKNOWN
            self.option_error(opt, rtype, export)
            return None
        flags = export.transmission_flags(self.structured)
        self.option_reply(opt, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size, flags))
        if NBD_INFO_NAME in wanted:
            self.option_reply(opt, NBD_REP_INFO, U16.pack(NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in wanted and export.description:
            desc = U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode()[:MAX_STRING]
            self.option_reply(opt, NBD_REP_INFO, desc)
        # Always sent: writes must be 512-aligned whatever the client asked for.
        self.option_reply(
            opt,
            NBD_REP_INFO,
            INFO_BLOCK_SIZE.pack(
                NBD_INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD
            ),
        )
        self.option_reply(opt, NBD_REP_ACK)
        return export

    def meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self.option_error(opt, NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            (nlen,) = U32.unpack_from(data, 0)
            name = data[4 : 4 + nlen].decode()
            pos = 4 + nlen
            (count,) = U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = U32.unpack_from(data, pos)
                if qlen > MAX_STRING:
                    raise ValueError("query too long")
                queries.append(data[pos + 4 : pos + 4 + qlen].decode())
                pos += 4 + qlen
            if pos != len(data) or len(data) < pos:
                raise ValueError("length mismatch")
        except (struct.error, ValueError, UnicodeDecodeError):
            self.option_error(opt, NBD_REP_ERR_INVALID, "malformed meta context data")
            return
        export = self.server.find_export(name)
        if isinstance(export, str):
            self.option_error(opt, NBD_REP_ERR_UNKNOWN, export)
            return
        if opt == NBD_OPT_LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
            self.meta_export = export.name if match else None
        if match:
            payload = U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
            self.option_reply(opt, NBD_REP_META_CONTEXT, payload)
        self.option_reply(opt, NBD_REP_ACK)

    # -- transmission --------------------------------------------------------------------
    def transmission(self, export: Export) -> None:
        hdr = bytearray(REQUEST.size)
        hview = memoryview(hdr)
        workers = self.server.workers
        pool = ThreadPoolExecutor(workers, f"nbd-{self.peer}") if workers > 0 else None
        slots = threading.BoundedSemaphore(self.server.max_in_flight) if pool else None
        unpack = REQUEST.unpack_from
        self.flush_async = pool is None
        try:
            while True:
                try:
                    self.recv_into(hview)
                except _ClientGone:
                    return
                magic, flags, cmd, cookie, offset, length = unpack(hdr)
                if self.cut:
                    return
                if magic != REQUEST_MAGIC:
                    raise _ClientGone(f"bad request magic 0x{magic:08x}")
                payload: bytearray | None = None
                if cmd == NBD_CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        # The payload cannot be skipped safely: end this connection.
                        raise _ClientGone(f"write of {length} bytes exceeds {MAX_PAYLOAD}")
                    payload = bytearray(length)
                    if length:
                        self.recv_into(memoryview(payload))
                elif cmd == NBD_CMD_DISC:
                    log.debug("%s: NBD_CMD_DISC", self.peer)
                    return
                if pool is None:
                    # gather this reply when another request is already buffered
                    self.gather = self.buffered() >= REQUEST.size
                    self.handle(export, flags, cmd, cookie, offset, length, payload)
                    if self.buffered() < REQUEST.size:
                        self.flush_replies()
                else:
                    assert slots is not None
                    slots.acquire()
                    pool.submit(
                        self._pooled, slots, export, flags, cmd, cookie, offset, length, payload
                    )
        finally:
            self.gather = False
            with contextlib.suppress(OSError):
                self.flush_replies()
            if pool is not None:
                pool.shutdown(wait=True)  # in-flight requests are answered first
            self._stop_flusher()  # and so are flushes

    def _pooled(
        self,
        slots: threading.BoundedSemaphore,
        export: Export,
        flags: int,
        cmd: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytearray | None,
    ) -> None:
        try:
            if not self.cut:
                self.handle(export, flags, cmd, cookie, offset, length, payload)
        except OSError as e:
            log.debug("%s: reply failed: %s", self.peer, e)
            self.abort()
        except Exception:
            log.exception("%s: request failed", self.peer)
            self.abort()
        finally:
            slots.release()

    # -- flushes ---------------------------------------------------------------------------
    def queue_flush(self, export: Export, cookie: int) -> None:
        """Answer ``cookie`` after an fsync that starts after this call (FLUSH, FUA).

        Requests queued while an fsync runs share the next one: each is answered only by
        an fsync that started after it was queued, so every write completed before it
        is durable when it is answered.
        """
        with self._flush_cv:
            self._flushq.append(cookie)
            if self._flusher is None:
                t = threading.Thread(
                    target=self._flush_loop, args=(export,), name=f"nbd-flush-{self.peer}"
                )
                t.daemon = True
                try:
                    t.start()
                except RuntimeError:  # can't start new thread: flush right here
                    self._flushq.remove(cookie)
                    self._flush_and_reply(export, [cookie])
                    return
                self._flusher = t
            self._flush_cv.notify()

    def _flush_loop(self, export: Export) -> None:
        while True:
            with self._flush_cv:
                while not self._flushq and not self._flush_done:
                    self._flush_cv.wait()
                if not self._flushq:
                    return
                batch, self._flushq = self._flushq, []
            self._flush_and_reply(export, batch)

    def _flush_and_reply(self, export: Export, cookies: list[int]) -> None:
        err = 0
        try:
            export.device.flush()
        except Exception as e:
            err = nbd_errno(e)
            log.error("%s: FLUSH of %r failed: %s", self.peer, export.name, e)
        try:
            with self.send_lock:
                self._sendmsg([SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, c) for c in cookies])
        except OSError as e:
            log.debug("%s: reply failed: %s", self.peer, e)
            self.abort()

    def _stop_flusher(self) -> None:
        with self._flush_cv:
            self._flush_done = True
            self._flush_cv.notify()
            t = self._flusher
        if t is not None:
            t.join()

    def abort(self) -> None:
        """Wake the reader so the whole connection ends (a reply could not be sent)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def read_flags(self, export: Export) -> int:
        """The flags a READ may carry: FUA where it is sent (ignored), DF with structured."""
        fua = 0 if export.readonly else NBD_CMD_FLAG_FUA
        return fua | (NBD_CMD_FLAG_DF if self.structured else 0)

    def check(self, export: Export, flags: int, cmd: int, offset: int, length: int) -> int:
        """The NBD error for a request that must not run, or 0."""
        size = export.size
        end = offset + length
        if cmd == NBD_CMD_READ:
            if (flags and flags & ~self.read_flags(export)) or length > MAX_PAYLOAD or end > size:
                return NBD_EINVAL
            return 0
        # FUA is valid on every command once NBD_FLAG_SEND_FUA is sent (writable exports)
        fua = 0 if export.readonly else NBD_CMD_FLAG_FUA
        if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM):
            if cmd == NBD_CMD_WRITE_ZEROES:
                allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE
            else:
                allowed = NBD_CMD_FLAG_FUA
            if flags & ~allowed:
                return NBD_EINVAL
            if export.readonly:
                return NBD_EPERM
            if end > size:
                return NBD_EINVAL if cmd == NBD_CMD_TRIM else NBD_ENOSPC
            if (offset | length) % MIN_BLOCK_SIZE:
                return NBD_EINVAL
            return 0
        if cmd == NBD_CMD_FLUSH:
            return NBD_EINVAL if flags & ~fua else 0
        if cmd == NBD_CMD_BLOCK_STATUS:
            if flags & ~(NBD_CMD_FLAG_REQ_ONE | fua) or not self.block_status:
                return NBD_EINVAL
            if length == 0 or end > size:
                return NBD_EINVAL
            return 0
        return NBD_EINVAL  # NBD_CMD_CACHE and unknown commands

    def handle(
        self,
        export: Export,
        flags: int,
        cmd: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytearray | None,
    ) -> None:
        err = self.check(export, flags, cmd, offset, length)
        if err:
            log.debug(
                "%s: %s offset=%d length=%d flags=0x%x rejected with error %d",
                self.peer, _COMMAND_NAMES.get(cmd, str(cmd)), offset, length, flags, err,
            )  # fmt: skip
            self.reply_error(cmd, cookie, err, "request rejected")
            return
        dev = export.device
        # Device calls inside the try (their errors are the request's error reply);
        # replies outside it (a reply that cannot be sent ends the connection).
        if cmd == NBD_CMD_READ:
            try:
                hook = self.server.read_hook
                if hook is None:
                    data = dev.pread(offset, length)
                else:
                    t0 = _now_ns()
                    data = dev.pread(offset, length)
                    hook(export.name, offset, length, _now_ns() - t0)
                if len(data) != length:
                    raise OSError(errno.EIO, f"short read at {offset}: {len(data)} of {length}")
            except Exception as e:
                self.failed(export, cmd, cookie, offset, length, e)
                return
            self.reply_data(cookie, offset, data)
            return
        descs: list[tuple[int, int]] = []
        try:
            if cmd == NBD_CMD_BLOCK_STATUS:
                descs = block_status(dev, offset, length, one=bool(flags & NBD_CMD_FLAG_REQ_ONE))
            elif cmd == NBD_CMD_WRITE:
                assert payload is not None
                if length:
                    dev.pwrite(offset, payload)
            elif cmd == NBD_CMD_WRITE_ZEROES:
                if flags & NBD_CMD_FLAG_NO_HOLE:
                    _write_zero_bytes(dev, offset, length)
                elif length:
                    dev.write_zeroes(offset, length)
            elif cmd == NBD_CMD_TRIM and length:
                dev.discard(offset, length)
            if (
                (cmd == NBD_CMD_FLUSH or flags & NBD_CMD_FLAG_FUA)
                and cmd != NBD_CMD_BLOCK_STATUS
                and not export.readonly
            ):
                if self.flush_async:
                    self.queue_flush(export, cookie)  # it replies after the fsync
                    return
                dev.flush()
        except Exception as e:
            self.failed(export, cmd, cookie, offset, length, e)
            return
        if cmd == NBD_CMD_BLOCK_STATUS:
            self.reply_block_status(cookie, descs)
        else:
            with self.send_lock:
                self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def failed(
        self, export: Export, cmd: int, cookie: int, offset: int, length: int, exc: Exception
    ) -> None:
        """Answer a request whose device call raised ``exc`` with the error it maps to."""
        code = nbd_errno(exc)
        if code == NBD_EIO:
            log.error(
                "%s: %s offset=%d length=%d on %r failed: %s",
                self.peer, _COMMAND_NAMES.get(cmd, str(cmd)), offset, length, export.name, exc,
            )  # fmt: skip
        self.reply_error(cmd, cookie, code, str(exc))

    def reply_data(self, cookie: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.structured:
            if not data:
                hdr = STRUCTURED_REPLY.pack(
                    STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0
                )
                with self.send_lock:
                    self.send(hdr)
                return
            hdr = OFFSET_DATA_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + len(data),
                offset,
            )
        else:
            hdr = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        with self.send_lock:
            self.send(hdr, data)

    def reply_error(self, cmd: int, cookie: int, err: int, message: str) -> None:
        if self.structured and cmd in (NBD_CMD_READ, NBD_CMD_BLOCK_STATUS):
            msg = message.encode()[:MAX_STRING]
            body = ERROR_PAYLOAD.pack(err, len(msg)) + msg
            hdr = STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, len(body)
            )
            with self.send_lock:
                self.send(hdr, body)
        else:
            with self.send_lock:
                self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))

    def reply_block_status(self, cookie: int, descs: Sequence[tuple[int, int]]) -> None:
        body = bytearray(U32.pack(BASE_ALLOCATION_ID))
        for dlen, state in descs:
            body += BLOCK_DESCRIPTOR.pack(dlen, state)
        hdr = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            len(body),
        )
        with self.send_lock:
            self.send(hdr, body)


_now_ns = time.perf_counter_ns


_EXTENT_STATE = {
    ExtentKind.DATA: 0,
    ExtentKind.ZERO: NBD_STATE_ZERO,
    ExtentKind.HOLE: NBD_STATE_HOLE | NBD_STATE_ZERO,
}


def block_status(
    device: BlockDevice, offset: int, length: int, *, one: bool = False
) -> list[tuple[int, int]]:
    """``(length, NBD_STATE_*)`` descriptors covering ``[offset, offset+length)``.

    A hole (nothing mapped) is ``HOLE|ZERO``; a zeroed segment is ``ZERO`` (allocated,
    reads as zeros); data is 0. Adjacent runs of one state are joined; with ``one`` only
    the first run is returned. Ranges the device reports nothing for count as data.
    """
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    for e in device.extents(offset, length):
        s, t = max(e.offset, pos), min(e.end, end)
        if t <= s:
            continue
        if s > pos:  # a gap in the device's answer: claim nothing about it
            _append(out, s - pos, 0)
        _append(out, t - s, _EXTENT_STATE[e.kind])
        pos = t
        if pos >= end or (one and len(out) > 1) or len(out) >= MAX_EXTENTS:
            break
    if pos < end and not (one and len(out) > 1) and len(out) < MAX_EXTENTS:
        _append(out, end - pos, 0)
    if one:
        del out[1:]
    return out


def _append(out: list[tuple[int, int]], n: int, state: int) -> None:
    if out and out[-1][1] == state:
        out[-1] = (out[-1][0] + n, state)
    else:
        out.append((n, state))


_ZERO_CHUNK = bytes(1 << 20)


def _write_zero_bytes(dev: BlockDevice, offset: int, length: int) -> None:
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(_ZERO_CHUNK), end - pos)
        dev.pwrite(pos, memoryview(_ZERO_CHUNK)[:n])
        pos += n


class NbdServer:
    """Serves ``exports`` over NBD on TCP and/or Unix sockets.

    ``failed`` maps names of exports that could not be opened to the reason a client
    asking for them is told. The empty export name selects the first export.
    ``workers`` threads per connection run requests (0: the connection thread runs
    them); ``read_hook`` is told about every read (metrics, audit).
    """

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        failed: Mapping[str, str] | None = None,
        workers: int = 0,
        max_in_flight: int = 16,
        read_hook: ReadHook | None = None,
    ) -> None:
        self.exports: dict[str, Export] = {}
        for e in exports:
            if e.name in self.exports:
                raise UsageError(f"two exports are named {e.name!r}")
            self.exports[e.name] = e
        self.failed = dict(failed or {})
        self.workers = workers
        self.max_in_flight = max(1, max_in_flight)
        self.read_hook = read_hook
        self.stopping = False
        self._listeners: list[tuple[socket.socket, str | None]] = []
        self._accept_threads: list[threading.Thread] = []
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.addresses: list[str] = []

    # -- exports ---------------------------------------------------------------------------
    def export_names(self) -> list[str]:
        return list(self.exports)

    def find_export(self, name: str) -> Export | str:
        """The export named ``name`` (``""``: the first), or why there is none."""
        if self.stopping:
            return "the server is shutting down"
        if name == "" and self.exports:
            return next(iter(self.exports.values()))
        export = self.exports.get(name)
        if export is not None:
            return export
        if name in self.failed:
            return f"export {name!r} is unavailable: {self.failed[name]}"
        return f"no export named {name!r}"

    # -- listening ---------------------------------------------------------------------------
    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0 picks one); returns the bound address."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UsageError(f"cannot resolve listen address {host!r}: {e}") from None
        family, stype, proto, _, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise FileAccessError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = sock.getsockname()
        self._listeners.append((sock, None))
        h = bound[0]
        self.addresses.append(f"nbd://[{h}]:{bound[1]}" if ":" in h else f"nbd://{h}:{bound[1]}")
        return bound[0], bound[1]

    def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket at ``path`` (a stale socket there is replaced)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileAccessError("exists and is not a socket", path=path)
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise FileAccessError(f"cannot listen: {e.strerror or e}", path=path) from None
        self._listeners.append((sock, path))
        self.addresses.append(f"nbd+unix:///?socket={path}")
        return path

    def start(self) -> None:
        """Start accepting connections (one thread per listener)."""
        if not self._listeners:
            raise UsageError("no listen address")
        for sock, _ in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock,), name="nbd-accept")
            t.daemon = True
            t.start()
            self._accept_threads.append(t)

    def _accept_loop(self, lsock: socket.socket) -> None:
        n = 0
        delay = 0.0  # > 0 while accept fails: the wait before the next try
        while not self.stopping:
            try:
                sock, addr = lsock.accept()
            except OSError as e:
                if self.stopping:
                    return
                if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN):
                    continue  # that one connection went away: take the next
                # Out of descriptors (EMFILE, ENFILE) or memory: the pending connection
                # stays in the backlog; wait (connections already open are served
                # meanwhile) rather than retry at once and burn a core.
                if not delay:
                    log.warning(
                        "cannot accept connections: %s; retrying", e.strerror or e
                    )  # fmt: skip
                delay = min(ACCEPT_BACKOFF[1], delay * 2 or ACCEPT_BACKOFF[0])
                self._stopped.wait(delay)
                continue
            if self.stopping:
                sock.close()
                return
            if delay:
                log.warning("accepting connections again")
                delay = 0.0
            n += 1
            try:
                sock.settimeout(None)
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    peer = f"{addr[0]}:{addr[1]}"
                else:
                    peer = f"unix#{n}"
            except OSError as e:  # the peer is already gone
                log.debug("connection dropped before it started: %s", e)
                sock.close()
                continue
            conn = _Connection(self, sock, peer)
            t = threading.Thread(target=conn.run, name=f"nbd-conn-{peer}")
            t.daemon = True
            conn.thread = t
            with self._lock:
                self._conns.add(conn)
            try:
                t.start()
            except RuntimeError as e:  # can't start new thread
                with self._lock:
                    self._conns.discard(conn)
                sock.close()
                log.warning("%s: connection refused: %s", peer, e)
                self._stopped.wait(ACCEPT_BACKOFF[0])

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- device calls in flight ------------------------------------------------------------
    # A connection's thread makes its device calls (its pool and flush threads end
    # before it does), so an export has no call running once every connection thread
    # that entered transmission on it has ended. After shutdown cut its socket, a thread
    # makes at most the call it is in (and its queued pool calls): every reply fails.

    def busy(self) -> dict[str, int]:
        """Connections whose thread may still be in a device call, by export name."""
        out: dict[str, int] = {}
        with self._lock:
            for c in self._conns:
                if c.export is not None and c.thread is not None and c.thread.is_alive():
                    out[c.export.name] = out.get(c.export.name, 0) + 1
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection thread runs; False if some still do after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.busy()

    def shutdown(self, timeout: float = 30.0, grace: float = SHUTDOWN_GRACE) -> bool:
        """Stop accepting, answer every request already received, end every connection.

        Returns False when some connection did not end within ``timeout`` seconds:
        those are then cut (their sockets shut down, no further request served) and the
        device calls already running get ``grace`` more seconds; :meth:`busy` tells
        which exports may still have one, whose devices must not be closed yet.
        Devices are neither flushed nor closed here (their owner does that).
        """
        self.stopping = True
        self._stopped.set()
        for sock, path in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._listeners.clear()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            # Wake the reader: no new request is read; queued ones still get replies.
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            late = [c for c in self._conns if c.thread is not None and c.thread.is_alive()]
        for c in late:  # cut: no further request is served, no reply can be sent
            c.cut = True
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        if late:
            log.warning("%d connections did not end within %.1f s: cut", len(late), timeout)
            self.wait_idle(grace)
        for t in self._accept_threads:
            t.join(1.0)
        return not late


def flush_all(exports: Iterable[Export]) -> list[tuple[str, BaseException]]:
    """Flush every writable export; returns ``(name, error)`` for those that failed."""
    failures: list[tuple[str, BaseException]] = []
    for e in exports:
        if e.readonly:
            continue
        try:
            e.device.flush()
        except Exception as exc:
            failures.append((e.name, exc))
    return failures
