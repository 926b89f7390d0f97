"""Benchmark ``obd check`` and ``obd merge`` against ``obd zfile -x`` of the same layers.

Not a test. Builds a 1 GiB writable layer filled with mixed data (random, text, records,
repeated patterns, zeros) through the obd API, commits it with ``-z`` (lz4, 4 KiB blocks,
CRCs on), then times the commands (real CLI, subprocess, warm page cache, best of
``--runs``) and prints a table with MiB/s of the ZFile's plain size and the ratio.
The goal (issue 4) is check speed >= 0.5 x extract speed.

With ``--merge`` it also commits two upper ZFile layers of scattered 4-64 KiB writes
(each ~1/8 of the disk) and times ``obd check`` of the three layers, ``obd merge`` of
the stack into a ZFile layer, a plain layer and a raw disk. ``--tree DIR`` (repeatable)
runs every command in each of those checkouts too (e.g. a worktree of an older
commit), runs interleaved, so before and after share one table and one machine state.

    python bench/check.py [--size-mib 1024] [--runs 3] [--keep DIR] [--merge] [--tree DIR]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def build_upper(folder: str, name: str, size: int, seed: int) -> str:
    """A ZFile layer of scattered 4-64 KiB writes covering about 1/8 of ``size``."""
    data, index, out = (os.path.join(folder, f"{name}.{n}") for n in ("data", "index", "zfile"))
    create(data, index, size, force=True)
    rng = np.random.default_rng(seed)
    piece = next(mixed_chunks(4 << 20, seed))
    with open_rw_layer(data, index) as layer:
        done = 0
        while done < size // 8:
            n = int(rng.integers(1, 17)) * 4096
            at = int(rng.integers(0, (size - n) // 4096)) * 4096
            k = int(rng.integers(0, len(piece) - n))
            layer.pwrite(at, piece[k : k + n])
            done += n
        layer.flush()
    commit(data, index, out, force=True, zfile=ZFileOptions(threads=cores()))
    os.unlink(data)
    os.unlink(index)
    return out


def run(*args: str, tree: str = REPO) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "commands.main", *args], env=env, capture_output=True, cwd=tree
    )
    if p.returncode:
        sys.stderr.write(f"{' '.join(args)} ({tree}): exit {p.returncode} {p.stderr[-300:]!r}\n")
    return time.perf_counter() - t, p.returncode


def merge_bench(folder: str, zpath: str, size: int, runs: int, trees: list[str]) -> None:
    """Check and merge a 3-layer ZFile stack, each command in each tree, interleaved."""
    ups = []
    for k in (1, 2):
        up = os.path.join(folder, f"u{k}.zfile")
        if not os.path.exists(up):
            build_upper(folder, f"u{k}", size, 100 + k)
        ups.append(up)
    layers = [zpath, *ups]
    outs = {n: os.path.join(folder, n) for n in ("m.zfile", "m.layer", "m.raw")}
    cmds = [
        ("check 3 layers", ("check", *layers)),
        ("merge -> zfile", ("merge", "-f", "-o", outs["m.zfile"], *layers)),
        ("merge -> layer", ("merge", "-f", "--compress=false", "-o", outs["m.layer"], *layers)),
        ("merge --raw", ("merge", "-f", "--raw", "-o", outs["m.raw"], *layers)),
    ]
    best: dict[tuple[str, str], float] = {}
    codes: dict[tuple[str, str], int] = {}
    for _ in range(runs):
        for name, cmd in cmds:
            for tree in trees:
                dt, rc = run(*cmd, tree=tree)
                best[name, tree] = min(best.get((name, tree), dt), dt)
                codes[name, tree] = rc
                for o in outs.values():
                    if os.path.exists(o):
                        os.unlink(o)
    print(f"\n3-layer ZFile stack, {size / 2**20:.0f} MiB virtual, best of {runs}, seconds")
    print(f"{'command':<16}" + "".join(f" {t[-24:]:>24}" for t in trees) + "  first/last")
    for name, _ in cmds:
        secs = [best[name, t] for t in trees]
        bad = [t for t in trees if codes[name, t]]
        print(
            f"{name:<16}"
            + "".join(f" {s:24.2f}" for s in secs)
            + f"  {secs[0] / secs[-1]:9.2f}"
            + (f"  FAILED in {bad}" if bad else "")
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="folder to build in and keep")
    ap.add_argument("--merge", action="store_true", help="also check and merge a 3-layer stack")
    ap.add_argument("--tree", action="append", default=[], help="another checkout to time")
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.tree] + [REPO]
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
        for tree in trees:
            where = subprocess.run(
                [sys.executable, "-c", "import obd; print(obd.__file__)"],
                cwd=tree,
                env=dict(os.environ, PYTHONPATH=tree),
                capture_output=True,
                text=True,
            ).stdout.strip()
            print(f"tree {tree}: obd from {where}")
        run("check", zpath)  # warm the page cache
        best: dict[tuple[str, str], float] = {}
        codes: dict[tuple[str, str], int] = {}
        for _ in range(args.runs):
            for name, cmd in (
                ("obd zfile -x", ("zfile", "-x", "-f", zpath, raw)),
                ("obd check", ("check", zpath)),
            ):
                for tree in trees:
                    dt, rc = run(*cmd, tree=tree)
                    best[name, tree] = min(best.get((name, tree), dt), dt)
                    codes[name, tree] = rc
            os.unlink(raw)
        zsize = os.path.getsize(zpath)
        print(
            f"ZFile: {zsize / 2**20:.0f} MiB stored, {plain / 2**20:.0f} MiB plain, {cores()} cores"
        )
        print(f"{'command':<14} {'tree':<24} {'seconds':>8} {'MiB/s':>8} {'exit':>5}")
        for (name, tree), dt in best.items():
            print(
                f"{name:<14} {tree[-24:]:<24} {dt:8.2f} {plain / 2**20 / dt:8.0f} "
                f"{codes[name, tree]:5d}"
            )
        ratio = best["obd zfile -x", REPO] / best["obd check", REPO]
        print(f"check speed / extract speed = {ratio:.2f} (goal >= 0.5)")
        if args.merge:
            merge_bench(folder, zpath, args.size_mib << 20, args.runs, trees)
        return 0 if ratio >= 0.5 and codes["obd check", REPO] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
