"""What users do with layers and images: create, commit, seal, merge, flatten to raw.

Every output is written to a temporary file in its folder and renamed on success;
inputs are opened read-only unless the operation says otherwise (``seal``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from obd.errors import CorruptError, UsageError
from obd.formats import uuid as uuidmod
from obd.formats.lsmt import SECTOR, HeaderTrailer, Mappings
from obd.formats.lsmt.commit import FileSink, commit_header, compact
from obd.formats.lsmt.rw import LSMTWritable
from obd.formats.zfile import files as zfiles
from obd.image.layers import open_ro_layer, open_rw_layer
from obd.image.stack import Stack
from obd.io.base import ExtentKind, ReadAt
from obd.io.cpu import cores
from obd.io.file import AtomicOutput, LocalFile, open_file

Progress = Callable[[int], None] | None
#: given the number of bytes to go, a context giving the progress callback (a bar)
Meter = zfiles.Meter


@dataclass(frozen=True)
class ZFileOptions:
    """How to compress an output as a ZFile (docs/formats.md §4)."""

    algorithm: str = "lz4"
    block_size: int = 4096
    threads: int | None = 1  # None: every CPU this process may use
    overwrite_header: bool = False


@contextlib.contextmanager
def output_sink(
    out: LocalFile, *, zfile: ZFileOptions | None = None, tar: bool = False
) -> Iterator[Any]:
    """A sequential sink over ``out``: plain, ZFile-compressed, tar-wrapped or both."""
    target: Any = out
    tar_writer = None
    if tar:
        from obd.formats.tar import TarWriter

        tar_writer = TarWriter(out)
        target = tar_writer
    if zfile is not None:
        from obd.formats.zfile import ZFileWriter

        sink: Any = ZFileWriter(
            target,
            algorithm=zfile.algorithm,
            block_size=zfile.block_size,
            verify=True,
            overwrite_header=zfile.overwrite_header,
            threads=zfile.threads or cores(),
        )
    else:
        sink = FileSink(target)
    try:
        yield sink
    except BaseException:
        abort = getattr(sink, "abort", None)
        if abort is not None:
            abort()
        raise
    sink.close()
    if tar_writer is not None:
        tar_writer.close()


def zfile_compress(
    source: str | None,
    target: str,
    *,
    zfile: ZFileOptions,
    tar: bool = False,
    force: bool = False,
    chunks: Iterable[bytes] = (),
    progress: Progress = None,
) -> None:
    """Compress the file ``source`` (or, when it is None, the byte ``chunks``) into the
    ZFile ``target`` (mode 0644), tar-wrapped with ``tar`` (``obd zfile``, §4.8)."""
    zfiles.compress_path(
        source,
        target,
        algorithm=zfile.algorithm,
        block_size=zfile.block_size,
        threads=zfile.threads,
        overwrite_header=zfile.overwrite_header,
        tar=tar,
        force=force,
        chunks=chunks,
        progress=progress,
    )


@dataclass(frozen=True)
class LayerMeta:
    """What commit writes into the new layer's header besides the data (§1.8 step 1)."""

    uuid: str | None = None
    parent_uuid: str | None = None
    message: bytes = b""


def commit(
    data_path: str,
    index_path: str | None,
    output: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: bytes = b"",
    force: bool = False,
    zfile: ZFileOptions | None = None,
    tar: bool = False,
    progress: Progress = None,
    sealed: bool = False,
) -> None:
    """Commit a writable layer into a read-only layer file (§2.5, §1.8).

    With ``sealed``, ``data_path`` is a file sealed in place by :func:`seal` (read as a
    read-only layer; ``index_path`` is not used): ``--commit_sealed``.
    """
    meta = LayerMeta(uuid, parent_uuid, message)
    if sealed:
        with open_ro_layer(data_path) as ro:
            _commit_from(
                ro.mappings, [ro.file], ro.header, output, meta, force, zfile, tar, progress
            )
        return
    with open_rw_layer(data_path, index_path, readonly=True) as layer:
        # virtual size and parent come from the data file's own header
        src = HeaderTrailer.unpack(layer.data.pread(0, 4096), path=layer.data.path)
        _commit_from(layer.mappings(), [layer.data], src, output, meta, force, zfile, tar, progress)


def commit_sealed(sealed_path: str, output: str, **options: Any) -> None:
    """Compact a file sealed in place by :func:`seal`: :func:`commit` with ``sealed``."""
    commit(sealed_path, None, output, sealed=True, **options)


def _commit_from(
    m: Mappings,
    sources: list[ReadAt],
    src: HeaderTrailer,
    output: str,
    meta: LayerMeta,
    force: bool,
    zfile: ZFileOptions | None,
    tar: bool,
    progress: Progress,
) -> None:
    header = commit_header(
        virtual_size=src.virtual_size,
        uuid=meta.uuid,
        parent_uuid=meta.parent_uuid,
        source_parent_uuid=src.parent_uuid,
        message=meta.message,
    )
    _write_compacted(m, sources, header, output, force, zfile, tar, progress)


def seal(data_path: str, index_path: str | None) -> None:
    """Seal a writable layer in place: its data file becomes a read-only layer (§2.4)."""
    layer = open_rw_layer(data_path, index_path)
    with layer:
        layer.seal()


def _write_compacted(
    m: Mappings,
    sources: list[ReadAt],
    header: HeaderTrailer,
    output: str,
    force: bool,
    zfile: ZFileOptions | None,
    tar: bool,
    progress: Progress,
) -> None:
    for p in _paths_of(sources):
        if os.path.exists(output) and os.path.samefile(p, output):
            raise UsageError(f"output {output} is also an input")
    with AtomicOutput(output, force=force) as out, output_sink(out, zfile=zfile, tar=tar) as sink:
        compact(m, sources, header, sink, progress=progress)


def _paths_of(sources: list[ReadAt]) -> list[str]:
    """Paths of the local files behind ``sources`` (views carry their file's path)."""
    return [p for p in (getattr(s, "path", None) for s in sources) if p]


def merge(
    stack: Stack,
    output: str,
    *,
    force: bool = False,
    zfile: ZFileOptions | None = None,
    tar: bool = False,
    progress: Progress = None,
) -> None:
    """Flatten a stack into one read-only layer (§3.5): null uuid, bottom's parent."""
    m, sources = stack.merged_mappings()
    bottom_parent = (
        stack.lowers[0].header.parent_uuid
        if stack.lowers
        else (stack.upper.parent_uuid if stack.upper else uuidmod.NULL_UUID)
    )
    header = commit_header(
        virtual_size=stack.virtual_size,
        uuid=None,
        parent_uuid=None,
        source_parent_uuid=bottom_parent,
    )
    _write_compacted(m, sources, header, output, force, zfile, tar, progress)


def flatten_raw(
    stack: Stack, output: str, *, force: bool = False, progress: Progress = None
) -> None:
    """Write the virtual disk of ``stack`` as a sparse raw file (holes stay holes)."""
    chunk = 4 << 20

    def copy(pos: int, end: int) -> None:
        while pos < end:
            n = min(chunk, end - pos)
            data = stack.pread(pos, n)
            for a, b in _nonzero_runs(data):
                out.pwrite(pos + a, memoryview(data)[a:b])
            pos += n
            if progress is not None:
                progress(n)

    with AtomicOutput(output, force=force) as out:
        # adjacent data extents (of any layers) are read as one run, up to 4 MiB a read:
        # the stack decodes a ZFile layer's part of it in one batch call
        start = end = 0
        for ext in stack.extents():
            if ext.kind is ExtentKind.DATA and ext.offset == end:
                end = ext.end
                continue
            copy(start, end)
            start = end = ext.offset
            if ext.kind is ExtentKind.DATA:
                end = ext.end
            else:
                start = end = ext.end
                if progress is not None:
                    progress(ext.length)
        copy(start, end)
        out.truncate(stack.virtual_size)


def _nonzero_runs(data: bytes, block: int = 4096) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte runs of ``data`` whose 4 KiB blocks are not all zero."""
    n = len(data)
    full = n - n % block
    if full:
        arr = np.frombuffer(data, dtype=np.uint8, count=full).reshape(-1, block)
        nz = arr.any(axis=1)
        if n > full:
            nz = np.append(nz, any(data[full:]))
    else:
        nz = np.array([any(data)], dtype=bool) if n else np.zeros(0, dtype=bool)
    if not nz.any():
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([0], nz.astype(np.int8), [0]))))
    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        yield a * block, min(b * block, n)


def create(
    data_path: str,
    index_path: str,
    virtual_size: int | None,
    *,
    sparse: bool = False,
    parent_uuid: str | None = None,
    uuid: str | None = None,
    from_raw: str | None = None,
    force: bool = False,
    progress: Progress = None,
) -> LSMTWritable | None:
    """Create a writable layer, optionally seeded with a raw disk's content."""
    raw: LocalFile | None = None
    if from_raw is not None:
        raw = open_file(from_raw)
    try:
        raw_size = raw.size() if raw is not None else 0
        if virtual_size is None:
            if raw is None:
                raise UsageError("a size is needed (or --from a raw disk to take its size)")
            virtual_size = -(-raw_size // SECTOR) * SECTOR
        if virtual_size % SECTOR:
            raise UsageError(f"size {virtual_size} is not a multiple of 512 bytes")
        if raw_size > virtual_size:
            raise UsageError(
                f"{from_raw} holds {raw_size} bytes, more than the layer size {virtual_size}"
            )
        if os.path.abspath(data_path) == os.path.abspath(index_path):
            raise UsageError("data and index files must differ")
        # the index is renamed into place after the data file it describes
        with AtomicOutput(index_path, force=force) as i, AtomicOutput(data_path, force=force) as d:
            layer = LSMTWritable.create(
                d, i, virtual_size, uuid=uuid, parent_uuid=parent_uuid, sparse=sparse
            )
            if raw is not None:
                _seed_from_raw(layer, raw, progress)
            layer.flush()
    finally:
        if raw is not None:
            raw.close()
    return None


def _seed_from_raw(layer: LSMTWritable, raw: LocalFile, progress: Progress) -> None:
    chunk = 4 << 20
    size = raw.size()
    pos = 0
    while pos < size:
        data = raw.pread(pos, chunk)
        if not data:
            raise CorruptError("raw disk shrank while reading", path=raw.path, offset=pos)
        if len(data) % SECTOR:
            data += bytes(-len(data) % SECTOR)
        for a, b in _nonzero_runs(data):
            b = b + (-b % SECTOR)
            layer.pwrite(pos + a, memoryview(data)[a:b])
        pos += len(data)
        if progress is not None:
            progress(len(data))
