"""The ext4 filesystem inside an image, read and written in userspace through Debian's
libext2fs (``libext2fs.so.2``, e2fsprogs) with ``ctypes``.

libext2fs does the filesystem (allocation, extents, directories, xattrs, bitmaps and
group descriptors, exactly as ``mke2fs -d`` and ``debugfs`` do); its block I/O goes
through an I/O manager of ours (:class:`_Channel`) to any :class:`obd.io.base.ReadAt` /
``BlockDevice``, normally an image's :class:`obd.image.Stack`, so the writes land in the
image's writable upper layer. No kernel mount, no FUSE, no root: an unprivileged user in
a container can apply layers. The channel keeps a write-back block cache (metadata blocks
rewritten many times reach the upper once) and writes dirty blocks in sorted contiguous
runs.

:func:`mkfs` makes the filesystem with ``mke2fs`` (upstream overlaybd-apply's choices:
4 KiB blocks, 256-byte inodes, no journal; the feature list of the ``rw_apply`` vector)
into a sparse scratch file and copies the blocks it wrote into the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from obd.errors import CorruptError, ObdError, UnsupportedError
from obd.io.base import ReadAt
from obd.oci.layer import Entry, Kind, join, parent_of

log = logging.getLogger(__name__)

# error codes: the ext2 com_err table (lib/ext2fs/ext2_err.et.in), base + index
ET_BASE = 2133571328
ET_MAGIC_IO_CHANNEL = ET_BASE + 5
ET_MAGIC_IO_MANAGER = ET_BASE + 7
ET_SHORT_READ = ET_BASE + 36
ET_SHORT_WRITE = ET_BASE + 37
ET_DIR_NO_SPACE = ET_BASE + 38
ET_UNIMPLEMENTED = ET_BASE + 41
ET_BLOCK_ALLOC_FAIL = ET_BASE + 72
ET_INODE_ALLOC_FAIL = ET_BASE + 73
ET_FILE_NOT_FOUND = ET_BASE + 76
ET_EA_NO_SPACE = ET_BASE + 163
ET_EXTENT_NO_NEXT = ET_BASE + 124
FULL_ERRORS = (ET_BLOCK_ALLOC_FAIL, ET_INODE_ALLOC_FAIL, ET_DIR_NO_SPACE)

FLAG_RW = 0x01
FLAG_64BITS = 0x20000
FILE_WRITE = 0x0001
ROOT_INO = 2
SUPERBLOCK_OFFSET = 1024
EXT2_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x0004
INCOMPAT_JOURNAL_DEV = 0x0008
INCOMPAT_EXTENTS = 0x0040
FEATURE_EXTENTS = INCOMPAT_EXTENTS
RO_COMPAT_BIGALLOC = 0x0200
RO_COMPAT_METADATA_CSUM = 0x0400
INCOMPAT_FILETYPE = 0x0002
INLINE_DATA_FL = 0x10000000
DIR_LINK_MAX = 65000  # EXT4_LINK_MAX: a folder past it counts 1 link (dir_nlink)
EXTENTS_FL = 0x80000
FALLOCATE_FORCE_INIT = 0x2
FALLOCATE_INIT_BEYOND_EOF = 0x8
EXTENT_CURRENT = 0x0000
EXTENT_NEXT_LEAF = 0x0007
EXTENT_FLAGS_UNINIT = 0x0002
DATA_CHUNK = 1 << 20  # file data is read, allocated and mapped this much at a time
INDEX_FL = 0x1000

# directory entry file types (ext2_fs.h EXT2_FT_*)
FT = {
    Kind.REG: 1,
    Kind.DIR: 2,
    Kind.CHAR: 3,
    Kind.BLOCK: 4,
    Kind.FIFO: 5,
    Kind.SOCK: 6,
    Kind.SYMLINK: 7,
}
KIND_OF_FT = {v: k for k, v in FT.items()}
S_IF = {
    Kind.REG: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCK: stat.S_IFSOCK,
    Kind.SYMLINK: stat.S_IFLNK,
}
KIND_OF_MODE = {v: k for k, v in S_IF.items()}

# struct ext2_inode_large (lib/ext2fs/ext2_fs.h): the fields obd sets, by offset
I_MODE, I_UID, I_SIZE, I_ATIME, I_CTIME, I_MTIME, I_DTIME = 0x00, 0x02, 0x04, 0x08, 0x0C, 0x10, 0x14
I_GID, I_LINKS, I_BLOCKS, I_FLAGS, I_BLOCK = 0x18, 0x1A, 0x1C, 0x20, 0x28
I_FILE_ACL, I_SIZE_HIGH, I_UID_HIGH, I_GID_HIGH = 0x68, 0x6C, 0x78, 0x7A
I_EXTRA_ISIZE, I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA, I_CRTIME = 0x80, 0x84, 0x88, 0x8C, 0x90
LARGE_INODE = 160  # sizeof(struct ext2_inode_large)
EXTRA_ISIZE = LARGE_INODE - 128

errcode_t = ctypes.c_long
c_ulong, c_ulonglong, c_int, c_void_p, c_char_p = (
    ctypes.c_ulong,
    ctypes.c_ulonglong,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_char_p,
)


class _IoChannel(ctypes.Structure):
    """struct struct_io_channel (lib/ext2fs/ext2_io.h)"""

    _fields_ = [
        ("magic", errcode_t),
        ("manager", c_void_p),
        ("name", c_char_p),
        ("block_size", c_int),
        ("read_error", c_void_p),
        ("write_error", c_void_p),
        ("refcount", c_int),
        ("flags", ctypes.c_uint),
        ("reserved", ctypes.c_long * 14),
        ("private_data", c_void_p),
        ("app_data", c_void_p),
        ("align", c_int),
    ]


_OPEN = ctypes.CFUNCTYPE(errcode_t, c_char_p, c_int, ctypes.POINTER(ctypes.POINTER(_IoChannel)))
_CLOSE = ctypes.CFUNCTYPE(errcode_t, c_void_p)
_SET_BLKSIZE = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_int)
_RW_BLK = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_ulong, c_int, c_void_p)
_FLUSH = ctypes.CFUNCTYPE(errcode_t, c_void_p)
_WRITE_BYTE = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_ulong, c_int, c_void_p)
_SET_OPTION = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_char_p, c_char_p)
_RW_BLK64 = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_ulonglong, c_int, c_void_p)
_RANGE64 = ctypes.CFUNCTYPE(errcode_t, c_void_p, c_ulonglong, c_ulonglong)


class _IoManager(ctypes.Structure):
    """struct struct_io_manager (lib/ext2fs/ext2_io.h)"""

    _fields_ = [
        ("magic", errcode_t),
        ("name", c_char_p),
        ("open", _OPEN),
        ("close", _CLOSE),
        ("set_blksize", _SET_BLKSIZE),
        ("read_blk", _RW_BLK),
        ("write_blk", _RW_BLK),
        ("flush", _FLUSH),
        ("write_byte", _WRITE_BYTE),
        ("set_option", _SET_OPTION),
        ("get_stats", c_void_p),
        ("read_blk64", _RW_BLK64),
        ("write_blk64", _RW_BLK64),
        ("discard", _RANGE64),
        ("cache_readahead", _RANGE64),
        ("zeroout", _RANGE64),
        ("reserved", ctypes.c_long * 14),
    ]


class _Extent(ctypes.Structure):
    """struct ext2fs_extent (lib/ext2fs/ext2fs.h)"""

    _fields_ = [
        ("e_pblk", ctypes.c_uint64),
        ("e_lblk", ctypes.c_uint64),
        ("e_len", ctypes.c_uint32),
        ("e_flags", ctypes.c_uint32),
    ]


_DIR_ITER = ctypes.CFUNCTYPE(
    c_int, ctypes.c_uint32, c_int, c_void_p, c_int, c_int, c_void_p, c_void_p
)


class _Lib:
    """The libext2fs functions obd calls, with their C signatures."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("ext2fs") or "libext2fs.so.2"
        try:
            lib = ctypes.CDLL(name)
            com_err = ctypes.CDLL(ctypes.util.find_library("com_err") or "libcom_err.so.2")
        except OSError as e:
            raise UnsupportedError(
                f"libext2fs is not installed ({e}); install e2fsprogs' libext2fs2"
            ) from None
        self.lib = lib
        lib.initialize_ext2_error_table()
        self.error_message = com_err.error_message
        self.error_message.restype = c_char_p
        self.error_message.argtypes = [errcode_t]
        P = c_void_p
        U32 = ctypes.c_uint32
        sig: dict[str, tuple[Any, list[Any]]] = {
            "ext2fs_open2": (errcode_t, [c_char_p, c_char_p, c_int, c_int, ctypes.c_uint, P, P]),
            "ext2fs_close2": (errcode_t, [P, c_int]),
            "ext2fs_free": (None, [P]),
            "ext2fs_read_bitmaps": (errcode_t, [P]),
            "ext2fs_new_inode": (errcode_t, [P, U32, c_int, P, P]),
            "ext2fs_inode_alloc_stats2": (None, [P, U32, c_int, c_int]),
            "ext2fs_read_inode_full": (errcode_t, [P, U32, P, c_int]),
            "ext2fs_write_inode_full": (errcode_t, [P, U32, P, c_int]),
            "ext2fs_link": (errcode_t, [P, U32, c_char_p, U32, c_int]),
            "ext2fs_unlink": (errcode_t, [P, U32, c_char_p, U32, c_int]),
            "ext2fs_mkdir": (errcode_t, [P, U32, U32, c_char_p]),
            "ext2fs_symlink": (errcode_t, [P, U32, U32, c_char_p, c_char_p]),
            "ext2fs_expand_dir": (errcode_t, [P, U32]),
            "ext2fs_dir_iterate2": (errcode_t, [P, U32, c_int, P, _DIR_ITER, P]),
            "ext2fs_file_open2": (errcode_t, [P, U32, P, c_int, P]),
            "ext2fs_file_write": (errcode_t, [P, P, ctypes.c_uint, P]),
            "ext2fs_file_read": (errcode_t, [P, P, ctypes.c_uint, P]),
            "ext2fs_file_llseek": (errcode_t, [P, ctypes.c_uint64, c_int, P]),
            "ext2fs_file_close": (errcode_t, [P]),
            "ext2fs_punch": (errcode_t, [P, U32, P, P, ctypes.c_uint64, ctypes.c_uint64]),
            "ext2fs_inode_has_valid_blocks2": (c_int, [P, P]),
            "ext2fs_free_ext_attr": (errcode_t, [P, U32, P]),
            "ext2fs_xattrs_open": (errcode_t, [P, U32, P]),
            "ext2fs_xattrs_read": (errcode_t, [P]),
            "ext2fs_xattr_set": (errcode_t, [P, c_char_p, P, ctypes.c_size_t]),
            "ext2fs_xattrs_close": (errcode_t, [P]),
            "ext2fs_xattrs_iterate": (errcode_t, [P, P, P]),
            "ext2fs_fallocate": (
                errcode_t,
                [P, c_int, U32, P, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64],
            ),
            "ext2fs_extent_open2": (errcode_t, [P, U32, P, P]),
            "ext2fs_extent_goto": (errcode_t, [P, ctypes.c_uint64]),
            "ext2fs_extent_get": (errcode_t, [P, c_int, P]),
            "ext2fs_extent_free": (None, [P]),
            "ext2fs_alloc_range": (errcode_t, [P, c_int, ctypes.c_uint64, U32, P]),
            "ext2fs_bmap2": (errcode_t, [P, U32, P, P, c_int, ctypes.c_uint64, P, P]),
        }
        for fname, (res, args) in sig.items():
            f = getattr(lib, fname)
            f.restype = res
            f.argtypes = args
        self.ext2fs_free_mem = lib.ext2fs_free_mem if hasattr(lib, "ext2fs_free_mem") else None

    def message(self, code: int) -> str:
        m = self.error_message(code)
        return m.decode("utf-8", "replace") if m else f"error {code}"


_lib: _Lib | None = None


def lib() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


CACHE_BLOCKS = 16384  # write-back cache: at most this many blocks (64 MiB of 4 KiB)
RUN_BYTES = 4 << 20


class _Channel:
    """One open io_channel over a ReadAt/BlockDevice, with a write-back block cache."""

    def __init__(self, dev: ReadAt, writable: bool) -> None:
        self.dev = dev
        self.writable = writable
        self.bs = 1024
        self.cache: dict[int, bytes] = {}
        self.dirty: set[int] = set()
        self.error: BaseException | None = None
        self.struct: _IoChannel | None = None
        self.reads = self.writes = 0
        self.data: _DataWriter | None = None

    def check_writable(self) -> None:
        if not self.writable:
            raise ObdError("write to a read-only ext4 filesystem")

    def _sync_data(self, offset: int, length: int) -> None:
        """File data written past the cache goes out before a cached access to its range."""
        d = self.data
        if d is not None and d.length and d.start < offset + length < d.start + d.length + length:
            d.flush()

    # block cache -------------------------------------------------------------------
    def set_bs(self, bs: int) -> None:
        if bs != self.bs:
            self.write_back()
            self.cache.clear()
            self.bs = bs

    def _dev_read(self, offset: int, length: int) -> bytes:
        data = self.dev.pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        self.reads += 1
        return data

    def read(self, block: int, count: int) -> bytes:
        bs = self.bs
        n = count * bs if count > 0 else -count
        self._sync_data(block * bs, n)
        if count == 1:
            b = self.cache.get(block)
            if b is None:
                b = self._dev_read(block * bs, bs)
                self._put(block, b, dirty=False)
            return b
        nblocks = -(-n // bs)
        data = bytearray(self._dev_read(block * bs, nblocks * bs))
        if self.dirty:
            for i in range(nblocks):
                if block + i in self.dirty:
                    data[i * bs : (i + 1) * bs] = self.cache[block + i]
        return bytes(data[:n])

    def write(self, block: int, count: int, data: bytes) -> None:
        bs = self.bs
        n = len(data)
        self._sync_data(block * bs, n)
        if n % bs:
            nblocks = -(-n // bs)
            whole = bytearray(self.read(block, nblocks))
            whole[:n] = data
            data = bytes(whole)
            n = len(data)
        if n == bs:
            self._put(block, data, dirty=True)
            return
        for i in range(n // bs):
            self._put(block + i, data[i * bs : (i + 1) * bs], dirty=True)

    def write_bytes(self, offset: int, data: bytes) -> None:
        bs = self.bs
        first = offset // bs
        last = (offset + len(data) - 1) // bs
        whole = bytearray(self.read(first, last - first + 1))
        s = offset - first * bs
        whole[s : s + len(data)] = data
        self.write(first, last - first + 1, bytes(whole))

    def _put(self, block: int, data: bytes, *, dirty: bool) -> None:
        if len(self.cache) >= CACHE_BLOCKS and block not in self.cache:
            self.write_back()
            self.cache.clear()
        self.cache[block] = data
        if dirty:
            self.dirty.add(block)

    def write_back(self) -> None:
        if self.data is not None:
            self.data.flush()
        if not self.dirty:
            return
        bs = self.bs
        blocks = sorted(self.dirty)
        per_run = RUN_BYTES // bs
        start = 0
        while start < len(blocks):
            end = start + 1
            while (
                end < len(blocks) and blocks[end] == blocks[end - 1] + 1 and end - start < per_run
            ):
                end += 1
            first = blocks[start]
            buf = b"".join(self.cache[b] for b in blocks[start:end])
            self.dev.pwrite(first * bs, buf)  # type: ignore[attr-defined]
            self.writes += 1
            start = end
        self.dirty.clear()


class _DataWriter:
    """File data goes straight to the device, past the block cache, gathered into
    contiguous runs (files written one after another get neighbouring blocks)."""

    def __init__(self, dev: Any, channel: _Channel) -> None:
        self.dev = dev
        self.channel = channel
        self.start = 0
        self.length = 0
        self.parts: list[bytes] = []

    def put(self, offset: int, data: bytes, pad: int = 0) -> None:
        """``data`` and ``pad`` zero bytes at ``offset`` (block aligned, whole blocks)."""
        ch = self.channel
        bs = ch.bs
        n = len(data) + pad
        if ch.cache:
            for b in range(offset // bs, (offset + n) // bs):
                if ch.cache.pop(b, None) is not None:
                    ch.dirty.discard(b)
        if self.length and (offset != self.start + self.length or self.length + n > RUN_BYTES):
            self.flush()
        if not self.length:
            self.start = offset
        self.parts.append(data)
        if pad:
            self.parts.append(bytes(pad))
        self.length += n

    def flush(self) -> None:
        if not self.length:
            return
        buf = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts = []
        start, self.length = self.start, 0
        self.dev.pwrite(start, buf)
        self.channel.writes += 1


def _guarded(code: int) -> Callable[[Callable[..., None]], Callable[..., int]]:
    """A channel callback: the channel found from its address; a Python error is kept on
    the channel (raised again when libext2fs returns) and libext2fs gets ``code``."""

    def wrap(fn: Callable[..., None]) -> Callable[..., int]:
        def callback(self: _Manager, p: int, *args: Any) -> int:
            ch = self.open_channels[p]
            try:
                fn(self, ch, *args)
            except BaseException as e:
                ch.error = e
                return code
            return 0

        return callback

    return wrap


class _Manager:
    """The ctypes io_manager: ``ext2fs_open2("obd:N")`` finds channel N in ``pending``."""

    def __init__(self) -> None:
        self.pending: dict[bytes, _Channel] = {}
        self.open_channels: dict[int, _Channel] = {}
        self._ids = itertools.count(1)
        m = _IoManager()
        m.magic = ET_MAGIC_IO_MANAGER
        m.name = b"obd I/O manager"
        m.open = _OPEN(self._open)
        m.close = _CLOSE(self._close)
        m.set_blksize = _SET_BLKSIZE(self._set_blksize)
        m.read_blk = _RW_BLK(self._read)
        m.write_blk = _RW_BLK(self._write)
        m.flush = _FLUSH(self._flush)
        m.write_byte = _WRITE_BYTE(self._write_byte)
        m.set_option = _SET_OPTION(self._set_option)
        m.read_blk64 = _RW_BLK64(self._read)
        m.write_blk64 = _RW_BLK64(self._write)
        m.discard = _RANGE64(self._unimplemented)
        m.cache_readahead = _RANGE64(self._unimplemented)
        m.zeroout = _RANGE64(self._unimplemented)
        self.struct = m

    def register(self, ch: _Channel) -> bytes:
        name = b"obd:%d" % next(self._ids)
        self.pending[name] = ch
        return name

    def _ch(self, p: int) -> _Channel:
        return self.open_channels[p]

    def _open(self, name: bytes, flags: int, out: Any) -> int:
        ch = self.pending.pop(name, None)
        if ch is None:
            return ET_MAGIC_IO_CHANNEL
        s = _IoChannel()
        s.magic = ET_MAGIC_IO_CHANNEL
        s.manager = ctypes.addressof(self.struct)
        s.name = name
        s.block_size = 1024
        s.refcount = 1
        ch.struct = s
        self.open_channels[ctypes.addressof(s)] = ch
        out[0] = ctypes.pointer(s)
        return 0

    def _close(self, p: Any) -> int:
        ch = self._ch(p)
        s = ch.struct
        assert s is not None
        s.refcount -= 1
        if s.refcount > 0:
            return 0
        try:
            ch.write_back()
        except BaseException as e:
            ch.error = e
            return ET_SHORT_WRITE
        finally:
            self.open_channels.pop(ctypes.addressof(s), None)
        return 0

    @_guarded(ET_SHORT_WRITE)
    def _set_blksize(self, ch: _Channel, bs: int) -> None:
        ch.set_bs(bs)
        assert ch.struct is not None
        ch.struct.block_size = bs

    @_guarded(ET_SHORT_READ)
    def _read(self, ch: _Channel, block: int, count: int, data: int) -> None:
        buf = ch.read(block, count)
        ctypes.memmove(data, buf, len(buf))

    @_guarded(ET_SHORT_WRITE)
    def _write(self, ch: _Channel, block: int, count: int, data: int) -> None:
        ch.check_writable()
        ch.write(block, count, ctypes.string_at(data, count * ch.bs if count > 0 else -count))

    @_guarded(ET_SHORT_WRITE)
    def _write_byte(self, ch: _Channel, offset: int, count: int, data: int) -> None:
        ch.check_writable()
        ch.write_bytes(offset, ctypes.string_at(data, count))

    @_guarded(ET_SHORT_WRITE)
    def _flush(self, ch: _Channel) -> None:
        ch.write_back()

    def _set_option(self, p: Any, option: bytes, arg: bytes) -> int:
        return ET_UNIMPLEMENTED

    def _unimplemented(self, p: Any, a: int, b: int) -> int:
        return ET_UNIMPLEMENTED


_manager: _Manager | None = None


def manager() -> _Manager:
    global _manager
    if _manager is None:
        lib()
        _manager = _Manager()
    return _manager


@dataclass(frozen=True, slots=True)
class Stat:
    """What ``obd ls`` shows of an inode."""

    ino: int
    kind: Kind
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    links: int
    mtime_ns: int
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True, slots=True)
class Superblock:
    inode_size: int
    block_size: int
    feature_incompat: int
    feature_ro_compat: int
    blocks: int
    free_blocks: int


def read_superblock(dev: ReadAt, name: str) -> Superblock:
    raw = dev.pread(SUPERBLOCK_OFFSET, 1024)
    if len(raw) < 1024 or struct.unpack_from("<H", raw, 56)[0] != EXT2_MAGIC:
        raise UnsupportedError("holds no ext4 filesystem (no ext2/3/4 superblock)", path=name)
    blocks_lo, _, free_lo = struct.unpack_from("<III", raw, 4)
    log_bs = struct.unpack_from("<I", raw, 24)[0]
    rev = struct.unpack_from("<I", raw, 76)[0]
    isz = struct.unpack_from("<H", raw, 88)[0] if rev >= 1 else 128
    incompat, ro_compat = struct.unpack_from("<II", raw, 96)
    blocks_hi, _, free_hi = struct.unpack_from("<III", raw, 0x150)
    return Superblock(
        inode_size=isz,
        block_size=1024 << log_bs,
        feature_incompat=incompat,
        feature_ro_compat=ro_compat,
        blocks=blocks_lo | (blocks_hi << 32 if incompat & 0x80 else 0),
        free_blocks=free_lo | (free_hi << 32 if incompat & 0x80 else 0),
    )


def _encode_time(ns: int) -> tuple[int, int]:
    """(seconds field, extra field) of an ext4 timestamp (nsec << 2 | epoch bits)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    lo = sec & 0xFFFFFFFF
    signed_lo = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((sec - signed_lo) >> 32) & 3
    return lo, (nsec << 2) | epoch


def _decode_time(lo: int, extra: int | None) -> int:
    sec = lo - (1 << 32) if lo & 0x80000000 else lo
    nsec = 0
    if extra is not None:
        sec += (extra & 3) << 32
        nsec = extra >> 2
    return sec * 1_000_000_000 + nsec


class Ext4:
    """An ext4 filesystem on ``dev`` (a ReadAt; a BlockDevice when ``writable``).

    Implements :class:`obd.oci.layer.Target` for :func:`obd.oci.layer.apply_ops`, and
    the reads ``obd ls`` / ``obd cat`` need. Use as a context manager; leaving it
    writes the filesystem's metadata and the cached blocks to ``dev`` (``dev.flush()``
    is the caller's).
    """

    def __init__(self, dev: ReadAt, *, writable: bool = False, name: str = "image") -> None:
        self.L = lib()
        self.name = name
        self.dev = dev
        self.sb = read_superblock(dev, name)
        if self.sb.feature_incompat & INCOMPAT_RECOVER:
            raise UnsupportedError(
                "the ext4 journal needs recovery (mount it once, or e2fsck it)", path=name
            )
        if self.sb.feature_incompat & INCOMPAT_JOURNAL_DEV:
            raise UnsupportedError("is an ext4 external journal, not a filesystem", path=name)
        self.isz = min(self.sb.inode_size, 256)
        self.extents = bool(self.sb.feature_incompat & INCOMPAT_EXTENTS)
        # small files get one contiguous extent of their own (not with bigalloc clusters)
        self.one_extent = self.extents and not self.sb.feature_ro_compat & RO_COMPAT_BIGALLOC
        self._goal = 0  # where the next small file's blocks are looked for
        self.channel = _Channel(dev, writable)
        if writable:
            self.channel.data = _DataWriter(dev, self.channel)
        self.writable = writable
        m = manager()
        chname = m.register(self.channel)
        fs = c_void_p()
        flags = FLAG_64BITS | (FLAG_RW if writable else 0)
        err = self.L.lib.ext2fs_open2(
            chname, None, flags, 0, 0, ctypes.addressof(m.struct), ctypes.byref(fs)
        )
        m.pending.pop(chname, None)
        if err:
            self._raise_pending()
            raise UnsupportedError(
                f"cannot open its ext4 filesystem: {self.L.message(err)}", path=name
            )
        self.fs: ctypes.c_void_p | None = fs
        self._dirs: dict[int, dict[bytes, tuple[int, int]]] = {}
        self.now = int(time.time())
        # a new inode before its metadata: one link, extra fields sized, created now
        self._template = bytearray(self.isz)
        struct.pack_into("<H", self._template, I_LINKS, 1)
        if self.isz > 128:
            struct.pack_into("<H", self._template, I_EXTRA_ISIZE, EXTRA_ISIZE)
            struct.pack_into("<I", self._template, I_CRTIME, self.now)
        self._dir_paths: dict[str, int] = {}  # resolved directory paths; cleared on removals
        # folders' last block and last entry, for _append (not with block checksums)
        self._tails: dict[int, tuple[int, int]] = {}
        self.append_dirents = bool(
            self.sb.feature_incompat & INCOMPAT_FILETYPE
            and not self.sb.feature_ro_compat & RO_COMPAT_METADATA_CSUM
        )
        try:
            self._check(self.L.lib.ext2fs_read_bitmaps(fs), "reading the bitmaps")
        except BaseException:
            self.L.lib.ext2fs_free(fs)
            raise

    # plumbing ---------------------------------------------------------------------------
    def __enter__(self) -> Ext4:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(discard=exc_type is not None)

    def close(self, *, discard: bool = False) -> None:
        """Write the metadata back (unless ``discard``) and release the filesystem."""
        if self.fs is None:
            return
        fs, self.fs = self.fs, None
        if discard or not self.writable:
            # nothing more reaches the device: ext2fs_free releases without writing
            self.channel.dirty.clear()
            self.channel.data = None
            self.channel.writable = False
            self.L.lib.ext2fs_free(fs)
            return
        err = self.L.lib.ext2fs_close2(fs, 0)  # frees fs on success only
        if err:
            self.L.lib.ext2fs_free(fs)
        self._check(err, "writing the filesystem metadata")

    def _raise_pending(self) -> None:
        e = self.channel.error
        if e is not None:
            self.channel.error = None
            raise e

    def _check(self, err: int, what: str) -> None:
        if not err:
            return
        self._raise_pending()
        msg = self.L.message(err)
        if err in FULL_ERRORS:
            raise ObdError(
                f"the ext4 filesystem is full ({msg}) while {what}; make the image larger",
                path=self.name,
            )
        raise CorruptError(f"ext4: {msg} while {what}", path=self.name)

    # inodes --------------------------------------------------------------------------
    def read_inode(self, ino: int) -> bytearray:
        buf = bytearray(self.isz)
        cbuf = (ctypes.c_char * self.isz).from_buffer(buf)
        self._check(
            self.L.lib.ext2fs_read_inode_full(self.fs, ino, cbuf, self.isz),
            f"reading inode {ino}",
        )
        return buf

    def write_inode(self, ino: int, buf: bytearray) -> None:
        cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
        self._check(
            self.L.lib.ext2fs_write_inode_full(self.fs, ino, cbuf, len(buf)),
            f"writing inode {ino}",
        )

    def _large(self, buf: bytearray) -> bool:
        return len(buf) > 128 and struct.unpack_from("<H", buf, I_EXTRA_ISIZE)[0] >= 16

    def stat_inode(self, ino: int) -> Stat:
        b = self.read_inode(ino)
        mode, uid_lo, size_lo = struct.unpack_from("<HHI", b, I_MODE)
        gid_lo, links = struct.unpack_from("<HH", b, I_GID)
        size_hi = struct.unpack_from("<I", b, I_SIZE_HIGH)[0]
        uid_hi, gid_hi = struct.unpack_from("<HH", b, I_UID_HIGH)
        mtime = struct.unpack_from("<I", b, I_MTIME)[0]
        extra = struct.unpack_from("<I", b, I_MTIME_EXTRA)[0] if self._large(b) else None
        kind = KIND_OF_MODE.get(stat.S_IFMT(mode), Kind.REG)
        major = minor = 0
        if kind in (Kind.CHAR, Kind.BLOCK):
            b0, b1 = struct.unpack_from("<II", b, I_BLOCK)
            if b0:
                major, minor = (b0 >> 8) & 0xFF, b0 & 0xFF
            else:
                major, minor = (b1 & 0xFFF00) >> 8, (b1 & 0xFF) | ((b1 >> 12) & 0xFFF00)
        return Stat(
            ino=ino,
            kind=kind,
            mode=stat.S_IMODE(mode),
            uid=uid_lo | uid_hi << 16,
            gid=gid_lo | gid_hi << 16,
            size=size_lo | size_hi << 32,
            links=links,
            mtime_ns=_decode_time(mtime, extra),
            devmajor=major,
            devminor=minor,
        )

    def _set_meta(self, b: bytearray, e: Entry, kind: Kind) -> None:
        perm = 0o777 if kind is Kind.SYMLINK else e.mode & 0o7777
        lo, extra = _encode_time(e.mtime_ns)
        struct.pack_into("<HH", b, I_MODE, S_IF[kind] | perm, e.uid & 0xFFFF)
        struct.pack_into("<III", b, I_ATIME, lo, lo, lo)  # i_atime, i_ctime, i_mtime
        struct.pack_into("<H", b, I_GID, e.gid & 0xFFFF)
        struct.pack_into("<HH", b, I_UID_HIGH, (e.uid >> 16) & 0xFFFF, (e.gid >> 16) & 0xFFFF)
        if self._large(b):
            struct.pack_into("<III", b, I_CTIME_EXTRA, extra, extra, extra)

    def _new_inode_buf(self, e: Entry, kind: Kind) -> bytearray:
        b = bytearray(self._template)
        self._set_meta(b, e, kind)
        return b

    def _alloc_inode(self, parent: int, kind: Kind) -> int:
        ino = ctypes.c_uint32()
        self._check(
            self.L.lib.ext2fs_new_inode(
                self.fs, parent, S_IF[kind] | 0o755, None, ctypes.byref(ino)
            ),
            "allocating an inode",
        )
        return ino.value

    # directories --------------------------------------------------------------------
    def _listing(self, dino: int) -> dict[bytes, tuple[int, int]]:
        d = self._dirs.get(dino)
        if d is not None:
            return d
        d = {}

        def cb(_dir: int, _entry: int, dirent: int, _off: int, _bs: int, _buf: int, _p: int) -> int:
            ino, _rec, name_len = struct.unpack("<IHH", ctypes.string_at(dirent, 8))
            n = name_len & 0xFF
            name = ctypes.string_at(dirent + 8, n)
            if ino and name not in (b".", b".."):
                d[name] = (ino, name_len >> 8)
            return 0

        self._check(
            self.L.lib.ext2fs_dir_iterate2(self.fs, dino, 0, None, _DIR_ITER(cb), None),
            f"reading directory inode {dino}",
        )
        self._dirs[dino] = d
        return d

    def _kind_of_dirent(self, ino: int, ft: int) -> Kind:
        k = KIND_OF_FT.get(ft)
        if k is None:
            k = self.stat_inode(ino).kind
        return k

    def _readlink_ino(self, ino: int) -> bytes:
        st = self.stat_inode(ino)
        b = self.read_inode(ino)
        if (
            st.size < 60
            and not struct.unpack_from("<I", b, I_BLOCKS)[0]
            and not (struct.unpack_from("<I", b, I_FLAGS)[0] & INLINE_DATA_FL)
        ):
            return bytes(b[I_BLOCK : I_BLOCK + st.size])
        return self._read_all(ino, st.size)

    def _lookup_dir(self, path: str, *, depth: int = 0) -> int:
        """The inode of directory ``path``, following symlinks (within this filesystem)."""
        ino = self._dir_paths.get(path)
        if ino is not None:
            return ino
        if not path:
            return ROOT_INO
        ino = self._walk(path, depth)
        self._dir_paths[path] = ino
        return ino

    def _walk(self, path: str, depth: int) -> int:
        ino = ROOT_INO
        parts = path.split("/")
        for i, part in enumerate(parts):
            ent = self._listing(ino).get(part.encode("utf-8", "surrogateescape"))
            done = "/".join(parts[: i + 1])
            if ent is None:
                raise FileNotFoundError(done)
            cino, ft = ent
            kind = self._kind_of_dirent(cino, ft)
            if kind is Kind.SYMLINK:
                if depth > 40:
                    raise CorruptError(f"{done}: too many levels of symlinks", path=self.name)
                target = self._readlink_ino(cino).decode("utf-8", "surrogateescape")
                base = "" if target.startswith("/") else parent_of(done)
                from obd.oci.layer import normalize

                cino = self._lookup_dir(normalize(join(base, target)), depth=depth + 1)
            elif kind is not Kind.DIR:
                raise NotADirectoryError(done)
            ino = cino
        return ino

    def _parent(self, path: str) -> tuple[int, bytes]:
        try:
            return self._lookup_dir(parent_of(path)), path.rsplit("/", 1)[-1].encode(
                "utf-8", "surrogateescape"
            )
        except FileNotFoundError as e:
            raise CorruptError(f"{path}: parent {e} does not exist", path=self.name) from None
        except NotADirectoryError as e:
            raise CorruptError(f"{path}: parent {e} is not a directory", path=self.name) from None

    def _entry(self, path: str) -> tuple[int, bytes, int, int] | None:
        """(parent inode, name, inode, dirent file type) of ``path``, or ``None``."""
        if not path:
            return ROOT_INO, b".", ROOT_INO, FT[Kind.DIR]
        try:
            pino = self._lookup_dir(parent_of(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        name = path.rsplit("/", 1)[-1].encode("utf-8", "surrogateescape")
        ent = self._listing(pino).get(name)
        if ent is None:
            return None
        return pino, name, ent[0], ent[1]

    def _link(self, parent: int, name: bytes, ino: int, kind: Kind) -> None:
        if len(name) > 255:
            raise CorruptError(
                f"a name of {len(name)} bytes (ext4 takes 255): {name[:40]!r}...", path=self.name
            )
        if not (self.append_dirents and self._append(parent, name, ino, FT[kind])):
            self._tails.pop(parent, None)
            for _ in range(2):
                err = self.L.lib.ext2fs_link(self.fs, parent, name, ino, FT[kind])
                if err != ET_DIR_NO_SPACE:
                    break
                self._check(self.L.lib.ext2fs_expand_dir(self.fs, parent), "growing a directory")
            self._check(err, f"linking {name!r}")
        self._listing(parent)[name] = (ino, FT[kind])

    def _append(self, dino: int, name: bytes, ino: int, ft: int) -> bool:
        """Add an entry after the last one of folder ``dino``'s last block (a new block
        when it is full): what ext2fs_link finds after scanning every block, which makes
        filling a folder of N names O(N^2). Only for linear folders with file types and
        no block checksums; False: use ext2fs_link."""
        need = (8 + len(name) + 3) & ~3
        for grown in (False, True):
            tail = self._tails.get(dino) or self._load_tail(dino)
            if tail is None:
                return False
            pblk, last = tail
            blk = bytearray(self.channel.read(pblk, 1))
            lino, rec, nlen = struct.unpack_from("<IHB", blk, last)
            used = (8 + nlen + 3) & ~3 if lino else 0
            if rec - used >= need:
                if used:
                    struct.pack_into("<H", blk, last + 4, used)
                at = last + used
                struct.pack_into("<IHBB", blk, at, ino, rec - used, len(name), ft)
                blk[at + 8 : at + 8 + len(name)] = name
                self.channel.write(pblk, 1, bytes(blk))
                self._tails[dino] = (pblk, at)
                return True
            if grown:
                return False
            self._tails.pop(dino, None)
            self._check(self.L.lib.ext2fs_expand_dir(self.fs, dino), "growing a directory")
        return False

    def _load_tail(self, dino: int) -> tuple[int, int] | None:
        """(physical block, offset of the last entry) of folder ``dino``'s last block."""
        b = self.read_inode(dino)
        if struct.unpack_from("<I", b, I_FLAGS)[0] & (INDEX_FL | INLINE_DATA_FL):
            return None
        bs = self.sb.block_size
        size = (
            struct.unpack_from("<I", b, I_SIZE)[0]
            | struct.unpack_from("<I", b, I_SIZE_HIGH)[0] << 32
        )
        if not size or size % bs:
            return None
        pblk = ctypes.c_uint64()
        err = self.L.lib.ext2fs_bmap2(
            self.fs, dino, None, None, 0, size // bs - 1, None, ctypes.byref(pblk)
        )
        if err or not pblk.value:
            return None
        blk = self.channel.read(pblk.value, 1)
        off = 0
        while True:
            rec = struct.unpack_from("<H", blk, off + 4)[0]
            if rec < 12 or rec % 4 or off + rec > bs:
                return None  # not a plain block (a checksum tail, damage): leave it to libext2fs
            if off + rec == bs:
                break
            off += rec
        self._tails[dino] = (pblk.value, off)
        return pblk.value, off

    # Target: reads --------------------------------------------------------------------
    def kind_of(self, path: str) -> Kind | None:
        if not path:
            return Kind.DIR
        parent, _, name = path.rpartition("/")
        try:
            pino = self._lookup_dir(parent)
        except FileNotFoundError:
            return None
        except NotADirectoryError as e:
            raise CorruptError(f"{path}: parent {e} is not a directory", path=self.name) from None
        ent = self._listing(pino).get(name.encode("utf-8", "surrogateescape"))
        if ent is None:
            return None
        k = KIND_OF_FT.get(ent[1])
        return k if k is not None else self.stat_inode(ent[0]).kind

    def children(self, path: str) -> list[str]:
        """The names in folder ``path`` (the root's lost+found is the filesystem's own:
        an opaque root does not remove it)."""
        ino = self._lookup_dir(path)
        names = [n.decode("utf-8", "surrogateescape") for n in self._listing(ino)]
        return [n for n in names if n != "lost+found"] if not path else names

    # Target: writes -------------------------------------------------------------------
    def remove(self, path: str) -> None:
        ent = self._entry(path)
        if ent is None:
            return
        pino, name, ino, ft = ent
        self._remove_entry(pino, name, ino, self._kind_of_dirent(ino, ft))

    def _remove_entry(self, pino: int, name: bytes, ino: int, kind: Kind) -> None:
        self._dir_paths.clear()
        if kind is Kind.DIR:
            for cname, (cino, cft) in list(self._listing(ino).items()):
                self._remove_entry(ino, cname, cino, self._kind_of_dirent(cino, cft))
        self._check(self.L.lib.ext2fs_unlink(self.fs, pino, name, ino, 0), f"unlinking {name!r}")
        self._tails.pop(pino, None)
        self._tails.pop(ino, None)
        self._listing(pino).pop(name, None)
        if kind is Kind.DIR:
            self._dirs.pop(ino, None)
            pb = self.read_inode(pino)
            links = struct.unpack_from("<H", pb, I_LINKS)[0]
            if links > 2:
                struct.pack_into("<H", pb, I_LINKS, links - 1)
                self.write_inode(pino, pb)
            self._free_inode(ino, is_dir=True)
            return
        b = self.read_inode(ino)
        links = struct.unpack_from("<H", b, I_LINKS)[0]
        if links > 1:
            struct.pack_into("<H", b, I_LINKS, links - 1)
            self.write_inode(ino, b)
            return
        self._free_inode(ino, is_dir=False)

    def _free_inode(self, ino: int, *, is_dir: bool) -> None:
        b = self.read_inode(ino)
        cb = (ctypes.c_char * len(b)).from_buffer(b)
        if self.L.lib.ext2fs_inode_has_valid_blocks2(self.fs, cb):
            self._check(
                self.L.lib.ext2fs_punch(self.fs, ino, cb, None, 0, 0xFFFFFFFFFFFFFFFF),
                f"freeing the blocks of inode {ino}",
            )
        if struct.unpack_from("<I", b, I_FILE_ACL)[0] or struct.unpack_from("<H", b, 0x76)[0]:
            big = bytearray(max(len(b), LARGE_INODE))
            big[: len(b)] = b
            cbig = (ctypes.c_char * len(big)).from_buffer(big)
            self._check(
                self.L.lib.ext2fs_free_ext_attr(self.fs, ino, cbig),
                f"freeing the xattr block of inode {ino}",
            )
            b[:] = big[: len(b)]
        struct.pack_into("<H", b, I_LINKS, 0)
        struct.pack_into("<I", b, I_DTIME, self.now)
        self.write_inode(ino, b)
        self.L.lib.ext2fs_inode_alloc_stats2(self.fs, ino, -1, int(is_dir))

    def create(self, entry: Entry, data: IO[bytes] | None) -> None:
        pino, name = self._parent(entry.path)
        kind = entry.kind
        if kind is Kind.DIR:
            ino = self._alloc_inode(pino, kind)
            plinks = struct.unpack_from("<H", self.read_inode(pino), I_LINKS)[0]
            # no name: libext2fs would look it up and link it by scanning the folder
            self._check(
                self.L.lib.ext2fs_mkdir(self.fs, pino, ino, None), f"making folder {entry.path}"
            )
            self._link(pino, name, ino, kind)
            if plinks == 1 or plinks >= DIR_LINK_MAX:
                # dir_nlink: past 65000 subfolders a folder's link count stays 1, as the
                # kernel keeps it (ext2fs_mkdir would count on and wrap)
                pb = self.read_inode(pino)
                struct.pack_into("<H", pb, I_LINKS, 1)
                self.write_inode(pino, pb)
            self._dirs[ino] = {}
            b = self.read_inode(ino)
            self._set_meta(b, entry, kind)
            self.write_inode(ino, b)
        elif kind is Kind.SYMLINK:
            ino = self._alloc_inode(pino, kind)
            target = entry.linkname.encode("utf-8", "surrogateescape")
            if not target or len(target) >= self.sb.block_size:
                raise CorruptError(
                    f"symlink {entry.path}: target of {len(target)} bytes", path=self.name
                )
            self._check(
                self.L.lib.ext2fs_symlink(self.fs, pino, ino, None, target),
                f"making symlink {entry.path}",
            )
            self._link(pino, name, ino, kind)
            b = self.read_inode(ino)
            self._set_meta(b, entry, kind)
            self.write_inode(ino, b)
        else:
            ino = self._alloc_inode(pino, kind)
            b = self._new_inode_buf(entry, kind)
            if kind is Kind.REG:
                struct.pack_into("<I", b, I_SIZE, entry.size & 0xFFFFFFFF)
                struct.pack_into("<I", b, I_SIZE_HIGH, entry.size >> 32)
                if self.extents:
                    struct.pack_into("<I", b, I_FLAGS, EXTENTS_FL)
                    # an empty extent tree header: magic, entries 0, max 4, depth 0
                    struct.pack_into("<HHHHI", b, I_BLOCK, 0xF30A, 0, 4, 0, 0)
            elif kind in (Kind.CHAR, Kind.BLOCK):
                major, minor = entry.devmajor, entry.devminor
                if major < 256 and minor < 256:
                    struct.pack_into("<II", b, I_BLOCK, major << 8 | minor, 0)
                else:
                    enc = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
                    struct.pack_into("<II", b, I_BLOCK, 0, enc & 0xFFFFFFFF)
            fast = kind is Kind.REG and self.extents
            if not fast:
                self.write_inode(ino, b)
            self.L.lib.ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0)
            self._link(pino, name, ino, kind)
            if fast:
                # one inode write, after the data: ext2fs_fallocate updates ``b`` in place
                if data is not None and entry.size:
                    if entry.size <= DATA_CHUNK and self.one_extent:
                        self._write_small(ino, b, data, entry.size, entry.path)
                    else:
                        self._write_extents(ino, b, data, entry.size, entry.path)
                self.write_inode(ino, b)
            elif kind is Kind.REG and data is not None and entry.size:
                self._write_data(ino, data, entry.size, entry.path)
        if entry.xattrs:
            self._set_xattrs(ino, entry.xattrs, entry.path)

    def _write_small(self, ino: int, b: bytearray, data: IO[bytes], size: int, path: str) -> None:
        """A file of at most DATA_CHUNK bytes: one contiguous run of blocks found from the
        end of the last one (ext2fs_alloc_range), one extent written into the inode."""
        chunk = data.read(size)
        if len(chunk) < size:
            raise CorruptError(f"{path}: the layer ends inside this file", path=self.name)
        bs = self.sb.block_size
        if size % bs == 0 and chunk == bytes(size):
            return  # a hole, as mke2fs -d makes
        nblk = -(-size // bs)
        ret = ctypes.c_uint64()
        self._check(
            self.L.lib.ext2fs_alloc_range(self.fs, 0, self._goal, nblk, ctypes.byref(ret)),
            f"allocating blocks for {path}",
        )
        pblk = ret.value
        self._goal = pblk + nblk
        # extent header (magic, 1 entry, max 4, depth 0) and the extent (ee_block 0,
        # ee_len, ee_start_hi, ee_start_lo)
        struct.pack_into("<HHHHI", b, I_BLOCK, 0xF30A, 1, 4, 0, 0)
        struct.pack_into("<IHHI", b, I_BLOCK + 12, 0, nblk, pblk >> 32, pblk & 0xFFFFFFFF)
        struct.pack_into("<I", b, I_BLOCKS, nblk * (bs // 512))
        writer = self.channel.data
        assert writer is not None
        writer.put(pblk * bs, chunk, nblk * bs - size)

    def _write_extents(self, ino: int, b: bytearray, data: IO[bytes], size: int, path: str) -> None:
        """A file's data: libext2fs allocates initialized extents (ext2fs_fallocate), the
        bytes go to the mapped blocks through the data writer; runs of whole zero blocks
        read in one chunk stay holes."""
        bs = self.sb.block_size
        cb = (ctypes.c_char * len(b)).from_buffer(b)
        lblk = 0
        left = size
        writer = self.channel.data
        assert writer is not None
        while left > 0:
            chunk = data.read(min(left, DATA_CHUNK))
            if not chunk:
                raise CorruptError(f"{path}: the layer ends inside this file", path=self.name)
            n = len(chunk)
            nblk = -(-n // bs)
            left -= n
            if n % bs == 0 and chunk == bytes(n):
                lblk += nblk
                continue
            self._check(
                self.L.lib.ext2fs_fallocate(
                    self.fs,
                    FALLOCATE_FORCE_INIT | FALLOCATE_INIT_BEYOND_EOF,
                    ino,
                    cb,
                    0xFFFFFFFFFFFFFFFF,
                    lblk,
                    nblk,
                ),
                f"allocating blocks for {path}",
            )
            if n % bs:
                chunk += bytes(nblk * bs - n)
            for l0, p0, cnt in self._mapping(ino, cb, lblk, nblk, path):
                off = (l0 - lblk) * bs
                writer.put(p0 * bs, chunk[off : off + cnt * bs] if cnt != nblk else chunk)
            lblk += nblk

    def _mapping(
        self, ino: int, cb: Any, start: int, count: int, path: str
    ) -> Iterator[tuple[int, int, int]]:
        """(logical, physical, blocks) runs mapping ``count`` blocks from ``start``."""
        h = c_void_p()
        self._check(
            self.L.lib.ext2fs_extent_open2(self.fs, ino, cb, ctypes.byref(h)),
            f"reading the extents of {path}",
        )
        ext = _Extent()
        end = start + count
        pos = start
        out: list[tuple[int, int, int]] = []
        try:
            self._check(self.L.lib.ext2fs_extent_goto(h, start), f"mapping {path}")
            err = self.L.lib.ext2fs_extent_get(h, EXTENT_CURRENT, ctypes.byref(ext))
            while not err and pos < end:
                e_end = ext.e_lblk + ext.e_len
                if ext.e_lblk <= pos < e_end:
                    if ext.e_flags & EXTENT_FLAGS_UNINIT:
                        break
                    k = min(e_end, end) - pos
                    out.append((pos, ext.e_pblk + (pos - ext.e_lblk), k))
                    pos += k
                elif ext.e_lblk > pos:
                    break
                err = self.L.lib.ext2fs_extent_get(h, EXTENT_NEXT_LEAF, ctypes.byref(ext))
        finally:
            self.L.lib.ext2fs_extent_free(h)
        if pos < end:
            raise CorruptError(
                f"{path}: blocks {pos}..{end - 1} were not allocated as asked", path=self.name
            )
        return iter(out)

    def _write_data(self, ino: int, data: IO[bytes], size: int, path: str) -> None:
        f = c_void_p()
        self._check(
            self.L.lib.ext2fs_file_open2(self.fs, ino, None, FILE_WRITE, ctypes.byref(f)),
            f"opening {path}",
        )
        written = ctypes.c_uint()
        try:
            left = size
            pos = 0
            hole = False
            bs = self.sb.block_size
            while left > 0:
                chunk = data.read(min(left, 1 << 20))
                if not chunk:
                    raise CorruptError(f"{path}: the layer ends inside this file", path=self.name)
                n = len(chunk)
                if n % bs == 0 and chunk == bytes(n):  # a hole, as mke2fs -d makes
                    pos += n
                    left -= n
                    hole = True
                    continue
                if hole:
                    self._check(
                        self.L.lib.ext2fs_file_llseek(f, pos, 0, None), f"seeking in {path}"
                    )
                    hole = False
                self._check(
                    self.L.lib.ext2fs_file_write(f, chunk, n, ctypes.byref(written)),
                    f"writing {path}",
                )
                if written.value != n:
                    self._check(ET_SHORT_WRITE, f"writing {path}")
                pos += n
                left -= n
        finally:
            err = self.L.lib.ext2fs_file_close(f)
        self._check(err, f"closing {path}")

    def _set_xattrs(self, ino: int, xattrs: tuple[tuple[str, bytes], ...], path: str) -> None:
        h = c_void_p()
        self._check(self.L.lib.ext2fs_xattrs_open(self.fs, ino, ctypes.byref(h)), "xattrs")
        try:
            self._check(self.L.lib.ext2fs_xattrs_read(h), f"reading the xattrs of {path}")
            for k, v in xattrs:
                err = self.L.lib.ext2fs_xattr_set(
                    h, k.encode("utf-8", "surrogateescape"), v, len(v)
                )
                if err == ET_EA_NO_SPACE:
                    raise UnsupportedError(
                        f"{path}: its xattrs do not fit in the inode and one block ({k}, "
                        f"{len(v)} bytes)",
                        path=self.name,
                    )
                self._check(err, f"setting xattr {k} of {path}")
        finally:
            err = self.L.lib.ext2fs_xattrs_close(ctypes.byref(h))
        self._check(err, f"writing the xattrs of {path}")

    def update_dir(self, entry: Entry) -> None:
        ent = self._entry(entry.path)
        assert ent is not None
        ino = ent[2]
        b = self.read_inode(ino)
        self._set_meta(b, entry, Kind.DIR)
        self.write_inode(ino, b)
        if entry.xattrs:
            self._set_xattrs(ino, entry.xattrs, entry.path)

    def hardlink(self, entry: Entry) -> None:
        target = self._entry(entry.linkname)
        assert target is not None
        ino, ft = target[2], target[3]
        kind = self._kind_of_dirent(ino, ft)
        pino, name = self._parent(entry.path)
        b = self.read_inode(ino)
        links = struct.unpack_from("<H", b, I_LINKS)[0]
        if links >= 65000:
            raise UnsupportedError(f"{entry.linkname}: too many hardlinks", path=self.name)
        self._link(pino, name, ino, kind)
        struct.pack_into("<H", b, I_LINKS, links + 1)
        self.write_inode(ino, b)

    # reads for obd ls / cat ----------------------------------------------------------
    def lookup(self, path: str, *, follow: bool = True) -> int:
        """The inode at ``path`` (a symlink at the end is followed when ``follow``)."""
        from obd.oci.layer import normalize

        p = normalize(path)
        if not p:
            return ROOT_INO
        try:
            if follow:
                ent = self._entry(p)
                if ent is not None and self._kind_of_dirent(ent[2], ent[3]) is Kind.SYMLINK:
                    return self._lookup_dir_or_file(p)
            ent = self._entry(p)
        except NotADirectoryError:
            ent = None
        if ent is None:
            raise FileNotFoundError(p)
        return ent[2]

    def _lookup_dir_or_file(self, p: str, depth: int = 0) -> int:
        from obd.oci.layer import normalize

        ent = self._entry(p)
        if ent is None:
            raise FileNotFoundError(p)
        if self._kind_of_dirent(ent[2], ent[3]) is not Kind.SYMLINK:
            return ent[2]
        if depth > 40:
            raise CorruptError(f"{p}: too many levels of symlinks", path=self.name)
        t = self._readlink_ino(ent[2]).decode("utf-8", "surrogateescape")
        base = "" if t.startswith("/") else parent_of(p)
        return self._lookup_dir_or_file(normalize(join(base, t)), depth + 1)

    def list_dir(self, ino: int) -> list[tuple[str, Stat]]:
        return sorted(
            (n.decode("utf-8", "surrogateescape"), self.stat_inode(i))
            for n, (i, _ft) in self._listing(ino).items()
        )

    def readlink(self, ino: int) -> str:
        return self._readlink_ino(ino).decode("utf-8", "surrogateescape")

    def iter_file(self, ino: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        f = c_void_p()
        self._check(self.L.lib.ext2fs_file_open2(self.fs, ino, None, 0, ctypes.byref(f)), "open")
        buf = ctypes.create_string_buffer(chunk)
        got = ctypes.c_uint()
        try:
            while True:
                self._check(
                    self.L.lib.ext2fs_file_read(f, buf, chunk, ctypes.byref(got)),
                    f"reading inode {ino}",
                )
                if not got.value:
                    return
                yield buf.raw[: got.value]
        finally:
            self.L.lib.ext2fs_file_close(f)

    def _read_all(self, ino: int, size: int) -> bytes:
        return b"".join(self.iter_file(ino))[:size]

    def xattrs(self, ino: int) -> dict[str, bytes]:
        out: dict[str, bytes] = {}

        @ctypes.CFUNCTYPE(c_int, c_char_p, c_void_p, ctypes.c_size_t, c_void_p)
        def cb(name: bytes, value: int, n: int, _p: int) -> int:
            out[name.decode("utf-8", "surrogateescape")] = ctypes.string_at(value, n)
            return 0

        h = c_void_p()
        self._check(self.L.lib.ext2fs_xattrs_open(self.fs, ino, ctypes.byref(h)), "xattrs")
        try:
            self._check(self.L.lib.ext2fs_xattrs_read(h), f"reading the xattrs of inode {ino}")
            self._check(self.L.lib.ext2fs_xattrs_iterate(h, cb, None), "listing xattrs")
        finally:
            self.L.lib.ext2fs_xattrs_close(ctypes.byref(h))
        return out


# mkfs -----------------------------------------------------------------------------------

# upstream overlaybd-apply --mkfs, as its rw_apply vector's superblock shows (dumpe2fs -h)
MKFS_FEATURES = (
    "none,ext_attr,resize_inode,dir_index,sparse_super2,filetype,extent,64bit,flex_bg,"
    "sparse_super,large_file,huge_file,dir_nlink,extra_isize"
)


def mkfs_command(path: str, *, uuid: str | None = None) -> list[str]:
    return [
        "mke2fs",
        "-F",
        "-q",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-I",
        "256",
        "-i",
        "16384",
        "-G",
        "1",
        "-O",
        MKFS_FEATURES,
        "-U",
        uuid or "clear",
        "-e",
        "continue",
        "-E",
        "nodiscard,num_backup_sb=2,assume_storage_prezeroed=1,root_owner=0:0",
        path,
    ]


def mkfs(dev: Any, *, scratch_dir: str | None = None, name: str = "image") -> None:
    """Make an empty ext4 on the whole of ``dev`` (a BlockDevice), as upstream does."""
    exe = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    if exe is None:
        raise UnsupportedError("mke2fs is not installed (e2fsprogs)")
    size = dev.size() // 4096 * 4096
    with tempfile.TemporaryDirectory(prefix=".obd-mkfs-", dir=scratch_dir) as tmp:
        path = os.path.join(tmp, "fs.img")
        from obd.io.file import open_file

        with open_file(path, writable=True, create=True, exclusive=True) as f:
            f.truncate(size)  # sparse: mke2fs writes only its metadata
        cmd = mkfs_command(path)
        cmd[0] = exe
        env = dict(os.environ, MKE2FS_CONFIG="/dev/null")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if r.returncode:
            raise ObdError(f"mke2fs failed: {r.stderr.strip() or r.stdout.strip()}", path=name)
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(dev, "lowers") and dev.lowers:
                dev.write_zeroes(0, dev.size() // 512 * 512)  # mask what the lowers hold
            for off, length in _data_ranges(fd, size):
                pos = off
                while pos < off + length:
                    n = min(RUN_BYTES, off + length - pos)
                    buf = os.pread(fd, n, pos)
                    for a, b in _nonzero_blocks(buf):
                        dev.pwrite(pos + a, buf[a:b])
                    pos += n
        finally:
            os.close(fd)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def _nonzero_blocks(buf: bytes, bs: int = 4096) -> Iterator[tuple[int, int]]:
    zero = bytes(bs)
    start = None
    for off in range(0, len(buf), bs):
        nz = buf[off : off + bs] != zero[: len(buf[off : off + bs])]
        if nz and start is None:
            start = off
        elif not nz and start is not None:
            yield start, off
            start = None
    if start is not None:
        yield start, len(buf)


__all__ = ["Ext4", "Stat", "image_fs", "list_path", "mkfs", "read_path"]


# reading an image's filesystem (obd ls / obd cat) ------------------------------------


@contextlib.contextmanager
def image_fs(path: str) -> Iterator[Ext4]:
    """The ext4 filesystem of ``path``, read-only: an image config (its whole stack), a
    read-only layer file (tar-wrapped, ZFile or plain LSMT) or a writable layer's data
    file (its index found by name: X.data -> X.index)."""
    from obd.formats.sniff import RW_DATA_KINDS, lsmt_kind
    from obd.image import Stack, open_image, open_layers
    from obd.image.config import is_image_config
    from obd.image.inspect import sibling_index
    from obd.image.layers import open_rw_layer
    from obd.io.file import open_file

    with open_file(path) as f:
        head = f.pread(0, 64)
        kind = "" if is_image_config(head) else lsmt_kind(f)[0]
    if is_image_config(head):
        stack = open_image(path, readonly=True)
    elif kind in RW_DATA_KINDS:
        stack = Stack([], open_rw_layer(path, sibling_index(path), readonly=True), readonly=True)
    else:
        stack = open_layers([path])
    try:
        with Ext4(stack, name=path) as fs:
            yield fs
    finally:
        stack.close()


def _resolve(fs: Ext4, path: str, *, follow: bool) -> int:
    try:
        return fs.lookup(path, follow=follow)
    except (FileNotFoundError, NotADirectoryError):
        from obd.errors import FileAccessError

        raise FileAccessError(f"{path}: no such file in its filesystem", path=fs.name) from None


def list_path(fs: Ext4, path: str) -> list[tuple[str, Stat, str]]:
    """``(name, stat, symlink target)`` of the entries of directory ``path`` (sorted), or
    of ``path`` itself when it is not a directory. A symlink at the end is followed to a
    directory only."""
    ino = _resolve(fs, path, follow=False)
    st = fs.stat_inode(ino)
    if st.kind is Kind.SYMLINK:
        with contextlib.suppress(ObdError):
            target = _resolve(fs, path, follow=True)
            if fs.stat_inode(target).kind is Kind.DIR:
                ino, st = target, fs.stat_inode(target)
    if st.kind is not Kind.DIR:
        name = path.rstrip("/").rsplit("/", 1)[-1] or "/"
        return [(name, st, fs.readlink(ino) if st.kind is Kind.SYMLINK else "")]
    return [
        (n, s, fs.readlink(s.ino) if s.kind is Kind.SYMLINK else "") for n, s in fs.list_dir(ino)
    ]


def read_path(fs: Ext4, path: str) -> Iterator[bytes]:
    """The bytes of the regular file at ``path`` (symlinks followed)."""
    ino = _resolve(fs, path, follow=True)
    st = fs.stat_inode(ino)
    if st.kind is not Kind.REG:
        from obd.errors import UsageError

        raise UsageError(f"{path}: is a {st.kind.value}, not a regular file", path=fs.name)
    left = st.size
    for chunk in fs.iter_file(ino):
        yield chunk[:left]
        left -= len(chunk)
        if left <= 0:
            return
