"""The names the OCI side of overlaybd uses: media types and the annotations containerd's
accelerated-container-image (ACI) puts on an overlaybd image's layer descriptors (its
``pkg/label``). Every reader and writer of manifests takes them from here."""

from __future__ import annotations

# OCI image-spec media types
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Docker schema 2
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)

# ACI's layer-descriptor annotations (pkg/label/label.go)
_P = "containerd.io/snapshot/overlaybd"
BLOB_DIGEST = f"{_P}/blob-digest"
BLOB_SIZE = f"{_P}/blob-size"
BLOB_FS_TYPE = f"{_P}/blob-fs-type"
VERSION = f"{_P}/version"
ACCELERATION_LAYER = f"{_P}/acceleration-layer"
VSIZE = f"{_P}/vsize"
ZFILE_CONFIG = f"{_P}/zfile-config"
TURBO_OCI_DIGEST = f"{_P}/turbo-oci/target-digest"
TURBO_OCI_MEDIA_TYPE = f"{_P}/turbo-oci/target-media-type"
# what ACI writes as the overlaybd blob version (version.OverlayBDVersionNumber)
OVERLAYBD_VERSION = "0.1.0"

# OCI image layout (image-spec image-layout.md): the tag of an index.json entry
REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT_VERSION = "1.0.0"
