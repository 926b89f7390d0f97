"""Upstream-made LSMT vectors: read to the manifest digest; commit (plain and -z)/seal reproduce them."""

from __future__ import annotations

import shutil

import pytest

from obd.image.layers import open_ro_layer, open_rw_layer
from tests.conftest import run_obd
from tests.vectors import (
    commit_inputs,
    commit_vector_params,
    reader_sha256,
    require_vectors,
    sha256_file,
    vector_named,
    vector_params,
)


@pytest.mark.parametrize("v", vector_params("lsmt_ro", "lsmt_sealed"))
def test_read_only_vectors_read_to_digest(v):
    d = require_vectors()
    with open_ro_layer(str(d / v["files"]["layer"])) as layer:
        assert layer.virtual_size == v["virtual_size"]
        assert reader_sha256(layer) == v["sha256"]


@pytest.mark.parametrize("v", vector_params("lsmt_rw", "lsmt_rw_sparse"))
def test_writable_vectors_read_to_digest(v):
    d = require_vectors()
    files = v["files"]
    with open_rw_layer(str(d / files["data"]), str(d / files["index"]), readonly=True) as layer:
        assert layer.virtual_size == v["virtual_size"]
        if v.get("uuid"):
            assert layer.uuid.upper() == v["uuid"].upper()
        assert reader_sha256(layer) == v["sha256"]


@pytest.mark.parametrize("v", commit_vector_params("lsmt_ro", "lsmt_ro_zfile"))
def test_commit_reproduces_upstream_bytes(v, tmp_path):
    opts, src_data, index, output = commit_inputs(v, tmp_path)
    out = tmp_path / output
    r = run_obd("commit", *opts, src_data, index, out)
    assert r.code == 0, r.err
    assert sha256_file(out) == v["files_sha256"][output]


@pytest.mark.parametrize(
    ("argv", "made", "kind", "name", "file"),
    [
        # --seal turns a copy of rw_basic into sealed_basic in place
        pytest.param(
            lambda d, t: ["--seal", t / "s.data", t / "s.index"],
            "s.data", "lsmt_sealed", "sealed_basic", "sealed_basic.data",
            id="seal_reproduces_sealed_basic",
        ),
        # --commit_sealed of sealed_basic gives the same bytes as the plain commit of rw_basic
        pytest.param(
            lambda d, t: ["--commit_sealed", d / "sealed_basic.data", t / "o.lsmt"],
            "o.lsmt", "lsmt_ro", "ro_basic", "ro_basic.lsmt",
            id="commit_sealed_equals_plain_commit",
        ),
    ],
)  # fmt: skip
def test_sealed_commits_reproduce_upstream(tmp_path, argv, made, kind, name, file):
    d = require_vectors()
    shutil.copy(d / "rw_basic.data", tmp_path / "s.data")
    shutil.copy(d / "rw_basic.index", tmp_path / "s.index")
    r = run_obd("commit", *argv(d, tmp_path))
    assert r.code == 0, r.err
    assert sha256_file(tmp_path / made) == vector_named(kind, name)["files_sha256"][file]


def test_sealed_file_is_not_reopened_writable(tmp_path):
    d = require_vectors()
    r = run_obd("commit", d / "sealed_basic.data", d / "rw_basic.index", tmp_path / "x")
    assert r.code == 2 and "sealed" in r.err
    assert not (tmp_path / "x").exists()
