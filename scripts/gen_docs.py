#!/usr/bin/env python3
"""Generate man/ pages and completions/ scripts from the click command tree.

    python3 scripts/gen_docs.py            # rewrite man/ and completions/
    python3 scripts/gen_docs.py --check    # exit 1 when the committed files drifted

tests/test_docs.py runs the check, so every command gets its docs for free.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click
from click.shell_completion import BashComplete, FishComplete, ZshComplete

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from commands.main import SUBCOMMANDS, _available, cli  # noqa: E402
from obd import __version__  # noqa: E402
from obd.errors import EXIT_CODES  # noqa: E402


def _roff(text: str) -> str:
    out = []
    for line in text.splitlines():
        line = line.replace("\\", "\\\\").replace("-", "\\-")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _description(help_text: str) -> str:
    out = []
    for para in inspect.cleandoc(help_text).split("\n\n"):
        if para.startswith("\b\n"):
            out += [".PP", ".nf", _roff(para[2:]), ".fi"]
        else:
            out += [".PP", _roff(" ".join(para.split()))]
    return "\n".join(out)


def _param_rows(cmd: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    rows = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is not None:
            rows.append(rec)
    return rows


def man_page(name: str, cmd: click.Command, parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    full = ctx.command_path
    title = full.replace(" ", "-").upper()
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [
        f'.TH "{title}" "1" "" "obd {__version__}" "obd manual"',
        ".SH NAME",
        f"{full.replace(' ', '-')} \\- {_roff(cmd.get_short_help_str(limit=200))}",
        ".SH SYNOPSIS",
        f".B {full}",
        _roff(usage),
        ".SH DESCRIPTION",
        _description(cmd.help or ""),
    ]
    rows = _param_rows(cmd, ctx)
    if rows:
        lines.append(".SH OPTIONS")
        for opt, desc in rows:
            lines += [".TP", f"\\fB{_roff(opt)}\\fR", _roff(desc)]
    if isinstance(cmd, click.Group):
        lines.append(".SH COMMANDS")
        for sub in cmd.list_commands(ctx):
            sc = cmd.get_command(ctx, sub)
            if sc is not None:
                lines += [
                    ".TP",
                    f"\\fB{sub}\\fR",
                    _roff(sc.get_short_help_str(limit=200)),
                    f"See \\fBobd\\-{sub}\\fR(1).",
                ]
        lines.append(".SH EXIT STATUS")
        for cls_name, code in sorted(EXIT_CODES.items(), key=lambda kv: kv[1]):
            lines += [".TP", f"\\fB{code}\\fR", cls_name]
        lines += [".TP", "\\fB130\\fR", "interrupted"]
    lines.append(".SH SEE ALSO")
    lines.append(
        ", ".join(f"\\fBobd\\-{n}\\fR(1)" for n in SUBCOMMANDS if n != name and _available(n))
        or "obd(1)"
    )
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    files: dict[str, str] = {}
    root = click.Context(cli, info_name="obd")
    files["man/obd.1"] = man_page("obd", cli, None)
    for name in cli.list_commands(root):
        cmd = cli.get_command(root, name)
        assert cmd is not None
        files[f"man/obd-{name}.1"] = man_page(name, cmd, root)
    for _shell, cls, fname in (
        ("bash", BashComplete, "completions/obd.bash"),
        ("zsh", ZshComplete, "completions/_obd"),
        ("fish", FishComplete, "completions/obd.fish"),
    ):
        files[fname] = cls(cli, {}, "obd", "_OBD_COMPLETE").source()
    return files


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    files = generate()
    drift = []
    for rel, text in files.items():
        path = REPO / rel
        old = path.read_text() if path.exists() else None
        if old != text:
            drift.append(rel)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for d in ("man", "completions"):
        for path in (REPO / d).glob("*"):
            rel = f"{d}/{path.name}"
            if rel not in files:
                drift.append(rel)
                if not args.check:
                    path.unlink()
    if args.check and drift:
        print("out of date (run scripts/gen_docs.py): " + ", ".join(sorted(drift)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
