"""The TCMU command ring (obd/serve/tcmu/ring.py) against an in-process kernel emulator.

``tests/tcmu_emu.py`` queues commands as the kernel driver does (PAD entries at the wrap,
the CDB after the iovecs, buffers scattered over the data area) and reads completions as
it does (from its last cleaned offset to ``cmd_tail``, by ``cmd_id``). The hypothesis test
drives random reads, writes and unmaps through the ring and the SCSI layer against a
``bytearray`` model, with ring sizes that force wraps and random completion orders.
"""

from __future__ import annotations

import mmap
import random
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from obd.errors import CorruptError, UnsupportedError
from obd.serve.tcmu import scsi, uapi
from obd.serve.tcmu.ring import Command, CommandRing, Tmr
from tests.tcmu_emu import KernelEmu, RingFull

OOOC = uapi.TCMU_MAILBOX_FLAG_CAP_OOOC
READ_LEN = uapi.TCMU_MAILBOX_FLAG_CAP_READ_LEN


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


class ToyDisk:
    """READ(10) / WRITE(10) over a bytearray; anything else answers GOOD. Ring-only tests."""

    def __init__(self, blocks: int = 64) -> None:
        self.buf = bytearray(random.Random(1).randbytes(blocks * 512))
        self.seen: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, cmd: Command) -> scsi.Response:
        with self.lock:
            self.seen.append(cmd.cmd_id)
        op = cmd.cdb[0]
        if op in (0x28, 0x2A):
            _, _, lba, _, n, _ = struct.unpack(">BBIBHB", cmd.cdb)
            a, b = lba * 512, (lba + n) * 512
            if op == 0x28:
                return scsi.Response(data=bytes(self.buf[a:b]))
            self.buf[a:b] = cmd.data_out(b - a)
        return scsi.GOOD


def test_mailbox_is_checked() -> None:
    emu = KernelEmu()
    bad = bytearray(emu.mapping)
    struct.pack_into("<H", bad, 0, 3)
    with pytest.raises(UnsupportedError, match="version 3"):
        CommandRing(bad, name="uio7")
    bad = bytearray(emu.mapping)
    struct.pack_into("<I", bad, uapi.Mailbox.LAYOUT.offset("cmdr_size"), len(bad))
    with pytest.raises(CorruptError, match=r"uio7: .*outside the mapping"):
        CommandRing(bad, name="uio7")
    with pytest.raises(CorruptError, match="no mailbox"):
        CommandRing(bytearray(16))


def test_commands_round_trip_and_tail_reaches_head() -> None:
    emu = KernelEmu(cmdr_size=2048, data_blocks=32)
    ring = CommandRing(emu.mapping)
    disk = ToyDisk()
    payload = random.Random(2).randbytes(3 * 512)
    w = emu.queue(write10(5, 3), payload)
    r = emu.queue(read10(4, 5), data_length=5 * 512)
    t = emu.queue(bytes(6))  # TEST UNIT READY: no data
    assert ring.pending == 0
    assert ring.process(disk) is True
    assert ring.tail == emu.head == ring.head()
    assert ring.pending == 0
    done = {c.cmd_id: c for c in emu.reap()}
    assert set(done) == {w, r, t} and not emu.inflight
    assert all(c.status == scsi.SAM_STAT_GOOD and c.uflags == 0 for c in done.values())
    assert disk.buf[5 * 512 : 8 * 512] == payload
    assert done[r].data_in == bytes(disk.buf[4 * 512 : 9 * 512])
    assert disk.seen == [w, r, t]
    assert ring.process(disk) is False  # nothing new: the tail stays


def test_wraps_insert_pads_that_the_ring_skips() -> None:
    emu = KernelEmu(cmdr_size=600, data_blocks=16, seed=3)
    ring = CommandRing(emu.mapping)
    disk = ToyDisk()
    model = bytearray(disk.buf)
    rng = random.Random(4)
    for _ in range(60):
        lba, n = rng.randrange(60), rng.randrange(1, 5)
        if rng.random() < 0.5:
            data = rng.randbytes(n * 512)
            emu.queue(write10(lba, n), data)
            model[lba * 512 : (lba + n) * 512] = data
        else:
            emu.queue(read10(lba, n), data_length=n * 512)
        assert ring.process(disk)
        (c,) = emu.reap()
        assert c.status == 0
        if c.cdb[0] == 0x28:
            assert c.data_in == model[lba * 512 : (lba + n) * 512]
    assert emu.pads >= 5 and emu.wraps >= 10
    assert ring.tail == emu.head


def test_in_order_completion_waits_for_the_oldest() -> None:
    emu = KernelEmu(cmdr_size=4096)
    ring = CommandRing(emu.mapping)
    assert not ring.ooo
    ids = [emu.queue(bytes(6)) for _ in range(4)]
    cmds = ring.poll()
    assert [c.cmd_id for c in cmds] == ids and ring.pending == 4
    tail0 = ring.tail
    assert ring.complete(cmds[2], scsi.GOOD) is False
    assert ring.complete(cmds[1], scsi.GOOD) is False
    assert emu.tail == tail0 and emu.reap() == []
    assert ring.complete(cmds[0], scsi.GOOD) is True  # 0, 1, 2 are a completed prefix
    assert [c.cmd_id for c in emu.reap()] == ids[:3]
    assert emu.tail == cmds[3].slot
    assert ring.complete(cmds[3], scsi.Response.check(scsi.NOT_READY, (0x04, 0x00))) is True
    (last,) = emu.reap()
    assert (last.cmd_id, last.status, last.sense[2], last.sense[12]) == (ids[3], 2, 2, 4)
    assert emu.tail == emu.head and ring.pending == 0
    with pytest.raises(ValueError, match="twice"):
        ring.complete(cmds[0], scsi.GOOD)


def test_out_of_order_completion_when_the_kernel_allows_it() -> None:
    emu = KernelEmu(cmdr_size=4096, flags=OOOC)
    ring = CommandRing(emu.mapping)
    assert ring.ooo
    ids = [emu.queue(bytes(6)) for _ in range(3)]
    cmds = ring.poll()
    assert ring.complete(cmds[2], scsi.GOOD) is True  # written into the oldest entry
    (c,) = emu.reap()
    assert c.cmd_id == ids[2] and c.entry_off == cmds[0].slot
    assert ring.complete(cmds[0], scsi.Response.check(scsi.MEDIUM_ERROR, (0x11, 0))) is True
    (c,) = emu.reap()
    assert c.cmd_id == ids[0] and c.entry_off == cmds[1].slot and c.sense[2] == 3
    assert ring.complete(cmds[1], scsi.GOOD) is True
    assert [c.cmd_id for c in emu.reap()] == [ids[1]]
    assert emu.tail == emu.head


@pytest.mark.parametrize("flags", [0, OOOC], ids=["in-order", "ooo"])
def test_many_threads_complete_in_any_order(flags: int) -> None:
    emu = KernelEmu(cmdr_size=1024, data_blocks=64, flags=flags, seed=5)
    ring = CommandRing(emu.mapping)
    disk = ToyDisk(blocks=256)
    model = bytearray(disk.buf)
    rng = random.Random(6)
    expect: dict[int, bytes] = {}  # read cmd_id -> the bytes it must see
    writing: dict[int, int] = {}  # write cmd_id -> its 4-block slot
    written: set[int] = set()
    kicks = 0
    lock = threading.Lock()

    def slow(cmd: Command) -> scsi.Response:
        time.sleep(rng.random() * 0.002)
        return disk(cmd)

    def run(cmd: Command) -> None:
        nonlocal kicks
        if ring.run(cmd, slow):
            with lock:
                kicks += 1

    def reap() -> None:
        for c in emu.reap():
            assert c.status == 0
            writing.pop(c.cmd_id, None)
            if c.cmd_id in expect:
                assert c.data_in == expect.pop(c.cmd_id)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(400):
            slot = rng.randrange(0, 256, 4)  # each slot is written at most once, and read
            if slot in writing.values():  # only when no write to it is in flight
                continue
            try:
                if rng.random() < 0.4 and slot not in written:
                    n = rng.randrange(1, 5)
                    data = rng.randbytes(n * 512)
                    writing[emu.queue(write10(slot, n), data)] = slot
                    written.add(slot)
                    model[slot * 512 : (slot + n) * 512] = data
                else:
                    cid = emu.queue(read10(slot, 4), data_length=4 * 512)
                    expect[cid] = bytes(model[slot * 512 : (slot + 4) * 512])
            except RingFull:
                pass
            for cmd in ring.poll():
                pool.submit(run, cmd)
            reap()
        deadline = time.monotonic() + 10
        while emu.inflight and time.monotonic() < deadline:
            reap()
            time.sleep(0.001)
    assert not emu.inflight and not expect and ring.pending == 0 and emu.tail == emu.head
    assert disk.buf == model
    assert kicks > 0


def test_tmr_entries_are_reported_and_passed() -> None:
    emu = KernelEmu(flags=uapi.TCMU_MAILBOX_FLAG_CAP_TMR)
    got: list[Tmr] = []
    ring = CommandRing(emu.mapping, on_tmr=got.append)
    a = emu.queue(bytes(6))
    emu.queue_tmr(uapi.TCMU_TMR_ABORT_TASK, [a, 77])
    b = emu.queue(bytes(6))
    cmds = ring.poll()
    assert [c.cmd_id for c in cmds] == [a, b]
    assert got == [Tmr(uapi.TCMU_TMR_ABORT_TASK, (a, 77))] and got[0].name == "ABORT_TASK"
    assert ring.complete(cmds[0], scsi.GOOD)
    assert emu.tail == cmds[1].slot  # the TMR entry was passed with the command before it
    assert ring.complete(cmds[1], scsi.GOOD)
    assert [c.cmd_id for c in emu.reap()] == [a, b] and emu.tail == emu.head


def test_entries_needing_no_answer_are_passed_at_poll() -> None:
    emu = KernelEmu(cmdr_size=600)
    ring = CommandRing(emu.mapping)
    for _ in range(3):
        emu.queue(bytes(6))
        ring.process(lambda c: scsi.GOOD)
        emu.reap()
    emu.queue_tmr(uapi.TCMU_TMR_LUN_RESET, [])
    assert ring.poll() == [] and ring.tail == emu.tail == emu.head
    emu.queue(bytes(16 * 8), data_length=0)  # does not fit before the end: a PAD first
    assert emu.pads == 1
    (cmd,) = ring.poll()
    assert ring.tail == emu.tail != emu.head  # the command is still unanswered
    assert ring.complete(cmd, scsi.GOOD) and emu.tail == emu.head


def test_short_entries_are_corrupt() -> None:
    for op, length in ((uapi.TCMU_OP_CMD, 104), (uapi.TCMU_OP_TMR, 24)):
        emu = KernelEmu()
        emu.queue_raw(op, length)
        with pytest.raises(CorruptError, match=f"only {length} bytes"):
            CommandRing(emu.mapping).poll()


def test_tmr_callback_failure_does_not_stop_the_ring() -> None:
    emu = KernelEmu()

    def boom(t: Tmr) -> None:
        raise RuntimeError("callback bug")

    ring = CommandRing(emu.mapping, on_tmr=boom)
    emu.queue_tmr(uapi.TCMU_TMR_LUN_RESET, [])
    a = emu.queue(bytes(6))
    assert ring.process(lambda c: scsi.GOOD)
    assert [c.cmd_id for c in emu.reap()] == [a]


def test_unknown_entry_opcode_is_flagged_and_skipped() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping)
    off = emu.queue_raw(5, 64)
    a = emu.queue(bytes(6))
    assert ring.process(lambda c: scsi.GOOD)
    hdr = uapi.CmdEntryHdr.unpack(emu.mapping, emu.cmdr_off + off)
    assert hdr.uflags & uapi.TCMU_UFLAG_UNKNOWN_OP and hdr.op == 5
    assert [c.cmd_id for c in emu.reap()] == [a]


def test_bad_iovec_is_answered_without_the_handler() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping)
    a = emu.queue(read10(0, 1), data_length=512)
    base = emu.cmdr_off + 0
    uapi.Iovec(8, 512).pack_into(emu.mapping, base + uapi.IOV_OFF)  # into the mailbox
    called: list[Command] = []
    assert ring.process(lambda c: called.append(c) or scsi.GOOD)  # type: ignore[func-returns-value]
    assert called == []
    (c,) = emu.reap()
    assert c.cmd_id == a and c.status == scsi.SAM_STAT_CHECK_CONDITION
    assert (c.sense[0], c.sense[2], c.sense[12], c.sense[13]) == (0x70, 0x4, 0x44, 0x00)


def test_broken_entries_are_answered_without_the_handler() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping)
    cdb_off = uapi.CmdEntryReq.LAYOUT.offset("cdb_off")
    slots = []
    for cdb, n in ((bytes(6), 0), (read10(0, 1), 512), (bytes(6), 0)):
        slots.append(emu.cmdr_off + emu.head)
        emu.queue(cdb, data_length=n)
    a, b, c = emu.inflight
    # a: cdb_off past the mapping; b: more iovecs than its entry holds; c: CDB at the end
    struct.pack_into("<Q", emu.mapping, slots[0] + cdb_off, 1 << 40)
    struct.pack_into("<I", emu.mapping, slots[1] + uapi.CmdEntryReq.LAYOUT.offset("iov_cnt"), 50)
    emu.mapping[-3] = 0x28  # a 10-byte CDB with 3 bytes left
    struct.pack_into("<Q", emu.mapping, slots[2] + cdb_off, len(emu.mapping) - 3)
    cmds = ring.poll()
    assert "cdb_off" in cmds[0].problem and "outside the mapping" in cmds[0].problem
    assert "do not fit" in cmds[1].problem
    assert "runs past the mapping" in cmds[2].problem
    called: list[Command] = []
    for cmd in cmds:
        ring.run(cmd, lambda c: called.append(c) or scsi.GOOD)  # type: ignore[func-returns-value]
    assert called == []
    done = emu.reap()
    assert [x.cmd_id for x in done] == [a, b, c]
    assert all((x.status, x.sense[2], x.sense[12]) == (2, 0x4, 0x44) for x in done)
    other = CommandRing(KernelEmu().mapping)
    with pytest.raises(ValueError, match="another ring"):
        other.complete(cmds[0], scsi.GOOD)


def test_variable_length_cdb_and_data_out_pieces() -> None:
    emu = KernelEmu(data_blocks=8)
    ring = CommandRing(emu.mapping)
    cdb = bytes([0x7F, 0, 0, 0, 0, 0, 0, 24]) + bytes(range(24))
    emu.queue(cdb)
    emu.queue(write10(0, 3), bytes(range(256)) * 6)
    (var, wr) = ring.poll()
    assert var.cdb == cdb and var.data_out() == b""
    assert len(wr.iovecs) >= 1 and wr.data_out() == bytes(range(256)) * 6
    assert wr.data_out(700) == (bytes(range(256)) * 6)[:700]  # stops inside the iovecs
    assert wr.data_out(0) == b""


def test_handler_exception_is_an_internal_target_failure() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping)
    emu.queue(bytes(6))

    def broken(cmd: Command) -> scsi.Response:
        raise KeyError("bug")

    assert ring.process(broken)
    (c,) = emu.reap()
    assert c.status == 2 and (c.sense[2], c.sense[12]) == (0x4, 0x44)


def test_corrupt_ring_raises() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping, name="uio3")
    emu.queue(bytes(6))
    struct.pack_into("<I", emu.mapping, emu.cmdr_off, uapi.tcmu_len_op(0, uapi.TCMU_OP_CMD))
    with pytest.raises(CorruptError, match=r"uio3: .*length 0"):
        ring.poll()
    emu2 = KernelEmu()
    ring2 = CommandRing(emu2.mapping)
    struct.pack_into("<I", emu2.mapping, uapi.CMD_HEAD_OFF, 12)
    with pytest.raises(CorruptError, match="cmd_head 12"):
        ring2.poll()
    emu3 = KernelEmu()
    ring3 = CommandRing(emu3.mapping)
    emu3.queue(bytes(6))
    hdr_len = uapi.tcmu_len_op(emu3.head + 64, uapi.TCMU_OP_CMD)  # past the head
    struct.pack_into("<I", emu3.mapping, emu3.cmdr_off, hdr_len)
    with pytest.raises(CorruptError, match="queued"):
        ring3.poll()


@pytest.mark.parametrize("cap", [True, False], ids=["read_len", "no-read_len"])
def test_short_data_in(cap: bool) -> None:
    emu = KernelEmu(flags=READ_LEN if cap else 0)
    ring = CommandRing(emu.mapping)
    emu.queue(bytes([0x12, 0, 0, 0, 96, 0]), data_length=96)
    assert ring.process(lambda c: scsi.Response(data=b"\x01" * 36))
    (c,) = emu.reap()
    assert c.data_in == b"\x01" * 36 + bytes(60)  # the rest of the buffer is zeroed
    if cap:
        assert c.uflags & uapi.TCMU_UFLAG_READ_LEN and c.read_len == 36
    else:
        assert not c.uflags & uapi.TCMU_UFLAG_READ_LEN


def test_longer_answer_than_buffer_is_cut() -> None:
    emu = KernelEmu(flags=READ_LEN)
    ring = CommandRing(emu.mapping)
    emu.queue(bytes(6), data_length=10)
    assert ring.process(lambda c: scsi.Response(data=bytes(range(20))))
    (c,) = emu.reap()
    assert c.data_in == bytes(range(10)) and not c.uflags & uapi.TCMU_UFLAG_READ_LEN


def test_restart_picks_up_queued_commands() -> None:
    emu = KernelEmu()
    ring = CommandRing(emu.mapping)
    a = emu.queue(bytes(6))
    ring.poll()  # taken, never answered: the process died
    b = emu.queue(bytes(6))
    again = CommandRing(emu.mapping)
    assert [c.cmd_id for c in again.poll()] == [a, b]


def test_close_releases_the_mmap() -> None:
    emu = KernelEmu()
    mm = mmap.mmap(-1, len(emu.mapping))
    mm[:] = emu.mapping
    ring = CommandRing(mm)
    struct.pack_into("<I", mm, uapi.CMD_HEAD_OFF, 0)
    ring.close()
    mm.close()  # no exported view left
    mm2 = mmap.mmap(-1, len(emu.mapping))
    emu.queue(bytes(6))
    mm2[:] = emu.mapping
    ring2 = CommandRing(mm2)
    (cmd,) = ring2.poll()
    ring2.close()
    assert ring2.complete(cmd, scsi.GOOD) is False
    mm2.close()
    bad = mmap.mmap(-1, 4096)  # version 0: refused, and the view of it let go
    with pytest.raises(UnsupportedError):
        CommandRing(bad)
    bad.close()


# --- hypothesis: random I/O through ring + SCSI against a bytearray model -----------------
DISK_BLOCKS = 64

io_op = st.one_of(
    st.tuples(st.just("read"), st.integers(0, DISK_BLOCKS - 1), st.integers(1, 8)),
    st.tuples(st.just("write"), st.integers(0, DISK_BLOCKS - 1), st.integers(1, 8)),
    st.tuples(st.just("unmap"), st.integers(0, DISK_BLOCKS - 1), st.integers(1, 8)),
    st.tuples(st.just("ws_unmap"), st.integers(0, DISK_BLOCKS - 1), st.integers(1, 8)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ring_bytes=st.sampled_from([392, 456, 600, 1024]),
    ooo=st.booleans(),
    batch=st.integers(1, 6),
    ops=st.lists(io_op, min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_random_io_through_ring_and_scsi(
    ring_bytes: int, ooo: bool, batch: int, ops: list[tuple[str, int, int]], seed: int
) -> None:
    from obd.serve.tcmu.scsi import ScsiDisk
    from tests.tcmu_emu import MemDisk

    rng = random.Random(seed)
    emu = KernelEmu(cmdr_size=ring_bytes, data_blocks=24, flags=OOOC if ooo else 0, seed=seed)
    ring = CommandRing(emu.mapping)
    dev = MemDisk(DISK_BLOCKS * 512, data=rng.randbytes(DISK_BLOCKS * 512))
    disk = ScsiDisk(dev, serial="hyp")
    model = bytearray(dev.buf)
    reads: dict[int, bytes] = {}
    held: list[Command] = []
    outstanding: dict[int, tuple[int, int, bool]] = {}  # queued, not answered: (a, b, writes)

    def drain(force: bool) -> None:
        held.extend(ring.poll())
        rng.shuffle(held)
        while held and (force or len(held) >= batch):
            cmd = held.pop()
            ring.run(cmd, disk)
            outstanding.pop(cmd.cmd_id)
        for c in emu.reap():
            assert c.status == scsi.SAM_STAT_GOOD, (c.cdb.hex(), c.sense[:14].hex())
            if c.cmd_id in reads:
                assert c.data_in == reads.pop(c.cmd_id)

    def queue(a: int, b: int, writes: bool, cdb: bytes, out: bytes, length: int) -> int:
        # a command that conflicts with one still unanswered waits for it: the ring may
        # answer unanswered ones in any order
        if any(x < b and a < y and (w or writes) for x, y, w in outstanding.values()):
            drain(True)
        for _attempt in range(3):
            try:
                cid = emu.queue(cdb, out, length)
                outstanding[cid] = (a, b, writes)
                return cid
            except RingFull:
                drain(True)
        raise AssertionError("ring stays full")

    for kind, lba, n in ops:
        n = min(n, DISK_BLOCKS - lba)
        a, b = lba * 512, (lba + n) * 512
        if kind == "read":
            cid = queue(a, b, False, struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0), b"", b - a)
            reads[cid] = bytes(model[a:b])
        elif kind == "write":
            data = rng.randbytes(b - a)
            queue(a, b, True, write10(lba, n), data, b - a)
            model[a:b] = data
        elif kind == "unmap":
            param = struct.pack(">HH4xQI4x", 22, 16, lba, n)
            queue(a, b, True, struct.pack(">BB5xHB", 0x42, 0, len(param), 0), param, len(param))
            model[a:b] = bytes(b - a)
        else:
            cdb = struct.pack(">BBQIBB", 0x93, 0x08, lba, n, 0, 0)
            queue(a, b, True, cdb, bytes(512), 512)
            model[a:b] = bytes(b - a)
        drain(False)
    drain(True)
    drain(True)
    assert not emu.inflight and not reads and ring.pending == 0
    assert emu.tail == emu.head
    assert dev.buf == model


entry_st = st.tuples(
    st.integers(0, 7),  # opcode: PAD, CMD, TMR or unknown
    st.integers(1, 40).map(lambda n: n * 8),  # length
    st.binary(min_size=320, max_size=320),  # the rest of its bytes
)


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(entry_st, max_size=6),
    head_shift=st.sampled_from([0, 0, 0, 8, 4, -8]),
    flags=st.sampled_from([0, OOOC, OOOC | READ_LEN]),
)
def test_a_garbage_ring_is_corrupt_or_served(
    entries: list[tuple[int, int, bytes]], head_shift: int, flags: int
) -> None:
    """Whatever the ring holds, poll raises CorruptError or yields commands that are
    answered in bounds: nothing else escapes, the mailbox changes only in cmd_tail."""
    emu = KernelEmu(cmdr_size=2048, data_blocks=4, flags=flags)
    pos = 0
    for op, length, rest in entries:
        base = emu.cmdr_off + pos
        emu.mapping[base : base + length] = (
            struct.pack("<I", uapi.tcmu_len_op(length, op)) + rest
        )[:length]
        pos += length
    head = max(0, pos + head_shift) % emu.cmdr_size
    struct.pack_into("<I", emu.mapping, uapi.CMD_HEAD_OFF, head)
    mailbox = bytes(emu.mapping[: uapi.CMD_TAIL_OFF])
    ring = CommandRing(emu.mapping)
    try:
        cmds = ring.poll()
    except CorruptError:
        return
    for cmd in cmds:
        ring.run(cmd, lambda c: scsi.Response(data=b"\xee" * 100))
    assert ring.pending == 0 and ring.tail == head
    assert bytes(emu.mapping[: uapi.CMD_TAIL_OFF]) == mailbox
