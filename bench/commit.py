"""Benchmark ``obd commit`` against ``cp`` + ``sync`` and ``lz4 -1`` + ``sync`` of its data file.

Not a test. Builds a 1 GiB writable layer through obd's own writer: 100,000 writes of
4-16 KiB (whole sectors) at random 4 KiB-aligned offsets, drawn from a deterministic
mixed pool (random bytes, text, records, patterns, zeros) so that ``-z`` has something to
compress. Then, in the same run, best of ``--runs`` each, warm page cache, ``sync``
before every timing so no run pays for an earlier one's writeback:

- ``obd commit DATA INDEX OUT`` (the CLI, wall time; obd fsyncs its output)
- ``cp DATA OUT && sync OUT``
- ``obd commit -z DATA INDEX OUT`` (lz4, 4 KiB blocks, all cores)
- ``lz4 -1 DATA OUT && sync OUT``
- ``obd check OUT`` of the plain commit output, ``obd merge -o OUT LAYER`` (plain) of it

and prints a table: the best wall time, the least CPU time (user + system, of the
processes run: steadier than wall time on a busy machine) and ``x peer``, the peer's
wall time over obd's (above 1: obd faster).
The issue's target: ``obd commit`` at least as fast as ``cp`` + ``sync``.

    python3 bench/commit.py [--size-mib 1024] [--writes 100000] [--runs 3] [--keep DIR]

The working folder is under /work/benchtmp by default (``--dir``), not /tmp (a tmpfs
would make the fsync free).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pyc import compile_checkout  # noqa: E402  (bench/pyc.py)

from obd.image.layers import open_rw_layer  # noqa: E402
from obd.image.ops import create  # noqa: E402

CHUNK = 64 << 10
POOL = 64 << 20


def mixed_pool(seed: int = 3) -> bytes:
    """64 MiB of mixed data, 64 KiB of one kind at a time."""
    rng = np.random.default_rng(seed)
    words = (
        b"layer block image index segment overlay registry manifest digest commit merge "
        b"the quick brown fox jumps over the lazy dog ext4 inode journal extent"
    ).split()
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 400_000))
    out = bytearray()
    while len(out) < POOL:
        kind = int(rng.integers(0, 5))
        if kind == 0:
            data = rng.bytes(CHUNK)
        elif kind == 1:
            off = int(rng.integers(0, len(text) - CHUNK))
            data = text[off : off + CHUNK]
        elif kind == 2:
            data = (np.arange(CHUNK // 8, dtype="<u8") * int(rng.integers(1, 1000))).tobytes()
        elif kind == 3:
            pat = rng.bytes(int(rng.integers(3, 300)))
            data = (pat * (CHUNK // len(pat) + 1))[:CHUNK]
        else:
            data = bytes(CHUNK)
        out += data
    return bytes(out)


def build(folder: str, size: int, writes: int) -> tuple[str, str]:
    data, index = os.path.join(folder, "l.data"), os.path.join(folder, "l.index")
    create(data, index, size, force=True)
    pool = mixed_pool()
    rng = np.random.default_rng(11)
    lens = rng.integers(8, 33, writes) * 512  # 4-16 KiB
    offs = rng.integers(0, (size - (16 << 10)) // 4096, writes) * 4096
    srcs = rng.integers(0, (POOL - (16 << 10)) // 512, writes) * 512
    view = memoryview(pool)
    with open_rw_layer(data, index) as layer:
        for o, n, s in zip(offs.tolist(), lens.tolist(), srcs.tolist(), strict=True):
            layer.pwrite(o, view[s : s + n])
        layer.flush()
    return data, index


def obd(*args: str) -> list[str]:
    return [sys.executable, "-m", "commands.main", *args]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmds: list[list[str]], cwd: str) -> tuple[float, float, int]:
    """Wall time and CPU time (user + system) of running ``cmds`` one after the other
    (stops at the first failure)."""
    os.sync()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cpu = _children_cpu()
    t = time.perf_counter()
    rc = 0
    for c in cmds:
        p = subprocess.run(c, env=env, cwd=cwd, capture_output=True)
        rc = p.returncode
        if rc:
            sys.stderr.write(p.stderr.decode(errors="replace")[-2000:])
            break
    return time.perf_counter() - t, _children_cpu() - cpu, rc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--writes", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/work/benchtmp", help="parent of the working folder")
    ap.add_argument("--keep", help="folder to build in and keep (reused when it has a layer)")
    args = ap.parse_args()
    compile_checkout(REPO)  # as an installed package has its .pyc
    os.makedirs(args.dir, exist_ok=True)
    folder = args.keep or tempfile.mkdtemp(prefix="obd-bench-commit-", dir=args.dir)
    os.makedirs(folder, exist_ok=True)
    try:
        data, index = os.path.join(folder, "l.data"), os.path.join(folder, "l.index")
        if not (os.path.exists(data) and os.path.exists(index)):
            t = time.perf_counter()
            build(folder, args.size_mib << 20, args.writes)
            print(f"built the layer in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        out = os.path.join(folder, "out")
        plain = os.path.join(folder, "plain.commit")
        merged = os.path.join(folder, "merged")
        z = ("-z", "--algorithm", "lz4", "--bs", "4")
        rows: list[tuple[str, list[list[str]]]] = [
            ("obd commit", [obd("commit", "-f", data, index, out)]),
            ("cp + sync", [["cp", data, out], ["sync", out]]),
            ("obd commit -z", [obd("commit", "-f", *z, data, index, out)]),
            ("lz4 -1 + sync", [["lz4", "-1", "-q", "-f", data, out], ["sync", out]]),
            ("obd check", [obd("check", plain)]),
            ("obd merge", [obd("merge", "-f", "--compress=false", "-o", merged, plain)]),
        ]
        timed([obd("commit", "-f", data, index, plain)], folder)
        for _, cmds in rows[:2]:  # warm the page cache and the imports
            timed(cmds, folder)
        best: dict[str, float] = {}
        cpus: dict[str, float] = {}
        codes: dict[str, int] = {}
        for _ in range(args.runs):
            for name, cmds in rows:
                dt, cpu, rc = timed(cmds, folder)
                best[name] = min(best.get(name, dt), dt)
                cpus[name] = min(cpus.get(name, cpu), cpu)
                codes[name] = rc
                if os.path.exists(out):
                    os.unlink(out)
        dsize = os.path.getsize(data)
        print(
            f"layer: {args.size_mib} MiB virtual, {args.writes} writes, data file "
            f"{dsize / 2**20:.0f} MiB, {os.path.getsize(index) // 16:,} index records, "
            f"commit output {os.path.getsize(plain) / 2**20:.0f} MiB"
        )
        print(f"{'command':<15} {'seconds':>8} {'MiB/s':>7} {'cpu s':>6} {'exit':>5}  vs peer")
        peers = {"obd commit": "cp + sync", "obd commit -z": "lz4 -1 + sync"}
        for name, dt in best.items():
            vs = ""
            if name in peers:
                vs = f"{best[peers[name]] / dt:.2f}x {peers[name]}"
            mib = dsize / 2**20 / dt
            print(f"{name:<15} {dt:8.2f} {mib:7.0f} {cpus[name]:6.2f} {codes[name]:5d}  {vs}")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        ok = best["obd commit"] <= best["cp + sync"]
        print(f"obd commit {'is' if ok else 'is NOT'} at least as fast as cp + sync")
        return 0 if all(c in (0,) for c in codes.values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
