"""A connection's socket: buffered reads, gathered replies.

Reads go through a buffer: one ``recv`` can bring many pipelined requests. While
requests are waiting in it, replies are gathered and go out together, in one
``sendmsg``, just before the next ``recv`` would block.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Sequence

from obd.io.base import FileRange

Buffer = bytes | bytearray | memoryview


class ClientGone(Exception):
    """The peer closed the connection or broke the protocol: end this connection."""


class Wire:
    """Buffered reads and gathered sends over one socket.

    Only the connection's reader thread reads and gathers; replies from other threads
    hold ``send_lock`` and go out at once (after what is already gathered).
    """

    RBUF = 256 << 10
    PENDING_MAX = 1 << 20  # gathered reply bytes that are sent without waiting longer
    PENDING_PARTS = 512

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.gather = False  # set in the sequential transmission loop only
        self._rbuf = bytearray(self.RBUF)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._pending: list[Buffer] = []
        self._pending_bytes = 0

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the buffer, then the socket; ClientGone at end of stream."""
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
            if want - got >= self.RBUF // 2:
                n = sock.recv_into(view[got:])  # a large payload: straight into place
                if n == 0:
                    raise ClientGone("connection closed by peer")
                got += n
                continue
            n = sock.recv_into(self._rview)
            if n == 0:
                raise ClientGone("connection closed by peer")
            take = min(n, want - got)
            view[got : got + take] = self._rview[:take]
            got += take
            self._rstart, self._rend = take, n

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            self.recv_into(memoryview(buf))
        return bytes(buf)

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        scratch = memoryview(bytearray(min(n, 64 << 10)))
        while n > 0:
            take = min(n, len(scratch))
            self.recv_into(scratch[:take])
            n -= take

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self._rend - self._rstart

    def flush_replies(self) -> None:
        """Send the gathered replies now."""
        if self._pending:  # only this connection's reader thread adds to it
            with self.send_lock:
                parts, self._pending, self._pending_bytes = self._pending, [], 0
                self.sendmsg(parts)

    def send(self, *parts: Buffer) -> None:
        """Send ``parts`` as one message (callers hold ``send_lock`` in transmission).

        When requests are already waiting in the receive buffer (and replies may be
        gathered), the parts join the pending replies instead.
        """
        if self.gather or self._pending:  # never overtake replies already gathered
            self._pending.extend(parts)
            self._pending_bytes += sum(len(p) for p in parts)
            if (
                self.gather
                and self._pending_bytes < self.PENDING_MAX
                and len(self._pending) < self.PENDING_PARTS
            ):
                return
            parts = tuple(self._pending)
            self._pending, self._pending_bytes = [], 0
        self.sendmsg(parts)

    def sendmsg(self, parts: Sequence[Buffer], flags: int = 0) -> None:
        """Send every byte of ``parts`` (one ``sendmsg``, then ``sendall`` for a rest)."""
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts, (), flags)
        if sent == total:
            return
        # Partial send: finish with sendall over what is left.
        for p in parts:
            if sent >= len(p):
                sent -= len(p)
                continue
            self.sock.sendall(memoryview(p)[sent:], flags)
            sent = 0

    def send_with_files(self, head: Buffer, parts: Sequence[Buffer | FileRange]) -> None:
        """Send ``head`` and then ``parts``, file ranges straight from their files with
        ``os.sendfile`` (callers hold ``send_lock``; gathered replies go first).

        A file range that ends early cannot be answered with an error any more (its reply
        header is on the wire): that raises ``OSError``, which ends the connection.
        """
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self.sendmsg(pending)
        out = self.sock.fileno()
        more = getattr(socket, "MSG_MORE", 0)
        buf: list[Buffer] = [head]
        for p in parts:
            if not isinstance(p, FileRange):
                buf.append(p)
                continue
            self.sendmsg(buf, more)
            buf = []
            off, left = p.offset, p.length
            while left:
                n = os.sendfile(out, p.fd, off, left)
                if n == 0:
                    raise OSError(errno.EIO, f"file ended at {off} inside a range to send")
                off += n
                left -= n
        if buf:
            self.sendmsg(buf)
