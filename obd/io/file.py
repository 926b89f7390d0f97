"""Local files as ReadAt / WriteAt, plus atomic output files."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Iterator

from obd.errors import FileAccessError, OutputExistsError
from obd.io import trace as _trace

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_CHUNK = 32 << 20
DIRECT_ALIGN = 4096  # offsets and sizes of direct writes: a file system block
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Starts the writeback of ranges of a file (``sync_file_range``) in a thread of its
    own: the call may wait for room in the disk's queue or for pages already being
    written, and the writer must not wait with it. :meth:`stop` before an fsync or a
    close of the file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="obd-writeback", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            start_writeback(self.fd, *item)

    def add(self, offset: int, length: int) -> None:
        self.queue.put((offset, length))

    def stop(self) -> None:
        """Wait until every range asked for has been handed to the disk."""
        self.queue.put(None)
        self.thread.join()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of ``fd`` keeping its size; reads give zeros."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e, os.strerror(e))
        # The filesystem cannot punch holes: write zeros instead.
        zero = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zero), end - pos)
            os.pwrite(fd, zero[:n], pos)
            pos += n


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield ``(begin, end)`` of allocated data in ``[start, end)`` via SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if d >= end:
            return
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        yield d, h
        pos = h


def _iov_parts(
    buffers: list[bytes | bytearray | memoryview],
) -> Iterator[tuple[list[bytes | bytearray | memoryview], int]]:
    """``buffers`` in lists of at most ``IOV_MAX`` (one ``pwritev`` each), with their
    byte counts."""
    for i in range(0, len(buffers), IOV_MAX):
        part = buffers[i : i + IOV_MAX]
        yield part, sum(len(b) for b in part)


def _finish_pwritev(
    fd: int, buffers: list[bytes | bytearray | memoryview], offset: int, done: int
) -> None:
    """Write what a short ``pwritev(fd, buffers, offset)`` that wrote ``done`` bytes left."""
    pos = offset + done
    for b in buffers:
        if done >= len(b):
            done -= len(b)
            continue
        rest = memoryview(b)[done:]
        done = 0
        while rest:
            k = os.pwrite(fd, rest, pos)
            rest = rest[k:]
            pos += k


class LocalFile:
    """A local file opened for positional I/O (implements ReadAt and WriteAt)."""

    def __init__(self, fd: int, path: str, writable: bool, *, writeback: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.writable = writable
        # writeback: an output written once, front to back and fsynced at the end; start
        # writing it to disk as it goes so the final fsync has little left to do
        self._writeback = writeback
        self._unsynced = 0
        # the span written since writeback was last started: [_wb_lo, _wb_hi)
        self._wb_lo = -1
        self._wb_hi = 0
        self._wb: Writeback | None = None
        self._direct_fd: int | None = None  # an O_DIRECT descriptor: None untried, -1 none
        self._direct_refused = False  # a direct write was refused: no more are tried

    def size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        return st.st_size

    def block_size(self) -> int:
        """The file system's block size for this file (the grain of SEEK_DATA/SEEK_HOLE)."""
        return os.fstat(self.fd).st_blksize or 4096

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length and data:
            # A short read that is not at EOF: try once more for the rest.
            more = os.pread(self.fd, length - len(data), offset + len(data))
            data += more
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        total = len(view)
        at = offset
        while view:
            n = os.pwrite(self.fd, view, at)
            view = view[n:]
            at += n
        t = _trace.tracer
        if t is not None:
            t.pwrite(self.fd, offset, data)
        self._wrote(offset, total)

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> int:
        """Write ``buffers`` back to back at ``offset``: one ``pwritev`` per ``IOV_MAX``
        of them, where a loop of ``pwrite`` would make a call per buffer (a commit's
        gather of many short runs). Returns the bytes written."""
        at = offset
        for part, want in _iov_parts(buffers):
            n = os.pwritev(self.fd, part, at)
            if n < want:  # short (rare): the rest one buffer at a time
                _finish_pwritev(self.fd, part, at, n)
            at += want
        t = _trace.tracer
        if t is not None:
            t.pwrite(self.fd, offset, b"".join(buffers))
        self._wrote(offset, at - offset)
        return at - offset

    def map_readonly(self) -> mmap.mmap | None:
        """A shared read-only mapping of the whole file, or None where there is none to
        make (an empty file, a file system that maps nothing). Its pages are the page
        cache's: no copy. The file must not shrink while it is mapped (SIGBUS)."""
        try:
            return mmap.mmap(self.fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError, OverflowError):
            return None

    def can_direct(self) -> bool:
        """Whether this file takes direct I/O (:meth:`pwritev_direct`); opens its
        descriptor on the first call."""
        if self._direct_fd is None:
            try:
                # the same open file, whatever its path has become since (renamed,
                # unlinked, replaced): never another file that took its name
                self._direct_fd = os.open(
                    f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
                )
            except (OSError, AttributeError):
                self._direct_fd = -1
        return self._direct_fd >= 0 and not self._direct_refused

    def pwritev_direct(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> bool:
        """Write ``buffers`` back to back at ``offset`` with direct I/O (``O_DIRECT``: a
        second descriptor of the same open file, reopened through ``/proc/self/fd``):
        the disk reads them where they are, with no copy into the page cache and no
        writeback later. ``offset`` and the total must be multiples of
        :data:`DIRECT_ALIGN`, every buffer's address and length multiples of 512.
        Durable only after :meth:`flush`, like any write. False (nothing written) when
        the file system takes no direct I/O; then write otherwise. A range written so
        must not also be written through the page cache before the flush."""
        if not self.can_direct():
            return False
        dfd = self._direct_fd
        assert dfd is not None
        at = offset
        for part, want in _iov_parts(buffers):
            n = 0
            if dfd >= 0:
                try:
                    n = os.pwritev(dfd, part, at)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # not takeable after all (an alignment this file system wants
                    # bigger): this and every later write go through the page cache.
                    # The descriptor stays open until close(): other threads may be
                    # writing through it now (closed, its number could be reused).
                    self._direct_refused = True
                    dfd = -1
                    if at == offset:
                        return False
            if n < want:  # short, or refused midway: the rest through the page cache
                _finish_pwritev(self.fd, part, at, n)
            at += want
        t = _trace.tracer
        if t is not None:  # the same file: durable at this file's fsync, as any write
            t.pwrite(self.fd, offset, b"".join(buffers))
        return True

    def _close_direct(self) -> None:
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = -1

    def _wrote(self, offset: int, total: int) -> None:
        """Account ``total`` bytes just written at ``offset`` for the output's writeback."""
        if self._writeback:
            self._unsynced += total
            self._wb_lo = offset if self._wb_lo < 0 else min(self._wb_lo, offset)
            self._wb_hi = max(self._wb_hi, offset + total)
            if self._unsynced >= WRITEBACK_CHUNK:
                # only the span written since last time, from a thread: asking for the
                # whole file from the writer walked (and waited on) every page already
                # under writeback, which cost a 1 GiB commit seconds of system time
                if self._wb is None:
                    self._wb = Writeback(self.fd)
                self._wb.add(self._wb_lo, self._wb_hi - self._wb_lo)
                self._unsynced = 0
                self._wb_lo, self._wb_hi = -1, 0

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the current end of file and return where it went."""
        pos = os.lseek(self.fd, 0, os.SEEK_END)
        self.pwrite(pos, data)
        return pos

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        t = _trace.tracer
        if t is not None:
            t.truncate(self.fd, size)

    def punch_hole(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)
        t = _trace.tracer
        if t is not None:
            t.punch_hole(self.fd, offset, length)

    def copy_in(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes at ``src_offset`` of ``src_fd`` to ``offset``, in the kernel.

        Raises OSError when the kernel cannot (the caller then copies by reading).
        """
        done = 0
        while done < length:
            n = os.copy_file_range(src_fd, self.fd, length - done, src_offset + done, offset + done)
            if n <= 0:
                raise OSError("copy_file_range made no progress")
            done += n
        t = _trace.tracer
        if t is not None:
            t.pwrite(self.fd, offset, os.pread(src_fd, length, src_offset))
        self._wrote(offset, length)

    def data_extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        return data_extents(self.fd, start, end)

    def _stop_writeback(self) -> None:
        if self._wb is not None:
            self._wb.stop()
            self._wb = None

    def flush(self) -> None:
        self._stop_writeback()
        t = _trace.tracer
        if t is None:
            os.fsync(self.fd)
            return
        mark = t.sync_begin()
        os.fsync(self.fd)
        t.fsync(self.fd, mark)

    def close(self) -> None:
        self._stop_writeback()
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalFile({self.path!r})"


def open_file(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    create: bool = False,
    exclusive: bool = False,
    mode: int = 0o644,
) -> LocalFile:
    """Open a local file; errors become :class:`FileAccessError` naming the path."""
    p = os.fspath(path)
    flags = os.O_RDWR if writable else os.O_RDONLY
    if create:
        flags |= os.O_CREAT
    if exclusive:
        flags |= os.O_EXCL
    # O_NONBLOCK: opening a FIFO must not hang (it is refused below); regular files ignore it
    flags |= os.O_CLOEXEC | os.O_NONBLOCK
    t = _trace.tracer
    new = create and t is not None and not os.path.lexists(p)
    try:
        fd = os.open(p, flags, mode)
    except FileExistsError:
        raise OutputExistsError("already exists (use -f to replace it)", path=p) from None
    except FileNotFoundError:
        raise FileAccessError("no such file", path=p) from None
    except IsADirectoryError:
        raise FileAccessError("is a directory", path=p) from None
    except PermissionError:
        raise FileAccessError("permission denied", path=p) from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a Unix socket cannot be opened at all: say what it is
            with contextlib.suppress(OSError):
                mode_ = os.stat(p).st_mode
                if not stat.S_ISREG(mode_):
                    raise FileAccessError(
                        f"not a regular file ({_file_kind(mode_)})", path=p
                    ) from None
        raise FileAccessError(e.strerror or str(e), path=p) from None
    try:
        mode_ = os.fstat(fd).st_mode
    except OSError as e:  # pragma: no cover - fstat of an open fd
        os.close(fd)
        raise FileAccessError(e.strerror or str(e), path=p) from None
    if not (stat.S_ISREG(mode_) or stat.S_ISBLK(mode_)):
        os.close(fd)
        raise FileAccessError(f"not a regular file ({_file_kind(mode_)})", path=p)
    if new and t is not None:
        t.created(p, fd)
    return LocalFile(fd, p, writable)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
    ):
        if test(mode):
            return name
    return "not a file"


class AtomicOutput:
    """An output file written to a temporary name in its folder, renamed on success.

    ``with AtomicOutput(path, force=False) as out:`` gives a writable :class:`LocalFile`;
    on a clean exit it is fsynced and renamed over ``path``; on an exception (or
    KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    Without ``force``, an existing ``path`` is an :class:`OutputExistsError` (checked
    first and again at rename time, atomically, with ``link``).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False, mode: int = 0o644):
        self.path = os.fspath(path)
        self.force = force
        self.mode = mode
        self.file: LocalFile | None = None
        self.tmp: str | None = None

    def __enter__(self) -> LocalFile:
        if not self.force and os.path.lexists(self.path):
            raise OutputExistsError("already exists (use -f to replace it)", path=self.path)
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(
                prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=folder
            )
        except FileNotFoundError:
            raise FileAccessError("folder does not exist", path=self.path) from None
        except OSError as e:
            raise FileAccessError(e.strerror or str(e), path=self.path) from None
        t = _trace.tracer
        if t is not None:
            t.created(tmp, fd)
        os.fchmod(fd, self.mode & ~_umask())
        self.tmp = tmp
        self.file = LocalFile(fd, tmp, True, writeback=True)
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.file is not None and self.tmp is not None
        try:
            if exc_type is None:
                self.file.flush()
                self.file.close()
                if self.force:
                    _replace(self.tmp, self.path)
                else:
                    try:
                        _link(self.tmp, self.path)
                    except FileExistsError:
                        raise OutputExistsError(
                            "already exists (use -f to replace it)", path=self.path
                        ) from None
                    _unlink(self.tmp)
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
                self.tmp = None
        finally:
            self.file.close()
            if self.tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    _unlink(self.tmp)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# Name operations: through these so a tracer (obd.io.trace) sees them.


def _replace(src: str, dst: str) -> None:
    os.replace(src, dst)
    t = _trace.tracer
    if t is not None:
        t.rename(src, dst)


def _link(src: str, dst: str) -> None:
    os.link(src, dst)
    t = _trace.tracer
    if t is not None:
        t.link(src, dst)


def _unlink(path: str) -> None:
    os.unlink(path)
    t = _trace.tracer
    if t is not None:
        t.unlink(path)


def _fsync_dir(folder: str) -> None:
    """Make the names in ``folder`` durable (after a create, rename, link or unlink there).

    A filesystem that cannot sync a folder (EINVAL) is let be, as is a folder this process
    cannot open; a failed sync (EIO...) is a :class:`FileAccessError`: the new name may not
    survive a crash.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    t = _trace.tracer
    try:
        mark = t.sync_begin() if t is not None else 0
        os.fsync(fd)
        if t is not None:
            t.fsync_dir(folder, mark)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise FileAccessError(
                f"cannot make the new name durable: fsync of the folder failed: {e.strerror or e}",
                path=folder,
            ) from None
    finally:
        os.close(fd)
