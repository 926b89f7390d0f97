"""A sparse upper over lower layers reads the same before and after a reopen.

Its index is rebuilt from the data file's allocated blocks (whole file-system blocks), so
a sector never written but sharing a block with a written one must still show the layers
below after a reopen (the Stack writes a sparse upper in whole blocks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from obd.image import open_image, ops

MiB = 1 << 20
SIZE = 2 * MiB


def _image(folder: Path) -> tuple[Path, bytearray]:
    raw = folder / "lower.raw"
    lower = bytearray(random.Random(3).randbytes(SIZE))
    raw.write_bytes(lower)
    d, i = str(folder / "l.data"), str(folder / "l.index")
    ops.create(d, i, None, from_raw=str(raw))
    layer = str(folder / "l.lsmt")
    ops.commit(d, i, layer)
    ud, ui = str(folder / "u.data"), str(folder / "u.index")
    ops.create(ud, ui, SIZE, sparse=True)
    cfg = folder / "img.json"
    cfg.write_text(json.dumps({"lowers": [{"file": layer}], "upper": {"data": ud, "index": ui}}))
    return cfg, lower


def test_unwritten_sector_beside_a_write_keeps_the_lower(tmp_path: Path) -> None:
    cfg, lower = _image(tmp_path)
    with open_image(str(cfg)) as img:
        img.pwrite(9 * 512, b"x" * 512)
        img.flush()
    with open_image(str(cfg)) as img:
        assert img.pread(8 * 512, 512) == lower[8 * 512 : 9 * 512]
        assert img.pread(9 * 512, 512) == b"x" * 512
        assert img.pread(10 * 512, 6 * 512) == lower[10 * 512 : 16 * 512]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "zeroes", "discard"]),
        st.integers(0, SIZE // 512 - 1),
        st.integers(1, 40),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(OPS)
def test_reads_same_before_and_after_reopen(tmp_path_factory, ops_list) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("sparse")
    cfg, lower = _image(folder)
    model = bytearray(lower)
    undefined = bytearray(SIZE // 512)  # sectors a discard left undefined
    rnd = random.Random(len(ops_list))
    with open_image(str(cfg)) as img:
        for op, s0, n in ops_list:
            n = min(n, SIZE // 512 - s0)
            off, length = s0 * 512, n * 512
            if op == "write":
                data = rnd.randbytes(length)
                img.pwrite(off, data)
                model[off : off + length] = data
                undefined[s0 : s0 + n] = bytes(n)
            elif op == "zeroes":
                img.write_zeroes(off, length)
                model[off : off + length] = bytes(length)
                undefined[s0 : s0 + n] = bytes(n)
            else:
                img.discard(off, length)
                undefined[s0 : s0 + n] = b"\1" * n
        before = img.pread(0, SIZE)
        img.flush()
    with open_image(str(cfg)) as img:
        after = img.pread(0, SIZE)
    assert after == before
    for s in range(SIZE // 512):
        if not undefined[s]:
            assert before[s * 512 : (s + 1) * 512] == model[s * 512 : (s + 1) * 512], s
