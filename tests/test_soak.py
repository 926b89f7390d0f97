"""A bounded soak of ``obd serve --nbd``: 32 clients at once, then a restart.

Each client owns one MiB of the disk and keeps an exact model of it; it pipelines mixed
writes, reads, trims, write-zeroes, FUA writes, flushes and block-status queries (half
the clients with structured replies), and reads a shared region written and flushed
before the start. qemu-io and nbdcopy work alongside. After ``OBD_SOAK_SECONDS``
(default 60; ``OBD_SOAK_WORKERS`` sets ``--workers``, default 0) every client flushes, the server is killed (SIGKILL: nothing may live
only in its memory) and started again, and the whole disk must read as the models say.
The server's RSS is sampled all along and must stay flat.

Run with ``pytest -s -m slow tests/test_soak.py`` to see the figures.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from obd.serve.nbd import proto as N
from tests.nbd_helpers import (
    RawClient,
    RealClients,
    ServeProcess,
    image_of_raw,
    make_raw,
    proc_rss,
    proc_threads,
    require_tools,
    run,
    serve_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20
KiB = 1 << 10
SECONDS = float(os.environ.get("OBD_SOAK_SECONDS", "60"))
SEED = int(os.environ.get("OBD_SOAK_SEED", "32"))
WORKERS = int(os.environ.get("OBD_SOAK_WORKERS", "0"))  # obd serve --workers
CLIENTS = 32
REGION = MiB  # client i owns [i MiB, (i+1) MiB)
SLOT = 64 * KiB  # one request stays in one slot; a batch uses distinct slots
SHARED = (32 * MiB, 40 * MiB)  # written and flushed before the soak, then only read
QEMU = 40 * MiB  # qemu-io's 8 slots of 1 MiB
SIZE = 64 * MiB
RSS_GROWTH_MAX = 48 * MiB  # from the end of the warm-up to the end
RSS_MAX_OVER_START = 256 * MiB  # 32 connections' buffers, allocator arenas, the index

KINDS = ["write", "read", "trim", "write_zeroes", "fua_write", "flush", "shared_read", "block_status"]  # fmt: skip
WEIGHTS = [34, 24, 7, 7, 4, 4, 10, 10]


class SoakClient:
    """One client thread: its region, its model, its counts."""

    def __init__(self, i: int, port: int, lower: bytes, shared: bytes, deadline: float) -> None:
        self.i = i
        self.port = port
        self.base = i * REGION
        self.model = bytearray(lower[self.base : self.base + REGION])
        self.shared = shared
        self.deadline = deadline
        self.rng = random.Random(SEED * 1000 + i)
        self.structured = i % 2 == 1
        self.counts: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"soak-{i}", daemon=True)

    def _run(self) -> None:
        try:
            c = RawClient(self.port, "soak", structured=self.structured, meta=self.structured, timeout=60)  # fmt: skip
            while time.monotonic() < self.deadline:
                self._batch(c)
            c.send_request(N.NBD_CMD_FLUSH, 0, 0)
            assert c.reply().error == 0, "final FLUSH failed"
            self.counts["flush"] += 1
            c.disconnect()
        except BaseException as e:
            self.error = e

    def _op(self, slot: int) -> tuple[str, int, int, int, bytes]:
        """(kind, flags, offset, length, payload) inside ``slot`` of the region."""
        rng = self.rng
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "block_status" and not self.structured:
            kind = "read"
        start = self.base + slot * SLOT
        if kind == "flush":
            return kind, 0, 0, 0, b""
        if kind == "shared_read":
            length = rng.randint(1, SLOT)
            return kind, 0, rng.randrange(SHARED[0], SHARED[1] - length), length, b""
        if kind == "read" and rng.random() < 0.3:  # unaligned reads are fine
            length = rng.randint(1, SLOT)
            return kind, 0, start + rng.randrange(0, SLOT - length + 1), length, b""
        sectors = rng.randint(1, SLOT // 512)
        offset = start + 512 * rng.randrange(0, SLOT // 512 - sectors + 1)
        length = sectors * 512
        flags = 0
        if kind == "write_zeroes" and rng.random() < 0.5:
            flags = N.NBD_CMD_FLAG_NO_HOLE
        if kind == "fua_write":
            flags = N.NBD_CMD_FLAG_FUA
        if kind == "block_status" and rng.random() < 0.3:
            flags = N.NBD_CMD_FLAG_REQ_ONE
        payload = rng.randbytes(length) if kind in ("write", "fua_write") else b""
        return kind, flags, offset, length, payload

    def _batch(self, c: RawClient) -> None:
        rng = self.rng
        if rng.random() < 0.01:  # now and then the whole region in one request
            ops = [(rng.choice(["write", "read"]), 0, self.base, REGION, b"")]
            if ops[0][0] == "write":
                ops = [("write", 0, self.base, REGION, rng.randbytes(REGION))]
        else:
            slots = rng.sample(range(REGION // SLOT), rng.randint(1, 8))
            ops = [self._op(s) for s in slots]
        cmds = {"write": N.NBD_CMD_WRITE, "fua_write": N.NBD_CMD_WRITE, "read": N.NBD_CMD_READ,
                "shared_read": N.NBD_CMD_READ, "trim": N.NBD_CMD_TRIM,
                "write_zeroes": N.NBD_CMD_WRITE_ZEROES, "flush": N.NBD_CMD_FLUSH,
                "block_status": N.NBD_CMD_BLOCK_STATUS}  # fmt: skip
        sent: dict[int, tuple[str, int, int, int, bytes]] = {}
        for kind, flags, offset, length, payload in ops:
            # what a read must return is fixed now: slots of one batch do not overlap
            if kind == "shared_read":
                expect = self.shared[offset - SHARED[0] : offset - SHARED[0] + length]
            elif kind in ("read", "block_status"):
                expect = bytes(self.model[offset - self.base : offset - self.base + length])
            else:
                expect = b""
            cookie = c.send_request(cmds[kind], offset, length, flags, payload)
            sent[cookie] = (kind, flags, offset, length, expect)
            rel = offset - self.base
            if kind in ("write", "fua_write"):
                self.model[rel : rel + length] = payload
            elif kind in ("trim", "write_zeroes"):
                self.model[rel : rel + length] = bytes(length)
        for _ in sent:
            r = c.reply()
            kind, flags, offset, length, expect = sent[r.cookie]
            assert r.error == 0, f"client {self.i}: {kind} {offset}+{length} got error {r.error}"
            if kind in ("read", "shared_read"):
                assert r.data == expect, f"client {self.i}: {kind} {offset}+{length}: wrong bytes"
            elif kind == "block_status":
                assert not flags & N.NBD_CMD_FLAG_REQ_ONE or len(r.extents) == 1
                pos = 0
                for n, state in r.extents:
                    if state & N.NBD_STATE_ZERO:
                        assert expect[pos : pos + n] == bytes(min(n, len(expect) - pos)), (
                            f"client {self.i}: {offset + pos}+{n} reported zero, holds data"
                        )
                    pos += n
            self.counts[kind] += 1


def _sampler(pid: int, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    t0 = time.monotonic()
    while not stop.wait(0.5):
        try:
            out.append((time.monotonic() - t0, proc_rss(pid)))
        except OSError:
            return


def test_soak_32_clients_then_restart(tmp_path: Path) -> None:
    require_tools("qemu-io", "nbdcopy")
    rng = random.Random(SEED)
    chunks = {k * MiB: rng.randbytes(MiB) for k in range(0, SIZE // MiB, 2)}  # every other MiB
    lower = bytearray(SIZE)
    for off, b in chunks.items():
        lower[off : off + len(b)] = b
    cfg = image_of_raw(tmp_path, "soak", Path(make_raw(str(tmp_path / "soak.raw"), SIZE, chunks)), writable=True)  # fmt: skip
    args = ["--listen", "127.0.0.1:0", "--config", str(serve_config(tmp_path)),
            "--workers", str(WORKERS), f"{cfg}=soak"]  # fmt: skip
    disk = bytearray(lower)  # the whole disk as it must read at the end

    sp = ServeProcess(args)
    try:
        pid = sp.pid
        # the shared region: written (half of it) and flushed before anyone reads it
        shared_data = rng.randbytes((SHARED[1] - SHARED[0]) // 2)
        setup = RawClient(sp.port, "soak")
        for at in range(0, len(shared_data), 4 * MiB):
            assert setup.write(SHARED[0] + at, shared_data[at : at + 4 * MiB]) == 0
        setup.send_request(N.NBD_CMD_FLUSH, 0, 0)
        assert setup.reply().error == 0
        setup.disconnect()
        disk[SHARED[0] : SHARED[0] + len(shared_data)] = shared_data
        shared = bytes(disk[SHARED[0] : SHARED[1]])

        rss_start = proc_rss(pid)
        samples: list[tuple[float, int]] = []
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(pid, stop_sampling, samples), daemon=True)  # fmt: skip
        sampler.start()
        stable = [(SHARED[0], SHARED[1]), (QEMU + 8 * MiB, SIZE)]  # nobody writes there

        def copy_ok(data: bytes) -> bool:
            return all(data[a:b] == disk[a:b] for a, b in stable)

        real = RealClients(sp.uri("soak"), QEMU, sp.uri("soak"), tmp_path / "copy.raw", copy_ok)
        t0 = time.monotonic()
        clients = [SoakClient(i, sp.port, bytes(lower), shared, t0 + SECONDS) for i in range(CLIENTS)]  # fmt: skip
        try:
            for c in clients:
                c.thread.start()
            for c in clients:
                c.thread.join(SECONDS + 120)
        finally:
            real.halt()
        elapsed = time.monotonic() - t0
        stop_sampling.set()
        sampler.join(5)
        rss_end = proc_rss(pid)
        threads_end = proc_threads(pid)
        hung = [c.i for c in clients if c.thread.is_alive()]
        assert not hung, f"clients {hung} still running"
        errors = [(c.i, c.error) for c in clients if c.error is not None]
        assert not errors, errors[:3]
        real.check()
        for c in clients:
            disk[c.base : c.base + REGION] = c.model
        for slot, pattern in real.patterns.items():
            disk[slot : slot + MiB] = bytes([pattern]) * MiB

        # kill -9 after the final flushes, start again: every flushed write is there
        os.kill(pid, signal.SIGKILL)
        sp.proc.wait(10)
    finally:
        sp.stop()
    with ServeProcess(args) as sp2:
        out = tmp_path / "after.raw"
        run(["nbdcopy", sp2.uri("soak"), str(out)], timeout=120)
        after = out.read_bytes()
        bad = [i for i in range(0, SIZE, MiB) if after[i : i + MiB] != disk[i : i + MiB]]
        assert not bad, f"MiB {[b // MiB for b in bad]} differ after the restart"
        run(real.qemu_io_check(sp2.uri("soak")))
        assert sp2.stop() == 0, sp2.stderr

    counts: collections.Counter[str] = collections.Counter()
    for c in clients:
        counts.update(c.counts)
    total = sum(counts.values())
    warm = [r for t, r in samples if t >= min(10.0, SECONDS / 6)]
    rss_warm = warm[0] if warm else rss_start
    rss_peak = max([r for _, r in samples] + [rss_end])
    print(
        f"\nsoak: {CLIENTS} clients for {elapsed:.0f} s: {total} operations "
        f"({total / elapsed:.0f}/s): {dict(sorted(counts.items()))}\n"
        f"  real clients alongside: {dict(real.runs)}\n"
        f"  server RSS: start {rss_start / MiB:.1f} MiB, after warm-up {rss_warm / MiB:.1f} MiB, "
        f"end {rss_end / MiB:.1f} MiB, peak {rss_peak / MiB:.1f} MiB; threads at the end {threads_end}\n"
        f"  RSS every 10 s (MiB): {[round(r / MiB) for t, r in samples if t % 10 < 0.5]}\n"
        f"  after kill -9 and restart: all {SIZE // MiB} MiB read as the model"
    )  # fmt: skip
    assert total > CLIENTS * 10 and all(counts[k] for k in KINDS), counts
    assert rss_peak < rss_start + RSS_MAX_OVER_START, (
        f"server RSS peaked at {rss_peak / MiB:.1f} MiB"
    )
    assert rss_end - rss_warm < RSS_GROWTH_MAX, (
        f"server RSS grew {(rss_end - rss_warm) / MiB:.1f} MiB after the warm-up"
    )
