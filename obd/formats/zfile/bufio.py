"""Bulk reads into caller-owned buffers, shared by the ZFile reader and writer."""

from __future__ import annotations

import os

from obd.io.base import ReadAt
from obd.io.file import LocalFile


def read_into(src: ReadAt, offset: int, view: memoryview) -> int:
    """Fill ``view`` from ``src`` at ``offset``; the bytes read (fewer only at EOF).

    A :class:`LocalFile` is read straight into ``view`` with ``preadv``: no copy, no
    new buffer, the GIL released while the kernel copies.
    """
    fd = src.fd if isinstance(src, LocalFile) else -1
    if fd < 0:
        data = src.pread(offset, len(view))
        view[: len(data)] = data
        return len(data)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done
