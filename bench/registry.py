"""Benchmark lazy loading from a registry (issue 11).

    python bench/registry.py [--size-mb 1024] [--data-mb 500] [--workdir DIR] [--keep]

Builds, in one run: an ext4 filesystem of ``--size-mb`` MiB holding ~``--data-mb`` MiB of
generated files (``mke2fs -d``, then more files added with ``debugfs``), committed by obd as
two ZFile layers, pushed to a local ``docker-registry`` (127.0.0.1). Then:

* **cold start**: ``obd serve REF`` with an empty cache, attached with nbdfuse + losetup,
  mounted read-only, one small file read. Reports the time from starting the server to
  the file's bytes, and the bytes fetched from the registry (counted by a proxy in front
  of it) as a percentage of the image's blob bytes (DADI reports 1.6%; the aim is < 1%).
* **sequential read, cold**: ``nbdcopy URI null:`` of the whole image with an empty
  cache, beside ``nbdkit curl`` of the bottom layer's blob (nbdcopy from it) and a plain
  ``curl`` download of the same blob, in blob MiB/s (bytes moved from the registry).
* **sequential read, warm**: the same copy again (all from the cache), beside the same
  image served from the local layer files: the ratio should be >= 0.8.

Needs root for the mount (skipped otherwise), docker-registry, nbdcopy, nbdfuse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.nbd_helpers import ServeProcess  # noqa: E402
from tests.registry_helpers import FaultProxy, free_port, start_registry  # noqa: E402
from tests.registry_images import layered_ext4  # noqa: E402

MiB = 1 << 20


def sh(*cmd: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def global_config(folder: Path, cache: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "overlaybd.json"
    p.write_text(json.dumps({
        "logConfig": {"logPath": str(folder / "obd.log"), "logLevel": 2},
        "enableAudit": False,
        "cacheConfig": {"cacheType": "file", "cacheDir": str(cache), "cacheSizeGB": 4, "refillSize": 262144},
        "credentialConfig": {"mode": "file", "path": str(folder / "none.json")},
    }))  # fmt: skip
    return p


def serve(cfg: Path, image: str) -> ServeProcess:
    return ServeProcess(["--listen", "127.0.0.1:0", "--config", str(cfg), "--workers", "16", image], timeout=120)  # fmt: skip


def copy_seconds(uri: str) -> float:
    t0 = time.monotonic()
    sh("nbdcopy", uri, "null:")
    return time.monotonic() - t0


@contextlib.contextmanager
def mounted(uri: str, folder: Path) -> Iterator[Path]:
    fuse_dir, mnt = folder / "fuse", folder / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", "-r", str(fuse_dir), uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    loop = ""
    try:
        deadline = time.monotonic() + 30
        while not (fuse_dir / "nbd").exists():
            if time.monotonic() > deadline:
                sys.exit("nbdfuse did not attach")
            time.sleep(0.01)
        loop = sh("losetup", "-r", "--find", "--show", str(fuse_dir / "nbd")).stdout.strip()
        sh("mount", "-t", "ext4", "-o", "ro,noload", loop, str(mnt))
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fuse.wait(10)
        if fuse.poll() is None:
            fuse.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--data-mb", type=float, default=500)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    for tool in ("docker-registry", "nbdcopy", "nbdfuse", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed")
    work = Path(tempfile.mkdtemp(prefix="obd-bench-registry-", dir=args.workdir))
    rows: list[tuple[str, str, str]] = []
    try:
        t0 = time.monotonic()
        image = layered_ext4(work / "image", size_mb=args.size_mb, data_mb=args.data_mb)
        blob_sizes = [p.stat().st_size for p in image.layers]
        blob_bytes = sum(blob_sizes)
        print(f"image: {args.size_mb} MiB ext4, {len(image.files)} files, layers "
              f"{[round(s / MiB, 1) for s in blob_sizes]} MiB, built in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)  # fmt: skip
        with start_registry(work / "registry") as reg:
            pushed = reg.push_overlaybd_image("bench/ext4", "v1", [str(p) for p in image.layers])
            # the image build and push leave ~2 GB to write back; a cache fill's fsync would
            # wait behind it (curl and nbdkit write nothing): flush it before measuring
            os.sync()
            proxy = FaultProxy("127.0.0.1", reg.port)
            with proxy.running():
                # -- cold start through the counting proxy
                ref_counted = f"{proxy.host}/bench/ext4:v1"
                cfg = global_config(work / "cold", work / "cold" / "cache")
                if os.geteuid() == 0 and os.path.exists("/dev/loop-control"):
                    t0 = time.monotonic()
                    with serve(cfg, ref_counted) as sp:
                        t_open = time.monotonic() - t0
                        with mounted(sp.uri("ext4"), work / "cold") as mnt:
                            data = (mnt / "etc" / "conf3.txt").read_bytes()
                            t_file = time.monotonic() - t0
                            assert data
                    fetched = proxy.bytes_served
                    rows += [
                        ("cold start: server up (manifest, layer opens)", f"{t_open:.2f} s", ""),
                        ("cold start: first small file read after mount", f"{t_file:.2f} s", ""),
                        ("cold start: bytes fetched from the registry",
                         f"{fetched / MiB:.2f} MiB", f"{100 * fetched / blob_bytes:.2f}% of {blob_bytes / MiB:.0f} MiB blobs"),
                    ]  # fmt: skip
                else:
                    rows.append(("cold start", "skipped", "needs root and loop devices"))
            # -- sequential reads, straight to the registry
            os.sync()
            ref = pushed.ref
            cfg = global_config(work / "seq", work / "seq" / "cache")
            with serve(cfg, ref) as sp:
                uri = sp.uri("ext4")
                cold = copy_seconds(uri)
                warm = min(copy_seconds(uri) for _ in range(2))
            local_cfg = work / "local.json"
            local_cfg.write_text(json.dumps({"lowers": [{"file": str(p)} for p in image.layers]}))
            t0 = time.monotonic()
            with serve(
                global_config(work / "local", work / "local" / "cache"), str(local_cfg)
            ) as sp:
                t_local_up = time.monotonic() - t0
                copy_seconds(sp.uri("local"))
                local = min(copy_seconds(sp.uri("local")) for _ in range(2))
            vsize = args.size_mb * MiB
            rows += [
                ("obd serve REF, cold cache: nbdcopy of the image",
                 f"{cold:.2f} s", f"{blob_bytes / MiB / cold:.0f} blob MiB/s, {vsize / MiB / cold:.0f} disk MiB/s"),
            ]  # fmt: skip
            url = f"http://{reg.host}/v2/bench/ext4/blobs/{pushed.layers[0][0]}"
            big = pushed.layers[0][1]
            if shutil.which("nbdkit") and Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-curl-plugin.so").exists():  # fmt: skip
                port = free_port()
                nk = subprocess.Popen(["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "curl", url],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                try:
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        with contextlib.suppress(OSError):
                            socket.create_connection(("127.0.0.1", port), timeout=1).close()
                            break
                        time.sleep(0.05)
                    t = copy_seconds(f"nbd://127.0.0.1:{port}")
                    rows.append(("nbdkit curl of the bottom blob: nbdcopy", f"{t:.2f} s", f"{big / MiB / t:.0f} blob MiB/s"))  # fmt: skip
                finally:
                    nk.terminate()
                    nk.wait(10)
            else:
                rows.append(("nbdkit curl", "not installed", ""))
            t1 = time.monotonic()
            sh("curl", "-sf", "-o", "/dev/null", url)
            t = time.monotonic() - t1
            rows.append(
                ("plain curl of the bottom blob", f"{t:.2f} s", f"{big / MiB / t:.0f} blob MiB/s")
            )
            rows += [
                ("obd serve REF, warm cache: nbdcopy of the image", f"{warm:.2f} s", f"{vsize / MiB / warm:.0f} disk MiB/s"),
                ("obd serve of the local layer files: nbdcopy", f"{local:.2f} s", f"{vsize / MiB / local:.0f} disk MiB/s"),
                ("warm cache / local files", f"{local / warm:.2f}x", "aim >= 0.8x"),
                ("obd serve of the local layer files: server up", f"{t_local_up:.2f} s", "process start, to set the cold start against"),
            ]  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'figure':>10}  note")
    for what, fig, note in rows:
        print(f"{what:<{w}}  {fig:>10}  {note}")


if __name__ == "__main__":
    main()
