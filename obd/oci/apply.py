"""Apply an OCI layer tar to the ext4 filesystem of an image (upstream ``overlaybd-apply``,
docs/formats.md §5.5): the OCI rules of :mod:`obd.oci.layer`, written through
:mod:`obd.oci.ext4` into the image's writable upper layer.

The layer is read once, as a stream (a file, a FIFO or stdin; plain, gzip or zstd): it is
never held whole in memory nor copied to disk first. Its SHA-256 (of the uncompressed
tar: the layer's ``diff_id``) is checked against ``checksum`` at the end.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, BinaryIO

from obd.errors import ConfigError, FileAccessError, UnsupportedError
from obd.image import load_image_config, open_image
from obd.io.file import open_file
from obd.oci import ext4
from obd.oci.layer import CHUNK, Op, apply_ops, parse_checksum, read_layer

Progress = Callable[[int], None] | None


@dataclass
class ApplyStats:
    """What an apply did. ``digest`` is the uncompressed tar's ``sha256:...`` (diff_id),
    ``tar_bytes`` its size, ``read_bytes`` what was read from the source (compressed)."""

    source: str
    image: str
    digest: str
    compression: str
    tar_bytes: int
    read_bytes: int
    entries: int
    files: int
    dirs: int
    links: int
    whiteouts: int
    opaques: int
    file_bytes: int
    mkfs: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Counting(io.RawIOBase):
    """Counts the bytes read from the source, for progress (compressed bytes)."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src = src
        self.count = 0
        self.reported = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if hasattr(self.src, "readinto"):
            n = self.src.readinto(b) or 0
        else:  # pragma: no cover - every BinaryIO here has readinto
            data = self.src.read(len(b))
            n = len(data)
            b[:n] = data
        self.count += n
        return n

    def take(self) -> int:
        n = self.count - self.reported
        self.reported = self.count
        return n


def _open_source(source: BinaryIO | str | os.PathLike[str]) -> tuple[IO[bytes], str, bool]:
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        try:
            f = open(p, "rb", buffering=0)  # noqa: SIM115 - closed by apply_layer; FIFOs stream
        except OSError as e:
            open_file(p).close()  # raises the FileAccessError that names the problem
            raise FileAccessError(e.strerror or str(e), path=p) from None
        return f, p, True
    name = getattr(source, "name", None)
    return source, name if isinstance(name, str) else "-", False


def apply_layer(
    source: BinaryIO | str | os.PathLike[str],
    image_config_path: str | os.PathLike[str],
    *,
    mkfs: bool = False,
    checksum: str | None = None,
    progress: Progress = None,
) -> ApplyStats:
    """Apply the layer tar ``source`` (a path, a FIFO, or an open binary stream such as
    stdin) to the ext4 filesystem of the image ``image_config_path``; the writes go to the
    image's upper layer. ``mkfs`` makes a new ext4 over the whole disk first (upstream's
    choices). ``checksum`` (``sha256:<hex>``) must match the uncompressed tar.
    ``progress(n)`` is called with the number of source bytes read since the last call.

    Errors: :class:`~obd.errors.UsageError` (bad checksum syntax), ``FileAccessError``
    (source), ``ConfigError`` (no upper), ``CorruptError`` (bad or truncated tar, checksum
    mismatch, a broken filesystem), ``UnsupportedError`` (no ext4 on the image, no
    libext2fs), ``ObdError`` (the filesystem is full).
    """
    parse_checksum(checksum)
    cfg_path = os.fspath(image_config_path)
    cfg = load_image_config(cfg_path)
    if not cfg.upper.present:
        raise ConfigError(
            "has no writable upper layer (upper.data and upper.index): nothing to apply to",
            path=cfg_path,
        )
    src, name, owned = _open_source(source)
    t0 = time.monotonic()
    try:
        counter = _Counting(src)
        stream = read_layer(io.BufferedReader(counter, CHUNK), name=name, checksum=checksum)
        stack = open_image(cfg_path)
        try:
            if mkfs:
                ext4.mkfs(stack, scratch_dir=os.path.dirname(cfg.upper.data) or None, name=cfg_path)
            try:
                fs = ext4.Ext4(stack, writable=True, name=cfg_path)
            except UnsupportedError as e:
                if mkfs or "no ext4" not in e.message:
                    raise
                raise UnsupportedError(f"{e.message}; --mkfs makes one", path=cfg_path) from None
            with fs:
                ops: Iterator[tuple[Op, IO[bytes] | None]] = stream.ops()
                if progress is not None:
                    ops = _reporting(ops, counter, progress)
                counts = apply_ops(ops, fs, name=name)
                stream.finish()  # checksum: a mismatch discards the metadata not yet written
                if progress is not None:
                    progress(counter.take())
            stack.flush()
        finally:
            stack.close()
    finally:
        if owned:
            src.close()
    return ApplyStats(
        source=name,
        image=cfg_path,
        digest=stream.digest,
        compression=stream.compression,
        tar_bytes=stream.size,
        read_bytes=counter.count,
        entries=counts.entries,
        files=counts.files,
        dirs=counts.dirs,
        links=counts.links,
        whiteouts=counts.whiteouts,
        opaques=counts.opaques,
        file_bytes=counts.bytes,
        mkfs=mkfs,
        seconds=round(time.monotonic() - t0, 3),
    )


def _reporting(
    ops: Iterator[tuple[Op, IO[bytes] | None]], counter: _Counting, progress: Callable[[int], None]
) -> Iterator[tuple[Op, IO[bytes] | None]]:
    for item in ops:
        n = counter.take()
        if n:
            progress(n)
        yield item
