"""``obd zfile``: compress a file into a ZFile, extract one, or verify its block CRCs.

Upstream ``overlaybd-zfile`` semantics, with these deliberate changes:
an unknown ``--algorithm`` or ``--bs`` is a usage error (upstream silently uses lz4);
stdin input is cut into full blocks (upstream may write short middle blocks); the
extracted file gets mode 0644 like the compressed one (upstream creates it 0700, which
marks plain data executable); outputs are written atomically (temporary file + rename).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import click

from commands._util import algorithm_option, block_size_option, progress, threads_option
from obd.errors import CorruptError, UsageError

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
@algorithm_option("Block compression algorithm.")
@block_size_option("Block size in KiB.", dest="bs")
@threads_option("Threads, the one doing I/O included (default: every CPU this process may use).")
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
    # obd.formats.zfile.files, not obd.image.ops: a short run loads no LSMT/image code,
    # and numpy only for a big jump table (start-up is a large part of its time)
    from obd.formats.zfile import files

    if verify:
        if target is not None:
            raise UsageError("--verify takes only SOURCE")
        problems = files.verify_path(source)
        for block, offset, problem in problems:
            click.echo(f"obd: {source}: block {block} at offset {offset}: {problem}", err=True)
        if problems:
            raise CorruptError(f"{len(problems)} bad block(s)", path=source)
        click.echo(f"{source} is a valid zfile blob.")
    elif extract:
        if target is None:
            raise UsageError("-x needs SOURCE and TARGET (stdin is not allowed)")
        files.extract_path(
            source,
            target,
            tar=tar,
            force=force,
            threads=threads,
            meter=lambda total: progress(total, "extract"),
        )
    else:
        src_path, dst_path = (None, source) if target is None else (source, target)
        with progress(_size(src_path), "compress") as bar:
            files.compress_path(
                src_path,
                dst_path,
                algorithm=algorithm.lower(),
                block_size=int(bs) * 1024,
                threads=threads,
                tar=tar,
                force=force,
                chunks=_stdin(),
                progress=bar,
            )


def _size(path: str | None) -> int | None:
    return os.path.getsize(path) if path is not None and os.path.isfile(path) else None


def _stdin() -> Iterator[bytes]:
    """stdin in chunks (read when the output is open, so its errors come first)."""
    stdin = click.get_binary_stream("stdin")
    if stdin.isatty():
        raise UsageError("no input: give SOURCE and TARGET, or pipe the data to stdin")
    while data := stdin.read(_STDIN_CHUNK):
        yield data


if __name__ == "__main__":  # pragma: no cover
    sys.exit(zfile())
