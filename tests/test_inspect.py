"""``obd inspect`` and ``obd inspect --map`` against the upstream reference vectors."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from obd.image import open_image
from obd.image.inspect import FileInfo, inspect_file, map_path
from obd.io.base import ExtentKind
from tests.conftest import assert_one_line_error, run_obd
from tests.vectors import (
    manifest,
    require_vectors,
    vector_params,
    vectors_of,
    write_broken_chain_config,
)

FILE_KEYS = {
    "type",
    "path",
    "kind",
    "file_size",
    "wrappers",
    "virtual_size",
    "tar",
    "zfile",
    "lsmt",
    "error",
    "note",
}
LSMT_KEYS = {
    "format_version",
    "header_flags",
    "trailer_flags",
    "uuid",
    "parent_uuid",
    "virtual_size",
    "user_tag",
    "index_entries",
    "valid_entries",
    "padding_entries",
    "mapped_bytes",
    "zeroed_bytes",
    "garbage_bytes",
    "index_file",
    "torn_bytes",
}
ZFILE_KEYS = {
    "algorithm",
    "block_size",
    "blocks",
    "crc",
    "digest",
    "header_flags",
    "compressed_size",
    "original_size",
    "ratio",
}
IMAGE_KEYS = {
    "type",
    "path",
    "virtual_size",
    "read_only",
    "layers",
    "chain_ok",
    "chain_problems",
}


def main_file(v: dict[str, Any]) -> str:
    """The file to inspect for a vector (the data file of a writable layer)."""
    files = v["files"]
    return files.get("data") or files.get("layer") or files.get("zfile")


def stack_config(v: dict[str, Any], folder: Path, vectors: Path) -> Path:
    cfg = folder / f"{v['name']}.json"
    lowers = [{"file": str(vectors / f)} for f in v["files"]["layers_bottom_to_top"]]
    cfg.write_text(json.dumps({"lowers": lowers}))
    return cfg


def _same_uuid(got: str | None, want: str | None) -> bool:
    return (got or "").upper() == (want or "").upper()


def test_every_vector_inspects_with_manifest_values(tmp_path: Path) -> None:
    vectors = require_vectors()
    vs = [v for v in manifest()["vectors"] if v["kind"] != "lsmt_stack"]
    stacks = vectors_of("lsmt_stack")
    args = [str(vectors / main_file(v)) for v in vs]
    args += [str(stack_config(v, tmp_path, vectors)) for v in stacks]
    r = run_obd("inspect", "--json", *args)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["version"] == 1
    items = doc["items"]
    assert len(items) == len(vs) + len(stacks)
    for v, it in zip(vs, items, strict=False):
        assert set(it) == FILE_KEYS, v["name"]
        assert it["error"] is None, (v["name"], it["error"])
        assert it["virtual_size"] == v["virtual_size"], v["name"]
        if v["kind"].startswith("zfile"):
            assert it["kind"] == "zfile"
            z = it["zfile"]
            assert set(z) == ZFILE_KEYS
            assert z["algorithm"] == v["zfile"]["algorithm"]
            assert z["block_size"] == v["zfile"]["block_size"]
            assert z["crc"] == v["zfile"]["per_block_crc"]
            assert z["original_size"] == v["virtual_size"]
            assert it["wrappers"][-1] == "zfile"
            assert ("tar" in it["wrappers"]) == (v["kind"] == "zfile_tar")
            continue
        lsmt = it["lsmt"]
        assert set(lsmt) == LSMT_KEYS
        assert lsmt["virtual_size"] == v["virtual_size"]
        if "uuid" in v:
            assert _same_uuid(lsmt["uuid"], v["uuid"]), v["name"]
        if "parent_uuid" in v:
            assert _same_uuid(lsmt["parent_uuid"], v["parent_uuid"]), v["name"]
        assert lsmt["format_version"] == "1.1"
        want_kind = {
            "lsmt_rw": "lsmt_rw",
            "lsmt_rw_sparse": "lsmt_rw_sparse",
            "lsmt_ro": "lsmt_ro",
            "lsmt_ro_zfile": "lsmt_ro",
            "lsmt_sealed": "lsmt_sealed",
        }[v["kind"]]
        assert it["kind"] == want_kind, v["name"]
        if v["kind"] in ("lsmt_ro", "lsmt_ro_zfile"):
            # a commit output holds no garbage and pads its index to 256 entries
            assert lsmt["garbage_bytes"] == 0
            assert lsmt["index_entries"] % 256 == 0
            assert lsmt["valid_entries"] + lsmt["padding_entries"] == lsmt["index_entries"]
            assert "sealed" in lsmt["header_flags"]
        if v["kind"] == "lsmt_ro_zfile":
            assert it["zfile"]["original_size"] == v["zfile"]["decompressed_size"]
        if v["kind"] == "lsmt_rw":
            assert lsmt["index_file"] == str(vectors / v["files"]["index"])
    for v, it in zip(stacks, items[len(vs) :], strict=True):
        assert set(it) == IMAGE_KEYS
        assert it["virtual_size"] == v["virtual_size"]
        assert it["chain_ok"] is True
        assert it["read_only"] is True
        assert [row["position"] for row in it["layers"]] == list(range(len(v["layers"])))
        for row, lay in zip(it["layers"], v["layers"], strict=True):
            assert row["role"] == "lower"
            assert _same_uuid(row["info"]["lsmt"]["uuid"], lay["uuid"])
            assert _same_uuid(row["info"]["lsmt"]["parent_uuid"], lay["parent_uuid"])


def _digest_of_map(path: str, reader: Any, vsize: int, extents: list[dict[str, Any]]) -> str:
    """Apply a JSON extent map to zeros: copy the data extents from ``reader``."""
    h = hashlib.sha256()
    pos = 0
    zero = bytes(4 << 20)
    for e in extents:
        assert e["offset"] == pos, f"{path}: extents not contiguous at {pos}"
        n = e["length"]
        if e["kind"] == "data":
            done = 0
            while done < n:
                k = min(8 << 20, n - done)
                data = reader.pread(pos + done, k)
                assert len(data) == k
                h.update(data)
                done += k
        else:
            assert e["kind"] in ("zero", "hole")
            done = 0
            while done < n:
                k = min(len(zero), n - done)
                h.update(zero[:k])
                done += k
        pos += n
    assert pos == vsize
    return h.hexdigest()


@pytest.mark.parametrize("v", vector_params("lsmt_stack"))
def test_stack_map_reproduces_digest(v: dict[str, Any], tmp_path: Path) -> None:
    vectors = require_vectors()
    cfg = stack_config(v, tmp_path, vectors)
    r = run_obd("inspect", "--map", "--json", cfg)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["version"] == 1
    (m,) = doc["maps"]
    assert set(m) == {"path", "virtual_size", "layers", "extents"}
    assert m["virtual_size"] == v["virtual_size"]
    # depth 0 is the topmost layer
    assert [Path(p).name for p in m["layers"]] == v["files"]["layers_bottom_to_top"][::-1]
    exts = m["extents"]
    for a, b in itertools.pairwise(exts):
        assert (a["kind"], a["depth"]) != (b["kind"], b["depth"]), "adjacent equal extents"
    for e in exts:
        assert set(e) == {"offset", "length", "kind", "depth"}
        assert (e["depth"] is None) == (e["kind"] == "hole")
    assert {e["depth"] for e in exts if e["kind"] == "data"} == set(range(len(v["layers"])))
    with open_image(str(cfg), readonly=True) as img:
        got = _digest_of_map(str(cfg), img, v["virtual_size"], exts)
    assert got == v["sha256"]


@pytest.mark.parametrize("v", vector_params("lsmt_ro", "lsmt_ro_zfile", "lsmt_sealed", "lsmt_rw"))
def test_layer_map_reproduces_digest(v: dict[str, Any]) -> None:
    vectors = require_vectors()
    path = str(vectors / main_file(v))
    m = map_path(path)
    assert m.extents and m.virtual_size == v["virtual_size"]
    doc = m.to_json()
    from obd.image.stack import Stack

    if v["kind"] == "lsmt_rw":
        from obd.image.layers import open_rw_layer

        st = Stack([], open_rw_layer(path, str(vectors / v["files"]["index"]), readonly=True))
    else:
        from obd.image.layers import open_ro_layer

        st = Stack([open_ro_layer(path)], readonly=True)
    with st:
        assert _digest_of_map(path, st, v["virtual_size"], doc["extents"]) == v["sha256"]


def test_plain_zfile_maps_as_one_data_extent() -> None:
    vectors = require_vectors()
    (v,) = [x for x in vectors_of("zfile") if x["name"] == "zfile_a_lz4_default"]
    m = map_path(str(vectors / v["files"]["zfile"]))
    assert [(e.offset, e.length, e.kind, e.depth) for e in m.extents] == [
        (0, v["virtual_size"], ExtentKind.DATA, 0)
    ]


def test_human_output_and_table() -> None:
    vectors = require_vectors()
    r = run_obd("inspect", vectors / "ro_basic_meta.lsmt", vectors / "zfile_a_tar.tar")
    assert r.code == 0, r.err
    for needle in (
        "lsmt_ro",
        "6F766C62-6400-4000-8000-000000000101",
        "reference vector commit message",
        "67108864",
        "55 valid, 201 padding",
        "(in tar / zfile)",
        "lz4",
    ):
        assert needle in r.out
    r = run_obd("inspect", "--map", vectors / "ro_basic.lsmt")
    assert r.code == 0, r.err
    assert "data" in r.out and "zero" in r.out and "hole" in r.out


def test_names_are_shown_as_they_are(tmp_path: Path) -> None:
    """rich markup or emoji codes in a file name are not interpreted (a file named
    ``a[red]b:smile:.zfile`` is shown so, in the table and as a title)."""
    vectors = require_vectors()
    p = tmp_path / "a[red]b:smile:[bold].zfile"
    shutil.copy(vectors / "zfile_a_tar.tar", p)
    for args in ((p,), ("--map", p)):
        r = run_obd("inspect", *args)
        assert r.code == 0, r.err
        assert "a[red]b:smile:[bold].zfile" in r.out


def test_index_option_and_sibling_lookup(tmp_path: Path) -> None:
    vectors = require_vectors()
    shutil.copy(vectors / "rw_basic.data", tmp_path / "disk.bin")
    shutil.copy(vectors / "rw_basic.index", tmp_path / "log.bin")
    alone = inspect_file(str(tmp_path / "disk.bin"))
    assert alone.error is None and alone.note is not None and "--index" in alone.note
    assert alone.lsmt is not None and alone.lsmt.mapped_bytes is None
    r = run_obd("inspect", "--json", "--index", tmp_path / "log.bin", tmp_path / "disk.bin")
    assert r.code == 0, r.err
    (it,) = json.loads(r.out)["items"]
    assert it["lsmt"]["index_file"] == str(tmp_path / "log.bin")
    assert it["lsmt"]["garbage_bytes"] > 0
    assert it["lsmt"]["index_entries"] == 64
    shutil.copy(vectors / "rw_basic.data", tmp_path / "writable_data")
    shutil.copy(vectors / "rw_basic.index", tmp_path / "writable_index")
    info = inspect_file(str(tmp_path / "writable_data"))
    assert isinstance(info, FileInfo) and info.lsmt is not None
    assert info.lsmt.index_file == str(tmp_path / "writable_index")


def test_broken_chain_is_shown(tmp_path: Path) -> None:
    cfg = write_broken_chain_config(tmp_path / "bad.json")
    r = run_obd("inspect", "--json", cfg)
    assert r.code == 0, r.err
    (it,) = json.loads(r.out)["items"]
    assert it["chain_ok"] is False
    (p,) = it["chain_problems"]
    assert p["position"] == 1
    r = run_obd("inspect", cfg)
    assert "broken chain" in r.out


def test_not_an_overlaybd_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 10000)
    r = run_obd("inspect", junk)
    assert r.code == 4
    assert "not an overlaybd file" in r.err
    r = run_obd("inspect", tmp_path / "missing")
    assert r.code == 3
    r = run_obd("map", junk)
    assert r.code == 4 and r.err.count("\n") == 1
    assert "not an overlaybd layer" in r.err and str(junk) in r.err


@pytest.mark.timeout(90)
def test_non_regular_files_are_refused(non_regular_files: list[tuple[Path, str]]) -> None:
    """A directory, a FIFO (which must not block the command) or a socket: one line
    naming it, exit 3, for inspect and map."""
    for cmd in ("inspect", "map"):
        for p, what in non_regular_files:
            r = run_obd(cmd, p, timeout=20)
            assert_one_line_error(r, 3, str(p), f"not a regular file ({what})")


@pytest.mark.timeout(120)
def test_no_command_blocks_on_a_fifo(tmp_path: Path) -> None:
    """Every command that reads a file or an image config refuses a FIFO at once (an
    open() of a FIFO blocks until a writer comes, and then SIGTERM cannot end it)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    for args in (
        ("zfile", fifo, out),
        ("zfile", "-x", fifo, out),
        ("merge", fifo, out),  # IMAGE_CONFIG OUTPUT
        ("merge", "--raw", "-o", out, fifo),
        ("create", "--from", fifo, tmp_path / "a.data", tmp_path / "a.index"),
    ):
        r = run_obd(*args, timeout=20)
        assert_one_line_error(r, 3, str(fifo), "not a regular file (a pipe)")
    r = run_obd("serve", "--nbd", "--listen", "127.0.0.1:0", fifo, timeout=20)
    assert r.code == 3 and "not a regular file (a pipe)" in r.err.splitlines()[-1], r.err
    assert "Traceback" not in r.err
    assert not out.exists()


def test_upper_only_image_map_reproduces_digest(tmp_path: Path) -> None:
    vectors = require_vectors()
    (v,) = [x for x in vectors_of("lsmt_rw") if "image_config" in x]
    cfg = tmp_path / "image.json"
    upper = {k: str(vectors / name) for k, name in v["image_config"]["upper"].items()}
    cfg.write_text(json.dumps({"lowers": [], "upper": upper}))
    (m,) = json.loads(run_obd("inspect", "--map", "--json", cfg).out)["maps"]
    assert m["layers"] == [upper["data"]]
    assert {e["depth"] for e in m["extents"] if e["kind"] != "hole"} == {0}
    with open_image(str(cfg), readonly=True) as img:
        assert _digest_of_map(str(cfg), img, v["virtual_size"], m["extents"]) == v["sha256"]


def test_map_command_is_inspect_map(tmp_path):
    d = require_vectors()
    a = run_obd("map", "--json", d / "ro_basic.lsmt")
    b = run_obd("inspect", "--map", "--json", d / "ro_basic.lsmt")
    assert a.code == b.code == 0
    assert json.loads(a.out) == json.loads(b.out)
    assert json.loads(a.out)["maps"][0]["extents"]


def test_open_blob_names_kind_and_wrappers(tmp_path: Path) -> None:
    from obd.formats.sniff import KIND_LSMT_RO, KIND_UNKNOWN, KIND_ZFILE, open_blob_path
    from obd.image import ops

    d, i = str(tmp_path / "l.data"), str(tmp_path / "l.index")
    ops.create(d, i, 1 << 20)
    layer = str(tmp_path / "l.lsmt")
    ops.commit(d, i, layer, zfile=ops.ZFileOptions(), tar=True)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    zjunk = str(tmp_path / "junk.zf")
    ops.zfile_compress(str(junk), zjunk, zfile=ops.ZFileOptions())
    with open_blob_path(layer) as b:
        assert (b.kind, b.wrappers) == (KIND_LSMT_RO, ("tar", "zfile"))
        assert b.view is b.zfile and b.tar is not None and b.header is not None
    with open_blob_path(zjunk) as b:
        assert (b.kind, b.wrappers, b.tar, b.header) == (KIND_ZFILE, ("zfile",), None, None)
    with open_blob_path(str(junk)) as b:
        assert (b.kind, b.wrappers, b.view) == (KIND_UNKNOWN, (), b.file)
