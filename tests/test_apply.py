"""obd apply / ls / cat on real images: OCI layers built with tarfile applied over 3+
layers (each committed and stacked as a lower, as convert does), read back with debugfs
and, as root, the kernel's ext4 (obd serve + nbdfuse + losetup + mount -o ro), compared
with the model; e2fsck -fn after every apply; upstream's apply vector; bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings

from obd.image.ops import commit, create
from obd.oci.apply import apply_layer
from tests.conftest import assert_one_line_error, run_obd
from tests.ext4_helpers import (
    E,
    Tree,
    debugfs_view,
    e2fsck,
    export_raw,
    kernel_mount,
    layer_tar,
    model_apply,
    model_view,
    walk_view,
)
from tests.nbd_helpers import kernel_mount_ready
from tests.test_oci_layer import layer_sequences, valid_sequence
from tests.vectors import require_vectors

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs not installed")

PING = b"\x7fELF" + bytes(5000)
BIG = hashlib.sha256(b"big").digest() * (5 << 16)  # 10 MiB, not zero
CAP = bytes.fromhex("0100000200200000000000000000000000000000")
ACL = bytes.fromhex(
    "0200000001000600ffffffff04000400ffffffff02000600e803000010000600ffffffff20000400ffffffff"
)


def new_image(tmp: Path, name: str, size: int = 256 << 20, lowers: list[Path] = ()) -> Path:  # type: ignore[assignment]
    """An image config with a new writable upper over ``lowers`` (bottom first)."""
    data, index = tmp / f"{name}.data", tmp / f"{name}.index"
    create(str(data), str(index), size)
    cfg = tmp / f"{name}.json"
    cfg.write_text(
        json.dumps(
            {
                "lowers": [{"file": str(p)} for p in lowers],
                "upper": {"data": str(data), "index": str(index)},
            }
        )
    )
    return cfg


def check(cfg: Path, tmp: Path, want: Tree) -> None:
    raw = export_raw(cfg, tmp / "raw.img")
    try:
        e2fsck(raw)
        got = debugfs_view(raw, tmp / "dbg")
    finally:
        raw.unlink()
    expected = model_view(want)
    assert sorted(got) == sorted(expected)
    for p in expected:
        assert got[p] == expected[p], p


LAYERS: list[list[E]] = [
    [  # base
        E("dir", "etc", mode=0o755, mtime=1_600_000_000),
        E("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o644),
        E("file", "etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
        E("dir", "usr/bin", mode=0o755),
        E(
            "file",
            "usr/bin/ping",
            b"\x7fELF" + bytes(5000),
            mode=0o4755,
            xattrs={"security.capability": CAP},
        ),
        E("file", "usr/bin/wall", b"wall", mode=0o2755, gid=5),
        E("dir", "tmp", mode=0o1777),
        E("symlink", "bin", target="usr/bin"),
        E("symlink", "etc/long", target="/" + "x" * 200),  # a slow symlink
        E("char", "dev/null", mode=0o666, dev=(1, 3)),
        E("block", "dev/big", mode=0o660, dev=(259, 70000)),  # new-style device number
        E("fifo", "run/initctl", mode=0o600),
        E("dir", "var/lib/apt", mode=0o755),
        E("file", "var/lib/apt/a", b"a" * 70000),
        E("file", "var/lib/apt/b", b"b"),
        E("dir", "opt/tree/x/y", mode=0o700, uid=1000, gid=1000),
        E("file", "opt/tree/x/y/z", b"z" * 9000, uid=1000, gid=1000, mtime=1_234_567_890),
        E("file", "zeros", bytes(3 << 20)),  # holes
        E("file", "usr/lib/" + "n" * 200 + "/" + "m" * 240, b"long path"),  # PAX path
        E("dir", "acl", xattrs={"system.posix_acl_default": ACL, "user.tag": b"t"}),
        E("file", "uid", b"big ids", uid=3_000_000, gid=70_000),
        E("file", "big", BIG),  # allocated 1 MiB at a time
        E("file", "sparse", b"a" * (1 << 20) + bytes(1 << 20) + b"b" * 100),  # a hole inside
    ],
    [  # changes
        E("whiteout", "etc/shadow"),  # a file
        E("whiteout", "opt/tree"),  # a whole tree
        E("opaque", "var/lib/apt"),  # hides a, b
        E("file", "var/lib/apt/c", b"c"),
        E("hardlink", "usr/bin/ping6", target="usr/bin/ping"),  # to a file of a lower layer
        E("file", "usr/bin/new", b"new"),
        E("hardlink", "usr/bin/new2", target="usr/bin/new"),  # within the layer
        E("dir", "etc", mode=0o700, mtime=1_650_000_000),  # metadata of an existing dir
        E("file", "tmp", b"tmp is a file now"),  # dir -> file
        E("dir", "dev/null", mode=0o755),  # char device -> dir
        E("symlink", "run/initctl", target="/dev/null"),  # fifo -> symlink
        E("file", "zeros", b"small"),  # replaced, its blocks freed
        E("file", "big", b"smaller"),
    ],
    [  # more
        E("file", "usr/bin/ping", b"new ping", mode=0o755),  # a hardlinked name replaced
        E("whiteout", "bin"),  # a symlink
        E("dir", "bin"),
        E("file", "bin/sh", b"#!", mode=0o755),
        E("opaque", "etc"),  # everything in etc from below goes
        E("file", "etc/hostname", b"obd\n"),
        E("dir", "tmp", mode=0o1777),  # file -> dir
        E("file", "tmp/.keep", b""),
        E("file", "dev/null/inside", b"x"),
        E("whiteout", "nothing/here"),  # nothing to delete
    ],
    [  # a fourth: big directory with many names, then most of them whited out
        *[E("file", f"many/f{i:04d}", str(i).encode()) for i in range(600)],
    ],
    [
        *[E("whiteout", f"many/f{i:04d}") for i in range(0, 600, 2)],
        E("file", "many/f0001", b"replaced"),
    ],
]


def test_layers_over_lowers_match_the_model(tmp_path: Path) -> None:
    """Each layer applied into a new upper over the committed layers below it."""
    lowers: list[Path] = []
    tree: Tree = {}
    for i, entries in enumerate(LAYERS):
        cfg = new_image(tmp_path, f"l{i}", lowers=lowers)
        tar = tmp_path / f"l{i}.tar"
        tar.write_bytes(layer_tar(entries))
        args = ["apply", tar, cfg] if i else ["apply", "--mkfs", tar, cfg]
        r = run_obd(*args)
        assert r.code == 0, r.err
        model_apply(tree, entries)
        check(cfg, tmp_path, tree)
        committed = tmp_path / f"l{i}.lsmt"
        commit(str(tmp_path / f"l{i}.data"), str(tmp_path / f"l{i}.index"), str(committed))
        lowers.append(committed)
    # the final stack read by the kernel, when it can mount here
    why = kernel_mount_ready()
    if why is not None:
        pytest.skip(f"kernel ext4 check skipped: {why}")
    final = tmp_path / "final.json"
    final.write_text(json.dumps({"lowers": [{"file": str(p)} for p in lowers]}))
    with kernel_mount(final, tmp_path / "k") as mnt:
        got = walk_view(mnt)
    assert got == model_view(tree)


def test_ls_and_cat(tmp_path: Path) -> None:
    cfg = new_image(tmp_path, "a", size=64 << 20)
    tar = tmp_path / "a.tar"
    tar.write_bytes(layer_tar([e for e in LAYERS[0] if e.path not in ("big", "sparse", "zeros")]))
    assert run_obd("apply", "--mkfs", tar, cfg).code == 0
    r = run_obd("ls", cfg, "/usr/bin")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert any(ln.startswith("-rwsr-xr-x") and ln.endswith(" ping") for ln in lines), lines
    assert any(ln.startswith("-rwxr-sr-x") and ln.endswith(" wall") for ln in lines), lines
    r = run_obd("ls", "--json", cfg, "/")
    doc = json.loads(r.out)
    by = {e["name"]: e for e in doc["entries"]}
    assert by["bin"]["type"] == "symlink" and by["bin"]["target"] == "usr/bin"
    assert by["tmp"]["mode"] == "1777" and by["dev"]["type"] == "dir"
    assert by["uid"]["uid"] == 3_000_000 and by["uid"]["gid"] == 70_000
    r = run_obd("ls", "--json", cfg, "/dev")
    devs = {
        e["name"]: (e["type"], e["devmajor"], e["devminor"]) for e in json.loads(r.out)["entries"]
    }
    assert devs == {"null": ("char", 1, 3), "big": ("block", 259, 70000)}
    r = run_obd("cat", cfg, "/bin/ping")  # through the symlinked folder
    assert r.code == 0 and r.out.encode("latin-1", "replace")[:4] == b"\x7fELF"
    raw = run_obd("cat", cfg, "/var/lib/apt/a")
    assert raw.out == "a" * 70000
    # a writable layer's data file and a committed layer file are IMAGEs too
    assert run_obd("cat", tmp_path / "a.data", "etc/passwd").out.startswith("root:x:0:0")
    layer = tmp_path / "a.lsmt"
    commit(str(tmp_path / "a.data"), str(tmp_path / "a.index"), str(layer))
    assert run_obd("cat", layer, "etc/passwd").out == "root:x:0:0::/root:/bin/sh\n"
    assert_one_line_error(run_obd("cat", cfg, "/etc"), 2, "/etc", "not a regular file")
    assert_one_line_error(run_obd("cat", cfg, "/no/such"), 3, "/no/such", "no such file")
    assert_one_line_error(run_obd("ls", cfg, "/nope"), 3, "/nope")


def test_symlinked_parents_are_followed(tmp_path: Path) -> None:
    """A merged-/usr base (lib -> usr/lib) and a layer writing lib/x.so: the file lands in
    usr/lib, as the kernel resolves it when a layer is extracted on a mounted rootfs."""
    cfg = new_image(tmp_path, "s", size=32 << 20)
    base = [E("dir", "usr/lib"), E("symlink", "lib", target="usr/lib"),
            E("symlink", "abs", target="/usr")]  # fmt: skip
    top = [E("file", "lib/x.so", b"x"), E("file", "abs/lib/y.so", b"y")]
    apply_layer(io.BytesIO(layer_tar(base)), cfg, mkfs=True)
    apply_layer(io.BytesIO(layer_tar(top)), cfg)
    tree: Tree = {}
    model_apply(tree, [*base, E("file", "usr/lib/x.so", b"x"), E("file", "usr/lib/y.so", b"y")])
    check(cfg, tmp_path, tree)


@pytest.mark.parametrize("how", ["gzip", "zstd", "stdin", "fifo"])
def test_inputs_stream(tmp_path: Path, how: str) -> None:
    entries = [E("file", f"d/f{i}", os.urandom(i * 100)) for i in range(50)]
    plain = layer_tar(entries)
    digest = "sha256:" + hashlib.sha256(plain).hexdigest()
    cfg = new_image(tmp_path, "s", size=64 << 20)
    if how in ("gzip", "zstd"):
        src = tmp_path / f"l.tar.{how}"
        src.write_bytes(gzip.compress(plain) if how == "gzip" else zstandard.compress(plain))
        r = run_obd("apply", "--mkfs", "--json", "--checksum", digest, src, cfg)
    elif how == "stdin":
        r = run_obd("apply", "--mkfs", "--json", "--checksum", digest, "-", cfg, input=plain)
    else:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)

        def feed() -> None:
            with open(fifo, "wb") as f:
                f.write(gzip.compress(plain))

        t = threading.Thread(target=feed)
        t.start()
        r = run_obd("apply", "--mkfs", "--json", "--checksum", digest, fifo, cfg)
        t.join(30)
    assert r.code == 0, r.err
    stats = json.loads(r.out)
    assert stats["digest"] == digest and stats["files"] == 50 and stats["tar_bytes"] == len(plain)
    tree: Tree = {}
    model_apply(tree, entries)
    check(cfg, tmp_path, tree)


def test_upstream_apply_vector(tmp_path: Path) -> None:
    """apply_layer.tar with --mkfs by obd beside upstream's overlaybd-apply output."""
    vec = require_vectors()
    up = tmp_path / "up.json"
    up.write_text(
        json.dumps(
            {"upper": {"data": str(vec / "rw_apply.data"), "index": str(vec / "rw_apply.index")}}
        )
    )
    # upstream's layer is writable: read it through a copy so nothing can touch the vector
    for f in ("rw_apply.data", "rw_apply.index"):
        shutil.copy(vec / f, tmp_path / f)
        os.chmod(tmp_path / f, 0o644)
    upper = {"data": str(tmp_path / "rw_apply.data"), "index": str(tmp_path / "rw_apply.index")}
    up.write_text(json.dumps({"upper": upper}))
    mine = new_image(tmp_path, "mine", size=1 << 30)
    r = run_obd("apply", "--mkfs", vec / "apply_layer.tar", mine)
    assert r.code == 0, r.err
    views = []
    for cfg in (up, mine):
        raw = export_raw(cfg, tmp_path / "raw.img")
        e2fsck(raw, strict=cfg is mine)  # upstream leaves stale free counts in its superblock
        views.append(debugfs_view(raw, tmp_path / "dbg"))
        raw.unlink()
    assert views[0] == views[1]
    assert views[0]["usr/lib/link"][5] == "blob.bin"
    with tarfile.open(vec / "apply_layer.tar") as tf:
        names = {m.name.rstrip("/") for m in tf}
    assert set(views[1]) == names
    # same superblock choices (block size, inode size, features)
    from obd.image import open_image
    from obd.oci.ext4 import read_superblock

    sbs = []
    for cfg in (up, mine):
        st_ = open_image(str(cfg), readonly=True)
        try:
            sbs.append(read_superblock(st_, str(cfg)))
        finally:
            st_.close()
    same = [(s.block_size, s.inode_size, s.feature_incompat, s.blocks) for s in sbs]
    assert same[0] == same[1]


def test_bad_input_one_line_errors(tmp_path: Path) -> None:
    cfg = new_image(tmp_path, "b", size=32 << 20)
    good = layer_tar([E("file", "a", b"x" * 5000), E("file", "b", b"y")])
    tar = tmp_path / "good.tar"
    tar.write_bytes(good)
    # no ext4 yet
    assert_one_line_error(run_obd("apply", tar, cfg), 6, "no ext4", "--mkfs")
    assert run_obd("apply", "--mkfs", tar, cfg).code == 0
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(good[:3000])
    assert_one_line_error(run_obd("apply", trunc, cfg), 4, "trunc.tar", "truncated")
    assert_one_line_error(
        run_obd("apply", "--checksum", "sha256:" + "0" * 64, tar, cfg), 4, "checksum mismatch"
    )
    assert_one_line_error(run_obd("apply", "--checksum", "md5:00", tar, cfg), 2, "checksum")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all\n" * 64)
    assert_one_line_error(run_obd("apply", junk, cfg), 4, "junk.tar", "not a valid tar")
    noup = tmp_path / "noup.json"
    noup.write_text(json.dumps({"lowers": []}))
    assert_one_line_error(run_obd("apply", tar, noup), 7, "noup.json", "upper")
    assert_one_line_error(run_obd("apply", tmp_path / "missing.tar", cfg), 3, "missing.tar")
    bigx = tmp_path / "bigx.tar"
    bigx.write_bytes(layer_tar([E("file", "a", b"", xattrs={"user.big": b"v" * 9000})]))
    assert_one_line_error(run_obd("apply", bigx, cfg), 6, "xattrs do not fit")
    longname = tmp_path / "longname.tar"
    longname.write_bytes(layer_tar([E("file", "d/" + "x" * 256, b"")]))
    assert_one_line_error(run_obd("apply", longname, cfg), 4, "256 bytes", "255")
    big = tmp_path / "big.tar"
    big.write_bytes(layer_tar([E("file", "huge", b"\x01" * (40 << 20))]))
    assert_one_line_error(run_obd("apply", big, cfg), 1, "full")
    # after the failures the filesystem is still clean
    raw = export_raw(cfg, tmp_path / "raw.img")
    e2fsck(raw)


def test_one_big_folder(tmp_path: Path) -> None:
    """8,000 names in one folder (appended block after block), a third whited out, 500
    new ones appended after them: e2fsck clean, every name there."""
    cfg = new_image(tmp_path, "f", size=256 << 20)
    names = [f"big/{'n' * (i % 40)}{i:05d}" for i in range(8000)]
    apply_layer(io.BytesIO(layer_tar([E("file", n, n.encode()) for n in names])), cfg, mkfs=True)
    gone = names[::3]
    new = [f"big/new{i}" for i in range(500)]
    top = [E("whiteout", n) for n in gone] + [E("file", n, b"") for n in new]
    apply_layer(io.BytesIO(layer_tar(top)), cfg)
    raw = export_raw(cfg, tmp_path / "raw.img")
    e2fsck(raw)
    r = run_obd("ls", "--json", cfg, "/big")
    got = {e["name"] for e in json.loads(r.out)["entries"]}
    want = {n.split("/")[1] for n in (set(names) - set(gone)) | set(new)}
    assert got == want


@pytest.mark.slow
def test_many_files(tmp_path: Path) -> None:
    """A 100,000-file layer (in 1,000 folders), whose result e2fsck passes."""
    n = 100_000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            ti = tarfile.TarInfo(f"d{i // 100:03d}/f{i % 100:02d}")
            data = str(i).encode()
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    cfg = new_image(tmp_path, "m", size=2 << 30)
    t0 = time.monotonic()
    stats = apply_layer(io.BytesIO(buf.getvalue()), cfg, mkfs=True)
    took = time.monotonic() - t0
    assert stats.files == n and stats.dirs == 0 and stats.entries == n
    raw = export_raw(cfg, tmp_path / "raw.img")
    out = e2fsck(raw)
    assert f"{n + 1000 + 11}/" in out  # files + folders + the 11 reserved/root/lost+found
    r = run_obd("cat", cfg, "d999/f99")
    assert r.out == str(n - 1)
    print(f"100,000 files applied in {took:.1f} s")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=layer_sequences())
def test_random_layers_match_the_model(tmp_path_factory: pytest.TempPathFactory, layers: list[list[E]]) -> None:  # fmt: skip
    assume(valid_sequence(layers))
    tmp = tmp_path_factory.mktemp("h")
    cfg = new_image(tmp, "r", size=16 << 20)
    tree: Tree = {}
    for i, entries in enumerate(layers):
        apply_layer(io.BytesIO(layer_tar(entries)), cfg, mkfs=i == 0)
        model_apply(tree, entries)
    check(cfg, tmp, tree)
    shutil.rmtree(tmp, ignore_errors=True)


def _seed_raw(cfg: Path, raw: Path) -> None:
    """Write the non-zero MiBs of a raw filesystem image into the image's upper."""
    from obd.image import open_image

    st_ = open_image(str(cfg))
    try:
        with open(raw, "rb") as f:
            off = 0
            while chunk := f.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    st_.pwrite(off, chunk)
                off += len(chunk)
        st_.flush()
    finally:
        st_.close()


@pytest.mark.parametrize("fstype", ["ext4", "ext2"])
def test_stock_mke2fs_filesystems(tmp_path: Path, fstype: str) -> None:
    """Filesystems obd did not make: Debian's mke2fs defaults for ext4 (metadata_csum, a
    journal: libext2fs keeps every checksum right) and ext2 (no extents: file data goes
    through ext2fs_file_write and block maps)."""
    import subprocess

    raw0 = tmp_path / "stock.img"
    with open(raw0, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", fstype, str(raw0)], check=True, timeout=60)
    cfg = new_image(tmp_path, "c", size=64 << 20)
    _seed_raw(cfg, raw0)
    raw0.unlink()
    tree: Tree = {}
    small = [e for e in LAYERS[0] if e.path not in ("big", "sparse", "zeros")]
    for entries in (small, LAYERS[1], LAYERS[2]):
        apply_layer(io.BytesIO(layer_tar(entries)), cfg)
        model_apply(tree, entries)
    check(cfg, tmp_path, tree)


def test_layer_over_upstreams_filesystem(tmp_path: Path) -> None:
    """A layer applied on top of what upstream's overlaybd-apply wrote."""
    vec = require_vectors()
    for f in ("rw_apply.data", "rw_apply.index"):
        shutil.copy(vec / f, tmp_path / f)
        os.chmod(tmp_path / f, 0o644)
    cfg = tmp_path / "up.json"
    upper = {"data": str(tmp_path / "rw_apply.data"), "index": str(tmp_path / "rw_apply.index")}
    cfg.write_text(json.dumps({"upper": upper}))
    base = [E("dir", "etc"), E("file", "etc/hello.txt", b"x"), E("dir", "usr/lib"),
            E("file", "usr/lib/blob.bin", b"x"), E("file", "usr/lib/zeros.bin", b"x"),
            E("symlink", "usr/lib/link", target="blob.bin")]  # fmt: skip
    top = [E("whiteout", "usr/lib/blob.bin"), E("opaque", "etc"), E("file", "etc/new", b"n"),
           E("hardlink", "usr/lib/z2", target="usr/lib/zeros.bin")]  # fmt: skip
    (tmp_path / "top.tar").write_bytes(layer_tar(top))
    r = run_obd("apply", tmp_path / "top.tar", cfg)
    assert r.code == 0, r.err
    raw = export_raw(cfg, tmp_path / "raw.img")
    out = e2fsck(raw, strict=False)  # the free totals upstream left stale are still so
    assert out.count("? no") <= 2, out
    got = debugfs_view(raw, tmp_path / "dbg")
    tree: Tree = {}
    model_apply(tree, base)
    model_apply(tree, top)
    assert sorted(got) == sorted(tree)
    assert got["usr/lib/z2"][7] == 2 and got["usr/lib/zeros.bin"][7] == 2
    assert got["usr/lib/link"][5] == "blob.bin" and got["etc/new"][0] == "file"
