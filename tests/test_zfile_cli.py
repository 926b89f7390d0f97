"""``obd zfile`` (upstream overlaybd-zfile): modes, exit codes, one-line errors, atomic output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from commands.main import main
from obd.formats.codecs import get_codec, have_extension
from obd.formats.zfile import HeaderTrailer
from tests.vectors import REPO, fill_mixed, require_vectors

DATA = fill_mixed(21, 300_000) + b"end"


def obd(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commands.main", "zfile", *args],
        input=stdin,
        capture_output=True,
        cwd=cwd or REPO,
        timeout=60,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """In-process run of ``obd zfile ARGS`` -> (exit code, stdout, stderr)."""
    try:
        main(["zfile", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("obd: error: ")
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "plain.bin"
    p.write_bytes(DATA)
    return p


def test_compress_extract_round_trip(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    d = src.parent
    for algo in ("lz4", "zstd"):
        for bs in ("4", "64"):
            z, x = d / f"{algo}{bs}.zf", d / f"{algo}{bs}.out"
            assert run(capsys, "--algorithm", algo, "--bs", bs, str(src), str(z))[0] == 0
            assert run(capsys, "-x", str(z), str(x))[0] == 0
            assert x.read_bytes() == DATA
            umask = os.umask(0)
            os.umask(umask)
            assert (z.stat().st_mode & 0o777) == 0o644 & ~umask
            assert (x.stat().st_mode & 0o777) == 0o644 & ~umask
    assert leftovers(d) == []


def test_tar_round_trip(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    d = src.parent
    assert run(capsys, "-t", str(src), str(d / "a.tar"))[0] == 0
    blob = (d / "a.tar").read_bytes()
    assert blob[1024:1040] == b"overlaybd.commit"
    assert run(capsys, "-x", "-t", str(d / "a.tar"), str(d / "a.out"))[0] == 0
    assert (d / "a.out").read_bytes() == DATA
    assert run(capsys, "--verify", str(d / "a.tar")) == (
        0,
        f"{d / 'a.tar'} is a valid zfile blob.\n",
        "",
    )
    # -x -t on something that is not tar
    assert run(capsys, "--bs", "4", str(src), str(d / "b.zf"))[0] == 0
    code, _, err = run(capsys, "-x", "-t", str(d / "b.zf"), str(d / "b.out"))
    assert code == 4 and "not a tar" in one_line_error(err)


def test_threads_give_identical_files(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    d = src.parent
    outs = []
    for t in ("1", "2", "5"):
        assert run(capsys, "--threads", t, str(src), str(d / f"t{t}.zf"))[0] == 0
        outs.append((d / f"t{t}.zf").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_vectors_reproduced(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    vdir = require_vectors()
    if not get_codec("lz4").matches_vectors():
        pytest.skip("system liblz4 is not 1.9.4: compressed bytes may differ from the vectors")
    src = str(vdir / "zsrc_a.bin")
    assert run(capsys, src, str(tmp_path / "a.zf"))[0] == 0
    assert (tmp_path / "a.zf").read_bytes() == (vdir / "zfile_a_lz4_default.zfile").read_bytes()
    assert run(capsys, "-t", src, str(tmp_path / "a.tar"))[0] == 0
    assert (tmp_path / "a.tar").read_bytes() == (vdir / "zfile_a_tar.tar").read_bytes()


def test_stdin_full_blocks(src: Path) -> None:
    """One positional: it is the target and input comes from stdin, cut into full blocks."""
    d = src.parent
    p = subprocess.Popen(
        [sys.executable, "-m", "commands.main", "zfile", str(d / "s.zf")],
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    assert p.stdin is not None
    for i in range(0, len(DATA), 1000):  # short pipe writes
        p.stdin.write(DATA[i : i + 1000])
        p.stdin.flush()
    p.stdin.close()
    assert p.wait(60) == 0
    assert obd(str(src), str(d / "f.zf")).returncode == 0
    assert (d / "s.zf").read_bytes() == (d / "f.zf").read_bytes()


def test_output_exists(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    d = src.parent
    target = d / "o.zf"
    target.write_bytes(b"old")
    code, _, err = run(capsys, str(src), str(target))
    assert code == 5 and "already exists" in one_line_error(err)
    assert target.read_bytes() == b"old"
    assert run(capsys, "-f", str(src), str(target))[0] == 0
    assert target.read_bytes()[:5] == b"ZFile"
    assert leftovers(d) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--algorithm", "brotli", "a", "b"],
        ["--bs", "128", "a", "b"],
        ["--bs", "3", "a", "b"],
        ["--threads", "0", "a", "b"],
        [],
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err


def test_extract_needs_target(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    code, _, err = run(capsys, "-x", str(src))
    assert code == 2 and "stdin" in one_line_error(err)


def test_extract_not_zfile(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    code, _, err = run(capsys, "-x", str(src), str(src.parent / "x"))
    assert code == 4 and "not a ZFile" in one_line_error(err)
    assert not (src.parent / "x").exists()


def test_missing_source(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, str(tmp_path / "nope"), str(tmp_path / "x.zf"))
    assert code == 3 and "no such file" in one_line_error(err)
    assert not (tmp_path / "x.zf").exists() and leftovers(tmp_path) == []


def _corrupt_copy(capsys: pytest.CaptureFixture[str], src: Path) -> Path:
    z = src.parent / "c.zf"
    assert run(capsys, str(src), str(z))[0] == 0
    blob = bytearray(z.read_bytes())
    for pos in (600, 50_000):  # inside two stored blocks
        blob[pos] ^= 0x10
    z.write_bytes(bytes(blob))
    return z


def test_extract_corrupt_leaves_nothing(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    z = _corrupt_copy(capsys, src)
    out = src.parent / "c.out"
    code, _, err = run(capsys, "-x", str(z), str(out))
    line = one_line_error(err)
    assert code == 4 and "block 0" in line and "offset 512" in line
    assert not out.exists() and leftovers(src.parent) == []
    # the same through a real process: one line on stderr, no traceback
    p = obd("-x", "--threads", "2", str(z), str(out))
    assert p.returncode == 4 and p.stdout == b""
    assert len(p.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in p.stderr
    assert not out.exists() and leftovers(src.parent) == []


def test_verify_lists_bad_blocks(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    z = _corrupt_copy(capsys, src)
    code, out, err = run(capsys, "--verify", str(z))
    lines = err.strip().splitlines()
    assert code == 4 and out == ""
    assert len(lines) == 3
    assert "block 0 at offset 512: checksum mismatch" in lines[0]
    assert "checksum mismatch" in lines[1]
    assert lines[2].startswith("obd: error: ") and "2 bad block(s)" in lines[2]


def test_verify_without_crc(capsys: pytest.CaptureFixture[str]) -> None:
    vdir = require_vectors()
    code, _, err = run(capsys, "--verify", str(vdir / "zfile_a_lz4_nocrc.zfile"))
    assert code == 6 and "verify = 0" in one_line_error(err)


def test_corrupt_header(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    z = src.parent / "h.zf"
    assert run(capsys, str(src), str(z))[0] == 0
    blob = bytearray(z.read_bytes())
    blob[40] ^= 1
    z.write_bytes(bytes(blob))
    for args in (["-x", str(z), str(src.parent / "h.out")], ["--verify", str(z)]):
        code, _, err = run(capsys, *args)
        assert code == 4 and "digest" in one_line_error(err)


def test_interrupted_leaves_no_output(tmp_path: Path) -> None:
    target = tmp_path / "i.zf"
    p = subprocess.Popen(
        [sys.executable, "-m", "commands.main", "zfile", "--threads", "2", str(target)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert p.stdin is not None
    p.stdin.write(DATA * 8)
    p.stdin.flush()
    deadline = time.monotonic() + 20
    while not leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(tmp_path), "the temporary output never appeared"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert b"interrupted" in err and b"Traceback" not in err
    assert not target.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "damage",
    ["truncate", "trailer", "jump_table", "header_magic", "block_size_128k"],
)
def test_damaged_files_one_line(capsys: pytest.CaptureFixture[str], src: Path, damage: str) -> None:
    z = src.parent / "d.zf"
    assert run(capsys, str(src), str(z))[0] == 0
    blob = bytearray(z.read_bytes())
    expected = 4
    if damage == "truncate":
        del blob[-700:]
    elif damage == "trailer":
        blob[-512 + 45] ^= 1
    elif damage == "jump_table":
        blob[-512 - 8] ^= 1
    elif damage == "header_magic":
        blob[0] ^= 1
    else:  # a valid header saying 128 KiB blocks: unsupported, not corrupt
        h = HeaderTrailer.unpack(blob)
        blob[:512] = replace(h, block_size=128 << 10).pack_slot()
        expected = 6
    z.write_bytes(bytes(blob))
    out = src.parent / "d.out"
    for args in (["-x", str(z), str(out)], ["--verify", str(z)]):
        code, stdout, err = run(capsys, *args)
        one_line_error(err)
        assert code == expected and stdout == ""
    assert not out.exists() and leftovers(src.parent) == []


# Modules a short command must not load before it needs them (issue 10: start-up).
_HEAVY = ("numpy", "zstandard", "lz4", "httpx", "rich", "crc32c", "obd.image", "obd.formats.lsmt")
_PROBE = """
import sys
sys.argv = ["obd"] + sys.argv[1:]
from commands.main import main
try:
    main()
finally:
    heavy = {heavy!r}
    sys.stderr.write("HEAVY " + ",".join(h for h in heavy if h in sys.modules) + "\\n")
"""


def _heavy_loaded(*args: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=_HEAVY), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("HEAVY ")]
    assert lines, p.stderr
    return [m for m in lines[-1][6:].split(",") if m]


def test_short_commands_load_no_heavy_module(src: Path, tmp_path: Path) -> None:
    """``obd --help``, and compressing, extracting and verifying a small file with ``obd
    zfile``, load neither numpy nor the image/LSMT code nor HTTP nor, with the batch
    extension, the crc32c package (tests/test_startup_imports.py: when they do)."""
    assert _heavy_loaded("--help") == []
    assert _heavy_loaded("--version") == []
    assert _heavy_loaded("zfile", "--help") == []
    if not have_extension():
        pytest.skip("the batch codec extension is not built (the ctypes path uses numpy)")
    z = tmp_path / "p.zfile"
    assert _heavy_loaded("zfile", str(src), str(z)) == []
    assert _heavy_loaded("zfile", "--algorithm", "zstd", "-f", str(src), str(z)) == []
    assert _heavy_loaded("zfile", "-x", str(z), str(tmp_path / "back")) == []
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    assert _heavy_loaded("zfile", "--verify", str(z)) == []
