"""Access to the upstream reference vectors in ``../shared/vectors`` (never copied here).

Set ``OBD_VECTORS`` to point elsewhere. Tests that need the vectors skip with a reason
when the folder is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("OBD_VECTORS", REPO.parent / "shared" / "vectors"))


def have_vectors() -> bool:
    return (VECTORS / "manifest.json").is_file()


def require_vectors() -> Path:
    if not have_vectors():
        pytest.skip(f"upstream reference vectors not found at {VECTORS} (set OBD_VECTORS)")
    return VECTORS


@cache
def manifest() -> dict[str, Any]:
    if not have_vectors():
        return {"vectors": []}
    with open(VECTORS / "manifest.json") as f:
        return json.load(f)


def vectors_of(*kinds: str) -> list[dict[str, Any]]:
    return [v for v in manifest()["vectors"] if v["kind"] in kinds]


def vector_ids(vs: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vs]


def vector_params(*kinds: str) -> list[Any]:
    """pytest parameters for every vector of these kinds (one skipped param when absent)."""
    vs = vectors_of(*kinds)
    if not vs:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no vectors at {VECTORS}"))]
    return [pytest.param(v, id=v["name"]) for v in vs]


def sha256_of_reader(pread: Any, size: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        data = pread(pos, n)
        assert len(data) == n, f"short read at {pos}: {len(data)} of {n}"
        h.update(data)
        pos += n
    return h.hexdigest()


def reader_sha256(r: Any) -> str:
    """sha256 of everything a layer or image reads (``r.pread`` over ``r.virtual_size``)."""
    return sha256_of_reader(r.pread, r.virtual_size, 4 << 20)


def vector_named(kind: str, name: str) -> dict[str, Any]:
    """The one vector of this kind with this name (KeyError when the manifest lacks it)."""
    return {v["name"]: v for v in vectors_of(kind)}[name]


def commit_vector_params(*kinds: str) -> list[Any]:
    """pytest parameters for the vectors of these kinds that ``overlaybd-commit`` made."""
    out = []
    for v in vectors_of(*kinds):
        if v["commands"][-1].startswith("overlaybd-commit "):
            out.append(pytest.param(v, id=v["name"]))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no vectors"))]


def needs_exact_codec(algorithm: str) -> None:
    """Skip unless this codec library is the version upstream's compressed vectors were made with."""
    from obd.formats.codecs import get_codec

    if not get_codec(algorithm).matches_vectors():
        pytest.skip(
            f"{algorithm} library version {get_codec(algorithm).version()} is not the one "
            "upstream's vectors were made with; compressed bytes may differ"
        )


def commit_inputs(v: dict[str, Any], tmp_path: Path) -> tuple[list[str], Path, Path, str]:
    """(options, data, index, output name) of the ``overlaybd-commit`` that made vector ``v``.

    Skips when the data file is not shipped or (for a zfile) the codec library is not the one
    upstream used; a sparse data file gets its holes back first.
    """
    d = require_vectors()
    if "zfile" in v:
        needs_exact_codec(v["zfile"]["algorithm"])
    *opts, data, index, output = shlex.split(v["commands"][-1])[1:]
    if not (d / data).exists():
        pytest.skip(f"{data} is not shipped with the vectors")
    src = d / data
    if "sparse" in data:
        src = resparsify(src, tmp_path / data, data.removesuffix(".data"))
    return opts, src, d / index, output


def write_broken_chain_config(path: Path) -> Path:
    """Write an image config at ``path`` whose lowers skip layer 1 of stack A (l0 then l2)."""
    d = require_vectors()
    lowers = [{"file": str(d / "stack_a_l0.zfile")}, {"file": str(d / "stack_a_l2.zfile")}]
    path.write_text(json.dumps({"lowers": lowers}))
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Fill patterns of the vectors' README ("Fill patterns").
def fill_hash(seed: int, length: int) -> bytes:
    out = bytearray()
    c = 0
    while len(out) < length:
        out += hashlib.sha256(b"overlaybd-vector:%d:%d" % (seed, c)).digest()
        c += 1
    return bytes(out[:length])


def fill_text(seed: int, length: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < length:
        out += b"seed=%d line=%08d the quick brown fox jumps over the lazy dog\n" % (seed, i)
        i += 1
    return bytes(out[:length])


def fill_byte(seed: int, length: int) -> bytes:
    return bytes([seed & 0xFF]) * length


def fill_mixed(seed: int, length: int) -> bytes:
    out = bytearray()
    b = 0
    while len(out) < length:
        k = (seed + b) % 4
        s = seed * 1000 + b
        if k == 0:
            out += fill_hash(s, 4096)
        elif k == 1:
            out += fill_text(s, 4096)
        elif k == 2:
            out += bytes(4096)
        else:
            out += fill_byte(s, 4096)
        b += 1
    return bytes(out[:length])


FILLS = {"hash": fill_hash, "text": fill_text, "byte": fill_byte, "mixed": fill_mixed}


def fill(spec: dict[str, Any], length: int) -> bytes:
    return FILLS[spec["kind"]](spec["seed"], length)


def resparsify(src, dst, name):
    """Recreate the holes the sparse data file had where it was made.

    Copying the vector loses its holes. The writable layer's ops say which 4 KiB
    blocks were written (allocated) and which were discarded (punched), so replaying
    them over an empty file of the same size restores the allocation upstream saw.
    """
    from obd.io.file import data_extents, punch_hole

    spec = {v["name"]: v for v in vectors_of("lsmt_rw_sparse")}.get(name)
    if spec is None:
        pytest.skip(f"no ops for {name}")
    size = src.stat().st_size
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        fd.truncate(size)
        fd.write(fs.read(4096))
        for op in spec["ops"]:
            a = 4096 + op["offset"]
            b = a + op["length"]
            if op["op"] == "write":
                a -= a % 4096
                b += -b % 4096
                fs.seek(a)
                fd.seek(a)
                fd.write(fs.read(b - a))
            else:
                fd.flush()
                punch_hole(fd.fileno(), a, b - a)
        fd.flush()
        ext = list(data_extents(fd.fileno(), 0, size))
    if len(ext) < 2:
        pytest.skip("this filesystem does not keep holes")
    return dst
