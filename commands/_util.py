"""Helpers shared by the click commands: sizes, progress bars, output rendering."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

_UNITS = {"": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse ``64G``, ``512M``, ``1T``, ``4096K``, ``1536B`` (bytes) or a bare integer (GiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 64G, 512M, 1T or a number of GiB")
    unit = m.group(2).upper()
    if not unit and m.group(3):
        return int(m.group(1))  # plain bytes
    return int(m.group(1)) * _UNITS[unit]


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


class Progress:
    """A byte-progress callback: a tqdm bar on a terminal, nothing when piped."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


@contextmanager
def progress(total: int | None, desc: str, enabled: bool | None = None) -> Iterator[Progress]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Progress(None)
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
    ) as bar:
        yield Progress(bar)


# options that several commands share, worded once
index_option = click.option(
    "--index",
    metavar="INDEX",
    type=click.Path(dir_okay=False),
    help="Index file of a single writable data FILE (when not named X.index).",
)
paths_argument = click.argument("paths", metavar="FILE|IMAGE_CONFIG...", nargs=-1, required=True)


def threads_option(help: str) -> Any:
    """``--threads N`` (at least 1; default None: let the library pick), with ``help``."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


# ZFile choices of every command that writes ZFiles (commit -z, zfile, merge, convert), as
# overlaybd's tools take them: the algorithm by name, the block size in KiB
ALGORITHMS = ("lz4", "zstd")
BLOCK_SIZES_KIB = ("4", "8", "16", "32", "64")


def algorithm_option(help: str, default: str | None = "lz4") -> Any:
    """``--algorithm lz4|zstd`` (any case)."""
    return click.option(
        "--algorithm",
        type=click.Choice(ALGORITHMS, case_sensitive=False),
        default=default,
        show_default=default is not None,
        help=help,
    )


def block_size_option(help: str, default: str | None = "4", dest: str = "block_kib") -> Any:
    """``--bs KIB`` (4, 8, 16, 32 or 64), into ``dest``."""
    return click.option(
        "--bs",
        dest,
        type=click.Choice(BLOCK_SIZES_KIB),
        default=default,
        show_default=default is not None,
        help=help,
    )
