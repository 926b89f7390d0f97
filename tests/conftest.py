from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_obd(
    *args: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
) -> Result:
    """Run the real ``obd`` command line in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "commands.main", *map(str, args)],
        cwd=cwd,
        input=input,
        capture_output=True,
        timeout=timeout,
        env=env,
    )
    return Result(
        p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    )


def assert_one_line_error(r: Result, code: int, *needles: str) -> None:
    assert r.code == code, f"exit {r.code}, expected {code}; stderr: {r.err!r}"
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {r.err!r}"
    assert "Traceback" not in r.err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


@pytest.fixture
def obd():
    return run_obd


@pytest.fixture
def non_regular_files(tmp_path: Path) -> Iterator[list[tuple[Path, str]]]:
    """A directory, a FIFO and a bound Unix socket, each with the words obd names it by."""
    import socket

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        yield [(tmp_path, "a directory"), (fifo, "a pipe"), (sock_path, "a socket")]
