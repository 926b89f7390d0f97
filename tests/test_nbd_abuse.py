"""The NBD server under abuse: resource exhaustion, shutdown under load, slow flushes,
and a raw-socket fuzzer against ``obd serve --nbd`` while real clients keep working.

Every server listens on 127.0.0.1; every process started here is stopped by its pid.
Run with ``pytest -s`` to see the figures (abuse cases, connections, fds, threads).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import random
import resource
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from obd.serve import nbd
from obd.serve.nbd import proto as N
from tests.nbd_helpers import (
    RawClient,
    RealClients,
    ServeProcess,
    image_of_raw,
    make_raw,
    proc_cpu_seconds,
    proc_fds,
    proc_rss,
    proc_status,
    proc_threads,
    require_tools,
    run,
    serve_config,
    wait_until,
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
            time.sleep(0.5)  # the server greets what it accepted at once
            accepted = [s for s in waiting if _handshake_started(s, 0.05)]
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


def test_thread_limit_refuses_one_connection_not_the_server(tmp_path: Path) -> None:
    """When no thread can start (address space exhausted), that connection is closed
    and the accept loop lives on: once memory is back, clients are served again."""
    cfg = writable_image(tmp_path, "th", "16M")
    with ServeProcess(["--listen", "127.0.0.1:0", f"{cfg}=th"]) as sp:
        pid = sp.pid
        vm = int(proc_status(pid)["VmSize"].split()[0]) * 1024
        soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
        resource.prlimit(pid, resource.RLIMIT_AS, (vm + 32 * MiB, hard))
        served: list[RawClient] = []
        refused = 0
        try:
            while len(served) < 64 and not refused:
                try:
                    served.append(RawClient(sp.port, "th", timeout=5))
                except ConnectionResetError:
                    refused += 1
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
        print(f"\nthread limit: {len(served)} connections served, then one refused")
        assert refused, "no connection was refused under the address-space limit"
        for c in served:
            assert c.write(0, b"t" * 512) == 0
            c.disconnect()
        late = RawClient(sp.port, "th")
        assert late.read(0, 512) == (0, b"t" * 512)
        late.disconnect()
        assert sp.stop() == 0, sp.stderr
    _no_traceback(sp.stderr)
    assert "can't start new thread" in sp.stderr


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

    read_plan = None  # every read goes through pread (the gate), not a send plan

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

SLOW_FSYNC = 1.0


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
    return nbd.Export("fl", open_image(str(cfg)))


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


# -- the fuzzer: raw-socket abuse of obd serve while real clients work ----------------------------

RW_SIZE = 64 * MiB
RO_SIZE = 16 * MiB
FUZZ_END = 16 * MiB  # [0, 16M): random requests, tracked by a model
QEMU = (16 * MiB, 24 * MiB)  # qemu-io writes and reads here all along
DROPPED = (24 * MiB, 32 * MiB)  # writes cut short aim here: nothing may land
KNOWN_OPTIONS = {1, 2, 3, 5, 6, 7, 8, 9, 10, 11}
ABUSE_SEED = int(os.environ.get("OBD_FUZZ_SEED", "8"))
SESSIONS = int(os.environ.get("OBD_FUZZ_SESSIONS", "500"))
MASS_CONNECTIONS = int(os.environ.get("OBD_FUZZ_CONNECTIONS", "2000"))


class Fuzz:
    """The state of one fuzzing run: the server, a seeded RNG, the models and counters."""

    def __init__(self, sp: ServeProcess, seed: int, lower: bytes, ro: bytes) -> None:
        self.sp = sp
        self.port = sp.port
        self.rng = random.Random(seed)
        self.lower = lower
        self.model = bytearray(lower)  # what the disk must read as (but qemu-io's region)
        self.ro = ro
        self.cases: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()

    # -- sockets --------------------------------------------------------------------------
    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        with self.lock:
            self.connections += 1
        return s

    def greet(self, cflags: int = 3) -> socket.socket:
        s = self.connect()
        got = _recv_exact(s, N.HANDSHAKE.size)
        assert N.HANDSHAKE.unpack(got)[:2] == (N.NBDMAGIC, N.IHAVEOPT)
        s.sendall(N.CLIENT_FLAGS.pack(cflags))
        return s

    def client(self, export: str = "rw", **kw: bool) -> RawClient:
        with self.lock:
            self.connections += 1
        return RawClient(self.port, export, **kw)

    def ranges_to_check(self) -> list[tuple[int, int]]:
        """Where the disk must equal the model at the end: all but qemu-io's region."""
        return [(0, QEMU[0]), (QEMU[1], RW_SIZE)]

    # -- expected answers (proto.md; our limits: blocks of 512, payloads up to 32 MiB) -----
    @staticmethod
    def expect(c: RawClient, ro: bool, cmd: int, flags: int, offset: int, length: int) -> set[int]:
        size = RO_SIZE if ro else RW_SIZE
        end = offset + length
        fua = 0 if ro else N.NBD_CMD_FLAG_FUA
        errs: set[int] = set()
        if cmd == N.NBD_CMD_READ:
            if flags & ~(fua | (N.NBD_CMD_FLAG_DF if c.structured else 0)):
                errs.add(N.NBD_EINVAL)
            if length > N.MAX_PAYLOAD:
                errs |= {N.NBD_EINVAL, N.NBD_EOVERFLOW}
            if end > size:
                errs.add(N.NBD_EINVAL)
        elif cmd in (N.NBD_CMD_WRITE, N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
            allowed = fua | (N.NBD_CMD_FLAG_NO_HOLE if cmd == N.NBD_CMD_WRITE_ZEROES else 0)
            if flags & ~allowed:
                errs.add(N.NBD_EINVAL)
            if ro:
                errs.add(N.NBD_EPERM)
            if end > size:
                errs.add(N.NBD_EINVAL if cmd == N.NBD_CMD_TRIM else N.NBD_ENOSPC)
            if (offset | length) % 512:
                errs.add(N.NBD_EINVAL)
        elif cmd == N.NBD_CMD_FLUSH:
            if flags & ~fua:
                errs.add(N.NBD_EINVAL)
        elif cmd == N.NBD_CMD_BLOCK_STATUS:
            meta = c.structured and c.meta
            if flags & ~(N.NBD_CMD_FLAG_REQ_ONE | fua) or not meta or not length or end > size:
                errs.add(N.NBD_EINVAL)
        else:
            errs.add(N.NBD_EINVAL)  # CACHE and unknown commands
        return errs or {0}

    def expected_bytes(self, ro: bool, offset: int, length: int) -> bytes | None:
        """What ``[offset, offset+length)`` must read as now, or None where qemu-io writes."""
        if ro:
            return self.ro[offset : offset + length]
        if offset < QEMU[1] and offset + length > QEMU[0]:
            return None
        return bytes(self.model[offset : offset + length])

    def apply(self, cmd: int, offset: int, length: int, payload: bytes) -> None:
        if cmd not in (N.NBD_CMD_WRITE, N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
            return
        assert offset + length <= QEMU[0] or offset >= DROPPED[1], (offset, length)
        if cmd == N.NBD_CMD_WRITE:
            self.model[offset : offset + length] = payload
        elif cmd in (N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
            self.model[offset : offset + length] = bytes(length)

    def still_serves(self) -> None:
        c = self.client("ro")
        at = self.rng.randrange(0, RO_SIZE - 8192, 512)
        assert c.read(at, 8192) == (0, self.ro[at : at + 8192])
        c.disconnect()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("closed")
        buf += chunk
    return buf


def _closed(s: socket.socket, timeout: float = 10) -> bool:
    """True when the server closes ``s`` within ``timeout`` (anything it sends is dropped)."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def _option(s: socket.socket, opt: int, data: bytes = b"") -> None:
    s.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, opt, len(data)) + data)


def _option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rtype, length = N.OPTION_REPLY.unpack(_recv_exact(s, N.OPTION_REPLY.size))
    assert magic == N.OPTION_REPLY_MAGIC, hex(magic)
    return opt, rtype, _recv_exact(s, length)


def _abort_acked(s: socket.socket) -> None:
    """The session still negotiates: ABORT gets its ACK, then the server closes."""
    _option(s, N.NBD_OPT_ABORT)
    assert _option_reply(s)[:2] == (N.NBD_OPT_ABORT, N.NBD_REP_ACK)
    assert _closed(s)


def _go_data(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return N.U32.pack(len(name)) + name + N.U16.pack(len(infos)) + b"".join(map(N.U16.pack, infos))


# Each handshake case gets the answer proto.md gives: an option error for a bad option,
# a dropped connection for a bad magic or unknown client flags (MUST), or for what
# cannot be answered (EXPORT_NAME of an unknown export, option data beyond any reason).


def h_close_at_once(f: Fuzz) -> None:
    f.connect().close()


def h_close_mid_greeting(f: Fuzz) -> None:
    s = f.connect()
    s.recv(f.rng.randint(1, 17))
    s.close()


def h_unknown_client_flags(f: Fuzz) -> None:
    s = f.greet(cflags=f.rng.randrange(4, 1 << 32))
    assert _closed(s), "unknown client flags must drop the connection"
    s.close()


def h_truncated_option_header(f: Fuzz) -> None:
    s = f.greet()
    s.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, N.NBD_OPT_GO, 10)[: f.rng.randint(1, 15)])
    s.close()


def h_bad_option_magic(f: Fuzz) -> None:
    s = f.greet()
    s.sendall(N.OPTION_HEADER.pack(f.rng.randrange(1 << 64), N.NBD_OPT_GO, 0))
    assert _closed(s)
    s.close()


def h_unknown_option(f: Fuzz) -> None:
    s = f.greet()
    opt = f.rng.choice([0, 4, 12, 13, 255, 1 << 31, (1 << 32) - 1, f.rng.randrange(12, 1 << 32)])
    assert opt not in KNOWN_OPTIONS
    _option(s, opt, f.rng.randbytes(f.rng.randint(0, 1024)))
    assert _option_reply(s)[:2] == (opt, N.NBD_REP_ERR_UNSUP)
    _abort_acked(s)


def h_option_length_absurd(f: Fuzz) -> None:
    s = f.greet()
    length = f.rng.choice([(1 << 32) - 1, 1 << 31, N.MAX_OPTION_SKIP + 1])
    opt = f.rng.choice([N.NBD_OPT_GO, N.NBD_OPT_LIST, 77])
    s.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, opt, length) + b"x" * 1000)
    assert _closed(s), "an absurd option length must end the connection"
    s.close()


def h_option_too_big(f: Fuzz) -> None:
    s = f.greet()
    n = f.rng.randint(N.MAX_OPTION_DATA + 1, 2 * MiB)
    opt = f.rng.choice([N.NBD_OPT_GO, N.NBD_OPT_INFO, N.NBD_OPT_LIST, 99])
    _option(s, opt, bytes(n))
    assert _option_reply(s)[:2] == (opt, N.NBD_REP_ERR_TOO_BIG)
    # the session goes on: GO works and the export reads right
    _option(s, N.NBD_OPT_GO, _go_data(b"ro"))
    while (r := _option_reply(s))[1] != N.NBD_REP_ACK:
        assert r[1] == N.NBD_REP_INFO, r
    s.sendall(N.REQUEST.pack(N.REQUEST_MAGIC, 0, N.NBD_CMD_READ, 1, 4096, 512))
    assert N.SIMPLE_REPLY.unpack(_recv_exact(s, 16)) == (N.SIMPLE_REPLY_MAGIC, 0, 1)
    assert _recv_exact(s, 512) == f.ro[4096:4608]
    s.close()


def h_export_name_too_long(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_EXPORT_NAME, b"r" * (N.MAX_OPTION_DATA + 1))
    assert _closed(s)
    s.close()


def h_option_data_cut_short(f: Fuzz) -> None:
    s = f.greet()
    s.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, N.NBD_OPT_GO, 100) + b"\0\0\0\2r")
    s.close()


def h_list_with_data(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_LIST, b"junk")
    assert _option_reply(s)[:2] == (N.NBD_OPT_LIST, N.NBD_REP_ERR_INVALID)
    _option(s, N.NBD_OPT_LIST)
    names = []
    while (r := _option_reply(s))[1] == N.NBD_REP_SERVER:
        names.append(r[2][4:].decode())
    assert r[1] == N.NBD_REP_ACK and sorted(names) == ["ro", "rw"]
    _abort_acked(s)


def h_go_garbage(f: Fuzz) -> None:
    s = f.greet()
    opt = f.rng.choice([N.NBD_OPT_GO, N.NBD_OPT_INFO])
    data = f.rng.randbytes(f.rng.randint(0, 64))
    _option(s, opt, data)
    r = _option_reply(s)
    assert r[0] == opt and r[1] in (N.NBD_REP_ERR_INVALID, N.NBD_REP_ERR_UNKNOWN), r
    _abort_acked(s)


def h_go_unknown_export(f: Fuzz) -> None:
    s = f.greet()
    name = f.rng.choice([b"nope", b"r" * 5000, "\u00e9t\u00e9".encode(), b"rw\0"])
    _option(s, N.NBD_OPT_GO, _go_data(name))
    r = _option_reply(s)
    assert r[1] in (N.NBD_REP_ERR_UNKNOWN, N.NBD_REP_ERR_INVALID, N.NBD_REP_ERR_TOO_BIG), r
    _abort_acked(s)


def h_starttls(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_STARTTLS)
    assert _option_reply(s)[1] in (N.NBD_REP_ERR_UNSUP, N.NBD_REP_ERR_POLICY)
    _abort_acked(s)


def h_meta_before_structured(f: Fuzz) -> None:
    s = f.greet()
    q = N.BASE_ALLOCATION.encode()
    _option(s, N.NBD_OPT_SET_META_CONTEXT, N.U32.pack(2) + b"rw" + N.U32.pack(1) + N.U32.pack(len(q)) + q)  # fmt: skip
    assert _option_reply(s)[1] == N.NBD_REP_ERR_INVALID
    _abort_acked(s)


def h_structured_twice(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_STRUCTURED_REPLY)
    assert _option_reply(s)[1] == N.NBD_REP_ACK
    _option(s, N.NBD_OPT_STRUCTURED_REPLY, f.rng.choice([b"", b"x"]))
    assert _option_reply(s)[1] == N.NBD_REP_ERR_INVALID
    _abort_acked(s)


def h_meta_garbage(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_STRUCTURED_REPLY)
    assert _option_reply(s)[1] == N.NBD_REP_ACK
    opt = f.rng.choice([N.NBD_OPT_LIST_META_CONTEXT, N.NBD_OPT_SET_META_CONTEXT])
    _option(s, opt, f.rng.randbytes(f.rng.randint(0, 40)))
    r = _option_reply(s)
    while r[1] == N.NBD_REP_META_CONTEXT:  # garbage that parses: still a whole answer
        r = _option_reply(s)
    assert r[1] in (N.NBD_REP_ACK, N.NBD_REP_ERR_INVALID, N.NBD_REP_ERR_UNKNOWN), r
    _abort_acked(s)


def h_export_name_unknown(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_EXPORT_NAME, b"nope")
    assert _closed(s), "EXPORT_NAME of an unknown export must end the session"
    s.close()


def h_many_options(f: Fuzz) -> None:
    s = f.greet()
    for _ in range(200):
        _option(s, 1000)
        assert _option_reply(s)[1] == N.NBD_REP_ERR_UNSUP
    _abort_acked(s)


def h_talk_after_abort(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_ABORT)
    with contextlib.suppress(OSError):
        _option(s, N.NBD_OPT_LIST)
    assert _closed(s)
    s.close()


def h_drop_mid_option_reply(f: Fuzz) -> None:
    s = f.greet()
    _option(s, N.NBD_OPT_GO, _go_data(b"rw", (N.NBD_INFO_NAME, N.NBD_INFO_DESCRIPTION)))
    _linger0(s)
    s.close()


def _linger0(s: socket.socket) -> None:
    """Close with a reset instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# Transmission: every bad request gets an error reply and the connection goes on, except
# a bad magic and a WRITE longer than we take (its payload cannot be skipped): dropped.


def t_bad_request_magic(f: Fuzz) -> None:
    c = f.client()
    c.send_request(N.NBD_CMD_READ, 0, 512, magic=f.rng.randrange(1 << 32) | 1)
    assert c.closed_by_server(10)
    c.close()


def t_bad_requests(f: Fuzz) -> None:
    """One of each bad request, all pipelined; then good ones on the same connection."""
    structured = f.rng.random() < 0.5
    c = f.client(structured=structured, meta=structured)
    bad = [
        (N.NBD_CMD_READ, 0, N.MAX_PAYLOAD + 512, 0, b""),
        (N.NBD_CMD_READ, RW_SIZE - 512, 1024, 0, b""),
        (N.NBD_CMD_READ, 1 << 63, 512, 0, b""),
        (N.NBD_CMD_READ, (1 << 64) - 512, 1024, 0, b""),  # offset + length wraps
        (N.NBD_CMD_READ, 0, 0xFFFFFFFF, 0, b""),
        (N.NBD_CMD_WRITE, RW_SIZE, 4096, 0, b"x" * 4096),
        (N.NBD_CMD_WRITE, 512 + 3, 512, 0, b"x" * 512),
        (N.NBD_CMD_WRITE, 0, 100, 0, b"x" * 100),
        (N.NBD_CMD_TRIM, RW_SIZE - 512, 1024, 0, b""),
        (N.NBD_CMD_WRITE_ZEROES, RW_SIZE, 512, 0, b""),
        (N.NBD_CMD_WRITE_ZEROES, 0, 512, N.NBD_CMD_FLAG_FAST_ZERO, b""),
        (N.NBD_CMD_CACHE, 0, 512, 0, b""),
        (N.NBD_CMD_BLOCK_STATUS, 0, 0, 0, b""),
        (N.NBD_CMD_BLOCK_STATUS, RW_SIZE, 512, 0, b""),
        (f.rng.randrange(8, 1 << 16), 0, 512, 0, b""),
        (N.NBD_CMD_READ, 0, 512, 1 << f.rng.randrange(5, 16), b""),
        (N.NBD_CMD_FLUSH, 1, 1, f.rng.choice([2, 4, 8, 16, 1 << 15]), b""),
    ]
    for cmd, off, length, flags, data in bad:
        want = f.expect(c, False, cmd, flags, off, length)
        assert want != {0}, (cmd, off, length, flags)
        cookie = c.send_request(cmd, off, length, flags, data)
        r = c.reply()
        assert r.cookie == cookie and r.error in want, (cmd, off, length, flags, r, want)
        f.answers[f"error {r.error}"] += 1
    # FUA is valid on every command of a writable export (NBD_FLAG_SEND_FUA)
    for cmd, length in ((N.NBD_CMD_READ, 512), (N.NBD_CMD_FLUSH, 0), (N.NBD_CMD_BLOCK_STATUS, 512)):
        if cmd == N.NBD_CMD_BLOCK_STATUS and not structured:
            continue
        c.send_request(cmd, 0, length, N.NBD_CMD_FLAG_FUA)
        assert c.reply().error == 0, f"FUA refused on command {cmd}"
    c.send_request(N.NBD_CMD_READ, 0, 4096)
    assert c.reply() == (c.cookie, 0, f.expected_bytes(False, 0, 4096), ())
    c.disconnect()
    ro = f.client("ro")
    for cmd, flags in ((N.NBD_CMD_WRITE, 0), (N.NBD_CMD_TRIM, 0), (N.NBD_CMD_WRITE_ZEROES, 0), (N.NBD_CMD_READ, N.NBD_CMD_FLAG_FUA)):  # fmt: skip
        want = f.expect(ro, True, cmd, flags, 0, 512)
        ro.send_request(cmd, 0, 512, flags, b"x" * 512 if cmd == N.NBD_CMD_WRITE else b"")
        assert ro.reply().error in want
    ro.send_request(N.NBD_CMD_FLUSH, 0, 0)
    assert ro.reply().error == 0
    ro.disconnect()


def t_oversized_write(f: Fuzz) -> None:
    c = f.client()
    c.send_request(N.NBD_CMD_WRITE, DROPPED[0], N.MAX_PAYLOAD + 512, 0, b"o" * 65536)
    assert c.closed_by_server(10), "a WRITE over the limit must end the connection"
    c.close()


def t_truncated_request(f: Fuzz) -> None:
    c = f.client()
    c.sock.sendall(N.REQUEST.pack(N.REQUEST_MAGIC, 0, N.NBD_CMD_READ, 1, 0, 512)[: f.rng.randint(1, 27)])  # fmt: skip
    c.close()


def t_write_cut_short(f: Fuzz) -> None:
    c = f.client()
    at = f.rng.randrange(DROPPED[0], DROPPED[1] - MiB, 512)
    c.send_request(N.NBD_CMD_WRITE, at, MiB, f.rng.choice([0, N.NBD_CMD_FLAG_FUA]), b"c" * f.rng.randint(0, MiB - 1))  # fmt: skip
    if f.rng.random() < 0.5:
        _linger0(c.sock)
    c.close()


def t_drop_mid_reply(f: Fuzz) -> None:
    structured = f.rng.random() < 0.5
    c = f.client(structured=structured)
    for _ in range(f.rng.randint(1, 4)):
        c.send_request(N.NBD_CMD_READ, f.rng.randrange(0, RW_SIZE - N.MAX_PAYLOAD, 512), N.MAX_PAYLOAD)  # fmt: skip
    c.sock.recv(f.rng.randint(1, 1 << 20))
    if f.rng.random() < 0.5:
        _linger0(c.sock)
    c.close()


def t_disc_with_requests_pending(f: Fuzz) -> None:
    c = f.client()
    at = f.rng.randrange(0, FUZZ_END - 64 * 4096, 4096)
    blobs = [f.rng.randbytes(4096) for _ in range(16)]
    cookies = [c.send_request(N.NBD_CMD_WRITE, at + i * 4096, 4096, 0, b) for i, b in enumerate(blobs)]  # fmt: skip
    for i, b in enumerate(blobs):
        f.apply(N.NBD_CMD_WRITE, at + i * 4096, 4096, b)
    c.send_request(N.NBD_CMD_DISC, 0, 0)
    got = sorted(c.reply().cookie for _ in cookies)  # every one answered before the close
    assert got == cookies
    assert c.closed_by_server(10)
    c.close()


def t_garbage_stream(f: Fuzz) -> None:
    c = f.client()
    c.sock.sendall(f.rng.randbytes(f.rng.randint(1, 4096)))
    assert c.closed_by_server(10)
    c.close()


HANDSHAKE_CASES = [v for k, v in sorted(globals().items()) if k.startswith("h_")]
TRANSMISSION_CASES = [v for k, v in sorted(globals().items()) if k.startswith("t_")]


READS = (N.NBD_CMD_READ, N.NBD_CMD_BLOCK_STATUS)


def _random_request(f: Fuzz, c: RawClient, ro: bool) -> tuple[int, int, int, int, bytes]:
    rng = f.rng
    size = RO_SIZE if ro else RW_SIZE
    cmd = rng.choices(
        [N.NBD_CMD_READ, N.NBD_CMD_WRITE, N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES,
         N.NBD_CMD_FLUSH, N.NBD_CMD_BLOCK_STATUS, N.NBD_CMD_CACHE, rng.randrange(8, 1 << 16)],
        [30, 25, 8, 8, 6, 8, 3, 4],
    )[0]  # fmt: skip
    where = rng.random()
    if where < 0.75:  # aligned, in the fuzzed region (or anywhere for reads)
        top = FUZZ_END if cmd != N.NBD_CMD_READ or ro else size
        top = min(top, size)
        length = 512 * rng.randint(0 if rng.random() < 0.05 else 1, 512)
        offset = rng.randrange(0, top - length + 1, 512)
    elif where < 0.85:  # unaligned
        length = rng.randint(1, 65536)
        offset = rng.randrange(0, FUZZ_END - length)
    elif where < 0.95:  # around the end
        length = 512 * rng.randint(1, 64) - rng.choice([0, 0, 1])
        offset = size - rng.randint(0, 65536)
    else:  # far past the end, or lengths past any limit
        length = rng.choice([N.MAX_PAYLOAD + 512, 0xFFFFFFFF, 512])
        offset = rng.choice([size, 1 << 62, (1 << 64) - 512, 0 if cmd in READS else size])
    if cmd == N.NBD_CMD_WRITE:
        length = min(length, 256 << 10)  # a WRITE's payload is sent: keep it small
    valid = {
        N.NBD_CMD_READ: [0, N.NBD_CMD_FLAG_DF if c.structured else 0],
        N.NBD_CMD_WRITE: [0, N.NBD_CMD_FLAG_FUA],
        N.NBD_CMD_TRIM: [0, N.NBD_CMD_FLAG_FUA],
        N.NBD_CMD_WRITE_ZEROES: [0, N.NBD_CMD_FLAG_NO_HOLE, N.NBD_CMD_FLAG_FUA],
        N.NBD_CMD_BLOCK_STATUS: [0, N.NBD_CMD_FLAG_REQ_ONE],
    }.get(cmd, [0])
    flags = rng.choice(valid) if rng.random() < 0.9 else rng.randrange(1 << 16)
    payload = rng.randbytes(length) if cmd == N.NBD_CMD_WRITE else b""
    return cmd, flags, offset, length, payload


def _random_session(f: Fuzz) -> None:
    rng = f.rng
    ro = rng.random() < 0.2
    structured = rng.random() < 0.5
    c = f.client(
        "ro" if ro else "rw", structured=structured, meta=structured and rng.random() < 0.7
    )
    for _ in range(rng.randint(1, 6)):
        sent: dict[int, tuple[int, int, int, int, set[int], bytes | None]] = {}
        for _ in range(rng.randint(1, 12)):
            cmd, flags, offset, length, payload = _random_request(f, c, ro)
            want = f.expect(c, ro, cmd, flags, offset, length)
            expected: bytes | None = None
            if want == {0} and cmd in (N.NBD_CMD_READ, N.NBD_CMD_BLOCK_STATUS):
                expected = f.expected_bytes(ro, offset, length)
            cookie = c.send_request(cmd, offset, length, flags, payload)
            sent[cookie] = (cmd, flags, offset, length, want, expected)
            if want == {0} and not ro:
                f.apply(cmd, offset, length, payload)  # a sequential server runs in order
        for _ in sent:
            r = c.reply()
            cmd, flags, offset, length, want, expected = sent[r.cookie]
            assert r.error in want, (N.COMMAND_NAMES.get(cmd, cmd), flags, offset, length, r.error, want)  # fmt: skip
            f.answers["ok" if not r.error else f"error {r.error}"] += 1
            if cmd == N.NBD_CMD_READ and not r.error and expected is not None:
                assert r.data == expected, f"READ {offset}+{length} returned wrong bytes"
            if cmd == N.NBD_CMD_BLOCK_STATUS and not r.error:
                assert not (flags & N.NBD_CMD_FLAG_REQ_ONE) or len(r.extents) == 1
                pos = offset
                for n, state in r.extents:
                    if state & N.NBD_STATE_ZERO and expected is not None:
                        part = expected[pos - offset : pos - offset + n]
                        assert part == bytes(len(part)), f"{pos}+{n} said zero, holds data"
                    pos += n
        f.requests += len(sent)
    if rng.random() < 0.7:
        c.disconnect()
    else:
        c.close()


def _mass_connections(f: Fuzz, count: int) -> collections.Counter[str]:
    """``count`` connections opened and dropped at every stage, from 8 threads."""
    kinds: collections.Counter[str] = collections.Counter()
    errors: list[BaseException] = []
    per = count // 8

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(per):
                kind = rng.choice(["at once", "reset", "after greeting", "after flags", "after GO", "mid read"])  # fmt: skip
                s = socket.create_connection(("127.0.0.1", f.port), timeout=10)
                try:
                    if kind == "reset":
                        _linger0(s)
                    elif kind != "at once":
                        _recv_exact(s, N.HANDSHAKE.size)
                        if kind != "after greeting":
                            s.sendall(N.CLIENT_FLAGS.pack(3))
                        if kind in ("after GO", "mid read"):
                            _option(s, N.NBD_OPT_GO, _go_data(b"ro"))
                        if kind == "mid read":
                            while _option_reply(s)[1] != N.NBD_REP_ACK:
                                pass
                            s.sendall(N.REQUEST.pack(N.REQUEST_MAGIC, 0, N.NBD_CMD_READ, 1, 0, MiB))  # fmt: skip
                            _linger0(s)
                finally:
                    s.close()
                with f.lock:
                    kinds[kind] += 1
                    f.connections += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ABUSE_SEED * 100 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    return kinds


def test_fuzz_obd_serve_while_real_clients_work(tmp_path: Path) -> None:
    """Raw-socket abuse of a real ``obd serve --nbd``: every case gets the protocol's
    answer; qemu-io and nbdcopy keep working on the same exports all along; afterwards
    the server holds no extra thread or descriptor and logged no traceback, and the
    fuzzed region reads back (and, after the server stopped, is on disk) as the model."""
    require_tools("qemu-io", "nbdcopy")
    rng = random.Random(ABUSE_SEED)
    lower_chunks = {0: rng.randbytes(4 * MiB), 20 * MiB: rng.randbytes(2 * MiB),
                    26 * MiB: rng.randbytes(2 * MiB), 40 * MiB: rng.randbytes(MiB),
                    RW_SIZE - MiB: rng.randbytes(MiB)}  # fmt: skip
    lower = bytearray(RW_SIZE)
    for off, b in lower_chunks.items():
        lower[off : off + len(b)] = b
    ro_chunks = {0: rng.randbytes(MiB), 5 * MiB: rng.randbytes(3 * MiB), RO_SIZE - 4096: rng.randbytes(4096)}  # fmt: skip
    ro = bytearray(RO_SIZE)
    for off, b in ro_chunks.items():
        ro[off : off + len(b)] = b
    rw_cfg = image_of_raw(tmp_path, "rw", Path(make_raw(str(tmp_path / "rw.raw"), RW_SIZE, lower_chunks)), writable=True)  # fmt: skip
    ro_cfg = image_of_raw(tmp_path, "ro", Path(make_raw(str(tmp_path / "ro.raw"), RO_SIZE, ro_chunks)), writable=False)  # fmt: skip
    gcfg = serve_config(tmp_path)
    args = ["--listen", "127.0.0.1:0", "--config", str(gcfg), f"{rw_cfg}=rw", f"{ro_cfg}=ro"]
    t_start = time.monotonic()
    with ServeProcess(args) as sp:
        pid = sp.pid
        threads0, fds0, rss0 = proc_threads(pid), proc_fds(pid), proc_rss(pid)
        f = Fuzz(sp, ABUSE_SEED, bytes(lower), bytes(ro))
        ro_digest = hashlib.sha256(ro).hexdigest()
        real = RealClients(
            sp.uri("rw"), QEMU[0], sp.uri("ro"), tmp_path / "copy.raw",
            lambda out: hashlib.sha256(out).hexdigest() == ro_digest,
        )  # fmt: skip
        try:
            for rnd in range(3):
                for case in HANDSHAKE_CASES + TRANSMISSION_CASES:
                    try:
                        case(f)
                    except AssertionError as e:
                        raise AssertionError(f"{case.__name__} (round {rnd}): {e}") from e
                    f.cases[case.__name__] += 1
                f.still_serves()
            for i in range(SESSIONS):
                try:
                    _random_session(f)
                except AssertionError as e:
                    raise AssertionError(f"random session {i} (seed {ABUSE_SEED}): {e}") from e
                f.cases["random session"] += 1
            mass = _mass_connections(f, MASS_CONNECTIONS)
            f.cases["mass connection"] += sum(mass.values())
            f.still_serves()
        finally:
            real.halt()
        real.check()
        # what the fuzz wrote reads back; nothing of the writes cut short landed
        assert f.model[DROPPED[0] : DROPPED[1]] == lower[DROPPED[0] : DROPPED[1]]
        c = f.client("rw")
        for start, end in f.ranges_to_check():
            for at in range(start, end, 4 * MiB):
                assert c.read(at, 4 * MiB) == (0, bytes(f.model[at : at + 4 * MiB])), at
        c.disconnect()
        run(real.qemu_io_check())
        # the server is back to where it started: no thread, no descriptor left behind
        settled = wait_until(lambda: (proc_threads(pid), proc_fds(pid)) == (threads0, fds0), 20)
        threads1, fds1, rss1 = proc_threads(pid), proc_fds(pid), proc_rss(pid)
        print(
            f"\nNBD abuse: {sum(f.cases.values())} cases "
            f"({sum(n for k, n in f.cases.items() if k.startswith(('h_', 't_')))} scripted over "
            f"{len(HANDSHAKE_CASES) + len(TRANSMISSION_CASES)} kinds, "
            f"{f.cases['random session']} random sessions with {f.requests} requests, "
            f"{f.cases['mass connection']} connections opened and dropped), "
            f"{f.connections} connections in all, in {time.monotonic() - t_start:.0f} s\n"
            f"  answers: {dict(sorted(f.answers.items()))}\n"
            f"  mass connections: {dict(sorted(mass.items()))}\n"
            f"  real clients alongside: {dict(real.runs)}, all right\n"
            f"  server threads {threads0} -> {threads1}, fds {fds0} -> {fds1}, "
            f"RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB"
        )
        assert settled, f"threads {threads0} -> {threads1}, fds {fds0} -> {fds1}"
        assert sp.stop() == 0, sp.stderr
    log = (tmp_path / "obd.log").read_text()
    _no_traceback(sp.stderr, log)
    assert not [ln for ln in log.splitlines() if "|ERROR|" in ln or "|FATAL|" in ln]
    # after a clean stop the fuzzed region is on disk as the model says
    from obd.image import open_image

    with open_image(str(rw_cfg), readonly=True) as img:
        for start, end in f.ranges_to_check():
            assert img.pread(start, end - start) == f.model[start:end], start
