#!/usr/bin/env python3
"""Core layer speed: index open, random reads through a stack, commit.

    python3 bench/core.py [--quick]

Prints a table of obd beside the plain peer measured in the same run:
1. opening a read-only layer with 1,000,000 index entries (goal: under 1 s);
2. random 4 KiB reads through a 3-layer plain stack vs ``os.pread`` on one file of the
   same size (goal: at least half the rate);
3. commit of a 1 GiB writable layer with 100,000 segments vs ``cp`` of its data file.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from obd.formats.lsmt import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HeaderTrailer,
    Mappings,
    encode_entries,
)
from obd.formats.lsmt.rw import LSMTWritable
from obd.image import ops
from obd.image.layers import open_ro_layer
from obd.image.stack import Stack
from obd.io.file import open_file


def make_big_index_layer(path: str, n: int) -> None:
    """A valid read-only layer with ``n`` one-sector entries (half zeroed)."""
    i = np.arange(n, dtype=np.uint64)
    zeroed = (i % 2).astype(bool)
    m = Mappings(
        offset=i * np.uint64(2),
        length=np.ones(n, dtype=np.uint64),
        moffset=np.where(zeroed, np.uint64(16), np.uint64(8) + (i % np.uint64(8))),
        zeroed=zeroed,
        tag=np.zeros(n, dtype=np.uint8),
    )
    hdr = HeaderTrailer(flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED, virtual_size=int(2 * n * 512))
    with open(path, "wb") as f:
        f.write(hdr.pack())
        f.write(os.urandom(4096))
        f.write(encode_entries(m))
        f.write(hdr.with_(flags=FLAG_DATA | FLAG_SEALED, index_offset=8192, index_size=n).pack())


def bench_open(tmp: str) -> tuple[float, int]:
    p = os.path.join(tmp, "big.lsmt")
    make_big_index_layer(p, 1_000_000)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        lay = open_ro_layer(p)
        best = min(best, time.perf_counter() - t)
        n = len(lay.index)
        lay.close()
    return best, n


def build_stack(tmp: str, vsize: int, rng: random.Random) -> list[str]:
    layers = []
    for k in range(3):
        d, i = os.path.join(tmp, f"s{k}.data"), os.path.join(tmp, f"s{k}.index")
        ops.create(d, i, vsize)
        lay = LSMTWritable.open(open_file(d, writable=True), open_file(i, writable=True))
        written = 0
        while written < vsize // 2:
            ln = rng.choice([64, 128, 256, 1024]) * 1024
            off = rng.randrange(0, (vsize - ln) // 4096) * 4096
            lay.pwrite(off, rng.randbytes(ln))
            written += ln
        lay.flush()
        lay.close()
        out = os.path.join(tmp, f"s{k}.lsmt")
        ops.commit(d, i, out)
        os.unlink(d)
        layers.append(out)
    return layers


def bench_reads(tmp: str, vsize: int, count: int) -> tuple[float, float]:
    rng = random.Random(42)
    layers = build_stack(tmp, vsize, rng)
    flat = os.path.join(tmp, "flat.raw")
    with open(flat, "wb") as f:
        f.truncate(vsize)
        f.write(os.urandom(min(vsize, 64 << 20)))
    offsets = [rng.randrange(0, vsize // 4096) * 4096 for _ in range(count)]
    # warm the page cache for both
    for p in [*layers, flat]:
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    stack = Stack([open_ro_layer(p) for p in layers])
    fd = os.open(flat, os.O_RDONLY)
    pread = os.pread
    best_os = best_obd = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for off in offsets:
            pread(fd, 4096, off)
        best_os = max(best_os, count / (time.perf_counter() - t))
        sp = stack.pread
        t = time.perf_counter()
        for off in offsets:
            sp(off, 4096)
        best_obd = max(best_obd, count / (time.perf_counter() - t))
    os.close(fd)
    stack.close()
    return best_obd, best_os


def bench_commit(tmp: str, vsize: int, segments: int) -> tuple[float, float, int]:
    rng = random.Random(7)
    d, i = os.path.join(tmp, "c.data"), os.path.join(tmp, "c.index")
    ops.create(d, i, vsize)
    lay = LSMTWritable.open(open_file(d, writable=True), open_file(i, writable=True))
    avg = vsize // segments
    blob = rng.randbytes(1 << 20)
    for _ in range(segments):
        ln = max(512, (rng.randrange(avg // 2, avg * 3 // 2) // 512) * 512)
        off = rng.randrange(0, (vsize - ln) // 512) * 512
        lay.pwrite(
            off, blob[: min(ln, len(blob))] * (ln // len(blob) + 1) if ln > len(blob) else blob[:ln]
        )
    lay.flush()
    nseg = len(lay.idx)
    lay.close()
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    ops.commit(d, i, os.path.join(tmp, "c.lsmt"))
    t_obd = time.perf_counter() - t
    os.unlink(os.path.join(tmp, "c.lsmt"))
    t = time.perf_counter()
    subprocess.run(["cp", d, os.path.join(tmp, "c.copy")], check=True)
    subprocess.run(["sync", os.path.join(tmp, "c.copy")], check=False)
    t_cp = time.perf_counter() - t
    return t_obd, t_cp, nseg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="obd-bench-")
    try:
        t_open, n = bench_open(tmp)
        vsize = (256 if args.quick else 1024) << 20
        obd_rate, os_rate = bench_reads(tmp, vsize, 50_000 if args.quick else 200_000)
        cvs = (256 if args.quick else 1024) << 20
        t_obd, t_cp, nseg = bench_commit(tmp, cvs, 25_000 if args.quick else 100_000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        (f"open layer, {n} index entries", f"{t_open * 1000:.0f} ms", "goal < 1000 ms", ""),
        (
            f"random 4 KiB reads, 3-layer stack ({vsize >> 20} MiB)",
            f"{obd_rate / 1000:.0f} k/s",
            f"os.pread {os_rate / 1000:.0f} k/s",
            f"{obd_rate / os_rate:.2f}x (goal >= 0.5x)",
        ),
        (
            f"commit {cvs >> 20} MiB layer, {nseg} segments",
            f"{t_obd:.2f} s",
            f"cp data file {t_cp:.2f} s",
            f"{t_obd / t_cp:.2f}x the time of cp",
        ),
    ]
    w = [max(len(r[k]) for r in rows) for k in range(4)]
    print(f"{'what':<{w[0]}}  {'obd':>{w[1]}}  {'peer':<{w[2]}}  ratio")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")


if __name__ == "__main__":
    main()
