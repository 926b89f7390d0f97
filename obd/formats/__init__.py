"""Byte layouts of overlaybd files: LSMT layers, ZFile, the tar wrapper."""
