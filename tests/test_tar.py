"""Tar wrapper (docs/formats.md §0.5) and wrapper sniffing (§0.4)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from obd.errors import CorruptError
from obd.formats.sniff import open_zfile, peel_tar, unwrap
from obd.formats.tar import (
    BASE_OFFSET,
    TarView,
    TarWriter,
    is_tar,
    pax_record,
    tar_headers,
    wrap,
)
from obd.formats.zfile import ZFileReader
from obd.io.file import open_file
from tests.test_zfile import MemFile, zcompress
from tests.vectors import require_vectors


def _tar_of(payload: bytes) -> bytes:
    """The bytes of the tar that ``wrap`` makes around ``payload``."""
    out = MemFile()
    wrap(MemFile(payload), out)
    return bytes(out.buf)


def test_vector_reproduced_byte_for_byte() -> None:
    """zfile_a_tar.tar from zfile_a_lz4_default.zfile's bytes.

    The vector's member mode is ``100644`` (a regular file, 0644): upstream stores the
    output's ``st_mode``; we pass the same value.
    """
    vdir = require_vectors()
    expected = (vdir / "zfile_a_tar.tar").read_bytes()
    assert expected[1024 + 100 : 1024 + 108] == b"100644 \0"
    payload = (vdir / "zfile_a_lz4_default.zfile").read_bytes()
    out = MemFile()
    size = wrap(MemFile(payload), out, mode=stat.S_IFREG | 0o644)
    assert size == len(expected)
    assert bytes(out.buf) == expected


def test_vector_view() -> None:
    vdir = require_vectors()
    blob = (vdir / "zfile_a_tar.tar").read_bytes()
    payload = (vdir / "zfile_a_lz4_default.zfile").read_bytes()
    assert is_tar(blob[:512])
    v = TarView(MemFile(blob))
    assert v.offset == 1536 and v.size() == len(payload)
    assert v.pax == {"size": str(len(payload))}
    assert v.member.name == b"overlaybd.commit"
    assert v.pread(0, len(payload) + 999) == payload
    assert v.pread(len(payload), 5) == b""
    assert v.pread(100, 10) == payload[100:110]


@pytest.mark.parametrize("n", [0, 1, 4, 5, 94, 95, 96, 994, 995, 10**9, 10**12])
def test_pax_record_length(n: int) -> None:
    rec = pax_record("size", str(n))
    length, _, rest = rec.partition(b" ")
    assert int(length) == len(rec)
    assert rest == b"size=%d\n" % n


def test_header_fields() -> None:
    h = tar_headers(294043, 0o100644, b"root", b"root")
    assert len(h) == 1536
    pax, data, member = h[:512], h[512:1024], h[1024:]
    assert pax[:13] == b"overlaybd.pax" and pax[156:157] == b"x"
    assert pax[124:136] == b"         17 " and pax[100:124] == bytes(24)
    assert data.rstrip(b"\0") == b"15 size=294043\n"
    assert member[:16] == b"overlaybd.commit" and member[156:157] == b"0"
    assert member[108:116] == b"     0 \0" and member[124:136] == b"          0 "
    assert member[257:265] == b"ustar\x0000" and member[265:269] == b"root"
    assert is_tar(pax) and is_tar(member)


def test_writer_layout_and_mode_from_fstat(tmp_path: Path) -> None:
    payload = os.urandom(5000)
    f = open_file(tmp_path / "x.tar", writable=True, create=True, mode=0o600)
    os.fchmod(f.fd, 0o640)
    with TarWriter(f) as w:
        w.pwrite(0, payload[:3000])
        w.pwrite(3000, payload[3000:])
        assert w.size() == 5000 and w.pread(10, 5) == payload[10:15]
    f.close()
    blob = (tmp_path / "x.tar").read_bytes()
    assert len(blob) == -(-(BASE_OFFSET + 5000) // 512) * 512 + 1024
    assert blob[1024 + 100 : 1024 + 108] == b"100640 \0"
    assert blob[BASE_OFFSET : BASE_OFFSET + 5000] == payload
    assert blob[BASE_OFFSET + 5000 :] == bytes(len(blob) - BASE_OFFSET - 5000)
    # Python's tarfile agrees on the member and its size
    with tarfile.open(tmp_path / "x.tar") as t:
        (m,) = t.getmembers()
        assert m.name == "overlaybd.commit" and m.size == 5000
        ef = t.extractfile(m)
        assert ef is not None and ef.read() == payload


def test_empty_payload() -> None:
    out = MemFile()
    assert wrap(MemFile(b""), out) == 1536 + 1024
    v = TarView(MemFile(bytes(out.buf)))
    assert v.size() == 0 and v.pread(0, 10) == b""


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_view_of_python_tars(fmt: int) -> None:
    payload = os.urandom(3000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        info = tarfile.TarInfo("blob")
        info.size = len(payload)
        if fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "x" * 700}  # pax data over one block
        t.addfile(info, io.BytesIO(payload))
    if fmt == tarfile.GNU_FORMAT:
        # GNU magic is "ustar  " with version " \0": upstream's check (and ours) says no.
        assert not is_tar(buf.getvalue()[:512])
        return
    v = TarView(MemFile(buf.getvalue()))
    assert v.pread(0, 10_000) == payload


def test_not_tar_and_corrupt() -> None:
    assert not is_tar(b"\0" * 512)
    assert not is_tar(b"short")
    blob = _tar_of(b"hello" * 300)
    broken = bytearray(blob)
    broken[5] ^= 1  # checksum no longer matches: not a tar at all
    assert not is_tar(bytes(broken[:512]))
    with pytest.raises(CorruptError, match="not a tar"):
        TarView(MemFile(bytes(broken)))
    with pytest.raises(CorruptError, match="past the end"):
        TarView(MemFile(blob[:1600]))
    bad_member = bytearray(blob)
    bad_member[1024 + 150] ^= 1
    with pytest.raises(CorruptError, match="member"):
        TarView(MemFile(bytes(bad_member)))


def test_unwrap_all_nestings() -> None:
    plain = b"plain bytes " * 1000
    z = zcompress(plain)
    tz = _tar_of(z)
    tp = _tar_of(plain)
    for blob, wrappers in ((plain, []), (z, ["zfile"]), (tz, ["tar", "zfile"]), (tp, ["tar"])):
        src = MemFile(blob)
        view, found = unwrap(src)
        assert found == wrappers
        assert view.pread(0, len(plain) + 1) == plain
        assert isinstance(view, ZFileReader) == ("zfile" in wrappers)
        view.close()
        assert src.closed
    bad = bytearray(tz)
    bad[BASE_OFFSET + 30] ^= 0xFF  # ZFile header digest
    with pytest.raises(CorruptError, match="digest"):
        unwrap(MemFile(bytes(bad)))


def test_peel_tar_and_open_zfile() -> None:
    plain = b"payload " * 999
    z = zcompress(plain)
    tz = _tar_of(z)
    assert peel_tar(MemFile(tz)).pread(0, len(z)) == z
    raw = MemFile(z)
    assert peel_tar(raw) is raw
    with pytest.raises(CorruptError, match="not a tar"):
        peel_tar(MemFile(z), required=True, path="x")
    for blob in (z, tz):
        assert open_zfile(MemFile(blob)).pread(0, len(plain)) == plain
    assert open_zfile(MemFile(tz), tar_required=True).size() == len(plain)
    with pytest.raises(CorruptError, match="not a ZFile"):
        open_zfile(MemFile(plain))
    with pytest.raises(CorruptError, match="not a tar"):
        open_zfile(MemFile(z), tar_required=True)
