"""Crash-consistency simulation: record what obd does to its files, replay it at crashes.

The method of ALICE (Pillai et al., OSDI'14) and LazyFS: run an operation once for
real while a :class:`Recorder` (installed as :data:`obd.io.trace.tracer`) logs every
durable-state change obd makes through its I/O layer (writes, truncates, hole punches,
in-kernel copies, fsyncs of files and folders, creates, renames, links, unlinks), then
build, for many crash points and many choices of what had reached the disk, the files a
power cut at that point could leave, in a fresh folder, and let a check reopen them with
obd. Tests put markers in the log (``rec.mark("ack", ...)``) to say what had been
acknowledged at each point.

What survives a crash (the model; Linux ext4-like, weaker wherever ext4 promises nothing):

- The regular files under the root when recording starts are durable (the initial state).
- **File data.** A write, truncate, hole punch or copy into a file becomes durable when an
  fsync of that file, started after the operation returned, returns. Until then each
  512-byte sector of the file holds, after a crash, its content as of *some* moment since
  it was last durable: the newest write, an older one, or what it held before. So a
  non-durable write may be lost, may persist only some of its sectors (torn at 512-byte
  granularity), and writes to different sectors reach the disk in any order. Allocation
  follows the chosen content (a lost write over a hole leaves a hole; a punched range is
  a hole). The file size is the size some included operation gave it: a write that
  extends the file may leave the new size with some of its sectors unwritten (zeros),
  the case ext4 in writeback mode and XFS show, or, torn, a size that ends at its last
  persisted sector (the on-disk size follows writeback). Sectors are atomic: a write is
  never torn inside a 512-byte sector.
- **Names.** A create, rename, link or unlink in a folder becomes durable when an fsync of
  that folder (started after it returned) returns. Until then a crash keeps a *prefix*
  (in program order) of the folder's pending name operations: a journal commits them in
  order, and each is atomic (a rename leaves the old name or the new one, never neither).
- Data and names are independent: a rename may reach the disk before the data of the
  renamed file (no ``auto_da_alloc`` rescue), which is why an output must be fsynced
  before it is renamed, and its folder fsynced before the command says it is done.
- The page cache does not survive: a crash is a power cut, not a killed process (a
  ``kill -9`` test cannot see a missing fsync; this can).

:meth:`CrashSim.explore` picks crash points (around every fsync, name operation and
marker, plus seeded random ones) and, per point, seeded subsets of the operations that
were not yet durable: all of them, none, the names without the data, random subsets
with random tearing, prefixes. Identical states are checked once. ``OBD_CRASH_EXAMPLES``
scales the counts for long runs.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import shutil
import stat
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from obd.io import trace
from obd.io.file import data_extents

SECTOR = 512
DATA_OPS = frozenset({"write", "truncate", "punch"})
NAME_OPS = frozenset({"create", "rename", "link", "unlink"})


def scale() -> float:
    """How much more than the default to explore (``OBD_CRASH_EXAMPLES``, default 1)."""
    try:
        return max(0.01, float(os.environ.get("OBD_CRASH_EXAMPLES", "1")))
    except ValueError:
        return 1.0


@dataclass
class Op:
    """One recorded operation. ``file`` is a file id (an inode, as the recorder saw it)."""

    kind: str
    file: int = -1
    path: str = ""
    path2: str = ""
    offset: int = 0
    length: int = 0
    data: bytes = b""
    covers: int = 0  # fsync/fsync_dir: makes durable the operations recorded before this
    label: str = ""
    payload: Any = None

    def brief(self) -> str:
        fmt = _BRIEF.get(self.kind, "mark({label})")
        return fmt.format(
            kind=self.kind, file=self.file, offset=self.offset, size=len(self.data),
            length=self.length, path=self.path, dir=self.path or ".", path2=self.path2,
            label=self.label,
        )  # fmt: skip


# How Op.brief shows each kind of operation (anything else is a mark).
_BRIEF = {
    "write": "write(f{file}, {offset}+{size})",
    "truncate": "truncate(f{file}, {length})",
    "punch": "punch(f{file}, {offset}+{length})",
    "fsync": "fsync(f{file})",
    "fsync_dir": "fsync_dir({dir})",
    "create": "create({path} -> f{file})",
    "rename": "{kind}({path}, {path2})",
    "link": "{kind}({path}, {path2})",
    "unlink": "unlink({path})",
}


class FileState:
    """A file's bytes, which sectors are allocated, and its size."""

    __slots__ = ("alloc", "content", "size")

    def __init__(self, content: bytearray, alloc: bytearray, size: int) -> None:
        self.content = content
        self.alloc = alloc
        self.size = size

    @classmethod
    def empty(cls) -> FileState:
        return cls(bytearray(), bytearray(), 0)

    @classmethod
    def read(cls, path: str) -> FileState:
        with open(path, "rb") as f:
            content = bytearray(f.read())
        size = len(content)
        nsec = -(-size // SECTOR)
        alloc = bytearray(nsec)
        fd = os.open(path, os.O_RDONLY)
        try:
            for a, b in data_extents(fd, 0, size):
                alloc[a // SECTOR : -(-b // SECTOR)] = b"\1" * (-(-b // SECTOR) - a // SECTOR)
        finally:
            os.close(fd)
        content += bytes(nsec * SECTOR - size)
        return cls(content, alloc, size)

    def copy(self) -> FileState:
        return FileState(bytearray(self.content), bytearray(self.alloc), self.size)

    def _room(self, nsec: int) -> None:
        if len(self.alloc) < nsec:
            self.content += bytes(nsec * SECTOR - len(self.content))
            self.alloc += bytes(nsec - len(self.alloc))

    def put(self, s: int, n: int, data: bytes | None) -> None:
        """Sectors ``[s, s+n)`` become ``data`` (allocated) or a hole (``None``)."""
        self._room(s + n)
        if data is None:
            self.content[s * SECTOR : (s + n) * SECTOR] = bytes(n * SECTOR)
            self.alloc[s : s + n] = bytes(n)
        else:
            self.content[s * SECTOR : (s + n) * SECTOR] = data
            self.alloc[s : s + n] = b"\1" * n

    def write_to(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            nsec = -(-self.size // SECTOR)
            alloc = np.frombuffer(bytes(self.alloc[:nsec]), dtype=np.uint8)
            if alloc.size:
                edges = np.flatnonzero(np.diff(np.concatenate(([0], alloc, [0])).astype(np.int8)))
                view = memoryview(self.content)
                for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                    end = min(b * SECTOR, self.size)
                    os.pwrite(fd, view[a * SECTOR : end], a * SECTOR)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)


@dataclass
class Effect:
    """What one data operation does to its file, as sector versions.

    ``runs`` are ``(first_sector, count, bytes or None for a hole)``: the content each
    sector had right after the operation (whole sectors, so a partial-sector write carries
    the bytes earlier writes left there, as the page cache did). ``grow`` / ``set_size``
    give its effect on the file size.
    """

    file: int
    runs: list[tuple[int, int, bytes | None]]
    grow: int = -1
    set_size: int = -1
    tearable: bool = True


class Recorder:
    """A :class:`obd.io.trace.Tracer` logging every change to files under ``root``.

    Files are told apart by inode: a file renamed keeps its id; a new file gets a new id.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self._ids: dict[tuple[int, int], int] = {}
        self._next = 0
        self.initial: dict[int, FileState] = {}
        self.names: dict[str, int] = {}
        self.problems: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode):
                    continue
                key = (st.st_dev, st.st_ino)
                fid = self._ids.get(key)
                if fid is None:
                    fid = self._new_id(key)
                    self.initial[fid] = FileState.read(p)
                self.names[self._rel(p)] = fid

    def _new_id(self, key: tuple[int, int]) -> int:
        fid = self._next
        self._next += 1
        self._ids[key] = fid
        return fid

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        if rel == ".":
            return ""
        if rel.startswith(".." + os.sep) or rel == "..":
            self.problems.append(f"{path}: outside the recorded folder {self.root}")
        return rel

    def _fid(self, fd: int) -> int:
        st = os.fstat(fd)
        fid = self._ids.get((st.st_dev, st.st_ino))
        if fid is None:
            self.problems.append(f"fd {fd} (inode {st.st_ino}): a file the recorder does not know")
            return -1
        return fid

    def _add(self, op: Op) -> int:
        with self.lock:
            self.ops.append(op)
            return len(self.ops) - 1

    # -- the Tracer protocol -------------------------------------------------------------
    def created(self, path: str, fd: int) -> None:
        st = os.fstat(fd)
        with self.lock:
            fid = self._new_id((st.st_dev, st.st_ino))
            self.ops.append(Op("create", fid, path=self._rel(path)))

    def pwrite(self, fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._add(Op("write", self._fid(fd), offset=offset, data=bytes(data)))

    def truncate(self, fd: int, size: int) -> None:
        self._add(Op("truncate", self._fid(fd), length=size))

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        self._add(Op("punch", self._fid(fd), offset=offset, length=length))

    def sync_begin(self) -> int:
        with self.lock:
            return len(self.ops)

    def fsync(self, fd: int, mark: int) -> None:
        self._add(Op("fsync", self._fid(fd), covers=mark))

    def fsync_dir(self, path: str, mark: int) -> None:
        self._add(Op("fsync_dir", path=self._rel(path), covers=mark))

    def rename(self, src: str, dst: str) -> None:
        self._add(Op("rename", path=self._rel(src), path2=self._rel(dst)))

    def link(self, src: str, dst: str) -> None:
        self._add(Op("link", path=self._rel(src), path2=self._rel(dst)))

    def unlink(self, path: str) -> None:
        self._add(Op("unlink", path=self._rel(path)))

    # -- for tests -----------------------------------------------------------------------
    def mark(self, label: str, payload: Any = None) -> int:
        """Note in the log that ``label`` happened here (e.g. a flush was acknowledged)."""
        return self._add(Op("mark", label=label, payload=payload))


@contextlib.contextmanager
def recording(root: str | os.PathLike[str]) -> Iterator[Recorder]:
    """Record what obd does to the files under ``root`` during the ``with`` block."""
    rec = Recorder(root)
    with trace.tracing(rec):
        yield rec


@dataclass
class CrashState:
    """A simulated crash: the rebuilt files in ``dir``, and what the log said before it."""

    dir: Path
    point: int
    desc: str
    markers: list[tuple[int, Op]]

    def path(self, rel: str) -> str:
        return str(self.dir / rel)

    def last(self, label: str) -> tuple[int, Op] | None:
        for i, op in reversed(self.markers):
            if op.label == label:
                return i, op
        return None


Check = Callable[[CrashState], "str | None"]


@dataclass
class Violation:
    point: int
    subset: int
    desc: str
    message: str
    context: str


@dataclass
class Report:
    name: str
    ops: int
    points: int = 0
    states: int = 0
    duplicates: int = 0
    violations: list[Violation] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"crash[{self.name}]: {self.ops} ops recorded, {self.points} crash points, "
            f"{self.states} crash states checked ({self.duplicates} duplicates skipped), "
            f"{len(self.violations)} violations"
        )

    def details(self, limit: int = 5) -> str:
        lines = [self.summary()]
        for v in self.violations[:limit]:
            lines.append(
                f"  at op {v.point} (subset {v.subset}: {v.desc}): {v.message}\n"
                f"    ops before the crash: {v.context}"
            )
        return "\n".join(lines)

    def assert_clean(self) -> None:
        assert not self.violations, self.details()


def _tear_keep(rng: random.Random, first: int, end: int) -> Callable[[int], bool]:
    """Which sectors of ``[first, end)`` a torn write persisted."""
    how = rng.randrange(3)
    if how == 0:
        cut = rng.randrange(first, end + 1)
        return lambda s: s < cut
    if how == 1:
        cut = rng.randrange(first, end + 1)
        return lambda s: s >= cut
    salt = rng.getrandbits(32)
    return lambda s: ((s * 2654435761) ^ salt) & 0x10000 != 0


class CrashSim:
    """The crash states a recorded run can leave (see the module docstring)."""

    def __init__(self, rec: Recorder, name: str = "") -> None:
        if rec.problems:
            raise AssertionError("recording problems: " + "; ".join(rec.problems[:5]))
        self.rec = rec
        self.name = name
        self.ops = list(rec.ops)
        n = len(self.ops)
        self.effects: dict[int, Effect] = {}
        self.file_ops: dict[int, list[int]] = {}
        self.file_syncs: dict[int, tuple[list[int], list[int]]] = {}
        self.name_ops: list[int] = []
        self.dir_names: dict[str, list[int]] = {}
        self.dir_syncs: dict[str, tuple[list[int], list[int]]] = {}
        live: dict[int, FileState] = {f: s.copy() for f, s in rec.initial.items()}
        for i, op in enumerate(self.ops):
            if op.kind in DATA_OPS:
                st = live.setdefault(op.file, FileState.empty())
                self.effects[i] = self._effect(op, st)
                self.file_ops.setdefault(op.file, []).append(i)
            elif op.kind == "fsync":
                idx, cov = self.file_syncs.setdefault(op.file, ([], []))
                idx.append(i)
                cov.append(max(op.covers, cov[-1] if cov else 0))
            elif op.kind == "fsync_dir":
                idx, cov = self.dir_syncs.setdefault(op.path, ([], []))
                idx.append(i)
                cov.append(max(op.covers, cov[-1] if cov else 0))
            elif op.kind in NAME_OPS:
                self.name_ops.append(i)
                self.dir_names.setdefault(self._dir_of(op), []).append(i)
        self.n = n
        self._dcache: dict[int, tuple[int, FileState]] = {}

    @staticmethod
    def _dir_of(op: Op) -> str:
        return os.path.dirname(op.path2 or op.path)

    @staticmethod
    def _effect(op: Op, st: FileState) -> Effect:
        """Apply ``op`` to the live state ``st`` and return its sector versions."""
        if op.kind == "write":
            off, data = op.offset, op.data
            end = off + len(data)
            if not data:
                return Effect(op.file, [])
            s0, s1 = off // SECTOR, -(-end // SECTOR)
            st._room(s1)
            st.content[off:end] = data
            st.alloc[s0:s1] = b"\1" * (s1 - s0)
            st.size = max(st.size, end)
            return Effect(
                op.file, [(s0, s1 - s0, bytes(st.content[s0 * SECTOR : s1 * SECTOR]))], grow=end
            )
        if op.kind == "truncate":
            new = op.length
            runs: list[tuple[int, int, bytes | None]] = []
            if new < st.size:
                old_nsec = -(-st.size // SECTOR)
                st.content[new : old_nsec * SECTOR] = bytes(old_nsec * SECTOR - new)
                first_hole = -(-new // SECTOR)
                if new % SECTOR:
                    s = new // SECTOR
                    runs.append((s, 1, bytes(st.content[s * SECTOR : (s + 1) * SECTOR])))
                if old_nsec > first_hole:
                    st.alloc[first_hole:old_nsec] = bytes(old_nsec - first_hole)
                    runs.append((first_hole, old_nsec - first_hole, None))
            st.size = new
            return Effect(op.file, runs, set_size=new, tearable=False)
        # punch: zeros in place, whole sectors become holes, the size stays
        off, end = op.offset, min(op.offset + op.length, -(-st.size // SECTOR) * SECTOR)
        runs = []
        if end <= off:
            return Effect(op.file, runs)
        st._room(-(-end // SECTOR))
        st.content[off:end] = bytes(end - off)
        s, last = off // SECTOR, (end - 1) // SECTOR
        while s <= last:
            if off <= s * SECTOR and (s + 1) * SECTOR <= end:
                t = s
                while t <= last and (t + 1) * SECTOR <= end:
                    t += 1
                st.alloc[s:t] = bytes(t - s)
                runs.append((s, t - s, None))
                s = t
            else:
                runs.append((s, 1, bytes(st.content[s * SECTOR : (s + 1) * SECTOR])))
                s += 1
        return Effect(op.file, runs)

    # -- building one crash state ----------------------------------------------------------
    @staticmethod
    def _covered(syncs: tuple[list[int], list[int]] | None, point: int) -> int:
        """Operations before the returned index are durable (syncs finished before ``point``)."""
        if syncs is None:
            return 0
        idx, cov = syncs
        k = bisect.bisect_left(idx, point)
        return cov[k - 1] if k else 0

    def _apply(
        self, st: FileState, i: int, keep: Callable[[int], bool] | None, cut_size: bool = False
    ) -> None:
        """Apply data operation ``i``: only the sectors ``keep`` says when it is torn.

        ``cut_size``: the size a torn write gave the file stops at its last kept sector
        (otherwise the whole new size persisted, with zeros where sectors did not).
        """
        eff = self.effects[i]
        last = -1
        for s, n, data in eff.runs:
            if keep is None:
                st.put(s, n, data)
                continue
            k = 0
            while k < n:
                if not keep(s + k):
                    k += 1
                    continue
                j = k
                while j < n and keep(s + j):
                    j += 1
                st.put(s + k, j - k, None if data is None else data[k * SECTOR : j * SECTOR])
                last = s + j
                k = j
        grow = eff.grow
        if keep is not None and cut_size:
            grow = min(grow, last * SECTOR)
        if eff.set_size >= 0:
            st.size = eff.set_size
        elif grow > st.size:
            st.size = grow

    def _durable(self, f: int, upto: int) -> FileState:
        """File ``f`` with every data operation before ``upto`` applied (cached, in order)."""
        cached = self._dcache.get(f)
        if cached is None or cached[0] > upto:
            base = self.rec.initial.get(f)
            cached = (0, base.copy() if base is not None else FileState.empty())
        done, st = cached
        ops = self.file_ops.get(f, [])
        a = bisect.bisect_left(ops, done)
        b = bisect.bisect_left(ops, upto)
        for i in ops[a:b]:
            self._apply(st, i, None)
        self._dcache[f] = (upto, st)
        return st

    def _choose(
        self, point: int, subset: int, rng: random.Random
    ) -> tuple[str, dict[int, Any], dict[str, int]]:
        """Which pending data operations persist (and how torn), how many name ops per folder."""
        pending: list[int] = []
        for f, ops in self.file_ops.items():
            d = self._covered(self.file_syncs.get(f), point)
            a = bisect.bisect_left(ops, d)
            b = bisect.bisect_left(ops, point)
            pending += ops[a:b]
        pending.sort()
        names_pending: dict[str, int] = {}
        for folder, ops in self.dir_names.items():
            dur = self._covered(self.dir_syncs.get(folder), point)
            names_pending[folder] = bisect.bisect_left(ops, point) - bisect.bisect_left(ops, dur)
        chosen: dict[int, Any] = {}
        mode = ["all", "names-not-data", "data-not-names", "none"][subset] if subset < 4 else ""
        if mode in ("all", "names-not-data"):
            names = dict(names_pending)
        elif mode in ("data-not-names", "none"):
            names = dict.fromkeys(names_pending, 0)
        else:
            names = {d: self._pick_count(n, rng) for d, n in names_pending.items()}
        if mode in ("all", "data-not-names"):
            chosen = dict.fromkeys(pending)
        elif mode in ("none", "names-not-data"):
            chosen = {}
        elif rng.random() < 0.25:
            mode = "prefix"
            cut = rng.randrange(len(pending) + 1)
            chosen = dict.fromkeys(pending[:cut])
        else:
            p = rng.choice((0.2, 0.5, 0.8))
            mode = f"random p={p}"
            for i in pending:
                if rng.random() < p:
                    eff = self.effects[i]
                    tear = None
                    if eff.tearable and eff.runs and rng.random() < 0.35:
                        first = eff.runs[0][0]
                        end = max(s + n for s, n, _ in eff.runs)
                        tear = (rng.getrandbits(32), first, end, rng.random() < 0.5)
                    chosen[i] = tear
        torn = sum(1 for t in chosen.values() if t is not None)
        desc = f"{mode}: {len(chosen)}/{len(pending)} pending data ops kept ({torn} torn), names kept {names}/{names_pending}"
        return desc, chosen, names

    @staticmethod
    def _pick_count(n: int, rng: random.Random) -> int:
        r = rng.random()
        if r < 0.3:
            return n
        if r < 0.5:
            return 0
        return rng.randrange(n + 1)

    def _names_at(self, point: int, keep: dict[str, int]) -> dict[str, int]:
        names = dict(self.rec.names)
        allowed: dict[str, int] = {}
        for d, ops in self.dir_names.items():
            dur = self._covered(self.dir_syncs.get(d), point)
            a = bisect.bisect_left(ops, dur)
            # durable ones, then the first keep[d] pending ones
            upto = a + keep.get(d, 0)
            allowed[d] = ops[upto - 1] + 1 if upto > 0 else 0
        for i in self.name_ops:
            if i >= point:
                break
            op = self.ops[i]
            if i >= allowed.get(self._dir_of(op), 0):
                continue
            if op.kind == "create":
                names[op.path] = op.file
            elif op.kind == "rename":
                fid = names.pop(op.path, None)
                if fid is not None:
                    names[op.path2] = fid
            elif op.kind == "link":
                if op.path in names:
                    names[op.path2] = names[op.path]
            elif op.kind == "unlink":
                names.pop(op.path, None)
        return names

    def build(self, point: int, subset: int, seed: int, folder: Path) -> CrashState:
        """Rebuild, in the empty ``folder``, the files crash ``(point, subset, seed)`` leaves."""
        rng = random.Random(f"{seed}:{point}:{subset}")
        desc, chosen, keep_names = self._choose(point, subset, rng)
        return self._build(point, desc, chosen, keep_names, folder)

    def _build(
        self,
        point: int,
        desc: str,
        chosen: dict[int, Any],
        keep_names: dict[str, int],
        folder: Path,
    ) -> CrashState:
        names = self._names_at(point, keep_names)
        states: dict[int, FileState] = {}
        for fid in set(names.values()):
            d = self._covered(self.file_syncs.get(fid), point)
            st = self._durable(fid, d).copy()
            for i in self.file_ops.get(fid, []):
                if i < d or i >= point or i not in chosen:
                    continue
                tear = chosen[i]
                if tear is None:
                    self._apply(st, i, None)
                else:
                    keep = _tear_keep(random.Random(tear[0]), tear[1], tear[2])
                    self._apply(st, i, keep, cut_size=tear[3])
            states[fid] = st
        for rel, fid in names.items():
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            states[fid].write_to(str(p))
        markers = [(i, op) for i, op in enumerate(self.ops[:point]) if op.kind == "mark"]
        return CrashState(folder, point, desc, markers)

    def context(self, point: int, n: int = 6) -> str:
        ops = self.ops[max(0, point - n) : point]
        return ", ".join(op.brief() for op in ops) or "(none)"

    # -- exploring -------------------------------------------------------------------------
    def points(self, budget: int, rng: random.Random) -> list[int]:
        """Crash points: around every fsync, name operation and marker, the end, random ones."""
        key: set[int] = {0, self.n}
        for i, op in enumerate(self.ops):
            if op.kind not in DATA_OPS:
                key.add(i)
                key.add(i + 1)
        pts = sorted(key)
        if len(pts) > budget:
            step = len(pts) / budget
            pts = sorted({pts[int(k * step)] for k in range(budget)} | {self.n})
        extra = max(1, budget // 4)
        pts = sorted(set(pts) | {rng.randrange(self.n + 1) for _ in range(extra)})
        return pts

    def explore(
        self,
        check: Check,
        *,
        points: int = 48,
        subsets: int = 8,
        seed: int = 0,
        workdir: str | os.PathLike[str] | None = None,
    ) -> Report:
        """Check ``check`` on the crash states of up to ``points`` points x ``subsets`` each."""
        s = scale()
        points = max(2, int(points * s))
        subsets = max(4, int(subsets * min(s, 4)))
        rng = random.Random(seed)
        report = Report(self.name, self.n)
        seen: set[Any] = set()
        base = Path(tempfile.mkdtemp(prefix="obd-crash-", dir=workdir or _fast_tmp()))
        try:
            for point in self.points(points, rng):
                report.points += 1
                nmarks = sum(1 for op in self.ops[:point] if op.kind == "mark")
                for subset in range(subsets):
                    srng = random.Random(f"{seed}:{point}:{subset}")
                    desc, chosen, keep_names = self._choose(point, subset, srng)
                    sig = (
                        nmarks,
                        tuple(sorted(chosen.items())),
                        tuple(sorted(self._names_at(point, keep_names).items())),
                        tuple(
                            sorted(
                                (f, self._covered(self.file_syncs.get(f), point))
                                for f in self.file_ops
                            )
                        ),
                    )
                    if sig in seen:
                        report.duplicates += 1
                        continue
                    seen.add(sig)
                    folder = base / "state"
                    if folder.exists():
                        shutil.rmtree(folder)
                    folder.mkdir()
                    state = self._build(point, desc, chosen, keep_names, folder)
                    report.states += 1
                    try:
                        msg = check(state)
                    except Exception as e:
                        tb = traceback.extract_tb(e.__traceback__)[-1]
                        msg = (
                            f"{type(e).__name__}: {e} ({os.path.basename(tb.filename)}:{tb.lineno})"
                        )
                    if msg:
                        report.violations.append(
                            Violation(point, subset, desc, msg, self.context(point))
                        )
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return report


def _fast_tmp() -> str | None:
    """A tmpfs folder for the rebuilt states when there is one (fsync there costs nothing)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return None


def sector_problems(
    got: bytes,
    acked: bytes | bytearray,
    since: Sequence[tuple[int, bytes | None, int]],
) -> str | None:
    """Compare a disk read after a crash with what was acknowledged.

    ``since`` lists the writes after the last acknowledgement as ``(offset, data or None
    for zeros, length)``. A sector no write since touched must read its acknowledged
    content; a sector written since may read that, any value written to it since, or zeros.
    Returns a description of the first bad sectors, or None.
    """
    if len(got) != len(acked):
        return f"read {len(got)} bytes, expected {len(acked)}"
    g = np.frombuffer(got, dtype=np.uint8).reshape(-1, SECTOR)
    a = np.frombuffer(bytes(acked), dtype=np.uint8).reshape(-1, SECTOR)
    bad = np.flatnonzero((g != a).any(axis=1))
    if bad.size == 0:
        return None
    allowed: dict[int, list[bytes]] = {}
    for off, data, length in since:
        s0 = off // SECTOR
        for k in range(length // SECTOR):
            v = bytes(SECTOR) if data is None else data[k * SECTOR : (k + 1) * SECTOR]
            allowed.setdefault(s0 + k, []).append(v)
    wrong = []
    zero = bytes(SECTOR)
    for s in bad.tolist():
        cur = got[s * SECTOR : (s + 1) * SECTOR]
        if s in allowed and (cur == zero or cur in allowed[s]):
            continue
        wrong.append(s)
    if not wrong:
        return None
    s = wrong[0]
    what = "written since the last flush, but reads none of the values written"
    if s not in allowed:
        what = "not written since the last acknowledged flush, but differs from it"
    return f"{len(wrong)} sector(s) wrong, first sector {s} (offset {s * SECTOR}): {what}"
