"""The SCSI emulation (obd/serve/tcmu/scsi.py): every opcode and every error path.

Answers are parsed back here from the SPC/SBC field definitions (and by sg3-utils'
``sg_vpd`` / ``sg_inq --inhex`` when installed); errors are checked as exact sense key,
ASC and ASCQ of fixed-format sense data. The device is ``tests.tcmu_emu.MemDisk``, a
``bytearray`` model with fault injection.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from obd.errors import CorruptError, ReadOnlyError, RemoteError
from obd.serve.tcmu import scsi, uapi
from obd.serve.tcmu.ring import CommandRing
from obd.serve.tcmu.scsi import OPS, ReadRetry, Response, ScsiDisk
from tests.tcmu_emu import Completion, KernelEmu, MemDisk

BLOCKS = 2048  # 1 MiB disk
BS = 512


@dataclass
class Cmd:
    cdb: bytes
    data_length: int = 0
    out: bytes = b""

    def data_out(self, length: int | None = None) -> bytes:
        n = self.data_length if length is None else min(length, self.data_length)
        return self.out[:n]


def run(disk: ScsiDisk, cdb: bytes, data_length: int = 0, out: bytes = b"") -> Response:
    if out and not data_length:
        data_length = len(out)
    return disk(Cmd(cdb, data_length, out))


def sense_of(rsp: Response) -> tuple[int, int, int]:
    assert rsp.status == scsi.SAM_STAT_CHECK_CONDITION, rsp
    s = rsp.sense
    assert len(s) == 18 and s[0] & 0x7F == 0x70 and s[7] == 10, s.hex()
    return s[2] & 0x0F, s[12], s[13]


def info_of(rsp: Response) -> int | None:
    s = rsp.sense
    return int.from_bytes(s[3:7], "big") if s[0] & 0x80 else None


def good(rsp: Response) -> bytes:
    assert rsp.status == scsi.SAM_STAT_GOOD, (rsp.status, rsp.sense.hex())
    return bytes(rsp.data or b"")


INVALID_OPCODE = (0x5, 0x20, 0x00)
LBA_OUT_OF_RANGE = (0x5, 0x21, 0x00)
INVALID_FIELD_CDB = (0x5, 0x24, 0x00)
INVALID_FIELD_PARAM = (0x5, 0x26, 0x00)
PARAM_LIST_LENGTH = (0x5, 0x1A, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
UNRECOVERED_READ = (0x3, 0x11, 0x00)
WRITE_ERROR = (0x3, 0x0C, 0x00)


# --- CDB builders (SBC-3 / SPC-4 layouts) -----------------------------------------------
def rw6(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBHBB", op, (lba >> 16) & 0x1F, lba & 0xFFFF, n & 0xFF, 0)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


READS = {
    "READ(6)": lambda lba, n, f=0: rw6(0x08, lba, n),
    "READ(10)": lambda lba, n, f=0: rw10(0x28, lba, n, f),
    "READ(12)": lambda lba, n, f=0: rw12(0xA8, lba, n, f),
    "READ(16)": lambda lba, n, f=0: rw16(0x88, lba, n, f),
}
WRITES = {
    "WRITE(6)": lambda lba, n, f=0: rw6(0x0A, lba, n),
    "WRITE(10)": lambda lba, n, f=0: rw10(0x2A, lba, n, f),
    "WRITE(12)": lambda lba, n, f=0: rw12(0xAA, lba, n, f),
    "WRITE(16)": lambda lba, n, f=0: rw16(0x8A, lba, n, f),
}


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255, cmddt: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd | cmddt << 1, page, alloc, 0)


def mode_sense6(page: int, pc: int = 0, sub: int = 0, dbd: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBBBB", 0x1A, dbd << 3, pc << 6 | page, sub, alloc, 0)


def mode_sense10(
    page: int, pc: int = 0, sub: int = 0, dbd: int = 0, llbaa: int = 0, alloc: int = 1024
) -> bytes:
    return struct.pack(">BBBBxxxHB", 0x5A, llbaa << 4 | dbd << 3, pc << 6 | page, sub, alloc, 0)


def sai_rc16(alloc: int = 32, sa: int = 0x10) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, sa, 0, alloc, 0, 0)


def unmap_cdb(plen: int, anchor: int = 0) -> bytes:
    return struct.pack(">BB5xHB", 0x42, anchor, plen, 0)


def unmap_param(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


@pytest.fixture
def dev() -> MemDisk:
    return MemDisk(BLOCKS * BS, data=random.Random(7).randbytes(BLOCKS * BS))


@pytest.fixture
def disk(dev: MemDisk) -> ScsiDisk:
    return ScsiDisk(dev, serial="0123456789abcdef0123456789abcdef", sleep=lambda s: None)


@pytest.fixture
def ro_disk() -> ScsiDisk:
    return ScsiDisk(MemDisk(BLOCKS * BS, readonly=True), serial="ro-image")


# --- the table ------------------------------------------------------------------------
def test_table_rows_are_consistent() -> None:
    names = [op.name for op in OPS.values()]
    assert len(names) == len(set(names))
    for code, op in OPS.items():
        assert op.length == scsi.cdb_length(code), op.name  # what the ring copies
        for name, field in op.fields.items():
            assert field.offset + field.width <= op.length, (op.name, name)


@pytest.mark.parametrize(
    "opcode",
    [0x01, 0x04, 0x07, 0x1D, 0x34, 0x3B, 0x3C, 0x4D, 0x5E, 0x83, 0x84, 0x85, 0x89, 0xA1,
     0xA3, 0xA4, 0xC0, 0xFF],
)  # fmt: skip
def test_unknown_opcodes_are_invalid_command_operation_code(disk: ScsiDisk, opcode: int) -> None:
    cdb = bytes([opcode]) + bytes(scsi.cdb_length(opcode) - 1)
    assert sense_of(run(disk, cdb)) == INVALID_OPCODE


def test_empty_and_short_cdbs(disk: ScsiDisk) -> None:
    assert sense_of(run(disk, b"")) == INVALID_OPCODE
    assert sense_of(run(disk, b"\x28\x00\x00")) == INVALID_FIELD_CDB


@pytest.mark.parametrize("opcode", [0x00, 0x1B, 0x1E], ids=["TUR", "START STOP", "PREVENT"])
def test_no_data_commands(disk: ScsiDisk, opcode: int) -> None:
    assert good(run(disk, bytes([opcode, 0, 0, 0, 1, 0]))) == b""


def test_request_sense(disk: ScsiDisk) -> None:
    data = good(run(disk, bytes([0x03, 0, 0, 0, 252, 0]), 252))
    assert len(data) == 18 and data[0] == 0x70 and data[2] == 0 and data[12:14] == b"\0\0"
    assert good(run(disk, bytes([0x03, 0, 0, 0, 8, 0]), 8)) == data[:8]
    assert sense_of(run(disk, bytes([0x03, 1, 0, 0, 252, 0]))) == INVALID_FIELD_CDB


def test_sense_information_field() -> None:
    s = scsi.sense_fixed(scsi.ILLEGAL_REQUEST, scsi.ASC_LBA_OUT_OF_RANGE, 0x12345678)
    assert s[0] == 0xF0 and s[3:7] == bytes.fromhex("12345678")
    assert scsi.sense_fixed(scsi.ILLEGAL_REQUEST, scsi.ASC_LBA_OUT_OF_RANGE, 1 << 40)[0] == 0x70


# --- INQUIRY --------------------------------------------------------------------------
def test_standard_inquiry(disk: ScsiDisk) -> None:
    data = good(run(disk, inquiry(), 255))
    assert len(data) == 36 and data[4] == 31
    assert data[0] == 0x00 and data[1] & 0x80 == 0  # disk, not removable
    assert data[2] == 0x05 and data[3] & 0x0F == 2  # SPC-3, format 2
    assert data[7] & 0x02  # CmdQue
    assert data[8:16] == b"LIO-ORG " and data[16:32] == b"TCMU device     "
    assert data[32:36] == b"0002"
    assert good(run(disk, inquiry(alloc=5), 5)) == data[:5]


def test_inquiry_field_errors(disk: ScsiDisk) -> None:
    assert sense_of(run(disk, inquiry(page=0x80))) == INVALID_FIELD_CDB  # page without EVPD
    assert sense_of(run(disk, inquiry(cmddt=1))) == INVALID_FIELD_CDB
    for page in (0x01, 0x86, 0x89, 0xB3, 0xC0):
        assert sense_of(run(disk, inquiry(1, page))) == INVALID_FIELD_CDB


def vpd(disk: ScsiDisk, page: int) -> bytes:
    data = good(run(disk, inquiry(1, page, 1024), 1024))
    assert data[0] == 0 and data[1] == page
    assert int.from_bytes(data[2:4], "big") == len(data) - 4
    return data


def test_vpd_pages_parsed_back(disk: ScsiDisk) -> None:
    assert list(vpd(disk, 0x00)[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert vpd(disk, 0x80)[4:] == b"0123456789abcdef0123456789abcdef"
    # 0x83: designation descriptors
    page = vpd(disk, 0x83)
    pos, found = 4, {}
    while pos < len(page):
        code_set, kind, length = page[pos] & 0x0F, page[pos + 1] & 0x0F, page[pos + 3]
        assert page[pos + 1] & 0x30 == 0  # association: the logical unit
        found[kind] = (code_set, page[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(page)
    code_set, naa = found[3]
    assert code_set == 1 and len(naa) == 16
    value = int.from_bytes(naa, "big")
    assert value >> 124 == 6 and (value >> 100) & 0xFFFFFF == 0x001405
    assert value & ((1 << 100) - 1) == int("0123456789abcdef012345678", 16)
    assert found[1] == (2, b"LIO-ORG 0123456789abcdef0123456789abcdef")
    # 0xB0: block limits
    b0 = vpd(disk, 0xB0)
    assert len(b0) == 64 and b0[4] & 1  # WSNZ
    (_gran, max_xfer, opt_xfer, _pf, unmap_lbas, unmap_descs, unmap_gran, _ua, max_ws) = (
        struct.unpack_from(">HIIIIIIIQ", b0, 6)
    )
    assert (max_xfer, opt_xfer) == (128, 128)
    assert (unmap_lbas, unmap_descs, unmap_gran) == (1 << 22, 256, 8)
    assert max_ws == 1 << 22
    b1 = vpd(disk, 0xB1)
    assert len(b1) == 64 and int.from_bytes(b1[4:6], "big") == 1  # non-rotating
    b2 = vpd(disk, 0xB2)
    assert b2[5] & 0x80 and b2[5] & 0x40 and b2[5] & 0x20  # LBPU, LBPWS, LBPWS10
    assert not b2[5] & 0x04 and b2[6] & 0x07 == 2  # not LBPRZ (sparse uppers); thin


def test_vpd_of_a_read_only_image(ro_disk: ScsiDisk) -> None:
    b2 = vpd(ro_disk, 0xB2)
    assert b2[5] == 0 and b2[6] == 0
    (unmap_lbas, unmap_descs) = struct.unpack_from(">II", vpd(ro_disk, 0xB0), 20)
    assert (unmap_lbas, unmap_descs) == (0, 0)
    # a short serial: the NAA designator falls back to its hash, still type 6 / LIO's OUI
    naa = int.from_bytes(vpd(ro_disk, 0x83)[8:24], "big")
    assert naa >> 124 == 6 and (naa >> 100) & 0xFFFFFF == 0x001405


def test_vpd_pages_decoded_by_sg3_utils(disk: ScsiDisk, tmp_path: Path) -> None:
    if shutil.which("sg_vpd") is None or shutil.which("sg_inq") is None:
        pytest.skip("sg3-utils (sg_vpd, sg_inq) not installed")

    def decode(tool: str, data: bytes) -> str:
        f = tmp_path / "page.hex"
        f.write_text(data.hex(" "))
        r = subprocess.run(
            [tool, f"--inhex={f}"], capture_output=True, text=True, timeout=30, check=False
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = decode("sg_inq", good(run(disk, inquiry(), 255)))
    assert "LIO-ORG" in out and "TCMU device" in out and "CmdQue=1" in out
    assert "[SPC-3]" in out
    assert "Block limits (SBC)" in decode("sg_vpd", vpd(disk, 0x00))
    assert "0123456789abcdef0123456789abcdef" in decode("sg_vpd", vpd(disk, 0x80))
    out = decode("sg_vpd", vpd(disk, 0x83))
    assert "NAA" in out and "0x60014050123456789abcdef012345678" in out
    out = decode("sg_vpd", vpd(disk, 0xB0))
    assert "Maximum transfer length: 128 blocks" in out
    assert "Maximum unmap LBA count: 4194304" in out
    out = decode("sg_vpd", vpd(disk, 0xB2))
    assert "(LBPU): 1" in out and "(LBPWS): 1" in out and "(LBPRZ): 0" in out
    assert "Non-rotating medium" in decode("sg_vpd", vpd(disk, 0xB1))


# --- capacity -------------------------------------------------------------------------
def test_read_capacity10(disk: ScsiDisk, ro_disk: ScsiDisk) -> None:
    cdb = bytes([0x25]) + bytes(9)
    assert struct.unpack(">II", good(run(disk, cdb, 8))) == (BLOCKS - 1, 512)
    bad = bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])  # an LBA without PMI
    assert sense_of(run(disk, bad)) == INVALID_FIELD_CDB
    pmi = bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0])
    assert struct.unpack(">II", good(run(disk, pmi, 8))) == (BLOCKS - 1, 512)
    assert struct.unpack(">II", good(run(ro_disk, cdb, 8))) == (BLOCKS - 1, 512)


class HugeDisk(MemDisk):
    """Claims 3 TiB (more than READ CAPACITY(10) can say); reads zeros."""

    def size(self) -> int:
        return 3 << 40

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(length)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_transfer_blocks"):
        ScsiDisk(MemDisk(BS), serial="x", max_transfer_blocks=0)
    with pytest.raises(ValueError, match="max_write_same_blocks"):
        ScsiDisk(MemDisk(BS), serial="x", max_write_same_blocks=1 << 32)
    with pytest.raises(ValueError, match="retry"):
        ReadRetry(first_delay=0)


def test_read_capacity_of_a_disk_over_2tib() -> None:
    d = ScsiDisk(HugeDisk(0), serial="huge")
    data = good(run(d, bytes([0x25]) + bytes(9), 8))
    assert struct.unpack(">II", data) == (0xFFFFFFFF, 512)
    data = good(run(d, sai_rc16(), 32))
    assert struct.unpack_from(">QI", data) == ((3 << 40) // 512 - 1, 512)
    assert good(run(d, rw16(0x88, (3 << 40) // 512 - 1, 1), 512)) == bytes(512)


def test_read_capacity16(disk: ScsiDisk, ro_disk: ScsiDisk) -> None:
    data = good(run(disk, sai_rc16(), 32))
    assert len(data) == 32
    last, bs, prot, exp, lbp = struct.unpack_from(">QIBBH", data)
    assert (last, bs, prot, exp & 0x0F) == (BLOCKS - 1, 512, 0, 3)  # 4 KiB physical blocks
    assert lbp & 0x8000 and not lbp & 0x4000  # LBPME: UNMAP works; not LBPRZ
    ro = good(run(ro_disk, sai_rc16(), 32))
    assert struct.unpack_from(">H", ro, 14)[0] & 0xC000 == 0
    assert good(run(disk, sai_rc16(alloc=12), 12)) == data[:12]
    assert sense_of(run(disk, sai_rc16(sa=0x12))) == INVALID_FIELD_CDB  # GET LBA STATUS


def test_capacity_change_is_a_unit_attention_once(dev: MemDisk, disk: ScsiDisk) -> None:
    dev.buf.extend(bytes(BLOCKS * BS))
    disk.refresh()
    good(run(disk, inquiry(), 36))  # INQUIRY never reports it
    assert sense_of(run(disk, bytes(6))) == (0x6, 0x2A, 0x09)
    good(run(disk, bytes(6)))
    assert struct.unpack(">II", good(run(disk, bytes([0x25]) + bytes(9), 8)))[0] == 2 * BLOCKS - 1
    disk.refresh()  # same size: nothing to report
    good(run(disk, bytes(6)))


# --- MODE SENSE / MODE SELECT ----------------------------------------------------------
def parse_mode6(data: bytes) -> tuple[int, bytes, dict[int, bytes]]:
    assert data[0] == len(data) - 1
    dsp, bdl = data[2], data[3]
    return dsp, data[4 : 4 + bdl], pages_of(data[4 + bdl :])


def parse_mode10(data: bytes) -> tuple[int, int, bytes, dict[int, bytes]]:
    assert int.from_bytes(data[0:2], "big") == len(data) - 2
    dsp, longlba, bdl = data[3], data[4] & 1, int.from_bytes(data[6:8], "big")
    return dsp, longlba, data[8 : 8 + bdl], pages_of(data[8 + bdl :])


def pages_of(body: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(body):
        code, n = body[pos] & 0x3F, body[pos + 1]
        out[code] = body[pos : pos + 2 + n]
        pos += 2 + n
    assert pos == len(body)
    return out


def test_mode_sense6(disk: ScsiDisk) -> None:
    dsp, desc, pages = parse_mode6(good(run(disk, mode_sense6(0x3F), 255)))
    assert dsp & 0x80 == 0 and dsp & 0x10  # not write-protected, DPOFUA
    assert len(desc) == 8
    assert int.from_bytes(desc[1:4], "big") == BLOCKS and int.from_bytes(desc[5:8], "big") == 512
    assert sorted(pages) == [0x08, 0x0A]
    assert len(pages[0x08]) == 20 and pages[0x08][2] & 0x04  # WCE: the initiator flushes
    _, desc, pages = parse_mode6(good(run(disk, mode_sense6(0x08, dbd=1), 255)))
    assert desc == b"" and list(pages) == [0x08]
    full = good(run(disk, mode_sense6(0x3F), 255))
    assert good(run(disk, mode_sense6(0x3F, alloc=4), 4)) == full[:4]


def test_mode_sense10(disk: ScsiDisk) -> None:
    dsp, longlba, desc, pages = parse_mode10(good(run(disk, mode_sense10(0x3F), 1024)))
    assert longlba == 0 and len(desc) == 8 and sorted(pages) == [0x08, 0x0A]
    assert dsp & 0x10 and not dsp & 0x80
    _, longlba, desc, pages = parse_mode10(good(run(disk, mode_sense10(0x08, llbaa=1), 1024)))
    assert longlba == 1 and len(desc) == 16
    assert struct.unpack(">Q4xI", desc) == (BLOCKS, 512)
    _, _, desc, pages = parse_mode10(good(run(disk, mode_sense10(0x0A, dbd=1), 1024)))
    assert desc == b"" and list(pages) == [0x0A] and len(pages[0x0A]) == 12
    _, _, _, pages = parse_mode10(good(run(disk, mode_sense10(0x3F, sub=0xFF), 1024)))
    assert sorted(pages) == [0x08, 0x0A]


def test_mode_sense_page_control(disk: ScsiDisk) -> None:
    _, _, pages = parse_mode6(good(run(disk, mode_sense6(0x08, pc=1), 255)))
    assert pages[0x08][2:] == bytes(18)  # nothing is changeable
    _, _, pages = parse_mode6(good(run(disk, mode_sense6(0x08, pc=2), 255)))
    assert pages[0x08][2] & 0x04
    assert sense_of(run(disk, mode_sense6(0x08, pc=3))) == (0x5, 0x39, 0x00)
    assert sense_of(run(disk, mode_sense10(0x3F, pc=3))) == (0x5, 0x39, 0x00)


def test_mode_sense_errors(disk: ScsiDisk) -> None:
    for page in (0x01, 0x1C, 0x19):
        assert sense_of(run(disk, mode_sense6(page))) == INVALID_FIELD_CDB
        assert sense_of(run(disk, mode_sense10(page))) == INVALID_FIELD_CDB
    assert sense_of(run(disk, mode_sense6(0x08, sub=1))) == INVALID_FIELD_CDB


def test_mode_sense_of_a_read_only_image(ro_disk: ScsiDisk) -> None:
    dsp, _, pages = parse_mode6(good(run(ro_disk, mode_sense6(0x3F), 255)))
    assert dsp & 0x80 and not dsp & 0x10  # WP; no FUA on a disk that takes no writes
    assert not pages[0x08][2] & 0x04  # no write cache
    dsp, _, _, _ = parse_mode10(good(run(ro_disk, mode_sense10(0x3F), 1024)))
    assert dsp & 0x80


def test_mode_select(disk: ScsiDisk) -> None:
    caching = disk.mode_pages(0)[0x08]
    param6 = bytes(4) + caching
    cdb6 = struct.pack(">BBBBBB", 0x15, 0x10, 0, 0, len(param6), 0)
    assert good(run(disk, cdb6, out=param6)) == b""  # the current values: harmless
    ps = bytes([caching[0] | 0x80]) + caching[1:]  # the PS bit set, as MODE SENSE may return
    assert good(run(disk, cdb6, out=bytes(4) + ps)) == b""
    changed = bytearray(caching)
    changed[2] &= ~0x04  # turn the write cache off: not changeable
    assert sense_of(run(disk, cdb6, out=bytes(4) + changed)) == INVALID_FIELD_PARAM
    unknown = bytes([0x1C, 10]) + bytes(10)
    cdb = struct.pack(">BBBBBB", 0x15, 0x10, 0, 0, 16, 0)
    assert sense_of(run(disk, cdb, out=bytes(4) + unknown)) == INVALID_FIELD_PARAM
    save = struct.pack(">BBBBBB", 0x15, 0x11, 0, 0, len(param6), 0)
    assert sense_of(run(disk, save, out=param6)) == INVALID_FIELD_CDB
    assert good(run(disk, struct.pack(">BBBBBB", 0x15, 0x10, 0, 0, 0, 0))) == b""
    short = struct.pack(">BBBBBB", 0x15, 0x10, 0, 0, 3, 0)
    assert sense_of(run(disk, short, out=bytes(3))) == PARAM_LIST_LENGTH
    # MODE SELECT(10) with a block descriptor
    desc_ok = struct.pack(">I", BLOCKS) + struct.pack(">I", 512)
    param10 = struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 8) + desc_ok + caching
    cdb10 = struct.pack(">BBxxxxxHB", 0x55, 0x10, len(param10), 0)
    assert good(run(disk, cdb10, out=param10)) == b""
    bad_desc = [
        (struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 16) + desc_ok, PARAM_LIST_LENGTH),  # past the end
        (struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 5) + bytes(5) + caching, INVALID_FIELD_PARAM),
        (struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 0) + caching[:1], PARAM_LIST_LENGTH),  # cut page
        (
            struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 0) + bytes([0x48]) + caching[1:],
            INVALID_FIELD_PARAM,
        ),  # SPF
    ]
    for param, expect in bad_desc:
        cdb = struct.pack(">BBxxxxxHB", 0x55, 0x10, len(param), 0)
        assert sense_of(run(disk, cdb, out=param)) == expect, param.hex()
    desc_4k = struct.pack(">I", BLOCKS) + struct.pack(">I", 4096)
    param10 = struct.pack(">HBBBBH", 0, 0, 0, 0, 0, 8) + desc_4k + caching
    assert sense_of(run(disk, cdb10, out=param10)) == INVALID_FIELD_PARAM


# --- READ / WRITE ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(READS))
def test_reads(dev: MemDisk, disk: ScsiDisk, name: str) -> None:
    cdb = READS[name]
    assert good(run(disk, cdb(5, 3), 3 * BS)) == dev.buf[5 * BS : 8 * BS]
    assert good(run(disk, cdb(BLOCKS - 2, 2), 2 * BS)) == dev.buf[-2 * BS :]
    r = run(disk, cdb(BLOCKS - 2, 3), 3 * BS)
    assert sense_of(r) == LBA_OUT_OF_RANGE and info_of(r) == BLOCKS - 2
    if name != "READ(6)":
        assert good(run(disk, cdb(BLOCKS, 0))) == b""  # 0 blocks at the end: nothing
        assert sense_of(run(disk, cdb(BLOCKS + 1, 0))) == LBA_OUT_OF_RANGE
        assert sense_of(run(disk, cdb(0, 1, 0x20), BS)) == INVALID_FIELD_CDB  # RDPROTECT


def test_read6_of_zero_blocks_reads_256(dev: MemDisk, disk: ScsiDisk) -> None:
    assert good(run(disk, rw6(0x08, 0, 0), 256 * BS)) == dev.buf[: 256 * BS]
    assert good(run(disk, rw6(0x08, 0x1FFFFF & 100, 1), BS)) == dev.buf[100 * BS : 101 * BS]


@pytest.mark.parametrize("name", list(WRITES))
def test_writes(dev: MemDisk, disk: ScsiDisk, name: str) -> None:
    cdb = WRITES[name]
    data = random.Random(8).randbytes(4 * BS)
    before = bytes(dev.buf)
    assert good(run(disk, cdb(10, 4), out=data)) == b""
    assert dev.buf[10 * BS : 14 * BS] == data
    assert dev.buf[: 10 * BS] == before[: 10 * BS] and dev.buf[14 * BS :] == before[14 * BS :]
    r = run(disk, cdb(BLOCKS - 1, 2), out=bytes(2 * BS))
    assert sense_of(r) == LBA_OUT_OF_RANGE and info_of(r) == BLOCKS - 1
    assert sense_of(run(disk, cdb(0, 2), BS, bytes(BS))) == INVALID_FIELD_CDB  # data short
    if name != "WRITE(6)":  # (WRITE(6) of 0 blocks writes 256)
        assert good(run(disk, cdb(BLOCKS, 0))) == b""
    if name != "WRITE(6)":
        assert sense_of(run(disk, cdb(0, 1, 0x40), out=bytes(BS))) == INVALID_FIELD_CDB
        flushes = dev.flushes
        assert good(run(disk, cdb(0, 1, 0x08), out=bytes(BS))) == b""  # FUA
        assert dev.flushes == flushes + 1


def test_write_cache_off_flushes_every_write(dev: MemDisk) -> None:
    disk = ScsiDisk(dev, serial="wt", write_cache=False)
    _, _, pages = parse_mode6(good(run(disk, mode_sense6(0x08), 255)))
    assert not pages[0x08][2] & 0x04  # WCE clear: completion means durable
    good(run(disk, rw10(0x2A, 0, 1), out=bytes(BS)))
    good(run(disk, rw16(0x93, 0, 8), out=b"\x01" * BS))
    good(run(disk, rw16(0x93, 8, 8), out=bytes(BS)))
    param = unmap_param((16, 8))
    good(run(disk, unmap_cdb(len(param)), out=param))
    assert dev.flushes == 4
    dev.fail_flush = 1
    assert sense_of(run(disk, rw10(0x2A, 0, 1), out=bytes(BS))) == WRITE_ERROR
    on = ScsiDisk(dev, serial="wb")
    good(run(on, rw10(0x2A, 0, 1), out=bytes(BS)))
    assert dev.flushes == 4  # write back: only SYNCHRONIZE CACHE and FUA flush


@pytest.mark.parametrize("name", list(WRITES))
def test_writes_to_a_read_only_image_are_data_protect(ro_disk: ScsiDisk, name: str) -> None:
    assert sense_of(run(ro_disk, WRITES[name](0, 1), out=bytes(BS))) == WRITE_PROTECTED


def test_read_errors_are_retried_within_bounds(dev: MemDisk) -> None:
    slept: list[float] = []
    policy = ReadRetry(first_delay=0.02, max_delay=0.1, total=0.5)
    disk = ScsiDisk(dev, serial="r", read_retry=policy, sleep=slept.append)
    dev.fail_reads = 3
    assert good(run(disk, rw10(0x28, 0, 1), BS)) == dev.buf[:BS]  # recovered on the 4th try
    assert slept == [0.02, 0.04, 0.08]
    slept.clear()
    dev.read_error = RemoteError("registry said 503")
    dev.fail_reads = 10**6
    # the clock never moves here (sleep is fake), so stop it from the policy side:
    # total=0 tries once
    once = ScsiDisk(dev, serial="r", read_retry=ReadRetry(total=0), sleep=slept.append)
    r = run(once, rw10(0x28, 7, 1), BS)
    assert sense_of(r) == UNRECOVERED_READ and info_of(r) == 7 and slept == []


def test_read_retry_gives_up_after_total(dev: MemDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(scsi.time, "monotonic", lambda: clock[0])

    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    policy = ReadRetry(first_delay=0.02, max_delay=1.0, total=5.0)
    disk = ScsiDisk(dev, serial="r", read_retry=policy, sleep=sleep)
    dev.fail_reads = 10**6
    assert sense_of(run(disk, rw10(0x28, 0, 1), BS)) == UNRECOVERED_READ
    assert sum(slept) <= 5.0 and max(slept) == 1.0
    assert slept[:4] == [0.02, 0.04, 0.08, 0.16]


def test_read_failures_that_retrying_cannot_fix(dev: MemDisk) -> None:
    slept: list[float] = []
    disk = ScsiDisk(dev, serial="r", sleep=slept.append)
    dev.read_error = CorruptError("bad zfile block", path="layer.zfile")
    dev.fail_reads = 1
    assert sense_of(run(disk, rw10(0x28, 0, 1), BS)) == UNRECOVERED_READ and slept == []
    dev.short_reads = 1
    assert sense_of(run(disk, rw10(0x28, 0, 1), BS)) == UNRECOVERED_READ


def test_read_hook(dev: MemDisk) -> None:
    seen: list[tuple[int, int, int]] = []
    disk = ScsiDisk(dev, serial="h", read_hook=lambda o, n, ns: seen.append((o, n, ns)))
    good(run(disk, rw10(0x28, 3, 2), 2 * BS))
    assert [(o, n) for o, n, _ in seen] == [(3 * BS, 2 * BS)] and seen[0][2] >= 0


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (OSError(errno.EIO, "io"), WRITE_ERROR),
        (OSError(errno.ENOSPC, "full"), (0x7, 0x27, 0x07)),
        (OSError(errno.EROFS, "ro fs"), WRITE_PROTECTED),
        (ReadOnlyError("sealed"), WRITE_PROTECTED),
        (CorruptError("index full"), WRITE_ERROR),
    ],
    ids=["EIO", "ENOSPC", "EROFS", "ReadOnlyError", "ObdError"],
)
def test_write_failures(dev: MemDisk, disk: ScsiDisk, error: Exception, expect: tuple) -> None:
    dev.write_error = error
    dev.fail_writes = 1
    assert sense_of(run(disk, rw10(0x2A, 0, 1), out=bytes(BS))) == expect


# --- WRITE SAME / UNMAP -----------------------------------------------------------------
@pytest.mark.parametrize("op", [0x41, 0x93], ids=["WRITE SAME(10)", "WRITE SAME(16)"])
def test_write_same(dev: MemDisk, disk: ScsiDisk, op: int) -> None:
    cdb = (
        (lambda lba, n, f=0: rw10(op, lba, n, f))
        if op == 0x41
        else (lambda lba, n, f=0: rw16(op, lba, n, f))
    )
    # UNMAP bit with a zero block: write_zeroes (a zeroed segment on an LSMT upper), never
    # a discard, which may let lower layers show through
    assert good(run(disk, cdb(8, 16, 0x08), out=bytes(BS))) == b""
    assert dev.zeroes == [(8 * BS, 16 * BS)] and dev.buf[8 * BS : 24 * BS] == bytes(16 * BS)
    # a pattern is written to every block, even with the UNMAP bit
    pattern = bytes(range(256)) * 2
    assert good(run(disk, cdb(30, 5, 0x08), out=pattern)) == b""
    assert dev.buf[30 * BS : 35 * BS] == pattern * 5 and len(dev.zeroes) == 1
    # zeros without the UNMAP bit: the same
    assert good(run(disk, cdb(40, 3), out=bytes(BS))) == b""
    assert dev.buf[40 * BS : 43 * BS] == bytes(3 * BS) and len(dev.zeroes) == 2
    assert dev.discards == []
    assert sense_of(run(disk, cdb(0, 0), out=bytes(BS))) == INVALID_FIELD_CDB  # WSNZ
    assert sense_of(run(disk, cdb(0, 1, 0x10), out=bytes(BS))) == INVALID_FIELD_CDB  # ANCHOR
    r = run(disk, cdb(BLOCKS - 1, 2), out=bytes(BS))
    assert sense_of(r) == LBA_OUT_OF_RANGE
    assert sense_of(run(disk, cdb(0, 1), 0, b"")) == INVALID_FIELD_CDB  # no data block


def test_write_same16_ndob_and_limits(dev: MemDisk) -> None:
    disk = ScsiDisk(dev, serial="w", max_write_same_blocks=8)
    dev.buf[: 4 * BS] = b"\xff" * (4 * BS)
    assert good(run(disk, rw16(0x93, 0, 4, 0x01 | 0x08))) == b""  # NDOB + UNMAP
    assert dev.zeroes == [(0, 4 * BS)] and dev.buf[: 4 * BS] == bytes(4 * BS)
    assert sense_of(run(disk, rw16(0x93, 0, 9), out=bytes(BS))) == INVALID_FIELD_CDB


def test_write_same_large_pattern_crosses_chunks(dev: MemDisk) -> None:
    disk = ScsiDisk(dev, serial="w")
    block = b"\xa5" * BS
    assert good(run(disk, rw16(0x93, 0, BLOCKS), out=block)) == b""
    assert dev.buf == block * BLOCKS


def test_write_same_on_read_only_and_failing_devices(dev: MemDisk, ro_disk: ScsiDisk) -> None:
    assert sense_of(run(ro_disk, rw10(0x41, 0, 1, 0x08), out=bytes(BS))) == WRITE_PROTECTED
    disk = ScsiDisk(dev, serial="w")
    dev.fail_writes = 1
    assert sense_of(run(disk, rw10(0x41, 0, 1, 0x08), out=bytes(BS))) == WRITE_ERROR


def test_unmap(dev: MemDisk, disk: ScsiDisk) -> None:
    param = unmap_param((4, 4), (100, 28), (200, 0))
    assert good(run(disk, unmap_cdb(len(param)), out=param)) == b""
    assert dev.discards == [(4 * BS, 4 * BS), (100 * BS, 28 * BS)]
    assert dev.buf[100 * BS : 128 * BS] == bytes(28 * BS)
    assert good(run(disk, unmap_cdb(0))) == b""  # an empty parameter list
    # a descriptor cut short by the parameter list length is ignored
    param = unmap_param((300, 8), (400, 8))[:-4]
    assert good(run(disk, unmap_cdb(len(param)), out=param)) == b""
    assert dev.discards[-1] == (300 * BS, 8 * BS) and len(dev.discards) == 3


def test_unmap_errors(dev: MemDisk, disk: ScsiDisk, ro_disk: ScsiDisk) -> None:
    assert sense_of(run(disk, unmap_cdb(6), out=bytes(6))) == PARAM_LIST_LENGTH
    param = unmap_param((1, 1))
    assert sense_of(run(disk, unmap_cdb(len(param)), 8, param)) == PARAM_LIST_LENGTH
    param = unmap_param((0, 8), (BLOCKS - 4, 8))
    r = run(disk, unmap_cdb(len(param)), out=param)
    assert sense_of(r) == LBA_OUT_OF_RANGE and info_of(r) == BLOCKS - 4
    assert dev.discards == []  # checked before anything is discarded
    assert sense_of(run(disk, unmap_cdb(len(param), anchor=1), out=param)) == INVALID_FIELD_CDB
    small = ScsiDisk(dev, serial="u", max_unmap_descriptors=2, max_unmap_blocks=16)
    param = unmap_param((0, 1), (2, 1), (4, 1))
    assert sense_of(run(small, unmap_cdb(len(param)), out=param)) == INVALID_FIELD_PARAM
    param = unmap_param((0, 17))
    assert sense_of(run(small, unmap_cdb(len(param)), out=param)) == INVALID_FIELD_PARAM
    param = unmap_param((0, 1))
    assert sense_of(run(ro_disk, unmap_cdb(len(param)), out=param)) == WRITE_PROTECTED
    dev.fail_writes = 1
    assert sense_of(run(disk, unmap_cdb(len(param)), out=param)) == WRITE_ERROR
    nodiscard = ScsiDisk(MemDisk(BLOCKS * BS, can_discard=False), serial="n")
    assert sense_of(run(nodiscard, unmap_cdb(len(param)), out=param)) == INVALID_OPCODE
    assert vpd(nodiscard, 0xB2)[5] == 0


# --- SYNCHRONIZE CACHE / VERIFY / REPORT LUNS ----------------------------------------------
@pytest.mark.parametrize("ten", [True, False], ids=["(10)", "(16)"])
def test_synchronize_cache(dev: MemDisk, disk: ScsiDisk, ro_disk: ScsiDisk, ten: bool) -> None:
    def cdb(lba: int, n: int) -> bytes:
        return rw10(0x35, lba, n) if ten else rw16(0x91, lba, n)

    assert good(run(disk, cdb(0, 0))) == b"" and dev.flushes == 1
    assert good(run(disk, cdb(10, 10))) == b"" and dev.flushes == 2
    assert sense_of(run(disk, cdb(BLOCKS, 1))) == LBA_OUT_OF_RANGE
    dev.fail_flush = 1
    assert sense_of(run(disk, cdb(0, 0))) == WRITE_ERROR
    assert good(run(ro_disk, cdb(0, 0))) == b""


@pytest.mark.parametrize("ten", [True, False], ids=["(10)", "(16)"])
def test_verify(dev: MemDisk, disk: ScsiDisk, ten: bool) -> None:
    def cdb(lba: int, n: int, bytchk: int = 0) -> bytes:
        return rw10(0x2F, lba, n, bytchk << 1) if ten else rw16(0x8F, lba, n, bytchk << 1)

    assert good(run(disk, cdb(0, 16))) == b""
    assert sense_of(run(disk, cdb(BLOCKS - 1, 2))) == LBA_OUT_OF_RANGE
    same = bytes(dev.buf[4 * BS : 6 * BS])
    assert good(run(disk, cdb(4, 2, 1), out=same)) == b""
    other = bytearray(same)
    other[700] ^= 1
    r = run(disk, cdb(4, 2, 1), out=bytes(other))
    assert sense_of(r) == (0xE, 0x1D, 0x00) and info_of(r) == 700
    dev.buf[0 : 3 * BS] = b"\x11" * (3 * BS)
    assert good(run(disk, cdb(0, 3, 3), out=b"\x11" * BS)) == b""  # one block, each compared
    assert sense_of(run(disk, cdb(0, 4, 3), out=b"\x11" * BS))[0] == 0xE
    assert sense_of(run(disk, cdb(0, 1, 2), out=bytes(BS))) == INVALID_FIELD_CDB
    assert sense_of(run(disk, cdb(0, 2, 1), out=bytes(BS))) == INVALID_FIELD_CDB  # short
    far = bytearray(dev.buf[: 128 * BS])
    far[40000] ^= 0xFF
    r = run(disk, cdb(0, 128, 1), out=bytes(far))
    assert sense_of(r)[0] == 0xE and info_of(r) == 40000
    dev.fail_reads = 1
    disk.read_retry = ReadRetry(total=0)
    assert sense_of(run(disk, cdb(0, 1, 1), out=bytes(BS))) == UNRECOVERED_READ


def test_report_luns(disk: ScsiDisk) -> None:
    def cdb(alloc: int, select: int = 0) -> bytes:
        return struct.pack(">BBBxxxIBB", 0xA0, 0, select, alloc, 0, 0)

    data = good(run(disk, cdb(64), 64))
    assert struct.unpack(">I4xQ", data) == (8, 0)  # one LUN: 0
    assert sense_of(run(disk, cdb(8))) == INVALID_FIELD_CDB
    assert sense_of(run(disk, cdb(64, 3))) == INVALID_FIELD_CDB


def test_write_same_of_zeros_without_write_zeroes(dev: MemDisk) -> None:
    dev.write_zeroes = None  # type: ignore[assignment,method-assign]
    disk = ScsiDisk(dev, serial="w")
    assert good(run(disk, rw16(0x93, 0, BLOCKS, 0x08), out=bytes(BS))) == b""
    assert dev.buf == bytes(BLOCKS * BS) and dev.discards == []


# --- real obd images, through the ring emulator -------------------------------------------
class RingServer:
    """A ring on the kernel emulator answering each command with a ScsiDisk."""

    def __init__(self) -> None:
        self.emu = KernelEmu(cmdr_size=8192, data_blocks=256, flags=uapi.TCMU_MAILBOX_FLAG_CAP_OOOC)
        self.ring = CommandRing(self.emu.mapping)

    def __call__(self, disk: ScsiDisk, cdb: bytes, out: bytes = b"", length: int = 0) -> Completion:
        self.emu.queue(cdb, out, length or len(out))
        assert self.ring.process(disk)
        (c,) = self.emu.reap()
        return c


@pytest.fixture
def serve() -> Iterator[RingServer]:
    server = RingServer()
    yield server
    server.ring.close()


def _image(tmp_path: Path, writable: bool, sparse_upper: bool = False) -> tuple[Path, bytes]:
    from obd.image import ops
    from tests.nbd_helpers import image_of_raw

    rng = random.Random(9)
    raw = bytearray(rng.randbytes(4 << 20))
    raw[1 << 20 : 2 << 20] = bytes(1 << 20)
    (tmp_path / "disk.raw").write_bytes(raw)
    cfg = image_of_raw(tmp_path, "img", tmp_path / "disk.raw", writable=writable)
    if sparse_upper:
        doc = json.loads(cfg.read_text())
        ud, ui = str(tmp_path / "sparse-u.data"), str(tmp_path / "sparse-u.index")
        ops.create(ud, ui, len(raw), sparse=True)
        doc["upper"] = {"data": ud, "index": ui}
        cfg.write_text(json.dumps(doc))
    return cfg, bytes(raw)


@pytest.mark.parametrize("sparse", [False, True], ids=["log-structured", "sparse"])
def test_a_writable_obd_image_through_the_ring(
    tmp_path: Path, serve: RingServer, sparse: bool
) -> None:
    from obd.image import open_image

    cfg, raw = _image(tmp_path, writable=True, sparse_upper=sparse)
    model = bytearray(raw)
    stack = open_image(str(cfg))
    disk = ScsiDisk(stack, serial="img")
    c = serve(disk, sai_rc16(), length=32)
    assert struct.unpack_from(">QI", c.data_in) == (len(raw) // BS - 1, BS)
    assert c.data_in[14] & 0x80  # LBPME: UNMAP works on an image with an upper
    c = serve(disk, rw16(0x88, 2040, 16), length=16 * BS)
    assert c.status == 0 and c.data_in == raw[2040 * BS : 2056 * BS]
    # 4 KiB-aligned, as the physical block size says: a sparse upper rebuilds its index
    # from the data file's extents, at the file system's block granularity
    data = random.Random(10).randbytes(64 * BS)
    assert serve(disk, rw10(0x2A, 96, 64), data).status == 0
    model[96 * BS : 160 * BS] = data
    # zeros over data of the lower layer, with the UNMAP bit: they must read as zeros,
    # now and after a reopen (a sparse upper's discard would show the lower layer)
    assert serve(disk, rw16(0x93, 4000, 64, 0x08), bytes(BS)).status == 0
    model[4000 * BS : 4064 * BS] = bytes(64 * BS)
    param = unmap_param((200, 8))
    assert serve(disk, unmap_cdb(len(param)), param).status == 0
    assert serve(disk, rw10(0x35, 0, 0)).status == 0  # SYNCHRONIZE CACHE -> flush
    c = serve(disk, rw16(0x88, 3990, 80), length=80 * BS)
    assert c.data_in == model[3990 * BS : 4070 * BS]
    stack.close()
    again = open_image(str(cfg))
    try:
        got = again.pread(0, len(raw))
        unmapped = slice(200 * BS, 208 * BS)  # UNMAP'd: undefined content (LBPRZ clear)
        assert got[: unmapped.start] == model[: unmapped.start]
        assert got[unmapped.stop :] == model[unmapped.stop :]
    finally:
        again.close()


def test_a_read_only_obd_image_through_the_ring(tmp_path: Path, serve: RingServer) -> None:
    from obd.image import open_image

    cfg, raw = _image(tmp_path, writable=False)
    stack = open_image(str(cfg))
    try:
        disk = ScsiDisk(stack, serial="ro")
        c = serve(disk, mode_sense6(0x3F), length=255)
        assert c.status == 0 and c.data_in[2] & 0x80  # WP
        c = serve(disk, rw10(0x2A, 0, 1), bytes(BS))
        assert (c.status, c.sense[2], c.sense[12], c.sense[13]) == (2, 0x7, 0x27, 0x00)
        c = serve(disk, rw10(0x28, 0, 128), length=128 * BS)
        assert c.data_in == raw[: 128 * BS]
        c = serve(disk, sai_rc16(), length=32)
        assert not c.data_in[14] & 0x80
    finally:
        stack.close()


# --- fuzz: any CDB gets an answer, never an exception ------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    op=st.sampled_from(sorted(OPS)) | st.integers(0, 255),
    body=st.binary(min_size=0, max_size=20),
    data=st.binary(max_size=4096),
    readonly=st.booleans(),
)
def test_any_cdb_gets_a_well_formed_answer(
    op: int, body: bytes, data: bytes, readonly: bool
) -> None:
    dev = MemDisk(64 * BS, readonly=readonly, data=bytes(range(256)) * (64 * BS // 256))
    before = bytes(dev.buf)
    disk = ScsiDisk(dev, serial="fuzz", read_retry=ReadRetry(total=0), max_write_same_blocks=64)
    rsp = disk(Cmd(bytes([op]) + body, len(data), data))
    assert rsp.status in (scsi.SAM_STAT_GOOD, scsi.SAM_STAT_CHECK_CONDITION)
    if rsp.status == scsi.SAM_STAT_CHECK_CONDITION:
        key, asc, _ = sense_of(rsp)
        assert key in (0x3, 0x4, 0x5, 0x6, 0x7, 0xE) and asc
        assert rsp.data is None
    if readonly:
        assert dev.buf == before
