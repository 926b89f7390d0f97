"""ZFile block codecs by on-disk algorithm id (docs/formats.md §4.2 ``algo``, §4.5).

=====  ==========  =========================================================
  id   name        stored form
=====  ==========  =========================================================
  0    MINI_LZO    defined by overlaybd, never written or read: unsupported
  1    LZ4         raw LZ4 block (no frame), ``LZ4_compress_default``
  2    ZSTD        one zstd frame, level 3, with content size, no checksum
=====  ==========  =========================================================

Byte-identical output with the upstream tools needs the same compressor version: the
reference vectors match liblz4 1.9.4 and libzstd 1.5.4 (Debian bookworm).

Besides one-block ``compress`` / ``decompress``, every codec has batch helpers
(:meth:`Codec.compress_blocks`, :meth:`Codec.decompress_blocks`, and :func:`bad_crcs`)
that handle a run of consecutive blocks with one output buffer; they also append and
check the per-block CRC (raw CRC32C, seed 100007). Three backends, best first:

1. the compiled extension ``_zbatch.c`` (built at install time when a compiler and the
   liblz4 / libzstd headers are there): one C call per run, GIL released for the whole
   run, so reader and writer threads run in parallel; ``OBD_NO_EXT=1`` turns it off;
2. the system libraries ``liblz4.so.1`` / ``libzstd.so.1`` through ctypes, one call per
   block (each releases the GIL), CRC through the ``crc32c`` package;
3. the ``lz4`` / ``zstandard`` Python packages (``OBD_NO_SYSTEM_CODECS=1`` forces them).

All three read what any of them writes; 1 and 2 write the same bytes.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from obd.errors import UnsupportedError
from obd.formats._ext import load_ext as _load_ext
from obd.formats.crc import block_crc

ALGO_MINI_LZO = 0
ALGO_LZ4 = 1
ALGO_ZSTD = 2

ALGO_NAMES = {ALGO_MINI_LZO: "mini_lzo", ALGO_LZ4: "lz4", ALGO_ZSTD: "zstd"}
ZSTD_LEVEL = 3

# Library versions the reference vectors were made with (see module docstring).
LZ4_VECTOR_VERSION = 10904
ZSTD_VECTOR_VERSION = 10504

_U32 = struct.Struct("<I")

if TYPE_CHECKING:
    # numpy is imported by the functions that need it: the extension's batch path (what
    # ``obd zfile`` runs) does not, and its import costs a CLI run ~60 ms.
    import numpy as np

# Jump-table entries: a list, an array('I') or a numpy integer array.
Lengths: TypeAlias = "Sequence[int] | np.ndarray"

# Problem strings reported per block by decompress_blocks().
PROBLEM_CRC = "checksum mismatch"
PROBLEM_DECODE = "decompression failed"
PROBLEM_SIZE = "decompressed to the wrong size"
# The extension's problem codes.
_PROBLEMS = {1: PROBLEM_CRC, 2: PROBLEM_DECODE, 3: PROBLEM_SIZE}


def _address(buf: Any) -> int:
    """Address of a buffer's first byte (bytes, bytearray, memoryview; no copy)."""
    if len(buf) == 0:
        return 0
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _load(name: str) -> Any:
    if os.environ.get("OBD_NO_SYSTEM_CODECS"):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


class Codec:
    """One compression algorithm. Subclasses give ``compress``/``decompress``."""

    algo_id: int = -1
    name: str = ""
    backend: str = "python"

    def bound(self, raw_size: int) -> int:
        """Largest stored size (without CRC) of a ``raw_size`` block."""
        raise NotImplementedError

    def compress(self, raw: bytes | bytearray | memoryview) -> bytes:
        raise NotImplementedError

    def decompress(self, stored: bytes | bytearray | memoryview, raw_size: int) -> bytes:
        """Decode one block; raise ValueError unless it decodes to exactly ``raw_size``."""
        raise NotImplementedError

    def version(self) -> int | None:
        """Library version number (e.g. 10904) when known."""
        return None

    def matches_vectors(self) -> bool:
        """True when this backend writes the same bytes as the upstream reference vectors."""
        return False

    # -- batches ---------------------------------------------------------------------
    # A backend with the compiled extension (``_ext``) runs a batch in one call; every
    # other one shares the loops below and gives only the per-block step
    # (``_block_encoder`` / ``_block_decoder``).

    empty_frame = False  # an empty input still makes one block (zstd: an empty frame)
    _ext: Any = None  # the compiled batch extension, when this backend has it

    @property
    def releases_gil(self) -> bool:
        """True when a batch is one C call with the GIL released for all of it (the
        extension): then every core can code batches while another thread does I/O."""
        return self._ext is not None

    def _block_encoder(self, data: memoryview, out: bytearray) -> Callable[..., int]:
        """``enc(pos, cap, off, n)``: compress ``data[off:off+n]`` into ``out`` at ``pos``
        (at most ``cap`` bytes); the stored length, negative on failure."""
        compress = self.compress

        def encode(pos: int, cap: int, off: int, n: int) -> int:
            c = compress(data[off : off + n])
            if len(c) > cap:
                return -1
            out[pos : pos + len(c)] = c
            return len(c)

        return encode

    def _block_decoder(self, stored: memoryview, out: memoryview) -> Callable[..., str | None]:
        """``dec(dst, want, src, body)``: decode ``stored[src:src+body]`` into
        ``out[dst:dst+want]``; the problem, or None when it decoded to ``want`` bytes."""
        decompress = self.decompress

        def decode(dst: int, want: int, src: int, body: int) -> str | None:
            try:
                out[dst : dst + want] = decompress(stored[src : src + body], want)
            except ValueError as e:
                return str(e)
            return None

        return decode

    def compress_blocks(
        self,
        data: bytes | bytearray | memoryview,
        block_size: int,
        crc: bool,
        scratch: bytearray | None = None,
    ) -> tuple[memoryview, list[int]]:
        """Compress consecutive ``block_size`` chunks of ``data`` (the last may be short).

        Returns the stored records back to back (each followed by its CRC when ``crc``)
        and the list of record lengths (CRC included), i.e. jump-table entries. The
        records may be written into ``scratch`` (a buffer to recycle; the returned view's
        ``obj``) when it is large enough.
        """
        mv = memoryview(data).cast("B")
        size = len(mv)
        nblocks = -(-size // block_size) if size or not self.empty_frame else 1
        cap = self.bound(block_size)
        need = nblocks * (cap + 4)
        out = scratch if scratch is not None and len(scratch) >= need else bytearray(need)
        view = memoryview(out)
        if self._ext is not None:
            used, ext_lengths = self._ext.compress_blocks(
                self.algo_id, mv, block_size, crc, out, ZSTD_LEVEL
            )
            return view[:used], ext_lengths
        enc = self._block_encoder(mv, out)
        pack = _U32.pack_into
        lengths: list[int] = []
        append = lengths.append
        pos = 0
        for off in range(0, nblocks * block_size, block_size):
            n = enc(pos, cap, off, min(block_size, size - off))
            if n < 0:
                raise ValueError(f"{self.name} compression failed")
            if crc:
                pack(out, pos + n, block_crc(view[pos : pos + n]))
                n += 4
            append(n)
            pos += n
        return view[:pos], lengths

    def decompress_blocks(
        self,
        stored: bytes | bytearray | memoryview,
        lengths: Lengths,
        out: bytearray | memoryview,
        block_size: int,
        last_raw: int,
        crc: bool,
    ) -> list[tuple[int, str]]:
        """Decode consecutive stored records into ``out`` (block i at ``i*block_size``).

        ``lengths`` are the records' stored lengths (CRC included when ``crc``); the last
        block decodes to ``last_raw`` bytes, the others to ``block_size``. Returns the
        ``(index, problem)`` of every block that failed; their output range is undefined.
        """
        if self._ext is not None:
            failed = self._ext.decompress_blocks(
                self.algo_id, stored, lengths, out, block_size, last_raw, crc
            )
            return [(i, _PROBLEMS[code]) for i, code in failed] if failed else failed
        src = memoryview(stored).cast("B")
        dst = memoryview(out).cast("B")
        _check_sizes(src, lengths, dst, block_size, last_raw)
        if not len(lengths):
            return []
        dec = self._block_decoder(src, dst)
        starts, bodies, expect = _plan(src, lengths, crc)
        bad: list[tuple[int, str]] = []
        last = len(bodies) - 1
        for i, (pos, body) in enumerate(zip(starts, bodies, strict=True)):
            if expect is not None and block_crc(src[pos : pos + body]) != expect[i]:
                bad.append((i, PROBLEM_CRC))
                continue
            problem = dec(i * block_size, block_size if i != last else last_raw, pos, body)
            if problem is not None:
                bad.append((i, problem))
        return bad


def _check_sizes(
    src: memoryview, lengths: Lengths, out: Any, block_size: int, last_raw: int
) -> None:
    """Refuse buffers too small for a batch (C code must never run past them)."""
    if not len(lengths):
        return
    import numpy as np

    if int(np.sum(np.asarray(lengths, dtype=np.int64))) > len(src):
        raise ValueError("stored buffer shorter than the records it should hold")
    if (len(lengths) - 1) * block_size + last_raw > len(out) or last_raw > block_size:
        raise ValueError("output buffer too small for the blocks")


def _plan(
    src: memoryview, lengths: Lengths, crc: bool
) -> tuple[list[int], list[int], list[int] | None]:
    """Record starts, body lengths and (with ``crc``) the stored CRC of each body,
    decoded in bulk with numpy instead of block by block."""
    import numpy as np

    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lens), dtype=np.int64)
    if len(lens) > 1:
        np.cumsum(lens[:-1], out=starts[1:])
    if not crc:
        return starts.tolist(), lens.tolist(), None
    if int(lens.min()) < 4:
        raise ValueError("stored record shorter than its CRC")
    bodies = lens - 4
    u8 = np.frombuffer(src, dtype=np.uint8)
    at = starts + bodies
    stored = (
        u8[at].astype(np.uint32)
        | (u8[at + 1].astype(np.uint32) << 8)
        | (u8[at + 2].astype(np.uint32) << 16)
        | (u8[at + 3].astype(np.uint32) << 24)
    )
    return starts.tolist(), bodies.tolist(), stored.tolist()


def bad_crcs(stored: bytes | bytearray | memoryview, lengths: Lengths) -> list[int]:
    """Indices of the records (CRC included in ``lengths``) whose per-block CRC fails."""
    ext = _ext()
    if ext is not None:
        bad: list[int] = ext.bad_crcs(stored, lengths)
        return bad
    return _bad_crcs_python(stored, lengths)


def _bad_crcs_python(stored: bytes | bytearray | memoryview, lengths: Lengths) -> list[int]:
    src = memoryview(stored).cast("B")
    if not len(lengths):
        return []
    import numpy as np

    if int(np.sum(np.asarray(lengths, dtype=np.int64))) > len(src):
        raise ValueError("stored buffer shorter than the records it should hold")
    starts, bodies, expect = _plan(src, lengths, True)
    assert expect is not None
    return [
        i
        for i, (pos, body, want) in enumerate(zip(starts, bodies, expect, strict=True))
        if block_crc(src[pos : pos + body]) != want
    ]


# ------------------------------------------------------------- system libraries


class _SystemCodec(Codec):
    """liblz4 / libzstd: a batch is one call into the compiled extension when it is built
    (GIL released for the whole run), else :class:`Codec`'s loops with one ctypes call
    per block (each releases the GIL)."""

    def __init__(self, lib: Any, ext: Any) -> None:
        self._lib = lib
        self._ext = ext
        self.batch = "zbatch" if ext is not None else "ctypes"

    def compress(self, raw: bytes | bytearray | memoryview) -> bytes:
        mv, _ = self.compress_blocks(raw, max(len(raw), 1), False)
        return bytes(mv)

    def decompress(self, stored: bytes | bytearray | memoryview, raw_size: int) -> bytes:
        if self._ext is not None:
            r = self._ext.decompress(self.algo_id, stored, raw_size)
            if isinstance(r, int):
                raise ValueError(_PROBLEMS[r])
            return bytes(r)
        out = bytearray(raw_size)
        src = memoryview(stored).cast("B")
        problem = self._block_decoder(src, memoryview(out))(0, raw_size, 0, len(src))
        if problem is not None:
            raise ValueError(problem)
        return bytes(out)


# ----------------------------------------------------------------------------- LZ4


class _Lz4System(_SystemCodec):
    algo_id = ALGO_LZ4
    name = "lz4"
    backend = "liblz4"

    def __init__(self, lib: Any, ext: Any = None) -> None:
        super().__init__(lib, ext)
        lib.LZ4_compress_default.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.LZ4_compress_default.restype = ctypes.c_int
        lib.LZ4_decompress_safe.argtypes = lib.LZ4_compress_default.argtypes
        lib.LZ4_decompress_safe.restype = ctypes.c_int
        lib.LZ4_versionNumber.restype = ctypes.c_int
        self._c, self._d = lib.LZ4_compress_default, lib.LZ4_decompress_safe

    def _block_encoder(self, data: memoryview, out: bytearray) -> Callable[..., int]:
        comp, s, d = self._c, _address(data), _address(out)

        def encode(pos: int, cap: int, off: int, n: int) -> int:
            r: int = comp(s + off, d + pos, n, cap)
            return r if r > 0 else -1

        return encode

    def _block_decoder(self, stored: memoryview, out: memoryview) -> Callable[..., str | None]:
        dec, s, d = self._d, _address(stored), _address(out)

        def decode(dst: int, want: int, src: int, body: int) -> str | None:
            r = dec(s + src, d + dst, body, want)
            return None if r == want else PROBLEM_DECODE if r < 0 else PROBLEM_SIZE

        return decode

    def version(self) -> int:
        return int(self._lib.LZ4_versionNumber())

    def matches_vectors(self) -> bool:
        return self.version() == LZ4_VECTOR_VERSION

    def bound(self, raw_size: int) -> int:
        # LZ4_COMPRESSBOUND
        return raw_size + raw_size // 255 + 16


class _Lz4Python(Codec):
    algo_id = ALGO_LZ4
    name = "lz4"
    backend = "python-lz4"

    def __init__(self) -> None:
        import lz4
        import lz4.block

        self._block = lz4.block
        self._version = int(lz4.library_version_number())

    def version(self) -> int:
        # python-lz4 reports 1.9.4 but its wheel gave other bytes for some vector blocks,
        # so matches_vectors() stays False for this backend.
        return self._version

    def bound(self, raw_size: int) -> int:
        return raw_size + raw_size // 255 + 16

    def compress(self, raw: bytes | bytearray | memoryview) -> bytes:
        return bytes(self._block.compress(raw, mode="default", store_size=False))

    def decompress(self, stored: bytes | bytearray | memoryview, raw_size: int) -> bytes:
        try:
            out = self._block.decompress(stored, uncompressed_size=raw_size)
        except Exception:
            raise ValueError(PROBLEM_DECODE) from None
        if len(out) != raw_size:
            raise ValueError(PROBLEM_SIZE)
        return bytes(out)


# ---------------------------------------------------------------------------- ZSTD


class _ZstdCtx:
    """A ZSTD_CCtx + ZSTD_DCtx owned by one thread, freed with it."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.cctx = lib.ZSTD_createCCtx()
        self.dctx = lib.ZSTD_createDCtx()
        if not self.cctx or not self.dctx:
            raise MemoryError("cannot create zstd contexts")

    def __del__(self) -> None:
        lib = self._lib
        if lib is not None:
            lib.ZSTD_freeCCtx(self.cctx)
            lib.ZSTD_freeDCtx(self.dctx)


class _ZstdSystem(_SystemCodec):
    algo_id = ALGO_ZSTD
    name = "zstd"
    backend = "libzstd"
    empty_frame = True  # as ZSTD_compress

    def __init__(self, lib: Any, ext: Any = None) -> None:
        super().__init__(lib, ext)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.ZSTD_createCCtx.restype = vp
        lib.ZSTD_createDCtx.restype = vp
        lib.ZSTD_freeCCtx.argtypes = [vp]
        lib.ZSTD_freeDCtx.argtypes = [vp]
        lib.ZSTD_compressCCtx.argtypes = [vp, vp, sz, vp, sz, ctypes.c_int]
        lib.ZSTD_compressCCtx.restype = sz
        lib.ZSTD_decompressDCtx.argtypes = [vp, vp, sz, vp, sz]
        lib.ZSTD_decompressDCtx.restype = sz
        lib.ZSTD_compressBound.argtypes = [sz]
        lib.ZSTD_compressBound.restype = sz
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        self._local = threading.local()

    def _ctx(self) -> _ZstdCtx:
        ctx: _ZstdCtx | None = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _ZstdCtx(self._lib)
        return ctx

    def _block_encoder(self, data: memoryview, out: bytearray) -> Callable[..., int]:
        comp, cctx = self._lib.ZSTD_compressCCtx, self._ctx().cctx
        s, d = _address(data), _address(out)

        def encode(pos: int, cap: int, off: int, n: int) -> int:
            r: int = comp(cctx, d + pos, cap, s + off, n, ZSTD_LEVEL)
            return r if r <= cap else -1

        return encode

    def _block_decoder(self, stored: memoryview, out: memoryview) -> Callable[..., str | None]:
        dec, dctx = self._lib.ZSTD_decompressDCtx, self._ctx().dctx
        s, d = _address(stored), _address(out)

        def decode(dst: int, want: int, src: int, body: int) -> str | None:
            r = dec(dctx, d + dst, want, s + src, body)
            return None if r == want else PROBLEM_DECODE if r > want else PROBLEM_SIZE

        return decode

    def version(self) -> int:
        return int(self._lib.ZSTD_versionNumber())

    def matches_vectors(self) -> bool:
        return self.version() == ZSTD_VECTOR_VERSION

    def bound(self, raw_size: int) -> int:
        return int(self._lib.ZSTD_compressBound(raw_size))


class _ZstdPython(Codec):
    algo_id = ALGO_ZSTD
    name = "zstd"
    backend = "python-zstandard"

    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._local = threading.local()

    def version(self) -> int:
        major, minor, patch = self._zstd.ZSTD_VERSION
        return int(major) * 10000 + int(minor) * 100 + int(patch)

    def _pair(self) -> tuple[Any, Any]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            z = self._zstd
            pair = self._local.pair = (
                z.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False),
                z.ZstdDecompressor(),
            )
        return pair

    def bound(self, raw_size: int) -> int:
        # ZSTD_COMPRESSBOUND
        small = ((128 << 10) - raw_size) >> 11 if raw_size < (128 << 10) else 0
        return raw_size + (raw_size >> 8) + small

    def compress(self, raw: bytes | bytearray | memoryview) -> bytes:
        return bytes(self._pair()[0].compress(raw))

    def decompress(self, stored: bytes | bytearray | memoryview, raw_size: int) -> bytes:
        try:
            out = self._pair()[1].decompress(stored, max_output_size=raw_size)
        except Exception:
            raise ValueError(PROBLEM_DECODE) from None
        if len(out) != raw_size:
            raise ValueError(PROBLEM_SIZE)
        return bytes(out)


# ---------------------------------------------------------------------------- table

_CODECS: dict[int, Codec] = {}
_LOCK = threading.Lock()
_EXT: list[Any] = []  # [the extension or None], loaded on first use


def _ext() -> Any:
    if not _EXT:
        _EXT.append(_load_ext())
    return _EXT[0]


def _make(algo_id: int, ext: Any) -> Codec:
    if algo_id == ALGO_LZ4:
        lib = _load("liblz4.so.1")
        if lib is not None and hasattr(lib, "LZ4_compress_default"):
            return _Lz4System(lib, ext)
        return _Lz4Python()
    if algo_id == ALGO_ZSTD:
        lib = _load("libzstd.so.1")
        if lib is not None and hasattr(lib, "ZSTD_compressCCtx"):
            return _ZstdSystem(lib, ext)
        return _ZstdPython()
    if algo_id in ALGO_NAMES:
        raise UnsupportedError(
            f"ZFile compression algorithm {algo_id} ({ALGO_NAMES[algo_id]}) is not supported"
        )
    raise UnsupportedError(f"unknown ZFile compression algorithm id {algo_id}")


def get_codec(algo: int | str) -> Codec:
    """The codec for an on-disk algorithm id (1, 2) or name ("lz4", "zstd")."""
    if isinstance(algo, str):
        ids = {v: k for k, v in ALGO_NAMES.items()}
        if algo.lower() not in ids:
            raise UnsupportedError(f"unknown ZFile compression algorithm {algo!r}")
        algo = ids[algo.lower()]
    codec = _CODECS.get(algo)
    if codec is None:
        with _LOCK:
            codec = _CODECS.get(algo)
            if codec is None:
                codec = _CODECS[algo] = _make(algo, _ext())
    return codec


def have_extension() -> bool:
    """True when the compiled batch path is built and enabled (see ``OBD_NO_EXT``)."""
    return _ext() is not None


def fallback_codec(algo: int | str) -> Codec:
    """The codec ``get_codec`` gives without the compiled extension (for tests and
    comparisons): the system library through ctypes, or the Python package."""
    return _make(get_codec(algo).algo_id, None)


def python_codec(algo: int | str) -> Codec:
    """The pure-package backend (``lz4`` / ``zstandard``), for tests and comparisons."""
    algo_id = get_codec(algo).algo_id
    return _Lz4Python() if algo_id == ALGO_LZ4 else _ZstdPython()
