"""The OCI distribution client: blob URLs, auth, ranged reads of blobs, the local cache and
background download (docs/formats.md §8). It knows blobs, not layers: what a blob holds is
for :mod:`obd.image` to open."""
