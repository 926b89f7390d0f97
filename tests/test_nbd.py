"""``obd serve --nbd`` and the NBD server, tested with real clients (qemu-img, qemu-io,
nbdinfo, nbdcopy, nbdfuse), raw-socket abuse, and the configs, logs and metrics around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from obd.errors import ConfigError, FileAccessError
from obd.io.base import Extent, ExtentKind
from obd.serve import ImageSpec, NbdService, nbd
from obd.serve.audit import AuditLog, setup_logs
from obd.serve.config import GlobalConfig, load_global_config, parse_global_config
from obd.serve.nbd import proto as N
from obd.serve.result import failure_reason, write_failure, write_success
from tests.nbd_helpers import (
    RawClient,
    ServeProcess,
    image_config,
    image_of_raw,
    in_process_server,
    kernel_mounted,
    make_raw,
    obd,
    require_kernel_mount,
    require_tools,
    run,
    writable_image,
)
from tests.vectors import VECTORS, have_vectors, manifest

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SIZE = 64 * MiB


def _content() -> dict[int, bytes]:
    return {0: b"A" * 4096, MiB: os.urandom(MiB), 40 * MiB: os.urandom(8192)}


@pytest.fixture
def raw_pair(tmp_path: Path) -> tuple[Path, Path, dict[int, bytes]]:
    chunks = _content()
    rw = Path(make_raw(str(tmp_path / "rw.raw"), SIZE, chunks))
    ro = Path(make_raw(str(tmp_path / "ro.raw"), SIZE, chunks))
    return rw, ro, chunks


@pytest.fixture
def images(tmp_path: Path, raw_pair) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    rw, ro, _ = raw_pair
    return {
        "rw": image_of_raw(tmp_path, "rw", rw, writable=True),
        "ro": image_of_raw(tmp_path, "ro", ro, writable=False),
    }


def _read_image(cfg: Path, offset: int, length: int) -> bytes:
    """Read what an image's files hold now (a second, read-only opening)."""
    from obd.image import open_image

    with open_image(str(cfg), readonly=True) as img:
        return img.pread(offset, length)


@pytest.fixture
def server(images):  # type: ignore[no-untyped-def]
    from obd.image import open_image

    exports = [
        nbd.Export("rw", open_image(str(images["rw"]))),
        nbd.Export("ro", open_image(str(images["ro"]))),
    ]
    with in_process_server(exports, failed={"broken": "failed to open layer 0"}) as (srv, port):
        yield srv, port


# -- wire layouts and pure functions ------------------------------------------------------


def test_struct_sizes_match_proto() -> None:
    assert N.HANDSHAKE.size == 18
    assert N.OPTION_HEADER.size == 16
    assert N.OPTION_REPLY.size == 20
    assert N.EXPORT_NAME_REPLY.size + 124 == 134
    assert N.INFO_EXPORT.size == 12
    assert N.INFO_BLOCK_SIZE.size == 14
    assert N.REQUEST.size == 28
    assert N.SIMPLE_REPLY.size == 16
    assert N.STRUCTURED_REPLY.size == 20
    assert N.OFFSET_DATA_REPLY.size == 28
    assert N.BLOCK_DESCRIPTOR.size == 8
    req = N.Request(N.REQUEST_MAGIC, 1, N.NBD_CMD_WRITE, 7, 4096, 512)
    assert N.Request.unpack(req.pack()) == req


class _FakeExtents:
    def __init__(self, extents: list[Extent]) -> None:
        self._e = extents

    def extents(self, offset: int = 0, length: int | None = None):  # type: ignore[no-untyped-def]
        return iter(self._e)


def test_block_status_states() -> None:
    dev = _FakeExtents(
        [
            Extent(0, 4096, ExtentKind.DATA, 0),
            Extent(4096, 4096, ExtentKind.DATA, 1),
            Extent(8192, 4096, ExtentKind.ZERO, 0),
            Extent(12288, 4096, ExtentKind.HOLE),
        ]
    )
    got = nbd.block_status(dev, 0, 16384)  # type: ignore[arg-type]
    assert got == [(8192, 0), (4096, N.NBD_STATE_ZERO), (4096, N.NBD_STATE_HOLE | N.NBD_STATE_ZERO)]
    assert nbd.block_status(dev, 0, 16384, one=True) == [(8192, 0)]  # type: ignore[arg-type]
    assert nbd.block_status(dev, 10000, 4000) == [  # type: ignore[arg-type]
        (2288, N.NBD_STATE_ZERO),
        (1712, N.NBD_STATE_HOLE | N.NBD_STATE_ZERO),
    ]


# -- real clients against an in-process server --------------------------------------------


def test_qemu_img_info_and_compare(server, raw_pair) -> None:  # type: ignore[no-untyped-def]
    require_tools("qemu-img")
    _, port = server
    _, ro, _ = raw_pair
    out = run(["qemu-img", "info", "--output=json", f"nbd://127.0.0.1:{port}/ro"]).stdout
    assert json.loads(out)["virtual-size"] == SIZE
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ro), f"nbd://127.0.0.1:{port}/ro"])


def test_qemu_io_write_read_patterns(server, images) -> None:  # type: ignore[no-untyped-def]
    require_tools("qemu-io")
    _, port = server
    uri = f"nbd://127.0.0.1:{port}/rw"
    cmds = ["write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "write -z 2M 1M", "flush",
            "read -P 0xab 0 64k", "read -P 0xcd 1M 4k", "read -P 0 2M 1M"]  # fmt: skip
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run([*args, uri])
    # a mismatch makes read -P fail
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 4k", uri], check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr
    # the writes landed in the image's upper layer
    assert _read_image(images["rw"], 0, 65536) == b"\xab" * 65536
    assert _read_image(images["rw"], MiB, 4096) == b"\xcd" * 4096
    assert _read_image(images["rw"], 2 * MiB, MiB) == bytes(MiB)


def test_nbdinfo_list_and_map(server) -> None:  # type: ignore[no-untyped-def]
    require_tools("nbdinfo")
    _, port = server
    listing = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"]).stdout
    names = {e["export-name"] for e in json.loads(listing)["exports"]}
    assert names == {"rw", "ro"}
    info = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/ro"]).stdout)
    exp = info["exports"][0]
    assert exp["is_read_only"] is True and exp["can_multi_conn"] is True
    assert exp["block_size_minimum"] == 512 and exp["block_size_preferred"] == 4096
    mapping = json.loads(run(["nbdinfo", "--map", "--json", f"nbd://127.0.0.1:{port}/ro"]).stdout)
    runs = [(m["offset"], m["length"], m["type"]) for m in mapping]
    assert runs[0] == (0, 4096, 0)
    assert (MiB, MiB, 0) in runs
    assert any(t == 3 for _, _, t in runs)  # holes read as hole,zero
    assert sum(n for _, n, _ in runs) == SIZE
    bad = run(["nbdinfo", f"nbd://127.0.0.1:{port}/broken"], check=False)
    assert bad.returncode != 0 and "broken" in bad.stderr


def test_nbdcopy_digest(server, raw_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_tools("nbdcopy")
    _, port = server
    _, ro, _ = raw_pair
    out = tmp_path / "copy.raw"
    run(["nbdcopy", f"nbd://127.0.0.1:{port}/ro", str(out)])
    assert _sha256(out) == _sha256(ro)
    # 4 KiB requests, several connections
    run(["nbdcopy", "--request-size=4096", "-C", "4", f"nbd://127.0.0.1:{port}/ro", str(out)])
    assert _sha256(out) == _sha256(ro)


def test_eight_concurrent_clients(server, images) -> None:  # type: ignore[no-untyped-def]
    _, port = server
    errors: list[BaseException] = []
    slice_ = 4 * MiB

    def client(i: int) -> None:
        try:
            c = RawClient(port, "rw")
            pattern = bytes([i + 1]) * 65536
            for k in range(slice_ // len(pattern)):
                assert c.write(i * slice_ + k * len(pattern), pattern) == 0
            for k in range(slice_ // len(pattern)):
                err, data = c.read(i * slice_ + k * len(pattern), len(pattern))
                assert err == 0 and data == pattern
            c.disconnect()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(8):
        assert _read_image(images["rw"], i * slice_, slice_) == bytes([i + 1]) * slice_


def test_concurrent_qemu_io_processes(server) -> None:  # type: ignore[no-untyped-def]
    require_tools("qemu-io")
    _, port = server
    uri = f"nbd://127.0.0.1:{port}/rw"
    procs = []
    for i in range(8):
        off = 8 * MiB + i * MiB
        procs.append(subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {i + 0x20} {off} 1M", "-c",
             f"read -P {i + 0x20} {off} 1M", uri],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out
    check = ["qemu-io", "-f", "raw"]
    for i in range(8):
        check += ["-c", f"read -P {i + 0x20} {8 * MiB + i * MiB} 1M"]
    run([*check, uri])


def test_block_status_and_structured_read_raw(server) -> None:  # type: ignore[no-untyped-def]
    _, port = server
    c = RawClient(port, "ro", structured=True, meta=True)
    assert c.flags & N.NBD_FLAG_SEND_DF
    cookie = c.send_request(N.NBD_CMD_READ, 0, 4096)
    flags, rtype, got, payload = c.structured_reply()
    assert (flags, rtype, got) == (N.NBD_REPLY_FLAG_DONE, N.NBD_REPLY_TYPE_OFFSET_DATA, cookie)
    assert payload == (0).to_bytes(8, "big") + b"A" * 4096
    cookie = c.send_request(N.NBD_CMD_BLOCK_STATUS, 0, 2 * MiB)
    flags, rtype, got, payload = c.structured_reply()
    assert rtype == N.NBD_REPLY_TYPE_BLOCK_STATUS and got == cookie
    descs = [
        N.BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)
    ]
    assert descs == [(4096, 0), (MiB - 4096, 3), (MiB, 0)]
    # a read past the end is a structured error chunk
    c.send_request(N.NBD_CMD_READ, SIZE - 512, 1024)
    flags, rtype, _, payload = c.structured_reply()
    assert rtype == N.NBD_REPLY_TYPE_ERROR
    assert N.ERROR_PAYLOAD.unpack_from(payload)[0] == N.NBD_EINVAL
    c.disconnect()


# -- bad clients ------------------------------------------------------------------------------


def _still_serves(port: int) -> None:
    c = RawClient(port, "ro")
    err, data = c.read(0, 4096)
    assert err == 0 and data == b"A" * 4096
    c.disconnect()


def test_bad_requests_get_error_replies(server) -> None:  # type: ignore[no-untyped-def]
    _, port = server
    c = RawClient(port, "rw")
    cases = [
        (N.NBD_CMD_READ, SIZE, 512, 0, b"", N.NBD_EINVAL),  # offset at the end
        (N.NBD_CMD_READ, SIZE - 512, 1024, 0, b"", N.NBD_EINVAL),  # length past the end
        (N.NBD_CMD_READ, 0, 33 * MiB, 0, b"", N.NBD_EINVAL),  # oversized read
        (N.NBD_CMD_WRITE, SIZE, 512, 0, b"x" * 512, N.NBD_ENOSPC),
        (N.NBD_CMD_WRITE, 100, 512, 0, b"x" * 512, N.NBD_EINVAL),  # unaligned
        (N.NBD_CMD_WRITE_ZEROES, SIZE - 512, 4096, 0, b"", N.NBD_ENOSPC),
        (N.NBD_CMD_TRIM, SIZE, 4096, 0, b"", N.NBD_EINVAL),
        (N.NBD_CMD_CACHE, 0, 4096, 0, b"", N.NBD_EINVAL),
        (99, 0, 4096, 0, b"", N.NBD_EINVAL),  # unknown command
        (N.NBD_CMD_BLOCK_STATUS, 0, 4096, 0, b"", N.NBD_EINVAL),  # no meta context
        (N.NBD_CMD_WRITE, 0, 512, 1 << 9, b"y" * 512, N.NBD_EINVAL),  # unknown flag
    ]
    for cmd, off, length, flags, data, want in cases:
        cookie = c.send_request(cmd, off, length, flags, data)
        err, got = c.simple_reply()
        assert (err, got) == (want, cookie), (cmd, off, length)
    # the connection still works after all that
    assert c.write(0, b"z" * 512, N.NBD_CMD_FLAG_FUA) == 0
    assert c.read(0, 512) == (0, b"z" * 512)
    c.disconnect()
    ro = RawClient(port, "ro")
    assert ro.write(0, b"x" * 4096) == N.NBD_EPERM
    ro.send_request(N.NBD_CMD_TRIM, 0, 4096)
    assert ro.simple_reply()[0] == N.NBD_EPERM
    ro.send_request(N.NBD_CMD_FLUSH, 0, 0)
    assert ro.simple_reply()[0] == 0
    assert ro.read(0, 4096) == (0, b"A" * 4096)
    ro.disconnect()


@pytest.mark.parametrize("abuse", ["bad_magic", "oversized_write", "drop_mid_write", "drop_after_header", "garbage_handshake", "bad_option_magic"])  # fmt: skip
def test_bad_client_disconnected_alone(server, abuse: str) -> None:  # type: ignore[no-untyped-def]
    srv, port = server
    other = RawClient(port, "rw")  # a well-behaved client connected all along
    assert other.write(8 * MiB, b"k" * 4096) == 0
    if abuse in ("garbage_handshake", "bad_option_magic"):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.recv(18)
        if abuse == "garbage_handshake":
            s.sendall(b"\xff" * 4)  # unknown client flags
        else:
            s.sendall(N.CLIENT_FLAGS.pack(1) + N.OPTION_HEADER.pack(0x1234, N.NBD_OPT_GO, 0))
        s.settimeout(5)
        assert s.recv(100) == b""
        s.close()
    else:
        bad = RawClient(port, "rw")
        if abuse == "bad_magic":
            bad.send_request(N.NBD_CMD_READ, 0, 512, magic=0xDEADBEEF)
        elif abuse == "oversized_write":
            bad.send_request(N.NBD_CMD_WRITE, 0, 64 * MiB, data=b"x" * 4096)
        elif abuse == "drop_mid_write":
            bad.send_request(N.NBD_CMD_WRITE, 16 * MiB, MiB, data=b"q" * 1000)
            bad.close()
        elif abuse == "drop_after_header":
            bad.send_request(N.NBD_CMD_READ, 0, 4096)
            bad.close()
        if abuse in ("bad_magic", "oversized_write"):
            assert bad.closed_by_server()
        bad.close()
    # the other client and new clients are still served; the partial write did not land
    assert other.read(8 * MiB, 4096) == (0, b"k" * 4096)
    assert other.read(16 * MiB, 1000 + 24) == (0, bytes(1024))
    other.disconnect()
    _still_serves(port)
    deadline = time.monotonic() + 5
    while srv.connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.connections() == 0


def test_unknown_export_and_options(server) -> None:  # type: ignore[no-untyped-def]
    _, port = server
    with pytest.raises(ConnectionRefusedError, match="no export named"):
        RawClient(port, "nope")
    with pytest.raises(ConnectionRefusedError, match="failed to open layer 0"):
        RawClient(port, "broken")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.recv(18)
    s.sendall(N.CLIENT_FLAGS.pack(3) + N.OPTION_HEADER.pack(N.IHAVEOPT, 200, 3) + b"abc")
    magic, opt, rtype, length = N.OPTION_REPLY.unpack(s.recv(20))
    assert (magic, opt, rtype) == (N.OPTION_REPLY_MAGIC, 200, N.NBD_REP_ERR_UNSUP)
    s.recv(length)
    s.sendall(N.OPTION_HEADER.pack(N.IHAVEOPT, N.NBD_OPT_ABORT, 0))
    assert N.OPTION_REPLY.unpack(s.recv(20))[2] == N.NBD_REP_ACK
    s.close()
    _still_serves(port)


def test_export_name_option(server) -> None:  # type: ignore[no-untyped-def]
    """The old NBD_OPT_EXPORT_NAME path, with and without the 124 zero bytes."""
    _, port = server
    for cflags, tail in (
        (N.NBD_FLAG_C_FIXED_NEWSTYLE | N.NBD_FLAG_C_NO_ZEROES, 0),
        (N.NBD_FLAG_C_FIXED_NEWSTYLE, 124),
    ):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.recv(18)
        s.sendall(
            N.CLIENT_FLAGS.pack(cflags)
            + N.OPTION_HEADER.pack(N.IHAVEOPT, N.NBD_OPT_EXPORT_NAME, 2)
            + b"ro"
        )
        buf = b""
        while len(buf) < 10 + tail:
            buf += s.recv(200)
        size, flags = N.EXPORT_NAME_REPLY.unpack_from(buf)
        assert size == SIZE and flags & N.NBD_FLAG_READ_ONLY and len(buf) == 10 + tail
        s.sendall(N.REQUEST.pack(N.REQUEST_MAGIC, 0, N.NBD_CMD_READ, 9, 0, 16))
        buf = b""
        while len(buf) < 32:
            buf += s.recv(100)
        assert (
            N.SIMPLE_REPLY.unpack_from(buf) == (N.SIMPLE_REPLY_MAGIC, 0, 9)
            and buf[16:] == b"A" * 16
        )
        s.close()
    # an unknown name ends the connection (EXPORT_NAME cannot report errors)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.recv(18)
    s.sendall(
        N.CLIENT_FLAGS.pack(3)
        + N.OPTION_HEADER.pack(N.IHAVEOPT, N.NBD_OPT_EXPORT_NAME, 4)
        + b"nope"
    )
    assert s.recv(100) == b""
    s.close()


def test_worker_pool_mode(images) -> None:  # type: ignore[no-untyped-def]
    """--workers: requests of one connection run in a pool; pipelined replies all arrive."""
    from obd.image import open_image

    dev = open_image(str(images["rw"]))
    with in_process_server([nbd.Export("rw", dev)], workers=3) as (_, port):
        c = RawClient(port, "rw")
        for i in range(64):  # pipeline 64 writes, then collect the replies
            c.send_request(N.NBD_CMD_WRITE, i * 4096, 4096, 0, bytes([i]) * 4096)
        cookies = set()
        for _ in range(64):
            err, cookie = c.simple_reply()
            assert err == 0
            cookies.add(cookie)
        assert cookies == set(range(1, 65))
        for i in range(64):
            assert c.read(i * 4096, 4096) == (0, bytes([i]) * 4096)
        c.disconnect()


def test_unix_socket_and_default_export(raw_pair, images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_tools("qemu-img")
    from obd.image import open_image

    _, ro, _ = raw_pair
    srv = nbd.NbdServer([nbd.Export("only", open_image(str(images["ro"])))])
    sock = str(tmp_path / "s.sock")
    srv.listen_unix(sock)
    srv.start()
    try:
        # the empty export name selects the first export
        run(
            [
                "qemu-img",
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                str(ro),
                f"nbd+unix:///?socket={sock}",
            ]
        )
    finally:
        assert srv.shutdown(10)
    assert not os.path.exists(sock)


# -- obd serve with real images ----------------------------------------------------------------


def test_serve_writes_land_in_upper_and_survive_commit(tmp_path: Path) -> None:
    require_tools("qemu-io")
    cfg = writable_image(tmp_path, "disk")
    with ServeProcess(["--listen", "127.0.0.1:0", f"{cfg}=disk"]) as sp:
        assert (tmp_path / "disk.result").read_text() == "success"
        uri = sp.uri("disk")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 5M 4k",
             "-c", "read -P 0x5a 0 1M", uri])  # fmt: skip
        idle = RawClient(sp.port, "disk")  # still connected at SIGTERM, its write unflushed
        assert idle.write(7 * MiB, b"\x77" * 8192) == 0
        t0 = time.monotonic()
        status = sp.stop()  # SIGTERM: drain, flush, exit 0
        assert time.monotonic() - t0 < 10
        assert idle.closed_by_server()
        idle.close()
        assert status == 0, sp.stderr
    obd(
        "commit",
        str(tmp_path / "disk.data"),
        str(tmp_path / "disk.index"),
        str(tmp_path / "c.lsmt"),
    )
    from obd.image import open_image

    cfg2 = image_config(tmp_path, "committed", lowers=[str(tmp_path / "c.lsmt")])
    with open_image(str(cfg2)) as img:
        assert img.readonly
        assert img.pread(0, MiB) == b"\x5a" * MiB
        assert img.pread(5 * MiB, 4096) == b"\x33" * 4096
        assert img.pread(7 * MiB, 8192) == b"\x77" * 8192
        assert img.pread(MiB, 4096) == bytes(4096)


def test_serve_missing_and_corrupt_layers_fail_their_export_only(tmp_path: Path) -> None:
    require_tools("qemu-io", "nbdinfo")
    good = writable_image(tmp_path, "good")
    missing = image_config(tmp_path, "missing", lowers=[str(tmp_path / "nope.lsmt")])
    corrupt_file = tmp_path / "corrupt.lsmt"
    corrupt_file.write_bytes(os.urandom(8192))
    corrupt = image_config(tmp_path, "corrupt", lowers=[str(corrupt_file)])
    with ServeProcess(["--listen", "127.0.0.1:0", str(good), str(missing), str(corrupt)]) as sp:
        assert (tmp_path / "good.result").read_text() == "success"
        assert (tmp_path / "missing.result").read_text() == (
            f"failed:failed to open local file {tmp_path / 'nope.lsmt'}"
        )
        assert (tmp_path / "corrupt.result").read_text() == "failed:failed to open layer 0"
        run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 1 0 4k",
                "-c",
                "read -P 1 0 4k",
                sp.uri("good"),
            ]
        )
        r = run(["nbdinfo", sp.uri("missing")], check=False)
        assert r.returncode != 0
        assert sp.stop() == 0


def test_serve_all_images_failing_exits_with_error(tmp_path: Path) -> None:
    missing = image_config(tmp_path, "m", lowers=[str(tmp_path / "nope.lsmt")])
    r = obd("serve", "--nbd", "--listen", "127.0.0.1:0", str(missing), check=False, timeout=20)
    assert r.returncode == 3, r.stderr
    assert (tmp_path / "m.result").read_text().startswith("failed:failed to open local file")
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text("{not json")
    r = obd("serve", "--nbd", "--config", str(bad_cfg), str(missing), check=False, timeout=20)
    assert r.returncode == 7 and "bad.json" in r.stderr


def test_serve_listen_errors(tmp_path: Path) -> None:
    cfg = writable_image(tmp_path, "l")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = obd(
            "serve", "--nbd", "--listen", f"127.0.0.1:{port}", str(cfg), check=False, timeout=20
        )
        assert r.returncode == 3 and "cannot listen" in r.stderr, r.stderr
    r = obd("serve", "--nbd", "--listen", "nonsense", str(cfg), check=False, timeout=20)
    assert r.returncode == 2
    sock = tmp_path / "plain-file"
    sock.write_text("x")
    r = obd("serve", "--nbd", "--socket", str(sock), str(cfg), check=False, timeout=20)
    assert r.returncode == 3 and "not a socket" in r.stderr
    assert sock.read_text() == "x"


def _vector_images() -> list[tuple[str, list[str], int, str]]:
    """(name, lower files, virtual size, sha256) of every read-only vector image."""
    out = []
    for v in manifest()["vectors"]:
        if v["kind"] in ("lsmt_ro", "lsmt_ro_zfile") and v["virtual_size"] <= 256 * MiB:
            out.append((v["name"], [str(VECTORS / v["files"]["layer"])], v["virtual_size"], v["sha256"]))  # fmt: skip
        elif v["kind"] == "lsmt_stack":
            files = [str(VECTORS / f) for f in v["files"]["layers_bottom_to_top"]]
            out.append((v["name"], files, v["virtual_size"], v["sha256"]))
    return out


@pytest.fixture(scope="module")
def vector_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    require_tools("nbdcopy")
    if not have_vectors():
        pytest.skip(f"upstream reference vectors not found at {VECTORS}")
    folder = tmp_path_factory.mktemp("vectors")
    args = ["--listen", "127.0.0.1:0"]
    for name, files, _, _ in _vector_images():
        args.append(f"{image_config(folder, name, lowers=files, result=False)}={name}")
    with ServeProcess(args) as sp:
        yield sp, folder
        assert sp.stop() == 0


def _vector_params() -> list[object]:
    params: list[object] = []
    for name, _, vsize, digest in _vector_images():
        params.append(pytest.param(name, vsize, digest, id=name))
    return params or [pytest.param("none", 0, "", marks=pytest.mark.skip(reason="no vectors"))]


@pytest.mark.parametrize(("name", "vsize", "digest"), _vector_params())
def test_nbdcopy_of_vector_images_gives_manifest_digest(
    vector_server, name: str, vsize: int, digest: str
) -> None:  # type: ignore[no-untyped-def]
    sp, folder = vector_server
    out = folder / f"{name}.raw"
    try:
        run(["nbdcopy", sp.uri(name), str(out)], timeout=60)
        assert out.stat().st_size == vsize
        assert _sha256(out) == digest, name
    finally:
        out.unlink(missing_ok=True)


def test_sighup_reopens_logs_and_metrics(tmp_path: Path) -> None:
    require_tools("qemu-io")
    port = _free_port()
    gcfg = tmp_path / "overlaybd.json"
    gcfg.write_text(json.dumps({
        "logConfig": {"logPath": str(tmp_path / "obd.log"), "logLevel": 0},
        "auditPath": str(tmp_path / "audit.log"),
        "exporterConfig": {"enable": True, "port": port, "uriPrefix": "/custom"},
    }))  # fmt: skip
    cfg = writable_image(tmp_path, "d")
    with ServeProcess(["--listen", "127.0.0.1:0", "--config", str(gcfg), str(cfg)]) as sp:
        run(["qemu-io", "-f", "raw", "-c", "read 0 1M", sp.uri("d")])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/custom", timeout=5).read().decode()
        assert "OverlayBD_Alive{" in body
        assert 'OverlayBD_Count{node="pread",type=""} 1.048576e+06' in body
        for name in ("OverlayBD_Read_Throughtput", "OverlayBD_QPS", "OverlayBD_MaxLatency"):
            assert f"# TYPE {name} gauge" in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        log = tmp_path / "obd.log"
        assert "listening on" in log.read_text()
        os.rename(log, tmp_path / "obd.log.1")
        sp.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.exists()
        assert (tmp_path / "audit.log").exists()
        assert sp.stop() == 0


# -- configs, results, audit ------------------------------------------------------------------


def test_global_config_defaults_and_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = GlobalConfig()
    assert d.exporterConfig.port == 9863 and d.exporterConfig.uriPrefix == "/metrics"
    assert d.enableAudit is True and d.gzipCacheConfig.refillSize == 1048576
    assert d.effective_log.logPath == "/var/log/overlaybd.log"
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"logConfig": {"logPath": "/x.log"}, "frobnicate": 1,
                             "cacheConfig": {"cacheType": "ocf"}}))  # fmt: skip
    cfg = load_global_config(p)
    assert cfg.effective_log.logPath == "/x.log" and cfg.effective_cache_type == "ocf"
    assert "frobnicate" in caplog.text
    for doc, key in [
        ({"exporterConfig": {"port": "80"}}, "exporterConfig.port"),
        ({"cacheConfig": {"cacheType": "tmpfs"}}, "cacheConfig.cacheType"),
        ({"enableAudit": "yes"}, "enableAudit"),
        ({"logConfig": []}, "logConfig"),
        ({"ioEngine": 3}, "ioEngine"),
    ]:
        with pytest.raises(ConfigError, match=key) as ei:
            parse_global_config(doc, "g.json")
        assert "g.json" in str(ei.value)
    p.write_text("{")
    with pytest.raises(ConfigError, match="bad JSON"):
        load_global_config(p)
    with pytest.raises(FileAccessError):
        load_global_config(tmp_path / "absent.json")


def test_result_file_and_reasons(tmp_path: Path) -> None:
    r = tmp_path / "result"
    write_success(str(r))
    assert r.read_bytes() == b"success"
    write_failure(str(r), "failed to open layer 2")
    assert r.read_bytes() == b"failed:failed to open layer 2"
    assert [p.name for p in tmp_path.iterdir()] == ["result"]
    from obd.errors import CorruptError

    assert (
        failure_reason(CorruptError("bad", path="/l/b"), ["/l/a", "/l/b"])
        == "failed to open layer 1"
    )
    assert failure_reason(FileAccessError("no such file", path="/l/a"), ["/l/a"]) == (
        "failed to open local file /l/a"
    )


class _Events:
    """An obd.io tracer that keeps the names of the calls it is told of, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: object) -> int:
            self.seen.append((name, args[0] if args else None))
            return len(self.seen)

        return record


def test_result_file_is_durable(tmp_path: Path) -> None:
    """The resultFile is fsynced, renamed into place, then its folder is fsynced (else a
    crash can lose the rename: issue 8)."""
    from obd.io import trace

    folder = tmp_path / "run"
    folder.mkdir()
    with trace.tracing(_Events()) as t:  # type: ignore[arg-type]
        write_success(str(folder / "result"))
    names = [name for name, _ in t.seen]  # type: ignore[attr-defined]
    assert "rename" in names and "fsync_dir" in names, names
    rename = names.index("rename")
    assert "fsync" in names[:rename], "the content is not fsynced before the rename"
    assert ("fsync_dir", str(folder)) in t.seen[rename:], "the folder is not fsynced after"  # type: ignore[attr-defined]
    assert (folder / "result").read_bytes() == b"success"


def test_audit_line_format(tmp_path: Path) -> None:
    a = AuditLog(str(tmp_path / "audit.log"))
    a.pread("/img.json", 4096, 512, 9_999)  # below 10 ms: not audited
    a.pread("/img.json", 4096, 512, 12_345)
    a.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 1
    import re

    assert re.fullmatch(
        r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{6}\|AUDIT\|th=[0-9a-f]{16}\|file:pread"
        r"\[pathname=/img\.json\]\[offset=4096\]\[size=512\]\[latency=12345\]",
        lines[0],
    ), lines[0]
    logs = setup_logs(GlobalConfig(), use_files=False)
    assert logs.main is None and logs.audit is None


def test_service_in_process_with_metrics(tmp_path: Path) -> None:
    """NbdService directly: port 0 for both NBD and metrics; stop flushes the upper."""
    cfg = writable_image(tmp_path, "svc")
    from dataclasses import replace

    g = GlobalConfig()
    g = replace(g, exporterConfig=replace(g.exporterConfig, enable=True, port=0),
                auditPath=str(tmp_path / "a.log"), logConfig=replace(g.logConfig, logPath=str(tmp_path / "l.log")))  # fmt: skip
    svc = NbdService([ImageSpec.parse(str(cfg))], global_config=g, tcp=("127.0.0.1", 0))
    addrs = svc.start()
    try:
        port = int(addrs[0].rsplit(":", 1)[1])
        c = RawClient(port, "svc")
        assert c.write(0, b"m" * 4096) == 0
        assert c.read(0, 4096) == (0, b"m" * 4096)
        c.disconnect()
        exporter = svc.exporter
        assert exporter is not None
        body = urllib.request.urlopen(exporter.url, timeout=5).read().decode()  # type: ignore[attr-defined]
        assert 'OverlayBD_Count{node="pread",type=""} 4096.0' in body
    finally:
        assert svc.stop() == []
    from obd.image import open_image

    with open_image(str(cfg)) as img:
        assert img.pread(0, 4096) == b"m" * 4096


# -- a real block device: nbdfuse + loop + ext4 -------------------------------------------------


def test_ext4_through_nbdfuse_and_loop(tmp_path: Path) -> None:
    require_tools("mkfs.ext4", "debugfs", "nbdcopy")
    require_kernel_mount()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(300_000), "sub/b.txt": b"hello overlaybd\n" * 1000, "empty": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    fs = tmp_path / "fs.img"
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(fs), "32M"])
    cfg = writable_image(tmp_path, "fsdisk", "32M")
    with ServeProcess(["--listen", "127.0.0.1:0", str(cfg)]) as sp:
        uri = sp.uri("fsdisk")
        run(["nbdcopy", str(fs), uri])  # the filesystem goes in through NBD writes
        with kernel_mounted(uri, tmp_path, writable=True) as mnt:
            for rel, data in files.items():
                assert (mnt / rel).read_bytes() == data, rel
            (mnt / "new.txt").write_bytes(b"written through the kernel\n" * 100)
            os.sync()
        assert sp.stop() == 0
    obd(
        "commit",
        str(tmp_path / "fsdisk.data"),
        str(tmp_path / "fsdisk.index"),
        str(tmp_path / "fs.lsmt"),
    )
    cfg2 = image_config(tmp_path, "fsc", lowers=[str(tmp_path / "fs.lsmt")])
    from obd.image import open_image

    out = tmp_path / "committed.img"
    with open_image(str(cfg2)) as img, open(out, "wb") as f:
        for off in range(0, img.size(), 4 * MiB):
            f.write(img.pread(off, 4 * MiB))
    got = run(["debugfs", "-R", "cat /new.txt", str(out)]).stdout
    assert got == "written through the kernel\n" * 100


# -- helpers -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pipelined_requests_on_one_connection(server) -> None:  # type: ignore[no-untyped-def]
    """Many requests sent before any reply is read: replies gathered in one send still
    come back complete and in order, reads see the writes sent before them."""
    _, port = server
    c = RawClient(port, "rw")
    cookies = []
    for i in range(200):
        cookies.append(
            c.send_request(N.NBD_CMD_WRITE, i * 4096, 4096, 0, bytes([i % 250 + 1]) * 4096)
        )
        cookies.append(c.send_request(N.NBD_CMD_READ, i * 4096, 4096))
    cookies.append(c.send_request(N.NBD_CMD_FLUSH, 0, 0))
    for i in range(200):
        err, cookie = c.simple_reply()
        assert (err, cookie) == (0, cookies[2 * i])
        err, cookie = c.simple_reply()
        assert (err, cookie) == (0, cookies[2 * i + 1])
        assert c.recv(4096) == bytes([i % 250 + 1]) * 4096
    assert c.simple_reply() == (0, cookies[-1])
    c.disconnect()
