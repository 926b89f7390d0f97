"""In the VM: ``obd serve --tcmu`` as the kernel's TCMU backstore, devices made through
configfs as ACI makes them (``obd attach``), read and written as /dev/sdX."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.nbd_helpers import REPO, image_config
from tests.vectors import require_vectors, vector_named
from tests.vm_tests.conftest import TcmuServe, check_apply_ext4, require, sh

if not os.path.isdir("/sys/kernel/config/target/core"):
    pytest.skip("no TCMU in this kernel (target_core_user)", allow_module_level=True)

from obd.serve.tcmu import configfs

SPARSE_SHA = "89042de7ad23f8234885778b26edffba9e6314e474e304dc5d1baaf05c19c710"
MiB = 1 << 20


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcmuServe]:
    s = TcmuServe(tmp_path_factory.mktemp("serve"))
    try:
        yield s
    finally:
        rc = s.stop()
        # every device is gone: nothing left for a later handler
        for a in configfs.attachments():
            configfs.detach(a)
        assert rc == 0, f"obd serve --tcmu exited {rc}:\n{s.stderr}\n{s.log.read_text()}"
        assert "Logging error" not in s.stderr, s.stderr


def obd(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "commands.main", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"obd {args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def sha_of(dev: str) -> str:
    with open(dev, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_attach_read_digest_inquiry_detach(serve: TcmuServe, tmp_path: Path) -> None:
    """obd attach prints /dev/sdX; dd reads the vector's digest through TCMU; sg_readcap
    reports 512-byte blocks and the size; sg_inq's unit serial is the one configfs holds;
    a write to the read-only image fails; obd detach removes the disk."""
    d = require_vectors()
    require("sg_readcap", "sg_inq")
    vec = vector_named("lsmt_ro_zfile", "zro_sparse_lz4_bs16")
    cfg = image_config(tmp_path, "zsparse", lowers=[str(d / "zro_sparse_lz4_bs16.zfile")])
    dev = obd("attach", str(cfg)).stdout.strip()
    assert re.fullmatch(r"/dev/sd[a-z]+", dev), dev
    assert Path(f"{tmp_path}/zsparse.result").read_text() == "success"
    try:
        r = sh(f"dd if={dev} bs=1M iflag=direct status=none | sha256sum")
        assert r.stdout.split()[0] == vec["sha256"]
        cap = sh(f"sg_readcap {dev}").stdout
        assert re.search(r"Logical block length=512 bytes", cap), cap
        blocks = int(re.search(r"Number of logical blocks=(\d+)", cap).group(1))  # type: ignore[union-attr]
        assert blocks * 512 == vec["virtual_size"]
        inq = sh(f"sg_inq {dev}").stdout
        assert "Product identification" in inq, inq
        att = configfs.find(dev)
        serial = Path(f"{att.device_dir}/wwn/vpd_unit_serial").read_text().rsplit(":", 1)[1]
        vpd80 = sh(f"sg_inq -p 0x80 {dev}").stdout
        assert serial.strip() in vpd80, vpd80
        w = sh(f"dd if=/dev/zero of={dev} bs=4096 count=1 oflag=direct status=none", check=False)
        assert w.returncode != 0, "a write to a read-only image succeeded"
    finally:
        obd("detach", dev)
    assert not os.path.exists(dev) or configfs.find_or_none(str(cfg)) is None
    assert serve.alive()


def test_attach_second_layer_format(serve: TcmuServe, tmp_path: Path) -> None:
    """A plain LSMT layer of the same content reads the same digest; found by its CONFIG."""
    d = require_vectors()
    cfg = image_config(tmp_path, "sparse", lowers=[str(d / "ro_sparse.lsmt")])
    att = configfs.attach_image(str(cfg))
    try:
        assert att.block is not None
        assert sha_of(att.block) == SPARSE_SHA
        # RECONFIG_DEVICE: the handler refuses a size that is not the image's
        size_attr = f"{att.device_dir}/attrib/dev_size"
        with pytest.raises(configfs.ConfigfsError, match="EINVAL"):
            configfs.write_attr(size_attr, str(8 << 20))
        configfs.write_attr(size_attr, str(4 << 20))
        assert serve.alive()
    finally:
        configfs.detach(configfs.find(str(cfg)))
    assert configfs.find_or_none(str(cfg)) is None


def test_mount_ext4_read_only(serve: TcmuServe, tmp_path: Path, mnt: Path) -> None:
    """The ext4 of the apply vector, through TCMU, mounts read-only; its files read back."""
    d = require_vectors()
    cfg = image_config(tmp_path, "ext4", lowers=[str(d / "zro_apply_zstd_bs32.zfile")])
    att = configfs.attach_image(str(cfg))
    try:
        check_apply_ext4(att.block or "", mnt, d / "apply_layer.tar")
    finally:
        configfs.detach(att)


def test_write_sync_detach(serve: TcmuServe, scratch: Path) -> None:
    """Writes through /dev/sdX of a writable image (lower + new upper), sync, detach:
    the upper holds them (the host side commits it and reads them back), and a new attach
    reads them too."""
    from obd.image import ops

    d = require_vectors()
    data, index = scratch / "w.data", scratch / "w.index"
    ops.create(str(data), str(index), 4 * MiB, force=True)
    lower = str(d / "ro_sparse.lsmt")
    cfg = image_config(scratch, "w", lowers=[lower], upper=(str(data), str(index)))
    writes = [
        {"offset": 0, "length": 4096, "pattern": "a5"},
        {"offset": 1 * MiB + 512, "length": 8192, "pattern": "0123456789abcdef"},
        {"offset": 4 * MiB - 65536, "length": 65536, "pattern": "5a"},
    ]
    att = configfs.attach_image(str(cfg))
    try:
        with open(att.block or "", "r+b", buffering=0) as f:
            for w in writes:
                pat = bytes.fromhex(w["pattern"])
                os.pwrite(f.fileno(), pat * (w["length"] // len(pat)), w["offset"])
            os.fsync(f.fileno())
        sh("sync")
    finally:
        configfs.detach(att)
    att = configfs.attach_image(str(cfg))
    try:
        with open(att.block or "", "rb", buffering=0) as f:
            for w in writes:
                pat = bytes.fromhex(w["pattern"])
                assert os.pread(f.fileno(), w["length"], w["offset"]) == pat * (
                    w["length"] // len(pat)
                )
    finally:
        configfs.detach(att)
    (scratch / "written.json").write_text(
        json.dumps({"data": str(data), "index": str(index), "lowers": [lower], "writes": writes})
    )


def test_refused_image_names_the_result(serve: TcmuServe, tmp_path: Path) -> None:
    """An image whose layer is missing: the attach fails (ConfigfsError, exit 3) naming the
    enable path, the errno and the resultFile's reason; nothing is left in configfs; the
    service lives."""
    cfg = image_config(tmp_path, "broken", lowers=[str(tmp_path / "missing.lsmt")])
    with pytest.raises(configfs.ConfigfsError) as ei:
        configfs.attach_image(str(cfg), 4 * MiB)
    msg = str(ei.value)
    assert ei.value.exit_code == 3
    assert "/enable" in msg and "errno 1 EPERM" in msg, msg
    assert "failed:failed to open local file" in msg, msg
    assert configfs.find_or_none(str(cfg)) is None
    assert serve.alive()


def test_detach_while_reading(serve: TcmuServe, tmp_path: Path) -> None:
    """Pull the disk away while dd reads it: dd ends (an I/O error is fine), nothing hangs,
    the service lives and serves the next device."""
    d = require_vectors()
    cfg = image_config(tmp_path, "basic", lowers=[str(d / "zro_basic_lz4.zfile")])
    att = configfs.attach_image(str(cfg))
    dd = subprocess.Popen(
        ["dd", f"if={att.block}", "of=/dev/null", "bs=4k", "iflag=direct"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)
    t0 = time.monotonic()
    configfs.detach(att)
    try:
        dd.wait(60)
    except subprocess.TimeoutExpired:
        dd.kill()
        pytest.fail("dd hung after the disk was detached")
    assert time.monotonic() - t0 < 60
    assert serve.alive()
    cfg2 = image_config(tmp_path, "after", lowers=[str(d / "ro_sparse.lsmt")])
    att = configfs.attach_image(str(cfg2))
    try:
        assert sha_of(att.block or "") == SPARSE_SHA
    finally:
        configfs.detach(att)


def test_64_devices_at_once(serve: TcmuServe, tmp_path: Path) -> None:
    """64 devices attached concurrently, each read, all detached concurrently: no hang,
    every disk reads its image."""
    from obd.image import open_layers

    d = require_vectors()
    img = open_layers([str(d / "ro_sparse.lsmt")])
    expect = img.pread(0, 65536)
    img.close()
    cfgs = [
        image_config(tmp_path, f"m{i:02d}", lowers=[str(d / "ro_sparse.lsmt")])
        for i in range(int(os.environ.get("OBD_VM_NDEV", "64")))
    ]
    errors: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(cfg: Path) -> configfs.Attachment | None:
        try:
            # small rings: each device's command ring is kernel memory (8 MiB by default)
            return configfs.attach_image(
                str(cfg), 4 * MiB, wait=120, max_data_area_mb=4, cmd_ring_size_mb=1
            )
        except Exception as e:
            with lock:
                errors.append(f"{cfg.name}: {e}")
            return None

    with ThreadPoolExecutor(16) as pool:
        atts = list(pool.map(one, cfgs))
    attach_s = time.monotonic() - t0
    try:
        assert not errors, errors[:5]
        blocks = {a.block for a in atts if a is not None}
        assert len(blocks) == len(cfgs)
        for a in atts:
            assert a is not None and a.block is not None
            with open(a.block, "rb", buffering=0) as f:
                assert f.read(65536) == expect, a.block
    finally:
        t1 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(configfs.detach, [a for a in atts if a is not None]))
        detach_s = time.monotonic() - t1
    print(f"64 devices: attach {attach_s:.1f} s, detach {detach_s:.1f} s")
    assert not [a for a in configfs.attachments() if a.name.startswith("user_1/")]
    assert serve.alive()
