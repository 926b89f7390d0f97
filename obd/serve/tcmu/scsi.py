"""SCSI as obd's TCMU backstore answers it (docs/formats.md §7.2, docs/tcmu.md).

Statuses, sense data (fixed format, response code 0x70) and the :class:`Response` a
command handler returns live here; the command ring (``ring.py``) only moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
