"""``obd check``: the reference vectors check clean (garbage is a note, not a leak); each
corruption class exits 2 and is named; leaks exit 3; what cannot be checked, and every
other failure of the command, exits 1. Work is done on copies."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from obd.formats.zfile import HeaderTrailer as ZHeader
from obd.image.check import check_file
from tests.conftest import run_obd
from tests.vectors import manifest, require_vectors, vectors_of, write_broken_chain_config

DOC_KEYS = {"version", "result", "exit_code", "summary", "files"}
SUMMARY_KEYS = {
    "files",
    "corruptions",
    "leaks",
    "warnings",
    "notes",
    "errors",
    "leaked_bytes",
    "garbage_bytes",
}
FILE_KEYS = {
    "path",
    "kind",
    "wrappers",
    "result",
    "checked",
    "leaked_bytes",
    "garbage_bytes",
    "findings",
}
FINDING_KEYS = {"severity", "code", "message", "path", "offset", "space"}

RO_INDEX_AT = 901632  # index_offset of ro_basic.lsmt (from its trailer)


def copy(tmp: Path, name: str, new: str | None = None) -> Path:
    dst = tmp / (new or name)
    shutil.copy(require_vectors() / name, dst)
    return dst


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def check_json(*args: Any) -> tuple[int, dict[str, Any]]:
    r = run_obd("check", "--json", *args)
    doc = json.loads(r.out)
    assert doc["exit_code"] == r.code
    return r.code, doc


def codes(doc: dict[str, Any], severity: str = "corruption") -> set[str]:
    return {f["code"] for fr in doc["files"] for f in fr["findings"] if f["severity"] == severity}


def findings(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for fr in doc["files"] for f in fr["findings"]]


# ------------------------------------------------------------------------- clean vectors


def test_every_vector_checks_clean(tmp_path: Path) -> None:
    vectors = require_vectors()
    vs = [v for v in manifest()["vectors"] if v["kind"] != "lsmt_stack"]
    args = []
    for v in vs:
        f = v["files"]
        args.append(str(vectors / (f.get("data") or f.get("layer") or f.get("zfile"))))
    for v in vectors_of("lsmt_stack"):
        cfg = tmp_path / f"{v['name']}.json"
        lowers = [{"file": str(vectors / n)} for n in v["files"]["layers_bottom_to_top"]]
        cfg.write_text(json.dumps({"lowers": lowers}))
        args.append(str(cfg))
    code, doc = check_json(*args)
    assert set(doc) == DOC_KEYS and set(doc["summary"]) == SUMMARY_KEYS
    assert doc["version"] == 1
    assert doc["summary"]["corruptions"] == 0 and doc["summary"]["errors"] == 0, findings(doc)
    assert doc["summary"]["leaks"] == 0 and doc["summary"]["leaked_bytes"] == 0, findings(doc)
    for fr in doc["files"]:
        assert set(fr) == FILE_KEYS
        for f in fr["findings"]:
            assert set(f) == FINDING_KEYS
            assert f["severity"] == "note", f
    by_path = {fr["path"]: fr for fr in doc["files"]}
    for v, p in zip(vs, args, strict=False):
        fr = by_path[p]
        assert fr["result"] == "clean", (v["name"], fr["findings"])
        if v["kind"] in ("lsmt_rw", "lsmt_sealed"):
            # overwritten data stays in a log-structured data file: garbage, a note
            assert all(f["code"] == "garbage" for f in fr["findings"]), fr["findings"]
        else:
            assert fr["findings"] == [] and fr["garbage_bytes"] == 0
        if v["kind"].startswith("zfile") or v["kind"] == "lsmt_ro_zfile":
            assert fr["checked"]["blocks"] > 0
    # upstream's own files are clean: the garbage of rw_basic (and of its sealed copy)
    # is reported, not counted as a leak
    assert code == 0 and doc["result"] == "clean"
    assert by_path[str(vectors / "rw_basic.data")]["garbage_bytes"] == 182784
    assert by_path[str(vectors / "sealed_basic.data")]["garbage_bytes"] == 182784
    assert doc["summary"]["notes"] >= 2


def test_clean_exit_zero_and_human_output() -> None:
    vectors = require_vectors()
    r = run_obd("check", vectors / "zro_basic_lz4.zfile", vectors / "ro_basic.lsmt")
    assert r.code == 0, r.out + r.err
    assert "No errors were found." in r.out
    assert "zro_basic_lz4.zfile: lsmt_ro in zfile: clean" in r.out


# --------------------------------------------------------------------- corruption classes


@pytest.mark.parametrize(
    ("offset", "mask", "code", "needle"),
    [
        (3, 0xFF, "lsmt_header", "bad magic"),  # magic
        (50, 0x01, "header_trailer_mismatch", "virtual_size"),  # virtual_size
        (60, 0x02, "header_trailer_mismatch", "uuid"),  # uuid text
        (28, 0x01, "lsmt_header", "flags"),  # header bit cleared
    ],
)
def test_flipped_header_byte(
    tmp_path: Path, offset: int, mask: int, code: str, needle: str
) -> None:
    p = copy(tmp_path, "ro_basic.lsmt")
    flip(p, offset, mask)
    rc, doc = check_json(p)
    assert rc == 2
    hits = [f for f in findings(doc) if f["code"] == code]
    assert hits and needle in hits[0]["message"]
    assert hits[0]["offset"] is not None and hits[0]["offset"] < 4096


def test_flipped_index_entry(tmp_path: Path) -> None:
    p = copy(tmp_path, "ro_basic.lsmt")
    flip(p, RO_INDEX_AT + 3 * 16 + 13, 0x10)  # entry 3, high moffset bits
    r = run_obd("check", p)
    assert r.code == 2
    assert "index entry 3 maps outside the data area" in r.out
    assert f"offset {RO_INDEX_AT + 3 * 16}" in r.out
    assert "Corruption was found." in r.out


def test_out_of_order_index(tmp_path: Path) -> None:
    p = copy(tmp_path, "ro_basic.lsmt")
    with open(p, "r+b") as f:
        f.seek(RO_INDEX_AT + 32)
        two = f.read(32)
        f.seek(RO_INDEX_AT + 32)
        f.write(two[16:] + two[:16])
    rc, doc = check_json(p)
    assert rc == 2
    (hit,) = [f for f in findings(doc) if f["code"] == "index_order"]
    assert "out of order" in hit["message"] and hit["offset"] == RO_INDEX_AT + 3 * 16


def test_flipped_block_bytes_every_one_reported(tmp_path: Path) -> None:
    p = copy(tmp_path, "zfile_a_lz4_default.zfile")
    for off in (5000, 60000, 200000):
        flip(p, off)
    rc, doc = check_json(p)
    assert rc == 2
    hits = [f for f in findings(doc) if f["code"] == "zfile_block_crc"]
    assert len(hits) == 3
    assert all("checksum mismatch" in h["message"] for h in hits)
    offs = [h["offset"] for h in hits]
    assert offs == sorted(offs) and offs[0] <= 5000


def test_flipped_block_in_compressed_layer_and_tar(tmp_path: Path) -> None:
    p = copy(tmp_path, "zro_basic_lz4.zfile")
    flip(p, 5000)
    r = run_obd("check", p)
    assert r.code == 2 and "ZFile block" in r.out and "checksum mismatch" in r.out
    t = copy(tmp_path, "zfile_a_tar.tar")
    flip(t, 1536 + 5000)
    rc, doc = check_json(t)
    assert rc == 2
    (hit,) = [f for f in findings(doc) if f["code"] == "zfile_block_crc"]
    # offsets are file offsets: the tar payload starts at 1536
    assert 1536 < hit["offset"] <= 1536 + 5000


def test_truncated_jump_table(tmp_path: Path) -> None:
    # commit -z output (header carries the index fields): the file is cut in the table
    p = copy(tmp_path, "zro_basic_lz4.zfile")
    os.truncate(p, p.stat().st_size - 512 - 100)
    rc, doc = check_json(p)
    assert rc == 2
    assert "zfile_jump_table" in codes(doc)
    # overlaybd-zfile output: the last 4 bytes of the table are gone, the trailer is intact
    q = copy(tmp_path, "zfile_a_lz4_default.zfile")
    raw = q.read_bytes()
    q.write_bytes(raw[: -512 - 4] + raw[-512:])
    r = run_obd("check", q)
    assert r.code == 2
    assert "jump table" in r.out


def test_zfile_index_crc_and_digest(tmp_path: Path) -> None:
    p = copy(tmp_path, "zfile_a_lz4_default.zfile")
    raw = p.read_bytes()
    t = ZHeader.unpack(raw[-512:])
    flip(p, t.index_offset + 2)  # a jump table entry: index_crc and the blocks disagree
    flip(p, 40)  # header byte covered by the digest
    rc, doc = check_json(p)
    assert rc == 2
    assert {"zfile_index_crc", "zfile_digest"} <= codes(doc)


def test_broken_chain(tmp_path: Path) -> None:
    cfg = write_broken_chain_config(tmp_path / "image.json")
    rc, doc = check_json(cfg)
    assert rc == 2
    (hit,) = [f for f in findings(doc) if f["code"] == "chain"]
    assert "broken chain" in hit["message"] and "layer 1" in hit["message"]
    r = run_obd("check", cfg)
    assert r.code == 2 and "broken chain" in r.out


# ------------------------------------------------------------------ writable layers, leaks


def test_torn_index_tail_is_a_note(tmp_path: Path) -> None:
    d = copy(tmp_path, "rw_tool.data")
    i = copy(tmp_path, "rw_tool.index")
    with open(i, "ab") as f:
        f.write(b"\x01" * 7)
    rc, doc = check_json(d)
    assert rc == 0, findings(doc)
    (hit,) = [f for f in findings(doc) if f["code"] == "rw_index_torn"]
    assert hit["severity"] == "note"
    assert hit["path"] == str(i) and hit["offset"] == 4096 + 66 * 16


def test_unaligned_data_tail_is_a_note(tmp_path: Path) -> None:
    """A torn data append (size not a multiple of 512): harmless stray bytes, exit 0."""
    d = copy(tmp_path, "rw_tool.data")
    copy(tmp_path, "rw_tool.index")
    size = d.stat().st_size
    with open(d, "ab") as f:
        f.write(b"\xee" * 100)
    rc, doc = check_json(d)
    assert rc == 0, findings(doc)
    (hit,) = [f for f in findings(doc) if f["code"] == "data_tail"]
    assert hit["severity"] == "note" and hit["offset"] == size
    assert "100 stray bytes" in hit["message"]
    assert doc["summary"]["leaked_bytes"] == 0
    r = run_obd("check", d)
    assert r.code == 0 and "No errors were found." in r.out


def test_unreferenced_data_of_a_committed_layer_is_a_leak(tmp_path: Path) -> None:
    """A compacted commit holds no garbage: data no entry references is a leak (exit 3)."""
    from obd.formats.lsmt import decode_entries

    p = copy(tmp_path, "ro_basic.lsmt")
    m = decode_entries(p.read_bytes()[RO_INDEX_AT : RO_INDEX_AT + 16 * 16])
    first = min(i for i in range(16) if not m.zeroed[i] and m.length[i])
    with open(p, "r+b") as f:  # a data entry becomes a padding entry: its data is orphaned
        f.seek(RO_INDEX_AT + 16 * first)
        f.write(struct.pack("<QQ", (1 << 50) - 1, 0))
    rc, doc = check_json(p)
    assert rc == 3, findings(doc)
    (hit,) = [f for f in findings(doc) if f["code"] == "unreferenced"]
    assert hit["severity"] == "leak" and doc["summary"]["leaked_bytes"] > 0
    r = run_obd("check", p)
    assert r.code == 3 and "bytes leaked" in r.out


def test_out_of_range_rw_record(tmp_path: Path) -> None:
    d = copy(tmp_path, "rw_basic.data", "a.data")
    i = copy(tmp_path, "rw_basic.index", "a.index")
    with open(i, "r+b") as f:
        f.seek(4096 + 5 * 16 + 8)
        f.write(struct.pack("<Q", 1 << 40))  # record 5: moffset far past the data file
    r = run_obd("check", d)
    assert r.code == 2
    assert "index record 5 maps past the data file's end but record 6 after it" in r.out


def test_lost_appends_at_the_end_of_the_log_are_a_note(tmp_path: Path) -> None:
    """Index records past the data file's end that end the log: writes lost before a
    flush (the data never reached the file). Readers ignore them: a note, exit 0."""
    from obd.formats.lsmt import encode_entry

    d = copy(tmp_path, "rw_tool.data")
    i = copy(tmp_path, "rw_tool.index")
    end = d.stat().st_size // 512
    with open(i, "ab") as f:
        f.write(encode_entry(100, 8, end, False) + encode_entry(200, 8, end + 8, False))
    rc, doc = check_json(d)
    assert rc == 0, findings(doc)
    (hit,) = [f for f in findings(doc) if f["code"] == "rw_index_lost"]
    assert hit["severity"] == "note" and hit["offset"] == 4096 + 66 * 16
    assert "2 index record(s) from record 66" in hit["message"]


def test_index_option(tmp_path: Path) -> None:
    d = copy(tmp_path, "rw_basic.data", "disk")
    i = copy(tmp_path, "rw_basic.index", "log")
    r = run_obd("check", d)
    assert r.code == 1 and "index file" in r.out
    r = run_obd("check", "--index", i, d)
    assert r.code == 0 and "overwritten data" in r.out and "bytes of garbage" in r.out


def test_sealed_garbage_is_not_a_leak() -> None:
    """Upstream's own sealed file: its garbage is a note, exit 0 (issue 8, defect 6)."""
    vectors = require_vectors()
    rep = check_file(str(vectors / "sealed_basic.data"))
    assert rep.exit_code == 0, rep.findings
    assert rep.garbage_bytes == 182784 and rep.leaked_bytes == 0
    assert [(f.severity, f.code) for f in rep.findings] == [("note", "garbage")]
    r = run_obd("check", vectors / "sealed_basic.data")
    assert r.code == 0 and "leak" not in r.out, r.out


# --------------------------------------------------------------- could not check, usage


def test_could_not_check(tmp_path: Path) -> None:
    vectors = require_vectors()
    r = run_obd("check", tmp_path / "missing.lsmt")
    assert r.code == 1
    r = run_obd("check", vectors / "zsrc_a.bin")
    assert r.code == 1 and "not an overlaybd file" in r.out
    # corruption wins over could-not-check
    p = copy(tmp_path, "ro_basic.lsmt")
    flip(p, 50, 0x01)
    r = run_obd("check", tmp_path / "missing.lsmt", p)
    assert r.code == 2


def test_usage_error_exits_1_not_2() -> None:
    r = run_obd("check", "--no-such-option", "x")
    assert r.code == 1
    r = run_obd("check")
    assert r.code == 1


def test_usage_error_inside_the_command_exits_1(tmp_path: Path) -> None:
    """A usage error found by the command itself (not by option parsing) exits 1 too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    r = run_obd("check", "--index", a, a, b)
    assert r.code == 1, (r.code, r.err)
    assert "--index goes with exactly one" in r.err and "Traceback" not in r.err


@pytest.mark.timeout(60)
def test_non_regular_files_cannot_be_checked(non_regular_files: list[tuple[Path, str]]) -> None:
    """A directory, a FIFO (must not hang) or a socket: exit 1, one line naming it."""
    for p, what in non_regular_files:
        r = run_obd("check", p, timeout=20)
        assert r.code == 1, (p, r.code, r.out, r.err)
        lines = [ln for ln in r.out.splitlines() if ": error: " in ln]
        assert len(lines) == 1 and lines[0].startswith(f"{p}: error: "), r.out
        assert "Traceback" not in r.err
        assert f"not a regular file ({what})" in r.out


def test_entry_past_the_virtual_size_is_corruption(tmp_path: Path) -> None:
    """A damaged entry offset that moves an entry past the disk's end: the data it mapped
    would read as zeros. check says corruption (exit 2); the reader refuses the layer."""
    from obd.errors import CorruptError
    from obd.formats.lsmt import HeaderTrailer, decode_entries
    from obd.image.layers import open_ro_layer

    p = copy(tmp_path, "ro_basic.lsmt")
    raw = p.read_bytes()
    t = HeaderTrailer.unpack(raw[-4096:])
    m = decode_entries(raw[t.index_offset : t.index_offset + 16 * t.index_size])
    last = max(i for i in range(len(m)) if int(m.offset[i]) != (1 << 50) - 1)
    vsect = t.virtual_size // 512
    # move the last entry so it straddles the end of the disk (order stays valid)
    new_off = vsect - 1
    w0 = struct.unpack_from("<Q", raw, t.index_offset + 16 * last)[0]
    w0 = (w0 & ~((1 << 50) - 1)) | new_off
    with open(p, "r+b") as f:
        f.seek(t.index_offset + 16 * last)
        f.write(struct.pack("<Q", w0))
    assert int(m.length[last]) > 1
    rc, doc = check_json(p)
    assert rc == 2, findings(doc)
    hits = [f for f in findings(doc) if "past the virtual size" in f["message"]]
    assert hits and hits[0]["severity"] == "corruption"
    assert hits[0]["offset"] == t.index_offset + 16 * last
    with pytest.raises(CorruptError, match="past the virtual size"):
        open_ro_layer(str(p))
    r = run_obd("merge", "--raw", "-o", tmp_path / "out.raw", p)
    assert r.code == 4 and "past the virtual size" in r.err
    assert not (tmp_path / "out.raw").exists()


def test_progress_is_reported() -> None:
    vectors = require_vectors()
    seen: list[int] = []
    rep = check_file(str(vectors / "zro_basic_lz4.zfile"), progress=seen.append, threads=2)
    assert rep.exit_code == 0
    assert sum(seen) > 0


def test_tar_wrapped_plain_layer_offsets_are_file_offsets(tmp_path: Path) -> None:
    from obd.formats.tar import wrap
    from obd.io.file import open_file

    vectors = require_vectors()
    out = tmp_path / "ro.tar"
    with (
        open_file(vectors / "ro_basic.lsmt") as src,
        open_file(out, writable=True, create=True) as dst,
    ):
        wrap(src, dst)
    assert check_file(str(out)).exit_code == 0
    flip(out, 1536 + RO_INDEX_AT + 3 * 16 + 13, 0x10)
    rc, doc = check_json(out)
    assert rc == 2
    (hit,) = [f for f in findings(doc) if f["code"] == "index_moffset"]
    assert hit["offset"] == 1536 + RO_INDEX_AT + 3 * 16 and hit["space"] == "file"


def test_image_with_upper(tmp_path: Path) -> None:
    vectors = require_vectors()
    d = copy(tmp_path, "rw_tool.data")
    i = copy(tmp_path, "rw_tool.index")
    cfg = tmp_path / "image.json"
    lowers = [{"file": str(vectors / "stack_a_l0.zfile")}]
    cfg.write_text(json.dumps({"lowers": lowers, "upper": {"data": str(d), "index": str(i)}}))
    # rw_tool's parent uuid (…0F00) is not stack_a_l0's uuid (…0300): a broken chain
    rc, doc = check_json(cfg)
    assert rc == 2 and codes(doc) == {"chain"}
    assert [fr["kind"] for fr in doc["files"]] == ["image_config", "lsmt_ro", "lsmt_rw"]
    r = run_obd("inspect", "--json", cfg)
    (it,) = json.loads(r.out)["items"]
    assert [row["role"] for row in it["layers"]] == ["lower", "upper"]
    assert it["read_only"] is False and it["chain_ok"] is False
    assert it["virtual_size"] == 1 << 30


def test_zfile_with_a_broken_header_magic(tmp_path: Path) -> None:
    p = copy(tmp_path, "zfile_a_lz4_default.zfile")
    flip(p, 2)
    rc, doc = check_json(p)
    assert rc == 2
    (hit,) = [f for f in findings(doc) if f["code"] == "zfile_header"]
    assert "bad magic" in hit["message"] and hit["offset"] == 0


@pytest.mark.parametrize(
    "name", ["ro_basic.lsmt", "zro_basic_lz4.zfile", "zfile_a_tar.tar", "sealed_basic.data"]
)
def test_damaged_files_never_crash(name: str, tmp_path: Path) -> None:
    """Random bit flips (biased to headers, index and trailers) and truncations: check
    returns a report, inspect and map raise only ObdError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from obd.errors import ObdError
    from obd.image.inspect import inspect_file, map_path

    raw = (require_vectors() / name).read_bytes()
    n = len(raw)
    where = st.one_of(
        st.integers(0, 4095), st.integers(max(0, n - 8192), n - 1), st.integers(0, n - 1)
    )

    @settings(max_examples=25, deadline=None, database=None)
    @given(
        flips=st.lists(st.tuples(where, st.integers(0, 7)), min_size=1, max_size=4),
        cut=st.one_of(st.none(), st.integers(0, n - 1)),
    )
    def run(flips: list[tuple[int, int]], cut: int | None) -> None:
        data = bytearray(raw)
        for off, bit in flips:
            data[off] ^= 1 << bit
        p = tmp_path / name
        p.write_bytes(bytes(data[:cut] if cut is not None else data))
        rep = check_file(str(p), threads=1)
        assert rep.exit_code in (0, 1, 2, 3)
        for fn in (inspect_file, map_path):
            try:
                fn(str(p))
            except ObdError:
                pass

    run()
