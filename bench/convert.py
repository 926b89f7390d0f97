"""Benchmark ``obd convert`` of a generated multi-layer image beside the floor for writing
that many files: a plain ``tar -x`` of the same layers into a folder and ``mke2fs -d`` of
the flattened tree (same ext4 choices as obd's mkfs: 4 KiB blocks, 256-byte inodes, no
journal, same virtual size), every row measured in the same run.

Not a test. Generates (deterministically) an OCI image layout of ``--layers`` plain tar
layers holding ``--files`` files and ``--size-mib`` MiB in all (file sizes from 0 to
~200 KiB, mixed text/records/random/zeros content, a few folders per layer, later layers
overwriting some files of the earlier ones), then times, each as a child process whose
peak RSS is measured by GNU time:

* ``tar -x`` of the layers, bottom first, into one folder;
* ``mke2fs -d`` of that folder into a sparse disk of ``--vsize``;
* ``obd convert oci:SRC oci:DST`` with an empty store (the real work);
* the same again (every layer found in the store);
* ``obd convert --flatten`` with an empty store.

``x mke2fs`` is the row's wall time over ``mke2fs -d``'s (the issue's aim: obd convert
within 2x).

    python bench/convert.py [--size-mib 1024] [--files 50000] [--layers 4] [--vsize 64G]
                            [--keep DIR] [--no-flatten]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    b"the quick brown fox jumps over lazy dog layer block image index segment "
    b"container overlay registry manifest digest sha256 commit merge ext4 inode"
).split()


def _content_pool(rng: np.random.Generator) -> bytes:
    text = b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 400_000))
    rand = rng.bytes(2 << 20)
    return text + rand + bytes(1 << 20) + text[::-1]


def make_image(out: str, size: int, files: int, layers: int, seed: int = 7) -> dict[str, int]:
    """An OCI layout of ``layers`` tar layers; returns counts."""
    rng = np.random.default_rng(seed)
    pool = _content_pool(rng)
    os.makedirs(f"{out}/blobs/sha256")
    per_layer = files // layers
    mean = size / files
    descs, diff_ids = [], []
    total_bytes = 0
    for li in range(layers):
        tmp = f"{out}/layer.tmp"
        with (
            open(tmp, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tf,
        ):
            folders = [f"l{li}/d{d:03d}" for d in range(max(1, per_layer // 250))]
            for d in [f"l{li}", *folders]:
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(ti)
            sizes = rng.exponential(mean, per_layer).astype(np.int64)
            for k in range(per_layer):
                if li and k % 50 == 0:  # overwrite a file of the layer below
                    name = f"l{li - 1}/d{k % len(folders):03d}/f{k:06d}"
                else:
                    name = f"{folders[k % len(folders)]}/f{k:06d}"
                n = int(min(sizes[k], 16 * mean))
                off = int(rng.integers(0, len(pool) - n - 1))
                data = pool[off : off + n]
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
                total_bytes += len(data)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.rename(tmp, f"{out}/blobs/sha256/{digest}")
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{digest}",
                "size": os.path.getsize(f"{out}/blobs/sha256/{digest}"),
            }
        )
        diff_ids.append(f"sha256:{digest}")

    def blob(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        with open(f"{out}/blobs/sha256/{d}", "wb") as f:
            f.write(data)
        return f"sha256:{d}"

    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(config),
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": blob(manifest),
                "size": len(manifest),
            }
        ],
    }
    with open(f"{out}/index.json", "w") as f:
        json.dump(index, f)
    with open(f"{out}/oci-layout", "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return {"files": per_layer * layers, "bytes": total_bytes, "layers": layers}


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` as a child process. The RSS comes
    from GNU time: a child's own ``ru_maxrss`` would count the forked bench process it
    was before ``exec``."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        t0 = time.perf_counter()
        p = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip()[-2000:]
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {err}")
        return wall, int(rss_file.read().split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vsize", default="64G")
    ap.add_argument("--keep", help="work in this folder and keep it")
    ap.add_argument("--no-flatten", action="store_true", help="leave out the --flatten row")
    args = ap.parse_args()
    for tool in ("tar", "mke2fs", "/usr/bin/time"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed")
    work = args.keep or tempfile.mkdtemp(prefix="obd-bench-convert-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    obd = [sys.executable, "-m", "commands.main"]
    try:
        src = os.path.join(work, "src")
        for old in ("tree", "disk.raw", "store", "store-flat", "dst1", "dst2", "dst3"):
            p = os.path.join(work, old)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
        if os.path.exists(os.path.join(src, "index.json")):
            print(f"image: reusing {src}")
        else:
            t0 = time.perf_counter()
            facts = make_image(src, args.size_mib << 20, args.files, args.layers)
            gen = time.perf_counter() - t0
            print(
                f"image: {facts['layers']} layers, {facts['files']} files, "
                f"{facts['bytes'] / (1 << 20):.0f} MiB of file data (generated in {gen:.1f} s)"
            )
        with open(f"{src}/index.json") as f:
            mdigest = json.load(f)["manifests"][0]["digest"].split(":")[1]
        with open(f"{src}/blobs/sha256/{mdigest}") as f:
            layers = [d["digest"].split(":")[1] for d in json.load(f)["layers"]]
        print(f"{'step':40} {'wall s':>8} {'peak RSS MiB':>13} {'x mke2fs':>9}")
        floor = 0.0

        def row(name: str, wall: float, rss: int) -> None:
            ratio = f"{wall / floor:9.2f}" if floor else f"{'':9}"
            print(f"{name:40} {wall:8.2f} {rss / (1 << 20):13.0f} {ratio}", flush=True)

        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        t0 = time.perf_counter()
        peak = 0
        for d in layers:
            _, rss = run(["tar", "-x", "-C", tree, "-f", f"{src}/blobs/sha256/{d}"])
            peak = max(peak, rss)
        tar_row = ("tar -x (all layers, one folder)", time.perf_counter() - t0, peak)
        disk = os.path.join(work, "disk.raw")
        mke2fs = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256",
                  "-O", "^has_journal", "-E", "root_owner=0:0", "-d", tree, disk, args.vsize]  # fmt: skip
        wall, rss = run(mke2fs)
        floor = wall
        row(*tar_row)
        row("mke2fs -d (flattened tree)", wall, rss)
        store = os.path.join(work, "store")
        base = [*obd, "convert", "--vsize", args.vsize]
        runs = [
            ("obd convert (empty store)", [], store, "dst1"),
            ("obd convert again (all in store)", [], store, "dst2"),
            ("obd convert --flatten (empty store)", ["--flatten"], f"{store}-flat", "dst3"),
        ]
        for name, extra, st, dst in runs[: 2 if args.no_flatten else 3]:
            row(name, *run([*base, *extra, "--store", st, f"oci:{src}", f"oci:{work}/{dst}"], env))
        sizes = sum(
            os.path.getsize(os.path.join(f"{work}/dst1/blobs/sha256", n))
            for n in os.listdir(f"{work}/dst1/blobs/sha256")
        )
        print(f"converted image: {sizes / (1 << 20):.0f} MiB in oci:{work}/dst1")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
