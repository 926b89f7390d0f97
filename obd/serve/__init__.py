"""Block-device servers: NBD (see :mod:`obd.serve.nbd`)."""
