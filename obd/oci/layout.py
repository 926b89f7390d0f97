"""Images on disk: OCI image layouts (``oci:DIR[:TAG]``) and ``docker save`` archives
(``docker-archive:FILE[:TAG]``), read as blob sources; OCI layouts also written as a
destination.

A source gives small blobs (manifests, configs) whole, checked against their digest and
size, and layers as a stream of chunks (:func:`verified_chunks` checks those at the end):
a layer is never held in memory. A docker archive is read in place: each member is a
byte range of the archive (it must be an uncompressed tar, as ``docker save`` writes it).

An OCI layout destination gets its blobs first and ``index.json`` last (each file written
to a temporary name, fsynced and renamed), so an interrupted write leaves the old index,
never one naming a missing blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from obd.errors import CorruptError, FileAccessError, UsageError
from obd.io.file import AtomicOutput, LocalFile, open_file
from obd.oci import annotations as A
from obd.oci.manifest import Descriptor
from obd.registry.url import SHA256_RE, sha256_digest

CHUNK = 1 << 20
# small JSON blobs (manifests, configs, index.json) are read whole; anything larger is refused
MAX_JSON = 16 << 20


def digest_hex(digest: Any, where: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` digest (anything else is corrupt input)."""
    if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
        raise CorruptError(f"bad digest {digest!r} (expected sha256:<64 hex digits>)", path=where)
    return digest[len("sha256:") :]


def parse_json(data: bytes, where: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptError(f"{what} is not JSON: {e}", path=where) from None
    if not isinstance(doc, dict):
        raise CorruptError(f"{what} is not a JSON object", path=where)
    return doc


def check_blob(data: bytes, desc: Descriptor, where: str) -> bytes:
    """``data`` if it has the descriptor's size and digest, else a :class:`CorruptError`."""
    if len(data) != desc.size:
        raise CorruptError(
            f"blob {desc.digest} is {len(data)} bytes, the descriptor says {desc.size}",
            path=where,
        )
    got = sha256_digest(data)
    if got != desc.digest:
        raise CorruptError(f"blob {desc.digest} has digest {got}", path=where)
    return data


def verified_chunks(
    chunks: Iterator[bytes], digest: str | None, size: int | None, where: str
) -> Iterator[bytes]:
    """Pass ``chunks`` through, raising :class:`CorruptError` when the stream turns out
    longer or shorter than ``size`` or its SHA-256 is not ``digest`` (None: not checked).
    The check of the digest comes at the end, before the last chunk is handed over, so a
    consumer never sees the whole of a wrong stream."""
    h = hashlib.sha256()
    n = 0
    pending: bytes | None = None
    for c in chunks:
        if not c:
            continue
        n += len(c)
        if size is not None and n > size:
            raise CorruptError(f"blob {digest} is longer than its {size} bytes", path=where)
        h.update(c)
        if pending is not None:
            yield pending
        pending = c
    if size is not None and n != size:
        raise CorruptError(f"blob {digest} ends after {n} of its {size} bytes", path=where)
    if digest is not None and "sha256:" + h.hexdigest() != digest:
        raise CorruptError(f"blob {digest} has digest sha256:{h.hexdigest()}", path=where)
    if pending is not None:
        yield pending


class BlobSource(Protocol):
    """Where an image's blobs come from (an OCI layout, a docker archive, a registry)."""

    #: the name used in messages (``oci:DIR``, a URL...)
    where: str

    def blob_bytes(self, desc: Descriptor) -> bytes:
        """A small blob, whole, checked against the descriptor."""
        ...

    def blob_chunks(self, desc: Descriptor) -> Iterator[bytes]:
        """A blob as a stream of chunks (checked by the caller: :func:`verified_chunks`)."""
        ...


@dataclass(frozen=True)
class LocalRef:
    """``oci:DIR[:TAG]`` or ``docker-archive:FILE[:TAG]``."""

    kind: str  # "oci" or "docker-archive"
    path: str
    tag: str | None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_local_ref(text: str) -> LocalRef | None:
    """``oci:DIR[:TAG]`` / ``docker-archive:FILE[:TAG]``, or None for anything else (a
    registry reference). The tag is what follows the last ``:`` when it holds no ``/``."""
    for kind in ("oci", "docker-archive"):
        if text.startswith(kind + ":"):
            rest = text[len(kind) + 1 :]
            head, sep, tail = rest.rpartition(":")
            if sep and head and tail and "/" not in tail:
                path, tag = head, tail
            else:
                path, tag = rest, None
            if not path:
                raise UsageError(f"{text}: no path after {kind}:")
            return LocalRef(kind, path, tag)
    return None


# --- reading -----------------------------------------------------------------------------


class _RangeSource:
    """Blobs that are byte ranges of local files."""

    where = ""

    def _locate(self, desc: Descriptor) -> tuple[LocalFile, int, int]:
        raise NotImplementedError

    def blob_bytes(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_JSON:
            raise CorruptError(f"blob {desc.digest} is too large to be JSON", path=self.where)
        f, off, size = self._locate(desc)
        return check_blob(f.pread(off, min(size, desc.size + 1)), desc, self.where)

    def blob_chunks(self, desc: Descriptor) -> Iterator[bytes]:
        f, off, size = self._locate(desc)
        pos = 0
        while pos < size:
            data = f.pread(off + pos, min(CHUNK, size - pos))
            if not data:
                raise CorruptError(
                    f"blob {desc.digest} ends after {pos} of {size} bytes", path=self.where
                )
            yield data
            pos += len(data)

    def close(self) -> None:
        pass

    def __enter__(self) -> _RangeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OciLayoutSource(_RangeSource):
    """An OCI image layout directory: ``oci-layout``, ``index.json``, ``blobs/sha256/``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"oci:{path}"
        if not os.path.isdir(path):
            raise FileAccessError("no such OCI layout folder", path=path)
        self._open: dict[str, LocalFile] = {}

    def index(self) -> dict[str, Any]:
        p = os.path.join(self.path, "index.json")
        if not os.path.exists(p):
            raise CorruptError("not an OCI image layout (no index.json)", path=self.path)
        with open_file(p) as f:
            if f.size() > MAX_JSON:
                raise CorruptError("index.json is too large", path=p)
            return parse_json(f.pread(0, f.size()), p, "index.json")

    def _locate(self, desc: Descriptor) -> tuple[LocalFile, int, int]:
        hexd = digest_hex(desc.digest, self.where)
        f = self._open.get(hexd)
        if f is None:
            p = os.path.join(self.path, "blobs", "sha256", hexd)
            try:
                f = open_file(p)
            except FileAccessError as e:
                raise FileAccessError(f"missing blob of the layout ({e.message})", path=p) from None
            self._open[hexd] = f
        return f, 0, f.size()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class DockerArchiveSource(_RangeSource):
    """A ``docker save`` archive read in place. Holds ``manifest.json`` (every docker
    version) and, from docker 25 on, an OCI layout (``index.json``, ``blobs/sha256/``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"docker-archive:{path}"
        self.file = open_file(path)
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
                for m in tf:
                    if m.isreg():
                        self.members[os.path.normpath(m.name)] = (m.offset_data, m.size)
        except tarfile.ReadError as e:
            self.file.close()
            raise CorruptError(
                f"not a docker archive (an uncompressed tar): {e}", path=path
            ) from None
        except BaseException:
            self.file.close()
            raise
        self._by_digest: dict[str, tuple[int, int]] = {}

    def member(self, name: str) -> bytes:
        loc = self.members.get(os.path.normpath(name))
        if loc is None:
            raise CorruptError(f"no member {name!r} in the archive", path=self.path)
        if loc[1] > MAX_JSON:
            raise CorruptError(f"member {name!r} is too large to be JSON", path=self.path)
        return self.file.pread(loc[0], loc[1])

    def has_member(self, name: str) -> bool:
        return os.path.normpath(name) in self.members

    def member_digest(self, name: str) -> str:
        off, size = self.members[os.path.normpath(name)]
        h = hashlib.sha256()
        for pos in range(0, size, CHUNK):
            h.update(self.file.pread(off + pos, min(CHUNK, size - pos)))
        return "sha256:" + h.hexdigest()

    def add_blob(self, digest: str, member: str) -> None:
        """Make ``digest`` name the bytes of ``member`` (legacy archives name files by path)."""
        loc = self.members.get(os.path.normpath(member))
        if loc is None:
            raise CorruptError(f"no member {member!r} in the archive", path=self.path)
        self._by_digest[digest] = loc

    def _locate(self, desc: Descriptor) -> tuple[LocalFile, int, int]:
        digest = desc.digest
        loc = self._by_digest.get(digest)
        if loc is None:
            hexd = digest_hex(digest, self.where)
            loc = self.members.get(f"blobs/sha256/{hexd}")
        if loc is None:
            raise FileAccessError(f"missing blob {digest} in the archive", path=self.path)
        return self.file, loc[0], loc[1]

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Selected:
    """What a local reference names: a manifest (or index) descriptor, or for a legacy
    docker archive the manifest itself (made up from ``manifest.json``)."""

    desc: Descriptor
    manifest: bytes | None = None


def descriptors(items: Any, where: str, what: str) -> list[Descriptor]:
    """The descriptors of a JSON list (a :class:`CorruptError` naming ``where``)."""
    if not isinstance(items, list):
        raise CorruptError(f"{what} is not a list", path=where)
    try:
        return [Descriptor.parse(d, f"{what}[{i}]") for i, d in enumerate(items)]
    except CorruptError as e:
        raise CorruptError(e.message, path=where) from None


def select_in_index(index: dict[str, Any], tag: str | None, where: str) -> Descriptor:
    """The entry of an OCI layout's ``index.json`` that ``tag`` names (its ref-name
    annotation, or docker's full image name); without a tag, the only entry."""
    entries = descriptors(index.get("manifests"), where, "index.json manifests")
    if tag is None:
        if len(entries) != 1:
            names = sorted({e.annotations.get(A.REF_NAME, e.digest) for e in entries})
            raise UsageError(
                f"{where} holds {len(entries)} images; name one with :TAG ({', '.join(names)})"
            )
        return entries[0]
    for e in entries:
        if tag in (e.annotations.get(A.REF_NAME), e.annotations.get("io.containerd.image.name")):
            return e
    raise UsageError(f"{where} has no image tagged {tag!r}")


def docker_manifest(src: DockerArchiveSource, tag: str | None) -> Selected:
    """The image of a docker archive: from its OCI ``index.json`` when there is one,
    else a Docker schema-2 manifest made from the legacy ``manifest.json``."""
    if src.has_member("index.json") and not src.has_member("manifest.json"):
        index = parse_json(src.member("index.json"), src.where, "index.json")
        return Selected(select_in_index(index, tag, src.where))
    if not src.has_member("manifest.json"):
        raise CorruptError("not a docker archive (no manifest.json)", path=src.path)
    try:
        doc = json.loads(src.member("manifest.json"))
    except ValueError as e:
        raise CorruptError(f"manifest.json is not JSON: {e}", path=src.path) from None
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise CorruptError("manifest.json is not a list of images", path=src.path)
    if tag is None:
        if len(doc) != 1:
            raise UsageError(f"{src.where} holds {len(doc)} images; name one with :TAG")
        entry = doc[0]
    else:
        found = [
            d
            for d in doc
            if any(t == tag or t.rsplit(":", 1)[-1] == tag for t in d.get("RepoTags") or [])
        ]
        if not found:
            raise UsageError(f"{src.where} has no image tagged {tag!r}")
        entry = found[0]
    cfg_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(cfg_name, str) or not isinstance(layer_names, list):
        raise CorruptError("manifest.json entry lacks Config or Layers", path=src.path)
    cfg = src.member(cfg_name)
    cfg_digest = sha256_digest(cfg)
    cfg_desc = {"mediaType": A.MT_DOCKER_CONFIG, "digest": cfg_digest, "size": len(cfg)}
    src.add_blob(cfg_digest, cfg_name)
    rootfs = parse_json(cfg, src.where, cfg_name).get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
        raise CorruptError(f"{cfg_name}: rootfs.diff_ids does not match the layers", path=src.path)
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str):
            raise CorruptError("manifest.json names a layer by a non-string", path=src.path)
        m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", os.path.normpath(name))
        digest = f"sha256:{m.group(1)}" if m else ""
        size = src.members.get(os.path.normpath(name), (0, -1))[1]
        if size < 0:
            raise CorruptError(f"no member {name!r} in the archive", path=src.path)
        head = src.file.pread(src.members[os.path.normpath(name)][0], 4)
        compressed = head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd"
        if not digest:
            # a legacy layer.tar is the uncompressed layer (its digest is its diff_id); a
            # compressed one (rare) is hashed here, streamed
            digest = diff_id if not compressed else src.member_digest(name)
        src.add_blob(digest, name)
        layers.append(
            {
                "mediaType": A.MT_DOCKER_LAYER_GZIP if compressed else A.MT_DOCKER_LAYER,
                "digest": digest,
                "size": size,
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": A.MT_DOCKER_MANIFEST,
        "config": cfg_desc,
        "layers": layers,
    }
    data = json.dumps(manifest).encode()
    digest = sha256_digest(data)
    return Selected(Descriptor(A.MT_DOCKER_MANIFEST, digest, len(data)), data)


def open_local(ref: LocalRef) -> tuple[OciLayoutSource | DockerArchiveSource, Selected]:
    """Open the source ``ref`` names and find its image (a manifest or an index)."""
    if ref.kind == "oci":
        src = OciLayoutSource(ref.path)
        try:
            return src, Selected(select_in_index(src.index(), ref.tag, src.where))
        except BaseException:
            src.close()
            raise
    archive = DockerArchiveSource(ref.path)
    try:
        return archive, docker_manifest(archive, ref.tag)
    except BaseException:
        archive.close()
        raise


# --- writing -----------------------------------------------------------------------------


class OciLayoutWriter:
    """Writes an image into an OCI layout folder (made when missing): blobs first, then
    ``index.json`` naming the manifest (replacing an entry with the same tag)."""

    def __init__(self, path: str, tag: str | None) -> None:
        self.path = path
        self.tag = tag
        self.where = f"oci:{path}"
        self.blobs = os.path.join(path, "blobs", "sha256")

    def _blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs, digest_hex(digest, self.where))

    def prepare(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FileAccessError("exists and is not a folder", path=self.path)
        os.makedirs(self.blobs, exist_ok=True)
        layout = os.path.join(self.path, "oci-layout")
        if not os.path.exists(layout):
            self._write(layout, json.dumps({"imageLayoutVersion": A.OCI_LAYOUT_VERSION}).encode())

    def blob_file(self, digest: str) -> str:
        return self._blob_path(digest)

    def has_blob(self, digest: str, size: int) -> bool:
        p = self._blob_path(digest)
        return os.path.isfile(p) and os.path.getsize(p) == size

    def put_file(self, path: str, digest: str, size: int, progress: Any = None) -> bool:
        """Copy the local file ``path`` in as blob ``digest``; False when it was there."""
        if self.has_blob(digest, size):
            return False
        with open_file(path) as src, AtomicOutput(self._blob_path(digest), force=True) as out:
            pos = 0
            while pos < size:
                n = min(64 << 20, size - pos)
                try:
                    out.copy_in(src.fd, pos, n, pos)
                except OSError:
                    out.pwrite(pos, src.pread(pos, n))
                pos += n
                if progress is not None:
                    progress(n)
        return True

    def put_bytes(self, data: bytes, digest: str) -> None:
        if not self.has_blob(digest, len(data)):
            self._write(self._blob_path(digest), data)

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        """Store the manifest blob, then point ``index.json`` at it (the last write)."""
        self.put_bytes(data, desc.digest)
        p = os.path.join(self.path, "index.json")
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": A.MT_OCI_INDEX, "manifests": []}
        if os.path.exists(p):
            with open_file(p) as f:
                index = parse_json(f.pread(0, f.size()), p, "index.json")
        entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)]
        entry: dict[str, Any] = {
            "mediaType": desc.media_type,
            "digest": desc.digest,
            "size": desc.size,
        }
        if self.tag:
            entry["annotations"] = {A.REF_NAME: self.tag}
            entries = [
                e for e in entries if (e.get("annotations") or {}).get(A.REF_NAME) != self.tag
            ]
        else:
            entries = [e for e in entries if e.get("digest") != desc.digest]
        index["manifests"] = [*entries, entry]
        self._write(p, json.dumps(index, indent=2).encode() + b"\n")

    def close(self) -> None:
        pass

    def _write(self, path: str, data: bytes) -> None:
        with AtomicOutput(path, force=True) as out:
            out.pwrite(0, data)
