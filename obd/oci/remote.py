"""``obd convert`` between registries: a registry image as a blob source, a registry
repository as a destination (through :class:`obd.registry.client.RegistryClient`).

Credentials come from the docker client's config (``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``, its ``auths``), as ``docker push`` would use them.

A destination takes each blob only when the registry does not have it (HEAD first), and
mounts it from another repository of the same registry when the store remembers having
pushed it there; the manifest goes last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from obd.oci.convert import SourceImage, load_image
from obd.oci.layout import check_blob
from obd.oci.manifest import Descriptor
from obd.oci.reference import Reference
from obd.oci.store import LayerStore
from obd.registry.client import BlobLocation, RegistryClient


def docker_credentials() -> Any:
    """The docker client's credential file as a credential source, or None."""
    from obd.registry.auth import CredentialSource

    folder = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    path = os.path.join(folder, "config.json")
    return CredentialSource("file", path) if os.path.isfile(path) else None


def make_client(plain_http: bool) -> RegistryClient:
    return RegistryClient(credentials=docker_credentials(), plain_http=plain_http or None)


class RegistrySource:
    """The blobs of one repository."""

    def __init__(self, client: RegistryClient, ref: Reference, plain_http: bool) -> None:
        self.client = client
        self.ref = ref
        self.plain_http = plain_http
        self.where = str(ref)

    def _loc(self, desc: Descriptor) -> BlobLocation:
        return BlobLocation.of(self.ref.host, self.ref.repo, desc.digest, plain_http=self.plain_http or None)  # fmt: skip

    def blob_bytes(self, desc: Descriptor) -> bytes:
        return check_blob(self.client.fetch_blob(self._loc(desc)), desc, self.where)

    def blob_chunks(self, desc: Descriptor) -> Iterator[bytes]:
        return self.client.stream(self._loc(desc))


@contextlib.contextmanager
def open_registry_image(
    text: str, *, plain_http: bool = False, platform: str | None = None
) -> Iterator[SourceImage]:
    ref = Reference.parse(text)
    with make_client(plain_http) as client:
        data, mt, digest = client.get_manifest(ref.host, ref.repo, ref.reference)
        src = RegistrySource(client, ref, plain_http)
        yield load_image(src, Descriptor(mt, digest, len(data)), data, platform=platform)


class RegistryDestination:
    """A repository to push the converted image to (``host/repo[:tag]``)."""

    def __init__(
        self,
        text: str,
        *,
        plain_http: bool = False,
        store: LayerStore | None = None,
    ) -> None:
        self.ref = Reference.parse(text)
        if self.ref.digest:
            from obd.errors import UsageError

            raise UsageError(f"{text}: a destination is pushed by tag, not by digest")
        self.where = str(self.ref)
        self.client = make_client(plain_http)
        self.store = store

    def prepare(self) -> None:
        pass

    def has_blob(self, digest: str, size: int) -> bool:
        return self.client.blob_exists(self.ref.host, self.ref.repo, digest)

    def put_file(self, path: str, digest: str, size: int, progress: Any = None) -> bool:
        host, repo = self.ref.host, self.ref.repo
        if self.has_blob(digest, size):
            return False
        for other in self.store.pushed_to(host, digest) if self.store else ():
            if other != repo and self.client.mount_blob(host, repo, digest, other):
                self._note(digest)
                return True

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    if progress is not None:
                        progress(len(piece))
                    yield piece

        self.client.push_blob(host, repo, chunks, digest, size)
        self._note(digest)
        return True

    def _note(self, digest: str) -> None:
        if self.store is not None:
            self.store.note_pushed(digest, self.ref.host, self.ref.repo)

    def put_bytes(self, data: bytes, digest: str) -> None:
        self.client.push_blob(self.ref.host, self.ref.repo, data, digest, len(data))

    def put_manifest(self, data: bytes, desc: Descriptor) -> None:
        tag = self.ref.tag or "latest"
        self.client.push_manifest(self.ref.host, self.ref.repo, tag, data, desc.media_type)

    def close(self) -> None:
        self.client.close()
