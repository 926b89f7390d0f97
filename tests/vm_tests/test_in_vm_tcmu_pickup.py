"""In the VM, after the main TCMU module stopped its service: devices enabled while no
handler runs are picked up when ``obd serve --tcmu`` starts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.nbd_helpers import image_config
from tests.vectors import require_vectors
from tests.vm_tests.conftest import TcmuServe

if not os.path.isdir("/sys/kernel/config/target/core"):
    pytest.skip("no TCMU in this kernel (target_core_user)", allow_module_level=True)

from obd.serve.tcmu import configfs

SPARSE_SHA = "89042de7ad23f8234885778b26edffba9e6314e474e304dc5d1baaf05c19c710"


def test_devices_there_at_start_are_served(tmp_path: Path) -> None:
    """Enabled with no handler running (the previous service told the kernel not to wait
    for replies when it stopped), a good and a broken image; the service starting next
    opens both (resultFile success / failed:...), serves the good one's disk (and the
    same image as an NBD export beside it), and stops cleanly with both detached."""
    d = require_vectors()
    good = image_config(tmp_path, "good", lowers=[str(d / "ro_sparse.lsmt")])
    bad = image_config(tmp_path, "bad", lowers=[str(tmp_path / "missing.lsmt")])
    atts = [
        configfs.attach(str(c), 4 << 20, lun=False, cmd_ring_size_mb=1, max_data_area_mb=4)
        for c in (good, bad)
    ]
    serve = None
    try:
        # NBD beside TCMU in one process
        serve = TcmuServe(tmp_path, "--listen", "127.0.0.1:0", f"{good}=nbdgood")
        assert "tcmu: serving 2 devices" in serve.stderr, serve.stderr
        assert "listening on nbd://127.0.0.1:" in serve.stderr, serve.stderr
        assert (tmp_path / "good.result").read_text() == "success"
        assert (tmp_path / "bad.result").read_text().startswith("failed:failed to open local")
        block = configfs.link_lun(atts[0])
        with open(block, "rb", buffering=0) as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == SPARSE_SHA
    finally:
        for a in atts:
            configfs.detach(a)
        if serve is not None:
            assert serve.stop() == 0, serve.stderr
