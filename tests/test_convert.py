"""obd convert: OCI images (made here with tarfile) into overlaybd images, read back
through the core readers and debugfs, compared with a model of the OCI layer rules."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from obd.errors import CorruptError, FileAccessError, UnsupportedError, UsageError
from obd.image.inspect import inspect_file
from obd.oci import annotations as A
from obd.oci.convert import chain_ids, chain_uuid, open_source
from obd.oci.layout import (
    DockerArchiveSource,
    OciLayoutSource,
    docker_manifest,
    open_local,
    parse_local_ref,
    verified_chunks,
)
from obd.oci.manifest import Descriptor
from tests.conftest import REPO, assert_one_line_error, run_obd
from tests.ext4_helpers import (
    E,
    Tree,
    View,
    debugfs_view,
    e2fsck,
    layer_tar,
    model_apply,
    model_view,
)
from tests.nbd_helpers import ServeProcess
from tests.oci_helpers import (
    build_image,
    push_image,
    sha256,
    write_docker_archive,
    write_multi_platform_layout,
    write_oci_layout,
)

pytestmark = pytest.mark.timeout(120)

BIG = bytes(range(256)) * 600  # 150 KiB, more than one ZFile block and one tar chunk

# three layers covering the rules: whiteouts of a file and a tree, an opaque folder, type
# changes both ways, hardlinks within and across layers, symlinks, owners, setuid
LAYERS: list[list[E]] = [
    [
        E("dir", "etc"),
        E("file", "etc/hostname", b"base\n"),
        E("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600),
        E("dir", "usr"),
        E("dir", "usr/bin"),
        E("file", "usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
        E("symlink", "bin", target="usr/bin"),
        E("dir", "var"),
        E("dir", "var/cache"),
        E("file", "var/cache/a", b"a" * 5000, uid=1000, gid=1000),
        E("dir", "var/cache/sub"),
        E("file", "var/cache/sub/b", b"b"),
        E("dir", "opt"),
        E("file", "opt/old", b"old"),
        E("file", "big", BIG),
        E("file", "shared", b"shared content\n"),
    ],
    [
        E("whiteout", "etc/hostname"),
        E("whiteout", "var/cache"),
        E("file", "etc/motd", b"hello\n"),
        E("hardlink", "etc/motd-link", target="etc/motd"),
        E("hardlink", "shared-link", target="shared"),  # to a file of the layer below
        E("dir", "opt"),
        E("opaque", "opt"),
        E("file", "opt/new", b"new"),
        E("symlink", "usr/bin/alias", target="tool"),
    ],
    [
        E("file", "etc/hostname", b"top\n"),
        E("file", "usr/bin", b"now a file\n"),  # a folder replaced by a file
        E("dir", "shared"),  # a file replaced by a folder
        E("file", "shared/inside", b"x"),
        E("file", "big", BIG[::-1]),
    ],
]


def tars(layers: list[list[E]]) -> list[bytes]:
    return [layer_tar(entries) for entries in layers]


def want(layers: list[list[E]]) -> View:
    """What the OCI rules make of ``layers`` (the apply tests' model)."""
    tree: Tree = {}
    for entries in layers:
        model_apply(tree, entries)
    return model_view(tree)


def _layout(tmp_path: Path, layers: Any = LAYERS, name: str = "src", **kw: Any) -> Path:
    return write_oci_layout(build_image(tars(layers), **kw), tmp_path / name)


# --- references, sources, chain ids ------------------------------------------------------


def test_parse_local_ref() -> None:
    r = parse_local_ref("oci:/a/b:v1")
    assert r is not None and (r.kind, r.path, r.tag) == ("oci", "/a/b", "v1")
    r = parse_local_ref("oci:/a/b")
    assert r is not None and (r.path, r.tag) == ("/a/b", None)
    r = parse_local_ref("oci:rel/dir:x/y")  # a colon followed by a path is part of the path
    assert r is not None and (r.path, r.tag) == ("rel/dir:x/y", None)
    r = parse_local_ref("docker-archive:img.tar:app:1")
    assert r is not None and (r.path, r.tag) == ("img.tar:app", "1")
    assert parse_local_ref("registry.example/app:1") is None
    with pytest.raises(UsageError):
        parse_local_ref("oci:")


def test_chain_ids_and_uuid() -> None:
    d = [sha256(b"a"), sha256(b"b"), sha256(b"c")]
    c = chain_ids(d)
    assert c[0] == d[0]
    assert c[1] == "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    assert c[2] == "sha256:" + hashlib.sha256(f"{c[1]} {d[2]}".encode()).hexdigest()
    h = c[2][7:]
    assert chain_uuid(c[2]) == f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@pytest.mark.parametrize("form", ["oci", "docker-legacy", "docker-oci"])
def test_sources_give_the_same_image(tmp_path: Path, form: str) -> None:
    img = build_image(tars(LAYERS), gzip_layers=[True, False, True] if form == "oci" else False)
    if form == "oci":
        ref = f"oci:{write_oci_layout(img, tmp_path / 'l', tag='v1')}:v1"
    else:
        path = write_docker_archive(img, tmp_path / "a.tar", oci=form == "docker-oci")
        ref = f"docker-archive:{path}"
    with open_source(ref) as src:
        assert src.diff_ids == img.config["rootfs"]["diff_ids"]
        assert len(src.layers) == 3
        for i, desc in enumerate(src.layers):
            data = b"".join(
                verified_chunks(src.source.blob_chunks(desc), desc.digest, desc.size, "t")
            )
            tar = img.layer_tars[i]
            assert data == tar or __import__("gzip").decompress(data) == tar


def test_platform_from_an_index(tmp_path: Path) -> None:
    images = {
        "amd64": build_image(tars(LAYERS[:1]), architecture="amd64"),
        "arm64": build_image(tars(LAYERS[:2]), architecture="arm64", gzip_layers=[False, "zstd"]),
    }
    lay = write_multi_platform_layout(images, tmp_path / "multi", "v1")
    with open_source(f"oci:{lay}:v1") as src:
        assert src.digest == images["amd64"].digest
    with open_source(f"oci:{lay}:v1", platform="linux/arm64") as src:
        assert src.digest == images["arm64"].digest and len(src.layers) == 2
        assert src.layers[1].media_type == A.MT_OCI_LAYER_ZSTD
    with (
        pytest.raises(UnsupportedError, match="no manifest for platform linux/s390x"),
        open_source(f"oci:{lay}:v1", platform="linux/s390x"),
    ):
        pass


def test_docker_archive_tags(tmp_path: Path) -> None:
    img = build_image(tars(LAYERS[:1]))
    path = write_docker_archive(img, tmp_path / "a.tar", tag="app:7")
    with DockerArchiveSource(str(path)) as src:
        assert docker_manifest(src, "7").manifest is not None
        assert docker_manifest(src, "app:7").manifest is not None
        with pytest.raises(UsageError, match="no image tagged"):
            docker_manifest(src, "8")


def test_layout_tags(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    with pytest.raises(UsageError, match="no image tagged 'nope'"):
        open_local(parse_local_ref(f"oci:{lay}:nope"))  # type: ignore[arg-type]
    src, sel = open_local(parse_local_ref(f"oci:{lay}:latest"))  # type: ignore[arg-type]
    with src:
        assert sel.desc.annotations[A.REF_NAME] == "latest"


# --- bad input -----------------------------------------------------------------------------


def _blob(lay: Path, digest: str) -> Path:
    return lay / "blobs" / "sha256" / digest.split(":")[1]


def test_bad_sources(tmp_path: Path) -> None:
    img = build_image(tars(LAYERS))
    # a missing config blob
    lay = write_oci_layout(img, tmp_path / "missing")
    _blob(lay, img.manifest["config"]["digest"]).unlink()
    with pytest.raises(FileAccessError, match="missing blob"), open_source(f"oci:{lay}"):
        pass
    # a config whose bytes do not match its digest
    lay = write_oci_layout(img, tmp_path / "wrong")
    _blob(lay, img.manifest["config"]["digest"]).write_bytes(img.config_bytes.replace(b"amd64", b"arm64"))  # fmt: skip
    with pytest.raises(CorruptError, match="has digest"), open_source(f"oci:{lay}"):
        pass
    # not an image: a folder without index.json, a file that is no tar, a manifest of junk
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptError, match=r"no index\.json"), open_source(f"oci:{tmp_path / 'empty'}"):  # fmt: skip
        pass
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorruptError), open_source(f"docker-archive:{tmp_path / 'junk.tar'}"):
        pass
    # an overlaybd image is not converted again
    lay = write_oci_layout(img, tmp_path / "obd")
    m = json.loads(img.manifest_bytes)
    m["layers"][0]["annotations"] = {A.BLOB_DIGEST: m["layers"][0]["digest"]}
    mb = json.dumps(m).encode()
    _blob(lay, sha256(mb)).write_bytes(mb)
    index = json.loads((lay / "index.json").read_text())
    index["manifests"][0].update(digest=sha256(mb), size=len(mb))
    (lay / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedError, match="overlaybd image already"), open_source(f"oci:{lay}"):  # fmt: skip
        pass


def test_verified_chunks_catches_wrong_and_short_streams() -> None:
    data = [b"abc", b"def"]
    good = sha256(b"abcdef")
    assert b"".join(verified_chunks(iter(data), good, 6, "x")) == b"abcdef"
    with pytest.raises(CorruptError, match="has digest"):
        list(verified_chunks(iter(data), sha256(b"other!"), 6, "x"))
    with pytest.raises(CorruptError, match="ends after 6 of its 7"):
        list(verified_chunks(iter(data), good, 7, "x"))
    with pytest.raises(CorruptError, match="longer"):
        list(verified_chunks(iter(data), good, 5, "x"))


def test_oci_layout_source_refuses_path_tricks(tmp_path: Path) -> None:
    lay = _layout(tmp_path)
    with OciLayoutSource(str(lay)) as src, pytest.raises(CorruptError, match="bad digest"):
        src.blob_bytes(Descriptor(A.MT_OCI_CONFIG, "sha256:../../etc/passwd", 1))


# --- end to end: convert, read back through the core readers, compare with the model ------

needs_debugfs = pytest.mark.skipif(shutil.which("debugfs") is None, reason="debugfs not installed")
VSIZE = "256M"


def convert_cli(tmp_path: Path, src: str, dst: str, *extra: str, store: str = "store") -> dict[str, Any]:  # fmt: skip
    r = run_obd("convert", "--json", "--vsize", VSIZE, "--store", tmp_path / store, *extra, src, dst, timeout=120)  # fmt: skip
    assert r.code == 0, r.err
    return dict(json.loads(r.out))


def layer_files(result: dict[str, Any]) -> list[str]:
    return [la["file"] for la in result["layers"]]


def tree_of(tmp_path: Path, files: list[str], name: str) -> View:
    """The ext4 tree of the image stacked from ``files`` (the core readers make the disk,
    debugfs reads its filesystem)."""
    from obd.image import open_layers
    from obd.image.ops import flatten_raw

    raw = tmp_path / f"{name}.raw"
    with open_layers(files) as stack:
        flatten_raw(stack, str(raw))
    e2fsck(raw)
    return debugfs_view(raw, tmp_path / f"{name}.tree")


def debugfs(raw: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(raw)], capture_output=True, text=True, timeout=30).stdout  # fmt: skip


def check_aci_shape(manifest: dict[str, Any], config: dict[str, Any], blobs: dict[str, bytes], src_config: dict[str, Any], *, oci: bool) -> None:  # fmt: skip
    """The manifest and config are what ACI's converter writes (field by field)."""
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == (A.MT_OCI_MANIFEST if oci else A.MT_DOCKER_MANIFEST)
    assert manifest["config"]["mediaType"] == (A.MT_OCI_CONFIG if oci else A.MT_DOCKER_CONFIG)
    assert set(manifest) <= {"schemaVersion", "mediaType", "config", "layers", "annotations"}
    for desc in manifest["layers"]:
        assert set(desc) == {"mediaType", "digest", "size", "annotations"}
        assert desc["mediaType"] == (A.MT_OCI_LAYER if oci else A.MT_DOCKER_LAYER)
        assert desc["annotations"] == {
            A.VERSION: A.OVERLAYBD_VERSION,
            A.BLOB_DIGEST: desc["digest"],
            A.BLOB_SIZE: str(desc["size"]),
        }
        blob = blobs[desc["digest"]]
        assert len(blob) == desc["size"] and sha256(blob) == desc["digest"]
    assert config["rootfs"] == {"type": "layers", "diff_ids": [d["digest"] for d in manifest["layers"]]}  # fmt: skip
    for key in ("architecture", "os", "config", "created"):
        assert config[key] == src_config[key]


def read_layout(lay: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    index = json.loads((lay / "index.json").read_text())
    [entry] = [e for e in index["manifests"] if e["annotations"][A.REF_NAME] == tag]
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in (lay / "blobs" / "sha256").iterdir()}
    manifest = json.loads(blobs[entry["digest"]])
    assert sha256(blobs[entry["digest"]]) == entry["digest"] and entry["size"] == len(blobs[entry["digest"]])  # fmt: skip
    return manifest, json.loads(blobs[manifest["config"]["digest"]]), blobs


@needs_debugfs
def test_convert_layout_to_layout(tmp_path: Path) -> None:
    img = build_image(tars(LAYERS), gzip_layers=[True, False, "zstd"])
    src = write_oci_layout(img, tmp_path / "src", tag="v1")
    res = convert_cli(tmp_path, f"oci:{src}:v1", f"oci:{tmp_path / 'dst'}:obd", "--config-out", tmp_path / "cfg.json")  # fmt: skip
    assert [la["reused"] for la in res["layers"]] == [False] * 3
    manifest, config, blobs = read_layout(tmp_path / "dst", "obd")
    check_aci_shape(manifest, config, blobs, img.config, oci=True)
    assert config["history"] == img.config["history"]
    assert sha256(blobs[res["digest"]]) == res["digest"]
    files = [str(tmp_path / "dst" / "blobs" / "sha256" / d["digest"].split(":")[1]) for d in manifest["layers"]]  # fmt: skip
    # each layer: a tar-wrapped lz4 ZFile of an LSMT layer (commit -z -t) with ACI's
    # uuids (the chain ID's first 128 bits; the parent's, the layer below's)
    chains = chain_ids(img.config["rootfs"]["diff_ids"])
    for i, f in enumerate(files):
        info = inspect_file(f)
        assert info.wrappers == ["tar", "zfile"], info.wrappers
        assert info.zfile is not None and info.zfile.algorithm == "lz4"
        assert info.lsmt is not None and info.lsmt.virtual_size == 256 << 20
        assert (info.lsmt.uuid or "").lower() == chain_uuid(chains[i])
        assert (info.lsmt.parent_uuid or "").lower() == (chain_uuid(chains[i - 1]) if i else "")
        assert res["layers"][i]["chainID"] == chains[i]
    # the converted layers, read through the core readers, hold the model's tree
    got = tree_of(tmp_path, files, "img")
    assert got == want(LAYERS)
    # --config-out names the same files
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert [lo["file"] for lo in cfg["lowers"]] == files


@needs_debugfs
def test_store_reuse_flatten_and_docker_archive(tmp_path: Path) -> None:
    """A second convert converts nothing (every layer from the store, same blobs); other
    options convert again; --flatten makes one layer of the same tree; a docker archive
    gives the same layers as the OCI layout of the same image."""
    img = build_image(tars(LAYERS))
    src = write_oci_layout(img, tmp_path / "src")
    first = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'a'}")
    again = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'b'}")
    assert [la["reused"] for la in again["layers"]] == [True, True, True]
    assert [la["digest"] for la in again["layers"]] == [la["digest"] for la in first["layers"]]
    assert again["digest"] == first["digest"]
    # the bottom layer lost from the store: it is converted again (other bytes: the
    # ext4 has a new uuid), and so are the layers above it, which were made over the old
    # one; the image is still right
    [rec] = [p for p in (tmp_path / "store" / "layers").glob("*.json") if json.loads(p.read_text())["chain_id"] == first["layers"][0]["chainID"]]  # fmt: skip
    rec.unlink()
    redo = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'r'}")
    assert [la["reused"] for la in redo["layers"]] == [False, False, False]
    assert redo["layers"][0]["digest"] != first["layers"][0]["digest"]
    assert tree_of(tmp_path, layer_files(redo), "redo") == want(LAYERS)
    # a legacy docker save archive of the same image: the same chain, so the same layers,
    # Docker media types around them
    archive = write_docker_archive(img, tmp_path / "img.tar")
    dock = convert_cli(tmp_path, f"docker-archive:{archive}", f"oci:{tmp_path / 'c'}:d")
    assert [la["reused"] for la in dock["layers"]] == [True, True, True]
    assert [la["digest"] for la in dock["layers"]] == [la["digest"] for la in redo["layers"]]
    manifest, config, blobs = read_layout(tmp_path / "c", "d")
    check_aci_shape(manifest, config, blobs, img.config, oci=False)
    # plain LSMT layers (--no-z), still tar-wrapped
    plain = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'p'}", "--no-z")
    assert [la["reused"] for la in plain["layers"]] == [False, False, False]
    assert inspect_file(plain["layers"][0]["file"]).wrappers == ["tar"]
    # another algorithm is another conversion
    zstd = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'z'}", "--algorithm", "zstd", "--bs", "16")  # fmt: skip
    assert [la["reused"] for la in zstd["layers"]] == [False, False, False]
    info = inspect_file(zstd["layers"][0]["file"])
    assert info.zfile is not None and info.zfile.algorithm == "zstd" and info.zfile.block_size == 16384  # fmt: skip
    # --flatten: one layer, the same tree; history says so
    flat = convert_cli(tmp_path, f"oci:{src}", f"oci:{tmp_path / 'f'}:flat", "--flatten")
    assert len(flat["layers"]) == 1 and flat["layers"][0]["sources"] == [0, 1, 2]
    manifest, config, blobs = read_layout(tmp_path / "f", "flat")
    check_aci_shape(manifest, config, blobs, img.config, oci=True)
    assert [h.get("empty_layer", False) for h in config["history"]] == [True, True, True, False]
    assert tree_of(tmp_path, layer_files(flat), "flat") == want(LAYERS)


def test_bad_input_cli(tmp_path: Path) -> None:
    img = build_image(tars(LAYERS[:2]), gzip_layers=True)
    dst = f"oci:{tmp_path / 'dst'}"
    # a layer blob that is missing
    lay = write_oci_layout(img, tmp_path / "missing")
    _blob(lay, img.manifest["layers"][1]["digest"]).unlink()
    r = run_obd("convert", "--vsize", VSIZE, "--store", tmp_path / "s", f"oci:{lay}", dst)
    assert_one_line_error(r, 3, "missing blob", img.manifest["layers"][1]["digest"].split(":")[1])
    # a layer blob whose bytes are not its digest's (a gzip of other content)
    lay = write_oci_layout(img, tmp_path / "wrong")
    other = __import__("gzip").compress(img.layer_tars[0], mtime=1)
    _blob(lay, img.manifest["layers"][1]["digest"]).write_bytes(other)
    r = run_obd("convert", "--vsize", VSIZE, "--store", tmp_path / "s", f"oci:{lay}", dst)
    assert r.code == 4, r.err
    assert_one_line_error(r, 4)
    assert not (tmp_path / "dst" / "index.json").exists()  # no manifest for a failed convert
    # not an image
    (tmp_path / "plain").mkdir()
    r = run_obd("convert", "--store", tmp_path / "s", f"oci:{tmp_path / 'plain'}", dst)
    assert_one_line_error(r, 4, "no index.json")
    r = run_obd("convert", "--store", tmp_path / "s", f"oci:{tmp_path / 'nowhere'}", dst)
    assert_one_line_error(r, 3, "nowhere")
    r = run_obd("convert", "--store", tmp_path / "s", "not a reference", dst)
    assert_one_line_error(r, 2)


# --- registries ----------------------------------------------------------------------------


def _manifest_status(reg: Any, repo: str, tag: str) -> int:
    accept = ", ".join([A.MT_OCI_MANIFEST, A.MT_DOCKER_MANIFEST])
    return int(reg.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": accept}).status_code)


@needs_debugfs
def test_registry_to_registry(tmp_path: Path) -> None:
    """A plain OCI image pushed to a real registry is converted into another repository;
    the pushed image is ACI's shape and its layers, fetched back, hold the model's tree;
    a convert into a third repository mounts the blobs instead of uploading them."""
    from tests.registry_helpers import start_registry

    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy not installed (libnbd-bin)")
    img = build_image(tars(LAYERS), gzip_layers=True)
    with start_registry(tmp_path / "reg") as reg:
        push_image(reg, "library/app", "v1", img)
        src = f"{reg.host}/library/app:v1"
        res = convert_cli(tmp_path, src, f"{reg.host}/obd/app:v1-obd")
        r = reg.get("/v2/obd/app/manifests/v1-obd", headers={"Accept": A.MT_OCI_MANIFEST})
        assert r.status_code == 200 and sha256(r.content) == res["digest"]
        manifest = json.loads(r.content)
        blobs = {
            d["digest"]: reg.get(f"/v2/obd/app/blobs/{d['digest']}").content
            for d in [manifest["config"], *manifest["layers"]]
        }
        config = json.loads(blobs[manifest["config"]["digest"]])
        check_aci_shape(manifest, config, blobs, img.config, oci=True)
        # obd serve REF: the converted image served over NBD from the registry, read
        # whole with nbdcopy, holds the model's tree
        gcfg = tmp_path / "overlaybd.json"
        gcfg.write_text(json.dumps({
            "logConfig": {"logPath": str(tmp_path / "obd.log"), "logLevel": 1},
            "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
            "credentialConfig": {"mode": "file", "path": str(tmp_path / "no-creds.json")},
        }))  # fmt: skip
        ref = f"{reg.host}/obd/app:v1-obd"
        with ServeProcess(["--listen", "127.0.0.1:0", "--config", str(gcfg), f"{ref}=conv"]) as sp:
            raw = tmp_path / "served.raw"
            subprocess.run(["nbdcopy", sp.uri("conv"), str(raw)], check=True, timeout=60)
        e2fsck(raw)
        assert debugfs_view(raw, tmp_path / "served") == want(LAYERS)
        # another repository: nothing converted, nothing uploaded (mounted from obd/app)
        again = convert_cli(tmp_path, src, f"{reg.host}/other/app:x")
        assert all(la["reused"] for la in again["layers"])
        assert _manifest_status(reg, "other/app", "x") == 200


def _start_and_stop(args: list[str], store: Path, sig: int) -> subprocess.Popen[bytes]:
    """Run obd with ``args``; once a first layer is in ``store``, send ``sig``."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "commands.main", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((store / "layers").glob("*.json")) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            time.sleep(0.005)
    finally:
        p.send_signal(sig)
        p.wait(30)
    return p


SLOW_LAYERS = [[E("file", f"f{i}/{k}", os.urandom(64 << 10)) for k in range(24)] for i in range(4)]


def test_interrupted_convert_pushes_no_manifest_and_resumes(tmp_path: Path) -> None:
    """kill -9 in the middle of a convert to a registry: no manifest is there; the next
    convert takes the finished layers from the store and completes the image."""
    from tests.registry_helpers import start_registry

    img = build_image(tars(SLOW_LAYERS))
    store = tmp_path / "store"
    with start_registry(tmp_path / "reg") as reg:
        push_image(reg, "src/app", "v1", img)
        args = ["convert", "--json", "--vsize", VSIZE, "--store", str(store),
                f"{reg.host}/src/app:v1", f"{reg.host}/dst/app:v1"]  # fmt: skip
        _start_and_stop(args, store, signal.SIGKILL)
        done = len(list((store / "layers").glob("*.json")))
        assert 1 <= done < 4, "the convert finished before it could be killed"
        assert _manifest_status(reg, "dst/app", "v1") == 404
        r = run_obd(*args, timeout=120)
        assert r.code == 0, r.err
        res = json.loads(r.out)
        assert sum(la["reused"] for la in res["layers"]) == done
        assert _manifest_status(reg, "dst/app", "v1") == 200
        assert not list((store / "tmp").iterdir())  # the killed run's scratch is gone


def test_ctrl_c(tmp_path: Path) -> None:
    """SIGINT mid-convert: exit 130 with one line, no index.json, no scratch left."""
    src = _layout(tmp_path, SLOW_LAYERS)
    store = tmp_path / "store"
    args = ["convert", "--store", str(store), "--vsize", VSIZE, f"oci:{src}", f"oci:{tmp_path / 'dst'}"]  # fmt: skip
    p = _start_and_stop(args, store, signal.SIGINT)
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.returncode == 130 and err.strip() == "obd: interrupted", (p.returncode, err)
    assert not (tmp_path / "dst" / "index.json").exists()
    assert not list((store / "tmp").iterdir())


def test_two_converts_on_one_store(tmp_path: Path) -> None:
    """Two converts of one image at once on one store: each layer is converted once (the
    other waits for it and reuses it), and both images name the same blobs."""
    src = _layout(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(i: int) -> subprocess.Popen[bytes]:
        args = ["convert", "--json", "--vsize", VSIZE, "--store", str(tmp_path / "store"),
                f"oci:{src}", f"oci:{tmp_path / f'd{i}'}"]  # fmt: skip
        cmd = [sys.executable, "-m", "commands.main", *args]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = [start(0), start(1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert [la["digest"] for la in results[0]["layers"]] == [la["digest"] for la in results[1]["layers"]]  # fmt: skip
    converted = [not la["reused"] for r in results for la in r["layers"]]
    assert sum(converted) == len(LAYERS)
