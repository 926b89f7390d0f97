"""The TCMU command ring, processed in place on the shared mapping (docs/tcmu.md "Ring").

The kernel appends entries at ``cmd_head`` and userspace consumes from ``cmd_tail``
(``uapi.py`` has the layouts). :class:`CommandRing` works on any writable buffer: the
``mmap`` of ``/dev/uioN`` in production, a ``bytearray`` in tests.

- :meth:`CommandRing.poll` reads ``cmd_head`` once, then the entries from its cursor up to
  that head: PAD entries are skipped, TMR entries are reported to ``on_tmr`` and skipped,
  entries of an unknown opcode get ``TCMU_UFLAG_UNKNOWN_OP`` and are skipped (the tail
  passes skipped entries at once when nothing before them waits), CMD entries become
  :class:`Command` objects (CDB and iovecs copied out of the ring at once).
- :meth:`CommandRing.complete` (any thread) copies a data-in answer into the command's
  iovecs, writes the response (``scsi_status``, ``sense_buffer``, ``read_len``) and moves
  ``cmd_tail`` over every entry it may pass. Without ``TCMU_MAILBOX_FLAG_CAP_OOOC`` the tail
  only passes a command's entry once it and every command before it are complete, and
  each response goes into the command's own entry. With it, a completion is written into
  the oldest CMD entry at the tail with the completed command's ``cmd_id`` (the kernel
  looks commands up by id), so the tail never waits for a slow command.
- The caller kicks the kernel (writes 4 bytes to the uio fd) when ``complete`` returns
  True: the tail moved.

Ordering: the head is read once per poll, before the entries it covers; responses are
stored before the tail that publishes them. On x86-64 (total store order) program order is
memory order; the kernel reads ``cmd_tail`` once and then the entries behind it.
"""

from __future__ import annotations

import collections
import logging
import mmap
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from obd.errors import CorruptError, UnsupportedError
from obd.serve.tcmu import scsi, uapi

log = logging.getLogger("obd.serve.tcmu")

Mapping = mmap.mmap | bytearray | memoryview
"""A writable buffer holding the mailbox, the command ring and the data area."""

_U32 = struct.Struct("<I")
_HDR_UFLAGS_OFF = uapi.CmdEntryHdr.LAYOUT.offset("uflags")
_SENSE_MAX = uapi.TCMU_SENSE_BUFFERSIZE
# the shortest entry of each opcode: a CMD entry is answered in place (sizeof(struct
# tcmu_cmd_entry), which the kernel always gives it); a TMR entry has its fixed part
_MIN_LENGTH = {
    uapi.TCMU_OP_CMD: uapi.CmdEntryRsp.STRUCT.size,
    uapi.TCMU_OP_TMR: uapi.TMR_CMD_IDS_OFF,
}


@dataclass(frozen=True, slots=True)
class Tmr:
    """A task management request the kernel queued (``struct tcmu_tmr_entry``).

    Informational: ``cmd_ids`` are the commands in the ring it aborts; the kernel still
    waits for their answers, which are given as usual.
    """

    tmr_type: int
    cmd_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return uapi.TCMU_TMR_NAMES.get(self.tmr_type, f"TMR{self.tmr_type}")


class Command:
    """One SCSI command from the ring: its ``cdb`` and the iovecs of its data buffer.

    ``iovecs`` are ``(offset, length)`` pairs in the mapping (only the ``iov_cnt`` data
    iovecs; bidi and DIF iovecs are not used by any command obd serves). ``problem`` is
    set when the entry itself is broken (iovecs outside the data area, a CDB past the
    mapping): :meth:`CommandRing.run` answers it without calling the handler.
    """

    __slots__ = (
        "_done",
        "_entry",
        "_ring",
        "cdb",
        "cmd_id",
        "data_length",
        "iovecs",
        "problem",
        "slot",
    )

    def __init__(
        self,
        ring: CommandRing,
        slot: int,
        cmd_id: int,
        cdb: bytes,
        iovecs: tuple[tuple[int, int], ...],
        problem: str = "",
    ) -> None:
        self._ring = ring
        self.problem = problem
        self._done = False
        self._entry: _Slot | None = None
        self.slot = slot  # offset of its entry in the command ring
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iovecs = iovecs
        self.data_length = sum(n for _, n in iovecs)

    @property
    def opcode(self) -> int:
        return self.cdb[0]

    def data_out(self, length: int | None = None) -> bytes:
        """The data-out bytes (what the initiator sends), at most ``length`` of them."""
        want = self.data_length if length is None else min(length, self.data_length)
        mv = self._ring._mv
        if not self.iovecs or want <= 0:
            return b""
        if want <= self.iovecs[0][1]:
            off = self.iovecs[0][0]
            return mv[off : off + want].tobytes()
        parts = []
        for off, n in self.iovecs:
            if want <= 0:
                break
            n = min(n, want)
            parts.append(mv[off : off + n])
            want -= n
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"Command(id={self.cmd_id}, cdb={self.cdb.hex()}, len={self.data_length})"


class _Slot:
    """An entry between the tail and the poll cursor: ``cmd`` is None for PAD/TMR/unknown."""

    __slots__ = ("cmd", "done", "length", "off")

    def __init__(self, off: int, length: int, cmd: Command | None) -> None:
        self.off = off
        self.length = length
        self.cmd = cmd
        self.done = cmd is None


Handler = Callable[[Command], scsi.Response]


class CommandRing:
    """The command ring of one TCMU device, on its shared ``mapping``.

    One thread polls; any thread completes. The mailbox is checked here: version 2, a
    ring and data area inside ``mapping``; a bad mailbox is a :class:`CorruptError` (or
    :class:`UnsupportedError` for another version) naming ``name``.
    """

    def __init__(
        self,
        mapping: Mapping,
        *,
        name: str = "tcmu",
        on_tmr: Callable[[Tmr], None] | None = None,
    ) -> None:
        view = memoryview(mapping)
        self._views = (view,) if view.format == "B" and view.ndim == 1 else (view, view.cast("B"))
        self._mv = self._views[-1]
        self.name = name
        self.on_tmr = on_tmr
        try:
            mb = self._check_mailbox()
        except BaseException:
            self._release()  # so that the caller can close its mmap
            raise
        self.flags = mb.flags
        self.cmdr_off = mb.cmdr_off
        self.cmdr_size = mb.cmdr_size
        self.data_off = mb.cmdr_off + mb.cmdr_size
        self.ooo = bool(mb.flags & uapi.TCMU_MAILBOX_FLAG_CAP_OOOC)
        self.read_len = bool(mb.flags & uapi.TCMU_MAILBOX_FLAG_CAP_READ_LEN)
        self._tail = mb.cmd_tail
        self._cursor = mb.cmd_tail  # next entry poll() reads
        self._slots: collections.deque[_Slot] = collections.deque()
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False

    def _check_mailbox(self) -> uapi.Mailbox:
        name = self.name
        size = len(self._mv)
        if size < uapi.Mailbox.STRUCT.size:
            raise CorruptError(f"TCMU mapping of {size} bytes holds no mailbox", path=name)
        mb = uapi.Mailbox.unpack(self._mv)
        if mb.version != uapi.TCMU_MAILBOX_VERSION:
            raise UnsupportedError(
                f"TCMU mailbox version {mb.version} (obd speaks {uapi.TCMU_MAILBOX_VERSION})",
                path=name,
            )
        if (
            mb.cmdr_off < uapi.Mailbox.STRUCT.size
            or mb.cmdr_size < uapi.TCMU_OP_ALIGN_SIZE
            or mb.cmdr_size % uapi.TCMU_OP_ALIGN_SIZE
            or mb.cmdr_off + mb.cmdr_size > size
            or mb.cmd_tail >= mb.cmdr_size
            or mb.cmd_tail % uapi.TCMU_OP_ALIGN_SIZE
        ):
            raise CorruptError(
                f"TCMU mailbox places the ring outside the mapping (cmdr_off={mb.cmdr_off}, "
                f"cmdr_size={mb.cmdr_size}, cmd_tail={mb.cmd_tail}, mapping={size})",
                path=name,
            )
        return mb

    # --- consuming --------------------------------------------------------------------
    def head(self) -> int:
        """The kernel's ``cmd_head`` now."""
        return int(_U32.unpack_from(self._mv, uapi.CMD_HEAD_OFF)[0])

    @property
    def tail(self) -> int:
        """The ``cmd_tail`` obd last published."""
        return self._tail

    @property
    def pending(self) -> int:
        """Commands handed out by :meth:`poll` and not completed yet."""
        return self._pending

    def poll(self) -> list[Command]:
        """The commands the kernel queued since the last poll (one polling thread only)."""
        head = self.head()
        if head >= self.cmdr_size or head % uapi.TCMU_OP_ALIGN_SIZE:
            raise self._corrupt(f"cmd_head {head} is outside the ring or misaligned")
        new_slots: list[_Slot] = []
        cmds: list[Command] = []
        tmrs: list[Tmr] = []
        off = self._cursor
        while off != head:
            left = (head - off) % self.cmdr_size
            base = self.cmdr_off + off
            len_op = _U32.unpack_from(self._mv, base)[0]
            op, length = uapi.tcmu_hdr_get_op(len_op), uapi.tcmu_hdr_get_len(len_op)
            if length == 0 or length > left or off + length > self.cmdr_size:
                raise self._corrupt(
                    f"entry at ring offset {off} has length {length} "
                    f"({left} bytes queued, ring of {self.cmdr_size})"
                )
            if length < _MIN_LENGTH.get(op, 0):
                raise self._corrupt(
                    f"entry at ring offset {off} of opcode {op} has only {length} bytes"
                )
            cmd: Command | None = None
            if op == uapi.TCMU_OP_CMD:
                cmd = self._parse_cmd(off, base, length)
                cmds.append(cmd)
            elif op == uapi.TCMU_OP_TMR:
                tmrs.append(self._parse_tmr(off, base, length))
            elif op != uapi.TCMU_OP_PAD:
                self._mv[base + _HDR_UFLAGS_OFF] |= uapi.TCMU_UFLAG_UNKNOWN_OP
                log.warning("%s: ring entry of unknown opcode %d skipped", self.name, op)
            slot = _Slot(off, length, cmd)
            if cmd is not None:
                cmd._entry = slot
            new_slots.append(slot)
            off = (off + length) % self.cmdr_size
        with self._lock:
            self._slots.extend(new_slots)
            self._cursor = off
            self._pending += len(cmds)
            # PAD and TMR entries at the tail need no answer: give their space back now
            # (the kernel sees it at the next kick)
            if self._pass_skipped():
                _U32.pack_into(self._mv, uapi.CMD_TAIL_OFF, self._tail)
        for t in tmrs:
            self._report_tmr(t)
        return cmds

    def _parse_cmd(self, off: int, base: int, length: int) -> Command:
        (_lo, cmd_id, _kf, _uf, iov_cnt, bidi, dif, cdb_off) = uapi.CMD_ENTRY_REQ.unpack_from(
            self._mv, base
        )
        problem = ""
        iovecs: tuple[tuple[int, int], ...] = ()
        if uapi.IOV_OFF + (iov_cnt + bidi + dif) * uapi.IOVEC.size > length:
            problem = f"{iov_cnt}+{bidi}+{dif} iovecs do not fit in its {length} bytes"
        elif iov_cnt:
            # struct iovec is two u64s: read all of them at once
            raw = struct.unpack_from(f"<{2 * iov_cnt}Q", self._mv, base + uapi.IOV_OFF)
            iovecs = tuple(zip(raw[0::2], raw[1::2], strict=True))
            end = len(self._mv)
            for i, (iov_base, iov_len) in enumerate(iovecs):
                if iov_base < self.data_off or iov_base + iov_len > end:
                    problem = f"iovec {i} ({iov_base}+{iov_len}) is outside the data area"
                    iovecs = ()
                    break
        cdb = b""
        if not problem:
            if not self.cmdr_off <= cdb_off < len(self._mv):
                problem = f"cdb_off {cdb_off} is outside the mapping"
            else:
                n = scsi.cdb_length(self._mv[cdb_off])
                if self._mv[cdb_off] == scsi.VARIABLE_LENGTH_CDB and cdb_off + 8 <= len(self._mv):
                    n = 8 + self._mv[cdb_off + 7]
                cdb = self._mv[cdb_off : cdb_off + n].tobytes()
                if len(cdb) < n:
                    problem = f"the {n}-byte CDB at {cdb_off} runs past the mapping"
        if problem:
            log.error("%s: command %d at ring offset %d: %s", self.name, cmd_id, off, problem)
        return Command(self, off, cmd_id, cdb, iovecs, problem)

    def _parse_tmr(self, off: int, base: int, length: int) -> Tmr:
        entry = uapi.TmrEntry.unpack(self._mv, base)
        count = min(entry.cmd_cnt, max(0, (length - uapi.TMR_CMD_IDS_OFF) // 2))
        start = base + uapi.TMR_CMD_IDS_OFF
        ids = tuple(struct.unpack_from(f"<{count}H", self._mv, start)) if count else ()
        return Tmr(entry.tmr_type, ids)

    def _report_tmr(self, tmr: Tmr) -> None:
        log.info("%s: %s for commands %s", self.name, tmr.name, list(tmr.cmd_ids))
        if self.on_tmr is not None:
            try:
                self.on_tmr(tmr)
            except Exception:
                log.exception("%s: TMR callback failed", self.name)

    # --- completing -------------------------------------------------------------------
    def complete(self, cmd: Command, rsp: scsi.Response) -> bool:
        """Answer ``cmd`` with ``rsp``; True when ``cmd_tail`` moved (then kick the kernel)."""
        if cmd._ring is not self:
            raise ValueError(f"{cmd!r} belongs to another ring")
        if self._closed:
            return False
        read_len = 0
        short = False
        if rsp.data is not None and rsp.status == scsi.SAM_STAT_GOOD:
            try:
                read_len = self._scatter(cmd, rsp.data)
            except ValueError:  # the view was released under us: the device is gone
                if self._closed:
                    return False
                raise
            short = read_len < cmd.data_length
        uflags = uapi.TCMU_UFLAG_READ_LEN if short and self.read_len else 0
        sense = rsp.sense[:_SENSE_MAX]
        with self._lock:
            if self._closed:
                return False
            if cmd._done:
                raise ValueError(f"{cmd!r} completed twice")
            cmd._done = True
            self._pending -= 1
            if self.ooo:
                self._pass_skipped()
                slot = self._slots.popleft()  # the oldest unanswered CMD entry
                self._write_rsp(slot.off, cmd.cmd_id, rsp.status, uflags, read_len, sense)
                self._tail = (slot.off + slot.length) % self.cmdr_size
                self._pass_skipped()
                moved = True
            else:
                self._write_rsp(cmd.slot, cmd.cmd_id, rsp.status, uflags, read_len, sense)
                assert cmd._entry is not None
                cmd._entry.done = True
                moved = self._pass_skipped()
            if moved:
                _U32.pack_into(self._mv, uapi.CMD_TAIL_OFF, self._tail)
        return moved

    def run(self, cmd: Command, handler: Handler) -> bool:
        """Answer ``cmd`` with ``handler(cmd)``; a handler that raises answers
        HARDWARE ERROR / INTERNAL TARGET FAILURE. True when ``cmd_tail`` moved."""
        if cmd.problem:
            return self.complete(cmd, scsi.INTERNAL_FAILURE)
        try:
            rsp = handler(cmd)
        except Exception:
            log.exception("%s: command %r failed", self.name, cmd)
            rsp = scsi.INTERNAL_FAILURE
        return self.complete(cmd, rsp)

    def process(self, handler: Handler) -> bool:
        """Poll and answer every queued command on this thread; True when the tail moved."""
        moved = False
        for cmd in self.poll():
            moved = self.run(cmd, handler) or moved
        return moved

    def _pass_skipped(self) -> bool:
        """Move the tail over the done entries at the front (lock held)."""
        moved = False
        while self._slots and self._slots[0].done:
            s = self._slots.popleft()
            self._tail = (s.off + s.length) % self.cmdr_size
            moved = True
        return moved

    def _write_rsp(
        self, off: int, cmd_id: int, status: int, uflags: int, read_len: int, sense: bytes
    ) -> None:
        base = self.cmdr_off + off
        len_op, _id, kflags, old_uflags = uapi.CMD_ENTRY_HDR.unpack_from(self._mv, base)
        uapi.CMD_ENTRY_RSP.pack_into(
            self._mv,
            base,
            len_op,
            cmd_id,
            kflags,
            (old_uflags & ~uapi.TCMU_UFLAG_READ_LEN) | uflags,
            status,
            read_len,
            sense,
        )

    def _scatter(self, cmd: Command, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the iovecs, zero the rest of them; bytes copied."""
        src = memoryview(data).cast("B")
        total = min(len(src), cmd.data_length)
        pos = 0
        mv = self._mv
        for off, n in cmd.iovecs:
            k = min(n, total - pos)
            if k > 0:
                mv[off : off + k] = src[pos : pos + k]
                pos += k
            if k < n:
                start = off + max(k, 0)
                mv[start : off + n] = bytes(off + n - start)
        return total

    def _corrupt(self, what: str) -> CorruptError:
        return CorruptError(f"TCMU command ring: {what}", path=self.name)

    def close(self) -> None:
        """Release the view of the mapping (so an ``mmap`` can be closed).

        Later completions are dropped (``complete`` returns False): the device is gone.
        Stop the polling thread first.
        """
        with self._lock:
            self._closed = True
            self._release()

    def _release(self) -> None:
        for view in reversed(self._views):
            view.release()
