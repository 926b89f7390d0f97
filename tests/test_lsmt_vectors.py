"""Upstream-made LSMT vectors: read to the manifest digest; commit/seal reproduce them."""

from __future__ import annotations

import shlex
import shutil

import pytest

from obd.image.layers import open_ro_layer, open_rw_layer
from tests.conftest import run_obd
from tests.vectors import (
    require_vectors,
    resparsify,
    sha256_file,
    sha256_of_reader,
    vector_params,
    vectors_of,
)


@pytest.mark.parametrize("v", vector_params("lsmt_ro", "lsmt_sealed"))
def test_read_only_vectors_read_to_digest(v):
    d = require_vectors()
    with open_ro_layer(str(d / v["files"]["layer"])) as layer:
        assert layer.virtual_size == v["virtual_size"]
        assert sha256_of_reader(layer.pread, layer.virtual_size, 4 << 20) == v["sha256"]


@pytest.mark.parametrize("v", vector_params("lsmt_rw", "lsmt_rw_sparse"))
def test_writable_vectors_read_to_digest(v):
    d = require_vectors()
    files = v["files"]
    with open_rw_layer(str(d / files["data"]), str(d / files["index"]), readonly=True) as layer:
        assert layer.virtual_size == v["virtual_size"]
        if v.get("uuid"):
            assert layer.uuid.upper() == v["uuid"].upper()
        assert sha256_of_reader(layer.pread, layer.virtual_size, 4 << 20) == v["sha256"]


def _plain_commit_vectors():
    out = []
    for v in vectors_of("lsmt_ro"):
        cmd = v["commands"][-1]
        if not cmd.startswith("overlaybd-commit ") or " -z" in cmd:
            continue
        out.append(pytest.param(v, id=v["name"]))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no vectors"))]


@pytest.mark.parametrize("v", _plain_commit_vectors())
def test_commit_reproduces_upstream_bytes(v, tmp_path):
    d = require_vectors()
    argv = shlex.split(v["commands"][-1])[1:]
    # the last three positionals are data, index, output; options come before them
    *opts, data, index, output = argv
    src_data = d / data
    if not src_data.exists():
        pytest.skip(f"{data} is not shipped with the vectors")
    if v["name"].startswith("ro_sparse"):
        src_data = resparsify(src_data, tmp_path / data, data.removesuffix(".data"))
    out = tmp_path / output
    r = run_obd("commit", *opts, src_data, d / index, out)
    assert r.code == 0, r.err
    assert sha256_file(out) == v["files_sha256"][output]


def test_seal_reproduces_sealed_basic(tmp_path):
    d = require_vectors()
    shutil.copy(d / "rw_basic.data", tmp_path / "s.data")
    shutil.copy(d / "rw_basic.index", tmp_path / "s.index")
    r = run_obd("commit", "--seal", tmp_path / "s.data", tmp_path / "s.index")
    assert r.code == 0, r.err
    want = {v["name"]: v for v in vectors_of("lsmt_sealed")}["sealed_basic"]
    assert sha256_file(tmp_path / "s.data") == want["files_sha256"]["sealed_basic.data"]


def test_commit_sealed_equals_plain_commit(tmp_path):
    d = require_vectors()
    r = run_obd("commit", "--commit_sealed", d / "sealed_basic.data", tmp_path / "o.lsmt")
    assert r.code == 0, r.err
    ro = {v["name"]: v for v in vectors_of("lsmt_ro")}["ro_basic"]
    assert sha256_file(tmp_path / "o.lsmt") == ro["files_sha256"]["ro_basic.lsmt"]


def test_sealed_file_is_not_reopened_writable(tmp_path):
    d = require_vectors()
    r = run_obd("commit", d / "sealed_basic.data", d / "rw_basic.index", tmp_path / "x")
    assert r.code == 2 and "sealed" in r.err
    assert not (tmp_path / "x").exists()
