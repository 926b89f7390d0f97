"""``obd apply``: apply an OCI layer tar to an image's ext4 filesystem (overlaybd-apply)."""

from __future__ import annotations

import json
import os
import sys

import click

from commands._util import progress


@click.command(short_help="Apply an OCI layer tar to an image's ext4 filesystem.")
@click.option("--mkfs", is_flag=True, help="Make a new ext4 on the image first (as upstream).")
@click.option(
    "--checksum",
    metavar="sha256:HEX",
    help="Expected SHA-256 of the uncompressed tar (the layer's diff_id).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was applied as JSON.")
@click.option("--verbose", is_flag=True, hidden=True, help="Accepted for upstream compatibility.")
@click.argument("layer", metavar="LAYER.tar[.gz|.zst]|-")
@click.argument("image_config", metavar="IMAGE_CONFIG", type=click.Path(dir_okay=False))
def apply(
    mkfs: bool, checksum: str | None, as_json: bool, verbose: bool, layer: str, image_config: str
) -> None:
    """Extract the OCI layer LAYER into the ext4 filesystem of the image IMAGE_CONFIG.

    The writes go to the image's writable upper layer. LAYER is a tar, tar.gz or
    tar.zst file, a FIFO, or - for stdin; it is read once, as a stream. OCI whiteouts
    (.wh.NAME, .wh..wh..opq) delete what the layers below have. Rootless: the
    filesystem is written in userspace through libext2fs.
    """
    from obd.oci.apply import apply_layer

    source = sys.stdin.buffer if layer == "-" else layer
    total = None
    if layer != "-" and os.path.isfile(layer):
        total = os.path.getsize(layer)
    with progress(total, "apply") as bar:
        stats = apply_layer(source, image_config, mkfs=mkfs, checksum=checksum, progress=bar)
    if as_json:
        click.echo(json.dumps(stats.to_json(), indent=2))
        return
    click.echo(
        f"applied {stats.source} ({stats.digest}): {stats.entries} entries, "
        f"{stats.files} files, {stats.dirs} dirs, {stats.whiteouts + stats.opaques} whiteouts, "
        f"{stats.file_bytes} bytes in {stats.seconds:.2f} s"
    )
