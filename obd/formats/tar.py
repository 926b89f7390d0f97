"""The tar wrapper of ``-t`` outputs (docs/formats.md §0.5).

A wrapped blob is a pax extended header ``overlaybd.pax`` (one record ``size=<n>``), a
ustar header ``overlaybd.commit``, the payload at byte 1536, zero padding to a multiple
of 512 and two zero blocks. :class:`TarView` reads the payload of any tar whose first
member is the payload (offset 512, or after the pax header); :class:`TarWriter` writes
the exact upstream layout.

Mode bits: upstream stores the output file's ``st_mode`` (file-type bits included), e.g.
``100644`` for a 0644 regular file, which is what the reference vector holds.
:class:`TarWriter` takes the mode from ``fstat`` of the output when it has a file
descriptor, else ``0o100644``; pass ``mode=`` to choose.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from obd.errors import CorruptError
from obd.formats.problem import CORRUPTION, Problem, raise_first
from obd.io.base import ReadAt, WriteAt

BLOCK = 512
BASE_OFFSET = 3 * BLOCK  # where the writer puts the payload
PAX_NAME = b"overlaybd.pax"
MEMBER_NAME = b"overlaybd.commit"
DEFAULT_MODE = stat.S_IFREG | 0o644

# ustar header field offsets
_NAME, _MODE, _UID, _GID, _SIZE, _MTIME, _CHKSUM, _TYPE = 0, 100, 108, 116, 124, 136, 148, 156
_MAGIC, _VERSION, _UNAME, _GNAME = 257, 263, 265, 297


@dataclass(frozen=True, slots=True)
class TarHeader:
    """The fields of a ustar header block that the wrapper uses."""

    name: bytes
    mode: int
    size: int
    typeflag: bytes
    magic: bytes
    version: bytes

    @classmethod
    def unpack(cls, block: bytes) -> TarHeader:
        if len(block) < BLOCK:
            raise CorruptError("tar header block is truncated")
        return cls(
            name=block[_NAME : _NAME + 100].split(b"\0", 1)[0],
            mode=_parse_number(block[_MODE : _MODE + 8]),
            size=_parse_number(block[_SIZE : _SIZE + 12]),
            typeflag=block[_TYPE : _TYPE + 1],
            magic=block[_MAGIC : _MAGIC + 6],
            version=block[_VERSION : _VERSION + 2],
        )


_OCTAL = frozenset(b"01234567")


def _parse_number(field: bytes) -> int:
    """A numeric header field: octal digits (space/NUL padded) or GNU base-256."""
    if field and field[0] & 0x80:  # GNU base-256 (bit 6 set: negative, refused)
        if field[0] & 0x40:
            raise CorruptError(f"negative number {field!r} in tar header")
        value = field[0] & 0x3F
        for b in field[1:]:
            value = value << 8 | b
        return value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if not set(text) <= _OCTAL:  # int() would also take a sign, "_" and spaces inside
        raise CorruptError(f"bad number {field!r} in tar header")
    return int(text, 8)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[_CHKSUM : _CHKSUM + 8].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    rest = block[:_CHKSUM] + b" " * 8 + block[_CHKSUM + 8 : BLOCK]
    unsigned = sum(rest)
    signed = sum(b - 256 if b > 127 else b for b in rest)
    return stored in (unsigned, signed)


def is_tar(head: bytes | bytearray | memoryview) -> bool:
    """Block 0 has magic ``ustar``, version ``00`` and a valid checksum (§0.5 reader)."""
    block = bytes(head[:BLOCK])
    if len(block) < BLOCK:
        return False
    return (
        block[_MAGIC : _MAGIC + 5] == b"ustar"
        and block[_VERSION : _VERSION + 2] == b"00"
        and _checksum_ok(block)
    )


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"<len> key=value\\n"`` records (invalid tails end the parse)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            n = int(data[pos:sp])
        except ValueError:
            break
        if n <= 0 or pos + n > len(data):
            break
        rec = data[sp + 1 : pos + n].rstrip(b"\n")
        key, eq, value = rec.partition(b"=")
        if eq:
            out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return out


MAX_PAX_SIZE = 1 << 20  # a pax header of the wrapper holds one short record


@dataclass
class TarFacts:
    """What :func:`validate_tar` learnt: the payload's place and the headers."""

    pax: dict[str, str] = field(default_factory=dict)
    member: TarHeader | None = None
    offset: int = 0  # where the payload starts
    size: int = 0  # payload bytes
    ok: bool = False  # the payload can be read


def _header_at(block: bytes, at: int) -> TarHeader | Problem:
    try:
        return TarHeader.unpack(block)
    except CorruptError as e:
        return Problem(CORRUPTION, "tar", e.message, at)


def validate_tar(src: ReadAt, facts: TarFacts | None = None) -> Iterator[Problem]:
    """What is wrong with the tar wrapper at ``src`` (§0.5): the problem that stops
    :class:`TarView` (and ``obd check``) from finding the payload, if any."""
    facts = facts if facts is not None else TarFacts()
    total = src.size()
    head = src.pread(0, BLOCK)
    if not is_tar(head):
        yield Problem(CORRUPTION, "tar", "not a tar file (no valid ustar header)", 0)
        return
    h = _header_at(head, 0)
    if isinstance(h, Problem):
        yield h
        return
    offset = BLOCK
    if h.typeflag in (b"x", b"g"):
        if h.size > min(MAX_PAX_SIZE, total - BLOCK):
            yield Problem(
                CORRUPTION, "tar",
                f"tar pax header size {h.size} runs past the end of the file or is too large",
                _SIZE,
            )  # fmt: skip
            return
        data = src.pread(BLOCK, h.size)
        if len(data) < h.size:
            yield Problem(CORRUPTION, "tar", "tar pax header is truncated", BLOCK)
            return
        facts.pax = _pax_records(data)
        moff = BLOCK + -(-h.size // BLOCK) * BLOCK
        member = src.pread(moff, BLOCK)
        if not is_tar(member):
            yield Problem(CORRUPTION, "tar", "bad tar member header after pax", moff)
            return
        h = _header_at(member, moff)
        if isinstance(h, Problem):
            yield h
            return
        offset = moff + BLOCK
    size = h.size
    if "size" in facts.pax:
        text = facts.pax["size"]
        if not (text.isascii() and text.isdigit()):
            yield Problem(CORRUPTION, "tar", f"bad pax size record {text!r}", BLOCK)
            return
        size = int(text)
    if offset + size > total:
        yield Problem(
            CORRUPTION, "tar",
            f"tar payload [{offset}, {offset + size}) runs past the end ({total} bytes)",
            total,
        )  # fmt: skip
        return
    facts.member, facts.offset, facts.size, facts.ok = h, offset, size, True


class TarView:
    """The payload of a tar-wrapped blob as a ReadAt. ``close()`` closes the source."""

    def __init__(self, src: ReadAt, *, path: str | None = None) -> None:
        self._src = src
        self.path = path if path is not None else getattr(src, "path", None)
        facts = TarFacts()
        raise_first(validate_tar(src, facts), self.path)
        assert facts.member is not None
        self.pax: dict[str, str] = facts.pax
        self.member = facts.member
        self.offset = facts.offset
        self._size = facts.size

    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        return self._src.pread(self.offset + offset, end - offset)

    def evict(self, offset: int, length: int) -> None:
        ev = getattr(self._src, "evict", None)
        if ev is not None:
            ev(self.offset + offset, length)

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> TarView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ writer


def _octal(value: int, width: int) -> bytes:
    """Numeric field: ``width-2`` space-padded octal digits, space, NUL (8-byte fields);
    ``width-1`` digits and a space for 12-byte fields (§0.5)."""
    if width == 8:
        return b"%6o \0" % value
    return b"%11o " % value


def _finish_block(block: bytearray) -> bytes:
    block[_CHKSUM : _CHKSUM + 8] = b" " * 8
    block[_CHKSUM : _CHKSUM + 8] = b"%6o \0" % sum(block)
    return bytes(block)


def _root_names() -> tuple[bytes, bytes]:
    try:
        import grp
        import pwd

        return pwd.getpwuid(0).pw_name.encode(), grp.getgrgid(0).gr_name.encode()
    except (ImportError, KeyError):
        return b"root", b"root"


def pax_record(key: str, value: str) -> bytes:
    """``"<len> key=value\\n"`` where ``<len>`` counts the whole record, itself included."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def tar_headers(payload_size: int, mode: int, uname: bytes, gname: bytes) -> bytes:
    """The three 512-byte blocks the upstream writer puts in front of the payload."""
    record = pax_record("size", str(payload_size))
    pax = bytearray(BLOCK)
    pax[_NAME : _NAME + len(PAX_NAME)] = PAX_NAME
    pax[_SIZE : _SIZE + 12] = _octal(len(record), 12)
    pax[_TYPE] = ord("x")
    pax[_MAGIC : _MAGIC + 6] = b"ustar\0"
    pax[_VERSION : _VERSION + 2] = b"00"
    data = bytearray(BLOCK)
    data[: len(record)] = record
    member = bytearray(BLOCK)
    member[_NAME : _NAME + len(MEMBER_NAME)] = MEMBER_NAME
    member[_MODE : _MODE + 8] = _octal(mode, 8)
    member[_UID : _UID + 8] = _octal(0, 8)
    member[_GID : _GID + 8] = _octal(0, 8)
    member[_SIZE : _SIZE + 12] = _octal(0, 12)
    member[_MTIME : _MTIME + 12] = _octal(0, 12)
    member[_TYPE] = ord("0")
    member[_MAGIC : _MAGIC + 6] = b"ustar\0"
    member[_VERSION : _VERSION + 2] = b"00"
    member[_UNAME : _UNAME + len(uname)] = uname[:31]
    member[_GNAME : _GNAME + len(gname)] = gname[:31]
    return _finish_block(pax) + bytes(data) + _finish_block(member)


class TarWriter:
    """A WriteAt whose offset 0 is byte 1536 of ``out``; ``close`` writes the wrapper.

    The payload goes to ``out`` at 1536 + offset; on ``close`` the three header blocks
    are written at 0 and two zero blocks at ``roundup(1536 + payload, 512)``. ``mode`` is
    the ustar member mode (default: ``st_mode`` of ``out`` when it has an ``fd``, else
    ``0o100644``). ``close`` does not close ``out``.
    """

    def __init__(self, out: WriteAt, *, mode: int | None = None) -> None:
        self.out = out
        self.mode = mode
        self._end = 0
        self._closed = False
        out.pwrite(0, bytes(BASE_OFFSET))

    def size(self) -> int:
        return self._end

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self._end)
        if offset >= end:
            return b""
        return self.out.pread(BASE_OFFSET + offset, end - offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("write to a closed TarWriter")
        self.out.pwrite(BASE_OFFSET + offset, data)
        self._end = max(self._end, offset + len(data))

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        mode = self.mode
        if mode is None:
            fd = getattr(self.out, "fd", None)
            mode = os.fstat(fd).st_mode if isinstance(fd, int) and fd >= 0 else DEFAULT_MODE
        uname, gname = _root_names()
        self.out.pwrite(0, tar_headers(self._end, mode, uname, gname))
        end = -(-(BASE_OFFSET + self._end) // BLOCK) * BLOCK
        self.out.pwrite(end, bytes(2 * BLOCK))

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()


def wrap(payload: ReadAt, out: WriteAt, *, mode: int | None = None, chunk: int = 8 << 20) -> int:
    """Write ``payload`` into ``out`` inside the upstream tar wrapper; returns total size."""
    w = TarWriter(out, mode=mode)
    total = payload.size()
    pos = 0
    while pos < total:
        data = payload.pread(pos, min(chunk, total - pos))
        if not data:
            raise CorruptError("payload shrank while wrapping", offset=pos)
        w.pwrite(pos, data)
        pos += len(data)
    w.close()
    return -(-(BASE_OFFSET + total) // BLOCK) * BLOCK + 2 * BLOCK
