"""OCI images: references, manifests and indexes, the OCI layer rules (whiteouts), apply and
convert. Builds on :mod:`obd.image` and :mod:`obd.registry`."""
