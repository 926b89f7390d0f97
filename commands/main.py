"""``obd`` entry point: a lazy click group and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

# obd uses numpy for bulk index work, never its BLAS: one BLAS thread, not one per core.
# OpenBLAS starts its threads when numpy is imported and they spin for work, which cost
# a 1 GiB commit 0.1-0.15 s of CPU and takes cycles from the server's threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from obd import __version__
from obd.errors import ObdError

# name -> "module:attribute"; modules are imported only when the subcommand runs, so
# ``obd --help`` and shell completion never import compression, HTTP or server code.
SUBCOMMANDS: dict[str, str] = {
    "create": "commands.create:create",
    "commit": "commands.commit:commit",
    "merge": "commands.merge:merge",
    "zfile": "commands.zfile:zfile",
    "inspect": "commands.inspect:inspect",
    "map": "commands.inspect:map_",
    "check": "commands.check:check",
    "serve": "commands.serve:serve",
    "attach": "commands.attach:attach",
    "detach": "commands.attach:detach",
    "apply": "commands.apply:apply",
    "convert": "commands.convert:convert",
    "ls": "commands.fs:ls",
    "cat": "commands.fs:cat",
}

SHORT_HELP: dict[str, str] = {
    "create": "Create a writable layer (data + index files).",
    "commit": "Commit a writable layer into a read-only layer.",
    "merge": "Flatten a stack of layers into one layer or a raw disk.",
    "zfile": "Compress or extract a ZFile (seekable compressed file).",
    "inspect": "Show what an overlaybd file or image holds.",
    "map": "Show the extents of a layer's or image's virtual disk.",
    "check": "Verify every checksum and index of files or images.",
    "serve": "Serve images as block devices (NBD, TCMU).",
    "attach": "Attach an image as a SCSI disk through TCMU (configfs).",
    "detach": "Detach a TCMU disk made by obd attach.",
    "apply": "Apply an OCI layer tar to an image's ext4 filesystem.",
    "convert": "Convert an OCI image into an overlaybd image.",
    "ls": "List a folder inside an image's ext4 filesystem.",
    "cat": "Print a file inside an image's ext4 filesystem.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in SUBCOMMANDS if _available(n)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None or not _available(cmd_name):
            return None
        mod_name, attr = target.split(":")
        mod = importlib.import_module(mod_name)
        cmd: click.Command = getattr(mod, attr)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, SHORT_HELP.get(n, "")) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(name: str) -> bool:
    mod_name = SUBCOMMANDS[name].split(":")[0]
    return importlib.util.find_spec(mod_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="obd")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """obd: build, inspect and serve overlaybd images.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 file access, 4 corrupt file,
    5 output exists, 6 unsupported, 7 bad config, 8 remote error, 9 read-only,
    130 interrupted.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="obd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> Any:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return cli.main(args=argv, prog_name="obd", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("obd: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ObdError as e:
        _trace(debug)
        click.echo(f"obd: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("obd: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:
        _trace(debug)
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"obd: error: {where}{e.strerror or e}", err=True)
        sys.exit(3)
    except Exception as e:
        _trace(debug)
        hint = "" if debug else " (run with --debug for the traceback)"
        click.echo(f"obd: internal error: {type(e).__name__}: {e}{hint}", err=True)
        sys.exit(1)


def _trace(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()


if __name__ == "__main__":
    main()
