"""``obd zfile``: compress a file into a ZFile, extract one, or verify its block CRCs.

Upstream ``overlaybd-zfile`` semantics (FORMATS.md §5.3), with these deliberate changes:
an unknown ``--algorithm`` or ``--bs`` is a usage error (upstream silently uses lz4);
stdin input is cut into full blocks (upstream may write short middle blocks); the
extracted file gets mode 0644 like the compressed one (upstream creates it 0700, which
marks plain data executable); outputs are written atomically (temporary file + rename).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from commands._util import progress
from obd.errors import CorruptError, UsageError
from obd.formats.sniff import open_zfile, peel_tar
from obd.formats.tar import TarWriter
from obd.formats.zfile import ZFileWriter, compress_file, decompress_to, verify_blocks
from obd.io.base import WriteAt
from obd.io.cpu import cores
from obd.io.file import AtomicOutput, open_file

_BLOCK_KIB = ("4", "8", "16", "32", "64")
_STDIN_CHUNK = 4 << 20


@click.command("zfile")
@click.option("-x", "extract", is_flag=True, help="Extract (decompress) SOURCE into TARGET.")
@click.option("-f", "force", is_flag=True, help="Replace TARGET when it exists.")
@click.option(
    "-t",
    "tar",
    is_flag=True,
    help="Wrap the output in a tar container (compress); read SOURCE through it (extract).",
)
@click.option(
    "--algorithm",
    type=click.Choice(["lz4", "zstd"], case_sensitive=False),
    default="lz4",
    show_default=True,
    help="Block compression algorithm.",
)
@click.option(
    "--bs",
    type=click.Choice(_BLOCK_KIB),
    default="4",
    show_default=True,
    help="Block size in KiB.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads, the one doing I/O included (default: every CPU this process may use).",
)
@click.option("--verify", is_flag=True, help="Check every block CRC of SOURCE (tar auto-detected).")
@click.argument("source")
@click.argument("target", required=False)
def zfile(
    extract: bool,
    force: bool,
    tar: bool,
    algorithm: str,
    bs: str,
    threads: int | None,
    verify: bool,
    source: str,
    target: str | None,
) -> None:
    """Compress SOURCE into the ZFile TARGET, or extract it with -x.

    With only one path and no -x, the path is the TARGET and the input is read from
    stdin. --verify checks SOURCE and lists every bad block.

    Exit codes: 0 ok, 2 usage, 3 cannot read or write a file, 4 corrupt input (not a
    ZFile, bad blocks), 5 TARGET exists (use -f), 6 unsupported (e.g. --verify of a
    ZFile without block CRCs), 130 interrupted.
    """
    nthreads = threads or cores()
    if verify:
        if target is not None:
            raise UsageError("--verify takes only SOURCE")
        _verify(source)
    elif extract:
        if target is None:
            raise UsageError("-x needs SOURCE and TARGET (stdin is not allowed)")
        _extract(source, target, force=force, tar=tar, threads=nthreads)
    else:
        if target is None:
            src_path, dst_path = None, source
        else:
            src_path, dst_path = source, target
        _compress(
            src_path,
            dst_path,
            force=force,
            tar=tar,
            algorithm=algorithm.lower(),
            block_size=int(bs) * 1024,
            threads=nthreads,
        )


def _verify(source: str) -> None:
    with open_file(source) as f:
        problems = verify_blocks(peel_tar(f, path=source), path=source)
    if problems:
        for block, offset, problem in problems:
            click.echo(f"obd: {source}: block {block} at offset {offset}: {problem}", err=True)
        raise CorruptError(f"{len(problems)} bad block(s)", path=source)
    click.echo(f"{source} is a valid zfile blob.")


def _extract(source: str, target: str, *, force: bool, tar: bool, threads: int) -> None:
    # -t reads through the tar wrapper; without it a wrapper is still peeled (§0.4).
    with open_file(source) as f:
        reader = open_zfile(f, tar_required=tar, path=source)
        with (
            AtomicOutput(target, force=force, mode=0o644) as out,
            progress(reader.size(), "extract") as bar,
        ):
            decompress_to(reader, out, bar, threads=threads)


def _compress(
    source: str | None,
    target: str,
    *,
    force: bool,
    tar: bool,
    algorithm: str,
    block_size: int,
    threads: int,
) -> None:
    src = open_file(source) if source is not None else None
    try:
        with AtomicOutput(target, force=force, mode=0o644) as out:
            wrapper = TarWriter(out) if tar else None
            sink: WriteAt = wrapper if wrapper is not None else out
            total = src.size() if src is not None else None
            with progress(total, "compress") as bar:
                if src is not None:
                    compress_file(
                        src,
                        sink,
                        algorithm=algorithm,
                        block_size=block_size,
                        threads=threads,
                        progress=bar,
                    )
                else:
                    _compress_stream(sink, algorithm, block_size, threads, bar)
            if wrapper is not None:
                wrapper.close()
    finally:
        if src is not None:
            src.close()


def _compress_stream(
    sink: WriteAt, algorithm: str, block_size: int, threads: int, bar: Callable[[int], Any]
) -> None:
    stdin = click.get_binary_stream("stdin")
    if stdin.isatty():
        raise UsageError("no input: give SOURCE and TARGET, or pipe the data to stdin")
    with ZFileWriter(sink, algorithm=algorithm, block_size=block_size, threads=threads) as w:
        while True:
            data = stdin.read(_STDIN_CHUNK)
            if not data:
                break
            w.write(data)
            bar(len(data))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(zfile())
