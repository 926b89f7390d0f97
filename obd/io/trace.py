"""A hook that records every durable-state change obd makes to files (for crash tests).

Every write, truncate, hole punch and fsync of a :class:`~obd.io.file.LocalFile`, every
name operation of :class:`~obd.io.file.AtomicOutput` (create, rename, link, unlink, the
fsync of the folder) and every in-kernel copy goes through :mod:`obd.io.file`, which
tells :data:`tracer` about it when one is installed. In production ``tracer`` is
``None`` and each hook costs one ``is not None`` test.

A tracer is told about a call after the call returned, so the order of its records is
an order the calls really happened in. An fsync is told twice: ``sync_begin()`` before
the call (it returns a mark) and ``fsync(fd, mark)`` after it, because an fsync only
covers the writes that completed before it started.

``tests/crashsim.py`` records with a tracer and replays the log at simulated crashes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Tracer(Protocol):
    """What :mod:`obd.io.file` reports. ``fd`` is the open file the call was made on."""

    def created(self, path: str, fd: int) -> None:
        """A new file was created at ``path`` (a new directory entry and inode)."""

    def pwrite(self, fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` was written at ``offset`` (the tracer copies it if it keeps it)."""

    def truncate(self, fd: int, size: int) -> None: ...

    def punch_hole(self, fd: int, offset: int, length: int) -> None: ...

    def sync_begin(self) -> int:
        """An fsync (of a file or a folder) is about to start: a mark for :meth:`fsync`."""
        ...

    def fsync(self, fd: int, mark: int) -> None:
        """``fd`` (a file) was fsynced by a call that started at ``mark``."""

    def fsync_dir(self, path: str, mark: int) -> None:
        """The folder ``path`` was fsynced by a call that started at ``mark``."""

    def rename(self, src: str, dst: str) -> None: ...

    def link(self, src: str, dst: str) -> None: ...

    def unlink(self, path: str) -> None: ...


tracer: Tracer | None = None
"""The installed tracer; ``None`` (no tracing) unless a test installs one."""


@contextlib.contextmanager
def tracing(t: Tracer) -> Iterator[Tracer]:
    """Install ``t`` as :data:`tracer` for the ``with`` block (one tracer at a time)."""
    global tracer
    if tracer is not None:
        raise RuntimeError("a tracer is already installed")
    tracer = t
    try:
        yield t
    finally:
        tracer = None


__all__ = ["Tracer", "tracer", "tracing"]
