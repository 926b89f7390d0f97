"""Benchmark ``obd check`` against ``obd zfile -x`` of the same compressed layer.

Not a test. Builds a 1 GiB writable layer filled with mixed data (random, text, records,
repeated patterns, zeros) through the obd API, commits it with ``-z`` (lz4, 4 KiB blocks,
CRCs on), then times the two commands (real CLI, subprocess, warm page cache, best of
``--runs``) and prints a table with MiB/s of the ZFile's plain size and the ratio.
The goal (issue 4) is check speed >= 0.5 x extract speed.

    python bench/check.py [--size-mib 1024] [--runs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from obd.image.layers import open_rw_layer
from obd.image.ops import ZFileOptions, commit, create
from obd.io.cpu import cores

CHUNK = 64 << 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixed_chunks(size: int, seed: int = 7):
    """Yield 4 MiB pieces of a deterministic mix of data kinds, 64 KiB at a time."""
    rng = np.random.default_rng(seed)
    words = (
        b"layer block image index segment overlay registry manifest digest commit merge "
        b"the quick brown fox jumps over the lazy dog ext4 inode journal extent"
    ).split()
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 400_000))
    piece = bytearray()
    done = 0
    while done < size:
        kind = int(rng.integers(0, 5))
        if kind == 0:
            data = rng.bytes(CHUNK)
        elif kind == 1:
            off = int(rng.integers(0, len(text) - CHUNK))
            data = text[off : off + CHUNK]
        elif kind == 2:
            recs = np.arange(CHUNK // 8, dtype="<u8") * int(rng.integers(1, 1000))
            data = recs.tobytes()
        elif kind == 3:
            pat = rng.bytes(int(rng.integers(3, 300)))
            data = (pat * (CHUNK // len(pat) + 1))[:CHUNK]
        else:
            data = bytes(CHUNK)
        piece += data
        done += CHUNK
        if len(piece) >= 4 << 20 or done >= size:
            yield bytes(piece)
            piece = bytearray()


def build(folder: str, size: int) -> str:
    data, index, out = (os.path.join(folder, n) for n in ("l.data", "l.index", "l.zfile"))
    create(data, index, size, force=True)
    layer = open_rw_layer(data, index)
    with layer:
        pos = 0
        for piece in mixed_chunks(size):
            layer.pwrite(pos, piece)
            pos += len(piece)
        layer.flush()
    commit(
        data,
        index,
        out,
        force=True,
        zfile=ZFileOptions(threads=cores(), overwrite_header=True),
    )
    os.unlink(data)
    os.unlink(index)
    return out


def run(*args: str) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "commands.main", *args], env=env, capture_output=True)
    return time.perf_counter() - t, p.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="folder to build in and keep")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="obd-bench-check-")
    os.makedirs(folder, exist_ok=True)
    try:
        zpath = os.path.join(folder, "l.zfile")
        if not os.path.exists(zpath):
            t = time.perf_counter()
            build(folder, args.size_mib << 20)
            print(f"built {zpath} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        from obd.formats.zfile import ZFileReader
        from obd.io.file import open_file

        with ZFileReader(open_file(zpath)) as r:
            plain = r.size()
        raw = os.path.join(folder, "l.raw")
        run("check", zpath)  # warm the page cache
        best: dict[str, float] = {}
        codes: dict[str, int] = {}
        for _ in range(args.runs):
            for name, cmd in (
                ("obd zfile -x", ("zfile", "-x", "-f", zpath, raw)),
                ("obd check", ("check", zpath)),
            ):
                dt, rc = run(*cmd)
                best[name] = min(best.get(name, dt), dt)
                codes[name] = rc
            os.unlink(raw)
        zsize = os.path.getsize(zpath)
        print(
            f"ZFile: {zsize / 2**20:.0f} MiB stored, {plain / 2**20:.0f} MiB plain, {cores()} cores"
        )
        print(f"{'command':<14} {'seconds':>8} {'MiB/s':>8} {'exit':>5}")
        for name, dt in best.items():
            print(f"{name:<14} {dt:8.2f} {plain / 2**20 / dt:8.0f} {codes[name]:5d}")
        ratio = best["obd zfile -x"] / best["obd check"]
        print(f"check speed / extract speed = {ratio:.2f} (goal >= 0.5)")
        return 0 if ratio >= 0.5 and codes["obd check"] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
