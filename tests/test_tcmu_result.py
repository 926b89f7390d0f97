"""The resultFile a TCMU device writes is the one ``obd serve --nbd`` writes for the same
image: both go through obd/serve/result.py (report, config_failure_reason)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from obd.errors import ObdError
from obd.serve import ImageSpec, NbdService
from obd.serve.tcmu.device import _default_opener, open_image_for


def _config(folder: Path, lowers: list[dict[str, str]]) -> Path:
    path = folder / "img.json"
    path.write_text(json.dumps({"lowers": lowers, "resultFile": str(folder / "result")}))
    return path


def _nbd_result(config: Path, sock: Path) -> str:
    svc = NbdService([ImageSpec.parse(str(config))], unix=str(sock), use_log_files=False)
    with pytest.raises(ObdError):
        svc.start()  # its only image fails: nothing to serve
    return (config.parent / "result").read_text()


def _tcmu_result(config: Path) -> str:
    res = open_image_for(str(config), _default_opener)
    assert not res.ok and res.image is None
    return (config.parent / "result").read_text()


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))  # no LSMT header


def test_corrupt_layer_in_a_dir(tmp_path: Path) -> None:
    """A lower given by ``dir`` (its overlaybd.commit found by the §6.1 lookup) that is not a
    layer is ``failed to open layer <i>`` in both servers."""
    (tmp_path / "L").mkdir()
    _garbage(tmp_path / "L" / "overlaybd.commit")
    config = _config(tmp_path, [{"dir": str(tmp_path / "L")}])
    assert _tcmu_result(config) == "failed:failed to open layer 0"
    os.unlink(tmp_path / "result")
    assert _nbd_result(config, tmp_path / "nbd.sock") == "failed:failed to open layer 0"


def test_missing_local_file(tmp_path: Path) -> None:
    gone = str(tmp_path / "absent.commit")
    config = _config(tmp_path, [{"file": gone}])
    expect = f"failed:failed to open local file {gone}"
    assert _tcmu_result(config) == expect
    os.unlink(tmp_path / "result")
    assert _nbd_result(config, tmp_path / "nbd.sock") == expect
