"""NBD as obd speaks it: the wire constants and byte layouts (docs/formats.md §10).

Names are the protocol's (NetworkBlockDevice/nbd ``doc/proto.md``); every value and every
layout is declared here once, as ``"field:code ..."`` from which :func:`_layout` makes a
frozen dataclass with a ``STRUCT`` and ``pack()`` / ``unpack()``; the hot paths use the
``Struct`` aliases below (``REQUEST.unpack_from``) to build no object per request. All
integers are big-endian.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import astuple, make_dataclass
from typing import Any, ClassVar, TypeVar

from obd.errors import ObdError, ReadOnlyError

# --- magics -------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) ----------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags (16 bits) ------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# --- options ---------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# --- option replies --------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _REP_ERR + 1
NBD_REP_ERR_POLICY = _REP_ERR + 2
NBD_REP_ERR_INVALID = _REP_ERR + 3
NBD_REP_ERR_PLATFORM = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG = _REP_ERR + 9

# --- NBD_REP_INFO types ----------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- commands and command flags --------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# --- structured replies ----------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- error values (wire values, not the host's errno) ----------------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- base:allocation -------------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# --- limits ----------------------------------------------------------------------------
MIN_BLOCK_SIZE = 512
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 << 20  # largest READ / WRITE we serve (and advertise)
MAX_OPTION_DATA = 64 << 10  # longest option data we read (longer: NBD_REP_ERR_TOO_BIG)
MAX_OPTION_SKIP = 16 << 20  # longer option data than this ends the connection
MAX_STRING = 4096  # longest export name / query (proto.md "strings")
MAX_EXTENTS = 1 << 16  # descriptors in one block-status reply

COMMAND_NAMES = {
    value: name.removeprefix("NBD_CMD_")
    for name, value in dict(globals()).items()
    if name.startswith("NBD_CMD_") and not name.startswith("NBD_CMD_FLAG_")
}
"""``NBD_CMD_READ`` -> ``"READ"``..., for log lines."""


# --- wire layouts ------------------------------------------------------------------------
_L = TypeVar("_L", bound="Layout")


class Layout:
    """A fixed byte layout: ``STRUCT`` gives the bytes, the dataclass fields name them."""

    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*astuple(self))  # type: ignore[call-overload]

    @classmethod
    def unpack(cls: type[_L], buf: bytes | bytearray | memoryview, offset: int = 0) -> _L:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


def _layout(name: str, doc: str, fields: str) -> type[Any]:
    """A frozen :class:`Layout` dataclass from ``"name:code ..."`` (big-endian codes)."""
    pairs = [f.split(":") for f in fields.split()]
    fmt = struct.Struct(">" + "".join(code for _, code in pairs))
    namespace = {"STRUCT": fmt, "__doc__": doc, "__module__": __name__}
    fields_ = [(n, int) for n, _ in pairs]
    return make_dataclass(name, fields_, bases=(Layout,), frozen=True, namespace=namespace)


Handshake = _layout(
    "Handshake",
    "The server's greeting (18 bytes).",
    "magic:Q ihaveopt:Q flags:H",  # NBDMAGIC, IHAVEOPT, the handshake flags
)
ClientFlags = _layout("ClientFlags", "The client's answer to the greeting (4 bytes).", "flags:I")
OptionHeader = _layout(
    "OptionHeader",
    "An option request (16 bytes, then ``length`` bytes of data).",
    "magic:Q option:I length:I",  # magic IHAVEOPT
)
OptionReply = _layout(
    "OptionReply",
    "An option reply (20 bytes, then ``length`` bytes of data).",
    "magic:Q option:I type:I length:I",  # magic OPTION_REPLY_MAGIC, type NBD_REP_*
)
ExportNameReply = _layout(
    "ExportNameReply",
    "The answer to NBD_OPT_EXPORT_NAME (10 bytes, + 124 zeros without NO_ZEROES).",
    "size:Q flags:H",  # flags: transmission flags
)
InfoExport = _layout(
    "InfoExport",
    "NBD_REP_INFO data of type NBD_INFO_EXPORT (12 bytes).",
    "type:H size:Q flags:H",  # type NBD_INFO_EXPORT, flags transmission flags
)
InfoBlockSize = _layout(
    "InfoBlockSize",
    "NBD_REP_INFO data of type NBD_INFO_BLOCK_SIZE (14 bytes).",
    "type:H minimum:I preferred:I maximum:I",  # type NBD_INFO_BLOCK_SIZE
)
Request = _layout(
    "Request",
    "A transmission-phase request header (28 bytes; WRITE: then ``length`` bytes).",
    "magic:I flags:H type:H cookie:Q offset:Q length:I",  # REQUEST_MAGIC, NBD_CMD_FLAG_*, NBD_CMD_*
)
SimpleReply = _layout(
    "SimpleReply",
    "A simple reply (16 bytes; READ: then the data).",
    "magic:I error:I cookie:Q",  # SIMPLE_REPLY_MAGIC, NBD_E*
)
StructuredReply = _layout(
    "StructuredReply",
    "A structured reply chunk header (20 bytes, then ``length`` bytes of payload).",
    "magic:I flags:H type:H cookie:Q length:I",  # NBD_REPLY_FLAG_*, NBD_REPLY_TYPE_*
)
OffsetDataReply = _layout(
    "OffsetDataReply",
    "A structured NBD_REPLY_TYPE_OFFSET_DATA header with its offset (28 bytes).",
    "magic:I flags:H type:H cookie:Q length:I offset:Q",  # length: 8 + the data's length
)
ErrorPayload = _layout(
    "ErrorPayload",
    "The payload of NBD_REPLY_TYPE_ERROR (6 bytes, then the message).",
    "error:I message_length:H",
)
BlockDescriptor = _layout(
    "BlockDescriptor",
    "One extent of an NBD_REPLY_TYPE_BLOCK_STATUS payload (8 bytes).",
    "length:I flags:I",  # flags NBD_STATE_*
)

HANDSHAKE = Handshake.STRUCT
CLIENT_FLAGS = ClientFlags.STRUCT
OPTION_HEADER = OptionHeader.STRUCT
OPTION_REPLY = OptionReply.STRUCT
EXPORT_NAME_REPLY = ExportNameReply.STRUCT
INFO_EXPORT = InfoExport.STRUCT
INFO_BLOCK_SIZE = InfoBlockSize.STRUCT
REQUEST = Request.STRUCT
SIMPLE_REPLY = SimpleReply.STRUCT
STRUCTURED_REPLY = StructuredReply.STRUCT
OFFSET_DATA_REPLY = OffsetDataReply.STRUCT
ERROR_PAYLOAD = ErrorPayload.STRUCT
BLOCK_DESCRIPTOR = BlockDescriptor.STRUCT
U16 = struct.Struct(">H")  # lengths and info types inside option data
U32 = struct.Struct(">I")


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value a failed device call is reported with."""
    if isinstance(exc, ReadOnlyError):
        return NBD_EPERM
    if isinstance(exc, OSError) and not isinstance(exc, ObdError):
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return NBD_ENOSPC
        if code in (errno.EPERM, errno.EACCES, errno.EROFS):
            return NBD_EPERM
        if code == errno.EINVAL:
            return NBD_EINVAL
        if code == errno.ENOMEM:
            return NBD_ENOMEM
    if isinstance(exc, MemoryError):
        return NBD_ENOMEM
    return NBD_EIO
