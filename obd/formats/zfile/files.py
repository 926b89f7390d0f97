"""Whole files in and out of ZFiles: what ``obd zfile`` does (docs/formats.md §4.8).

Kept apart from :mod:`obd.image` so that the command imports only what it runs: no
LSMT code, and numpy only to extract or verify a file of more than
:data:`~obd.formats.zfile.validate.SMALL_TABLE` blocks (the reader's jump table). Outputs are
:class:`AtomicOutput` files (mode 0644): written to a temporary name, fsynced (the
kernel is asked to write back as the file grows, so the final fsync is short), renamed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from obd.formats.sniff import open_zfile, peel_tar
from obd.formats.zfile.layout import DEFAULT_BLOCK_SIZE, Progress
from obd.io.cpu import cores
from obd.io.file import AtomicOutput, open_file

#: given the number of bytes to go, a context giving the progress callback (a bar)
Meter = Callable[[int | None], contextlib.AbstractContextManager[Callable[[int], None]]]


def compress_path(
    source: str | None,
    target: str,
    *,
    algorithm: str = "lz4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    threads: int | None = None,
    overwrite_header: bool = False,
    tar: bool = False,
    force: bool = False,
    chunks: Iterable[bytes] = (),
    progress: Progress | None = None,
) -> None:
    """Compress the file ``source`` (or, when it is None, the byte ``chunks``) into the
    ZFile ``target``, block CRCs on, tar-wrapped with ``tar``. ``threads`` counts the
    caller (None: every CPU this process may use)."""
    from obd.formats.tar import TarWriter
    from obd.formats.zfile.writer import ZFileWriter, compress_file

    src = open_file(source) if source is not None else None
    try:
        with AtomicOutput(target, force=force, mode=0o644) as out:
            wrapper = TarWriter(out) if tar else None
            dest: Any = wrapper if wrapper is not None else out
            options: Any = {
                "algorithm": algorithm,
                "block_size": block_size,
                "verify": True,
                "overwrite_header": overwrite_header,
                "threads": threads or cores(),
            }
            if src is not None:
                compress_file(src, dest, progress=progress, **options)
            else:
                with ZFileWriter(dest, **options) as w:
                    for data in chunks:
                        w.write(data)
                        if progress is not None:
                            progress(len(data))
            if wrapper is not None:
                wrapper.close()
    finally:
        if src is not None:
            src.close()


def extract_path(
    source: str,
    target: str,
    *,
    tar: bool = False,
    force: bool = False,
    threads: int | None = None,
    meter: Meter | None = None,
) -> None:
    """Decompress the ZFile ``source`` into ``target`` (mode 0644), every block checked.

    A tar wrapper is peeled when there is one; with ``tar`` it must be there.
    """
    from obd.formats.zfile.reader import decompress_to

    with open_file(source) as f:
        reader = open_zfile(f, tar_required=tar, path=source, cache_blocks=0)
        with (
            AtomicOutput(target, force=force, mode=0o644) as out,
            meter(reader.size()) if meter is not None else contextlib.nullcontext(None) as bar,
        ):
            decompress_to(reader, out, bar, threads=threads or cores())


def verify_path(source: str) -> list[tuple[int, int, str]]:
    """Every bad block of the ZFile ``source`` (tar peeled): ``(block, offset, problem)``."""
    from obd.formats.zfile.reader import verify_blocks

    with open_file(source) as f:
        return verify_blocks(peel_tar(f, path=source), path=source)
