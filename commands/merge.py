"""``obd merge``: flatten an image (or a list of layers) into one layer or a raw disk."""

from __future__ import annotations

import click

from commands._util import algorithm_option, block_size_option, progress, threads_option


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise click.BadParameter(f"{value!r} is not true or false", param_hint="--compress")


@click.command(short_help="Flatten a stack of layers into one layer or a raw disk.")
@click.option(
    "-o",
    "--output",
    "output_opt",
    metavar="OUTPUT",
    help="Output (short form: LAYER... are the inputs).",
)
@click.option(
    "--compress",
    "compress",
    default="true",
    metavar="BOOL",
    show_default=True,
    help="Write a ZFile (lz4, 4 KiB) layer; --compress=false writes a plain layer.",
)
@algorithm_option("ZFile algorithm.")
@block_size_option("ZFile block size in KiB.")
@threads_option("Compression threads (default: all cores).")
@click.option("--raw", is_flag=True, help="Write the flattened virtual disk as a sparse raw file.")
@click.option("-t", "tar", is_flag=True, help="Wrap the output in overlaybd's tar header.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--service_config_path",
    metavar="PATH",
    help="Global config (accepted; local layers need none).",
)
@click.option("--verbose", is_flag=True, hidden=True)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def merge(
    output_opt: str | None,
    compress: str,
    algorithm: str,
    block_kib: str,
    threads: int | None,
    raw: bool,
    tar: bool,
    force: bool,
    service_config_path: str | None,
    verbose: bool,
    inputs: tuple[str, ...],
) -> None:
    """Flatten an image into one read-only layer (or, with --raw, a raw disk).

    \b
    obd merge [--service_config_path P] IMAGE_CONFIG OUTPUT   (as overlaybd-merge)
    obd merge -o OUTPUT LAYER...                              (layers bottom first)
    """

    from obd.image import open_image, open_layers, ops

    if output_opt is not None:
        output = output_opt
        stack = open_layers(list(inputs))
    else:
        if len(inputs) != 2:
            raise click.UsageError("expected IMAGE_CONFIG OUTPUT (or -o OUTPUT LAYER...)")
        config, output = inputs
        stack = open_image(config, readonly=True)
    with stack, progress(stack.virtual_size if raw else None, "merge") as bar:
        if raw:
            ops.flatten_raw(stack, output, force=force, progress=bar)
            return
        zopts = None
        if _bool(compress):
            zopts = ops.ZFileOptions(
                algorithm=algorithm,
                block_size=int(block_kib) * 1024,
                threads=threads,
                overwrite_header=False,
            )
        ops.merge(stack, output, force=force, zfile=zopts, tar=tar, progress=bar)
