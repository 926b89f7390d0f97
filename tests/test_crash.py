"""Crash-consistency tests: every acknowledged write survives a power cut at any point.

Each test runs an obd operation once, for real and in this process, while
:mod:`tests.crashsim` records every write, truncate, fsync and rename obd makes through
:mod:`obd.io`; then it rebuilds the files a crash at many points could leave (with lost,
reordered and torn unsynced writes; the model is in ``crashsim``'s docstring) and
reopens them with obd. What must hold in every crash state:

- every write a flush acknowledged (``LSMTWritable.flush``, an NBD ``FLUSH`` or ``FUA``
  write, a finished command) reads back exactly;
- a sector not written since the last acknowledged flush reads its acknowledged content;
  one written since reads its acknowledged content, one of the values written to it
  since, or zeros: an unacknowledged write to a block device may be lost or torn;
- the layer opens, or fails with a CorruptError (one clear line), never another exception
  and never silently wrong bytes; for a writable layer whose flushes were acknowledged
  not opening at all loses them, so that is a violation too;
- an output file of a command is absent (or the old file it replaces) or whole and
  correct while the command runs, and whole and correct once it returned.

The tests that disable one fsync prove the simulator catches a missing one (a ``kill -9``
test cannot: the page cache survives it). Each test prints its figures: crash points,
crash states (subsets) tried, violations. ``OBD_CRASH_EXAMPLES=10`` explores ten times
more.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from obd.errors import CorruptError, ObdError, UsageError
from obd.image.layers import open_ro_layer, open_rw_layer
from obd.io.file import LocalFile
from tests.crashsim import CrashSim, CrashState, Recorder, Report, recording, scale, sector_problems

VSIZE = 1 << 20
SECTORS = VSIZE // 512


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _show(capsys: pytest.CaptureFixture[str], report: Report) -> None:
    """Print the figures of a run (shown even without -s)."""
    with capsys.disabled():
        print("\n" + report.summary(), flush=True)


# --- writable layers --------------------------------------------------------------------


class LayerRun:
    """A writable layer driven under a recorder, with its model and the ack markers.

    ``write`` markers go in before each write (a crash may come in the middle of it);
    an ``ack`` marker with the model goes in after each flush returned.
    """

    def __init__(self, rec: Recorder, data: str, index: str) -> None:
        self.rec = rec
        self.data = data
        self.index = index
        self.layer = open_rw_layer(data, index)
        # what the writer sees on open: the baseline (zeros for a new layer; after a crash,
        # what recovery made of it)
        self.model = bytearray(self.layer.pread(0, VSIZE))
        self.initial = bytes(self.model)

    def write(self, sector: int, count: int, seed: int) -> None:
        off = sector * 512
        n = min(count, SECTORS - sector) * 512
        data = _pattern(seed, n)
        self.rec.mark("write", (off, data, n))
        self.layer.pwrite(off, data)
        self.model[off : off + n] = data

    def discard(self, sector: int, count: int) -> None:
        off = sector * 512
        n = min(count, SECTORS - sector) * 512
        self.rec.mark("write", (off, None, n))
        self.layer.discard(off, n)
        self.model[off : off + n] = bytes(n)

    def flush(self) -> None:
        start = self.rec.mark("flush")
        self.layer.flush()
        self.rec.mark("ack", (bytes(self.model), start))

    def reopen(self) -> None:
        self.layer.close()
        self.layer = open_rw_layer(self.data, self.index)

    def run(self, steps: list[tuple[Any, ...]]) -> None:
        for step in steps:
            if step[0] == "w":
                self.write(*step[1:])
            elif step[0] == "d":
                self.discard(*step[1:])
            elif step[0] == "f":
                self.flush()
            else:
                self.reopen()
        self.layer.close()


def acked_and_since(
    state: CrashState, initial: bytes
) -> tuple[bytes, list[tuple[int, bytes | None, int]]]:
    """The disk the last acknowledgement before the crash promised, and the writes after it.

    An ``ack`` marker carries ``(disk, start)``: the disk as of the writes that had returned
    when the flush started (marker ``start``); writes marked after ``start`` may or may not
    be covered by it. With flushes running beside writes (NBD), the ack of the latest-started
    flush wins.
    """
    acks = [op.payload for _, op in state.markers if op.label == "ack"]
    disk, start = max(acks, key=lambda a: a[1]) if acks else (initial, -1)
    since = [op.payload for i, op in state.markers if i > start and op.label == "write"]
    return disk, since


def _first_diff(a: bytes, b: bytes) -> int:
    for k in range(0, len(a), 512):
        if a[k : k + 512] != b[k : k + 512]:
            return k
    return -1


def layer_check(data: str, index: str, initial: bytes = bytes(VSIZE)) -> Callable[[CrashState], str | None]:  # fmt: skip
    """The writable-layer properties, then recovery: a writer opens it, writes, flushes."""

    def check(state: CrashState) -> str | None:
        acked, since = acked_and_since(state, initial)
        d, i = state.path(data), state.path(index)
        try:
            layer = open_rw_layer(d, i, readonly=True)
        except CorruptError as e:
            return f"acknowledged writes lost, the layer does not open: {e}"
        except ObdError as e:
            return f"the layer does not open: {type(e).__name__}: {e}"
        with layer:
            got = layer.pread(0, VSIZE)
        bad = sector_problems(got, acked, since)
        if bad:
            return f"read-only open: {bad}"
        try:
            w = open_rw_layer(d, i)
        except ObdError as e:
            return f"a writer cannot open it: {type(e).__name__}: {e}"
        rng = random.Random(state.point)
        at = rng.randrange(SECTORS - 8) * 512
        new = rng.randbytes(4096)
        with w:
            got2 = w.pread(0, VSIZE)
            bad = sector_problems(got2, acked, since)
            if bad:
                return f"writer open: {bad}"
            w.pwrite(at, new)
            w.flush()
        expected = got2[:at] + new + got2[at + 4096 :]
        with open_rw_layer(d, i, readonly=True) as again:
            got3 = again.pread(0, VSIZE)
        if got3 != expected:
            k = _first_diff(got3, expected)
            return (
                f"recovery: after a writer reopened the crashed layer, wrote 4 KiB at {at} "
                f"and flushed, a reopen reads wrong bytes at offset {k}"
            )
        return None

    return check


def _new_layer(folder: Path, sparse: bool) -> tuple[str, str]:
    from obd.image import ops

    ops.create(str(folder / "l.data"), str(folder / "l.index"), VSIZE, sparse=sparse)
    return "l.data", "l.index"


def run_layer(folder: Path, sparse: bool, steps: list[tuple[Any, ...]]) -> CrashSim:
    data, index = _new_layer(folder, sparse)
    with recording(folder) as rec:
        LayerRun(rec, str(folder / data), str(folder / index)).run(steps)
    return CrashSim(rec, "sparse layer" if sparse else "log-structured layer")


step_strategy = st.one_of(
    st.tuples(
        st.just("w"), st.integers(0, SECTORS - 1), st.integers(1, 64), st.integers(0, 1 << 30)
    ),
    st.tuples(st.just("d"), st.integers(0, SECTORS - 1), st.integers(1, 64)),
    st.just(("f",)),
    st.just(("r",)),
)

_layer_settings = settings(
    max_examples=max(1, int(30 * scale())),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


def _fixed_steps(seed: int, n: int = 30) -> list[tuple[Any, ...]]:
    """A seeded sequence that exercises every step kind (flushes included)."""
    rng = random.Random(seed)
    steps: list[tuple[Any, ...]] = []
    for k in range(n):
        r = rng.random()
        if r < 0.55:
            steps.append(("w", rng.randrange(SECTORS), rng.randrange(1, 65), rng.getrandbits(30)))
        elif r < 0.7:
            steps.append(("d", rng.randrange(SECTORS), rng.randrange(1, 65)))
        elif r < 0.9 or k == n - 2:
            steps.append(("f",))
        else:
            steps.append(("r",))
    return steps


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sparse", [False, True], ids=["log", "sparse"])
def test_writable_layer_crash_fixed(tmp_path: Path, sparse: bool, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A seeded write/discard/flush/reopen sequence, crashed at every interesting point."""
    sim = run_layer(tmp_path, sparse, _fixed_steps(7, 120))
    report = sim.explore(layer_check("l.data", "l.index"), points=160, subsets=12, seed=1)
    _show(capsys, report)
    report.assert_clean()


@pytest.mark.timeout(600)
def test_writable_layer_crash_model(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Hypothesis-made write/discard/flush/reopen sequences on both layer kinds, crashed."""
    total = Report("writable layers, hypothesis", 0)
    examples = 0

    @_layer_settings
    @given(
        steps=st.lists(step_strategy, min_size=4, max_size=40),
        sparse=st.booleans(),
        seed=st.integers(0, 1 << 16),
    )
    def run(steps: list[tuple[Any, ...]], sparse: bool, seed: int) -> None:
        nonlocal examples
        folder = tmp_path_factory.mktemp("crash")
        try:
            sim = run_layer(folder, sparse, steps)
            report = sim.explore(layer_check("l.data", "l.index"), points=32, subsets=10, seed=seed)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        examples += 1
        total.ops += report.ops
        total.points += report.points
        total.states += report.states
        total.duplicates += report.duplicates
        total.violations += report.violations
        report.assert_clean()

    try:
        run()
    finally:
        total.name = f"writable layers, {examples} hypothesis examples"
        _show(capsys, total)


def _needs_cut(folder: Path) -> bool:
    """Whether a writer opening this crashed layer cuts records off its index."""
    trial = folder.parent / (folder.name + ".trial")
    shutil.copytree(folder, trial)
    try:
        before = (trial / "l.index").stat().st_size
        open_rw_layer(str(trial / "l.data"), str(trial / "l.index")).close()
        return (trial / "l.index").stat().st_size < before
    finally:
        shutil.rmtree(trial)


def crash_recover_crash(tmp_path: Path, sparse: bool, name: str, skip_cut_fsync: Callable[[bool], None] | None = None) -> Report:  # fmt: skip
    """Crash states of a first run, each recovered by a second run that crashes too.

    Half of the states picked are ones where the recovering writer cuts index records.
    ``skip_cut_fsync(on)`` is called around the recovering open (to disable its fsync).
    """
    first = tmp_path / "first"
    first.mkdir()
    sim1 = run_layer(first, sparse, _fixed_steps(11, 60))
    rng = random.Random(4)
    total = Report(name, 0)
    points = sim1.points(10**6, rng)
    want = max(2, int(6 * scale()))
    cuts = picked = 0
    for attempt in range(40 * want):
        if picked == want:
            break
        folder = tmp_path / f"s{attempt}"
        folder.mkdir()
        sim1.build(rng.choice(points), rng.randrange(4, 40), 2, folder)
        cut = not sparse and _needs_cut(folder)
        if not sparse and cut != (cuts < want // 2 + want % 2):
            shutil.rmtree(folder)
            continue
        cuts += cut
        picked += 1
        with recording(folder) as rec:
            if skip_cut_fsync is not None:
                skip_cut_fsync(True)
            run = LayerRun(rec, str(folder / "l.data"), str(folder / "l.index"))
            if skip_cut_fsync is not None:
                skip_cut_fsync(False)
            run.run(_fixed_steps(100 + picked, 12))
        report = CrashSim(rec, "recovery").explore(
            layer_check("l.data", "l.index", run.initial), points=24, subsets=8, seed=picked
        )
        total.ops += report.ops
        total.points += report.points
        total.states += report.states
        total.duplicates += report.duplicates
        total.violations += report.violations
    assert picked == want
    total.name += f", {picked} first-crash states ({cuts} cut by the recovering writer)"
    return total


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sparse", [False, True], ids=["log", "sparse"])
def test_writable_layer_crash_during_recovery(tmp_path: Path, sparse: bool, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Crash, recover (a writer cuts what the crash left, writes, flushes), crash again.

    What the writer saw when it reopened the layer is the baseline of the second run: a
    second crash must not bring back records the recovery cut, nor lose what it flushed.
    """
    kind = "sparse" if sparse else "log"
    report = crash_recover_crash(tmp_path, sparse, f"crash, recovery, crash ({kind})")
    _show(capsys, report)
    report.assert_clean()


# --- the simulator catches a missing fsync ----------------------------------------------


def _skip_fsync_of(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Make ``LocalFile.flush`` a no-op for files whose path ends with ``suffix``."""
    real = LocalFile.flush

    def flush(self: LocalFile) -> None:
        if not self.path.endswith(suffix):
            real(self)

    monkeypatch.setattr(LocalFile, "flush", flush)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".index", ".data"])
def test_missing_layer_fsync_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Without the fsync of the index (or data) file, some crash loses an acknowledged write."""
    data, index = _new_layer(tmp_path, False)
    _skip_fsync_of(monkeypatch, suffix)
    with recording(tmp_path) as rec:
        LayerRun(rec, str(tmp_path / data), str(tmp_path / index)).run(_fixed_steps(7))
    report = CrashSim(rec, f"log layer, no fsync of {suffix}").explore(
        layer_check(data, index), points=40, subsets=8, seed=1
    )
    _show(capsys, report)
    assert report.violations, "the crash simulator missed a disabled fsync"
    assert any("acknowledged" in v.message or "differs" in v.message for v in report.violations)


@pytest.mark.timeout(600)
def test_missing_recovery_fsync_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Without the fsync after a recovering writer cuts the index, a second crash can bring
    the cut records back, pointing at data appended since: wrong bytes."""
    real = LocalFile.flush
    skip = [False]

    def flush(self: LocalFile) -> None:
        if not (skip[0] and self.path.endswith(".index")):
            real(self)

    monkeypatch.setattr(LocalFile, "flush", flush)

    def switch(on: bool) -> None:
        skip[0] = on

    report = crash_recover_crash(tmp_path, False, "recovery without the fsync of its cut", switch)
    _show(capsys, report)
    assert report.violations, "the crash simulator missed a disabled fsync"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["output file", "output folder", "seal index"])
def test_missing_output_fsync_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Without the fsync of an output before its rename, of its folder after it, or of a
    sealed index before its trailer, some crash leaves a broken or missing output."""
    import obd.io.file
    from obd.image import ops

    disk = _written_layer(tmp_path)
    d, i, out = str(tmp_path / "l.data"), str(tmp_path / "l.index"), str(tmp_path / "out.lsmt")
    inputs = _files(tmp_path, "l.data", "l.index")
    if which == "output file":
        _skip_fsync_of(monkeypatch, ".tmp")  # AtomicOutput's temporary file
    elif which == "output folder":
        monkeypatch.setattr(obd.io.file, "_fsync_dir", lambda folder: None)
    else:
        real = LocalFile.flush
        calls: list[str] = []

        def flush(self: LocalFile) -> None:
            calls.append(self.path)
            if len(calls) > 1:  # seal: skip the fsync between the index and the trailer
                real(self)

        monkeypatch.setattr(LocalFile, "flush", flush)
    if which == "seal index":
        sim = run_command(tmp_path, "seal without the index fsync", lambda: ops.seal(d, i))
        check = sealed_check(disk)
    else:
        sim = run_command(
            tmp_path, f"commit, no fsync of the {which}", lambda: ops.commit(d, i, out)
        )
        check = output_check(_files(tmp_path, "out.lsmt"), inputs=inputs)
    report = sim.explore(check, points=32, subsets=16, seed=5)
    _show(capsys, report)
    assert report.violations, "the crash simulator missed a disabled fsync"


# --- commands: outputs are absent (or the old file) or whole; whole once done -----------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _describe(got: bytes | None, final: bytes) -> str:
    if got is None:
        return "absent"
    if len(got) != len(final):
        return f"{len(got)} bytes (the output has {len(final)})"
    k = next(k for k in range(len(got)) if got[k] != final[k])
    return f"{len(got)} bytes, differing from the output at offset {k}"


Extra = Callable[[CrashState], "str | None"]


def output_check(
    outputs: dict[str, bytes],
    *,
    old: dict[str, bytes] | None = None,
    inputs: dict[str, bytes] | None = None,
    extra: Extra | None = None,
) -> Callable[[CrashState], str | None]:
    """Each output absent (or its ``old`` content) or whole until ``done``; whole after it."""
    old = old or {}

    def check(state: CrashState) -> str | None:
        done = state.last("done") is not None
        for rel, final in outputs.items():
            got = _read(state.path(rel))
            if got == final:
                continue
            if done:
                return f"{rel}: the command returned, but after the crash its output is {_describe(got, final)}"  # fmt: skip
            if got is None and rel not in old:
                continue
            if rel in old and got == old[rel]:
                continue
            was = " nor the old file" if rel in old else ""
            return f"{rel}: neither absent{was} nor whole while the command ran: {_describe(got, final)}"  # fmt: skip
        for rel, content in (inputs or {}).items():
            got = _read(state.path(rel))
            if got != content:
                return f"input {rel} changed: {_describe(got, content)}"
        return extra(state) if extra is not None else None

    return check


def run_command(folder: Path, name: str, fn: Callable[[], object]) -> CrashSim:
    """Run ``fn`` under the recorder; a ``done`` marker goes in when it returned."""
    with recording(folder) as rec:
        fn()
        rec.mark("done")
    return CrashSim(rec, name)


def _files(folder: Path, *rels: str) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in rels}


def _written_layer(folder: Path, *, sparse: bool = False, seed: int = 3) -> bytes:
    """A flushed writable layer l.data/l.index with random writes; returns its disk."""
    data, index = _new_layer(folder, sparse)
    model = bytearray(VSIZE)
    rng = random.Random(seed)
    with open_rw_layer(str(folder / data), str(folder / index)) as lay:
        for _ in range(40):
            s = rng.randrange(SECTORS - 64)
            n = rng.randrange(1, 64) * 512
            buf = rng.randbytes(n)
            lay.pwrite(s * 512, buf)
            model[s * 512 : s * 512 + n] = buf
        lay.discard(4096, 8192)
        model[4096 : 4096 + 8192] = bytes(8192)
        lay.flush()
    return bytes(model)


def _ro_disk(path: Path) -> bytes:
    with open_ro_layer(str(path)) as lay:
        return lay.pread(0, lay.virtual_size)


def _explore_and_show(sim: CrashSim, check: Callable[[CrashState], str | None], capsys: pytest.CaptureFixture[str], *, points: int = 64, subsets: int = 24) -> Report:  # fmt: skip
    report = sim.explore(check, points=points, subsets=subsets, seed=5)
    _show(capsys, report)
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["plain", "sparse", "from-raw", "force"])
def test_create_crash(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """obd create (plain, -s, --from, -f over a written layer): absent (or old) or whole."""
    from obd.image import ops

    raw = None
    if how == "from-raw":
        raw = tmp_path / "disk.raw"
        raw.write_bytes(_pattern(11, 300 * 1024))
    old_disk = _written_layer(tmp_path) if how == "force" else None
    old = _files(tmp_path, "l.data", "l.index") if how == "force" else {}
    d, i = str(tmp_path / "l.data"), str(tmp_path / "l.index")
    sim = run_command(
        tmp_path,
        f"create {how}",
        lambda: ops.create(
            d, i, VSIZE, sparse=how == "sparse", from_raw=str(raw) if raw else None, force=bool(old)
        ),
    )
    outputs = _files(tmp_path, "l.data", "l.index")
    want = bytearray(VSIZE)
    if raw is not None:
        want[: 300 * 1024] = raw.read_bytes()
    with open_rw_layer(d, i, readonly=True) as lay:
        assert lay.pread(0, VSIZE) == want

    def pair(state: CrashState) -> str | None:
        if old_disk is None:
            # the index is renamed into place after the data file it describes
            if os.path.exists(state.path("l.index")) and _read(state.path("l.data")) != outputs["l.data"]:  # fmt: skip
                return "l.index is in place but l.data is not whole"
            return None
        # -f: the old layer, the new one, or a mixed pair refused as corrupt; never wrong bytes
        try:
            with open_rw_layer(state.path("l.data"), state.path("l.index"), readonly=True) as lay:
                got = lay.pread(0, VSIZE)
        except CorruptError as e:
            return f"the refusal is not one line: {e}" if "\n" in str(e) else None
        if got not in (old_disk, bytes(want)):
            return "a crash in create -f left a pair that opens and reads neither the old nor the new layer"  # fmt: skip
        return None

    inputs = {"disk.raw": raw.read_bytes()} if raw is not None else {}
    check = output_check(outputs, old=old, inputs=inputs, extra=pair)
    report = _explore_and_show(sim, check, capsys)
    report.assert_clean()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["plain", "zfile", "force", "sealed-input"])
def test_commit_crash(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """obd commit (plain, -z, -f over an old output, of a sealed file): absent or whole."""
    from obd.image import ops

    disk = _written_layer(tmp_path)
    d, i, out = str(tmp_path / "l.data"), str(tmp_path / "l.index"), str(tmp_path / "out.lsmt")
    old: dict[str, bytes] = {}
    if how == "force":
        (tmp_path / "out.lsmt").write_bytes(_pattern(5, 70_000))
        old = _files(tmp_path, "out.lsmt")
    if how == "sealed-input":
        ops.seal(d, i)
    inputs = _files(tmp_path, "l.data", "l.index")
    zopts = ops.ZFileOptions(algorithm="zstd", block_size=8192) if how == "zfile" else None
    if how == "sealed-input":
        sim = run_command(tmp_path, "commit of a sealed layer", lambda: ops.commit_sealed(d, out))
    else:
        sim = run_command(
            tmp_path,
            f"commit {how}",
            lambda: ops.commit(d, i, out, uuid=None, force=how == "force", zfile=zopts),
        )
    assert _ro_disk(tmp_path / "out.lsmt") == disk
    outputs = _files(tmp_path, "out.lsmt")
    report = _explore_and_show(sim, output_check(outputs, old=old, inputs=inputs), capsys)
    report.assert_clean()


def sealed_check(disk: bytes) -> Callable[[CrashState], str | None]:
    """A layer being sealed in place: the writable layer or the sealed one, all of its data."""

    def check(state: CrashState) -> str | None:
        d, i = state.path("l.data"), state.path("l.index")
        done = state.last("done") is not None
        try:
            with open_rw_layer(d, i, readonly=True) as lay:
                got = lay.pread(0, VSIZE)
            if done:
                return "the seal returned, but after the crash the layer is not sealed"
            kind = "unsealed"
        except UsageError:  # sealed: a read-only layer now
            try:
                with open_ro_layer(d) as ro:
                    got = ro.pread(0, VSIZE)
            except CorruptError as e:
                return f"the sealed layer does not open: {e}"
            kind = "sealed"
        except CorruptError as e:
            return f"the layer being sealed does not open: {e}"
        if got != disk:
            return f"the {kind} layer reads wrong bytes at offset {_first_diff(got, disk)}"
        return None

    return check


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sparse", [False, True], ids=["log", "sparse"])
def test_seal_crash(tmp_path: Path, sparse: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """obd commit --seal: at every crash, the unsealed layer or the sealed one, never less."""
    from obd.image import ops

    disk = _written_layer(tmp_path, sparse=sparse)
    d, i = str(tmp_path / "l.data"), str(tmp_path / "l.index")
    sim = run_command(tmp_path, f"seal {'sparse' if sparse else 'log'}", lambda: ops.seal(d, i))
    assert _ro_disk(tmp_path / "l.data") == disk
    report = _explore_and_show(sim, sealed_check(disk), capsys)
    report.assert_clean()


def _image(folder: Path) -> tuple[str, bytes]:
    """config.v1.json: a committed lower under a written upper (relative paths); its disk."""
    from obd.image import ops

    lower_disk = _written_layer(folder, seed=21)
    ops.commit(str(folder / "l.data"), str(folder / "l.index"), str(folder / "lower.lsmt"))
    for name in ("l.data", "l.index"):
        (folder / name).unlink()
    top = _written_layer(folder, seed=22)
    for name in ("l.data", "l.index"):
        (folder / name).rename(folder / ("up." + name.split(".")[1]))
    cfg = {"lowers": [{"file": "lower.lsmt"}], "upper": {"data": "up.data", "index": "up.index"}}
    (folder / "config.v1.json").write_text(json.dumps(cfg))
    from obd.image import open_image

    with open_image(str(folder / "config.v1.json"), readonly=True) as img:
        disk = img.pread(0, VSIZE)
    assert disk != lower_disk and disk != top
    return str(folder / "config.v1.json"), disk


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["zfile", "lsmt", "raw"])
def test_merge_crash(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """obd merge (ZFile, plain LSMT, --raw) of a two-layer image: absent or whole."""
    from obd.image import open_image, ops

    config, disk = _image(tmp_path)
    inputs = _files(tmp_path, "lower.lsmt", "up.data", "up.index", "config.v1.json")
    out = str(tmp_path / "merged")

    def merge() -> None:
        with open_image(config, readonly=True) as img:
            if how == "raw":
                ops.flatten_raw(img, out)
            else:
                ops.merge(img, out, zfile=ops.ZFileOptions() if how == "zfile" else None)

    sim = run_command(tmp_path, f"merge {how}", merge)
    if how == "raw":
        assert (tmp_path / "merged").read_bytes() == disk
    else:
        assert _ro_disk(tmp_path / "merged") == disk
    outputs = _files(tmp_path, "merged")
    report = _explore_and_show(sim, output_check(outputs, inputs=inputs), capsys)
    report.assert_clean()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["compress", "extract", "tar"])
def test_zfile_crash(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    """obd zfile (compress, -t, -x), run in this process: absent or whole."""
    from commands.main import cli

    src = tmp_path / "src.bin"
    src.write_bytes(_pattern(9, 200_000) + bytes(100_000) + _pattern(10, 33_333))
    args = ["zfile", "--threads", "2"]
    if how == "tar":
        args.append("-t")
    cli.main(args=[*args, str(src), str(tmp_path / "src.zfile")], standalone_mode=False)
    if how == "extract":
        args.append("-x")
        source, target = tmp_path / "src.zfile", tmp_path / "out.bin"
    else:
        source, target = src, tmp_path / "out.zfile"
    inputs = _files(tmp_path, *(p.name for p in tmp_path.iterdir()))
    sim = run_command(
        tmp_path,
        f"zfile {how}",
        lambda: cli.main(args=[*args, str(source), str(target)], standalone_mode=False),
    )
    if how == "extract":
        assert target.read_bytes() == src.read_bytes()
    outputs = _files(tmp_path, target.name)
    report = _explore_and_show(sim, output_check(outputs, inputs=inputs), capsys)
    report.assert_clean()


# --- the NBD server ----------------------------------------------------------------------


class RecordingDevice:
    """The served image, telling the recorder what the NBD server asked of it.

    A ``write`` marker goes in before each write, discard and write-zeroes; the model is
    updated when it returned. A discard (NBD TRIM, contents undefined) is modelled by what
    the device reads there right after it (zeros, or the layers below a sparse upper). A flush notes the model as of its start and puts an ``ack``
    marker in when it returned (FLUSH, and the flush of a FUA write). Writes and the
    start of a flush are serialized here so that the two agree.
    """

    def __init__(self, dev: Any, rec: Recorder) -> None:
        self.dev = dev
        self.rec = rec
        self.model = bytearray(dev.pread(0, dev.size()))
        self.initial = bytes(self.model)
        self.lock = threading.Lock()
        self.flushes = 0

    @property
    def readonly(self) -> bool:
        return bool(self.dev.readonly)

    def size(self) -> int:
        return int(self.dev.size())

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.dev.pread(offset, length))

    def extents(self, offset: int = 0, length: int | None = None) -> Any:
        return self.dev.extents(offset, length)

    def _write(self, offset: int, data: bytes | None, length: int, call: Callable[[], None], *, read_back: bool = False) -> None:  # fmt: skip
        with self.lock:
            payload = [offset, data, length]  # a discard's value is known once it returned
            self.rec.mark("write", payload)
            call()
            if read_back:
                payload[1] = data = bytes(self.dev.pread(offset, length))
            self.model[offset : offset + length] = data if data is not None else bytes(length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        buf = bytes(data)
        self._write(offset, buf, len(buf), lambda: self.dev.pwrite(offset, buf))

    def discard(self, offset: int, length: int) -> None:
        self._write(offset, None, length, lambda: self.dev.discard(offset, length), read_back=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._write(offset, None, length, lambda: self.dev.write_zeroes(offset, length))

    def flush(self) -> None:
        with self.lock:
            start = self.rec.mark("flush")
            disk = bytes(self.model)
        self.dev.flush()
        self.rec.mark("ack", (disk, start))
        self.flushes += 1

    def close(self) -> None:
        self.flush()
        self.dev.close()


def _qemu_io_script(rng: random.Random, base: int, span: int, n: int) -> list[str]:
    """qemu-io commands in ``[base, base+span)``: writes, FUA writes, flushes, trims, zeroes."""
    cmds: list[str] = []
    for _ in range(n):
        off = base + rng.randrange(span // 4096 - 16) * 4096
        ln = rng.randrange(1, 16) * 4096
        r = rng.random()
        if r < 0.5:
            fua = "-f " if rng.random() < 0.25 else ""
            cmds.append(f"write -q {fua}-P {rng.randrange(1, 256)} {off} {ln}")
        elif r < 0.65:
            cmds.append("flush")
        elif r < 0.8:
            cmds.append(f"discard -q {off} {ln}")
        else:
            cmds.append(f"write -q -z {off} {ln}")
    return cmds


def _apply_script(disk: bytearray, cmds: list[str], below: bytes | None) -> None:
    """What ``cmds`` leave on ``disk``; a trim shows ``below`` (a sparse upper) or zeros."""
    for c in cmds:
        parts = c.split()
        if parts[0] == "flush":
            continue
        off, ln = int(parts[-2]), int(parts[-1])
        if parts[0] == "discard":
            disk[off : off + ln] = below[off : off + ln] if below is not None else bytes(ln)
        elif "-z" in parts:
            disk[off : off + ln] = bytes(ln)
        else:
            disk[off : off + ln] = bytes([int(parts[parts.index("-P") + 1])]) * ln


def nbd_check(config: str, result: str, initial: bytes) -> Callable[[CrashState], str | None]:
    from obd.image import open_image

    def check(state: CrashState) -> str | None:
        got_result = _read(state.path(result))
        if state.last("result-written") is not None and got_result != b"success":
            return f"resultFile: the server wrote it, but after the crash it is {_describe(got_result, b'success')}"  # fmt: skip
        if got_result not in (None, b"success"):
            return f"resultFile is half-written: {got_result!r}"
        acked, since = acked_and_since(state, initial)
        try:
            img = open_image(state.path(config), readonly=True)
        except CorruptError as e:
            return f"acknowledged writes lost, the image does not open: {e}"
        except ObdError as e:
            return f"the image does not open: {type(e).__name__}: {e}"
        with img:
            got = img.pread(0, img.size())
        bad = sector_problems(got, acked, since)
        if bad:
            return f"after the crash: {bad}"
        with open_image(state.path(config)) as img:  # a server restarting on it
            again = img.pread(0, img.size())
        bad = sector_problems(again, acked, since)
        return f"reopened for writing: {bad}" if bad else None

    return check


@pytest.mark.timeout(300)
@pytest.mark.parametrize("upper", ["log", "sparse"])
def test_nbd_server_crash(tmp_path: Path, upper: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Two qemu-io clients at once write, FUA-write, flush and trim through obd's NBD server.

    Crashed anywhere, every write a FLUSH or FUA acknowledged must survive; the resultFile the server wrote
    must too.
    """
    from obd.image import open_image
    from obd.serve import ImageSpec, NbdService
    from tests.nbd_helpers import require_tools

    require_tools("qemu-io")
    from obd.image import ops

    lower_disk = _written_layer(tmp_path, seed=31)
    ops.commit(str(tmp_path / "l.data"), str(tmp_path / "l.index"), str(tmp_path / "lower.lsmt"))
    for name in ("l.data", "l.index"):
        (tmp_path / name).unlink()
    ops.create(str(tmp_path / "up.data"), str(tmp_path / "up.index"), 0, sparse=upper == "sparse")
    cfg = {
        "lowers": [{"file": "lower.lsmt"}],
        "upper": {"data": "up.data", "index": "up.index"},
        "resultFile": "result",
    }
    config = tmp_path / "config.v1.json"
    config.write_text(json.dumps(cfg))
    half = VSIZE // 2
    scripts = [_qemu_io_script(random.Random(17 + k), k * half, half, 80) for k in range(2)]
    sockdir = tempfile.mkdtemp(prefix="obd-nbd-")  # short: a socket path has 108 bytes at most
    sock = os.path.join(sockdir, "s")
    devices: list[RecordingDevice] = []
    try:
        with recording(tmp_path) as rec:

            def opener(path: str) -> RecordingDevice:
                dev = RecordingDevice(open_image(path), rec)
                devices.append(dev)
                return dev

            service = NbdService(
                [ImageSpec(str(config), "disk")], use_log_files=False, unix=sock, opener=opener
            )
            service.start()
            try:
                rec.mark("result-written")
                # two clients at once, on the two halves of the disk
                procs = []
                for cmds in scripts:
                    args = ["qemu-io", "-f", "raw", f"nbd+unix:///disk?socket={sock}"]
                    for c in cmds:
                        args += ["-c", c]
                    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
                for p in procs:
                    try:
                        out, _ = p.communicate(timeout=120)
                    finally:
                        if p.poll() is None:
                            p.kill()
                            p.wait(10)
                    assert p.returncode == 0 and "error" not in out.lower(), out
            finally:
                failures = service.stop()
            assert not failures
            rec.mark("done")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    (dev,) = devices
    assert dev.flushes >= 3
    # the commands went through: the disk is the lower's under what qemu-io wrote
    with open_image(str(config), readonly=True) as img:
        final = img.pread(0, VSIZE)
    assert final == bytes(dev.model)
    expected = bytearray(lower_disk)
    for cmds in scripts:
        _apply_script(expected, cmds, lower_disk if upper == "sparse" else None)
    assert final == bytes(expected)
    sim = CrashSim(rec, f"NBD server (qemu-io), {upper} upper")
    report = sim.explore(
        nbd_check("config.v1.json", "result", dev.initial), points=200, subsets=12, seed=9
    )
    _show(capsys, report)
    report.assert_clean()


# --- the simulator itself ------------------------------------------------------------------


def _all_states(sim: CrashSim, point: int, n: int = 40) -> Iterator[CrashState]:
    base = Path(tempfile.mkdtemp(prefix="obd-crashsim-"))
    try:
        for subset in range(n):
            folder = base / str(subset)
            folder.mkdir()
            yield sim.build(point, subset, 1, folder)
    finally:
        shutil.rmtree(base)


def test_simulator_model(tmp_path: Path) -> None:
    """What the simulator lets a crash do: fsynced data stays; the rest is lost, kept or torn."""
    from obd.io.file import AtomicOutput, open_file

    (tmp_path / "f").write_bytes(b"A" * 4096)
    with recording(tmp_path) as rec:
        with open_file(tmp_path / "f", writable=True) as f:
            f.pwrite(0, b"B" * 2048)
            f.flush()
            f.pwrite(0, b"C" * 4096)  # not synced: any sector may be C or as before
        with AtomicOutput(tmp_path / "out") as out:
            out.pwrite(0, b"D" * 1024)
    sim = CrashSim(rec, "model")
    kinds = [op.kind for op in rec.ops]
    assert kinds == ["write", "fsync", "write", "create", "write", "fsync", "link", "unlink", "fsync_dir"]  # fmt: skip
    seen_f: set[bytes] = set()
    seen_out: set[bytes | None] = set()
    for state in _all_states(sim, kinds.index("create")):
        got = Path(state.path("f")).read_bytes()
        assert len(got) == 4096
        for k in range(8):
            sector = got[k * 512 : (k + 1) * 512]
            assert sector in (b"C" * 512, (b"B" if k < 4 else b"A") * 512), (k, state.desc)
        seen_f.add(got)
    assert b"C" * 4096 in seen_f and b"B" * 2048 + b"A" * 2048 in seen_f
    assert any(s not in (b"C" * 4096, b"B" * 2048 + b"A" * 2048) for s in seen_f), "never torn"
    # before the folder fsync the output may be missing, never half there (its data was synced)
    for state in _all_states(sim, kinds.index("fsync_dir")):
        seen_out.add(_read(state.path("out")))
    assert seen_out == {None, b"D" * 1024}
    for state in _all_states(sim, len(kinds)):
        assert _read(state.path("out")) == b"D" * 1024
        assert Path(state.path("f")).read_bytes()[:2048] != b"A" * 2048


def test_simulator_renames_before_data(tmp_path: Path) -> None:
    """A rename may reach the disk before the data of the renamed file (why outputs fsync)."""
    from obd.io.file import _fsync_dir, _replace, open_file

    (tmp_path / "a").write_bytes(b"old")
    with recording(tmp_path) as rec:
        with open_file(tmp_path / "a", writable=True) as f:
            f.pwrite(0, b"new!")
        _replace(str(tmp_path / "a"), str(tmp_path / "b"))
        _fsync_dir(str(tmp_path))
    sim = CrashSim(rec, "rename")
    seen = {(_read(s.path("a")), _read(s.path("b"))) for s in _all_states(sim, len(rec.ops))}
    assert (None, b"old") in seen and (None, b"new!") in seen
    assert all(a is None for a, _ in seen)


def test_simulator_sees_created_files(tmp_path: Path) -> None:
    from obd.io.file import _fsync_dir, open_file

    with recording(tmp_path) as rec:
        with open_file(tmp_path / "new", writable=True, create=True) as f:
            f.pwrite(0, b"x" * 600)
            f.flush()
        _fsync_dir(str(tmp_path))
    assert not rec.problems
    assert [op.kind for op in rec.ops] == ["create", "write", "fsync", "fsync_dir"]
    sim = CrashSim(rec, "created")
    assert {_read(s.path("new")) for s in _all_states(sim, 3)} == {None, b"x" * 600}
    assert {_read(s.path("new")) for s in _all_states(sim, 4)} == {b"x" * 600}
    # a file the recorder never saw created is a recording problem, not a silent gap
    (tmp_path / "other").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    with recording(tmp_path / "sub") as rec, open_file(tmp_path / "other", writable=True) as f:
        f.pwrite(0, b"y")
    assert rec.problems
    with pytest.raises(AssertionError, match="recording problems"):
        CrashSim(rec)


# --- every durable change goes through obd.io; fsync failures are errors -----------------

RAW_DURABLE = re.compile(
    r"\bos\.(pwrite|pwritev|write|fsync|fdatasync|replace|rename|renames|link|symlink|unlink"
    r"|remove|copy_file_range|ftruncate|truncate|sendfile|posix_fallocate|mkdir|rmdir)\("
    r"|\bshutil\.(move|copy\w*|rmtree)\(|\bmkstemp\(|\bNamedTemporaryFile\("
    r"|\bopen\([^)]*,\s*(mode=)?[\"'][rbt+]*[wax][rbt+]*[\"']"
)
# (file, call) -> why it may bypass obd.io
RAW_ALLOWED = {
    ("obd/serve/nbd/server.py", "os.unlink("): "removes the server's own Unix socket, not data",
    (
        "obd/serve/nbd/wire.py",
        "os.sendfile(",
    ): "sends layer bytes to a client's socket; writes no file",
    # configfs and /dev/uioN are the kernel's control interfaces, not stored data
    ("obd/serve/tcmu/configfs.py", "os.write("): "writes a configfs attribute",
    ("obd/serve/tcmu/configfs.py", "os.rmdir("): "removes a configfs object",
    ("obd/serve/tcmu/configfs.py", "os.symlink("): "links a LUN to its device in configfs",
    ("obd/serve/tcmu/configfs.py", "os.unlink("): "removes a configfs link",
    ("obd/serve/tcmu/uio.py", "os.write("): "kicks the kernel (4 bytes to /dev/uioN)",
    ("obd/formats/zfile/reader.py", "os.posix_fallocate("): (
        "reserves blocks of a temporary output that is fsynced before its rename; "
        "a crash cannot show it"
    ),
}


def test_durable_changes_go_through_obd_io() -> None:
    """No module of obd writes, syncs or renames a file behind the tracer's back."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted((root / "obd").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ("obd/io/file.py", "obd/io/trace.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in RAW_DURABLE.finditer(code):
                call = m.group(0)
                if (rel, call) not in RAW_ALLOWED:
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "durable-state changes outside obd.io (route them through obd/io/file.py):\n" + "\n".join(found)  # fmt: skip


def test_failed_folder_fsync_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output whose folder fsync fails (EIO) is not reported as safely written."""
    import errno
    import stat

    from obd.errors import FileAccessError
    from obd.io.file import AtomicOutput

    real = os.fsync
    fail = errno.EIO

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(fail, os.strerror(fail))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileAccessError, match="fsync of the folder failed"), AtomicOutput(tmp_path / "o") as out:  # fmt: skip
        out.pwrite(0, b"x")
    fail = errno.EINVAL  # a filesystem that cannot sync a folder: nothing to be done
    with AtomicOutput(tmp_path / "p") as out:
        out.pwrite(0, b"y")
    assert (tmp_path / "p").read_bytes() == b"y"
