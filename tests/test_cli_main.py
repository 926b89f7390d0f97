"""The obd entry point: version, help, lazy imports, --debug, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

from obd import __version__
from obd.errors import EXIT_CODES
from tests.conftest import REPO, run_obd


def test_version_and_help():
    r = run_obd("--version")
    assert r.code == 0 and __version__ in r.out
    r = run_obd("--help")
    assert r.code == 0
    for name in ("create", "commit", "merge", "zfile", "inspect", "check", "serve"):
        assert name in r.out


def test_help_and_completion_import_no_heavy_modules():
    code = (
        "import sys\n"
        "from commands.main import cli\n"
        "try:\n"
        "    cli.main(args=['--help'], prog_name='obd', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('numpy', 'zstandard', 'lz4', 'http', 'httpx', 'socketserver',"
        " 'rich', 'prometheus_client', 'obd.formats', 'obd.serve') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr
    env["_OBD_COMPLETE"] = "bash_complete"
    env["COMP_WORDS"] = "obd co"
    env["COMP_CWORD"] = "1"
    p = subprocess.run(
        [sys.executable, "-c", "from commands.main import cli; cli(prog_name='obd')"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "commit" in p.stdout and "merge" not in p.stdout


def test_debug_shows_traceback_and_errors_are_one_line(tmp_path):
    r = run_obd("merge", "--raw", "-o", tmp_path / "o", tmp_path / "missing")
    assert r.code == EXIT_CODES["FileAccessError"]
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    r = run_obd("--debug", "merge", "--raw", "-o", tmp_path / "o", tmp_path / "missing")
    assert r.code == EXIT_CODES["FileAccessError"]
    assert "Traceback" in r.err


def test_man_page_lists_exit_codes():
    text = (REPO / "man" / "obd.1").read_text()
    for name, code in EXIT_CODES.items():
        assert name in text and f"\\fB{code}\\fR" in text


def test_unknown_command_is_usage_error():
    r = run_obd("frobnicate")
    assert r.code == 2 and "No such command" in r.err


def test_systemd_unit_ships_in_the_package():
    from importlib.resources import files

    unit = files("obd").joinpath("data/obd-serve.service").read_text()
    assert "Restart=always" in unit and "obd serve --nbd" in unit


def _on_terminal(args: list[str], cwd) -> tuple[int, bytes]:
    """Run obd with a pseudo-terminal (100 columns) as stdin, stdout and stderr."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    m, s = pty.openpty()
    fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-m", "commands.main", *args],
        stdin=s, stdout=s, stderr=s, close_fds=True, cwd=cwd, env=env,
    )  # fmt: skip
    os.close(s)
    out = b""
    while True:
        r, _, _ = select.select([m], [], [], 30)
        if not r:
            break
        try:
            d = os.read(m, 65536)
        except OSError:
            break
        if not d:
            break
        out += d
    os.close(m)
    return p.wait(timeout=30), out


def test_progress_bar_on_a_terminal_only(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20) * 48)
    code, out = _on_terminal(["create", "--from", str(raw), "l.data", "l.index"], tmp_path)
    assert code == 0 and b"create:" in out and b"48.0M" in out
    code, out = _on_terminal(["commit", "l.data", "l.index", "l.lsmt"], tmp_path)
    assert code == 0 and b"commit:" in out
    r = run_obd("merge", "--raw", "-o", tmp_path / "back.raw", tmp_path / "l.lsmt")
    assert r.code == 0 and r.err == "" and r.out == ""  # piped: no bar
    assert (tmp_path / "back.raw").read_bytes() == raw.read_bytes()
