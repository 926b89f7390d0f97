"""obd/serve/tcmu/uapi.py against the installed ``linux/target_core_user.h``.

A C program compiled here prints ``sizeof`` / ``offsetof`` of every structure and field
and the value of every constant obd declares; the test compares them with the layouts.
Nothing is copied from the header into the expectations: the C compiler is the oracle.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from obd.serve.tcmu import uapi

HEADER = Path("/usr/include/linux/target_core_user.h")

# python layout -> (C type, {python field name: C member designator})
STRUCTS: dict[type, tuple[str, dict[str, str]]] = {
    uapi.Mailbox: (
        "struct tcmu_mailbox",
        {n: n for n in ("version", "flags", "cmdr_off", "cmdr_size", "cmd_head", "cmd_tail")},
    ),
    uapi.CmdEntryHdr: (
        "struct tcmu_cmd_entry_hdr",
        {n: n for n in ("len_op", "cmd_id", "kflags", "uflags")},
    ),
    uapi.CmdEntryReq: (
        "struct tcmu_cmd_entry",
        {
            "len_op": "hdr.len_op",
            "cmd_id": "hdr.cmd_id",
            "kflags": "hdr.kflags",
            "uflags": "hdr.uflags",
            "iov_cnt": "req.iov_cnt",
            "iov_bidi_cnt": "req.iov_bidi_cnt",
            "iov_dif_cnt": "req.iov_dif_cnt",
            "cdb_off": "req.cdb_off",
            "__pad1": "req.__pad1",
            "__pad2": "req.__pad2",
        },
    ),
    uapi.CmdEntryRsp: (
        "struct tcmu_cmd_entry",
        {
            "len_op": "hdr.len_op",
            "uflags": "hdr.uflags",
            "scsi_status": "rsp.scsi_status",
            "__pad1": "rsp.__pad1",
            "__pad2": "rsp.__pad2",
            "read_len": "rsp.read_len",
            "sense_buffer": "rsp.sense_buffer",
        },
    ),
    uapi.TmrEntry: (
        "struct tcmu_tmr_entry",
        {
            "len_op": "hdr.len_op",
            "tmr_type": "tmr_type",
            "__pad1": "__pad1",
            "__pad2": "__pad2",
            "cmd_cnt": "cmd_cnt",
            "__pad3": "__pad3",
            "__pad4": "__pad4",
        },
    ),
    uapi.Iovec: ("struct iovec", {"iov_base": "iov_base", "iov_len": "iov_len"}),
}
# sizes the layouts must have beyond the C sizeof (flexible array members' offsets)
EXTRA_OFFSETS = {
    "IOV_OFF": ("struct tcmu_cmd_entry", "req.iov"),
    "TMR_CMD_IDS_OFF": ("struct tcmu_tmr_entry", "cmd_ids"),
}
NOT_IN_HEADER = {"TCMU_GENL_FAMILY", "TCMU_GENL_MCGRP", "TCMU_GENL_VERSION", "TCMU_VERSION"}


def _constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(uapi).items()
        if (name.startswith("TCMU_") or name == "ALIGN_SIZE")
        and isinstance(value, int)
        and name not in NOT_IN_HEADER
    }


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/target_core_user.h>",
        "#define MEMBER_SIZE(t, m) sizeof(((t *)0)->m)",
        "int main(void) {",
    ]
    for cls, (ctype, members) in STRUCTS.items():
        lines.append(f'printf("sizeof {cls.__name__} %zu\\n", sizeof({ctype}));')
        for field, member in members.items():
            lines.append(
                f'printf("offset {cls.__name__}.{field} %zu %zu\\n", '
                f"offsetof({ctype}, {member}), MEMBER_SIZE({ctype}, {member}));"
            )
    for name, (ctype, member) in EXTRA_OFFSETS.items():
        lines.append(f'printf("extra {name} %zu\\n", offsetof({ctype}, {member}));')
    for name in _constants():
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is missing (Debian package linux-libc-dev)")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to compile the header check")
    d = tmp_path_factory.mktemp("uapi")
    (d / "check.c").write_text(_c_program())
    built = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-o", str(d / "check"), str(d / "check.c")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, f"the header check does not compile:\n{built.stderr}"
    out = subprocess.run([str(d / "check")], capture_output=True, text=True, timeout=10).stdout
    facts: dict[str, tuple[int, ...]] = {}
    for line in out.splitlines():
        _kind, key, *values = line.split()
        facts[key] = tuple(int(v) for v in values)
    return facts


@pytest.mark.parametrize("cls", list(STRUCTS), ids=lambda c: c.__name__)
def test_layout_matches_header(cls: type, header_facts: dict[str, tuple[int, ...]]) -> None:
    layout = cls.LAYOUT  # type: ignore[attr-defined]
    for field, _member in STRUCTS[cls][1].items():
        offset, size = header_facts[f"{cls.__name__}.{field}"]
        assert layout.offset(field) == offset, f"{cls.__name__}.{field} offset"
        code = dict(layout.fields)[field]
        assert uapi.struct.calcsize("<" + code) == size, f"{cls.__name__}.{field} size"
    csize = header_facts[cls.__name__][0]
    if cls in (uapi.CmdEntryReq, uapi.TmrEntry):
        # the layout stops where the flexible array begins
        assert layout.size <= csize
    else:
        assert layout.size == csize, f"sizeof {cls.__name__}"


def test_flexible_array_offsets(header_facts: dict[str, tuple[int, ...]]) -> None:
    for name in EXTRA_OFFSETS:
        assert getattr(uapi, name) == header_facts[name][0], name


def test_constants_match_header(header_facts: dict[str, tuple[int, ...]]) -> None:
    consts = _constants()
    assert len(consts) > 40
    for name, value in consts.items():
        assert header_facts[name][0] == value, name


def test_named_fields_round_trip() -> None:
    rsp = uapi.CmdEntryRsp(
        len_op=uapi.tcmu_len_op(112, uapi.TCMU_OP_CMD),
        cmd_id=7,
        kflags=0,
        uflags=uapi.TCMU_UFLAG_READ_LEN,
        scsi_status=2,
        read_len=36,
        sense_buffer=b"\x70" + bytes(95),
    )
    raw = rsp.pack()
    assert len(raw) == 112
    assert uapi.CmdEntryRsp.unpack(raw) == rsp
    hdr = uapi.CmdEntryHdr.unpack(raw)
    assert (hdr.op, hdr.length, hdr.cmd_id) == (uapi.TCMU_OP_CMD, 112, 7)
    mb = uapi.Mailbox(2, uapi.TCMU_MAILBOX_FLAG_CAP_OOOC, 128, 4096, 64, 32)
    buf = bytearray(256)
    mb.pack_into(buf, 0)
    assert int.from_bytes(buf[uapi.CMD_TAIL_OFF : uapi.CMD_TAIL_OFF + 4], "little") == 32
    assert uapi.Mailbox.unpack(buf) == mb
    assert uapi.TCMU_CMD_NAMES[uapi.TCMU_CMD_SET_FEATURES] == "SET_FEATURES"
    assert uapi.TCMU_ATTR_NAMES[uapi.TCMU_ATTR_DEV_SIZE] == "DEV_SIZE"


# --- docs/tcmu.md against the code ---------------------------------------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "tcmu.md"


def _doc_tables(marker: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(f"<!-- {marker}"):
            continue
        key = line.removeprefix(f"<!-- {marker}").removesuffix("-->").strip(": ")
        rows = []
        for row in lines[i + 3 :]:
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        out[key] = rows
    return out


def test_doc_layout_tables_match_the_code() -> None:
    tables = _doc_tables("tcmu-layout")
    assert set(tables) == {"Mailbox", "CmdEntryHdr", "CmdEntryReq", "CmdEntryRsp", "TmrEntry"}
    for key, rows in tables.items():
        layout = getattr(uapi, key).LAYOUT
        for offset, size, name in rows:
            if name == "(header)":
                assert (int(offset), int(size)) == (0, uapi.CmdEntryHdr.LAYOUT.size), key
                continue
            field = name.split()[0]
            if field == "iov[]":
                assert int(offset) == uapi.IOV_OFF and size == f"{uapi.IOVEC.size} each"
                continue
            assert layout.offset(field) == int(offset), (key, field)
            code = dict(layout.fields)[field]
            assert uapi.struct.calcsize("<" + code) == int(size), (key, field)


def test_doc_scsi_table_lists_exactly_the_cdb_table() -> None:
    from obd.serve.tcmu.scsi import OPS

    (rows,) = _doc_tables("tcmu-scsi").values()
    assert {int(op, 16): name for op, name, _ in rows} == {k: v.name for k, v in OPS.items()}
