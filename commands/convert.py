"""``obd convert``: an OCI image into an overlaybd image (ACI's converter)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from commands._util import SizeType, algorithm_option, block_size_option, progress, threads_option

# the layers are committed as obd commit commits them: the same choices

if TYPE_CHECKING:
    from obd.oci.convert import Bars


@click.command(short_help="Convert an OCI image into an overlaybd image.")
@click.option(
    "-z/--no-z",
    "compress",
    default=True,
    help="Commit the layers as ZFiles (the default, as ACI); --no-z: plain LSMT layers.",
)
@algorithm_option("ZFile algorithm.")
@block_size_option("ZFile block size in KiB.")
@click.option(
    "--vsize",
    type=SizeType(),
    default="64G",
    show_default=True,
    help="Virtual size of the image's disk (a bare number means GiB).",
)
@click.option("--flatten", is_flag=True, help="Make one overlaybd layer of all the layers.")
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of converted layers, reused by later converts "
    "(default: $XDG_CACHE_HOME/obd or ~/.cache/obd).",
)
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    default=None,
    help="Image to take from a multi-platform index (default linux/amd64).",
)
@click.option("--plain-http", is_flag=True, help="Talk to the registries over plain HTTP.")
@threads_option("ZFile compression threads (default: all cores).")
@click.option(
    "--config-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write an image config (config.v1.json) naming the converted layers as "
    "local files, for obd serve, inspect, ls and cat.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("src")
@click.argument("dst")
def convert(
    compress: bool,
    algorithm: str,
    block_kib: str,
    vsize: int,
    flatten: bool,
    store: str | None,
    platform: str | None,
    plain_http: bool,
    threads: int | None,
    config_out: str | None,
    as_json: bool,
    src: str,
    dst: str,
) -> None:
    """Convert the image SRC into an overlaybd image at DST.

    \b
    SRC: a registry reference (host/repo:tag or @sha256:...), oci:DIR[:TAG]
         (an OCI image layout) or docker-archive:FILE[:TAG] (docker save)
    DST: a registry reference or oci:DIR[:TAG]

    Each layer is applied over the ones below into an ext4 filesystem and committed
    as a tar-wrapped ZFile layer; the image is written as containerd's
    accelerated-container-image converter writes it. Converted layers are kept in
    the store and not converted again. Blobs are written first and the manifest
    last: an interrupted convert publishes nothing and resumes where it stopped.
    """
    from obd.errors import UsageError
    from obd.oci import convert as conv
    from obd.oci.store import LayerStore, default_store

    if vsize <= 0 or vsize % (1 << 20):
        raise UsageError(f"--vsize {vsize} is not a positive whole number of MiB")
    opts = conv.ConvertOptions(
        algorithm=algorithm if compress else None,
        block_size=int(block_kib) * 1024,
        vsize=vsize,
        flatten=flatten,
        threads=threads,
    )
    layer_store = LayerStore(store or default_store())
    for stale in layer_store.stale_scratch():
        # a convert killed mid-layer left its writable layer here: scratch, never output
        shutil.rmtree(stale, ignore_errors=True)
    with conv.open_source(src, plain_http=plain_http, platform=platform) as img:
        dest = conv.open_destination(dst, plain_http=plain_http, store=layer_store)
        try:
            # per-layer lines beside the bars on a terminal; quiet when piped
            log = (lambda m: click.echo(m, err=True)) if sys.stderr.isatty() else None
            result = conv.convert(img, dest, layer_store, opts, bars=_bars(), log=log)
        finally:
            dest.close()
    if config_out is not None:
        conv.write_image_config(config_out, dest, result)
    if as_json:
        click.echo(json.dumps(conv.result_doc(result), indent=2))
        return
    reused = sum(la.reused for la in result.layers)
    click.echo(
        f"{dst}: {result.digest} ({result.media_type}), {len(result.layers)} layer(s), "
        f"{reused} reused from the store, {result.pushed} blob(s) written"
    )


def _bars() -> Bars:
    enabled = sys.stderr.isatty()

    @contextmanager
    def bar(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
        with progress(total, label, enabled=enabled) as p:
            yield p

    return bar
