"""Fixtures for the NBD tests: in-process servers, ``obd serve`` processes, a raw client.

Every server listens on 127.0.0.1 or a Unix socket; everything started here is stopped
by its pid, with timeouts.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from obd.serve import nbd
from obd.serve.nbd import proto as N

REPO = Path(__file__).resolve().parent.parent


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (apt-get install qemu-utils libnbd-bin fuse3)"
        )


def kernel_mount_ready() -> str | None:
    """Why this process cannot attach an NBD export as a loop device and mount it, or None."""
    if os.geteuid() != 0:
        return "mounting needs root (losetup, mount)"
    for tool in ("nbdfuse", "losetup", "mount", "umount", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install libnbd-bin fuse3 util-linux)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or no loop devices"
    return None


def require_kernel_mount() -> None:
    """Skip unless this process can attach an NBD export as a loop device and mount it."""
    why = kernel_mount_ready()
    if why:
        pytest.skip(why)


@contextlib.contextmanager
def kernel_mounted(uri: str, folder: Path, *, writable: bool = False) -> Iterator[Path]:
    """The NBD export ``uri`` attached with nbdfuse + losetup and mounted as ext4 under
    ``folder`` (read-only unless ``writable``); everything undone afterwards."""
    require_kernel_mount()
    fuse_dir, mnt = folder / "fuse", folder / "mnt"
    fuse_dir.mkdir(parents=True)
    mnt.mkdir()
    ro = [] if writable else ["-r"]
    fuse = subprocess.Popen(["nbdfuse", *ro, str(fuse_dir), uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    loop = ""
    mounted = False
    try:
        attached = wait_until(lambda: (fuse_dir / "nbd").exists() or fuse.poll() is not None, 20)
        assert attached and fuse.poll() is None, f"nbdfuse did not attach: {fuse.stderr.read() if fuse.poll() is not None and fuse.stderr else b''!r}"  # fmt: skip
        loop = run(["losetup", *ro, "--find", "--show", str(fuse_dir / "nbd")]).stdout.strip()
        run(["mount", "-t", "ext4", "-o", "rw" if writable else "ro,noload", loop, str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted:
            run(["umount", str(mnt)], check=False)
        if loop:
            run(["losetup", "-d", loop], check=False)
        run(["fusermount3", "-u", str(fuse_dir)], check=False)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(5)


def run(cmd: Sequence[str], timeout: float = 30, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r  # type: ignore[no-any-return]


def obd(*args: str, timeout: float = 60, check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return run([sys.executable, "-m", "commands.main", *args], timeout=timeout, check=check, cwd=cwd, env=env)  # fmt: skip


@contextlib.contextmanager
def in_process_server(
    exports: Sequence[nbd.Export], *, failed: dict[str, str] | None = None, workers: int = 0
) -> Iterator[tuple[nbd.NbdServer, int]]:
    """An :class:`NbdServer` on 127.0.0.1:<free port>, shut down afterwards."""
    server = nbd.NbdServer(exports, failed=failed, workers=workers)
    _, port = server.listen_tcp("127.0.0.1", 0)
    server.start()
    try:
        yield server, port
    finally:
        assert server.shutdown(10), "connections did not end"
        for e in exports:
            with contextlib.suppress(Exception):
                e.device.close()


class ServeProcess:
    """``obd serve --nbd`` as a child process; ``address`` is its ``nbd://`` URI."""

    def __init__(self, args: Sequence[str], *, cwd: str | None = None, timeout: float = 20) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "commands.main", "serve", "--nbd", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("obd serve did not start:\n" + self.stderr)
        for line in self.lines:
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                break

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                self._listening.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def uri(self, name: str) -> str:
        return f"{self.address}/{name}"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, wait, SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_config(folder: Path, *, log_level: int = 1) -> Path:
    """A global config logging to ``folder/obd.log`` at ``log_level`` (1: INFO), no audit."""
    path = folder / "overlaybd.json"
    path.write_text(json.dumps({
        "logConfig": {"logPath": str(folder / "obd.log"), "logLevel": log_level},
        "enableAudit": False,
    }))  # fmt: skip
    return path


# -- a process seen from /proc ------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def proc_rss(pid: int) -> int:
    """Resident set size in bytes."""
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def proc_threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(step)
    return True


def image_config(folder: Path, name: str, *, lowers: Sequence[str] = (), upper: tuple[str, str] | None = None, result: bool = True) -> Path:  # fmt: skip
    doc: dict[str, object] = {"lowers": [{"file": str(f)} for f in lowers]}
    if upper is not None:
        doc["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    if result:
        doc["resultFile"] = str(folder / f"{name}.result")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def writable_image(folder: Path, name: str, size: str = "64M") -> Path:
    """An image config with only a new writable upper of ``size``."""
    data, index = folder / f"{name}.data", folder / f"{name}.index"
    obd("create", str(data), str(index), size)
    return image_config(folder, name, upper=(str(data), str(index)))


def image_of_raw(folder: Path, name: str, raw: Path, *, writable: bool) -> Path:
    """An obd image holding ``raw``'s content: a committed layer (a ZFile for read-only
    images), plus an empty upper (size 0: it takes the layer's size) when writable."""
    from obd.image import ops

    d, i = str(folder / f"{name}-l.data"), str(folder / f"{name}-l.index")
    ops.create(d, i, None, from_raw=str(raw))
    layer = str(folder / f"{name}.layer")
    ops.commit(d, i, layer, zfile=None if writable else ops.ZFileOptions())
    os.unlink(d)
    os.unlink(i)
    cfg: dict[str, object] = {"lowers": [{"file": layer}]}
    if writable:
        ud, ui = str(folder / f"{name}-u.data"), str(folder / f"{name}-u.index")
        ops.create(ud, ui, 0)
        cfg["upper"] = {"data": ud, "index": ui}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


class Reply(NamedTuple):
    """One whole reply: READ data (holes filled in) or block-status descriptors."""

    cookie: int
    error: int
    data: bytes = b""
    extents: tuple[tuple[int, int], ...] = ()


class RawClient:
    """A minimal NBD client speaking bytes, for protocol-abuse tests.

    ``send_request`` then ``reply`` pipelines: ``reply`` reads the next whole reply in
    any form (simple, or structured chunks of interleaved requests) and checks it.
    """

    def __init__(self, port: int, export: str, *, structured: bool = False, meta: bool = False, timeout: float = 10) -> None:  # fmt: skip
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        magic, opt, _hflags = N.HANDSHAKE.unpack(self.recv(N.HANDSHAKE.size))
        assert (magic, opt) == (N.NBDMAGIC, N.IHAVEOPT)
        self.sock.sendall(N.CLIENT_FLAGS.pack(N.NBD_FLAG_C_FIXED_NEWSTYLE | N.NBD_FLAG_C_NO_ZEROES))
        self.structured = structured
        self.meta = meta  # base:allocation selected (block status allowed)
        if structured:
            self.option(N.NBD_OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == N.NBD_REP_ACK
        if meta:
            raw = export.encode()
            q = N.BASE_ALLOCATION.encode()
            data = N.U32.pack(len(raw)) + raw + N.U32.pack(1) + N.U32.pack(len(q)) + q
            self.option(N.NBD_OPT_SET_META_CONTEXT, data)
            assert self.option_reply()[1] == N.NBD_REP_META_CONTEXT
            assert self.option_reply()[1] == N.NBD_REP_ACK
        raw = export.encode()
        self.option(N.NBD_OPT_GO, N.U32.pack(len(raw)) + raw + N.U16.pack(0))
        self.size = -1
        self.flags = 0
        while True:
            _, rtype, data = self.option_reply()
            if rtype == N.NBD_REP_INFO and N.U16.unpack_from(data)[0] == N.NBD_INFO_EXPORT:
                _, self.size, self.flags = N.INFO_EXPORT.unpack(data)
            elif rtype == N.NBD_REP_ACK:
                break
            elif rtype & (1 << 31):
                raise ConnectionRefusedError(f"GO failed: {rtype:#x} {data!r}")
        self.cookie = 0
        self.pending: dict[int, tuple[int, int, int]] = {}  # cookie -> cmd, offset, length
        self._chunks: dict[int, list[tuple[int, bytes]]] = {}

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            buf += chunk
        return buf

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = N.OPTION_REPLY.unpack(self.recv(N.OPTION_REPLY.size))
        assert magic == N.OPTION_REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def send_request(self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"", magic: int = N.REQUEST_MAGIC) -> int:  # fmt: skip
        self.cookie += 1
        if cmd != N.NBD_CMD_DISC:
            self.pending[self.cookie] = (cmd, offset, length)
        self.sock.sendall(N.REQUEST.pack(magic, flags, cmd, self.cookie, offset, length) + data)
        return self.cookie

    def reply(self) -> Reply:
        """The next whole reply (of any request sent), checked against the protocol."""
        while True:
            (magic,) = N.U32.unpack(self.recv(4))
            if magic == N.SIMPLE_REPLY_MAGIC:
                err, cookie = struct.unpack(">IQ", self.recv(12))
                cmd, _, length = self.pending.pop(cookie)
                if cmd == N.NBD_CMD_READ:
                    assert not self.structured, "simple reply to a READ after structured replies"
                    return Reply(cookie, err, b"" if err else self.recv(length))
                assert cmd != N.NBD_CMD_BLOCK_STATUS or err, "simple success for BLOCK_STATUS"
                return Reply(cookie, err)
            assert magic == N.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
            assert self.structured, "structured reply not negotiated"
            flags, rtype, cookie, plen = struct.unpack(">HHQI", self.recv(16))
            assert cookie in self.pending, f"reply to unknown cookie {cookie}"
            chunks = self._chunks.setdefault(cookie, [])
            chunks.append((rtype, self.recv(plen)))
            if flags & N.NBD_REPLY_FLAG_DONE:
                del self._chunks[cookie]
                return self._assemble(cookie, chunks)

    def _assemble(self, cookie: int, chunks: list[tuple[int, bytes]]) -> Reply:
        cmd, offset, length = self.pending.pop(cookie)
        content = any(t in (N.NBD_REPLY_TYPE_OFFSET_DATA, N.NBD_REPLY_TYPE_OFFSET_HOLE) for t, _ in chunks)  # fmt: skip
        buf = bytearray(length if content else 0)  # (a refused READ may say 4 GiB)
        covered = 0
        err = 0
        extents: tuple[tuple[int, int], ...] = ()
        for rtype, payload in chunks:
            if rtype & (1 << 15):  # an error chunk
                (err,) = N.U32.unpack_from(payload)
                assert err, "error chunk with error 0"
            elif rtype == N.NBD_REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                n = len(payload) - 8
                assert cmd == N.NBD_CMD_READ and offset <= at and at + n <= offset + length
                buf[at - offset : at - offset + n] = payload[8:]
                covered += n
            elif rtype == N.NBD_REPLY_TYPE_OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload)
                assert cmd == N.NBD_CMD_READ and offset <= at and at + n <= offset + length
                covered += n
            elif rtype == N.NBD_REPLY_TYPE_BLOCK_STATUS:
                assert cmd == N.NBD_CMD_BLOCK_STATUS and (len(payload) - 4) % 8 == 0
                extents = tuple(struct.iter_unpack(">II", payload[4:]))
                assert extents and all(n for n, _ in extents)
                assert sum(n for n, _ in extents) <= length
            else:
                assert rtype == N.NBD_REPLY_TYPE_NONE and not payload, f"chunk type {rtype}"
        if cmd == N.NBD_CMD_READ and not err:
            assert covered == length, f"read reply covers {covered} of {length} bytes"
        if cmd == N.NBD_CMD_BLOCK_STATUS and not err:
            assert extents, "BLOCK_STATUS success without descriptors"
        return Reply(cookie, err, bytes(buf) if cmd == N.NBD_CMD_READ and not err else b"", extents)

    def simple_reply(self) -> tuple[int, int]:
        magic, err, cookie = N.SIMPLE_REPLY.unpack(self.recv(N.SIMPLE_REPLY.size))
        assert magic == N.SIMPLE_REPLY_MAGIC, hex(magic)
        self.pending.pop(cookie, None)
        return err, cookie

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        """A READ with simple replies; returns (error, data)."""
        assert not self.structured
        self.send_request(N.NBD_CMD_READ, offset, length)
        err, _ = self.simple_reply()
        return err, (b"" if err else self.recv(length))

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        self.send_request(N.NBD_CMD_WRITE, offset, len(data), flags, data)
        return self.simple_reply()[0]

    def structured_reply(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured chunk."""
        magic, flags, rtype, cookie, length = N.STRUCTURED_REPLY.unpack(self.recv(N.STRUCTURED_REPLY.size))  # fmt: skip
        assert magic == N.STRUCTURED_REPLY_MAGIC, hex(magic)
        if flags & N.NBD_REPLY_FLAG_DONE:
            self.pending.pop(cookie, None)
        return flags, rtype, cookie, self.recv(length)

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.send_request(N.NBD_CMD_DISC, 0, 0)
        self.close()

    def closed_by_server(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class RealClients:
    """qemu-io and nbdcopy at work in a loop, in a background thread, until ``finish``.

    qemu-io writes a pattern to one of 8 MiB-slots from ``qemu_base`` of ``rw_uri``,
    flushes and reads it back; every third turn nbdcopy copies ``copy_uri`` to ``out``
    and ``copy_ok(bytes)`` judges the copy. ``patterns`` holds each slot's last pattern.
    """

    def __init__(self, rw_uri: str, qemu_base: int, copy_uri: str, out: Path, copy_ok: Callable[[bytes], bool]) -> None:  # fmt: skip
        self.rw_uri, self.qemu_base = rw_uri, qemu_base
        self.copy_uri, self.out, self.copy_ok = copy_uri, out, copy_ok
        self.stop = threading.Event()
        self.runs: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.patterns: dict[int, int] = {}  # slot offset -> its pattern byte
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        k = 0
        while not self.stop.is_set():
            try:
                self._once(k)
            except Exception as e:  # a hang (timeout) or anything else: a failure
                self.failures.append(f"{type(e).__name__}: {e}")
            k += 1

    def _once(self, k: int) -> None:
        slot = self.qemu_base + (k % 8) * (1 << 20)
        pattern = 0x10 + k % 200
        r = run(
            ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {slot} 1M", "-c", "flush",
             "-c", f"read -P {pattern} {slot} 1M", self.rw_uri],
            check=False, timeout=60,
        )  # fmt: skip
        self.runs["qemu-io"] += 1
        if r.returncode or "failed" in r.stdout + r.stderr:
            self.failures.append(f"qemu-io: {r.stdout}{r.stderr}")
        else:
            self.patterns[slot] = pattern
        if k % 3 == 0:
            r = run(["nbdcopy", self.copy_uri, str(self.out)], check=False, timeout=60)
            self.runs["nbdcopy"] += 1
            if r.returncode:
                self.failures.append(f"nbdcopy: {r.stderr}")
            elif not self.copy_ok(self.out.read_bytes()):
                self.failures.append("nbdcopy: wrong bytes")

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(120)

    def check(self) -> None:
        """Halt, then: no run failed, none hangs, and both tools ran."""
        self.halt()
        assert not self.thread.is_alive(), "a real client hangs"
        assert not self.failures, self.failures[:3]
        assert self.runs["qemu-io"] >= 3 and self.runs["nbdcopy"] >= 1, self.runs

    def qemu_io_check(self, uri: str = "") -> list[str]:
        """qemu-io arguments that read every slot back with its last pattern."""
        args = ["qemu-io", "-f", "raw"]
        for slot, pattern in sorted(self.patterns.items()):
            args += ["-c", f"read -P {pattern} {slot} 1M"]
        return [*args, uri or self.rw_uri]


def make_raw(path: str, size: int, chunks: dict[int, bytes] | None = None) -> str:
    """A sparse file of ``size`` bytes with ``chunks`` (offset -> bytes) written in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in (chunks or {}).items():
            f.seek(off)
            f.write(data)
    return path
