"""Model-based tests: every layer operation against a plain ``bytearray``.

A random sequence of writes, discards, write-zeroes, reopens, commits (plain and
ZFile), seals, stacking and merges must always read back equal to the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from obd.image import open_image, ops
from obd.image.layers import open_ro_layer, open_rw_layer

VSIZE = 1 << 21  # 2 MiB
SECTORS = VSIZE // 512

sectors = st.integers(0, SECTORS - 1)
counts = st.integers(1, 600)


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _zfile_available() -> bool:
    try:
        import obd.formats.zfile  # noqa: F401
    except ImportError:
        return False
    return True


class StackMachine(RuleBasedStateMachine):
    """A log-structured upper over a growing list of read-only lowers."""

    @initialize()
    def setup(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="obd-model-")
        self.model = bytearray(VSIZE)
        self.lowers: list[str] = []
        self.n = 0
        self.upper = self._new_upper()
        self.stack = self._open()

    def _path(self, name: str) -> str:
        self.n += 1
        return os.path.join(self.dir, f"{self.n}-{name}")

    def _new_upper(self, size: int = VSIZE) -> tuple[str, str]:
        d, i = self._path("u.data"), self._path("u.index")
        ops.create(d, i, size)
        return d, i

    def _config(self) -> str:
        cfg = {
            "lowers": [{"file": p} for p in self.lowers],
            "upper": {"data": self.upper[0], "index": self.upper[1]},
        }
        path = os.path.join(self.dir, "config.v1.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def _open(self):
        return open_image(self._config())

    def teardown(self) -> None:
        try:
            self.stack.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _clip(self, s: int, n: int) -> tuple[int, int]:
        return s * 512, min(n, SECTORS - s) * 512

    @rule(s=sectors, n=counts, seed=st.integers(0, 1 << 30))
    def write(self, s: int, n: int, seed: int) -> None:
        off, ln = self._clip(s, n)
        data = _pattern(seed, ln)
        self.stack.pwrite(off, data)
        self.model[off : off + ln] = data

    @rule(s=sectors, n=counts)
    def discard(self, s: int, n: int) -> None:
        off, ln = self._clip(s, n)
        self.stack.discard(off, ln)
        self.model[off : off + ln] = bytes(ln)

    @rule(s=sectors, n=counts)
    def write_zeroes(self, s: int, n: int) -> None:
        off, ln = self._clip(s, n)
        self.stack.write_zeroes(off, ln)
        self.model[off : off + ln] = bytes(ln)

    @rule()
    def reopen(self) -> None:
        self.stack.flush()
        self.stack.close()
        self.stack = self._open()

    @rule(index_junk=st.integers(0, 15), data_junk=st.integers(0, 511))
    def torn_tails_then_reopen(self, index_junk: int, data_junk: int) -> None:
        """A crash left a partial index record and a partial data sector; writes go on."""
        self.stack.flush()
        self.stack.close()
        with open(self.upper[1], "ab") as f:
            f.write(b"\x5a" * index_junk)
        with open(self.upper[0], "ab") as f:
            f.write(b"\xa5" * data_junk)
        self.stack = self._open()

    @rule(s=sectors, n=counts, seed=st.integers(0, 1 << 30))
    def write_lost_in_a_crash(self, s: int, n: int, seed: int) -> None:
        """An unflushed write whose index record reached the disk but whose data did not."""
        self.stack.flush()
        data_size = os.path.getsize(self.upper[0])
        off, ln = self._clip(s, n)
        self.stack.pwrite(off, _pattern(seed, ln))
        self.stack.close()
        os.truncate(self.upper[0], data_size)
        self.stack = self._open()  # the model is unchanged: the write was never acknowledged

    @rule()
    def read_only_view(self) -> None:
        """The same image opened read-only beside the writer reads the flushed disk."""
        self.stack.flush()
        with open_image(self._config(), readonly=True) as ro:
            assert ro.readonly
            assert ro.pread(0, VSIZE) == bytes(self.model)

    @rule(compress=st.sampled_from(["plain", "lz4", "zstd"]), seal=st.booleans())
    def commit(self, compress: str, seal: bool) -> None:
        """Commit (or seal) the upper into a new lower; start a new upper on top."""
        self.stack.flush()
        self.stack.close()
        out = self._path("layer")
        if seal:
            ops.seal(*self.upper)
            out = self.upper[0]
        else:
            z = None
            if compress != "plain" and _zfile_available():
                z = ops.ZFileOptions(algorithm=compress, block_size=4096 << (self.n % 5))
            ops.commit(self.upper[0], self.upper[1], out, zfile=z)
        self.lowers.append(out)
        # half the time a size-0 upper, which takes the lowers' size when stacked
        self.upper = self._new_upper(0 if self.n % 2 else VSIZE)
        if self.n % 3 == 0:
            self.read_only_view_before_write()
        self.stack = self._open()

    def read_only_view_before_write(self) -> None:
        """A fresh (maybe size-0) upper opened read-only first: nothing is written."""
        path = self._config()
        before = [Path(p).read_bytes() for p in self.upper]
        with open_image(path, readonly=True) as ro:
            assert ro.pread(0, VSIZE) == bytes(self.model)
        assert [Path(p).read_bytes() for p in self.upper] == before

    @precondition(lambda self: len(self.lowers) >= 2)
    @rule(compress=st.booleans())
    def merge(self, compress: bool) -> None:
        """Flatten every lower into one layer; the upper stays on top."""
        self.stack.close()
        layers = [open_ro_layer(p) for p in self.lowers]
        from obd.image.stack import Stack

        out = self._path("merged")
        z = ops.ZFileOptions() if compress and _zfile_available() else None
        with Stack(layers, None, readonly=True) as s:
            ops.merge(s, out, zfile=z)
        self.lowers = [out]
        self.stack = self._open()

    @rule(s=sectors, n=st.integers(1, 5000), skew=st.integers(0, 511))
    def read_any_range(self, s: int, n: int, skew: int) -> None:
        off = min(s * 512 + skew, VSIZE - 1)
        ln = min(n, VSIZE - off)
        assert self.stack.pread(off, ln) == bytes(self.model[off : off + ln])

    @invariant()
    def whole_disk_matches(self) -> None:
        if hasattr(self, "stack"):
            assert self.stack.pread(0, VSIZE) == bytes(self.model)

    @invariant()
    def extents_match(self) -> None:
        if not hasattr(self, "stack"):
            return
        pos = 0
        for e in self.stack.extents():
            assert e.offset == pos
            if e.reads_zero():
                assert not any(self.model[e.offset : e.end])
            pos = e.end
        assert pos == VSIZE


class SparseMachine(RuleBasedStateMachine):
    """A sparse writable layer on its own: writes, discards, reopen, commit, flatten."""

    @initialize()
    def setup(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="obd-sparse-")
        self.model = bytearray(VSIZE)
        self.d = os.path.join(self.dir, "s.data")
        self.i = os.path.join(self.dir, "s.index")
        ops.create(self.d, self.i, VSIZE, sparse=True)
        self.layer = open_rw_layer(self.d, self.i)

    def teardown(self) -> None:
        self.layer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(s=sectors, n=counts, seed=st.integers(0, 1 << 30))
    def write(self, s: int, n: int, seed: int) -> None:
        ln = min(n, SECTORS - s) * 512
        data = _pattern(seed, ln)
        self.layer.pwrite(s * 512, data)
        self.model[s * 512 : s * 512 + ln] = data

    @rule(s=sectors, n=counts)
    def discard(self, s: int, n: int) -> None:
        ln = min(n, SECTORS - s) * 512
        self.layer.discard(s * 512, ln)
        self.model[s * 512 : s * 512 + ln] = bytes(ln)

    @rule()
    def reopen(self) -> None:
        self.layer.flush()
        self.layer.close()
        self.layer = open_rw_layer(self.d, self.i)

    @rule()
    def commit_reads_back(self) -> None:
        self.layer.flush()
        out = os.path.join(self.dir, "c.lsmt")
        ops.commit(self.d, self.i, out, force=True)
        with open_ro_layer(out) as ro:
            assert ro.pread(0, VSIZE) == bytes(self.model)

    @invariant()
    def matches(self) -> None:
        if hasattr(self, "layer"):
            assert self.layer.pread(0, VSIZE) == bytes(self.model)


_settings = settings(
    max_examples=int(os.environ.get("OBD_MODEL_EXAMPLES", "50")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStackModel = StackMachine.TestCase
TestStackModel.settings = _settings
TestSparseModel = SparseMachine.TestCase
TestSparseModel.settings = _settings
