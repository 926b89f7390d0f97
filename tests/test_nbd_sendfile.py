"""Large reads go out without copies through Python (``Stack.read_plan`` and
``Connection.read_files``): plain local layers with ``os.sendfile``, ZFile layers as the
views their blocks are decoded into. The bytes must be the same as through ``pread``, for
simple and structured replies, pipelined with small reads, in every layer/zero/hole mix."""

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


def _layer(folder: Path, name: str, model: bytearray, writes: list[tuple[int, bytes]], discards: list[tuple[int, int]], zfile: bool) -> str:  # fmt: skip
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
    out = str(folder / f"{name}.{'zfile' if zfile else 'lsmt'}")
    ops.commit(d, i, out, zfile=ops.ZFileOptions() if zfile else None)
    return out


@pytest.fixture(scope="module", params=["plain", "zfile+plain"])
def stack_and_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:  # fmt: skip
    """Three layers: all plain, or the bottom two ZFiles under a plain one."""
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
        zfile = request.param != "plain" and n < 2
        layers.append(_layer(folder, f"l{n}", model, writes, discards, zfile))
    cfg = folder / "stack.json"
    cfg.write_text(json.dumps({"lowers": [{"file": p} for p in layers]}))
    return cfg, bytes(model)


def _plan_bytes(parts: list[bytes | memoryview | FileRange]) -> bytes:
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


def test_read_plan_refuses_a_stack_with_an_upper(tmp_path: Path, stack_and_model: tuple[Path, bytes]) -> None:  # fmt: skip
    cfg, model = stack_and_model
    lowers = json.loads(cfg.read_text())["lowers"]
    u = {"data": str(tmp_path / "u.data"), "index": str(tmp_path / "u.index")}
    ops.create(u["data"], u["index"], SIZE)
    ucfg = tmp_path / "u.json"
    ucfg.write_text(json.dumps({"lowers": lowers, "upper": u}))
    with open_image(str(ucfg)) as img:
        assert img.read_plan(0, MiB) is None  # an upper's data may move: pread
        assert img.pread(0, MiB) == model[:MiB]


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
