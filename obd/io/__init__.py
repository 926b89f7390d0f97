"""Positional I/O: the ReadAt/WriteAt protocol every layer, file and blob implements."""

from obd.io.base import BlockDevice, Extent, ExtentKind, ReadAt, WriteAt
from obd.io.file import LocalFile, open_file

__all__ = ["BlockDevice", "Extent", "ExtentKind", "LocalFile", "ReadAt", "WriteAt", "open_file"]
