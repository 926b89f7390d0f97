"""The OCI layer rules (obd/oci/layer.py) without a filesystem: the streaming tar reader
against what tarfile wrote, compression and the diff_id check, bad input, and the rules
engine over a plain-dict Target against the model in tests/ext4_helpers.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from typing import IO

import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from obd.errors import CorruptError, UnsupportedError, UsageError
from obd.oci.layer import (
    Entry,
    Kind,
    Opaque,
    Whiteout,
    apply_ops,
    join,
    normalize,
    parent_of,
    parse_checksum,
    read_layer,
)
from tests.ext4_helpers import MTIME, E, Inode, Tree, layer_tar, model_apply, model_view

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw, binary


def ops_of(data: bytes, **kw: object) -> list[tuple[object, bytes | None]]:
    ls = read_layer(io.BytesIO(data), name="t.tar", **kw)  # type: ignore[arg-type]
    out = [(op, d.read() if d is not None else None) for op, d in ls.ops()]
    ls.finish()
    return out


def test_entries_read_back_with_every_field() -> None:
    long_dir = "/".join(["d" * 60] * 5)  # 304 bytes: PAX path
    entries = [
        E("dir", "etc", mode=0o750, uid=5, gid=6, mtime=1_600_000_000),
        E("file", "etc/passwd", b"root:x:0:0\n", mode=0o4755, uid=70000, gid=3_000_000),
        E("file", "bin/ping", b"\x7fELF", xattrs={"security.capability": CAP, "user.a": b"v"}),
        E("symlink", "lib", target="usr/lib"),
        E("symlink", f"{long_dir}/x", target="t" * 300),
        E("hardlink", "etc/passwd2", target="etc/passwd"),
        E("char", "dev/null", dev=(1, 3)),
        E("block", "dev/sda", dev=(8, 0)),
        E("fifo", "run/fifo"),
        E("dir", "tmp", mode=0o1777),
        E("file", "sgid", b"", mode=0o2711),
        E("whiteout", "usr/share/doc"),
        E("opaque", "var/cache"),
    ]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        ok = [e for e in entries if fmt == tarfile.PAX_FORMAT or not e.xattrs]
        got = ops_of(layer_tar(ok, fmt=fmt))
        assert len(got) == len(ok)
        for (op, data), e in zip(got, ok, strict=True):
            if e.kind == "whiteout":
                assert op == Whiteout(e.path)
                continue
            if e.kind == "opaque":
                assert op == Opaque(e.path)
                continue
            assert isinstance(op, Entry)
            assert op.path == e.path and op.kind.value == e.kind
            assert (op.uid, op.gid, op.mtime_ns) == (e.uid, e.gid, e.mtime * 10**9)
            if e.mode is not None:
                assert op.mode == e.mode
            assert dict(op.xattrs) == e.xattrs
            if e.kind == "file":
                assert (data or b"") == e.data and op.size == len(e.data)
            if e.kind in ("symlink", "hardlink"):
                assert op.linkname == e.target
            if e.kind in ("char", "block"):
                assert (op.devmajor, op.devminor) == e.dev


def test_pax_fractional_mtime_and_ustar_prefix() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("a/f")
        ti.mtime = 1_700_000_000.25  # type: ignore[assignment]
        tf.addfile(ti, io.BytesIO(b""))
    with tarfile.open(fileobj=(b2 := io.BytesIO()), mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("p" * 120 + "/name")  # split into prefix + name
        tf.addfile(ti, io.BytesIO(b""))
    (op, _), = ops_of(buf.getvalue())  # fmt: skip
    assert isinstance(op, Entry) and op.mtime_ns == 1_700_000_000_250_000_000
    (op, _), = ops_of(b2.getvalue())  # fmt: skip
    assert isinstance(op, Entry) and op.path == "p" * 120 + "/name"


@pytest.mark.parametrize(
    ("name", "want"),
    [("./a/b/", "a/b"), ("/../../etc/x", "etc/x"), ("a/../../b", "b"), ("./", ""), ("a//b", "a/b")],
)
def test_normalize_never_climbs_above_the_root(name: str, want: str) -> None:
    assert normalize(name) == want


def test_aufs_metadata_whiteouts_are_ignored() -> None:
    data = layer_tar([E("file", ".wh..wh.plnk/123.4", b"x"), E("file", "a", b"y")])
    got = ops_of(data)
    assert [op.path for op, _ in got] == [".wh..wh.plnk/123.4", "a"] or len(got) == 1
    # the file inside the plnk folder is an ordinary path; the folder marker itself is not
    assert all(not isinstance(op, Whiteout) for op, _ in got)


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
def test_compressions_give_the_same_ops_and_diff_id(comp: str) -> None:
    plain = layer_tar([E("file", f"f{i}", bytes([i]) * (i * 1000)) for i in range(20)])
    data = {
        "none": plain,
        "gzip": gzip.compress(plain),
        "zstd": zstandard.ZstdCompressor().compress(plain),
    }[comp]
    ls = read_layer(
        io.BytesIO(data), name="t", checksum="sha256:" + hashlib.sha256(plain).hexdigest()
    )
    ops = [(op, d.read() if d else None) for op, d in ls.ops()]
    assert ls.finish() == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert ls.compression == comp and ls.size == len(plain)
    assert ops == ops_of(plain)


def test_checksum_mismatch_and_syntax() -> None:
    plain = layer_tar([E("file", "a", b"x")])
    with pytest.raises(CorruptError, match="checksum mismatch"):
        ops_of(plain, checksum="sha256:" + "0" * 64)
    for bad in ("md5:00", "sha256:xyz", "sha256:" + "0" * 63):
        with pytest.raises(UsageError):
            parse_checksum(bad)


@pytest.mark.parametrize("cut", [600, 700, 1536, 3048, 5120])
def test_truncated_tar(cut: int) -> None:
    """Cut in a header, in data, between members and before the end-of-archive blocks."""
    plain = layer_tar([E("file", "a", b"x" * 1000), E("file", "b", b"y" * 3000)])
    with pytest.raises(CorruptError, match="truncated"):
        ops_of(plain[:cut])


def test_garbage_bad_header_and_bad_gzip() -> None:
    with pytest.raises(CorruptError, match="not a valid tar"):
        ops_of(b"hello, this is not a tar\n" * 100)
    plain = bytearray(layer_tar([E("file", "a", b"x")]))
    plain[0] ^= 0x20  # the name changes, the stored checksum does not
    with pytest.raises(CorruptError, match="checksum"):
        ops_of(bytes(plain))
    gz = bytearray(gzip.compress(layer_tar([E("file", "a", b"x" * 100000)])))
    gz[len(gz) // 2] ^= 0xFF
    with pytest.raises(CorruptError):
        ops_of(bytes(gz))
    with pytest.raises(CorruptError):
        ops_of(gzip.compress(layer_tar([E("file", "a", b"x" * 100000)]))[:-20])


def test_gnu_sparse_is_unsupported() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("s")
        ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
        tf.addfile(ti, io.BytesIO(b""))
    with pytest.raises(UnsupportedError, match="sparse"):
        ops_of(buf.getvalue())


# the rules engine over a dict ------------------------------------------------------------


class DictTarget:
    """obd.oci.layer.Target over the model's Tree (symlinked parents are not used here)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def kind_of(self, path: str) -> Kind | None:
        p = parent_of(path)
        if p and p in self.tree and self.tree[p].kind != "dir":
            raise CorruptError(f"{p} is not a directory")
        n = self.tree.get(path)
        return None if n is None else {"file": Kind.REG, "dir": Kind.DIR, "symlink": Kind.SYMLINK,
                                      "char": Kind.CHAR, "block": Kind.BLOCK, "fifo": Kind.FIFO}[n.kind]  # fmt: skip

    def children(self, path: str) -> list[str]:
        pre = path + "/" if path else ""
        return [p[len(pre) :] for p in self.tree if p.startswith(pre) and "/" not in p[len(pre) :]]

    def remove(self, path: str) -> None:
        for p in [p for p in self.tree if p == path or p.startswith(path + "/")]:
            del self.tree[p]

    def create(self, e: Entry, data: IO[bytes] | None) -> None:
        kind = {Kind.REG: "file"}.get(e.kind, e.kind.value)
        self.tree[e.path] = Inode(
            kind, 0o777 if kind == "symlink" else e.mode, e.uid, e.gid, e.mtime_ns // 10**9,
            data.read() if data is not None else b"", e.linkname, (e.devmajor, e.devminor),
            dict(e.xattrs),
        )  # fmt: skip

    def update_dir(self, e: Entry) -> None:
        n = self.tree[e.path]
        n.mode, n.uid, n.gid, n.mtime = e.mode, e.uid, e.gid, e.mtime_ns // 10**9
        n.xattrs.update(dict(e.xattrs))

    def hardlink(self, e: Entry) -> None:
        self.tree[e.path] = self.tree[e.linkname]


NAMES = st.sampled_from(["a", "b", "c", "a/x", "a/y", "b/x", "a/x/deep", "c/z"])


@st.composite
def layer_entries(draw: st.DrawFn, existing: set[str]) -> list[E]:
    """A random layer over a tree holding ``existing`` (updated as the layer goes)."""
    out: list[E] = []
    for _ in range(draw(st.integers(1, 8))):
        path = draw(NAMES)
        kind = draw(
            st.sampled_from(["file", "dir", "symlink", "whiteout", "opaque", "hardlink", "fifo"])
        )
        if kind == "hardlink":
            files = sorted(p for p in existing if p.startswith("f:"))
            if not files:
                continue
            out.append(E("hardlink", path, target=draw(st.sampled_from(files))[2:]))
        elif kind == "file":
            out.append(
                E(
                    "file",
                    path,
                    draw(st.binary(max_size=64)),
                    mode=draw(st.sampled_from([0o644, 0o4755])),
                )
            )
        elif kind == "dir":
            out.append(
                E(
                    "dir",
                    path,
                    mode=draw(st.sampled_from([0o755, 0o1777, 0o700])),
                    uid=draw(st.integers(0, 3)),
                )
            )
        elif kind == "symlink":
            out.append(E("symlink", path, target=draw(st.sampled_from(["a", "../b", "/etc/x"]))))
        elif kind == "fifo":
            out.append(E("fifo", path))
        else:
            out.append(E(kind, path))
        existing.add(("f:" if kind == "file" else "o:") + path)
    return out


def valid_sequence(layers: list[list[E]]) -> bool:
    """Layers the model and a real filesystem agree are well formed: no entry under a
    non-directory, hardlinks only to files that exist at that point."""
    import copy

    tree: Tree = {}
    for entries in layers:
        for i, e in enumerate(entries):
            now = copy.deepcopy(tree)
            model_apply(now, entries[:i])
            parts = e.path.split("/")
            for k in range(1, len(parts)):
                d = "/".join(parts[:k])
                if d in now and now[d].kind != "dir":
                    return False
            if e.kind == "hardlink" and (
                e.target not in now
                or now[e.target].kind != "file"
                or e.target == e.path
                or e.target.startswith(e.path + "/")
            ):
                return False
        model_apply(tree, entries)
    return True


@st.composite
def layer_sequences(draw: st.DrawFn) -> list[list[E]]:
    existing: set[str] = set()
    return [draw(layer_entries(existing)) for _ in range(draw(st.integers(1, 4)))]


def apply_model_per_layer(layers: list[list[E]]) -> Tree:
    tree: Tree = {}
    for entries in layers:
        model_apply(tree, entries)
    return tree


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_sequences())
def test_rules_engine_matches_the_model(layers: list[list[E]]) -> None:
    assume(valid_sequence(layers))
    tree: Tree = {}
    target = DictTarget(tree)
    for entries in layers:
        apply_ops(read_layer(io.BytesIO(layer_tar(entries)), name="t").ops(), target)
    assert model_view(tree) == model_view(apply_model_per_layer(layers))


def test_opaque_after_this_layers_entries_keeps_them() -> None:
    tree: Tree = {}
    target = DictTarget(tree)
    lower = [E("dir", "d"), E("file", "d/old", b"1"), E("dir", "d/sub"), E("file", "d/sub/o", b"2")]
    upper = [E("dir", "d/sub"), E("file", "d/new", b"3"), E("opaque", "d")]
    for entries in (lower, upper):
        apply_ops(read_layer(io.BytesIO(layer_tar(entries)), name="t").ops(), target)
    assert sorted(tree) == ["d", "d/new", "d/sub"]
    assert model_view(tree) == model_view(apply_model_per_layer([lower, upper]))


def test_hardlink_to_nothing_is_corrupt() -> None:
    with pytest.raises(CorruptError, match="hardlink"):
        apply_ops(
            read_layer(io.BytesIO(layer_tar([E("hardlink", "a", target="missing")]))).ops(),
            DictTarget({}),
        )


def test_missing_parents_are_made() -> None:
    tree: Tree = {}
    apply_ops(read_layer(io.BytesIO(layer_tar([E("file", "x/y/z", b"1")]))).ops(), DictTarget(tree))
    assert tree["x"].kind == "dir" and tree["x"].mode == 0o755 and tree["x/y"].mtime == MTIME
    assert join("x", "y") in tree


def test_a_pipe_that_hands_over_one_byte_at_a_time() -> None:
    """The compression magic is read fully even when a pipe gives it byte by byte."""
    import os
    import threading

    data = gzip.compress(layer_tar([E("file", "a", b"x" * 10000)]))
    r, w = os.pipe()

    def feed() -> None:
        for i in range(8):
            os.write(w, data[i : i + 1])
        os.write(w, data[8:])
        os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb", buffering=0) as src:
        ls = read_layer(src, name="pipe")
        got = [(op, d.read() if d else None) for op, d in ls.ops()]
        ls.finish()
    t.join(10)
    assert ls.compression == "gzip" and len(got) == 1 and got[0][1] == b"x" * 10000
