"""OCI images made by the tests from layer tars (tests/ext4_helpers.py ``layer_tar``
makes those, and has the model of the OCI rules to compare with): gzip/zstd-compressed
layers, configs and manifests, written as an OCI image layout (also a multi-platform
one), a ``docker save`` archive (legacy or with the OCI layout inside), or pushed to the
test registry (tests/registry_helpers.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obd.oci import annotations as A
from tests.registry_helpers import sha256_digest as sha256

# --- image containers -------------------------------------------------------------------


@dataclass
class BuiltImage:
    manifest: dict[str, Any]
    manifest_bytes: bytes
    config: dict[str, Any]
    config_bytes: bytes
    blobs: dict[str, bytes]  # digest -> bytes (layers, config, manifest)
    layer_tars: list[bytes]  # uncompressed

    @property
    def digest(self) -> str:
        return sha256(self.manifest_bytes)


def build_image(
    layer_tars: Sequence[bytes], *, gzip_layers: Sequence[bool | str] | bool = False,
    docker: bool = False, architecture: str = "amd64",
) -> BuiltImage:  # fmt: skip
    """An image of the uncompressed ``layer_tars`` (OCI media types; Docker's with
    ``docker``); a layer's entry in ``gzip_layers`` is False (plain tar), True (gzip) or
    ``"zstd"``."""
    layers = list(layer_tars)
    if isinstance(gzip_layers, bool):
        gzip_layers = [gzip_layers] * len(layers)
    blobs: dict[str, bytes] = {}
    descs, diff_ids, tars = [], [], []
    for tar, gz in zip(layers, gzip_layers, strict=True):
        tars.append(tar)
        diff_ids.append(sha256(tar))
        if gz == "zstd":
            import zstandard

            blob, mt = zstandard.ZstdCompressor().compress(tar), A.MT_OCI_LAYER_ZSTD
        elif gz:
            blob = gzip.compress(tar, mtime=0)
            mt = A.MT_DOCKER_LAYER_GZIP if docker else A.MT_OCI_LAYER_GZIP
        else:
            blob, mt = tar, A.MT_DOCKER_LAYER if docker else A.MT_OCI_LAYER
        blobs[sha256(blob)] = blob
        descs.append({"mediaType": mt, "digest": sha256(blob), "size": len(blob)})
    config = {
        "architecture": architecture,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_bytes = json.dumps(config).encode()
    blobs[sha256(config_bytes)] = config_bytes
    manifest = {
        "schemaVersion": 2,
        "mediaType": A.MT_DOCKER_MANIFEST if docker else A.MT_OCI_MANIFEST,
        "config": {
            "mediaType": A.MT_DOCKER_CONFIG if docker else A.MT_OCI_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": descs,
    }
    manifest_bytes = json.dumps(manifest).encode()
    blobs[sha256(manifest_bytes)] = manifest_bytes
    return BuiltImage(manifest, manifest_bytes, config, config_bytes, blobs, tars)


def write_oci_layout(img: BuiltImage, folder: Path, tag: str | None = "latest") -> Path:
    (folder / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (folder / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for digest, data in img.blobs.items():
        (folder / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    entry: dict[str, Any] = {
        "mediaType": img.manifest["mediaType"],
        "digest": img.digest,
        "size": len(img.manifest_bytes),
    }
    if tag:
        entry["annotations"] = {A.REF_NAME: tag}
    index = {"schemaVersion": 2, "mediaType": A.MT_OCI_INDEX, "manifests": [entry]}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def write_multi_platform_layout(images: dict[str, BuiltImage], folder: Path, tag: str) -> Path:
    """An OCI layout whose ``tag`` names an image index over ``images`` (platform
    ``linux/<arch>`` -> image)."""
    write_oci_layout(next(iter(images.values())), folder, tag=None)
    for img in images.values():
        for digest, data in img.blobs.items():
            (folder / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    index = json.dumps({
        "schemaVersion": 2, "mediaType": A.MT_OCI_INDEX,
        "manifests": [{"mediaType": img.manifest["mediaType"], "digest": img.digest,
                       "size": len(img.manifest_bytes),
                       "platform": {"os": "linux", "architecture": arch}}
                      for arch, img in images.items()],
    }).encode()  # fmt: skip
    (folder / "blobs" / "sha256" / sha256(index).split(":")[1]).write_bytes(index)
    top = {"schemaVersion": 2, "mediaType": A.MT_OCI_INDEX, "manifests": [
        {"mediaType": A.MT_OCI_INDEX, "digest": sha256(index), "size": len(index),
         "annotations": {A.REF_NAME: tag}}]}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(top))
    return folder


def write_docker_archive(img: BuiltImage, path: Path, *, oci: bool = False, tag: str = "demo:latest") -> Path:  # fmt: skip
    """A ``docker save`` archive of ``img`` (uncompressed layers): legacy
    (``<id>/layer.tar``, ``<id>.json``) or, with ``oci``, docker 25's form (an OCI layout
    plus ``manifest.json`` naming ``blobs/sha256/...``)."""
    files: dict[str, bytes] = {}
    cfg_hex = sha256(img.config_bytes).split(":")[1]
    if oci:
        for digest, data in img.blobs.items():
            files[f"blobs/sha256/{digest.split(':')[1]}"] = data
        layer_names = [f"blobs/sha256/{d['digest'].split(':')[1]}" for d in img.manifest["layers"]]
        cfg_name = f"blobs/sha256/{cfg_hex}"
        files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
        files["index.json"] = json.dumps({
            "schemaVersion": 2, "mediaType": A.MT_OCI_INDEX,
            "manifests": [{"mediaType": img.manifest["mediaType"], "digest": img.digest,
                           "size": len(img.manifest_bytes),
                           "annotations": {A.REF_NAME: tag.rsplit(":", 1)[-1],
                                           "io.containerd.image.name": tag}}],
        }).encode()  # fmt: skip
    else:
        layer_names = []
        for i, tar in enumerate(img.layer_tars):
            lid = hashlib.sha256(f"{i}".encode() + tar).hexdigest()
            files[f"{lid}/layer.tar"] = tar
            files[f"{lid}/VERSION"] = b"1.0"
            layer_names.append(f"{lid}/layer.tar")
        cfg_name = f"{cfg_hex}.json"
        files[cfg_name] = img.config_bytes
    files["manifest.json"] = json.dumps(
        [{"Config": cfg_name, "RepoTags": [tag], "Layers": layer_names}]
    ).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def push_image(reg: Any, repo: str, tag: str, img: BuiltImage) -> str:
    """Push ``img`` to the test registry (tests/registry_helpers.py); its manifest digest."""
    for digest, data in img.blobs.items():
        if digest != img.digest:
            reg.push_blob(repo, data)
    return str(reg.push_manifest(repo, tag, img.manifest_bytes, img.manifest["mediaType"]))
