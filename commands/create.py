"""``obd create``: make a writable layer."""

from __future__ import annotations

import os

import click

from commands._util import SizeType, progress


@click.command(short_help="Create a writable layer (data + index files).")
@click.option(
    "-s", "--sparse", is_flag=True, help="Sparse layer: data stored in place at 4096+offset."
)
@click.option("-u", "--parent-uuid", "parent_uuid", metavar="UUID", help="Parent layer uuid.")
@click.option("--uuid", metavar="UUID", help="Layer uuid (default: a new random one).")
@click.option(
    "--from",
    "from_raw",
    metavar="RAW_FILE",
    type=click.Path(dir_okay=False),
    help="Seed the layer with a raw disk's content (all-zero 4 KiB blocks are skipped).",
)
@click.option("-f", "--force", is_flag=True, help="Replace existing files.")
@click.option("--verbose", is_flag=True, hidden=True, help="Accepted for upstream compatibility.")
@click.argument("data", type=click.Path(dir_okay=False))
@click.argument("index", type=click.Path(dir_okay=False))
@click.argument("size", type=SizeType(), required=False)
def create(
    sparse: bool,
    parent_uuid: str | None,
    uuid: str | None,
    from_raw: str | None,
    force: bool,
    verbose: bool,
    data: str,
    index: str,
    size: int | None,
) -> None:
    """Create a writable layer: DATA and INDEX files of a SIZE-byte virtual disk.

    SIZE is like 64G, 512M, 1T, or a bare integer meaning GiB (as overlaybd-create).
    With --from, SIZE may be omitted: the raw file's size is used.
    """
    from obd.image.ops import create as do_create

    total = os.path.getsize(from_raw) if from_raw and os.path.exists(from_raw) else None
    with progress(total, "create") as bar:
        do_create(
            data,
            index,
            size,
            sparse=sparse,
            parent_uuid=parent_uuid,
            uuid=uuid,
            from_raw=from_raw,
            force=force,
            progress=bar,
        )
