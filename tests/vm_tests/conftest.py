"""Tests that run INSIDE the kernel-test VM (tests/vm): collected only there.

``tests/test_vm_kernel.py`` boots the VM once and runs this folder with ``OBD_IN_VM=1``;
each test here becomes one host-side result. ``OBD_VM_SCRATCH`` is a host folder shared
read-write: what the host side checks after the VM is gone is written there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_VM = os.environ.get("OBD_IN_VM") == "1"
if not IN_VM:
    collect_ignore_glob = ["test_in_vm_*.py"]


def sh(cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed in the VM's root")


def check_apply_ext4(dev: str, mnt: Path, tar_path: Path) -> None:
    """Mount ``dev`` (the apply vector's ext4) read-only at ``mnt``; every file of the
    vector's tar reads back the same; unmount."""
    import tarfile

    sh(f"mount -t ext4 -o ro,noload {dev} {mnt}")
    try:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            assert members
            for m in members:
                p = mnt / m.name
                if m.isfile():
                    f = tar.extractfile(m)
                    assert f is not None
                    assert p.read_bytes() == f.read(), m.name
                elif m.issym():
                    assert os.readlink(p) == m.linkname
                elif m.isdir():
                    assert p.is_dir()
    finally:
        sh(f"umount {mnt}")


@pytest.fixture(scope="session")
def scratch() -> Path:
    p = Path(os.environ.get("OBD_VM_SCRATCH", "/tmp/obd-vm-scratch"))
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


class TcmuServe:
    """``obd serve --tcmu`` as a child process, logging to ``log``; stopped by its pid."""

    def __init__(self, folder: Path, *args: str, timeout: float = 90) -> None:
        import json
        import sys
        import time

        from tests.nbd_helpers import REPO

        self.log = folder / "obd-tcmu.log"
        cfg = folder / "overlaybd.json"
        cfg.write_text(json.dumps({"logConfig": {"logPath": str(self.log), "logLevel": 1},
                                   "enableAudit": False}))  # fmt: skip
        self.err = folder / "obd-tcmu.stderr"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "commands.main", "serve", "--tcmu", "--config", str(cfg), *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "tcmu: serving" not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"obd serve --tcmu did not start:\n{self.stderr}")
            time.sleep(0.1)

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        from tests.vm import stop_pid

        return stop_pid(self.proc, timeout)
