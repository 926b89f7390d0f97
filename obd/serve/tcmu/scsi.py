"""SCSI as obd's TCMU backstore answers it (docs/formats.md §7.2, docs/tcmu.md).

Statuses, sense data (fixed format, response code 0x70) and the :class:`Response` a
command handler returns live here; the command ring (``ring.py``) only moves them.
:class:`ScsiDisk` emulates a disk over an obd ``BlockDevice``; every CDB it decodes is
one row of :data:`OPS` (opcode -> name, CDB length, fields, handler).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from obd.errors import ObdError, ReadOnlyError, RemoteError
from obd.io.base import BlockDevice

# --- status (SAM) ------------------------------------------------------------------------
SAM_STAT_GOOD = 0x00
SAM_STAT_CHECK_CONDITION = 0x02
SAM_STAT_BUSY = 0x08
SAM_STAT_TASK_SET_FULL = 0x28

# --- sense keys (SPC) --------------------------------------------------------------------
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# --- additional sense code and qualifier (ASC, ASCQ) -------------------------------------
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)

FIXED_SENSE_LEN = 18


def sense_fixed(key: int, asc: tuple[int, int], information: int | None = None) -> bytes:
    """Fixed-format sense data (response code 0x70, current error), 18 bytes.

    ``information`` (e.g. the first bad LBA) sets the INFORMATION field and the VALID bit
    when it fits in its 4 bytes.
    """
    b = bytearray(FIXED_SENSE_LEN)
    b[0] = 0x70
    b[2] = key & 0x0F
    b[7] = FIXED_SENSE_LEN - 8  # additional sense length
    b[12], b[13] = asc
    if information is not None and 0 <= information <= 0xFFFFFFFF:
        b[0] |= 0x80
        b[3:7] = information.to_bytes(4, "big")
    return bytes(b)


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers for one command.

    ``data``: the data-in bytes (copied into the command's iovecs; fewer than the buffer
    holds is a short transfer, reported with ``read_len`` when the kernel supports it).
    ``None`` for commands that return no data.
    """

    status: int = SAM_STAT_GOOD
    sense: bytes = b""
    data: bytes | bytearray | memoryview | None = None

    @classmethod
    def check(cls, key: int, asc: tuple[int, int], information: int | None = None) -> Response:
        """CHECK CONDITION with fixed-format sense ``key`` / ``asc``."""
        return cls(SAM_STAT_CHECK_CONDITION, sense_fixed(key, asc, information))

    @property
    def ok(self) -> bool:
        return self.status == SAM_STAT_GOOD


GOOD = Response()
INTERNAL_FAILURE = Response.check(HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE)


def cdb_length(opcode: int) -> int:
    """Length of a CDB from its group code (the top 3 bits of the opcode).

    The table is the one the kernel copies CDBs into the ring with (``COMMAND_SIZE``);
    a variable-length CDB (:data:`VARIABLE_LENGTH_CDB`) is ``8 + cdb[7]`` bytes, which
    the caller reads from byte 7.
    """
    return _GROUP_CDB_LEN[(opcode >> 5) & 7]


VARIABLE_LENGTH_CDB = 0x7F
_GROUP_CDB_LEN = (6, 10, 10, 12, 16, 12, 10, 10)


# --- the SCSI disk ---------------------------------------------------------------------
BLOCK_SIZE = 512  # logical block size (docs/formats.md §7.1)
VENDOR = "LIO-ORG"
PRODUCT = "TCMU device"
REVISION = "0002"
LIO_OUI = 0x001405  # the IEEE company id LIO puts in its NAA designators

# CDB control and flag bits
_RWPROTECT = 0xE0  # RDPROTECT / WRPROTECT: protection information, not supported
_FUA = 0x08
_WS_ANCHOR = 0x10
_WS_NDOB = 0x01
_DP_WP = 0x80  # mode parameter header: write protected
_DP_DPOFUA = 0x10  # mode parameter header: DPO and FUA supported

_WS_CHUNK = 1 << 20
_LOG = logging.getLogger("obd.serve.tcmu")


class ScsiCommand(Protocol):
    """What the SCSI layer needs of a command (``ring.Command`` is one)."""

    @property
    def cdb(self) -> bytes: ...

    @property
    def data_length(self) -> int: ...

    def data_out(self, length: int | None = None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ReadRetry:
    """How long a failing READ is retried (upstream: 20 ms doubling to 30 s, for 7 days).

    A read that raises ``OSError`` or :class:`RemoteError` (a registry blip) is tried again
    after ``first_delay`` seconds, doubling up to ``max_delay``, until ``total`` seconds have
    passed since the first try; then it fails with MEDIUM ERROR. The default gives up before
    the kernel's own TCMU command timeout (30 s), so the initiator gets obd's answer, not
    a timeout. ``total=0`` tries once.
    """

    first_delay: float = 0.02
    max_delay: float = 2.0
    total: float = 25.0

    def __post_init__(self) -> None:
        if self.first_delay <= 0 or self.max_delay < self.first_delay or self.total < 0:
            raise ValueError(f"bad read retry policy {self}")


@dataclass(frozen=True, slots=True)
class F:
    """A CDB field: ``width`` bytes big-endian at byte ``offset``, then ``& mask``,
    ``>> shift``; a 0 reads as ``zero`` when that is given (READ(6): 0 means 256)."""

    offset: int
    width: int = 1
    mask: int = -1
    shift: int = 0
    zero: int | None = None

    def get(self, cdb: bytes) -> int:
        v = (int.from_bytes(cdb[self.offset : self.offset + self.width], "big") & self.mask) >> (
            self.shift
        )
        return self.zero if v == 0 and self.zero is not None else v


Fields = dict[str, F]
OpHandler = Callable[["ScsiDisk", ScsiCommand, dict[str, int]], Response]


@dataclass(frozen=True, slots=True)
class Op:
    """One row of the CDB table: the command's name, CDB length, fields and handler."""

    name: str
    length: int
    fields: Fields
    handler: OpHandler


def _bad_field() -> Response:
    return Response.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)


def _bad_param() -> Response:
    return Response.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST)


def _param_length() -> Response:
    return Response.check(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)


WRITE_PROTECTED = Response.check(DATA_PROTECT, ASC_WRITE_PROTECTED)
INVALID_OPCODE = Response.check(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE)


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where ``a`` and ``b`` (of one length) differ."""
    pos = 0
    step = 4096
    while a[pos : pos + step] == b[pos : pos + step]:
        pos += step
    return next(i for i in range(pos, pos + step) if a[i] != b[i])


def _alloc(data: bytes | bytearray, alloc_len: int) -> Response:
    return Response(data=bytes(data[:alloc_len]))


class ScsiDisk:
    """A SCSI direct-access disk (SBC-3, 512-byte blocks) over an obd ``BlockDevice``.

    Call it with a command (``disk(cmd)``, the ring's handler) from any number of
    threads: it keeps no per-command state. ``serial`` is the unit serial number (VPD
    0x80) and the source of the device identifiers (VPD 0x83). ``max_transfer_blocks``
    is what VPD 0xB0 advertises, and so the largest command the initiator sends (Linux
    6.1 forwarded 1 MiB commands through tcm_loop whatever the device's
    ``hw_max_sectors``; 128 blocks, 64 KiB, is the kernel's default for that); ``write_cache``
    (default: the device is writable) sets WCE in the caching mode page, so initiators
    send SYNCHRONIZE CACHE, which flushes the device; with it off every write is
    flushed before it is answered. ``read_hook(offset, length, ns)``
    is called after every served READ.
    """

    def __init__(
        self,
        device: BlockDevice,
        *,
        serial: str,
        read_retry: ReadRetry = ReadRetry(),
        max_transfer_blocks: int = 128,
        max_unmap_blocks: int = 1 << 22,
        max_unmap_descriptors: int = 256,
        max_write_same_blocks: int = 1 << 22,
        write_cache: bool | None = None,
        read_hook: Callable[[int, int, int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        name: str = "",
    ) -> None:
        for what, value in (
            ("max_transfer_blocks", max_transfer_blocks),
            ("max_unmap_blocks", max_unmap_blocks),
            ("max_unmap_descriptors", max_unmap_descriptors),
            ("max_write_same_blocks", max_write_same_blocks),
        ):
            if not 0 < value <= 0xFFFFFFFF:
                raise ValueError(f"{what} must be 1 to 2**32-1 blocks, not {value}")
        self.device = device
        self.name = name or serial
        self.serial = serial
        self.read_retry = read_retry
        self.max_transfer_blocks = max_transfer_blocks
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        self.max_write_same_blocks = max_write_same_blocks
        self.readonly = bool(device.readonly)
        self.write_cache = (not self.readonly) if write_cache is None else write_cache
        self.can_unmap = not self.readonly and callable(getattr(device, "discard", None))
        self.read_hook = read_hook
        self._sleep = sleep
        self._lock = threading.Lock()
        self._capacity_changed = False
        self.num_lbas = int(device.size()) // BLOCK_SIZE

    def refresh(self) -> None:
        """Re-read the device's size (after a reconfig); a change is reported once as
        UNIT ATTENTION / CAPACITY DATA HAS CHANGED."""
        n = int(self.device.size()) // BLOCK_SIZE
        with self._lock:
            if n != self.num_lbas:
                self.num_lbas = n
                self._capacity_changed = True

    # --- dispatch -----------------------------------------------------------------------
    def __call__(self, cmd: ScsiCommand) -> Response:
        cdb = cmd.cdb
        if not cdb:
            return INVALID_OPCODE
        op = OPS.get(cdb[0])
        if op is None:
            return INVALID_OPCODE
        if len(cdb) < op.length:
            return _bad_field()
        if self._capacity_changed and cdb[0] not in _NO_UNIT_ATTENTION:
            with self._lock:
                if self._capacity_changed:
                    self._capacity_changed = False
                    return Response.check(UNIT_ATTENTION, ASC_CAPACITY_DATA_HAS_CHANGED)
        fields = {name: f.get(cdb) for name, f in op.fields.items()}
        return op.handler(self, cmd, fields)

    def _range(self, lba: int, blocks: int) -> Response | None:
        if lba + blocks > self.num_lbas:
            return Response.check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, lba)
        return None

    # --- no data ------------------------------------------------------------------------
    def test_unit_ready(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        return GOOD

    def no_op(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        """START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: nothing to do on a virtual disk."""
        return GOOD

    def request_sense(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f["desc"]:
            return _bad_field()  # only fixed-format sense
        return _alloc(sense_fixed(NO_SENSE, ASC_NO_ADDITIONAL_SENSE), f["alloc"])

    # --- reads and writes ---------------------------------------------------------------
    def read(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f.get("flags", 0) & _RWPROTECT:
            return _bad_field()
        lba, blocks = f["lba"], f["length"]
        if (bad := self._range(lba, blocks)) is not None:
            return bad
        length = min(blocks * BLOCK_SIZE, cmd.data_length)
        if length == 0:
            return GOOD
        offset = lba * BLOCK_SIZE
        t0 = time.monotonic_ns()
        data = self._pread(offset, length)
        if data is None or len(data) != length:
            return Response.check(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, lba)
        if self.read_hook is not None:
            self.read_hook(offset, length, time.monotonic_ns() - t0)
        return Response(data=data)

    def _pread(self, offset: int, length: int) -> bytes | None:
        policy = self.read_retry
        start = time.monotonic()
        delay = policy.first_delay
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.device.pread(offset, length)
            except (OSError, RemoteError) as e:
                waited = time.monotonic() - start
                if waited + delay > policy.total:
                    _LOG.error(
                        "%s: read %d+%d failed after %d tries in %.1f s: %s",
                        self.name, offset, length, attempt, waited, e,
                    )  # fmt: skip
                    return None
                _LOG.warning(
                    "%s: read %d+%d failed (try %d), retrying in %.2f s: %s",
                    self.name, offset, length, attempt, delay, e,
                )  # fmt: skip
                self._sleep(delay)
                delay = min(delay * 2, policy.max_delay)
            except ObdError as e:  # corrupt or unsupported data: retrying cannot help
                _LOG.error("%s: read %d+%d failed: %s", self.name, offset, length, e)
                return None

    def write(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f.get("flags", 0) & _RWPROTECT:
            return _bad_field()
        lba, blocks = f["lba"], f["length"]
        if self.readonly:
            return WRITE_PROTECTED
        if (bad := self._range(lba, blocks)) is not None:
            return bad
        length = blocks * BLOCK_SIZE
        if length == 0:
            return GOOD
        data = cmd.data_out(length) if cmd.data_length >= length else b""
        if len(data) != length:
            return _bad_field()  # the initiator sends less than the CDB says
        err = self._do_write(functools.partial(self.device.pwrite, lba * BLOCK_SIZE, data))
        return self._settle(err, fua=bool(f.get("flags", 0) & _FUA))

    def _settle(self, err: Response | None, fua: bool = False) -> Response:
        """The answer to a write-type command that ran (``err``: its failure): a write
        with FUA, or any write while the write cache is off (the initiator then takes
        completion as durability), is flushed first."""
        if err is None and (fua or not self.write_cache):
            err = self._do_write(self.device.flush)
        return err or GOOD

    def _do_write(self, fn: Callable[[], object]) -> Response | None:
        """Run a device write; its failure as a response (None: it worked)."""
        try:
            fn()
        except ReadOnlyError:
            return WRITE_PROTECTED
        except OSError as e:
            _LOG.error("%s: write failed: %s", self.name, e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return Response.check(DATA_PROTECT, ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            if e.errno == errno.EROFS:
                return WRITE_PROTECTED
            return Response.check(MEDIUM_ERROR, ASC_WRITE_ERROR)
        except ObdError as e:
            _LOG.error("%s: write failed: %s", self.name, e)
            return Response.check(MEDIUM_ERROR, ASC_WRITE_ERROR)
        return None

    def write_same(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        flags, lba, blocks = f["flags"], f["lba"], f["length"]
        if flags & (_RWPROTECT | _WS_ANCHOR) or blocks == 0:
            return _bad_field()  # WSNZ: a length of 0 is not allowed
        if blocks > self.max_write_same_blocks:
            return _bad_field()
        if self.readonly:
            return WRITE_PROTECTED
        if (bad := self._range(lba, blocks)) is not None:
            return bad
        if flags & _WS_NDOB:
            block = bytes(BLOCK_SIZE)
        else:
            if cmd.data_length < BLOCK_SIZE:
                return _bad_field()
            block = cmd.data_out(BLOCK_SIZE)
        offset, length = lba * BLOCK_SIZE, blocks * BLOCK_SIZE
        dev = self.device
        # Zeros go to write_zeroes with or without the UNMAP bit (a hint, SBC-3 5.42): on a
        # log-structured upper that is a zeroed segment, unmapped and storing nothing;
        # a discard would not do, since on a sparse upper it lets the layers below show
        # through where the initiator asked for zeros.
        if block.count(0) == BLOCK_SIZE and callable(getattr(dev, "write_zeroes", None)):
            return self._settle(self._do_write(functools.partial(dev.write_zeroes, offset, length)))
        pattern = block * (_WS_CHUNK // BLOCK_SIZE)

        def fill() -> None:
            pos = 0
            while pos < length:
                n = min(len(pattern), length - pos)
                dev.pwrite(offset + pos, memoryview(pattern)[:n])
                pos += n

        return self._settle(self._do_write(fill))

    def unmap(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f["anchor"]:
            return _bad_field()
        if not self.can_unmap:
            return WRITE_PROTECTED if self.readonly else INVALID_OPCODE
        plen = f["plen"]
        if plen == 0:
            return GOOD
        if plen < 8:
            return _param_length()
        param = cmd.data_out(plen)
        if len(param) < plen:
            return _param_length()
        bdl = int.from_bytes(param[2:4], "big")
        count = min(bdl, plen - 8) // 16
        if count > self.max_unmap_descriptors:
            return _bad_param()
        ranges: list[tuple[int, int]] = []
        for i in range(count):
            lba, blocks = struct.unpack_from(">QI", param, 8 + 16 * i)
            if blocks > self.max_unmap_blocks:
                return _bad_param()
            if (bad := self._range(lba, blocks)) is not None:
                return bad
            if blocks:
                ranges.append((lba * BLOCK_SIZE, blocks * BLOCK_SIZE))
        dev = self.device
        for offset, length in ranges:
            err = self._do_write(functools.partial(dev.discard, offset, length))
            if err is not None:
                return err
        return self._settle(None)

    def synchronize_cache(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        lba, blocks = f["lba"], f["length"]
        if (bad := self._range(lba, blocks)) is not None:
            return bad
        if self.readonly:
            return GOOD  # nothing was written, nothing to flush
        return self._do_write(self.device.flush) or GOOD

    def verify(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        lba, blocks, bytchk = f["lba"], f["length"], f["bytchk"]
        if f["flags"] & _RWPROTECT or bytchk == 2:
            return _bad_field()
        if (bad := self._range(lba, blocks)) is not None:
            return bad
        if bytchk == 0 or blocks == 0:
            return GOOD  # the medium is verified by being readable on demand
        length = blocks * BLOCK_SIZE
        want = cmd.data_out(length if bytchk == 1 else BLOCK_SIZE)
        if bytchk == 3:
            want = want * blocks
        if len(want) < length:
            return _bad_field()
        have = self._pread(lba * BLOCK_SIZE, length)
        if have is None or len(have) != length:
            return Response.check(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, lba)
        if have != want:
            return Response.check(
                MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY, _first_difference(have, want)
            )
        return GOOD

    # --- capacity -----------------------------------------------------------------------
    def read_capacity10(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if not f["pmi"] and f["lba"]:
            return _bad_field()
        last = min(max(self.num_lbas - 1, 0), 0xFFFFFFFF)
        return Response(data=struct.pack(">II", last, BLOCK_SIZE))

    def service_action_in(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f["sa"] != _SAI_READ_CAPACITY_16:
            return _bad_field()
        lbp = 0x8000 if self.can_unmap else 0  # LBPME (LBPRZ clear: see _vpd_provisioning)
        data = struct.pack(
            ">QIBBH16x", max(self.num_lbas - 1, 0), BLOCK_SIZE, 0, _PHYSICAL_EXPONENT, lbp
        )
        return _alloc(data, f["alloc"])

    def report_luns(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f["alloc"] < 16 or f["select"] > 2:
            return _bad_field()
        return _alloc(struct.pack(">I4xQ", 8, 0), f["alloc"])

    # --- INQUIRY ------------------------------------------------------------------------
    def inquiry(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        if f["cmddt"]:
            return _bad_field()
        if not f["evpd"]:
            if f["page"]:
                return _bad_field()
            return _alloc(self.standard_inquiry(), f["alloc"])
        page = self.vpd_page(f["page"])
        if page is None:
            return _bad_field()
        return _alloc(page, f["alloc"])

    def standard_inquiry(self) -> bytes:
        return struct.pack(
            ">BBBBBBBB8s16s4s",
            0x00,  # peripheral qualifier 0, direct-access block device
            0x00,  # not removable
            0x05,  # SPC-3
            0x02,  # response data format 2
            36 - 5,  # additional length
            0x00,
            0x00,
            0x02,  # CmdQue
            VENDOR.encode().ljust(8),
            PRODUCT.encode().ljust(16),
            REVISION.encode().ljust(4),
        )

    def vpd_page(self, page: int) -> bytes | None:
        """VPD page ``page`` as INQUIRY returns it, or None when obd has no such page."""
        body = _VPD.get(page)
        if body is None:
            return None
        data = body(self)
        return struct.pack(">BBH", 0x00, page, len(data)) + data

    def _vpd_supported(self) -> bytes:
        return bytes(sorted(_VPD))

    def _vpd_serial(self) -> bytes:
        return self.serial.encode()

    def naa(self) -> bytes:
        """The 16-byte NAA IEEE Registered Extended designator (type 6) of this disk:
        LIO's company id, then 100 bits from the serial's hex digits (or its SHA-256
        when the serial has too few)."""
        digits = "".join(c for c in self.serial.lower() if c in "0123456789abcdef")
        if len(digits) < 25:
            digits = hashlib.sha256(self.serial.encode()).hexdigest()
        value = (0x6 << 124) | (LIO_OUI << 100) | int(digits[:25], 16)
        return value.to_bytes(16, "big")

    def _vpd_device_id(self) -> bytes:
        naa = self.naa()
        t10 = VENDOR.encode().ljust(8) + self.serial.encode()
        return (
            struct.pack(">BBBB", 0x01, 0x03, 0, len(naa))  # binary, LUN, NAA
            + naa
            + struct.pack(">BBBB", 0x02, 0x01, 0, len(t10))  # ASCII, LUN, T10 vendor id
            + t10
        )

    def _vpd_block_limits(self) -> bytes:
        unmap_blocks = self.max_unmap_blocks if self.can_unmap else 0
        unmap_descs = self.max_unmap_descriptors if self.can_unmap else 0
        return struct.pack(
            ">BBHIIIIIIIQ20x",
            0x01,  # WSNZ: WRITE SAME of 0 blocks is refused
            0,  # maximum COMPARE AND WRITE length: not supported
            8,  # optimal transfer length granularity: 4 KiB
            self.max_transfer_blocks,
            self.max_transfer_blocks,  # optimal transfer length
            0,  # maximum prefetch length
            unmap_blocks,
            unmap_descs,
            8 if self.can_unmap else 0,  # optimal unmap granularity: 4 KiB
            0,  # unmap granularity alignment (UGAVALID clear)
            self.max_write_same_blocks,
        )

    def _vpd_block_characteristics(self) -> bytes:
        return struct.pack(">HBB56x", 1, 0, 0)  # non-rotating medium

    def _vpd_provisioning(self) -> bytes:
        """LBPU, LBPWS, LBPWS10 and thin provisioning when UNMAP works. LBPRZ stays clear:
        after a discard a sparse upper shows the layers below, not zeros."""
        if not self.can_unmap:
            return bytes(4)
        return struct.pack(">BBBB", 0, 0x80 | 0x40 | 0x20, 0x02, 0)

    # --- MODE SENSE / MODE SELECT -------------------------------------------------------
    def mode_pages(self, pc: int) -> dict[int, bytes]:
        """The mode pages by code, for page control ``pc`` (0 current, 1 changeable,
        2 default). Nothing is changeable."""
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 18
        control = bytearray(12)
        control[0], control[1] = 0x0A, 10
        if pc != 1:
            caching[2] = 0x04 if self.write_cache else 0  # WCE
            control[3] = 0x10  # queue algorithm modifier 1: unrestricted reordering
        return {0x08: bytes(caching), 0x0A: bytes(control)}

    def _mode_data(self, f: dict[str, int], ten: bool) -> Response:
        pc, page, sub = f["pc"], f["page"], f["subpage"]
        if pc == 3:
            return Response.check(ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
        pages = self.mode_pages(pc)
        if page == 0x3F and sub in (0x00, 0xFF):
            body = b"".join(pages[k] for k in sorted(pages))
        elif page in pages and sub == 0:
            body = pages[page]
        else:
            return _bad_field()
        dsp = (_DP_WP if self.readonly else 0) | (_DP_DPOFUA if self.write_cache else 0)
        blocks = self.num_lbas
        if f["dbd"]:
            desc = b""
        elif ten and f["llbaa"]:
            desc = struct.pack(">Q4xI", blocks, BLOCK_SIZE)
        else:
            desc = struct.pack(">I", min(blocks, 0xFFFFFF)) + struct.pack(">I", BLOCK_SIZE)
            desc = b"\x00" + desc[1:4] + b"\x00" + desc[5:8]
        if ten:
            longlba = 1 if desc and f["llbaa"] else 0
            total = 8 + len(desc) + len(body)
            head = struct.pack(">HBBBBH", total - 2, 0, dsp, longlba, 0, len(desc))
        else:
            total = 4 + len(desc) + len(body)
            if total > 256:
                return _bad_field()
            head = struct.pack(">BBBB", total - 1, 0, dsp, len(desc))
        return _alloc(head + desc + body, f["alloc"])

    def mode_sense6(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        return self._mode_data(f, ten=False)

    def mode_sense10(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        return self._mode_data(f, ten=True)

    def mode_select6(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        return self._mode_select(cmd, f, ten=False)

    def mode_select10(self, cmd: ScsiCommand, f: dict[str, int]) -> Response:
        return self._mode_select(cmd, f, ten=True)

    def _mode_select(self, cmd: ScsiCommand, f: dict[str, int], ten: bool) -> Response:
        """Accepted when it changes nothing: every page sent equals the current one
        (the PS bit aside) and a block descriptor, if any, says 512-byte blocks."""
        if f["sp"]:
            return _bad_field()
        plen = f["plen"]
        if plen == 0:
            return GOOD
        hlen = 8 if ten else 4
        param = cmd.data_out(plen)
        if len(param) < plen or plen < hlen:
            return _param_length()
        bdl = int.from_bytes(param[6:8], "big") if ten else param[3]
        pos = hlen + bdl
        if pos > plen:
            return _param_length()
        if bdl and bdl % 8 == 0:
            length = int.from_bytes(param[pos - 3 : pos], "big")
            if length not in (0, BLOCK_SIZE):
                return _bad_param()
        elif bdl:
            return _bad_param()
        current = self.mode_pages(0)
        while pos < plen:
            if pos + 2 > plen:
                return _param_length()
            code = param[pos] & 0x3F
            if param[pos] & 0x40:  # SPF: subpage format, obd has no subpages
                return _bad_param()
            size = param[pos + 1] + 2
            page = param[pos : pos + size]
            mine = current.get(code)
            if mine is None or len(page) != len(mine) or page[1:] != mine[1:]:
                return _bad_param()
            pos += size
        return GOOD


_SAI_READ_CAPACITY_16 = 0x10
# 2**3 logical blocks per physical block: initiators align to 4 KiB, which a sparse upper
# needs (it rebuilds its index from the data file's extents, file system blocks) and
# every upper prefers (fewer, larger index entries)
_PHYSICAL_EXPONENT = 3
ASC_CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
_NO_UNIT_ATTENTION = frozenset({0x12, 0xA0, 0x03})  # INQUIRY, REPORT LUNS, REQUEST SENSE

_VPD: dict[int, Callable[[ScsiDisk], bytes]] = {
    0x00: ScsiDisk._vpd_supported,
    0x80: ScsiDisk._vpd_serial,
    0x83: ScsiDisk._vpd_device_id,
    0xB0: ScsiDisk._vpd_block_limits,
    0xB1: ScsiDisk._vpd_block_characteristics,
    0xB2: ScsiDisk._vpd_provisioning,
}

# --- the CDB table: every command obd decodes, its CDB fields and its handler -------------
_RW6: Fields = {"lba": F(1, 3, 0x1FFFFF), "length": F(4, zero=256)}
_RW10: Fields = {"flags": F(1), "lba": F(2, 4), "length": F(7, 2)}
_RW12: Fields = {"flags": F(1), "lba": F(2, 4), "length": F(6, 4)}
_RW16: Fields = {"flags": F(1), "lba": F(2, 8), "length": F(10, 4)}
_VERIFY10: Fields = {**_RW10, "bytchk": F(1, mask=0x06, shift=1)}
_VERIFY16: Fields = {**_RW16, "bytchk": F(1, mask=0x06, shift=1)}
_MODE_SENSE: Fields = {
    "dbd": F(1, mask=0x08, shift=3),
    "pc": F(2, mask=0xC0, shift=6),
    "page": F(2, mask=0x3F),
    "subpage": F(3),
}
_MODE_SELECT: Fields = {"pf": F(1, mask=0x10, shift=4), "sp": F(1, mask=0x01)}

OPS: dict[int, Op] = {
    0x00: Op("TEST UNIT READY", 6, {}, ScsiDisk.test_unit_ready),
    0x03: Op("REQUEST SENSE", 6, {"desc": F(1, mask=0x01), "alloc": F(4)}, ScsiDisk.request_sense),
    0x08: Op("READ(6)", 6, _RW6, ScsiDisk.read),
    0x0A: Op("WRITE(6)", 6, _RW6, ScsiDisk.write),
    0x12: Op(
        "INQUIRY",
        6,
        {"evpd": F(1, mask=0x01), "cmddt": F(1, mask=0x02), "page": F(2), "alloc": F(3, 2)},
        ScsiDisk.inquiry,
    ),
    0x15: Op("MODE SELECT(6)", 6, {**_MODE_SELECT, "plen": F(4)}, ScsiDisk.mode_select6),
    0x1A: Op("MODE SENSE(6)", 6, {**_MODE_SENSE, "alloc": F(4)}, ScsiDisk.mode_sense6),
    0x1B: Op("START STOP UNIT", 6, {}, ScsiDisk.no_op),
    0x1E: Op("PREVENT ALLOW MEDIUM REMOVAL", 6, {}, ScsiDisk.no_op),
    0x25: Op(
        "READ CAPACITY(10)",
        10,
        {"lba": F(2, 4), "pmi": F(8, mask=0x01)},
        ScsiDisk.read_capacity10,
    ),
    0x28: Op("READ(10)", 10, _RW10, ScsiDisk.read),
    0x2A: Op("WRITE(10)", 10, _RW10, ScsiDisk.write),
    0x2F: Op("VERIFY(10)", 10, _VERIFY10, ScsiDisk.verify),
    0x35: Op(
        "SYNCHRONIZE CACHE(10)", 10, {"lba": F(2, 4), "length": F(7, 2)}, ScsiDisk.synchronize_cache
    ),
    0x41: Op("WRITE SAME(10)", 10, _RW10, ScsiDisk.write_same),
    0x42: Op("UNMAP", 10, {"anchor": F(1, mask=0x01), "plen": F(7, 2)}, ScsiDisk.unmap),
    0x55: Op("MODE SELECT(10)", 10, {**_MODE_SELECT, "plen": F(7, 2)}, ScsiDisk.mode_select10),
    0x5A: Op(
        "MODE SENSE(10)",
        10,
        {**_MODE_SENSE, "llbaa": F(1, mask=0x10, shift=4), "alloc": F(7, 2)},
        ScsiDisk.mode_sense10,
    ),
    0x88: Op("READ(16)", 16, _RW16, ScsiDisk.read),
    0x8A: Op("WRITE(16)", 16, _RW16, ScsiDisk.write),
    0x8F: Op("VERIFY(16)", 16, _VERIFY16, ScsiDisk.verify),
    0x91: Op(
        "SYNCHRONIZE CACHE(16)",
        16,
        {"lba": F(2, 8), "length": F(10, 4)},
        ScsiDisk.synchronize_cache,
    ),
    0x93: Op("WRITE SAME(16)", 16, _RW16, ScsiDisk.write_same),
    0x9E: Op(
        "SERVICE ACTION IN(16)",
        16,
        {"sa": F(1, mask=0x1F), "alloc": F(10, 4)},
        ScsiDisk.service_action_in,
    ),
    0xA0: Op("REPORT LUNS", 12, {"select": F(2), "alloc": F(6, 4)}, ScsiDisk.report_luns),
    0xA8: Op("READ(12)", 12, _RW12, ScsiDisk.read),
    0xAA: Op("WRITE(12)", 12, _RW12, ScsiDisk.write),
}
"""opcode -> :class:`Op`. Anything else is ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE."""
