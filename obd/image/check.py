"""Verify everything verifiable in overlaybd files and images: ``obd check``.

Unlike the readers (which stop at the first problem, as they must), every check here
runs to the end and reports **every** problem with the offset where it lies:

* tar wrapper (docs/formats.md §0.5): header, pax record, payload bounds;
* ZFile (§4): header and trailer magic, flags and digests, header/trailer agreement,
  ``index_size`` vs ``original_file_size``, jump table bounds and ``index_crc``, every
  stored length, every block's CRC and decompressed size (in parallel, in batches);
* LSMT read-only layers and sealed files (§1.2-§1.6, §2.4): header/trailer magic, flags
  and agreement, index bounds and entry count (≤ 1e6), padding entries, order and
  overlap, ``moffset`` ranges, stored data shared by two entries, unreferenced data;
* writable layers (§2.1-§2.3): both headers and their agreement, index records (torn
  tail, out-of-range records), garbage (overwritten data still in the data file);
* image configs (§6.1): every layer as above, and the parent-uuid chain (§3).

Severities: ``corruption`` (data may read wrong), ``leak`` (space wasted that nothing
explains, e.g. data a compacted commit should not hold; nothing wrong is read),
``warning`` (unusual but harmless), ``note`` (normal and harmless: the garbage of a
log-structured layer, i.e. overwritten data that a commit drops, and the tail an
interrupted append leaves, which readers ignore and writers cut off), ``error`` (the
file could not be checked). Warnings and notes do not change the result, which follows
qemu-img check: 0 clean, 2 corruption, 3 only leaks, 1 could not check (corruption wins
over could-not-check, which wins over leaks).

Offsets are file offsets; for what lies inside a ZFile (the LSMT layer it compresses)
they are offsets in the decompressed payload and the finding says so (``space``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from obd.errors import CorruptError, ObdError
from obd.formats import zfile as zf
from obd.formats.lsmt import (
    ENTRY_SIZE,
    FLAG_HEADER,
    HT_SLOT,
    HeaderTrailer,
)
from obd.formats.lsmt.ro import RoFacts, validate_ro
from obd.formats.lsmt.rw import LSMTWritable, RwFacts, data_problems, index_problems
from obd.formats.problem import CORRUPTION, ERROR, LEAK, NOTE, WARNING, Problem
from obd.formats.sniff import (
    KIND_IMAGE,
    KIND_LSMT_RO,
    KIND_LSMT_RW_INDEX,
    KIND_LSMT_RW_SPARSE,
    KIND_UNKNOWN,
    KIND_ZFILE,
    RO_KINDS,
    RW_DATA_KINDS,
    lsmt_kind,
    open_blob,
)
from obd.formats.zfile.validate import ZFacts, block_problems, validate_zfile
from obd.image.inspect import chain_problems, looks_like_config, sibling_index, uuid_or_none
from obd.io.base import ReadAt
from obd.io.cpu import cores
from obd.io.file import open_file

EXIT_CLEAN = 0
EXIT_ERROR = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3

MAX_PER_CODE = 50  # findings kept per (file, code); the rest are counted in one line

JSON_VERSION = 1

Progress = Callable[[int], Any] | None


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str
    path: str
    offset: int | None = None
    space: str = "file"  # "file", or "payload" for offsets inside a ZFile's content

    def __str__(self) -> str:
        where = ""
        if self.offset is not None:
            where = f" (at {'payload ' if self.space != 'file' else ''}offset {self.offset})"
        return f"{self.path}: {self.severity}: {self.message}{where}"

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "path": self.path,
            "offset": self.offset,
            "space": self.space,
        }


@dataclass
class CheckReport:
    """What was checked in one file (or image config) and every finding."""

    path: str
    kind: str = KIND_UNKNOWN
    wrappers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    leaked_bytes: int = 0
    garbage_bytes: int = 0  # reclaimable by a commit (notes), not counted as leaked
    uuid: str | None = None
    parent_uuid: str | None = None
    _counts: dict[str, int] = field(default_factory=dict, repr=False)

    def add(
        self,
        severity: str,
        code: str,
        message: str,
        offset: int | None = None,
        *,
        space: str = "file",
        path: str | None = None,
    ) -> None:
        n = self._counts.get(code, 0) + 1
        self._counts[code] = n
        if n <= MAX_PER_CODE:
            self.findings.append(Finding(severity, code, message, path or self.path, offset, space))

    def finish(self) -> None:
        """Add one line per code whose findings were cut at MAX_PER_CODE."""
        for code, n in self._counts.items():
            if n > MAX_PER_CODE:
                sev = next(f.severity for f in self.findings if f.code == code)
                self.findings.append(
                    Finding(sev, code, f"... and {n - MAX_PER_CODE} more like the above", self.path)
                )
        self._counts = {code: MAX_PER_CODE for code in self._counts}

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def exit_code(self) -> int:
        return exit_code_of([self])

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "wrappers": self.wrappers,
            "result": RESULT_NAMES[self.exit_code],
            "checked": self.checked,
            "leaked_bytes": self.leaked_bytes,
            "garbage_bytes": self.garbage_bytes,
            "findings": [f.to_json() for f in self.findings],
        }


RESULT_NAMES = {
    EXIT_CLEAN: "clean",
    EXIT_ERROR: "error",
    EXIT_CORRUPT: "corrupt",
    EXIT_LEAKS: "leaks",
}


def exit_code_of(reports: list[CheckReport]) -> int:
    sev = {f.severity for r in reports for f in r.findings}
    if CORRUPTION in sev:
        return EXIT_CORRUPT
    if ERROR in sev:
        return EXIT_ERROR
    if LEAK in sev:
        return EXIT_LEAKS
    return EXIT_CLEAN


def document(reports: list[CheckReport]) -> dict[str, Any]:
    """The ``obd check --json`` document."""
    code = exit_code_of(reports)
    return {
        "version": JSON_VERSION,
        "result": RESULT_NAMES[code],
        "exit_code": code,
        "summary": {
            "files": len(reports),
            "corruptions": sum(r.count(CORRUPTION) for r in reports),
            "leaks": sum(r.count(LEAK) for r in reports),
            "warnings": sum(r.count(WARNING) for r in reports),
            "notes": sum(r.count(NOTE) for r in reports),
            "errors": sum(r.count(ERROR) for r in reports),
            "leaked_bytes": sum(r.leaked_bytes for r in reports),
            "garbage_bytes": sum(r.garbage_bytes for r in reports),
        },
        "files": [r.to_json() for r in reports],
    }


# ------------------------------------------------------------------------------ ZFile


def _check_zfile(
    src: ReadAt,
    rep: CheckReport,
    *,
    base: int,
    progress: Progress,
    threads: int,
) -> bool:
    """Check a ZFile at ``src`` (file offsets are ``base`` + offsets in ``src``): its
    structure, then every block; True when the blocks can be located."""
    facts = ZFacts()
    _report(rep, validate_zfile(src, facts), base=base)
    if facts.info is not None:
        rep.checked["blocks"] = facts.info.index_size
    if facts.structure_ok:
        _report(rep, block_problems(src, facts, progress=progress, threads=threads), base=base)
    return facts.structure_ok


# ------------------------------------------------------------------------------- LSMT


def _report(
    rep: CheckReport,
    problems: Iterable[Problem],
    *,
    space: str = "file",
    path: str | None = None,
    base: int = 0,
) -> None:
    """Add each problem as a finding (offsets moved by ``base``, where the validated view
    starts in the file); leaked and garbage bytes go to the totals."""
    for p in problems:
        off = None if p.offset is None else base + p.offset
        rep.add(p.severity, p.code, p.message, off, space=space, path=path)
        if p.severity == LEAK:
            rep.leaked_bytes += p.nbytes
        elif p.code == "garbage":
            rep.garbage_bytes += p.nbytes


def check_lsmt_ro(view: ReadAt, rep: CheckReport, *, space: str = "file", base: int = 0) -> None:
    """A read-only layer (commit output) or a sealed data file, everything of §1.5-§1.6
    (``view`` starts at file offset ``base``)."""
    facts = RoFacts()
    _report(rep, validate_ro(view, facts), space=space, base=base)
    t = facts.trailer
    if t is not None:
        rep.uuid, rep.parent_uuid = uuid_or_none(t.uuid), uuid_or_none(t.parent_uuid)
        rep.checked["index_entries"] = t.index_size
    if facts.raw_entries is not None:
        rep.checked["valid_entries"] = facts.valid_entries


# --------------------------------------------------------------------------- writable


def check_rw(data_path: str, index_path: str | None, rep: CheckReport) -> None:
    """A writable layer's data file and (log-structured) index file (§2.1-§2.3)."""
    facts = RwFacts()
    with open_file(data_path) as data:
        _report(rep, data_problems(data, facts))
        h = facts.header
        if h is None or not (h.is_header and h.is_data_file):
            return
        rep.uuid, rep.parent_uuid = uuid_or_none(h.uuid), uuid_or_none(h.parent_uuid)
        if h.is_sparse:
            with LSMTWritable.open(data, None, readonly=True) as layer:
                rep.checked["segments"] = len(layer.idx)
            return
    if index_path is None:
        rep.add(
            ERROR,
            "no_index",
            "the index file of this writable layer was not found (give it with --index)",
        )
        return
    before = rep.count(CORRUPTION)
    with open_file(index_path) as ix:
        _report(rep, index_problems(ix, facts, data_path=data_path), path=index_path)
    ih = facts.index_header
    if ih is not None:
        rep.uuid, rep.parent_uuid = uuid_or_none(ih.uuid), uuid_or_none(ih.parent_uuid)
    if facts.records is not None:
        rep.checked["index_records"] = len(facts.records)
    if rep.count(CORRUPTION) > before:
        return
    data2, index = open_file(data_path), open_file(index_path)
    try:
        with _quiet("obd.formats.lsmt.rw"):  # a torn tail is reported above
            layer = LSMTWritable.open(data2, index, readonly=True)
    except ObdError as e:  # pragma: no cover - the checks above are open()'s
        data2.close()
        index.close()
        rep.add(CORRUPTION, "rw_open", str(e))
        return
    with layer:
        garbage = layer.garbage_bytes()
    if garbage:
        rep.add(
            NOTE,
            "garbage",
            f"{garbage} bytes of the data file are overwritten data no longer "
            "referenced (normal in a log-structured layer; a commit drops them)",
            HT_SLOT,
        )
        rep.garbage_bytes += garbage


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hold back warnings of ``logger`` (what they say is reported as a finding)."""
    log = logging.getLogger(logger)

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


# ------------------------------------------------------------------------------ files


def check_file(
    path: str,
    *,
    index: str | None = None,
    progress: Progress = None,
    threads: int | None = None,
) -> CheckReport:
    """Check one file of any kind; every problem becomes a finding (never raises
    :class:`ObdError`)."""
    from obd.formats.tar import TarFacts, TarView, is_tar, validate_tar

    rep = CheckReport(path)
    nthreads = threads or cores()
    try:
        f = open_file(path)
    except ObdError as e:
        rep.add(ERROR, "access", e.message)
        return rep
    base = 0
    try:
        # the wrappers are validated on the way in (every problem, where opening stops at
        # the first); once they hold, open_blob says what is inside
        view: ReadAt = f
        if is_tar(f.pread(0, 512)):
            rep.wrappers.append("tar")
            tar = TarFacts()
            _report(rep, validate_tar(f, tar))
            if not tar.ok:
                return rep
            view, base = TarView(f, path=path), tar.offset
        if zf.is_zfile(view.pread(0, 512)):
            rep.wrappers.append("zfile")
            rep.kind = KIND_ZFILE
            if not _check_zfile(view, rep, base=base, progress=progress, threads=nthreads):
                return rep
        try:
            blob = open_blob(f, path=path, cache_blocks=8)
        except CorruptError as e:
            if "zfile" not in rep.wrappers:
                raise
            rep.add(CORRUPTION, "lsmt_unreadable", f"cannot read the payload: {e.message}")
            return rep
        except ObdError as e:
            if "zfile" not in rep.wrappers:
                raise
            if not rep.count(CORRUPTION):
                rep.add(ERROR, "zfile", f"cannot open the ZFile: {e.message}")
            return rep
        kind, view = blob.kind, blob.view
        rep.kind = kind
        if blob.zfile is not None:
            if kind in RO_KINDS:
                try:
                    check_lsmt_ro(view, rep, space="payload")
                except CorruptError as e:
                    rep.add(
                        CORRUPTION,
                        "lsmt_unreadable",
                        f"cannot read the LSMT layer inside the ZFile: {e.message}",
                    )
            elif kind != KIND_ZFILE:
                rep.add(ERROR, "unsupported", f"a {kind} file inside a ZFile cannot be checked")
            return rep
        if kind in RO_KINDS:
            check_lsmt_ro(view, rep, base=base)  # base: a tar-wrapped plain layer
        elif kind in RW_DATA_KINDS:
            if rep.wrappers:
                rep.add(ERROR, "unsupported", "a writable layer inside a tar cannot be checked")
            else:
                idx = index if index is not None else sibling_index(path)
                check_rw(path, None if kind == KIND_LSMT_RW_SPARSE else idx, rep)
        elif kind == KIND_LSMT_RW_INDEX:
            _check_lone_index(view, rep)
        elif not rep.wrappers and _trailer_kind(f) == "lsmt":
            # the header is broken but an LSMT trailer ends the file
            rep.kind = KIND_LSMT_RO
            check_lsmt_ro(f, rep)
        elif not rep.wrappers and _trailer_kind(f) == "zfile":
            rep.kind = KIND_ZFILE
            rep.add(
                CORRUPTION, "zfile_header", "ZFile header has a bad magic (trailer is intact)", 0
            )
        else:
            what = (
                "empty file (the index file of a sparse layer is empty)"
                if f.size() == 0
                else "not an overlaybd file (no ZFile or LSMT header)"
            )
            rep.add(ERROR, "unknown", what)
        if progress is not None and "zfile" not in rep.wrappers:
            progress(f.size())
    except ObdError as e:
        rep.add(ERROR, "unreadable", str(e))
    finally:
        rep.finish()
        f.close()
    return rep


def _trailer_kind(f: ReadAt) -> str | None:
    """``"lsmt"`` or ``"zfile"`` when the file ends with that format's trailer magic."""
    size = f.size()
    if size >= 2 * HT_SLOT:
        try:
            t = HeaderTrailer.unpack(f.pread(size - HT_SLOT, HT_SLOT))
        except CorruptError:
            pass
        else:
            if not t.flags & FLAG_HEADER:
                return "lsmt"
    if size >= 2 * zf.SLOT_SIZE:
        zt = zf.HeaderTrailer.unpack(f.pread(size - zf.SLOT_SIZE, zf.SLOT_SIZE))
        if zt.magic_ok and not zt.is_header:
            return "zfile"
    return None


def _check_lone_index(view: ReadAt, rep: CheckReport) -> None:
    """An index file given alone: its header and the shape of its records (their
    ranges are checked against the data file when the data file is checked)."""
    facts = RwFacts()
    _report(rep, index_problems(view, facts))
    ih = facts.index_header
    if ih is not None:
        rep.uuid, rep.parent_uuid = uuid_or_none(ih.uuid), uuid_or_none(ih.parent_uuid)
        rep.checked["index_records"] = (view.size() - HT_SLOT) // ENTRY_SIZE


def check_image(
    config_path: str, *, progress: Progress = None, threads: int | None = None
) -> list[CheckReport]:
    """Every layer of an image config, then the parent-uuid chain (reported on the
    config's own report, which comes first)."""
    from obd.image.config import load_image_config
    from obd.image.layers import local_layer_path

    top = CheckReport(config_path, kind=KIND_IMAGE)
    try:
        cfg = load_image_config(config_path)
    except ObdError as e:
        top.add(ERROR, "config", e.message)
        return [top]
    reports = [top]
    rows: list[tuple[int, str | None, str | None]] = []
    layers = cfg.stacked_lowers
    for i, lc in enumerate(layers):
        p = local_layer_path(lc)
        if p is None:
            what = f"remote ({lc.digest})" if lc.digest else "not found"
            top.add(ERROR, "layer_missing", f"layer {i} is {what}; it was not checked")
            rows.append((i, None, None))
            continue
        r = check_file(p, progress=progress, threads=threads)
        reports.append(r)
        rows.append((i, r.uuid, r.parent_uuid))
    if cfg.upper.present:
        r = CheckReport(cfg.upper.data)
        try:
            lk, _ = _kind_of_local(cfg.upper.data)
            r.kind = lk
            check_rw(cfg.upper.data, cfg.upper.index, r)
        except ObdError as e:
            r.add(ERROR, "unreadable", str(e))
        r.finish()
        reports.append(r)
        rows.append((len(rows), r.uuid, r.parent_uuid))
    top.checked["layers"] = len(rows)
    for c in chain_problems(rows):
        top.add(CORRUPTION, "chain", c.message)
    top.finish()
    return reports


def _kind_of_local(path: str) -> tuple[str, Any]:
    with open_file(path) as f:
        return lsmt_kind(f)


def check_paths(
    paths: list[str],
    *,
    index: str | None = None,
    progress: Progress = None,
    threads: int | None = None,
) -> list[CheckReport]:
    """Check files and image configs; ``index`` names the index file of a single
    writable data file."""
    reports: list[CheckReport] = []
    for p in paths:
        if looks_like_config(p):
            reports.extend(check_image(p, progress=progress, threads=threads))
        else:
            reports.append(check_file(p, index=index, progress=progress, threads=threads))
    return reports


def total_bytes(paths: list[str]) -> int:
    """What a progress bar over :func:`check_paths` counts to (file sizes, approximately)."""
    from obd.image.config import load_image_config
    from obd.image.layers import local_layer_path

    files: list[str] = []
    for p in paths:
        if looks_like_config(p):
            try:
                cfg = load_image_config(p)
            except ObdError:
                continue
            files += [q for q in (local_layer_path(lc) for lc in cfg.lowers) if q]
            if cfg.upper.present:
                files.append(cfg.upper.data)
        else:
            files.append(p)
    total = 0
    for q in files:
        try:
            total += os.path.getsize(q)
        except OSError:
            pass
    return total


__all__ = [
    "CORRUPTION",
    "ERROR",
    "EXIT_CLEAN",
    "EXIT_CORRUPT",
    "EXIT_ERROR",
    "EXIT_LEAKS",
    "KIND_LSMT_RW_INDEX",
    "LEAK",
    "NOTE",
    "WARNING",
    "CheckReport",
    "Finding",
    "check_file",
    "check_image",
    "check_paths",
    "document",
    "exit_code_of",
]
