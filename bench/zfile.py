"""Benchmark ``obd zfile`` against Debian's ``lz4 -1`` and ``zstd -3`` on the same file.

Not a test. Builds a deterministic mixed file (64 KiB chunks of random bytes, text,
structured records, repeated patterns, zeros and half-zeros) in a temporary folder and
prints one table, every row measured in the same run: the reference CLIs each followed
by ``sync FILE`` (obd fsyncs its outputs, so both pay for durability), ``obd zfile``
with the batch codec extension and with it disabled (``OBD_NO_EXT=1``, the
ctypes path), with 1 and N threads, and the in-process API. ``x tool`` is obd's speed
over the reference tool's; the issue's targets are at least 1.2x ``lz4 -1`` and 2x
``zstd -3``.

    python bench/zfile.py [--size-mib 256] [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

# the checkout this file lives in, not whatever obd is installed (before/after worktrees)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyc import compile_checkout  # bench/pyc.py

import obd
from obd.formats.codecs import Codec, fallback_codec, get_codec, have_extension
from obd.formats.zfile import ZFileReader, compress_file, decompress_to
from obd.io.cpu import cores
from obd.io.file import open_file

CHUNK = 64 << 10
WORDS = (
    b"the quick brown fox jumps over lazy dog layer block image index segment "
    b"container overlay registry manifest digest sha256 commit merge ext4 inode"
).split()


def make_mixed(path: str, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    text_pool = b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 600_000))
    text_pool = text_pool.replace(b"dog ", b"dog\n")
    rec_dtype = np.dtype(
        [("id", "<u8"), ("ts", "<u4"), ("kind", "u1"), ("pad", "V3"), ("v", "<f8")]
    )
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            kind = int(rng.integers(0, 6))
            if kind == 0:  # random
                data = rng.bytes(CHUNK)
            elif kind == 1:  # text
                off = int(rng.integers(0, len(text_pool) - CHUNK))
                data = text_pool[off : off + CHUNK]
            elif kind == 2:  # structured records
                recs = np.zeros(CHUNK // rec_dtype.itemsize + 1, dtype=rec_dtype)
                recs["id"] = np.arange(len(recs)) + n * 10_000
                recs["ts"] = 1_700_000_000 + rng.integers(0, 1000, len(recs))
                recs["kind"] = rng.integers(0, 4, len(recs))
                recs["v"] = rng.normal(size=len(recs)).round(2)
                data = recs.tobytes()[:CHUNK]
            elif kind == 3:  # repeated pattern
                pat = rng.bytes(int(rng.integers(3, 200)))
                data = (pat * (CHUNK // len(pat) + 1))[:CHUNK]
            elif kind == 4:  # zeros
                data = bytes(CHUNK)
            else:  # half zeros
                data = rng.bytes(CHUNK // 2) + bytes(CHUNK // 2)
            data = data[: size - written]
            f.write(data)
            written += len(data)
            n += 1


REPEAT = 3
CPU: dict[int, float] = {}  # id(fn) -> CPU seconds of its best run
TARGET = {"lz4": 1.2, "zstd": 2.0}  # issue 10: obd zfile over the reference CLI + sync


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """Best wall time of REPEAT runs (this VM's page-cache writes are noisy).

    The CPU seconds of that run are kept in ``CPU[id(fn)]``: unlike wall time they do
    not depend on what else the machine is doing.
    """
    best = float("inf")
    for _ in range(REPEAT):
        if before is not None:
            before()
        os.sync()  # no writeback of earlier runs during this one
        c = _cpu()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, CPU[id(fn)] = wall, _cpu() - c
    return best


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def drop(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


# (algo, who, op, wall seconds, cpu seconds, reference tool's wall seconds)
Row = tuple[str, str, str, float, float, float]


def bench_algo(
    algo: str, tool: str, level: str, src: str, folder: str, threads: int, rows: list[Row]
) -> None:
    size = os.path.getsize(src)
    ref = os.path.join(folder, f"ref.{algo}")
    refout = os.path.join(folder, "ref.out")
    out = os.path.join(folder, "obd.out")
    zf = os.path.join(folder, f"obd.{algo}.zfile")
    # lz4 takes the output as a second operand, zstd with -o
    oc = [ref] if tool == "lz4" else ["-o", ref]
    ox = [refout] if tool == "lz4" else ["-o", refout]

    def tool_c() -> None:
        run([tool, level, "-q", "-f", src, *oc])
        run(["sync", ref])

    def tool_x() -> None:
        run([tool, "-d", "-q", "-f", ref, *ox])
        run(["sync", refout])

    who = f"{tool} {level} +sync"
    tc = timed(tool_c, lambda: drop(ref))
    rows.append((algo, who, "compress", tc, CPU[id(tool_c)], tc))
    tx = timed(tool_x, lambda: drop(refout))
    rows.append((algo, who, "extract", tx, CPU[id(tool_x)], tx))
    ratio_tool = os.path.getsize(ref) / size

    py = [sys.executable, "-m", "commands.main", "zfile"]
    repo = os.path.dirname(os.path.dirname(obd.__file__))
    ext_env = {k: v for k, v in os.environ.items() if k != "OBD_NO_EXT"}
    ext_env["PYTHONPATH"] = repo  # the CLI of the same checkout
    for label, env in (("obd", ext_env), ("obd no-ext", {**ext_env, "OBD_NO_EXT": "1"})):
        for t in sorted({1, threads}):

            def cli_c(env: dict[str, str] = env, t: int = t) -> None:
                run([*py, "--threads", str(t), "--algorithm", algo, src, zf], env)

            def cli_x(env: dict[str, str] = env, t: int = t) -> None:
                run([*py, "--threads", str(t), "-x", zf, out], env)

            c = timed(cli_c, lambda: drop(zf))
            rows.append((algo, f"{label} t={t}", "compress", c, CPU[id(cli_c)], tc))
            x = timed(cli_x, lambda: drop(out))
            rows.append((algo, f"{label} t={t}", "extract", x, CPU[id(cli_x)], tx))
            drop(out)
    ratio = os.path.getsize(zf) / size

    # in-process, no interpreter start-up (this process: extension as have_extension says)
    label = "api" if have_extension() else "api no-ext"

    def api_c() -> None:
        with open_file(src) as s, open_file(zf, writable=True, create=True) as o:
            compress_file(s, o, algorithm=algo, threads=threads)
            o.flush()

    def api_x() -> None:
        with ZFileReader(open_file(zf)) as r, open_file(out, writable=True, create=True) as o:
            decompress_to(r, o, threads=threads)
            o.flush()

    c = timed(api_c, lambda: drop(zf))
    rows.append((algo, f"{label} t={threads}", "compress", c, CPU[id(api_c)], tc))
    x = timed(api_x, lambda: drop(out))
    rows.append((algo, f"{label} t={threads}", "extract", x, CPU[id(api_x)], tx))
    print(
        f"{algo}: obd zfile size ratio {ratio:.3f}, {tool} {level} size ratio {ratio_tool:.3f}",
        file=sys.stderr,
    )
    for p in (out, ref, refout, zf):
        drop(p)


BS, RUN_BLOCKS = 4096, 1024


def _in_threads(fn: Callable[[int], None], t: int) -> float:
    """Wall seconds of ``fn(0) .. fn(t-1)``, each in its own thread."""
    ts = [threading.Thread(target=fn, args=(k,)) for k in range(t)]
    t0 = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t0


def _codec_speed(
    codec: Codec, runs: list[bytes], stored: list[tuple[bytes, list[int]]], op: str, t: int
) -> float:
    """Best seconds to decode (or compress) every run, split round-robin over t threads."""

    def decode(k: int) -> None:
        out = bytearray(BS * RUN_BLOCKS)
        for i in range(k, len(stored), t):
            s, n = stored[i]
            last = len(runs[i]) - (len(n) - 1) * BS
            codec.decompress_blocks(s, n, out, BS, last, True)

    def compress(k: int) -> None:
        scratch = bytearray(RUN_BLOCKS * (codec.bound(BS) + 4))
        for i in range(k, len(runs), t):
            codec.compress_blocks(runs[i], BS, True, scratch)

    fn = decode if op == "decode" else compress
    return min(_in_threads(fn, t) for _ in range(REPEAT))


def codec_scaling(src: str, threads: int) -> list[tuple[str, str, str, int, float]]:
    """Codec only, in memory: decode (CRC + decompress) and compress the whole file in
    runs of 1,024 blocks, split over 1 and ``threads`` threads, with the extension and
    with the ctypes path. A path whose work holds the GIL does not speed up with threads.

    Returns (algo, path, op, threads, MiB/s) rows.
    """
    with open(src, "rb") as f:
        data = f.read()
    chunk = BS * RUN_BLOCKS
    runs = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    rows: list[tuple[str, str, str, int, float]] = []
    for algo in ("lz4", "zstd"):
        paths: list[tuple[str, Codec]] = [("ctypes", fallback_codec(algo))]
        if have_extension():
            paths.insert(0, ("zbatch", get_codec(algo)))
        stored = []
        for r in runs:
            s, n = paths[0][1].compress_blocks(r, BS, True)
            stored.append((bytes(s), n))
        for name, codec in paths:
            for op in ("decode", "compress"):
                for t in sorted({1, threads}):
                    secs = _codec_speed(codec, runs, stored, op, t)
                    rows.append((algo, name, op, t, len(data) / secs / (1 << 20)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=cores())
    ap.add_argument("--keep", help="folder to use and keep (default: a temp folder)")
    args = ap.parse_args()
    compile_checkout(
        os.path.dirname(os.path.dirname(obd.__file__))
    )  # as an installed package has its .pyc
    folder = args.keep or tempfile.mkdtemp(prefix="obd-bench-")
    os.makedirs(folder, exist_ok=True)
    size = args.size_mib << 20
    src = os.path.join(folder, "mixed.bin")
    if not (os.path.exists(src) and os.path.getsize(src) == size):
        t0 = time.perf_counter()
        make_mixed(src, size)
        t = time.perf_counter() - t0
        print(f"built {args.size_mib} MiB mixed file in {t:.1f}s", file=sys.stderr)
    mib = size / (1 << 20)
    rows: list[Row] = []
    cpu = cores()
    load0 = os.getloadavg()[0]
    try:
        with open(src, "rb") as f:  # warm the page cache
            while f.read(8 << 20):
                pass
        for algo, tool, level in (("lz4", "lz4", "-1"), ("zstd", "zstd", "-3")):
            bench_algo(algo, tool, level, src, folder, args.threads, rows)
        scaling = codec_scaling(src, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    load1 = os.getloadavg()[0]
    print(f"obd from {obd.__file__}")
    print(
        f"\n{args.size_mib} MiB mixed file, {cpu} cores (load average {load0:.1f} -> "
        f"{load1:.1f}), 4 KiB blocks, CRC on, best of {REPEAT}, every output synced.\n"
        "MiB/s = plain bytes per wall second; x tool = our speed / the reference tool's "
        "(target: lz4 >= 1.2, zstd >= 2.0); MiB/cpu-s = plain bytes per CPU second (all "
        "threads and children), which other load on the machine does not change."
    )
    print(f"{'algo':5} {'who':16} {'op':9} {'MiB/s':>8} {'x tool':>7} {'MiB/cpu-s':>10}  target")
    for algo, who, op, wall, cpu_s, ref_wall in rows:
        x = ref_wall / wall
        mark = "" if "+sync" in who else ("met" if x >= TARGET[algo] else "short")
        print(
            f"{algo:5} {who:16} {op:9} {mib / wall:8.1f} {x:7.2f} "
            f"{mib / max(cpu_s, 1e-9):10.1f}  {mark}"
        )
    print(
        "\nCodec only, in memory (CRC + LZ4/zstd over runs of 1,024 blocks), MiB/s of plain "
        "bytes; x1 = speed-up over one thread of the same path."
    )
    print(f"{'algo':5} {'path':7} {'op':9} {'threads':>7} {'MiB/s':>8} {'x1':>5}")
    one: dict[tuple[str, str, str], float] = {}
    for algo, path, op, t, speed in scaling:
        one.setdefault((algo, path, op), speed)
        print(f"{algo:5} {path:7} {op:9} {t:7d} {speed:8.1f} {speed / one[algo, path, op]:5.2f}")


if __name__ == "__main__":
    main()
