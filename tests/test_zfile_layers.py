"""Compressed layers end to end: read, commit -z, merge and stacks against upstream's vectors.

Reproducing upstream's commit -z bytes is in test_lsmt_vectors, with the plain commits.
"""

from __future__ import annotations

import json

import pytest

from obd.image import open_image
from obd.image.layers import open_ro_layer
from tests.conftest import run_obd
from tests.vectors import (
    needs_exact_codec,
    reader_sha256,
    require_vectors,
    sha256_file,
    vector_named,
    vector_params,
)


@pytest.mark.parametrize("v", vector_params("lsmt_ro_zfile"))
def test_compressed_layers_read_to_digest(v):
    d = require_vectors()
    with open_ro_layer(str(d / v["files"]["layer"])) as layer:
        assert layer.virtual_size == v["virtual_size"]
        assert reader_sha256(layer) == v["sha256"]


@pytest.mark.parametrize("v", vector_params("lsmt_stack"))
def test_stack_vectors_read_to_digest(v, tmp_path):
    d = require_vectors()
    cfg = {"lowers": [{"file": str(d / f)} for f in v["files"]["layers_bottom_to_top"]]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with open_image(str(tmp_path / "c.json")) as img:
        assert img.readonly
        assert img.virtual_size == v["virtual_size"]
        assert reader_sha256(img) == v["sha256"]


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_commit_z_threads_give_identical_bytes(tmp_path, threads):
    d = require_vectors()
    r = run_obd(
        "commit", "-z", "--compress_threads", threads, "--algorithm", "zstd", "--bs", "8",
        d / "rw_apply.data", d / "rw_apply.index", tmp_path / "o.zfile",
    )  # fmt: skip
    assert r.code == 0, r.err
    ref = tmp_path / "ref.zfile"
    r = run_obd(
        "commit", "-z", "--compress_threads", "1", "--algorithm", "zstd", "--bs", "8",
        d / "rw_apply.data", d / "rw_apply.index", ref,
    )  # fmt: skip
    assert (tmp_path / "o.zfile").read_bytes() == ref.read_bytes()


def test_merge_reproduces_upstream_merge(tmp_path):
    d = require_vectors()
    v = vector_named("lsmt_ro_zfile", "merge_stack_a")
    cfg = {"lowers": [{"file": str(d / f)} for f in v["inputs"]]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    r = run_obd("merge", "--compress=false", tmp_path / "c.json", tmp_path / "m.lsmt")
    assert r.code == 0, r.err
    assert sha256_file(tmp_path / "m.lsmt") == v["zfile"]["decompressed_sha256"]
    needs_exact_codec("lz4")
    r = run_obd("merge", tmp_path / "c.json", tmp_path / "m.zfile")
    assert r.code == 0, r.err
    assert sha256_file(tmp_path / "m.zfile") == v["files_sha256"]["merge_stack_a.zfile"]


def test_commit_t_and_z_wrap_in_tar(tmp_path):
    d = require_vectors()
    out = tmp_path / "o.tar"
    r = run_obd("commit", "-z", "-t", d / "rw_basic.data", d / "rw_basic.index", out)
    assert r.code == 0, r.err
    raw = out.read_bytes()
    assert raw[257:262] == b"ustar" and b"overlaybd.commit" in raw[1024:1536]
    with open_ro_layer(str(out)) as layer:
        assert reader_sha256(layer) == vector_named("lsmt_rw", "rw_basic")["sha256"]
