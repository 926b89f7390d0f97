"""``obd commit``: commit a writable layer into a read-only layer (overlaybd-commit)."""

from __future__ import annotations

import click

from commands._util import algorithm_option, block_size_option, progress


@click.command(short_help="Commit a writable layer into a read-only layer.")
@click.option(
    "-m", "message", default="", metavar="MSG", help="User tag stored in the header (≤ 256 bytes)."
)
@click.option(
    "--uuid", metavar="UUID", help="uuid of the new layer (default: null uuid, as upstream)."
)
@click.option(
    "-p", "--parent-uuid", "parent_uuid", metavar="UUID", help="Override the parent uuid."
)
@click.option("-z", "compress", is_flag=True, help="Compress the output as a ZFile.")
@algorithm_option("ZFile algorithm (with -z; default lz4).", default=None)
@block_size_option("ZFile block size in KiB (with -z; default 4).", default=None)
@click.option(
    "--compress_threads",
    "--threads",
    "threads",
    type=click.IntRange(min=1),
    default=None,
    help="ZFile compression threads (default: all cores).",
)
@click.option("-t", "tar", is_flag=True, help="Wrap the output in overlaybd's tar header.")
@click.option("-f", "force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--seal", is_flag=True, help="Seal DATA in place (appends index + trailer); no output."
)
@click.option(
    "--commit_sealed",
    "commit_sealed",
    is_flag=True,
    help="DATA is a sealed file; the second argument is the output.",
)
@click.option("--verbose", is_flag=True, hidden=True, help="Accepted for upstream compatibility.")
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("index", required=False, type=click.Path(dir_okay=False))
@click.argument("output", required=False, type=click.Path(dir_okay=False))
def commit(
    message: str,
    uuid: str | None,
    parent_uuid: str | None,
    compress: bool,
    algorithm: str | None,
    block_kib: str | None,
    threads: int | None,
    tar: bool,
    force: bool,
    seal: bool,
    commit_sealed: bool,
    verbose: bool,
    data: str,
    index: str | None,
    output: str | None,
) -> None:
    """Commit the writable layer DATA + INDEX into the read-only layer OUTPUT.

    \b
    obd commit DATA INDEX OUTPUT              compact into a new file
    obd commit --seal DATA INDEX              seal DATA in place
    obd commit --commit_sealed SEALED OUTPUT  compact a sealed file
    """

    from obd.image import ops

    if seal and commit_sealed:
        raise click.UsageError("--seal and --commit_sealed exclude each other")
    if not compress and (algorithm or block_kib):
        click.echo("obd: warning: --algorithm/--bs are ignored without -z", err=True)
    zopts = None
    if compress:
        zopts = ops.ZFileOptions(
            algorithm=algorithm or "lz4",
            block_size=int(block_kib or 4) * 1024,
            threads=threads,
            overwrite_header=True,
        )
    msg = message.encode()
    if len(msg) > 256:
        raise click.BadParameter(f"message is {len(msg)} bytes, at most 256", param_hint="-m")
    if seal:
        if output is not None:
            raise click.UsageError("--seal takes DATA and INDEX only")
        ops.seal(data, index)
        return
    common = dict(
        uuid=uuid, parent_uuid=parent_uuid, message=msg, force=force, zfile=zopts, tar=tar
    )
    if commit_sealed:
        out = output or index
        if out is None or (output is not None and index is not None):
            raise click.UsageError("--commit_sealed takes SEALED and OUTPUT")
        with progress(_size(data), "commit") as bar:
            ops.commit_sealed(data, out, progress=bar, **common)
        return
    if output is None:
        raise click.UsageError("missing OUTPUT (obd commit DATA INDEX OUTPUT)")
    with progress(_size(data), "commit") as bar:
        ops.commit(data, index, output, progress=bar, **common)


def _size(path: str) -> int | None:
    import os

    return os.path.getsize(path) if os.path.exists(path) else None
