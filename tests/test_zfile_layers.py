"""Compressed layers end to end: commit -z, merge and stacks against upstream's vectors."""

from __future__ import annotations

import json
import shlex

import pytest

from obd.formats.codecs import get_codec
from obd.image import open_image
from obd.image.layers import open_ro_layer
from tests.conftest import run_obd
from tests.vectors import (
    require_vectors,
    resparsify,
    sha256_file,
    sha256_of_reader,
    vector_params,
    vectors_of,
)


def _needs_exact_codec(algorithm: str) -> None:
    if not get_codec(algorithm).matches_vectors():
        pytest.skip(
            f"{algorithm} library version {get_codec(algorithm).version()} is not the one "
            "upstream's vectors were made with; compressed bytes may differ"
        )


@pytest.mark.parametrize("v", vector_params("lsmt_ro_zfile"))
def test_compressed_layers_read_to_digest(v):
    d = require_vectors()
    with open_ro_layer(str(d / v["files"]["layer"])) as layer:
        assert layer.virtual_size == v["virtual_size"]
        assert sha256_of_reader(layer.pread, layer.virtual_size, 4 << 20) == v["sha256"]


@pytest.mark.parametrize("v", vector_params("lsmt_stack"))
def test_stack_vectors_read_to_digest(v, tmp_path):
    d = require_vectors()
    cfg = {"lowers": [{"file": str(d / f)} for f in v["files"]["layers_bottom_to_top"]]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with open_image(str(tmp_path / "c.json")) as img:
        assert img.readonly
        assert img.virtual_size == v["virtual_size"]
        assert sha256_of_reader(img.pread, img.virtual_size, 4 << 20) == v["sha256"]


def _zcommit_vectors():
    out = []
    for v in vectors_of("lsmt_ro_zfile"):
        cmd = v["commands"][-1]
        if cmd.startswith("overlaybd-commit ") and " -z" in cmd:
            out.append(pytest.param(v, id=v["name"]))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no vectors"))]


@pytest.mark.parametrize("v", _zcommit_vectors())
def test_commit_z_reproduces_upstream_bytes(v, tmp_path):
    d = require_vectors()
    _needs_exact_codec(v["zfile"]["algorithm"])
    *opts, data, index, output = shlex.split(v["commands"][-1])[1:]
    if not (d / data).exists():
        pytest.skip(f"{data} is not shipped")
    src = d / data
    if "sparse" in data:
        src = resparsify(src, tmp_path / data, data.removesuffix(".data"))
    r = run_obd("commit", *opts, src, d / index, tmp_path / output)
    assert r.code == 0, r.err
    assert sha256_file(tmp_path / output) == v["files_sha256"][output]


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
    v = {x["name"]: x for x in vectors_of("lsmt_ro_zfile")}["merge_stack_a"]
    cfg = {"lowers": [{"file": str(d / f)} for f in v["inputs"]]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    r = run_obd("merge", "--compress=false", tmp_path / "c.json", tmp_path / "m.lsmt")
    assert r.code == 0, r.err
    assert sha256_file(tmp_path / "m.lsmt") == v["zfile"]["decompressed_sha256"]
    _needs_exact_codec("lz4")
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
        assert (
            sha256_of_reader(layer.pread, layer.virtual_size, 4 << 20)
            == ({x["name"]: x for x in vectors_of("lsmt_rw")}["rw_basic"]["sha256"])
        )
