"""``obd convert``: an OCI image into an overlaybd image, as containerd's
accelerated-container-image (ACI) converter makes it (docs/convert.md).

For each source layer, bottom up: a sparse writable layer is created (the virtual size
is ACI's 64 GiB unless asked otherwise), the layer tar is applied into its ext4 over the
layers converted below it (the first one makes the filesystem), and the writable layer
is committed as a tar-wrapped ZFile (``overlaybd-commit -z -t``), with ACI's uuids: the
layer's uuid is its chain ID's first 128 bits, its parent's that of the layer below.

The image written is ACI's: each layer descriptor has the plain layer media type
(``...layer.v1.tar`` or Docker's ``...rootfs.diff.tar``) and the annotations
``containerd.io/snapshot/overlaybd/{version,blob-digest,blob-size}``; the config is the
source's with ``rootfs.diff_ids`` the converted blobs' digests; the manifest is the
source's with config and layers replaced. OCI sources give OCI media types, Docker ones
Docker's (ACI's ``--oci`` switch).

Converted layers are kept in a :class:`~obd.oci.store.LayerStore` under their chain ID
and options, so a layer converted once (in any image) is not converted again. Blobs go
to the destination first, the config next and the manifest last: an interrupted convert
leaves no manifest naming a missing blob, and the next run takes what is done from the
store and the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

from obd.errors import CorruptError, UnsupportedError
from obd.io.file import AtomicOutput
from obd.oci import annotations as A
from obd.oci.layout import BlobSource, digest_hex, parse_json, verified_chunks
from obd.oci.manifest import Descriptor, Index, Manifest, Platform, parse_manifest
from obd.oci.store import LayerStore, StoredLayer

#: bump when the bytes a conversion makes change for the same input and options
FORMAT = 1
DEFAULT_VSIZE = 64 << 30

#: given a byte total (or None) and a label, a context giving a progress callback
Bars = Callable[[int | None, str], contextlib.AbstractContextManager[Callable[[int], None]]]
Log = Callable[[str], None]


@dataclass(frozen=True)
class ConvertOptions:
    algorithm: str | None = "lz4"  # None: no ZFile, a plain LSMT layer (still tar-wrapped)
    block_size: int = 4096
    vsize: int = DEFAULT_VSIZE
    flatten: bool = False
    threads: int | None = None  # ZFile compression threads (None: every core)


@dataclass(frozen=True)
class SourceImage:
    """A resolved source image: its manifest, config and layer descriptors."""

    source: BlobSource
    manifest: Manifest
    config: dict[str, Any]
    diff_ids: list[str]
    digest: str = ""

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers

    @property
    def oci(self) -> bool:
        return self.manifest.media_type == A.MT_OCI_MANIFEST


@dataclass(frozen=True)
class LayerResult:
    sources: tuple[int, ...]  # the source layers it holds (several with --flatten)
    digest: str
    size: int
    path: str
    reused: bool  # found in the store, not converted by this run
    chain_id: str


@dataclass
class ConvertResult:
    digest: str = ""
    size: int = 0
    media_type: str = ""
    manifest: bytes = b""
    config: bytes = b""
    layers: list[LayerResult] = field(default_factory=list)
    pushed: int = 0  # blobs written to the destination (the rest were there)


class Destination(Protocol):
    where: str

    def prepare(self) -> None: ...

    def has_blob(self, digest: str, size: int) -> bool: ...

    def put_file(self, path: str, digest: str, size: int, progress: Any = None) -> bool: ...

    def put_bytes(self, data: bytes, digest: str) -> None: ...

    def put_manifest(self, data: bytes, desc: Descriptor) -> None: ...

    def close(self) -> None: ...


# --- the source image ------------------------------------------------------------------


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI image-spec chain IDs: ChainID(L0) = DiffID(L0), ChainID(Ln) =
    sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def chain_uuid(chain_id: str) -> str:
    """ACI's layer uuid: the first 32 hex digits of the chain ID, as 8-4-4-4-12."""
    h = chain_id.split(":", 1)[1]
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


PLAIN_LAYER_TYPES = (
    A.MT_OCI_LAYER,
    A.MT_OCI_LAYER_GZIP,
    A.MT_OCI_LAYER_ZSTD,
    A.MT_DOCKER_LAYER,
    A.MT_DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


def load_image(
    source: BlobSource,
    desc: Descriptor,
    manifest: bytes | None = None,
    *,
    platform: str | None = None,
) -> SourceImage:
    """Read the manifest ``desc`` names (from an index, the entry for ``platform``,
    default linux/amd64), its config, and check they describe a plain OCI/Docker image."""
    where = source.where
    data = manifest if manifest is not None else source.blob_bytes(desc)
    doc = parse_manifest(data, desc.media_type, source=where)
    if isinstance(doc, Index):
        desc = doc.select(Platform.parse(platform) if platform else Platform())
        doc = parse_manifest(source.blob_bytes(desc), desc.media_type, source=where)
        if isinstance(doc, Index):
            raise UnsupportedError("an index inside an index", path=where)
    if not doc.layers:
        raise CorruptError("the manifest has no layers", path=where)
    for layer in doc.layers:
        if A.BLOB_DIGEST in layer.annotations:
            raise UnsupportedError(
                "the image is an overlaybd image already (its layers carry "
                f"{A.BLOB_DIGEST}); nothing to convert",
                path=where,
            )
        if layer.media_type not in PLAIN_LAYER_TYPES:
            raise UnsupportedError(
                f"layer {layer.digest} has media type {layer.media_type!r}", path=where
            )
        digest_hex(layer.digest, where)
    config = parse_json(source.blob_bytes(doc.config), where, f"config {doc.config.digest}")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(doc.layers):
        raise CorruptError(
            f"config {doc.config.digest}: rootfs.diff_ids does not list one digest per layer",
            path=where,
        )
    for d in diff_ids:
        digest_hex(d, where)
    return SourceImage(source, doc, config, list(diff_ids), desc.digest)


# --- converting layers -----------------------------------------------------------------


class ChunkReader(io.RawIOBase):
    """A readable binary stream over an iterator of chunks (counting what was read)."""

    def __init__(self, chunks: Iterator[bytes], progress: Callable[[int], None] | None) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
            if self._progress is not None:
                self._progress(len(nxt))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _no_bar(total: int | None, label: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(None)


def layer_key(chain_id: str, below: StoredLayer | None, opts: ConvertOptions) -> str:
    """The store key of the layer whose source chain ends at ``chain_id``, applied over
    the converted layer ``below`` (None: the bottom layer, which makes the filesystem).

    ``below`` is named by its converted blob's digest, not by its source: a layer's
    blocks are allocated in the filesystem the layers below left, and conversions are
    not byte-reproducible, so a layer converted over one conversion of its lowers is
    only right over that one."""
    return LayerStore.key(
        format=FORMAT,
        chain=chain_id,
        below=below.digest if below is not None else None,
        fs="ext4",
        vsize=opts.vsize,
        algorithm=opts.algorithm,
        block_size=opts.block_size if opts.algorithm else None,
    )


def _apply(
    img: SourceImage, i: int, config_path: str, mkfs: bool, bar: Callable[[int], None] | None
) -> None:
    from obd.oci.apply import apply_layer

    desc = img.layers[i]
    chunks = verified_chunks(img.source.blob_chunks(desc), desc.digest, desc.size, img.source.where)
    stream = cast(BinaryIO, ChunkReader(chunks, bar))
    apply_layer(stream, config_path, mkfs=mkfs, checksum=img.diff_ids[i])


def convert_layer(
    img: SourceImage,
    group: list[int],
    below: list[StoredLayer],
    store: LayerStore,
    key: str,
    chain: list[str],
    opts: ConvertOptions,
    bars: Bars,
) -> StoredLayer:
    """Apply the source layers ``group`` over ``below`` into a new writable layer and
    commit it into the store under ``key``."""
    from obd.image import ops

    n = len(img.layers)
    first, top = group[0], group[-1]
    with store.scratch() as d:
        data, index = os.path.join(d, "writable_data"), os.path.join(d, "writable_index")
        ops.create(data, index, opts.vsize, sparse=True)
        cfg_path = os.path.join(d, "config.v1.json")
        cfg = {
            "lowers": [{"file": layer.path} for layer in below],
            "upper": {"data": data, "index": index},
        }
        with AtomicOutput(cfg_path) as out:
            out.pwrite(0, _dumps(cfg))
        for i in group:
            label = f"layer {i + 1}/{n} apply"
            with bars(img.layers[i].size, label) as bar:
                _apply(img, i, cfg_path, mkfs=not below and i == first, bar=bar)
        zopts = (
            ops.ZFileOptions(
                algorithm=opts.algorithm,
                block_size=opts.block_size,
                threads=opts.threads,
                overwrite_header=True,
            )
            if opts.algorithm
            else None
        )
        with bars(None, f"layer {top + 1}/{n} commit") as bar:
            ops.commit(
                data,
                index,
                store.blob_path(key),
                uuid=chain_uuid(chain[top]),
                parent_uuid=chain_uuid(chain[first - 1]) if first else None,
                zfile=zopts,
                tar=True,
                force=True,
                progress=bar,
            )
    return store.record(key, chain_id=chain[top], layers=len(group))


# --- the image -------------------------------------------------------------------------


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def image_documents(
    img: SourceImage, layers: list[LayerResult], flatten: bool
) -> tuple[bytes, bytes, Descriptor]:
    """The converted image's config and manifest (bytes) and the manifest's descriptor."""
    oci = img.oci
    config = dict(img.config)
    config["rootfs"] = {**config["rootfs"], "diff_ids": [la.digest for la in layers]}
    if flatten and isinstance(config.get("history"), list):
        # every source step is now inside the one layer
        hist = [{**h, "empty_layer": True} if isinstance(h, dict) else h for h in config["history"]]
        hist.append(
            {
                **({"created": config["created"]} if "created" in config else {}),
                "created_by": "obd convert --flatten",
                "comment": f"{len(img.layers)} layers flattened into one",
            }
        )
        config["history"] = hist
    config_bytes = _dumps(config)
    layer_type = A.MT_OCI_LAYER if oci else A.MT_DOCKER_LAYER
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": A.MT_OCI_MANIFEST if oci else A.MT_DOCKER_MANIFEST,
        "config": {
            "mediaType": A.MT_OCI_CONFIG if oci else A.MT_DOCKER_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": layer_type,
                "digest": la.digest,
                "size": la.size,
                "annotations": {
                    A.BLOB_DIGEST: la.digest,
                    A.BLOB_SIZE: str(la.size),
                    A.VERSION: A.OVERLAYBD_VERSION,
                },
            }
            for la in layers
        ],
    }
    if img.manifest.annotations:
        manifest["annotations"] = img.manifest.annotations
    manifest_bytes = _dumps(manifest)
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    return (
        config_bytes,
        manifest_bytes,
        Descriptor(manifest["mediaType"], digest, len(manifest_bytes)),
    )


class _Uploads:
    """Blobs written to the destination by one background thread, in order, while the
    next layer converts (a registry upload takes about as long as a conversion). The
    thread is a daemon: an interrupted convert exits at once, leaving at most some blobs
    and never a manifest."""

    def __init__(self, dest: Destination, say: Log) -> None:
        self.dest = dest
        self.say = say
        self.queue: queue.Queue[tuple[str, str, int, str] | None] = queue.Queue()
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="obd-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue
            path, digest, size, label = job
            try:
                if self.dest.put_file(path, digest, size):
                    self.written += 1
                    self.say(f"{label}: {digest[:19]} written to {self.dest.where}")
                else:
                    self.say(f"{label}: {digest[:19]} already at {self.dest.where}")
            except BaseException as e:
                self.error = e

    def put(self, path: str, digest: str, size: int, label: str) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((path, digest, size, label))

    def finish(self) -> int:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.written


def convert(
    img: SourceImage,
    dest: Destination,
    store: LayerStore,
    opts: ConvertOptions,
    *,
    bars: Bars | None = None,
    log: Log | None = None,
) -> ConvertResult:
    """Convert ``img`` into ``dest``: each layer's blob is written as soon as it is
    converted (in the background), then the config, then the manifest."""
    bars = bars or _no_bar
    say = log or (lambda _msg: None)
    n = len(img.layers)
    chain = chain_ids(img.diff_ids)
    groups = [list(range(n))] if opts.flatten else [[i] for i in range(n)]
    result = ConvertResult()
    below: list[StoredLayer] = []
    dest.prepare()
    uploads = _Uploads(dest, say)
    try:
        for group in groups:
            first, top = group[0], group[-1]
            key = layer_key(chain[top], below[-1] if below else None, opts)
            with store.lock(key):
                hit = store.get(key)
                reused = hit is not None
                if hit is None:
                    hit = convert_layer(img, group, below, store, key, chain, opts, bars)
            below.append(hit)
            result.layers.append(
                LayerResult(tuple(group), hit.digest, hit.size, hit.path, reused, chain[top])
            )
            label = f"layers {first + 1}-{top + 1}" if len(group) > 1 else f"layer {top + 1}"
            say(
                f"{label}/{n} {img.diff_ids[top][:19]}: "
                + ("reused from the store" if reused else "converted")
                + f" -> {hit.digest[:19]} ({hit.size} bytes)"
            )
            uploads.put(hit.path, hit.digest, hit.size, f"{label}/{n}")
        result.pushed = uploads.finish()
    finally:
        store.wait_scratch()  # also after a failure: no scratch left behind
    config_bytes, manifest_bytes, desc = image_documents(img, result.layers, opts.flatten)
    dest.put_bytes(config_bytes, "sha256:" + hashlib.sha256(config_bytes).hexdigest())
    dest.put_manifest(manifest_bytes, desc)
    result.digest, result.size, result.media_type = desc.digest, desc.size, desc.media_type
    result.manifest, result.config = manifest_bytes, config_bytes
    return result


# --- sources and destinations by name ----------------------------------------------------


@contextlib.contextmanager
def open_source(
    text: str, *, plain_http: bool = False, platform: str | None = None
) -> Iterator[SourceImage]:
    """The image ``text`` names: ``oci:DIR[:TAG]``, ``docker-archive:FILE[:TAG]`` or a
    registry reference."""
    from obd.oci.layout import open_local, parse_local_ref

    local = parse_local_ref(text)
    if local is None:
        from obd.oci.remote import open_registry_image

        with open_registry_image(text, plain_http=plain_http, platform=platform) as img:
            yield img
        return
    src, selected = open_local(local)
    with src:
        yield load_image(src, selected.desc, selected.manifest, platform=platform)


def open_destination(
    text: str, *, plain_http: bool = False, store: LayerStore | None = None
) -> Destination:
    from obd.oci.layout import OciLayoutWriter, parse_local_ref

    local = parse_local_ref(text)
    if local is None:
        from obd.oci.remote import RegistryDestination

        return RegistryDestination(text, plain_http=plain_http, store=store)
    if local.kind != "oci":
        raise UnsupportedError(f"{text}: a destination is a registry reference or oci:DIR[:TAG]")
    return OciLayoutWriter(local.path, local.tag)


def write_image_config(path: str, dest: Destination, result: ConvertResult) -> None:
    """An image config (config.v1.json) of the converted layers as local files: the
    destination's blobs when it is an OCI layout, else the store's."""
    files = [
        getattr(dest, "blob_file", lambda _d: None)(la.digest) or la.path for la in result.layers
    ]
    doc = {"lowers": [{"file": os.path.abspath(f)} for f in files]}
    with AtomicOutput(path, force=True) as out:
        out.pwrite(0, json.dumps(doc, indent=2).encode() + b"\n")


def result_doc(result: ConvertResult) -> dict[str, Any]:
    return {
        "digest": result.digest,
        "size": result.size,
        "mediaType": result.media_type,
        "pushed": result.pushed,
        "layers": [
            {
                "sources": list(la.sources),
                "chainID": la.chain_id,
                "digest": la.digest,
                "size": la.size,
                "reused": la.reused,
                "file": la.path,
            }
            for la in result.layers
        ],
    }
