"""The TCMU kernel interface as ``linux/target_core_user.h`` declares it (docs/formats.md §7).

Names are the header's (``tcmu_mailbox``, ``cmd_head``, ``len_op``, ``TCMU_OP_PAD``...), so
each layout compares field by field with the C. Each structure is one :class:`Layout` beside
a frozen dataclass with ``pack()`` / ``unpack()``; the ring's hot path uses the ``Struct``
aliases and ``LAYOUT.offset(...)`` directly to build no object per command. Byte order is
the host's; obd runs on little-endian hosts only (x86-64, arm64), and the layouts say so.
``tests/test_tcmu_uapi.py`` compiles a C program against the installed header and checks
every size and offset here.

The shared mapping of ``/dev/uioN`` is: the mailbox at 0, the command ring at
``cmdr_off`` (``cmdr_size`` bytes), the data area after it. Offsets in entries (``cdb_off``,
``iov_base``) are offsets into that mapping, not addresses.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass
from typing import ClassVar, TypeVar

from obd.formats.layout import Layout

TCMU_VERSION = "2.0"
TCMU_MAILBOX_VERSION = 2
ALIGN_SIZE = 64  # the mailbox's cmd_tail sits on its own cache line

# --- mailbox flags (tcmu_mailbox.flags: what the kernel can do) --------------------------
TCMU_MAILBOX_FLAG_CAP_OOOC = 1 << 0  # out-of-order completions
TCMU_MAILBOX_FLAG_CAP_READ_LEN = 1 << 1  # rsp.read_len is honoured with TCMU_UFLAG_READ_LEN
TCMU_MAILBOX_FLAG_CAP_TMR = 1 << 2  # TMR entries are queued in the ring
TCMU_MAILBOX_FLAG_CAP_KEEP_BUF = 1 << 3  # data buffer kept after completion (unused by obd)

# --- entry opcodes (low 3 bits of tcmu_cmd_entry_hdr.len_op) -----------------------------
TCMU_OP_PAD = 0
TCMU_OP_CMD = 1
TCMU_OP_TMR = 2
TCMU_OP_MASK = 0x7
TCMU_OP_ALIGN_SIZE = 8  # sizeof(__u64): every entry length is a multiple of it

# --- tcmu_cmd_entry_hdr.uflags (set by userspace) ----------------------------------------
TCMU_UFLAG_UNKNOWN_OP = 0x1
TCMU_UFLAG_READ_LEN = 0x2
TCMU_UFLAG_KEEP_BUF = 0x4

TCMU_SENSE_BUFFERSIZE = 96

# --- tcmu_tmr_entry.tmr_type -------------------------------------------------------------
TCMU_TMR_UNKNOWN = 0
TCMU_TMR_ABORT_TASK = 1
TCMU_TMR_ABORT_TASK_SET = 2
TCMU_TMR_CLEAR_ACA = 3
TCMU_TMR_CLEAR_TASK_SET = 4
TCMU_TMR_LUN_RESET = 5
TCMU_TMR_TARGET_WARM_RESET = 6
TCMU_TMR_TARGET_COLD_RESET = 7
TCMU_TMR_LUN_RESET_PRO = 128  # pseudo reset due to a PR OUT

# --- generic netlink: family "TCM-USER", multicast group "config" ------------------------
TCMU_GENL_FAMILY = "TCM-USER"
TCMU_GENL_VERSION = 2  # the family's version in drivers/target/target_core_user.c
TCMU_GENL_MCGRP = "config"

# enum tcmu_genl_cmd
TCMU_CMD_UNSPEC = 0
TCMU_CMD_ADDED_DEVICE = 1
TCMU_CMD_REMOVED_DEVICE = 2
TCMU_CMD_RECONFIG_DEVICE = 3
TCMU_CMD_ADDED_DEVICE_DONE = 4
TCMU_CMD_REMOVED_DEVICE_DONE = 5
TCMU_CMD_RECONFIG_DEVICE_DONE = 6
TCMU_CMD_SET_FEATURES = 7
TCMU_CMD_MAX = TCMU_CMD_SET_FEATURES

# enum tcmu_genl_attr (payload type per the kernel's policy in the comment)
TCMU_ATTR_UNSPEC = 0
TCMU_ATTR_DEVICE = 1  # string: the device's configfs name
TCMU_ATTR_MINOR = 2  # u32: N of /dev/uioN
TCMU_ATTR_PAD = 3
TCMU_ATTR_DEV_CFG = 4  # string: the new cfgstring (reconfig)
TCMU_ATTR_DEV_SIZE = 5  # u64: the new size in bytes (reconfig)
TCMU_ATTR_WRITECACHE = 6  # u8: the new emulate_write_cache (reconfig)
TCMU_ATTR_CMD_STATUS = 7  # s32: the reply's status, 0 or -errno
TCMU_ATTR_DEVICE_ID = 8  # u32: the device's index (echoed in *_DONE replies)
TCMU_ATTR_SUPP_KERN_CMD_REPLY = 9  # u8: SET_FEATURES: 1 = we send *_DONE replies
TCMU_ATTR_MAX = TCMU_ATTR_SUPP_KERN_CMD_REPLY


def _names(prefix: str, exclude: tuple[str, ...] = ()) -> dict[int, str]:
    return {
        value: name.removeprefix(prefix)
        for name, value in dict(globals()).items()
        if name.startswith(prefix) and name not in exclude and isinstance(value, int)
    }


TCMU_CMD_NAMES = _names("TCMU_CMD_", ("TCMU_CMD_MAX",))
"""``TCMU_CMD_ADDED_DEVICE`` -> ``"ADDED_DEVICE"``..., for log lines."""
TCMU_ATTR_NAMES = _names("TCMU_ATTR_", ("TCMU_ATTR_MAX",))
TCMU_TMR_NAMES = _names("TCMU_TMR_")


def tcmu_hdr_get_op(len_op: int) -> int:
    return len_op & TCMU_OP_MASK


def tcmu_hdr_get_len(len_op: int) -> int:
    return len_op & ~TCMU_OP_MASK & 0xFFFFFFFF


def tcmu_len_op(length: int, op: int) -> int:
    """``len_op`` of an entry of ``length`` bytes (a multiple of 8) and opcode ``op``."""
    return (length & ~TCMU_OP_MASK) | (op & TCMU_OP_MASK)


# --- layouts -----------------------------------------------------------------------------
_P = TypeVar("_P", bound="_Packed")


class _Packed:
    """``pack()`` / ``unpack()`` of a frozen dataclass over its ``LAYOUT``.

    The dataclass fields are the layout's named fields in order; pad bytes (``"Nx"``
    codes, the header's ``__pad`` members) carry no field and pack as zeros.
    """

    LAYOUT: ClassVar[Layout]
    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*astuple(self))  # type: ignore[call-overload]

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self.STRUCT.pack_into(buf, offset, *astuple(self))  # type: ignore[call-overload]

    @classmethod
    def unpack(cls: type[_P], buf: bytes | bytearray | memoryview, offset: int = 0) -> _P:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


_HDR_FIELDS = (("len_op", "I"), ("cmd_id", "H"), ("kflags", "B"), ("uflags", "B"))


@dataclass(frozen=True, slots=True)
class Mailbox(_Packed):
    """``struct tcmu_mailbox`` at offset 0 of the mapping (128 bytes).

    The kernel writes everything but ``cmd_tail``; userspace writes only ``cmd_tail``,
    which sits alone on the second 64-byte cache line.
    """

    LAYOUT = Layout(
        (
            ("version", "H"),
            ("flags", "H"),
            ("cmdr_off", "I"),
            ("cmdr_size", "I"),
            ("cmd_head", "I"),
            ("_pad_to_tail", "48x"),
            ("cmd_tail", "I"),
            ("_pad_to_end", "60x"),
        )
    )
    STRUCT = LAYOUT.struct

    version: int
    flags: int
    cmdr_off: int
    cmdr_size: int
    cmd_head: int
    cmd_tail: int


@dataclass(frozen=True, slots=True)
class CmdEntryHdr(_Packed):
    """``struct tcmu_cmd_entry_hdr`` (8 bytes) at the start of every ring entry."""

    LAYOUT = Layout(_HDR_FIELDS)
    STRUCT = LAYOUT.struct

    len_op: int
    cmd_id: int
    kflags: int
    uflags: int

    @property
    def op(self) -> int:
        return tcmu_hdr_get_op(self.len_op)

    @property
    def length(self) -> int:
        return tcmu_hdr_get_len(self.len_op)


@dataclass(frozen=True, slots=True)
class CmdEntryReq(_Packed):
    """``struct tcmu_cmd_entry`` as the kernel writes it (the ``req`` arm, 48 bytes).

    ``iov_cnt`` iovecs (:class:`Iovec`) follow at offset 48, then ``iov_bidi_cnt`` and
    ``iov_dif_cnt`` more; the CDB is at ``cdb_off`` of the mapping. The union's inner
    struct is not packed, so ``cdb_off`` is 8-aligned (4 pad bytes before it).
    """

    LAYOUT = Layout(
        (
            *_HDR_FIELDS,
            ("iov_cnt", "I"),
            ("iov_bidi_cnt", "I"),
            ("iov_dif_cnt", "I"),
            ("_align", "4x"),
            ("cdb_off", "Q"),
            ("__pad1", "8x"),
            ("__pad2", "8x"),
        )
    )
    STRUCT = LAYOUT.struct

    len_op: int
    cmd_id: int
    kflags: int
    uflags: int
    iov_cnt: int
    iov_bidi_cnt: int
    iov_dif_cnt: int
    cdb_off: int


@dataclass(frozen=True, slots=True)
class CmdEntryRsp(_Packed):
    """``struct tcmu_cmd_entry`` as userspace answers (the ``rsp`` arm, 112 bytes).

    Written over the request in place; ``read_len`` counts only with
    ``TCMU_UFLAG_READ_LEN`` in ``uflags`` (and ``TCMU_MAILBOX_FLAG_CAP_READ_LEN``).
    """

    LAYOUT = Layout(
        (
            *_HDR_FIELDS,
            ("scsi_status", "B"),
            ("__pad1", "x"),
            ("__pad2", "2x"),
            ("read_len", "I"),
            ("sense_buffer", f"{TCMU_SENSE_BUFFERSIZE}s"),
        )
    )
    STRUCT = LAYOUT.struct

    len_op: int
    cmd_id: int
    kflags: int
    uflags: int
    scsi_status: int
    read_len: int
    sense_buffer: bytes


@dataclass(frozen=True, slots=True)
class TmrEntry(_Packed):
    """``struct tcmu_tmr_entry`` (32 bytes, then ``cmd_cnt`` u16 ``cmd_ids``).

    Needs no answer: userspace only moves ``cmd_tail`` past it.
    """

    LAYOUT = Layout(
        (
            *_HDR_FIELDS,
            ("tmr_type", "B"),
            ("__pad1", "x"),
            ("__pad2", "2x"),
            ("cmd_cnt", "I"),
            ("__pad3", "8x"),
            ("__pad4", "8x"),
        )
    )
    STRUCT = LAYOUT.struct

    len_op: int
    cmd_id: int
    kflags: int
    uflags: int
    tmr_type: int
    cmd_cnt: int


@dataclass(frozen=True, slots=True)
class Iovec(_Packed):
    """``struct iovec`` in an entry (16 bytes): ``iov_base`` is an offset into the mapping."""

    LAYOUT = Layout((("iov_base", "Q"), ("iov_len", "Q")))
    STRUCT = LAYOUT.struct

    iov_base: int
    iov_len: int


# hot-path aliases
MAILBOX = Mailbox.STRUCT
CMD_ENTRY_HDR = CmdEntryHdr.STRUCT
CMD_ENTRY_REQ = CmdEntryReq.STRUCT
CMD_ENTRY_RSP = CmdEntryRsp.STRUCT
TMR_ENTRY = TmrEntry.STRUCT
IOVEC = Iovec.STRUCT
CMD_HEAD_OFF = Mailbox.LAYOUT.offset("cmd_head")
CMD_TAIL_OFF = Mailbox.LAYOUT.offset("cmd_tail")
IOV_OFF = CmdEntryReq.LAYOUT.size  # offsetof(struct tcmu_cmd_entry, req.iov)
TMR_CMD_IDS_OFF = TmrEntry.LAYOUT.size  # offsetof(struct tcmu_tmr_entry, cmd_ids)
