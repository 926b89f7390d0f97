"""In the VM: the kernel's own NBD client (Debian's nbd-client) on ``obd serve --nbd``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.nbd_helpers import ServeProcess, image_config
from tests.vectors import require_vectors, vector_named
from tests.vm_tests.conftest import check_apply_ext4, require, sh


def _nbd_free() -> str:
    for i in range(16):
        if Path(f"/sys/block/nbd{i}/size").read_text().strip() == "0":
            return f"/dev/nbd{i}"
    pytest.fail("no free /dev/nbdN")


def test_nbd_client_reads_and_mounts(tmp_path: Path, mnt: Path) -> None:
    """nbd-client connects /dev/nbdX to obd serve --nbd; the block device reads the
    vector's digest; the ext4 of the apply vector mounts read-only and its files read."""
    require("nbd-client")
    d = require_vectors()
    if not os.path.exists("/dev/nbd0"):
        pytest.skip("no /dev/nbd0 (nbd module not loaded)")
    sparse = image_config(tmp_path, "sparse", lowers=[str(d / "zro_sparse_lz4_bs16.zfile")])
    ext4 = image_config(tmp_path, "ext4", lowers=[str(d / "zro_apply_zstd_bs32.zfile")])
    with ServeProcess(["--listen", "127.0.0.1:0", str(sparse), str(ext4)], timeout=60) as srv:
        dev = _nbd_free()
        sh(f"nbd-client -N sparse 127.0.0.1 {srv.port} {dev} -b 512")
        try:
            h = hashlib.sha256(Path(dev).read_bytes()).hexdigest()
            assert h == vector_named("lsmt_ro_zfile", "zro_sparse_lz4_bs16")["sha256"]
        finally:
            sh(f"nbd-client -d {dev}")
        dev = _nbd_free()
        sh(f"nbd-client -N ext4 127.0.0.1 {srv.port} {dev} -b 4096")
        try:
            check_apply_ext4(dev, mnt, d / "apply_layer.tar")
        finally:
            sh(f"nbd-client -d {dev}")
