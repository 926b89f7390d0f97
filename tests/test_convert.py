"""obd convert: OCI images (made here with tarfile) into overlaybd images, read back
through the core readers and debugfs, compared with a model of the OCI layer rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from obd.errors import CorruptError, FileAccessError, UnsupportedError, UsageError
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
from tests.oci_helpers import (
    build_image,
    sha256,
    write_docker_archive,
    write_oci_layout,
)

pytestmark = pytest.mark.timeout(120)

BIG = bytes(range(256)) * 600  # 150 KiB, more than one ZFile block and one tar chunk

# three layers (and a fourth) covering the rules: whiteouts of a file and a tree, an
# opaque folder, a type change, hardlinks within and across layers, symlinks
LAYERS: list[list[tuple[Any, ...]]] = [
    [
        ("dir", "etc"),
        ("file", "etc/hostname", b"base\n"),
        ("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o600),
        ("dir", "usr"),
        ("dir", "usr/bin"),
        ("file", "usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        ("symlink", "bin", "usr/bin"),
        ("dir", "var"),
        ("dir", "var/cache"),
        ("file", "var/cache/a", b"a" * 5000),
        ("dir", "var/cache/sub"),
        ("file", "var/cache/sub/b", b"b"),
        ("dir", "opt"),
        ("file", "opt/old", b"old"),
        ("file", "big", BIG),
        ("file", "shared", b"shared content\n"),
    ],
    [
        ("whiteout", "etc/hostname"),
        ("whiteout", "var/cache"),
        ("file", "etc/motd", b"hello\n"),
        ("hardlink", "etc/motd-link", "etc/motd"),
        ("hardlink", "shared-link", "shared"),  # to a file of the layer below
        ("dir", "opt"),
        ("opaque", "opt"),
        ("file", "opt/new", b"new"),
        ("symlink", "usr/bin/alias", "tool"),
    ],
    [
        ("file", "etc/hostname", b"top\n"),
        ("file", "usr/bin", b"now a file\n"),  # a folder replaced by a file
        ("dir", "shared"),  # a file replaced by a folder
        ("file", "shared/inside", b"x"),
        ("file", "big", BIG[::-1]),
    ],
]


def _layout(tmp_path: Path, layers: Any = LAYERS, name: str = "src", **kw: Any) -> Path:
    return write_oci_layout(build_image(layers, **kw), tmp_path / name)


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
    img = build_image(LAYERS, gzip_layers=[True, False, True] if form == "oci" else False)
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


def test_docker_archive_tags(tmp_path: Path) -> None:
    img = build_image(LAYERS[:1])
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
    img = build_image(LAYERS)
    # a missing config blob
    lay = write_oci_layout(img, tmp_path / "missing")
    _blob(lay, img.manifest["config"]["digest"]).unlink()
    with pytest.raises(FileAccessError, match="missing"), open_source(f"oci:{lay}"):
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
