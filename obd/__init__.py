"""obd: a toolkit and block-device server for overlaybd images."""

__version__ = "0.1.0"
