"""Benchmark obd's TCMU backstore against the kernel's own ``target_core_file`` (fileio)
backstore, in the kernel-test VM (tests/vm), same VM, same run (issue 12).

    python bench/tcmu.py [--size 32M] [--seconds 5]

In the VM (Debian's kernel under QEMU TCG, one vCPU): a raw file of ``--size`` mixed
content on tmpfs; the same content as an obd image (a plain LSMT layer and a ZFile(lz4)
layer, ``obd create --from`` + ``obd commit``), each attached through TCMU + tcm_loop with
``obd serve --tcmu``; the raw file attached through fileio + tcm_loop. Each /dev/sdX is read
with O_DIRECT: sequential 1 MiB reads of the whole disk (best of 3), and 4 KiB reads at
random 4 KiB-aligned offsets for ``--seconds`` (queue depth 1). Prints MiB/s, IOPS and the
ratios to fileio. Absolute numbers are TCG's (slow); the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)


# -- on the host: boot the VM, run this script inside -----------------------------------------
def host(args: argparse.Namespace) -> int:
    from tests.vm import run_vm, skip_reason

    why = skip_reason()
    if why:
        sys.exit(f"no kernel VM here: {why}")
    out = Path(tempfile.mkdtemp(prefix="obd-bench-tcmu-"))
    cmd = (
        f"cd {REPO} && PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 {sys.executable} "
        f"bench/tcmu.py --in-vm --size {args.size} --seconds {args.seconds} --out {out}"
    )
    res = run_vm(
        cmd,
        rw=[out],
        mods=["target_core_user", "tcm_loop", "target_core_file", "sd_mod"],
        timeout=args.timeout,
    )
    try:
        result = out / "result.json"
        if res.rc != 0 or not result.exists():
            print(res.output[-4000:], file=sys.stderr)
            sys.exit(f"the VM run failed (exit {res.rc}, {res.seconds:.0f} s)")
        table = json.loads(result.read_text())
    finally:
        res.cleanup()
    base = table["fileio (raw file)"]
    print(f"TCMU read benchmark in the VM (QEMU TCG, 1 vCPU), {args.size} disk, O_DIRECT")
    print(f"{'backstore':28} {'seq MiB/s':>10} {'x fileio':>9} {'4K IOPS':>9} {'x fileio':>9}")
    for name, r in table.items():
        print(
            f"{name:28} {r['seq']:10.1f} {r['seq'] / base['seq']:9.2f} "
            f"{r['iops']:9.0f} {r['iops'] / base['iops']:9.2f}"
        )
    print(f"(VM run {res.seconds:.0f} s)")
    return 0


# -- in the VM ---------------------------------------------------------------------------------
def seq_read(dev: str, size: int) -> float:
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(
            ["dd", f"if={dev}", "of=/dev/null", "bs=1M", f"count={size // MiB}", "iflag=direct"],
            check=True, capture_output=True,
        )  # fmt: skip
        best = max(best, size / MiB / (time.perf_counter() - t0))
    return best


def rand_read(dev: str, size: int, seconds: float) -> float:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(12)
    blocks = size // 4096
    n = 0
    try:
        t0 = time.perf_counter()
        while True:
            os.preadv(fd, [buf], rng.randrange(blocks) * 4096)
            n += 1
            if n % 64 == 0 and time.perf_counter() - t0 >= seconds:
                break
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()


def fileio_attach(raw: str, size: int) -> tuple[str, str, str]:
    from obd.serve.tcmu.configfs import TARGET, block_device, write_attr

    d = f"{TARGET}/core/fileio_0/bench"
    os.makedirs(d, exist_ok=True)
    write_attr(f"{d}/control", f"fd_dev_name={raw},fd_dev_size={size}")
    write_attr(f"{d}/wwn/vpd_unit_serial", "0bd0f11e")
    write_attr(f"{d}/enable", "1")
    naa = f"{TARGET}/loopback/naa.50014050bd0f11e0"
    os.makedirs(f"{naa}/tpgt_1/lun/lun_0", exist_ok=True)
    write_attr(f"{naa}/tpgt_1/nexus", os.path.basename(naa))
    os.symlink(d, f"{naa}/tpgt_1/lun/lun_0/bench")
    for _ in range(600):
        dev = block_device(naa)
        if dev and os.path.exists(dev):
            return dev, d, naa
        time.sleep(0.05)
    raise RuntimeError("the fileio disk did not appear")


def fileio_detach(d: str, naa: str) -> None:
    os.unlink(f"{naa}/tpgt_1/lun/lun_0/bench")
    for p in (f"{naa}/tpgt_1/lun/lun_0", f"{naa}/tpgt_1", naa, d, os.path.dirname(d)):
        os.rmdir(p)


def in_vm(args: argparse.Namespace) -> int:
    from obd.image import ops
    from obd.serve.tcmu import configfs

    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    raw = work / "disk.raw"
    rng = random.Random(7)
    with open(raw, "wb") as f:  # mixed: random, text-like and zero chunks
        for i in range(size // 65536):
            kind = i % 4
            if kind == 0:
                f.write(rng.randbytes(65536))
            elif kind == 1:
                f.write((b"overlaybd block device %d\n" % i) * (65536 // 27) + bytes(65536 % 27))
            else:
                f.write(bytes(65536) if kind == 2 else rng.randbytes(32768) + bytes(32768))
    layers = {}
    for name, z in (("lsmt", False), ("zfile", True)):
        data, index = str(work / f"{name}.data"), str(work / f"{name}.index")
        ops.create(data, index, None, from_raw=str(raw))
        out = str(work / f"{name}.layer")
        ops.commit(data, index, out, zfile=ops.ZFileOptions() if z else None)
        cfg = work / f"{name}.json"
        cfg.write_text(json.dumps({"lowers": [{"file": out}]}))
        layers[name] = cfg
    gcfg = work / "overlaybd.json"
    gcfg.write_text(
        json.dumps(
            {"logConfig": {"logPath": str(work / "obd.log"), "logLevel": 2}, "enableAudit": False}
        )
    )
    err = open(work / "serve.err", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [sys.executable, "-m", "commands.main", "serve", "--tcmu", "--config", str(gcfg)],
        stderr=err, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    try:
        while b"tcmu: serving" not in (work / "serve.err").read_bytes():
            if serve.poll() is not None:
                raise RuntimeError((work / "serve.err").read_text())
            time.sleep(0.1)
        dev, d, naa = fileio_attach(str(raw), size)
        try:
            results["fileio (raw file)"] = {
                "seq": seq_read(dev, size),
                "iops": rand_read(dev, size, args.seconds),
            }
        finally:
            fileio_detach(d, naa)
        for name, cfg in layers.items():
            att = configfs.attach_image(str(cfg), size)
            try:
                assert att.block is not None
                results[f"obd TCMU ({name} layer)"] = {
                    "seq": seq_read(att.block, size),
                    "iops": rand_read(att.block, size, args.seconds),
                }
            finally:
                configfs.detach(att)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        err.close()
    (Path(args.out) / "result.json").write_text(json.dumps(results))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="32M")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    return in_vm(args) if args.in_vm else host(args)


if __name__ == "__main__":
    sys.exit(main())
