"""OCI / Docker manifests and indexes, and the image config obd builds from an overlaybd
image's manifest.

An overlaybd image, as containerd's accelerated-container-image (ACI) converter writes
it, is an ordinary manifest whose layer descriptors carry the annotations of
:mod:`obd.oci.annotations`: ``blob-digest`` and ``blob-size`` name the overlaybd blob of
each layer (bottom first), ``acceleration-layer: yes`` marks a trailing trace layer. From
them :func:`image_config_from_manifest` builds the image config (§6.1) that upstream's
snapshotter would write: ``repoBlobUrl`` plus one lower per layer with ``digest`` and
``size``, so no containerd is needed to serve the image.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from obd.errors import CorruptError, UnsupportedError, UsageError
from obd.image.config import DownloadConfig, ImageConfig, LayerConfig
from obd.oci import annotations as A
from obd.oci.reference import Reference
from obd.registry.url import is_digest, repo_blob_url

NOT_OVERLAYBD = "not an overlaybd image; convert it with obd convert"


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``, e.g. ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"platform {text!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, p: Any) -> bool:
        if not isinstance(p, dict):
            return False
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return not self.variant or p.get("variant", "") == self.variant


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def parse(cls, d: Any, where: str) -> Descriptor:
        if not isinstance(d, dict):
            raise CorruptError(f"{where} is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not is_digest(digest):
            raise CorruptError(f"{where} has no valid digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptError(f"{where} has no valid size")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
            raise CorruptError(f"{where}: annotations are not strings")
        plat = d.get("platform")
        return cls(
            str(d.get("mediaType", "")),
            digest,
            size,
            dict(ann),
            plat if isinstance(plat, dict) else None,
        )


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, platform: Platform) -> Descriptor:
        """The first manifest for ``platform``; a :class:`UnsupportedError` listing the
        platforms there are otherwise."""
        for d in self.manifests:
            if platform.matches(d.platform):
                return d
        have = sorted(
            {
                str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant", "")))
                for d in self.manifests
                if (p := d.platform) is not None
            }
        )
        raise UnsupportedError(
            f"no manifest for platform {platform} (the index has: {', '.join(have) or 'none'})"
        )


def parse_manifest(data: bytes, media_type: str = "", *, source: str = "") -> Manifest | Index:
    """A manifest or an index from its bytes. ``media_type`` is the registry's
    Content-Type (the document's own ``mediaType`` wins when present). A
    :class:`CorruptError` naming ``source`` when the bytes are not one."""
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptError("manifest is not valid JSON", path=source or None) from None
    if not isinstance(doc, dict):
        raise CorruptError("manifest is not a JSON object", path=source or None)
    mt = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else media_type
    try:
        if mt in A.INDEX_TYPES or (not mt and "manifests" in doc):
            items = doc.get("manifests")
            if not isinstance(items, list):
                raise CorruptError("index has no manifests list")
            return Index(
                mt or A.MT_OCI_INDEX,
                tuple(Descriptor.parse(d, f"manifests[{i}]") for i, d in enumerate(items)),
            )
        if mt in A.MANIFEST_TYPES or (not mt and "layers" in doc):
            layers = doc.get("layers")
            if not isinstance(layers, list):
                raise CorruptError("manifest has no layers list")
            ann = doc.get("annotations") or {}
            return Manifest(
                mt or A.MT_OCI_MANIFEST,
                Descriptor.parse(doc.get("config"), "config"),
                tuple(Descriptor.parse(d, f"layers[{i}]") for i, d in enumerate(layers)),
                dict(ann) if isinstance(ann, dict) else {},
            )
    except CorruptError as e:
        raise CorruptError(e.message, path=source or None) from None
    raise UnsupportedError(
        f"unsupported manifest media type {mt or '(none)'!r}", path=source or None
    )


@dataclass(frozen=True)
class OverlaybdLayer:
    """One layer of an overlaybd image: the overlaybd blob's digest and size."""

    digest: str
    size: int
    media_type: str
    fs_type: str = ""
    acceleration: bool = False
    turbo_oci_target: str = ""


def overlaybd_layers(manifest: Manifest, *, source: str = "") -> list[OverlaybdLayer]:
    """The overlaybd layers of ``manifest``, bottom first, from ACI's annotations; an
    :class:`UnsupportedError` ("not an overlaybd image; convert it with obd convert")
    when no layer carries them, a :class:`CorruptError` for a half-annotated image."""
    annotated = [A.BLOB_DIGEST in d.annotations for d in manifest.layers]
    if not manifest.layers or not any(annotated):
        raise UnsupportedError(NOT_OVERLAYBD, path=source or None)
    out = []
    for i, d in enumerate(manifest.layers):
        ann = d.annotations
        if not annotated[i]:
            raise CorruptError(
                f"layer {i} ({d.digest}) has no {A.BLOB_DIGEST} annotation while others have",
                path=source or None,
            )
        digest = ann[A.BLOB_DIGEST]
        if not is_digest(digest):
            raise CorruptError(
                f"layer {i}: {A.BLOB_DIGEST} {digest!r} is not a digest", path=source or None
            )
        size_text = ann.get(A.BLOB_SIZE)
        if size_text is None:
            size = d.size if digest == d.digest else 0
        elif size_text.isdigit():
            size = int(size_text)
        else:
            raise CorruptError(
                f"layer {i}: {A.BLOB_SIZE} {size_text!r} is not a size", path=source or None
            )
        out.append(
            OverlaybdLayer(
                digest,
                size,
                d.media_type,
                ann.get(A.BLOB_FS_TYPE, ""),
                ann.get(A.ACCELERATION_LAYER, "").lower() == "yes",
                ann.get(A.TURBO_OCI_DIGEST, ""),
            )
        )
    if any(layer.acceleration for layer in out[:-1]):
        raise CorruptError("an acceleration layer that is not the last layer", path=source or None)
    return out


def image_config_from_manifest(
    manifest: Manifest,
    *,
    repo_blob_url: str,
    source: str = "",
    layer_dir: Callable[[OverlaybdLayer], str] | None = None,
    result_file: str = "",
    download: DownloadConfig | None = None,
    record_trace_path: str = "",
) -> ImageConfig:
    """The image config (§6.1) that serves ``manifest``'s overlaybd layers from
    ``repo_blob_url``: one lower per layer with ``digest`` and ``size`` (``dir`` from
    ``layer_dir`` when given, the background download target), ``accelerationLayer`` set
    when the last layer is ACI's acceleration (trace) layer."""
    layers = overlaybd_layers(manifest, source=source)
    for i, layer in enumerate(layers):
        if layer.turbo_oci_target:
            # its blob is a TurboOCI fsmeta over the original tar (targetDigest): read alone
            # it would give wrong bytes, and obd has no TurboOCI reader
            raise UnsupportedError(
                f"layer {i} is a TurboOCI layer (target {layer.turbo_oci_target}); "
                "obd does not serve TurboOCI images",
                path=source or None,
            )
    lowers = tuple(
        LayerConfig(
            dir=layer_dir(layer) if layer_dir else "",
            digest=layer.digest,
            size=layer.size,
        )
        for layer in layers
    )
    return ImageConfig(
        repoBlobUrl=repo_blob_url,
        lowers=lowers,
        resultFile=result_file,
        download=download,
        accelerationLayer=layers[-1].acceleration,
        recordTracePath=record_trace_path,
    )


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference as fetched: the manifest (after picking a platform from an
    index), its digest, its overlaybd layers and the image config that serves them."""

    ref: Reference
    digest: str
    media_type: str
    manifest: Manifest
    layers: tuple[OverlaybdLayer, ...]
    config: ImageConfig
    platform: Platform | None = None  # when picked from an index


class ManifestClient(Protocol):
    """What :func:`resolve_image` needs of a registry client;
    :class:`~obd.registry.client.RegistryClient` has it."""

    def get_manifest(self, host: str, repo: str, reference: str) -> tuple[bytes, str, str]: ...

    def scheme(self, host: str) -> str: ...


def resolve_image(
    client: ManifestClient,
    ref: Reference | str,
    *,
    platform: Platform | str | None = None,
    layer_dir: Callable[[OverlaybdLayer], str] | None = None,
    result_file: str = "",
    download: DownloadConfig | None = None,
) -> ResolvedImage:
    """Fetch ``ref``'s manifest through ``client`` (a RegistryClient), pick ``platform``
    (default linux/amd64) from an index, and build its image config."""
    if isinstance(ref, str):
        ref = Reference.parse(ref)
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    data, mt, digest = client.get_manifest(ref.host, ref.repo, ref.reference)
    doc = parse_manifest(data, mt, source=str(ref))
    picked: Platform | None = None
    if isinstance(doc, Index):
        picked = platform or Platform()
        desc = doc.select(picked)
        data, mt, digest = client.get_manifest(ref.host, ref.repo, desc.digest)
        doc = parse_manifest(data, mt, source=f"{ref.name}@{desc.digest}")
        if isinstance(doc, Index):
            raise UnsupportedError("an index inside an index", path=str(ref))
    blobs = repo_blob_url(client.scheme(ref.host), ref.host, ref.repo)
    config = image_config_from_manifest(
        doc,
        repo_blob_url=blobs,
        source=str(ref),
        layer_dir=layer_dir,
        result_file=result_file,
        download=download,
    )
    layers = overlaybd_layers(doc, source=str(ref))
    return ResolvedImage(ref, digest, mt, doc, tuple(layers), config, picked)


def describe(image: ResolvedImage) -> dict[str, Any]:
    """The JSON shape ``obd inspect REF --json`` lists: reference, digest, platform,
    repoBlobUrl and the layers (digest, size, fsType, acceleration)."""
    return {
        "reference": str(image.ref),
        "digest": image.digest,
        "mediaType": image.media_type,
        "platform": str(image.platform) if image.platform else None,
        "repoBlobUrl": image.config.repoBlobUrl,
        "layers": [
            {
                "digest": layer.digest,
                "size": layer.size,
                "fsType": layer.fs_type,
                "acceleration": layer.acceleration,
            }
            for layer in image.layers
        ],
    }
