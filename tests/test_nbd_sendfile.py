"""Large reads of plain local layers go out with ``os.sendfile`` (``Stack.read_plan`` and
``Connection.read_files``): the bytes must be the same as through ``pread``, for simple
and structured replies, pipelined with small reads, in every layer/zero/hole mix."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.image import open_image, ops
from obd.image.stack import Stack
from obd.io.base import FileRange
from obd.serve.nbd import Export
from obd.serve.nbd import proto as N
from obd.serve.nbd.connection import SENDFILE_MIN, Connection
from tests.nbd_helpers import RawClient, in_process_server

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SIZE = 8 * MiB


def _layer(folder: Path, name: str, model: bytearray, writes: list[tuple[int, bytes]], discards: list[tuple[int, int]]) -> str:  # fmt: skip
    """A committed plain layer holding ``writes`` and zeroed ``discards``; applied to ``model``."""
    d, i = str(folder / f"{name}.data"), str(folder / f"{name}.index")
    ops.create(d, i, SIZE)
    from obd.image.layers import open_rw_layer

    with open_rw_layer(d, i) as lay:
        for off, data in writes:
            lay.pwrite(off, data)
            model[off : off + len(data)] = data
        for off, n in discards:
            lay.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        lay.flush()
    out = str(folder / f"{name}.lsmt")
    ops.commit(d, i, out)
    return out


@pytest.fixture(scope="module")
def stack_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("sendfile")
    rnd = random.Random(7)
    model = bytearray(SIZE)
    layers = []
    for n in range(3):
        writes = []
        for _ in range(40):
            off = rnd.randrange(0, SIZE // 512 - 256) * 512
            length = rnd.randrange(1, 256) * 512
            writes.append((off, rnd.randbytes(length)))
        discards = [(rnd.randrange(0, SIZE // 512 - 64) * 512, 64 * 512) for _ in range(5)]
        layers.append(_layer(folder, f"l{n}", model, writes, discards))
    cfg = folder / "stack.json"
    cfg.write_text(json.dumps({"lowers": [{"file": p} for p in layers]}))
    return cfg, bytes(model)


def _plan_bytes(parts: list[bytes | FileRange]) -> bytes:
    out = bytearray()
    for p in parts:
        out += os.pread(p.fd, p.length, p.offset) if isinstance(p, FileRange) else p
    return bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.integers(0, SIZE // 512 - 1), st.integers(1, 4096))
def test_read_plan_matches_model(stack_and_model: tuple[Path, bytes], s0: int, n: int) -> None:
    cfg, model = stack_and_model
    img = open_image(str(cfg))
    try:
        assert isinstance(img, Stack)
        n = min(n, SIZE // 512 - s0)
        parts = img.read_plan(s0 * 512, n * 512)
        assert parts is not None
        assert sum(p.length if isinstance(p, FileRange) else len(p) for p in parts) == n * 512
        assert _plan_bytes(parts) == model[s0 * 512 : (s0 + n) * 512]
        assert img.read_plan(s0 * 512 + 1, 512) is None  # unaligned: use pread
    finally:
        img.close()


def test_read_plan_refuses_compressed_and_writable(tmp_path: Path, stack_and_model: tuple[Path, bytes]) -> None:  # fmt: skip
    raw = tmp_path / "raw"
    raw.write_bytes(random.Random(1).randbytes(MiB))
    d, i = str(tmp_path / "z.data"), str(tmp_path / "z.index")
    ops.create(d, i, None, from_raw=str(raw))
    z = str(tmp_path / "z.zfile")
    ops.commit(d, i, z, zfile=ops.ZFileOptions())
    zcfg = tmp_path / "z.json"
    zcfg.write_text(json.dumps({"lowers": [{"file": z}]}))
    with open_image(str(zcfg)) as img:
        assert img.read_plan(0, MiB) is None  # compressed: read through pread
    ucfg = tmp_path / "u.json"
    u = {"data": str(tmp_path / "u.data"), "index": str(tmp_path / "u.index")}
    ops.create(u["data"], u["index"], MiB)
    ucfg.write_text(json.dumps({"lowers": [{"file": z}], "upper": u}))
    with open_image(str(ucfg)) as img:
        assert img.read_plan(0, MiB) is None  # an upper's data may move: pread


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("send_files", [True, False])
def test_large_reads_over_nbd(stack_and_model: tuple[Path, bytes], structured: bool, send_files: bool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg, model = stack_and_model
    monkeypatch.setattr(Connection, "send_files", send_files)
    rnd = random.Random(structured * 2 + send_files)
    img = open_image(str(cfg))
    with in_process_server([Export("disk", img)]) as (_, port):
        c = RawClient(port, "disk", structured=structured)
        # pipelined: large reads (sendfile) between small ones (gathered replies)
        reqs = []
        for _ in range(60):
            if rnd.random() < 0.5:
                off, n = rnd.randrange(0, SIZE - 4096), rnd.randrange(1, 4096)
            else:
                n = rnd.randrange(SENDFILE_MIN // 512, 2 * MiB // 512) * 512
                off = rnd.randrange(0, (SIZE - n) // 512 + 1) * 512
            cookie = c.send_request(N.NBD_CMD_READ, off, n)
            reqs.append((cookie, off, n))
        want = {cookie: model[off : off + n] for cookie, off, n in reqs}
        for _ in reqs:
            r = c.reply()
            assert r.error == 0
            assert r.data == want[r.cookie]
        c.disconnect()
