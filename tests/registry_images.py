"""Real ext4 images as overlaybd layers, for the registry tests and bench/registry.py.

:func:`layered_ext4` makes an ext4 filesystem with ``mke2fs -d`` over generated files,
adds more files with ``debugfs -w`` to a copy, and commits the two as ZFile layers: the
bottom layer holds the first filesystem, the top layer the 4 KiB blocks that differ. The
merged view of the two layers is the second filesystem, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

BLOCK = 4096


@dataclass
class Ext4Image:
    raw: Path  # the filesystem the layers stack to
    layers: list[Path]  # bottom first, ZFile-compressed committed layers
    files: dict[str, str]  # path inside the filesystem -> sha256 hex


def require_e2fs() -> None:
    for tool in ("mke2fs", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install e2fsprogs)")


def _gen_files(root: Path, total: int, seed: int, small: int = 40) -> dict[str, bytes]:
    """``small`` small text files plus binary files adding up to ~``total`` bytes."""
    rng = np.random.default_rng(seed)
    out: dict[str, bytes] = {}
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    for i in range(small):
        out[f"etc/conf{i}.txt"] = f"setting{i} = {i * 7}\n".encode() * (1 + i % 5)
    left, n = total, 0
    while left > 0:
        size = min(left, int(rng.integers(256 << 10, 8 << 20)))
        # half random (incompressible), half repetitive: like real binaries and data
        body = rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes()
        body += (b"obd-registry-bench-%d " % n) * ((size - len(body)) // 24 + 1)
        out[f"data/blob{n:04d}.bin"] = body[:size]
        left -= size
        n += 1
    for rel, data in out.items():
        (root / rel).write_bytes(data)
    return out


def _commit(raw_or_layer: Path, out: Path, *, parent: str | None, layer_uuid: str,
            diff_from: Path | None = None) -> None:  # fmt: skip
    from obd.image import ops
    from obd.image.layers import open_rw_layer

    d, i = str(out) + ".data", str(out) + ".index"
    if diff_from is None:
        ops.create(d, i, None, from_raw=str(raw_or_layer), uuid=layer_uuid)
    else:
        size = os.path.getsize(raw_or_layer)
        ops.create(d, i, size, uuid=layer_uuid, parent_uuid=parent)
        with open_rw_layer(d, i) as layer:
            a = np.memmap(diff_from, dtype=np.uint8, mode="r").reshape(-1, BLOCK)
            b = np.memmap(raw_or_layer, dtype=np.uint8, mode="r").reshape(-1, BLOCK)
            changed = np.flatnonzero((a != b).any(axis=1)).tolist()
            run: list[int] = []
            for blk in [*changed, -2]:
                if run and blk != run[-1] + 1:
                    layer.pwrite(run[0] * BLOCK, b[run[0] : run[-1] + 1].tobytes())
                    run = []
                if blk >= 0:
                    run.append(blk)
            layer.flush()
    ops.commit(
        d, i, str(out), uuid=layer_uuid, parent_uuid=parent, zfile=ops.ZFileOptions(threads=None)
    )
    os.unlink(d)
    os.unlink(i)


def layered_ext4(
    folder: Path, *, size_mb: int = 64, data_mb: float = 8, seed: int = 1
) -> Ext4Image:
    """Two ZFile layers stacking to an ext4 filesystem of ``size_mb`` MiB holding ~``data_mb``
    MiB of files (90% in the bottom layer, the rest added on top)."""
    require_e2fs()
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / "root"
    files = _gen_files(root, int(data_mb * 0.9 * (1 << 20)), seed)
    raw1 = folder / "fs1.raw"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-E", "root_owner=0:0,lazy_itable_init=0,nodiscard",
         "-d", str(root), str(raw1), f"{size_mb}M"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    raw2 = folder / "fs2.raw"
    shutil.copyfile(raw1, raw2)
    extra = folder / "extra"
    more = _gen_files(extra, int(data_mb * 0.1 * (1 << 20)) + 1, seed + 100, small=3)
    cmds = ["mkdir /added"]
    for rel in more:
        cmds.append(f"write {extra / rel} /added/{rel.replace('/', '_')}")
    subprocess.run(["debugfs", "-w", "-f", "-", str(raw2)], input="\n".join(cmds) + "\n",
                   text=True, check=True, capture_output=True, timeout=300)  # fmt: skip
    shutil.rmtree(root)
    shutil.rmtree(extra)
    u1, u2 = str(uuid.uuid4()), str(uuid.uuid4())
    l1, l2 = folder / "layer1.zfile", folder / "layer2.zfile"
    _commit(raw1, l1, parent=None, layer_uuid=u1)
    _commit(raw2, l2, parent=u1, layer_uuid=u2, diff_from=raw1)
    os.unlink(raw1)
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    digests.update(
        {f"added/{rel.replace('/', '_')}": hashlib.sha256(d).hexdigest() for rel, d in more.items()}
    )
    return Ext4Image(raw2, [l1, l2], digests)
