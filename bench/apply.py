"""Benchmark ``obd apply --mkfs`` of one OCI layer beside ``tar -x`` of the same layer and
``mke2fs -d`` of the extracted tree (the floor for writing that many files into an ext4).

Not a test. Builds a deterministic layer tar (``--files`` files of mixed sizes, 100 to a
folder, ``--mib`` MiB in all) in a temporary folder, then measures in the same run, each
``--repeat`` times (best wall kept): ``tar -x`` into a folder, ``mke2fs -d`` of that folder
into a sparse image file (upstream's feature list, as ``obd apply --mkfs`` makes it),
and ``obd apply --mkfs`` into a new writable layer (the CLI, so start-up counts). Wall
time, CPU time (user + sys) and peak RSS per row; ``x mke2fs`` is the wall-time ratio
over ``mke2fs -d`` (the issue's aim: at most 2).

    python bench/apply.py [--files 50000] [--mib 1024] [--repeat 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from obd.oci.ext4 import mkfs_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [0, 100, 700, 2_000, 6_000, 15_000, 40_000, 120_000]


def make_layer(path: str, files: int, total: int, seed: int = 1) -> int:
    """A layer of ``files`` files (sizes drawn from SIZES, scaled to about ``total``)."""
    rng = random.Random(seed)
    sizes = [rng.choice(SIZES) for _ in range(files)]
    scale = total / max(1, sum(sizes))
    pool = rng.randbytes(1 << 20) * 2
    written = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(-(-files // 100)):
            ti = tarfile.TarInfo(f"usr/share/p{d // 50:03d}/d{d:04d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
            for i in range(d * 100, min(files, d * 100 + 100)):
                n = min(int(sizes[i] * scale), 1 << 20)
                ti = tarfile.TarInfo(f"usr/share/p{d // 50:03d}/d{d:04d}/f{i:06d}")
                ti.size, ti.mode, ti.mtime = n, 0o644, 1_700_000_000
                off = rng.randrange(0, 1 << 20)
                tf.addfile(ti, io.BytesIO(pool[off : off + n]))
                written += n
    return written


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(wall s, cpu s, peak RSS KiB) of a child process (``wait4`` gives its own usage)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode(errors='replace')}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", help="work in this folder and keep it")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="obd-bench-apply-")
    os.makedirs(work, exist_ok=True)
    try:
        layer = os.path.join(work, "layer.tar")
        t0 = time.perf_counter()
        data = make_layer(layer, args.files, args.mib << 20)
        print(
            f"layer: {args.files} files, {data / 2**20:.0f} MiB of file data, "
            f"tar {os.path.getsize(layer) / 2**20:.0f} MiB (built in {time.perf_counter() - t0:.1f} s)"
        )
        size = max(
            2 << 30, (data * 3 // 2 + (args.files << 12)) // (1 << 30) * (1 << 30) + (1 << 30)
        )
        env = dict(os.environ, PYTHONPATH=REPO, MKE2FS_CONFIG="/dev/null")
        tree, img = os.path.join(work, "tree"), os.path.join(work, "mke2fs.img")
        up = os.path.join(work, "upper")
        rows: dict[str, list[tuple[float, float, int]]] = {
            "tar -x": [],
            "mke2fs -d": [],
            "obd apply --mkfs": [],
        }
        for _ in range(args.repeat):
            shutil.rmtree(tree, ignore_errors=True)
            os.makedirs(tree)
            rows["tar -x"].append(measure(["tar", "-xf", layer, "-C", tree]))
            subprocess.run(["sync"], check=True)
            if os.path.exists(img):
                os.unlink(img)
            with open(img, "wb") as f:
                f.truncate(size)
            mke2fs = mkfs_command(img)
            mke2fs[-1:-1] = ["-d", tree]
            rows["mke2fs -d"].append(measure(mke2fs, env))
            subprocess.run(["sync"], check=True)
            for ext in (".data", ".index"):
                if os.path.exists(up + ext):
                    os.unlink(up + ext)
            subprocess.run(
                [sys.executable, "-m", "commands.main", "create", up + ".data", up + ".index",
                 f"{size}B"], env=env, check=True,
            )  # fmt: skip
            cfg = os.path.join(work, "image.json")
            with open(cfg, "w") as f:
                f.write(f'{{"upper": {{"data": "{up}.data", "index": "{up}.index"}}}}')
            rows["obd apply --mkfs"].append(
                measure([sys.executable, "-m", "commands.main", "apply", "--mkfs", layer, cfg], env)
            )
            subprocess.run(["sync"], check=True)
        best = {k: min(v) for k, v in rows.items()}
        floor = best["mke2fs -d"][0]
        print(f"{'':20} {'wall s':>8} {'cpu s':>8} {'RSS MiB':>8} {'files/s':>9} {'x mke2fs':>9}")
        for name, (wall, cpu, rss) in best.items():
            print(
                f"{name:20} {wall:8.2f} {cpu:8.2f} {rss / 1024:8.0f} {args.files / wall:9.0f} "
                f"{wall / floor:9.2f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
