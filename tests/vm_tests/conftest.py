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
