"""OCI images made by the tests: layer tars built with ``tarfile`` from a small entry
language, written as an OCI image layout, a ``docker save`` archive (legacy or with the
OCI layout inside) or pushed to a registry; a model of the OCI layer rules over a plain
dict; and reading an ext4 tree back (``debugfs rdump``) to compare with it.

Entries (one layer is a list of them, applied in order):

- ``("file", path, data[, mode])``, ``("dir", path[, mode])``, ``("symlink", path, target)``,
- ``("hardlink", path, target)`` (target: a path in this or a lower layer),
- ``("whiteout", path)`` (``.wh.NAME``), ``("opaque", dir)`` (``dir/.wh..wh..opq``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obd.oci import annotations as A

Entry = tuple[Any, ...]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """An uncompressed OCI layer tar of ``entries`` (parent folders are not added)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind, path = e[0], e[1].strip("/")
            ti = tarfile.TarInfo(path)
            ti.mtime = 1_700_000_000
            ti.uname = ti.gname = "root"
            if kind == "file":
                data = e[2]
                ti.size = len(data)
                ti.mode = e[3] if len(e) > 3 else 0o644
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = e[2] if len(e) > 2 else 0o755
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e[2], 0o777
            elif kind == "hardlink":
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, e[2].strip("/"), 0o644
            elif kind == "whiteout":
                d, _, name = path.rpartition("/")
                ti.name = (d + "/" if d else "") + ".wh." + name
            elif kind == "opaque":
                ti.name = path + "/.wh..wh..opq"
            else:
                raise ValueError(kind)
            tf.addfile(ti)
    return buf.getvalue()


# --- the model: the OCI layer rules over a dict ------------------------------------------


@dataclass
class Node:
    kind: str  # file, dir, symlink
    data: bytes = b""  # file content or symlink target
    mode: int = 0o644


def _parents(tree: dict[str, Node], path: str) -> None:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        if p not in tree or tree[p].kind != "dir":
            tree[p] = Node("dir", mode=0o755)


def _remove(tree: dict[str, Node], path: str) -> None:
    for p in [p for p in tree if p == path or p.startswith(path + "/")]:
        del tree[p]


def model(layers: Sequence[Sequence[Entry]]) -> dict[str, Node]:
    """The tree the OCI rules make of ``layers`` (paths without a leading ``/``)."""
    tree: dict[str, Node] = {}
    for entries in layers:
        lower = dict(tree)
        for e in entries:
            kind, path = e[0], e[1].strip("/")
            if kind == "whiteout":
                _remove(tree, path)
                continue
            if kind == "opaque":
                # hide what the lower layers had below ``path``, keep this layer's
                for p in [p for p in tree if p.startswith(path + "/") and p in lower]:
                    if tree[p] is lower[p]:
                        del tree[p]
                continue
            _parents(tree, path)
            old = tree.get(path)
            if kind == "dir":
                if old is not None and old.kind != "dir":
                    _remove(tree, path)
                # a new node even over a lower folder: this layer's (an opaque marker keeps it)
                tree[path] = Node("dir", mode=e[2] if len(e) > 2 else 0o755)
                continue
            if old is not None:
                _remove(tree, path)
            if kind == "file":
                tree[path] = Node("file", e[2], e[3] if len(e) > 3 else 0o644)
            elif kind == "symlink":
                tree[path] = Node("symlink", e[2].encode(), 0o777)
            elif kind == "hardlink":
                t = tree[e[2].strip("/")]
                tree[path] = Node(t.kind, t.data, t.mode)
    return tree


def read_tree(root: Path) -> dict[str, Node]:
    """The tree under a folder (``lost+found`` left out), as the model shapes it."""
    out: dict[str, Node] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel == "lost+found" or rel.startswith("lost+found/"):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Node("symlink", os.readlink(full).encode(), 0o777)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Node("dir", mode=stat.S_IMODE(st.st_mode))
            else:
                out[rel] = Node("file", Path(full).read_bytes(), stat.S_IMODE(st.st_mode))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def ext4_tree(raw: Path, into: Path) -> dict[str, Node]:
    """Dump the ext4 filesystem in the raw disk ``raw`` with ``debugfs rdump``."""
    into.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["debugfs", "-R", f"rdump / {into}", str(raw)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return read_tree(into)


def assert_same_tree(got: dict[str, Node], want: dict[str, Node], *, modes: bool = True) -> None:
    assert sorted(got) == sorted(want), (
        f"only in image: {sorted(set(got) - set(want))}; "
        f"only in model: {sorted(set(want) - set(got))}"
    )
    for p in sorted(want):
        g, w = got[p], want[p]
        assert g.kind == w.kind, (p, g.kind, w.kind)
        if w.kind != "dir":
            assert g.data == w.data, p
        if modes and w.kind != "symlink":
            assert g.mode == w.mode, (p, oct(g.mode), oct(w.mode))


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
    layers: Sequence[Sequence[Entry]], *, gzip_layers: Sequence[bool | str] | bool = False,
    docker: bool = False, architecture: str = "amd64",
) -> BuiltImage:  # fmt: skip
    """An image of ``layers`` (OCI media types; Docker's with ``docker``); a layer's entry
    in ``gzip_layers`` is False (plain tar), True (gzip) or ``"zstd"``."""
    if isinstance(gzip_layers, bool):
        gzip_layers = [gzip_layers] * len(layers)
    blobs: dict[str, bytes] = {}
    descs, diff_ids, tars = [], [], []
    for entries, gz in zip(layers, gzip_layers, strict=True):
        tar = layer_tar(entries)
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


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
