"""``obd check``: verify every header, index and checksum of files and images."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from commands._util import index_option, paths_argument, progress, threads_option
from obd.errors import ObdError

_HELP = """Verify everything verifiable in overlaybd files and images.

Checks, reporting every problem found (not only the first) with its file offset:
tar wrapper; ZFile header and trailer (magic, flags, digests, agreement), jump table
bounds and index_crc, every block's CRC and decompressed size; LSMT header and trailer
(magic, flags, agreement on uuid, parent uuid, virtual size, version, user tag), index
bounds, entry count (at most 1,000,000), padding entries, order and overlap, moffset
ranges, entries past the virtual size, stored data mapped twice, data no entry
references; writable layers: both headers and their agreement, index records (torn
tail, records outside the data file), garbage; image configs: every layer and the
parent-uuid chain (each layer's parent uuid equals the uuid of the layer below, where
both are set). Offsets of what lies inside a ZFile are offsets in its decompressed
payload ("payload offset").

Severities: corruption (data may read wrong), leak (space wasted that nothing explains:
unreferenced data in a committed layer, gaps in a ZFile), warning (unusual, harmless),
note (normal, harmless: garbage, i.e. overwritten data a log-structured or sealed layer
keeps until a commit drops it, and the tail of interrupted appends or of writes lost
before a flush, which readers ignore), error (could not check: missing file, not a regular file, remote layer,
unsupported feature). Warnings and notes do not change the exit status.

\b
Exit status (qemu-img check convention, NOT the obd exit codes):
  0  no problem found (warnings allowed)
  1  a file could not be checked, or bad usage (unknown option, missing FILE),
     or any other failure of the command
  2  corruption found
  3  only leaks found (no data at risk)
Corruption wins over could-not-check, which wins over leaks. Unlike other obd
commands, every failure that is not a finding exits 1 here (a usage error too), so
that 2 always means corruption.

\b
JSON (--json), one document: {version (1), result ("clean", "error", "corrupt",
  "leaks"), exit_code, summary {files, corruptions, leaks, warnings, notes, errors,
  leaked_bytes, garbage_bytes}, files [{path, kind, wrappers, result, checked (counts:
  blocks, index_entries, valid_entries, index_records, segments, layers),
  leaked_bytes, garbage_bytes, findings [{severity, code, message, path, offset (null
  when none), space ("file" or "payload")}]}]}
Finding codes: tar, zfile_header, zfile_trailer, zfile_digest, zfile_header_trailer,
zfile_jump_table, zfile_index_crc, zfile_block_crc, zfile_block, zfile_gap,
lsmt_header, lsmt_trailer, header_trailer_mismatch, index_bounds, index_entry,
index_order, index_overlap, index_moffset, index_shared, garbage, unreferenced,
rw_index_header, rw_index_records, rw_index_record, rw_index_torn, rw_index_lost,
data_tail, sparse_size, chain, lsmt_unreadable, rw_open, zfile, no_index,
layer_missing, unsupported, unknown, unreadable, access, config.
"""


class _CheckCommand(click.Command):
    """Every failure that is not a finding exits 1 (could not check), never the obd exit
    code of the error (2 = usage would read as corruption here, 3 as leaks)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            e.exit_code = 1
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.exit_code = 1
            raise
        except CouldNotCheck:
            raise
        except ObdError as e:
            raise CouldNotCheck(e.message, path=e.path) from e
        except OSError as e:
            where = e.filename if isinstance(e.filename, str) else None
            raise CouldNotCheck(e.strerror or str(e), path=where) from e


class CouldNotCheck(ObdError):
    """A failure of ``obd check`` itself (not a finding): exit 1."""

    exit_code = 1


@click.command(
    "check",
    cls=_CheckCommand,
    help=_HELP,
    short_help="Verify every checksum and index of files or images.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (keys above).")
@index_option
@threads_option("Threads checking ZFile blocks (default: all cores).")
@paths_argument
def check(as_json: bool, index: str | None, threads: int | None, paths: tuple[str, ...]) -> None:
    from obd.image import check as chk

    if index is not None and len(paths) != 1:
        raise click.UsageError("--index goes with exactly one writable data FILE")
    with progress(chk.total_bytes(list(paths)), "check") as bar:
        reports = chk.check_paths(list(paths), index=index, progress=bar, threads=threads)
    code = chk.exit_code_of(reports)
    if as_json:
        click.echo(json.dumps(chk.document(reports), indent=2))
    else:
        _render(reports, code)
    sys.stdout.flush()
    sys.exit(code)


def _render(reports: list[Any], code: int) -> None:
    from obd.image import check as chk

    for r in reports:
        for f in r.findings:
            click.echo(str(f))
    for r in reports:
        parts = []
        for sev, word in ((chk.CORRUPTION, "corruption"), (chk.LEAK, "leak"), (chk.ERROR, "error")):
            n = r.count(sev)
            if n:
                parts.append(f"{n} {word}{'s' if n > 1 else ''}")
        what = r.kind + (f" in {'/'.join(r.wrappers)}" if r.wrappers else "")
        status = ", ".join(parts) if parts else "clean"
        leaked = f"; {r.leaked_bytes} bytes leaked" if r.leaked_bytes else ""
        garbage = (
            f"; {r.garbage_bytes} bytes of garbage (a commit drops them)" if r.garbage_bytes else ""
        )
        click.echo(f"{r.path}: {what}: {status}{leaked}{garbage}")
    click.echo(
        {
            chk.EXIT_CLEAN: "No errors were found.",
            chk.EXIT_LEAKS: "Only leaks were found: no data is at risk.",
            chk.EXIT_CORRUPT: "Corruption was found.",
            chk.EXIT_ERROR: "Some files could not be checked.",
        }[code]
    )
