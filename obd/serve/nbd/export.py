"""An NBD export: one named device, and how its answers become NBD answers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from obd.errors import UsageError
from obd.io.base import BlockDevice, ExtentKind
from obd.serve.nbd.proto import (
    MAX_EXTENTS,
    MAX_STRING,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
)

ReadHook = Callable[[str, int, int, int], None]
"""``hook(export_name, offset, length, latency_ns)`` called after every served read."""


@dataclass(eq=False)
class Export:
    """One named export: a device shared by every connection to it.

    ``multi_conn`` says the device's ``flush`` covers the completed writes of every
    connection (true for one shared device object); read-only exports always allow it.
    """

    name: str
    device: BlockDevice
    description: str = ""
    multi_conn: bool = True
    readonly: bool = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.readonly = bool(self.device.readonly)
        self.size = int(self.device.size())
        if len(self.name.encode()) > MAX_STRING:
            raise UsageError(f"export name longer than {MAX_STRING} bytes: {self.name[:40]}...")

    def transmission_flags(self, structured: bool) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        if self.readonly:
            flags |= NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN
        else:
            flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
            if self.multi_conn:
                flags |= NBD_FLAG_CAN_MULTI_CONN
        if structured:
            flags |= NBD_FLAG_SEND_DF  # we never split a read reply
        return flags


_EXTENT_STATE = {
    ExtentKind.DATA: 0,
    ExtentKind.ZERO: NBD_STATE_ZERO,
    ExtentKind.HOLE: NBD_STATE_HOLE | NBD_STATE_ZERO,
}


def block_status(
    device: BlockDevice, offset: int, length: int, *, one: bool = False
) -> list[tuple[int, int]]:
    """``(length, NBD_STATE_*)`` descriptors covering ``[offset, offset+length)``.

    A hole (nothing mapped) is ``HOLE|ZERO``; a zeroed segment is ``ZERO`` (allocated,
    reads as zeros); data is 0. Adjacent runs of one state are joined; with ``one`` only
    the first run is returned. Ranges the device reports nothing for count as data.
    """
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    for e in device.extents(offset, length):
        s, t = max(e.offset, pos), min(e.end, end)
        if t <= s:
            continue
        if s > pos:  # a gap in the device's answer: claim nothing about it
            _append(out, s - pos, 0)
        _append(out, t - s, _EXTENT_STATE[e.kind])
        pos = t
        if pos >= end or (one and len(out) > 1) or len(out) >= MAX_EXTENTS:
            break
    if pos < end and not (one and len(out) > 1) and len(out) < MAX_EXTENTS:
        _append(out, end - pos, 0)
    if one:
        del out[1:]
    return out


def _append(out: list[tuple[int, int]], n: int, state: int) -> None:
    if out and out[-1][1] == state:
        out[-1] = (out[-1][0] + n, state)
    else:
        out.append((n, state))


_ZERO_CHUNK = bytes(1 << 20)


def write_zero_bytes(dev: BlockDevice, offset: int, length: int) -> None:
    """Write zeros as data (WRITE_ZEROES with NO_HOLE): the range stays allocated."""
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(_ZERO_CHUNK), end - pos)
        dev.pwrite(pos, memoryview(_ZERO_CHUNK)[:n])
        pos += n


def flush_all(exports: Iterable[Export]) -> list[tuple[str, BaseException]]:
    """Flush every writable export; returns ``(name, error)`` for those that failed."""
    failures: list[tuple[str, BaseException]] = []
    for e in exports:
        if e.readonly:
            continue
        try:
            e.device.flush()
        except Exception as exc:
            failures.append((e.name, exc))
    return failures
