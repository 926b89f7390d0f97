"""The OCI layer rules (opencontainers/image-spec ``layer.md``) over a streamed tar.

A layer is a tar (plain, gzip or zstd) of changes against the layers below it:

- an entry adds or replaces its path; a directory over an existing directory only
  updates its metadata (the lower directory's content stays), any other entry first
  removes what is at its path (a file, a symlink, or a whole tree);
- ``DIR/.wh.NAME`` deletes ``DIR/NAME`` of the lower layers (a file or a whole tree);
- ``DIR/.wh..wh..opq`` hides everything the lower layers had in ``DIR``, not what this
  layer adds there (whatever the order of the entries); other ``.wh..wh.*`` names are
  AUFS metadata and ignored;
- a whiteout only applies to lower layers: what this layer itself adds is kept;
- a hardlink names a file of this layer or of a lower one; missing parent directories
  are made (0755, root); a parent that is a symlink is followed (by the target).

:func:`read_layer` turns a byte stream into :data:`Op` values (and checks the stream's
SHA-256, the layer's ``diff_id``); :func:`apply_ops` applies them to any :class:`Target`
(the ext4 filesystem of an image in :mod:`obd.oci.ext4`, a plain dict in the tests).
"""

from __future__ import annotations

import base64
import enum
import gzip
import hashlib
import io
import posixpath
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Protocol

from obd.errors import CorruptError, UnsupportedError, UsageError

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20


class Kind(enum.Enum):
    REG = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCK = "socket"


_TAR_KINDS = {
    tarfile.REGTYPE: Kind.REG,
    tarfile.AREGTYPE: Kind.REG,
    tarfile.CONTTYPE: Kind.REG,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}


@dataclass(slots=True)
class Entry:
    """One tar entry, normalized: ``path`` is relative to the root ("" is the root),
    ``mode`` the permission bits with setuid/setgid/sticky (no type bits),
    ``mtime_ns`` nanoseconds since the epoch, ``linkname`` a symlink's target as
    written or a hardlink's normalized target path."""

    path: str
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Whiteout:
    path: str


@dataclass(frozen=True, slots=True)
class Opaque:
    path: str


Op = Entry | Whiteout | Opaque


def normalize(name: str) -> str:
    """A tar member name as a path relative to the root; ``..`` cannot climb above it."""
    if name and not name.startswith((".", "/")) and "/." not in name and "//" not in name:
        return name.rstrip("/")  # already clean (most names)
    p = posixpath.normpath("/" + name).lstrip("/")
    return "" if p == "." else p


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


class TarReader:
    """A streaming tar reader: ustar, GNU (long names ``L``/``K``, base-256 numbers) and
    PAX (``x``/``g`` records, ``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``) headers.

    Each member is yielded with the reader of its data (regular files only), which must be
    read before the next member; what it leaves unread is skipped. Faster than
    ``tarfile`` in stream mode by a few times on many small files, and it keeps PAX values
    as bytes (xattr values are binary).
    """

    def __init__(self, src: IO[bytes], name: str) -> None:
        self.src = src
        self.name = name
        self.offset = 0
        self.globals: dict[bytes, bytes] = {}

    def _read(self, n: int) -> bytes:
        data = self.src.read(n)
        if len(data) < n:
            raise CorruptError(
                f"the layer tar is truncated (ends at byte {self.offset + len(data)})",
                path=self.name,
            )
        self.offset += n
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            k = min(n, CHUNK)
            self._read(k)
            n -= k

    def _bad(self, what: str, at: int) -> CorruptError:
        return CorruptError(f"not a valid tar: {what}", path=self.name, offset=at)

    def _num(self, field_: bytes, at: int) -> int:
        try:
            return int(field_.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            pass
        if field_ and field_[0] & 0x80:
            v = int.from_bytes(field_[1:], "big")
            return v if field_[0] == 0x80 else v - (1 << (8 * (len(field_) - 1)))
        t = field_.split(b"\0", 1)[0].strip(b" ")
        if not t:
            return 0
        try:
            return int(t, 8)
        except ValueError:
            raise self._bad(f"bad number {t!r} in the header", at) from None

    def _pax(self, data: bytes, at: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        pos = 0
        while pos < len(data):
            if data[pos] == 0:
                break
            sp = data.find(b" ", pos)
            try:
                length = int(data[pos:sp])
            except ValueError:
                raise self._bad("bad PAX record", at) from None
            rec = data[sp + 1 : pos + length]
            if length <= 0 or sp < 0 or not rec.endswith(b"\n") or b"=" not in rec:
                raise self._bad("bad PAX record", at)
            k, _, v = rec[:-1].partition(b"=")
            out[k] = v
            pos += length
        return out

    def __iter__(self) -> Iterator[tuple[TarMember, dict[bytes, bytes], _Member | None]]:
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            at = self.offset
            hdr = self.src.read(512)
            if not hdr:
                if at == 0:
                    raise self._bad("empty stream", at)
                # tar writers end with zero blocks: a stream that stops between members
                # was cut (GNU tar and tarfile accept it; a layer must not lose files)
                raise CorruptError(
                    f"the layer tar is truncated (no end-of-archive block after byte {at})",
                    path=self.name,
                )
            if len(hdr) < 512 and at == 0:
                raise self._bad(f"only {len(hdr)} bytes", at)
            if len(hdr) < 512:
                raise CorruptError(
                    f"the layer tar is truncated (ends at byte {at + len(hdr)})", path=self.name
                )
            self.offset += 512
            if hdr.count(0) == 512:
                return
            stored = self._num(hdr[148:156], at)
            unsigned = sum(hdr) - sum(hdr[148:156]) + 256
            if stored != unsigned:
                signed = unsigned - 256 - sum(b - 256 if b > 127 else b for b in hdr[148:156])
                if stored != signed + 256:
                    raise self._bad("header checksum mismatch", at)
            typ = hdr[156:157]
            size = self._num(hdr[124:136], at)
            if typ in (b"x", b"g", b"L", b"K"):
                if size > 64 << 20:
                    raise self._bad(f"a {size}-byte extended header", at)
                data = self._read(size)
                self._skip(-size % 512)
                if typ == b"x":
                    pax.update(self._pax(data, at))
                elif typ == b"g":
                    for k, v in self._pax(data, at).items():
                        if v:
                            self.globals[k] = v
                        else:
                            self.globals.pop(k, None)
                elif typ == b"L":
                    longname = data.split(b"\0", 1)[0]
                else:
                    longlink = data.split(b"\0", 1)[0]
                continue
            if typ in (b"S", b"M"):
                raise UnsupportedError(
                    "GNU sparse and multi-volume tar members are not supported", path=self.name
                )
            hdrs = {**self.globals, **pax} if self.globals else pax
            pax = {}
            if any(k.startswith(b"GNU.sparse.") for k in hdrs):
                raise UnsupportedError("GNU sparse tar members are not supported", path=self.name)
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:263] == b"ustar\0":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            if longname is not None:
                name, longname = longname, None
            link = hdr[157:257].split(b"\0", 1)[0]
            if longlink is not None:
                link, longlink = longlink, None
            if typ in (b"\0", b""):
                typ = b"0"
            if typ == b"0" and name.endswith(b"/"):
                typ = b"5"
            m = TarMember()
            m.type = typ
            m.mode = self._num(hdr[100:108], at)
            m.uid = self._num(hdr[108:116], at)
            m.gid = self._num(hdr[116:124], at)
            m.mtime = self._num(hdr[136:148], at)
            m.devmajor = self._num(hdr[329:337], at) if typ in (b"3", b"4") else 0
            m.devminor = self._num(hdr[337:345], at) if typ in (b"3", b"4") else 0
            if hdrs:
                name = hdrs.get(b"path", name)
                link = hdrs.get(b"linkpath", link)
                for key, attr in ((b"size", "size"), (b"uid", "uid"), (b"gid", "gid")):
                    if key in hdrs:
                        try:
                            num = int(hdrs[key])
                        except ValueError:
                            raise self._bad(f"bad PAX {key.decode()}", at) from None
                        if attr == "size":
                            size = num
                        else:
                            setattr(m, attr, num)
            m.name = name.decode("utf-8", "surrogateescape")
            m.linkname = link.decode("utf-8", "surrogateescape")
            has_data = typ in (b"0", b"7") or typ not in b"123456"
            m.size = size if has_data else 0
            member = _Member(self, size) if has_data and size else None
            yield m, hdrs, member
            if has_data:
                left = member.left if member is not None else 0
                self._skip(left + (-size % 512))


class TarMember:
    """A tar header's fields, named as :class:`tarfile.TarInfo` names them."""

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime",
        "name",
        "size",
        "type",
        "uid",
    )

    def __init__(self) -> None:
        self.name = self.linkname = ""
        self.type = b"0"
        self.mode = self.uid = self.gid = self.mtime = self.size = 0
        self.devmajor = self.devminor = 0


class _Member:
    """The data of one tar member, read in order; short reads mean truncation."""

    __slots__ = ("left", "r")

    def __init__(self, r: TarReader, size: int) -> None:
        self.r = r
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        if not n:
            return b""
        data = self.r._read(n)
        self.left -= n
        return data


def _xattrs(pax: dict[bytes, bytes]) -> tuple[tuple[str, bytes], ...]:
    out: list[tuple[str, bytes]] = []
    for k, v in pax.items():
        if k.startswith(b"SCHILY.xattr."):
            out.append((k[len(b"SCHILY.xattr.") :].decode("utf-8", "surrogateescape"), v))
        elif k.startswith(b"LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(k[len(b"LIBARCHIVE.xattr.") :])
            out.append(
                (
                    name.decode("utf-8", "surrogateescape"),
                    base64.b64decode(v + b"=" * (-len(v) % 4)),
                )
            )
    return tuple(sorted(out))


def _mtime_ns(m: TarMember | tarfile.TarInfo, pax: dict[bytes, bytes]) -> int:
    v = pax.get(b"mtime")
    if v is not None:
        sec, _, frac = v.decode("ascii", "replace").partition(".")
        try:
            whole = int(sec)
            part = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            return int(m.mtime) * 1_000_000_000
        neg = sec.strip().startswith("-")
        return whole * 1_000_000_000 + (-part if neg else part)
    return int(m.mtime) * 1_000_000_000


def op_of(m: TarMember | tarfile.TarInfo, pax: dict[bytes, bytes] | None = None) -> Op | None:
    """The operation a tar member stands for (``None``: nothing to do)."""
    pax = pax or {}
    path = normalize(m.name)
    base = posixpath.basename(path)
    if base.startswith(WHITEOUT_PREFIX):
        d = parent_of(path)
        if base == WHITEOUT_OPAQUE:
            return Opaque(d)
        if base.startswith(WHITEOUT_META_PREFIX):
            return None
        return Whiteout(join(d, base[len(WHITEOUT_PREFIX) :]))
    kind = _TAR_KINDS.get(m.type)
    if kind is None:
        return None
    linkname = m.linkname
    if kind is Kind.HARDLINK:
        linkname = normalize(linkname)
    return Entry(
        path=path,
        kind=kind,
        mode=m.mode & 0o7777,
        uid=m.uid,
        gid=m.gid,
        mtime_ns=_mtime_ns(m, pax),
        size=m.size if kind is Kind.REG else 0,
        linkname=linkname,
        devmajor=m.devmajor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        devminor=m.devminor if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        xattrs=_xattrs(pax) if pax else (),
    )


class _Hashing(io.RawIOBase):
    """A read-only stream that counts and hashes (SHA-256) what passes through it.

    (Hashing on a helper thread was tried: on a loaded machine the GIL hand-offs around
    every libext2fs call cost more wall time than the hashing itself.)"""

    def __init__(self, src: IO[bytes]) -> None:
        self.src = src
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def readinto(self, b: Any) -> int:
        into = getattr(self.src, "readinto", None)
        if into is not None:
            n = into(b) or 0
            self.sha.update(memoryview(b)[:n])
        else:
            data = self.src.read(len(b))
            n = len(data)
            b[:n] = data
            self.sha.update(data)
        self.count += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size) if size is not None and size >= 0 else self.src.read()
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read), then the rest of ``src``."""

    def __init__(self, head: bytes, src: IO[bytes]) -> None:
        self.head = head
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.src.read(len(b))
        b[: len(data)] = data
        return len(data)


def _peek(src: IO[bytes], n: int) -> tuple[IO[bytes], bytes]:
    """The first ``n`` bytes of ``src`` (fewer at its end) and a stream from its start;
    a pipe may hand them over one read at a time."""
    head = b""
    while len(head) < n:
        more = src.read(n - len(head))
        if not more:
            break
        head += more
    return io.BufferedReader(_Prefixed(head, src), CHUNK), head


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def _decompressed(src: IO[bytes], kind: str) -> IO[bytes]:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(
            src, read_size=CHUNK, read_across_frames=True
        )
    return src


def parse_checksum(checksum: str | None) -> str | None:
    """``sha256:<64 hex>`` -> the hex digest (lower case); anything else is a usage error."""
    if checksum is None:
        return None
    algo, _, hexd = checksum.partition(":")
    hexd = hexd.lower()
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise UsageError(f"checksum {checksum!r}: expected sha256:<64 hex digits>")
    return hexd


_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)


def _stream_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard

        return (*_STREAM_ERRORS, zstandard.ZstdError)
    except ImportError:  # pragma: no cover - a dependency
        return _STREAM_ERRORS


@dataclass
class LayerStream:
    """A layer tar being read: iterate :meth:`ops`, then :meth:`finish` for the digest.

    ``name`` names the source in errors. Each yielded regular file comes with a reader
    of its bytes that must be consumed before the next op (a stream: nothing seeks).
    """

    source: IO[bytes]
    name: str
    checksum: str | None = None
    compression: str = "none"
    digest: str = ""
    size: int = 0
    _hash: _Hashing | None = field(default=None, repr=False)

    def ops(self) -> Iterator[tuple[Op, IO[bytes] | None]]:
        errors = _stream_errors()
        src, head = _peek(self.source, 4)
        self.compression = compression_of(head)
        try:
            self._hash = _Hashing(_decompressed(src, self.compression))
            reader = io.BufferedReader(self._hash, CHUNK)
            for m, pax, data in TarReader(reader, self.name):
                op = op_of(m, pax)
                if op is None:
                    continue
                yield op, data  # type: ignore[misc]
        except errors as e:
            raise CorruptError(f"bad layer ({self.compression}): {e}", path=self.name) from e

    def finish(self) -> str:
        """Read what follows the tar's end marker, then check and return the digest."""
        assert self._hash is not None, "ops() first"
        errors = _stream_errors()
        try:
            self._hash.drain()
        except errors as e:
            raise CorruptError(f"bad layer tar ({self.compression}): {e}", path=self.name) from e
        hexd = self._hash.hexdigest()
        self.digest = "sha256:" + hexd
        self.size = self._hash.count
        want = parse_checksum(self.checksum)
        if want is not None and want != hexd:
            raise CorruptError(
                f"checksum mismatch: the uncompressed layer is {self.digest}, "
                f"expected sha256:{want}",
                path=self.name,
            )
        return self.digest


def read_layer(
    source: BinaryIO | IO[bytes], *, name: str = "-", checksum: str | None = None
) -> LayerStream:
    parse_checksum(checksum)
    return LayerStream(source, name, checksum)


class Target(Protocol):
    """A filesystem tree the rules apply to. Paths are relative to its root ("" is the
    root); a parent component that is a symlink is followed, the last one never."""

    def kind_of(self, path: str) -> Kind | None:
        """What is at ``path`` (never HARDLINK), ``None`` when nothing is; raises
        CorruptError when a parent is not a directory."""
        ...

    def children(self, path: str) -> list[str]: ...

    def remove(self, path: str) -> None:
        """Remove what is at ``path``, a whole tree for a directory."""
        ...

    def create(self, entry: Entry, data: IO[bytes] | None) -> None:
        """Make ``entry`` (not a hardlink) at its path, where nothing is."""
        ...

    def update_dir(self, entry: Entry) -> None:
        """Set an existing directory's mode, owner, mtime and xattrs."""
        ...

    def hardlink(self, entry: Entry) -> None:
        """Link ``entry.path`` (where nothing is) to the file at ``entry.linkname``."""
        ...


@dataclass
class ApplyCounts:
    entries: int = 0
    files: int = 0
    dirs: int = 0
    links: int = 0
    whiteouts: int = 0
    opaques: int = 0
    bytes: int = 0


def implicit_dir(path: str, like: Entry) -> Entry:
    """A missing parent directory an entry needs: 0755, root-owned, the entry's mtime."""
    return Entry(path=path, kind=Kind.DIR, mode=0o755, mtime_ns=like.mtime_ns)


def apply_ops(
    ops: Iterator[tuple[Op, IO[bytes] | None]],
    target: Target,
    *,
    name: str = "-",
) -> ApplyCounts:
    """Apply one layer's ops to ``target`` by the rules in this module's docstring."""
    counts = ApplyCounts()
    layer = _LayerPaths()
    for op, data in ops:
        counts.entries += 1
        if isinstance(op, Whiteout):
            counts.whiteouts += 1
            if op.path and op.path not in layer.added and target.kind_of(op.path) is not None:
                _hide(target, op.path, layer)
            continue
        if isinstance(op, Opaque):
            counts.opaques += 1
            if not op.path or target.kind_of(op.path) is Kind.DIR:
                for child in target.children(op.path):
                    _hide(target, join(op.path, child), layer)
            continue
        _ensure_parents(op, target, layer)
        existing = target.kind_of(op.path) if op.path else Kind.DIR
        if op.kind is Kind.DIR:
            counts.dirs += 1
            if existing is Kind.DIR:
                target.update_dir(op)
                layer.add(op.path)
                continue
        elif not op.path:
            raise CorruptError(f"the root is a {op.kind.value}, not a directory", path=name)
        if op.kind is Kind.HARDLINK:
            counts.links += 1
            if op.linkname == op.path:
                continue
            k = target.kind_of(op.linkname) if op.linkname else Kind.DIR
            if op.linkname.startswith(op.path + "/"):
                raise CorruptError(
                    f"hardlink {op.path} -> {op.linkname}: the target is inside the link",
                    path=name,
                )
            if k is None or k is Kind.DIR:
                what = "a directory" if k is Kind.DIR else "nothing"
                raise CorruptError(
                    f"hardlink {op.path} -> {op.linkname}: the target is {what}", path=name
                )
            if existing is not None:
                target.remove(op.path)
            target.hardlink(op)
        else:
            if existing is not None:
                target.remove(op.path)
            target.create(op, data)
            if op.kind is Kind.REG:
                counts.files += 1
                counts.bytes += op.size
        layer.add(op.path)
    return counts


class _LayerPaths:
    """The paths one layer made (``added``) and every folder above one (``above``)."""

    def __init__(self) -> None:
        self.added: set[str] = set()
        self.above: set[str] = set()

    def add(self, path: str) -> None:
        self.added.add(path)
        p = parent_of(path)
        while p and p not in self.above:
            self.above.add(p)
            p = parent_of(p)


def _hide(target: Target, path: str, layer: _LayerPaths) -> None:
    """Remove what the lower layers have at ``path``, keeping what this layer made."""
    if path in layer.added or path in layer.above:
        if target.kind_of(path) is Kind.DIR:
            for child in target.children(path):
                _hide(target, join(path, child), layer)
        return
    target.remove(path)


def _ensure_parents(op: Entry, target: Target, layer: _LayerPaths) -> None:
    parent = parent_of(op.path)
    if not parent:
        return
    missing: list[str] = []
    while parent:
        k = target.kind_of(parent)
        if k is Kind.DIR or k is Kind.SYMLINK:  # a symlinked parent is followed
            break
        if k is not None:
            raise CorruptError(f"{op.path}: parent {parent} is a {k.value}, not a directory")
        missing.append(parent)
        parent = parent_of(parent)
    for p in reversed(missing):
        target.create(implicit_dir(p, op), None)
        layer.add(p)
