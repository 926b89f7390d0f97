"""An in-process "kernel" for the TCMU ring tests, written from the UAPI layouts.

:class:`KernelEmu` owns a shared mapping laid out as ``drivers/target/target_core_user.c``
lays out ``/dev/uioN`` (mailbox, command ring, data area) and queues commands as that
driver does: an entry of ``max(offsetof(req.iov[n]), sizeof(entry)) + round_up(cdb, 8)``
bytes, a PAD entry to the end of the ring when an entry does not fit before the wrap, the
CDB right after the iovecs, data buffers scattered over the data area in blocks.
:meth:`KernelEmu.reap` then reads completions the way the driver does: from its last
cleaned offset to ``cmd_tail``, skipping PAD and TMR entries, looking each CMD entry's
``cmd_id`` up among the commands in flight.

:class:`MemDisk` is a ``BlockDevice`` over a ``bytearray`` with fault injection, the
model the SCSI tests check against.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from obd.errors import ReadOnlyError
from obd.io.base import Extent, ExtentKind
from obd.serve.tcmu import uapi

MAILBOX_SIZE = uapi.Mailbox.STRUCT.size
ENTRY_SIZE = uapi.CmdEntryRsp.STRUCT.size  # sizeof(struct tcmu_cmd_entry)


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class Inflight:
    cmd_id: int
    cdb: bytes
    iovecs: list[tuple[int, int]]
    blocks: list[int]
    data_out: bytes = b""


@dataclass
class Completion:
    cmd_id: int
    cdb: bytes
    status: int
    sense: bytes
    uflags: int
    read_len: int
    data_in: bytes  # the whole data buffer as the kernel would see it
    entry_off: int  # where in the ring the answer was found


class RingFull(Exception):
    pass


@dataclass
class KernelEmu:
    cmdr_size: int = 4096
    data_blocks: int = 64
    block_size: int = 512
    flags: int = 0
    seed: int = 0
    mapping: bytearray = field(init=False)
    head: int = field(init=False, default=0)
    last_cleaned: int = field(init=False, default=0)
    inflight: dict[int, Inflight] = field(init=False, default_factory=dict)
    free_blocks: set[int] = field(init=False, default_factory=set)
    next_id: int = field(init=False, default=1)
    pads: int = field(init=False, default=0)
    wraps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.cmdr_off = MAILBOX_SIZE
        self.data_off = self.cmdr_off + self.cmdr_size
        self.mapping = bytearray(self.data_off + self.data_blocks * self.block_size)
        uapi.Mailbox(
            uapi.TCMU_MAILBOX_VERSION, self.flags, self.cmdr_off, self.cmdr_size, 0, 0
        ).pack_into(self.mapping, 0)
        self.free_blocks = set(range(self.data_blocks))
        self.rng = random.Random(self.seed)

    # --- mailbox ------------------------------------------------------------------------
    @property
    def tail(self) -> int:
        return int(struct.unpack_from("<I", self.mapping, uapi.CMD_TAIL_OFF)[0])

    def _publish_head(self) -> None:
        struct.pack_into("<I", self.mapping, uapi.CMD_HEAD_OFF, self.head)

    def _space(self) -> int:
        # bytes the kernel may still fill: it never lets head catch up with the tail
        return (self.last_cleaned - self.head - 1) % self.cmdr_size

    def _reserve(self, size: int) -> int:
        """Ring offset for an entry of ``size`` bytes, padding to the wrap as the driver does."""
        to_end = self.cmdr_size - self.head
        need = size + (to_end if to_end < size else 0)
        if need > self._space():
            raise RingFull(f"ring full: need {need}, free {self._space()}")
        if to_end < size:
            base = self.cmdr_off + self.head
            uapi.CmdEntryHdr(uapi.tcmu_len_op(to_end, uapi.TCMU_OP_PAD), 0, 0, 0).pack_into(
                self.mapping, base
            )
            self.head = 0
            self.pads += 1
            self.wraps += 1
        return self.head

    def _advance(self, size: int) -> None:
        before = self.head
        self.head = (self.head + size) % self.cmdr_size
        if self.head < before:
            self.wraps += 1
        self._publish_head()

    # --- queueing -----------------------------------------------------------------------
    def _alloc(self, length: int) -> tuple[list[tuple[int, int]], list[int]]:
        nblocks = -(-length // self.block_size)
        if nblocks > len(self.free_blocks):
            raise RingFull(f"data area full: need {nblocks} blocks")
        blocks = self.rng.sample(sorted(self.free_blocks), nblocks)
        if self.rng.random() < 0.5:
            blocks.sort()  # sometimes contiguous runs, merged into one iovec
        for b in blocks:
            self.free_blocks.discard(b)
        iovecs: list[tuple[int, int]] = []
        left = length
        for b in blocks:
            off = self.data_off + b * self.block_size
            n = min(self.block_size, left)
            if iovecs and iovecs[-1][0] + iovecs[-1][1] == off:
                iovecs[-1] = (iovecs[-1][0], iovecs[-1][1] + n)
            else:
                iovecs.append((off, n))
            left -= n
        return iovecs, blocks

    def can_queue(self, data_length: int, cdb_len: int = 16, iov_max: int | None = None) -> bool:
        nblocks = -(-data_length // self.block_size)
        iov = nblocks if iov_max is None else iov_max
        size = max(uapi.IOV_OFF + iov * uapi.IOVEC.size, ENTRY_SIZE) + round_up(cdb_len, 8)
        to_end = self.cmdr_size - self.head
        need = size + (to_end if to_end < size else 0)
        return need <= self._space() and nblocks <= len(self.free_blocks)

    def queue(self, cdb: bytes, data_out: bytes = b"", data_length: int | None = None) -> int:
        """Queue one SCSI command; ``data_out`` fills its buffer (writes). Its ``cmd_id``."""
        length = len(data_out) if data_length is None else data_length
        iovecs, blocks = self._alloc(length)
        base_size = max(uapi.IOV_OFF + len(iovecs) * uapi.IOVEC.size, ENTRY_SIZE)
        size = base_size + round_up(len(cdb), uapi.TCMU_OP_ALIGN_SIZE)
        try:
            off = self._reserve(size)
        except RingFull:
            self.free_blocks.update(blocks)
            raise
        cmd_id = self.next_id
        self.next_id = self.next_id % 0xFFFF + 1
        base = self.cmdr_off + off
        self.mapping[base : base + size] = self.rng.randbytes(size)  # stale garbage
        uapi.CmdEntryReq(
            uapi.tcmu_len_op(size, uapi.TCMU_OP_CMD),
            cmd_id,
            0,
            0,
            len(iovecs),
            0,
            0,
            base + base_size,
        ).pack_into(self.mapping, base)
        for i, (io_off, io_len) in enumerate(iovecs):
            uapi.Iovec(io_off, io_len).pack_into(
                self.mapping, base + uapi.IOV_OFF + i * uapi.IOVEC.size
            )
        self.mapping[base + base_size : base + base_size + len(cdb)] = cdb
        pos = 0
        for io_off, io_len in iovecs:
            chunk = data_out[pos : pos + io_len]
            # a read buffer holds stale bytes; userspace must overwrite or zero it
            fill = chunk + self.rng.randbytes(io_len - len(chunk))
            self.mapping[io_off : io_off + io_len] = fill
            pos += io_len
        self.inflight[cmd_id] = Inflight(cmd_id, cdb, iovecs, blocks, data_out)
        self._advance(size)
        return cmd_id

    def queue_tmr(self, tmr_type: int, cmd_ids: list[int]) -> None:
        size = round_up(uapi.TMR_CMD_IDS_OFF + 2 * len(cmd_ids), uapi.TCMU_OP_ALIGN_SIZE)
        off = self._reserve(size)
        base = self.cmdr_off + off
        uapi.TmrEntry(
            uapi.tcmu_len_op(size, uapi.TCMU_OP_TMR), 0, 0, 0, tmr_type, len(cmd_ids)
        ).pack_into(self.mapping, base)
        struct.pack_into(f"<{len(cmd_ids)}H", self.mapping, base + uapi.TMR_CMD_IDS_OFF, *cmd_ids)
        self._advance(size)

    def queue_raw(self, op: int, size: int) -> int:
        """An entry of opcode ``op`` the ring does not know (for UNKNOWN_OP); its offset."""
        off = self._reserve(size)
        uapi.CmdEntryHdr(uapi.tcmu_len_op(size, op), 0, 0, 0).pack_into(
            self.mapping, self.cmdr_off + off
        )
        self._advance(size)
        return off

    # --- completions --------------------------------------------------------------------
    def reap(self) -> list[Completion]:
        """Completions from ``last_cleaned`` up to ``cmd_tail``, as the driver reads them."""
        tail = self.tail
        assert tail % uapi.TCMU_OP_ALIGN_SIZE == 0 and tail < self.cmdr_size
        out: list[Completion] = []
        while self.last_cleaned != tail:
            base = self.cmdr_off + self.last_cleaned
            hdr = uapi.CmdEntryHdr.unpack(self.mapping, base)
            assert hdr.length > 0 and hdr.length % 8 == 0, hdr
            if hdr.op in (uapi.TCMU_OP_PAD, uapi.TCMU_OP_TMR) or hdr.uflags & (
                uapi.TCMU_UFLAG_UNKNOWN_OP
            ):
                self.last_cleaned = (self.last_cleaned + hdr.length) % self.cmdr_size
                continue
            assert hdr.op == uapi.TCMU_OP_CMD, hdr
            rsp = uapi.CmdEntryRsp.unpack(self.mapping, base)
            inf = self.inflight.pop(rsp.cmd_id, None)
            assert inf is not None, f"completion for unknown cmd_id {rsp.cmd_id}"
            data = b"".join(bytes(self.mapping[o : o + n]) for o, n in inf.iovecs)
            out.append(
                Completion(
                    rsp.cmd_id,
                    inf.cdb,
                    rsp.scsi_status,
                    rsp.sense_buffer,
                    rsp.uflags,
                    rsp.read_len,
                    data,
                    self.last_cleaned,
                )
            )
            self.free_blocks.update(inf.blocks)
            self.last_cleaned = (self.last_cleaned + hdr.length) % self.cmdr_size
        return out


class MemDisk:
    """A ``BlockDevice`` over a ``bytearray``, counting flushes, with injectable faults.

    ``fail_reads`` / ``fail_writes``: how many next calls raise ``OSError(EIO)``;
    ``short_reads``: how many next reads return one byte less.
    """

    def __init__(
        self,
        size: int,
        *,
        readonly: bool = False,
        data: bytes | None = None,
        can_discard: bool = True,
    ) -> None:
        self.buf = bytearray(data if data is not None else bytes(size))
        self._readonly = readonly
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.fail_reads = 0
        self.fail_writes = 0
        self.fail_flush = 0
        self.short_reads = 0
        self.read_error: BaseException | None = None
        self.write_error: BaseException | None = None
        if not can_discard:
            self.discard = None  # type: ignore[assignment]

    @property
    def readonly(self) -> bool:
        return self._readonly

    def size(self) -> int:
        return len(self.buf)

    def pread(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            self.fail_reads -= 1
            raise self.read_error or OSError(5, "injected read error")
        out = bytes(self.buf[offset : offset + length])
        if self.short_reads and out:
            self.short_reads -= 1
            out = out[:-1]
        return out

    def _check_write(self) -> None:
        if self._readonly:
            raise ReadOnlyError("read-only image")
        if self.fail_writes:
            self.fail_writes -= 1
            raise self.write_error or OSError(5, "injected write error")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write()
        assert offset + len(data) <= len(self.buf)
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        if self.fail_flush:
            self.fail_flush -= 1
            raise OSError(5, "injected flush error")
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self._check_write()
        assert offset % 512 == 0 and length % 512 == 0
        self.discards.append((offset, length))
        self.buf[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write()
        self.zeroes.append((offset, length))
        self.buf[offset : offset + length] = bytes(length)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        end = len(self.buf) if length is None else min(len(self.buf), offset + length)
        if end > offset:
            yield Extent(offset, end - offset, ExtentKind.DATA, 0)

    def close(self) -> None:
        pass
