"""Background download of remote layers (docs/formats.md §8.5).

After ``delay`` + a random 0..``delayExtra`` seconds, one thread copies each queued blob,
in queue order, straight from the registry (not through the cache) into
``<dir>/.download`` in ``blockSize`` chunks at most ``maxMBps`` MiB/s, skipping chunks a
previous attempt left allocated. Then it fsyncs the file, checks its SHA-256 against the
layer digest, renames it to ``<dir>/overlaybd.commit`` and fsyncs the folder, and swaps
the open layer's reads to that file (:meth:`RemoteBlob.switch_to`). A wrong digest makes
the next attempt copy everything again; a failed layer is queued again until ``tryCnt``
attempts are used. The ``.download`` file is locked (flock) while it is written, so two
servers never fill one folder. Progress is in :class:`~obd.registry.blob.RegistryStats`;
each read is audited as ``bk_download`` and each finished layer is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

from obd.errors import CorruptError, ObdError
from obd.io.file import _fsync_dir, _replace, data_extents, open_file
from obd.io.lock import lock_writer
from obd.registry.blob import DownloadProgress, RegistryStats, RemoteBlob
from obd.registry.cache import Audit, Fetch

log = logging.getLogger("obd.registry.download")

COMMIT_NAME = "overlaybd.commit"
PARTIAL_NAME = ".download"


@dataclass(frozen=True)
class DownloadSettings:
    """The ``download`` keys (§6.1) as plain values."""

    enable: bool = False
    delay: int = 300
    delayExtra: int = 30
    maxMBps: int = 100
    tryCnt: int = 5
    blockSize: int = 262144


@dataclass
class _Job:
    blob: RemoteBlob
    fetch: Fetch
    dir: str
    digest: str
    size: int
    progress: DownloadProgress
    force: bool = False


class BackgroundDownloader:
    """Downloads the layers :meth:`add` queues, in one thread started by :meth:`start`."""

    def __init__(
        self,
        settings: DownloadSettings,
        *,
        stats: RegistryStats | None = None,
        audit: Audit | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats or RegistryStats()
        self.audit = audit
        self.rng = rng or random.Random()
        self.queue: deque[_Job] = deque()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, blob: RemoteBlob, fetch: Fetch, *, dir: str, digest: str, size: int) -> None:
        """Queue ``blob`` (an open remote layer) for download into ``dir``."""
        prog = DownloadProgress(digest, size)
        with self.stats.lock:
            self.stats.downloads[digest] = prog
        with self.lock:
            self.queue.append(_Job(blob, fetch, dir, digest, size, prog))

    def start(self) -> None:
        if self.thread is None and self.queue:
            self.thread = threading.Thread(target=self._run, name="bk-download", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 10) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        s = self.settings
        extra = s.delayExtra if s.delayExtra > 0 else 30
        wait = max(0, s.delay) + self.rng.randrange(extra)
        if self.stopping.wait(wait):
            return
        while not self.stopping.is_set():
            with self.lock:
                if not self.queue:
                    return
                job = self.queue.popleft()
            job.progress.attempts += 1
            job.progress.state = "running"
            try:
                self._download(job)
                job.progress.state = "done"
            except Exception as e:
                if self.stopping.is_set():
                    return
                tries = max(1, s.tryCnt)
                left = tries - job.progress.attempts
                log.warning(
                    "background download of %s into %s failed (%s); %d attempts left",
                    job.digest, job.dir, e, left,
                )  # fmt: skip
                if left > 0:
                    job.progress.state = "waiting"
                    with self.lock:
                        self.queue.append(job)
                else:
                    job.progress.state = "failed"

    def _download(self, job: _Job) -> None:
        final = os.path.join(job.dir, COMMIT_NAME)
        if not os.path.exists(final):
            self._copy(job, final)
        local = open_file(final)
        try:
            job.blob.switch_to(local)
        except BaseException:
            local.close()
            raise
        job.progress.done = job.size
        log.info("layer %s: reads now go to %s", job.digest, final)

    def _copy(self, job: _Job, final: str) -> None:
        s = self.settings
        os.makedirs(job.dir, exist_ok=True)
        part = os.path.join(job.dir, PARTIAL_NAME)
        out = open_file(part, writable=True, create=True)
        try:
            lock_writer(out.fd, part)
            if job.force or out.size() != job.size:
                out.truncate(0)
                out.truncate(job.size)
            present = list(data_extents(out.fd, 0, job.size)) if not job.force else []
            chunk = max(4096, s.blockSize)
            rate = s.maxMBps * (1 << 20)
            t0 = time.monotonic()
            copied = 0
            done = 0
            for off in range(0, job.size, chunk):
                if self.stopping.is_set():
                    raise ObdError("stopped")
                n = min(chunk, job.size - off)
                if any(a <= off and off + n <= b for a, b in present):
                    done += n
                    job.progress.done = done
                    continue
                t1 = time.monotonic_ns()
                data = job.fetch(off, n)
                lat = (time.monotonic_ns() - t1) // 1000
                if len(data) != n:
                    raise ObdError(f"asked for {n} bytes at {off}, got {len(data)}")
                out.pwrite(off, data)
                if self.audit is not None:
                    self.audit(
                        "bk_download", pathname=job.blob.path, offset=off, size=n, latency=lat
                    )
                copied += n
                done += n
                job.progress.done = done
                if rate > 0:  # throttle: no faster than maxMBps on average
                    ahead = copied / rate - (time.monotonic() - t0)
                    if ahead > 0 and self.stopping.wait(ahead):
                        raise ObdError("stopped")
            out.flush()
            with open(part, "rb") as fp:  # the whole file: it was truncated to the size
                got = hashlib.file_digest(fp, "sha256").hexdigest()
            if "sha256:" + got != job.digest.lower():
                job.force = True
                raise CorruptError(
                    f"downloaded blob has sha256:{got}, expected {job.digest}", path=part
                )
            _replace(part, final)
            _fsync_dir(job.dir)
        finally:
            out.close()


__all__ = ["COMMIT_NAME", "PARTIAL_NAME", "BackgroundDownloader", "DownloadSettings"]
