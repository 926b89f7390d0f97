"""The NBD server: listeners, the accept loop, the connections and their shutdown."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Mapping, Sequence

from obd.errors import FileAccessError, UsageError
from obd.serve.nbd.connection import Connection
from obd.serve.nbd.export import Export, ReadHook

log = logging.getLogger("obd.serve.nbd")

ACCEPT_BACKOFF = (0.01, 1.0)  # first and longest wait after a failed accept (EMFILE...)
SHUTDOWN_GRACE = 5.0  # after the shutdown timeout: wait for device calls in flight


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
        self._conns: set[Connection] = set()
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
            conn = Connection(self, sock, peer)
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

    def forget(self, conn: Connection) -> None:
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
