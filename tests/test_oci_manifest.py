"""Image references, manifests and indexes, and the image config obd builds from an
overlaybd image's manifest (obd/oci/reference.py, obd/oci/manifest.py), against the
real registry for the fetching part."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obd.errors import CorruptError, UnsupportedError, UsageError
from obd.image.config import ImageConfig, LayerConfig, parse_image_config
from obd.oci import annotations as A
from obd.oci.manifest import (
    NOT_OVERLAYBD,
    Index,
    Manifest,
    Platform,
    describe,
    image_config_from_manifest,
    overlaybd_layers,
    parse_manifest,
    resolve_image,
)
from obd.oci.reference import Reference
from obd.registry.client import BlobLocation, RegistryClient
from tests.registry_helpers import Registry, registry, sha256_digest

__all__ = ["registry"]

pytestmark = pytest.mark.timeout(60)
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64

# -- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "digest", "ref"),
    [
        ("localhost:5000/app", "localhost:5000", "app", None, None, "latest"),
        ("localhost/app:v1", "localhost", "app", "v1", None, "v1"),
        ("127.0.0.1:5000/ns/sub/app:1.2_rc-3", "127.0.0.1:5000", "ns/sub/app", "1.2_rc-3", None, "1.2_rc-3"),
        (f"reg.example.com/a/b@{D1}", "reg.example.com", "a/b", None, D1, D1),
        (f"reg.example.com/a/b:t@{D1}", "reg.example.com", "a/b", "t", D1, D1),
        ("[::1]:5000/my-app__x.y", "[::1]:5000", "my-app__x.y", None, None, "latest"),
    ],
)  # fmt: skip
def test_reference_examples(text: str, host: str, repo: str, tag: str | None, digest: str | None, ref: str) -> None:  # fmt: skip
    r = Reference.parse(text)
    assert (r.host, r.repo, r.tag, r.digest, r.reference) == (host, repo, tag, digest, ref)
    assert str(r) == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ubuntu:22.04", "no registry host"),
        ("library/ubuntu", "no registry host"),
        ("reg.io/UPPER", "not host"),
        ("reg.io/app:", "not host"),
        ("reg.io/app:bad tag", "not host"),
        ("reg.io/app@sha256:abc", "not host"),
        ("reg.io/a//b", "not host"),
        ("reg.io/app:ta\u00e9g", "not host"),
        ("reg.io/" + "a" * 260, "longer than 255"),
    ],
)
def test_reference_errors(text: str, words: str) -> None:
    with pytest.raises(UsageError) as e:
        Reference.parse(text)
    assert words in str(e.value) and e.value.exit_code == 2


_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,4}){0,2}", fullmatch=True)
_host = st.one_of(
    st.builds(lambda a, b: f"{a}.{b}", st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
              st.sampled_from(["com", "io", "local"])),
    st.just("localhost"),
    st.builds(lambda d: f"10.0.0.{d}", st.integers(0, 255)),
)  # fmt: skip
_port = st.one_of(st.none(), st.integers(1, 65535))


@settings(max_examples=60, deadline=None)
@given(
    _host,
    _port,
    st.lists(_component, min_size=1, max_size=4),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.one_of(st.none(), st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())),
)
def test_reference_round_trip(host: str, port: int | None, parts: list[str], tag: str | None, digest: str | None) -> None:  # fmt: skip
    h = f"{host}:{port}" if port is not None else host
    text = f"{h}/{'/'.join(parts)}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    r = Reference.parse(text)
    assert (r.host, r.repo, r.tag, r.digest) == (h, "/".join(parts), tag, digest)
    assert str(r) == text and Reference.parse(str(r)) == r
    assert r.reference == (digest or tag or "latest")


# -- manifests ----------------------------------------------------------------------------


def _layer(digest: str, size: int, **ann: str) -> dict[str, object]:
    return {"mediaType": A.MT_OCI_LAYER, "digest": digest, "size": size, "annotations": ann}


def _manifest(layers: list[dict[str, object]], mt: str = A.MT_DOCKER_MANIFEST) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": A.MT_DOCKER_CONFIG, "digest": D2, "size": 10},
        "layers": layers,
    }).encode()  # fmt: skip


def test_platform() -> None:
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform() == Platform.parse("linux/amd64")
    assert Platform.parse("linux/arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})  # fmt: skip
    assert not Platform.parse("linux/arm64/v7").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})  # fmt: skip
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError):
            Platform.parse(bad)


def test_overlaybd_layers_and_image_config() -> None:
    m = parse_manifest(_manifest([
        _layer(D1, 100, **{A.BLOB_DIGEST: D1, A.BLOB_SIZE: "100", A.VERSION: "0.1.0",
                           A.BLOB_FS_TYPE: "ext4"}),
        _layer(D2, 200, **{A.BLOB_DIGEST: D2, A.BLOB_SIZE: "200", A.ACCELERATION_LAYER: "yes"}),
    ]))  # fmt: skip
    assert isinstance(m, Manifest) and m.media_type == A.MT_DOCKER_MANIFEST
    layers = overlaybd_layers(m)
    assert [(x.digest, x.size, x.fs_type, x.acceleration) for x in layers] == [
        (D1, 100, "ext4", False), (D2, 200, "", True)]  # fmt: skip
    cfg = image_config_from_manifest(
        m, repo_blob_url="http://r/v2/a/blobs", layer_dir=lambda x: f"/cache/{x.digest[7:15]}"
    )
    assert cfg == ImageConfig(
        repoBlobUrl="http://r/v2/a/blobs",
        lowers=(LayerConfig(dir="/cache/11111111", digest=D1, size=100),
                LayerConfig(dir="/cache/22222222", digest=D2, size=200)),
        accelerationLayer=True,
    )  # fmt: skip
    assert cfg.stacked_lowers == cfg.lowers[:1]
    # the config obd builds reads back through the project's own config parser
    doc = {"repoBlobUrl": cfg.repoBlobUrl, "lowers": [{"digest": D1, "size": 100}]}
    assert parse_image_config(doc, "/x/config.v1.json").lowers[0].digest == D1


def test_turbo_oci_layers_are_refused() -> None:
    m = parse_manifest(_manifest([_layer(D1, 1, **{A.BLOB_DIGEST: D1, A.BLOB_SIZE: "1",
                                                   A.TURBO_OCI_DIGEST: D2})]))  # fmt: skip
    assert isinstance(m, Manifest) and overlaybd_layers(m)[0].turbo_oci_target == D2
    with pytest.raises(UnsupportedError) as e:
        image_config_from_manifest(m, repo_blob_url="http://r/v2/a/blobs", source="r/a:1")
    assert "TurboOCI" in str(e.value) and str(e.value).startswith("r/a:1: ")


def test_not_an_overlaybd_image() -> None:
    m = parse_manifest(_manifest([{"mediaType": A.MT_OCI_LAYER_GZIP, "digest": D1, "size": 5}]))
    assert isinstance(m, Manifest)
    with pytest.raises(UnsupportedError) as e:
        overlaybd_layers(m, source="reg.io/app:v1")
    assert str(e.value) == f"reg.io/app:v1: {NOT_OVERLAYBD}" and e.value.exit_code == 6


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"mediaType": A.MT_OCI_MANIFEST, "layers": []}).encode(), "config is not an object"),
        (_manifest([{"mediaType": A.MT_OCI_LAYER, "digest": "sha256:xyz", "size": 1}]), "layers[0] has no valid digest"),
        (_manifest([{"mediaType": A.MT_OCI_LAYER, "digest": D1, "size": -1}]), "layers[0] has no valid size"),
        (json.dumps({"mediaType": A.MT_OCI_INDEX, "manifests": {}}).encode(), "no manifests list"),
    ],
)  # fmt: skip
def test_corrupt_manifests(data: bytes, words: str) -> None:
    with pytest.raises(CorruptError) as e:
        parse_manifest(data, source="reg.io/x:1")
    assert words in str(e.value) and str(e.value).startswith("reg.io/x:1: ")


def test_half_annotated_and_bad_annotations() -> None:
    good = {A.BLOB_DIGEST: D1, A.BLOB_SIZE: "100"}
    for layers, words in (
        ([_layer(D1, 1, **good), _layer(D2, 1)], "has no"),
        ([_layer(D1, 1, **{A.BLOB_DIGEST: "nope"})], "is not a digest"),
        ([_layer(D1, 1, **{A.BLOB_DIGEST: D1, A.BLOB_SIZE: "-3"})], "is not a size"),
        ([_layer(D1, 1, **good, **{A.ACCELERATION_LAYER: "yes"}), _layer(D2, 1, **good)], "acceleration"),
    ):  # fmt: skip
        m = parse_manifest(_manifest(layers))
        assert isinstance(m, Manifest)
        with pytest.raises(CorruptError) as e:
            overlaybd_layers(m)
        assert words in str(e.value)
    with pytest.raises(UnsupportedError):
        parse_manifest(json.dumps({"mediaType": "application/x-other", "x": 1}).encode())


# -- against the registry ------------------------------------------------------------------


def _files(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"l{i}"
        p.write_bytes(os.urandom(5000 + i))
        out.append(p)
    return out


def test_resolve_image_by_tag_and_digest(registry: Registry, tmp_path: Path) -> None:
    files = _files(tmp_path, 3)
    img = registry.push_overlaybd_image("ns/app", "v1", files)
    with RegistryClient(timeout=5) as c:
        got = resolve_image(c, img.ref)
        assert got.digest == img.digest and got.platform is None
        assert [(lc.digest, lc.size) for lc in got.config.lowers] == img.layers
        assert got.config.repoBlobUrl == registry.blob_url("ns/app")
        for lc, f in zip(got.config.lowers, files, strict=True):
            loc = BlobLocation.from_url(got.config.repoBlobUrl, lc.digest)
            assert c.read_range(loc, 0, lc.size) == f.read_bytes()
        by_digest = resolve_image(c, f"{registry.host}/ns/app@{img.digest}")
        assert by_digest.config == got.config
        d = describe(got)
        assert d["digest"] == img.digest and [x["digest"] for x in d["layers"]] == [x for x, _ in img.layers]  # fmt: skip
        json.dumps(d)


def test_resolve_image_from_an_index(registry: Registry, tmp_path: Path) -> None:
    amd = registry.push_overlaybd_image("ns/multi", "amd", _files(tmp_path, 1), media_type=A.MT_OCI_MANIFEST)  # fmt: skip
    (tmp_path / "arm").mkdir()
    arm = registry.push_overlaybd_image("ns/multi", "arm", _files(tmp_path / "arm", 2))
    registry.push_index("ns/multi", "v1", [
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (amd, {"os": "linux", "architecture": "amd64"}),
    ])  # fmt: skip
    with RegistryClient(timeout=5) as c:
        ref = f"{registry.host}/ns/multi:v1"
        a = resolve_image(c, ref)
        assert a.digest == amd.digest and str(a.platform) == "linux/amd64"
        assert len(a.config.lowers) == 1
        b = resolve_image(c, ref, platform="linux/arm64")
        assert b.digest == arm.digest and len(b.config.lowers) == 2
        with pytest.raises(UnsupportedError) as e:
            resolve_image(c, ref, platform="linux/s390x")
        assert "linux/amd64, linux/arm64/v8" in str(e.value)


def test_plain_image_is_refused_with_one_clear_error(registry: Registry, tmp_path: Path) -> None:
    img = registry.push_overlaybd_image("ns/plain", "v1", _files(tmp_path, 1), annotate=False)
    with RegistryClient(timeout=5) as c, pytest.raises(UnsupportedError) as e:
        resolve_image(c, img.ref)
    assert str(e.value) == f"{img.ref}: {NOT_OVERLAYBD}"


def test_digest_of_a_fetched_manifest_is_checked(registry: Registry, tmp_path: Path) -> None:
    img = registry.push_overlaybd_image("ns/app", "v1", _files(tmp_path, 1))
    with RegistryClient(timeout=5) as c:
        data, mt, digest = c.get_manifest(registry.host, "ns/app", img.digest)
        assert digest == img.digest == sha256_digest(data) and mt == img.media_type
        assert isinstance(parse_manifest(data, mt), Manifest)
        assert not isinstance(parse_manifest(data, mt), Index)
