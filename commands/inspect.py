"""``obd inspect``: what an overlaybd file or image holds, or its extent map (--map)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from commands._util import index_option, paths_argument

_HELP = """Show what overlaybd files and images hold.

Each FILE is recognised by its bytes: a tar wrapper, a ZFile, a read-only LSMT layer
(committed, or a writable data file sealed in place), a writable data file (log-structured
or sparse), a writable index file; a file starting with "{" is an image config, shown as
one row per layer, bottom first, plus the parent-uuid chain check. A writable data file
needs its index file: X.data finds X.index and writable_data finds writable_index by
themselves, otherwise give it with --index.

With --map, print the extents of the virtual disk of each layer or image: offset, length,
kind (data, zero: a zeroed segment, hole: nothing mapped) and depth (the layer serving the
range, 0 = topmost; with a writable upper, 0 is the upper). Adjacent equal extents are
merged, as qemu-img map does.

A file that cannot be read fully is still shown as far as it goes; the command then
prints one error line per such file and exits 4. Use obd check to list every problem.

\b
JSON (--json), one document: {"version": 1, "items": [ITEM...]}
FILE ITEM: type ("file"), path, kind (lsmt_ro, lsmt_sealed, lsmt_rw,
  lsmt_rw_sparse, lsmt_rw_index, zfile, unknown), file_size, wrappers (outermost
  first: "tar", "zfile"), virtual_size, error, note, and
  tar: null or {payload_offset, payload_size, member}
  zfile: null or {algorithm, block_size, blocks, crc, digest, header_flags,
    compressed_size, original_size, ratio (original / compressed)}
  lsmt: null or {format_version ("1.1"), header_flags, trailer_flags, uuid,
    parent_uuid (null when the null uuid), virtual_size, user_tag, index_entries
    (on-disk entries or index-file records, padding included), valid_entries,
    padding_entries, mapped_bytes, zeroed_bytes, garbage_bytes (stored bytes no
    entry references), index_file, torn_bytes (index-file tail too short for a record)}
IMAGE ITEM: type ("image"), path, virtual_size, read_only, chain_ok,
  chain_problems [{position, parent_uuid, below_uuid, message}],
  layers [{position (0 = bottom), role ("lower" or "upper"), source, info (a FILE
  ITEM, null for a remote layer)}]

\b
JSON with --map: {"version": 1, "maps": [{path, virtual_size, layers (the layer at
  each depth, topmost first), extents [{offset, length, kind ("data", "zero",
  "hole"), depth (null for holes)}]}]}
"""


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    v = float(n)
    for u in units:
        if v < 1024 or u == units[-1]:
            return f"{n} B" if u == "B" else f"{v:.1f} {u} ({n})"
        v /= 1024
    return str(n)  # pragma: no cover


_HELP += """
\b
An image reference (HOST[:PORT]/REPO[:TAG] or ...@sha256:...) in place of the files
shows the image's overlaybd layers as its registry lists them (credentials and
certificates from the global config, --config or /etc/overlaybd/overlaybd.json).
JSON: {"version": 1, "images": [{reference, digest, mediaType, platform, repoBlobUrl,
layers [{digest, size, fsType, acceleration}]}]}. Exit codes for references: 2 a
malformed reference, 6 not an overlaybd image, 7 a bad global config, 8 the registry
failed (unreachable, 404, refused credentials): one line naming the URL and why.
"""


@click.command("inspect", help=_HELP, short_help="Show what an overlaybd file or image holds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys above).")
@click.option("--map", "as_map", is_flag=True, help="Print the extents of the virtual disk.")
@click.option("--plain-http", is_flag=True, help="Plain HTTP to an image reference's registry.")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform picked from an index.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Global config for image references (credentials, certificates, userAgent).",
)
@index_option
@paths_argument
def inspect(
    as_json: bool,
    as_map: bool,
    plain_http: bool,
    platform: str | None,
    config_path: str | None,
    index: str | None,
    paths: tuple[str, ...],
) -> None:
    from obd.image import inspect as ins

    if _references(paths):
        _inspect_references(paths, as_json, plain_http, platform, config_path)
        return

    if as_map:
        maps = ins.map_paths(list(paths), index=index)
        if as_json:
            click.echo(json.dumps(ins.map_document(maps), indent=2))
        else:
            _render_maps(maps)
        return
    items = ins.inspect_paths(list(paths), index=index)
    if as_json:
        click.echo(json.dumps(ins.document(items), indent=2))
    else:
        _render_items(items)
    errors = [(f.path, f.error) for f in ins.iter_items(items) if f.error]
    for path, err in errors:
        msg = err if err.startswith(path) else f"{path}: {err}"
        click.echo(f"obd: error: {msg}", err=True)
    if errors:
        from obd.errors import CorruptError

        sys.exit(CorruptError.exit_code)


def _references(paths: tuple[str, ...]) -> bool:
    import os

    if all(os.path.exists(p) for p in paths):
        return False  # local files only: the reference parser is not needed
    from obd.errors import UsageError
    from obd.oci.reference import Reference, looks_like_reference

    refs = [p for p in paths if not os.path.exists(p) and looks_like_reference(p)]
    if refs and len(refs) != len(paths):
        raise UsageError("give image references or files, not both")
    for r in refs:
        Reference.parse(r)  # a mistyped reference: its error, not "no such file"
    return bool(refs)


def _inspect_references(
    refs: tuple[str, ...],
    as_json: bool,
    plain_http: bool,
    platform: str | None,
    config_path: str | None = None,
) -> None:
    from obd.oci.manifest import describe, resolve_image
    from obd.registry.auth import CredentialSource
    from obd.registry.client import RegistryClient
    from obd.serve.config import load_global_config

    g = load_global_config(config_path)
    creds = CredentialSource.from_config(g.credentialConfig, g.credentialFilePath)
    cert = (g.certConfig.certFile, g.certConfig.keyFile) if g.certConfig.certFile else None
    with RegistryClient(
        credentials=creds, plain_http=plain_http or None, cert=cert, user_agent=g.userAgent
    ) as client:
        images = [describe(resolve_image(client, r, platform=platform)) for r in refs]
    if as_json:
        click.echo(json.dumps({"version": 1, "images": images}, indent=2))
        return
    from rich.table import Table

    con = _console()
    for im in images:
        t = Table(title=f"{im['reference']} ({im['digest']})", title_justify="left")
        for col in ("#", "digest", "size", "fs"):
            t.add_column(col, justify="right" if col in ("#", "size") else "left")
        for i, layer in enumerate(im["layers"]):
            fs = (layer["fsType"] or "") + (" (acceleration)" if layer["acceleration"] else "")
            t.add_row(str(i), layer["digest"], _size(layer["size"]), fs)
        con.print(t)
        con.print(f"repoBlobUrl: {im['repoBlobUrl']}")
        if im["platform"]:
            con.print(f"platform: {im['platform']}")


def _console() -> Any:
    from rich.console import Console

    # piped output is not cut to 80 columns; no markup and no emoji codes: a "[red]" or a
    # ":name:" in a path, tag or message is shown as it is (and rich does not load its
    # ~4,000-entry emoji table)
    return Console(
        highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200
    )


def _file_rows(info: Any) -> list[tuple[str, str]]:
    rows = [
        ("kind", info.kind + (f"  (in {' / '.join(info.wrappers)})" if info.wrappers else "")),
        ("file size", _size(info.file_size)),
    ]
    if info.tar is not None:
        rows.append(("tar payload", f"{_size(info.tar.payload_size)} at {info.tar.payload_offset}"))
    z = info.zfile
    if z is not None:
        rows += [
            ("zfile algorithm", z.algorithm),
            ("zfile block size", _size(z.block_size)),
            ("zfile blocks", str(z.blocks)),
            ("zfile crc", "on" if z.crc else "off"),
            ("zfile digest", "present" if z.digest else "absent"),
            ("zfile flags", ", ".join(z.header_flags)),
            ("compressed size", _size(z.compressed_size)),
            ("original size", _size(z.original_size)),
            ("ratio", f"{z.ratio:.2f}"),
        ]
    li = info.lsmt
    if li is not None:
        rows += [
            ("format version", li.format_version),
            ("header flags", ", ".join(li.header_flags)),
        ]
        if li.trailer_flags is not None:
            rows.append(("trailer flags", ", ".join(li.trailer_flags)))
        rows += [
            ("uuid", li.uuid or "- (null)"),
            ("parent uuid", li.parent_uuid or "- (null)"),
            ("virtual size", _size(li.virtual_size)),
            ("user tag", li.user_tag or "-"),
        ]
        if li.index_file:
            rows.append(("index file", li.index_file))
        if li.index_entries is not None:
            rows.append(
                (
                    "index entries",
                    f"{li.index_entries} ({li.valid_entries} valid, {li.padding_entries} padding)",
                )
            )
        if li.torn_bytes:
            rows.append(("torn index tail", _size(li.torn_bytes)))
        for label, v in (
            ("mapped", li.mapped_bytes),
            ("zeroed", li.zeroed_bytes),
            ("garbage", li.garbage_bytes),
        ):
            if v is not None:
                rows.append((label, _size(v)))
    if info.note:
        rows.append(("note", info.note))
    if info.error:
        rows.append(("error", info.error))
    return rows


def _render_items(items: list[Any]) -> None:
    from rich.table import Table

    from obd.image.inspect import FileInfo

    con = _console()
    for it in items:
        if isinstance(it, FileInfo):
            t = Table(title=it.path, show_header=False, title_justify="left")
            t.add_column("field", style="bold")
            t.add_column("value")
            for k, v in _file_rows(it):
                t.add_row(k, v)
            con.print(t)
            continue
        t = Table(title=f"{it.path} (image config)", title_justify="left")
        for col in ("#", "role", "kind", "uuid", "parent uuid", "virtual size", "mapped", "file"):
            t.add_column(col)
        for r in it.layers:
            inf = r.info
            li = inf.lsmt if inf is not None else None
            t.add_row(
                str(r.position),
                r.role,
                (inf.kind + ("+" + "+".join(inf.wrappers) if inf.wrappers else ""))
                if inf
                else "remote",
                (li.uuid or "-") if li else "?",
                (li.parent_uuid or "-") if li else "?",
                str(inf.virtual_size) if inf and inf.virtual_size is not None else "?",
                str(li.mapped_bytes) if li and li.mapped_bytes is not None else "?",
                r.source,
            )
        con.print(t)
        con.print(f"virtual size: {_size(it.virtual_size)}")
        con.print("read-only" if it.read_only else "writable (has an upper layer)")
        if it.chain_ok:
            con.print("chain: ok")
        for c in it.chain:
            con.print(f"chain: {c.message}")


def _render_maps(maps: list[Any]) -> None:
    from rich.table import Table

    con = _console()
    for m in maps:
        t = Table(title=f"{m.path} ({_size(m.virtual_size)})", title_justify="left")
        for col in ("offset", "length", "kind", "depth", "layer"):
            t.add_column(col, justify="right" if col in ("offset", "length", "depth") else "left")
        for e in m.extents:
            layer = m.layers[e.depth] if e.depth is not None and e.depth < len(m.layers) else ""
            t.add_row(
                str(e.offset),
                str(e.length),
                e.kind.value,
                "-" if e.depth is None else str(e.depth),
                layer,
            )
        con.print(t)


@click.command(
    "map",
    short_help="Show the extents of a layer's or image's virtual disk.",
    help="Show the extents of the virtual disk of each FILE or IMAGE_CONFIG: the same as "
    "obd inspect --map (offset, length, data / zero / hole, depth; adjacent equal extents "
    "merged, like qemu-img map). --json prints the document described in obd-inspect(1).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@index_option
@paths_argument
@click.pass_context
def map_(ctx: click.Context, as_json: bool, index: str | None, paths: tuple[str, ...]) -> None:
    ctx.invoke(
        inspect,
        as_json=as_json,
        as_map=True,
        plain_http=False,
        platform=None,
        config_path=None,
        index=index,
        paths=paths,
    )
