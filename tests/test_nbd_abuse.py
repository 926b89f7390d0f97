"""The NBD server under abuse: resource exhaustion, shutdown under load, slow flushes,
and a raw-socket fuzzer against ``obd serve --nbd`` while real clients keep working.

Every server listens on 127.0.0.1; every process started here is stopped by its pid.
Run with ``pytest -s`` to see the figures (abuse cases, connections, fds, threads).
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from obd.serve import nbd as N
from tests.nbd_helpers import (
    RawClient,
    ServeProcess,
    make_raw,
    proc_cpu_seconds,
    proc_fds,
    serve_config,
    writable_image,
)

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Exception in thread" not in text, text[-4000:]


# -- accept under EMFILE ------------------------------------------------------------------------


def _handshake_started(sock: socket.socket, timeout: float) -> bool:
    """True when the server sent its NBD greeting on ``sock`` within ``timeout``."""
    sock.settimeout(timeout)
    try:
        data = b""
        while len(data) < N.HANDSHAKE.size:
            chunk = sock.recv(N.HANDSHAKE.size - len(data))
            if not chunk:
                return False
            data += chunk
    except (TimeoutError, OSError):
        return False
    return N.HANDSHAKE.unpack(data)[:2] == (N.NBDMAGIC, N.IHAVEOPT)


def test_accept_backs_off_when_out_of_file_descriptors(tmp_path: Path) -> None:
    """At EMFILE the accept loop waits instead of spinning; connected clients are still
    served, and waiting clients are accepted once descriptors are free again."""
    cfg = writable_image(tmp_path, "fd", "16M")
    gcfg = serve_config(tmp_path)
    with ServeProcess(["--listen", "127.0.0.1:0", "--config", str(gcfg), f"{cfg}=fd"]) as sp:
        pid = sp.pid
        served = [RawClient(sp.port, "fd") for _ in range(3)]
        for i, c in enumerate(served):
            assert c.write(i * 4096, bytes([i + 1]) * 4096) == 0
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (proc_fds(pid) + 4, hard))
        waiting: list[socket.socket] = []
        try:
            # 4 more connections fit; the rest wait in the listen backlog at EMFILE
            for _ in range(12):
                waiting.append(socket.create_connection(("127.0.0.1", sp.port), timeout=5))
            accepted = [s for s in waiting if _handshake_started(s, 0.5)]
            pending = [s for s in waiting if s not in accepted]
            assert len(accepted) <= 4 and pending, (len(accepted), len(pending))
            cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
            time.sleep(2.0)
            cpu = proc_cpu_seconds(pid) - cpu0
            wall = time.monotonic() - t0
            print(f"\nEMFILE: {len(accepted)} accepted, {len(pending)} waiting; "
                  f"server CPU {cpu:.2f} s in {wall:.2f} s")  # fmt: skip
            assert cpu < 0.3 * wall, f"the accept loop burns CPU at EMFILE: {cpu:.2f} s"
            # clients connected before keep being served
            for i, c in enumerate(served):
                assert c.read(i * 4096, 4096) == (0, bytes([i + 1]) * 4096)
            # free descriptors: the waiting clients are accepted and greeted
            for s in accepted:
                s.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (proc_fds(pid) + 64, hard))
            assert all(_handshake_started(s, 5.0) for s in pending)
        finally:
            for s in waiting:
                s.close()
            for c in served:
                c.disconnect()
        assert sp.stop() == 0, sp.stderr
    log = (tmp_path / "obd.log").read_text()
    _no_traceback(sp.stderr, log)
    warnings = [ln for ln in log.splitlines() if "open files" in ln]
    assert 1 <= len(warnings) <= 3, warnings  # said once, not once per retry


# -- shutdown timeout -----------------------------------------------------------------------------


class _GatedDevice:
    """A real image whose reads wait at a gate once ``armed``: a stand-in for a slow disk."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.events: list[str] = []
        self.results: list[bytes | BaseException] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def readonly(self) -> bool:
        return bool(self.inner.readonly)  # type: ignore[attr-defined]

    def pread(self, offset: int, length: int) -> bytes:
        if not self.armed:
            return self.inner.pread(offset, length)  # type: ignore[attr-defined, no-any-return]
        self.events.append("read-start")
        self.entered.set()
        self.gate.wait(20)
        try:
            data: bytes = self.inner.pread(offset, length)  # type: ignore[attr-defined]
        except BaseException as e:
            self.results.append(e)
            raise
        finally:
            self.events.append("read-end")
        self.results.append(data)
        return data

    def close(self) -> None:
        self.events.append("close")
        self.inner.close()  # type: ignore[attr-defined]


def test_shutdown_timeout_cuts_connections_before_closing_devices(tmp_path: Path) -> None:
    """A read still running when the shutdown timeout ends: its connection is cut at
    once, but the device is closed only after the read is done (never under it, where
    a reused descriptor would hand the read another file's bytes)."""
    from obd.image import open_image
    from obd.serve import ImageSpec, NbdService
    from tests.nbd_helpers import image_of_raw

    content = os.urandom(MiB)
    raw = Path(make_raw(str(tmp_path / "lower.raw"), 4 * MiB, {0: content}))
    cfg = image_of_raw(tmp_path, "slow", raw, writable=False)
    devices: list[_GatedDevice] = []

    def opener(path: str) -> _GatedDevice:
        devices.append(_GatedDevice(open_image(path)))
        return devices[-1]

    svc = NbdService([ImageSpec(str(cfg), "slow")], tcp=("127.0.0.1", 0), opener=opener)  # type: ignore[arg-type]
    port = int(svc.start()[0].rsplit(":", 1)[1])
    dev = devices[0]
    decoys: list[int] = []
    stopper: threading.Thread | None = None
    try:
        client = RawClient(port, "slow")
        dev.armed = True
        client.send_request(N.NBD_CMD_READ, 0, MiB)
        assert dev.entered.wait(10)
        t0 = time.monotonic()
        stopper = threading.Thread(target=svc.stop, kwargs={"timeout": 0.5})
        stopper.start()
        # the connection is cut right after the timeout, not when the read ends
        assert client.closed_by_server(timeout=5), "the connection was not cut"
        cut_after = time.monotonic() - t0
        assert cut_after < 3, cut_after
        time.sleep(0.5)
        # grab any descriptor a premature close freed, with other bytes in it
        for i in range(8):
            path = tmp_path / f"decoy{i}"
            path.write_bytes(b"\xee" * MiB)
            decoys.append(os.open(path, os.O_RDONLY))
        assert "close" not in dev.events, f"device closed under a running read: {dev.events}"
        dev.gate.set()
        stopper.join(20)
        assert not stopper.is_alive()
        assert dev.events == ["read-start", "read-end", "close"], dev.events
        assert dev.results == [content], "the late read returned wrong bytes"
    finally:
        dev.gate.set()
        if stopper is not None:
            stopper.join(20)
        svc.stop()
        for fd in decoys:
            os.close(fd)


# -- FLUSH and FUA: durable before the reply, never in the way of reads -------------------------

SLOW_FSYNC = 1.5


@pytest.fixture
def slow_fsync(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Every fsync of a local file takes SLOW_FSYNC seconds; returns (start, end) times."""
    from obd.io.file import LocalFile

    calls: list[tuple[float, float]] = []
    real = LocalFile.flush

    def flush(self: LocalFile) -> None:
        t0 = time.monotonic()
        time.sleep(SLOW_FSYNC)
        real(self)
        calls.append((t0, time.monotonic()))

    monkeypatch.setattr(LocalFile, "flush", flush)
    return calls


@pytest.fixture
def rw_export(tmp_path: Path):  # type: ignore[no-untyped-def]
    from obd.image import open_image

    cfg = writable_image(tmp_path, "fl", "16M")
    return N.Export("fl", open_image(str(cfg)))


def _timed_read(port: int, offset: int, want: bytes) -> float:
    c = RawClient(port, "fl")
    try:
        t0 = time.monotonic()
        assert c.read(offset, len(want)) == (0, want)
        return time.monotonic() - t0
    finally:
        c.disconnect()


@pytest.mark.parametrize("workers", [0, 2])
def test_reads_proceed_while_a_flush_runs(rw_export, slow_fsync, workers: int) -> None:  # type: ignore[no-untyped-def]
    from tests.nbd_helpers import in_process_server

    with in_process_server([rw_export], workers=workers) as (_, port):
        c = RawClient(port, "fl")
        assert c.write(0, b"d" * 4096) == 0
        c.send_request(N.NBD_CMD_FLUSH, 0, 0)
        time.sleep(0.2)  # the flush is in its slow fsync now
        # another connection reads at once
        assert _timed_read(port, 0, b"d" * 4096) < SLOW_FSYNC / 2
        # and so does the flushing connection itself: the read's reply comes first
        t0 = time.monotonic()
        cookie = c.send_request(N.NBD_CMD_READ, 0, 4096)
        err, got = c.simple_reply()
        assert (err, got) == (0, cookie), "the read waited behind the flush"
        assert c.recv(4096) == b"d" * 4096
        assert time.monotonic() - t0 < SLOW_FSYNC / 2
        assert c.simple_reply() == (0, cookie - 1)  # then the flush
        c.disconnect()


def test_flush_reply_covers_every_write_acknowledged_before_it(rw_export, slow_fsync) -> None:  # type: ignore[no-untyped-def]
    """FLUSH 1 is in its fsync when a write is acknowledged and FLUSH 2 arrives: FLUSH 2
    must wait for an fsync that started after that write, not share FLUSH 1's."""
    from tests.nbd_helpers import in_process_server

    with in_process_server([rw_export]) as (_, port):
        a, b = RawClient(port, "fl"), RawClient(port, "fl")
        f1 = a.send_request(N.NBD_CMD_FLUSH, 0, 0)
        time.sleep(0.2)
        assert b.write(8192, b"w" * 4096) == 0
        acked = time.monotonic()
        f2 = a.send_request(N.NBD_CMD_FLUSH, 0, 0)
        fua = b.send_request(N.NBD_CMD_WRITE, 12288, 4096, N.NBD_CMD_FLAG_FUA, b"f" * 4096)
        replies = {a.simple_reply()[1]: time.monotonic(), a.simple_reply()[1]: time.monotonic()}
        assert b.simple_reply() == (0, fua)
        fua_done = time.monotonic()
        assert set(replies) == {f1, f2}
        covering = [s for s, e in slow_fsync if s >= acked and e <= replies[f2]]
        assert covering, f"FLUSH 2 answered without an fsync after the write ({slow_fsync})"
        assert [s for s, e in slow_fsync if s >= acked and e <= fua_done]
        a.disconnect()
        b.disconnect()
