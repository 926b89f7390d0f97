"""One NBD client: the handshake (option haggling), then the transmission phase.

Requests run in order on the connection's thread, or with ``workers`` on a small pool of
its own (a client that pipelines gets several at once). Replies go out under
``send_lock``, header and payload in one ``sendmsg``.

FLUSH and FUA on a sequential connection (no ``workers``) are fsynced by a helper
thread while the connection goes on serving; each is answered after an fsync that
started after it arrived, so every write answered before it is durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from obd.serve.nbd.export import Export, block_status, write_zero_bytes
from obd.serve.nbd.proto import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    COMMAND_NAMES,
    ERROR_PAYLOAD,
    EXPORT_NAME_REPLY,
    HANDSHAKE,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_DATA,
    MAX_OPTION_SKIP,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TOO_BIG,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBDMAGIC,
    OFFSET_DATA_REPLY,
    OPTION_HEADER,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    OptionHeader,
    nbd_errno,
)
from obd.serve.nbd.wire import Buffer, ClientGone, Wire

if TYPE_CHECKING:
    from obd.serve.nbd.server import NbdServer

log = logging.getLogger("obd.serve.nbd")

HANDSHAKE_TIMEOUT = 60.0
# Reads at least this large whose bytes lie in plain local layer files are sent with
# os.sendfile; below it one copy through Python costs less than the extra syscalls.
SENDFILE_MIN = 64 << 10
_ZEROES_124 = bytes(124)
_now_ns = time.perf_counter_ns
RequestFields = tuple[int, int, int, int, int, int]
"""A request header as ``REQUEST.unpack_from`` gives it (the fields of :class:`Request`)."""


def _name_at(data: bytes) -> tuple[str, int]:
    """A ``u32 length, bytes`` string at the start of option data, and where it ends."""
    (nlen,) = U32.unpack_from(data, 0)
    return data[4 : 4 + nlen].decode(), 4 + nlen


class Connection(Wire):
    """One client: handshake, then the transmission phase."""

    send_files = True  # large reads of plain local layers by os.sendfile (read_files)

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        super().__init__(sock)
        self.server = server
        self.peer = peer
        self.structured = False
        self.meta_export: str | None = None  # export whose base:allocation is selected
        self.export: Export | None = None
        self.block_status = False
        self.thread: threading.Thread | None = None
        # FLUSH and FUA of the sequential loop: fsynced by a helper thread, so the
        # connection goes on reading and serving requests meanwhile
        self.flush_async = False
        self.cut = False  # set by shutdown after its timeout: serve no more requests
        self._flush_cv = threading.Condition()
        self._flushq: list[int] = []  # cookies waiting for the next fsync
        self._flusher: threading.Thread | None = None
        self._flush_done = False

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
        except ClientGone as e:
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
            self.server.forget(self)

    def abort(self) -> None:
        """Wake the reader so the whole connection ends (a reply could not be sent)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- handshake -----------------------------------------------------------------------
    def option_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)), data)

    def option_error(self, option: int, rtype: int, message: str) -> None:
        self.option_reply(option, rtype, message.encode()[:MAX_STRING])

    def handshake(self) -> Export | None:
        self.send(HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (cflags,) = CLIENT_FLAGS.unpack(self.recv(CLIENT_FLAGS.size))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise ClientGone(f"unknown client flags 0x{cflags:x}")
        no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        while True:
            hdr = OptionHeader.unpack(self.recv(OPTION_HEADER.size))
            if hdr.magic != IHAVEOPT:
                raise ClientGone(f"bad option magic 0x{hdr.magic:x}")
            opt = hdr.option
            if hdr.length > MAX_OPTION_DATA:
                # EXPORT_NAME cannot answer an error; data past MAX_OPTION_SKIP is abuse
                if opt == NBD_OPT_EXPORT_NAME or hdr.length > MAX_OPTION_SKIP:
                    raise ClientGone(f"option {opt} data too long ({hdr.length} bytes)")
                self.skip(hdr.length)
                self.option_error(opt, NBD_REP_ERR_TOO_BIG, f"{hdr.length} bytes of option data")
                continue
            data = self.recv(hdr.length)
            if opt == NBD_OPT_EXPORT_NAME:
                export = self.server.find_export(data.decode(errors="replace"))
                if isinstance(export, str):
                    raise ClientGone(f"NBD_OPT_EXPORT_NAME: {export}")
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
            name, pos = _name_at(data)
            (count,) = U16.unpack_from(data, pos)
            wanted = [U16.unpack_from(data, pos + 2 + 2 * i)[0] for i in range(count)]
            if len(data) != pos + 2 + 2 * count:
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
        sizes = (MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD)
        self.option_reply(opt, NBD_REP_INFO, INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, *sizes))
        self.option_reply(opt, NBD_REP_ACK)
        return export

    def meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self.option_error(opt, NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            name, pos = _name_at(data)
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
                except ClientGone:
                    return
                req: RequestFields = unpack(hdr)
                magic, _, cmd, _, _, length = req
                if self.cut:
                    return
                if magic != REQUEST_MAGIC:
                    raise ClientGone(f"bad request magic 0x{magic:08x}")
                payload: bytearray | None = None
                if cmd == NBD_CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        # The payload cannot be skipped safely: end this connection.
                        raise ClientGone(f"write of {length} bytes exceeds {MAX_PAYLOAD}")
                    payload = bytearray(length)
                    if length:
                        self.recv_into(memoryview(payload))
                elif cmd == NBD_CMD_DISC:
                    log.debug("%s: NBD_CMD_DISC", self.peer)
                    return
                if pool is None:
                    # gather this reply when another request is already buffered
                    self.gather = self.buffered() >= REQUEST.size
                    self.handle(export, req, payload)
                    if self.buffered() < REQUEST.size:
                        self.flush_replies()
                else:
                    assert slots is not None
                    slots.acquire()
                    pool.submit(self._pooled, slots, export, req, payload)
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
        req: RequestFields,
        payload: bytearray | None,
    ) -> None:
        try:
            if not self.cut:
                self.handle(export, req, payload)
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
                self.sendmsg([SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, c) for c in cookies])
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

    # -- requests --------------------------------------------------------------------------
    def check(self, export: Export, flags: int, cmd: int, offset: int, length: int) -> int:
        """The NBD error for a request that must not run, or 0."""
        size = export.size
        end = offset + length
        # FUA is valid on every command once NBD_FLAG_SEND_FUA is sent (writable exports);
        # on a READ it is ignored, as DF is (sent with structured replies)
        fua = 0 if export.readonly else NBD_CMD_FLAG_FUA
        if cmd == NBD_CMD_READ:
            read_flags = fua | (NBD_CMD_FLAG_DF if self.structured else 0)
            if (flags and flags & ~read_flags) or length > MAX_PAYLOAD or end > size:
                return NBD_EINVAL
            return 0
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

    def handle(self, export: Export, req: RequestFields, payload: bytearray | None) -> None:
        """Run one request (``req``: the header's fields) and send its reply."""
        _, flags, cmd, cookie, offset, length = req
        err = self.check(export, flags, cmd, offset, length)
        if err:
            log.debug(
                "%s: %s offset=%d length=%d flags=0x%x rejected with error %d",
                self.peer, COMMAND_NAMES.get(cmd, str(cmd)), offset, length, flags, err,
            )  # fmt: skip
            self.reply_error(cmd, cookie, err, "request rejected")
            return
        dev = export.device
        # Device calls inside the try (their errors are the request's error reply);
        # replies outside it (a reply that cannot be sent ends the connection).
        if cmd == NBD_CMD_READ:
            if length >= SENDFILE_MIN and self.send_files and self.read_files(export, req):
                return
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
                    write_zero_bytes(dev, offset, length)
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
            self.reply(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def read_files(self, export: Export, req: RequestFields) -> bool:
        """Answer a large read with its data sent straight from the layer files (no copy
        through Python), when the device can say where every byte lies (``read_plan``);
        False when it cannot (then the caller reads it as usual)."""
        _, _, cmd, cookie, offset, length = req
        plan = getattr(export.device, "read_plan", None)
        if plan is None:
            return False
        t0 = _now_ns()
        try:
            parts = plan(offset, length)
        except Exception as e:
            self.failed(export, cmd, cookie, offset, length, e)
            return True
        if parts is None:
            return False
        if self.structured:
            head = OFFSET_DATA_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + length,
                offset,
            )
        else:
            head = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        with self.send_lock:
            self.send_with_files(head, parts)
        hook = self.server.read_hook
        if hook is not None:
            hook(export.name, offset, length, _now_ns() - t0)
        return True

    def failed(
        self, export: Export, cmd: int, cookie: int, offset: int, length: int, exc: Exception
    ) -> None:
        """Answer a request whose device call raised ``exc`` with the error it maps to."""
        code = nbd_errno(exc)
        if code == NBD_EIO:
            log.error(
                "%s: %s offset=%d length=%d on %r failed: %s",
                self.peer, COMMAND_NAMES.get(cmd, str(cmd)), offset, length, export.name, exc,
            )  # fmt: skip
        self.reply_error(cmd, cookie, code, str(exc))

    # -- replies ---------------------------------------------------------------------------
    def reply(self, *parts: Buffer) -> None:
        with self.send_lock:
            self.send(*parts)

    def reply_chunk(self, rtype: int, cookie: int, body: Buffer = b"") -> None:
        """One structured reply chunk, the last of its request."""
        hdr = STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, rtype, cookie, len(body)
        )
        self.reply(hdr, body)

    def reply_data(self, cookie: int, offset: int, data: Buffer) -> None:
        if not self.structured:
            self.reply(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data)
        elif not data:
            self.reply_chunk(NBD_REPLY_TYPE_NONE, cookie)
        else:
            hdr = OFFSET_DATA_REPLY.pack(
                STRUCTURED_REPLY_MAGIC,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + len(data),
                offset,
            )
            self.reply(hdr, data)

    def reply_error(self, cmd: int, cookie: int, err: int, message: str) -> None:
        if self.structured and cmd in (NBD_CMD_READ, NBD_CMD_BLOCK_STATUS):
            msg = message.encode()[:MAX_STRING]
            self.reply_chunk(NBD_REPLY_TYPE_ERROR, cookie, ERROR_PAYLOAD.pack(err, len(msg)) + msg)
        else:
            self.reply(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))

    def reply_block_status(self, cookie: int, descs: list[tuple[int, int]]) -> None:
        body = bytearray(U32.pack(BASE_ALLOCATION_ID))
        for dlen, state in descs:
            body += BLOCK_DESCRIPTOR.pack(dlen, state)
        self.reply_chunk(NBD_REPLY_TYPE_BLOCK_STATUS, cookie, body)
