"""Layer tars for the apply tests, an OCI-rules model over a plain dict, and readers of
the ext4 tree obd wrote: ``debugfs`` (rootless) and, as root, the kernel's ext4 over
``obd serve`` + ``nbdfuse`` + ``losetup`` + ``mount -o ro``.

A layer is a list of :class:`E` entries, applied in order. The model
(:func:`model_apply`) is written from the OCI image-spec's layer.md, not from
``obd.oci.layer``; both readers and the model produce the same :data:`View`:
``{path: (kind, mode, uid, gid, mtime_ns, payload, xattrs, nlink)}`` where payload is
the content's SHA-256 (files), the target (symlinks), ``(major, minor)`` (devices).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obd.image import open_image

MTIME = 1_700_000_000


@dataclass
class E:
    """One layer entry: kind is file, dir, symlink, hardlink, char, block, fifo,
    whiteout (``.wh.NAME``) or opaque (``DIR/.wh..wh..opq``)."""

    kind: str
    path: str
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODE = {"dir": 0o755, "symlink": 0o777, "char": 0o666, "block": 0o660, "fifo": 0o644}


def layer_tar(entries: Sequence[E], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """The uncompressed OCI layer tar of ``entries`` (made by Python's ``tarfile``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for e in entries:
            if e.kind in ("whiteout", "opaque"):
                d, _, name = e.path.rpartition("/")
                wh = ".wh..wh..opq" if e.kind == "opaque" else f".wh.{name}"
                if e.kind == "opaque":
                    d = e.path
                ti = tarfile.TarInfo(f"{d}/{wh}" if d else wh)
                ti.mtime = e.mtime
                tf.addfile(ti, io.BytesIO(b""))
                continue
            ti = tarfile.TarInfo(e.path + ("/" if e.kind == "dir" else ""))
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else _DEFAULT_MODE.get(e.kind, 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.linkname = e.target
            ti.devmajor, ti.devminor = e.dev
            if e.xattrs:
                ti.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                }
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


# the model ----------------------------------------------------------------------------


@dataclass(eq=False)
class Inode:
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    data: bytes = b""
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


Tree = dict[str, Inode]
View = dict[str, tuple[Any, ...]]


def _under(tree: Tree, path: str) -> list[str]:
    return [p for p in tree if p == path or p.startswith(path + "/")]


def model_apply(tree: Tree, entries: Sequence[E]) -> None:
    """Apply one layer to ``tree`` by the OCI rules (image-spec layer.md)."""
    mine: set[str] = set()  # what this layer put: its whiteouts only hide the lowers

    def keep(p: str) -> bool:
        return p in mine or any(m.startswith(p + "/") for m in mine)

    for e in entries:
        if e.kind == "whiteout":
            if e.path not in mine:
                for p in _under(tree, e.path):
                    if not keep(p):
                        del tree[p]
            continue
        if e.kind == "opaque":
            for p in [p for p in tree if p.startswith(e.path + "/") or not e.path]:
                if not keep(p):
                    del tree[p]
            continue
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in tree:
                tree[d] = Inode("dir", 0o755, mtime=e.mtime)
                mine.add(d)
        old = tree.get(e.path)
        if e.kind == "dir" and old is not None and old.kind == "dir":
            old.mode, old.uid, old.gid, old.mtime = e.mode or 0o755, e.uid, e.gid, e.mtime
            old.xattrs.update(e.xattrs)
            mine.add(e.path)
            continue
        if e.kind == "hardlink":
            node = tree[e.target]
            for p in _under(tree, e.path):
                del tree[p]
            tree[e.path] = node
            mine.add(e.path)
            continue
        for p in _under(tree, e.path):
            del tree[p]
        tree[e.path] = Inode(
            e.kind,
            e.mode if e.mode is not None else _DEFAULT_MODE.get(e.kind, 0o644),
            e.uid,
            e.gid,
            e.mtime,
            e.data,
            e.target,
            e.dev,
            dict(e.xattrs),
        )
        mine.add(e.path)


def model_view(tree: Tree) -> View:
    counts: dict[int, int] = {}
    for node in tree.values():
        counts[id(node)] = counts.get(id(node), 0) + 1
    out: View = {}
    for p, n in tree.items():
        mode = 0o777 if n.kind == "symlink" else n.mode
        out[p] = _row(
            n.kind, mode, n.uid, n.gid, n.mtime * 1_000_000_000, n.data, n.target, n.dev,
            n.xattrs, counts[id(n)],
        )  # fmt: skip
    return out


def _row(
    kind: str,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    data: bytes,
    target: str,
    dev: tuple[int, int],
    xattrs: dict[str, bytes],
    nlink: int,
) -> tuple[Any, ...]:
    payload: Any = None
    if kind == "file":
        payload = hashlib.sha256(data).hexdigest()
    elif kind == "symlink":
        payload = target
    elif kind in ("char", "block"):
        payload = tuple(dev)
    return (
        kind,
        oct(mode),
        uid,
        gid,
        mtime_ns,
        payload,
        tuple(sorted((k, _acl(k, v)) for k, v in xattrs.items())),
        None if kind == "dir" else nlink,
    )


def _acl(name: str, value: bytes) -> bytes:
    """A POSIX ACL xattr with the ids of owner/mask/other entries made 0xffffffff: the
    kernel reports those so, libext2fs (debugfs) as 0; neither is stored on disk."""
    if not name.startswith("system.posix_acl_") or len(value) < 4:
        return value
    out = bytearray(value)
    for off in range(4, len(out) - 7, 8):
        tag = int.from_bytes(out[off : off + 2], "little")
        if tag not in (2, 8):  # ACL_USER, ACL_GROUP carry an id
            out[off + 4 : off + 8] = b"\xff\xff\xff\xff"
    return bytes(out)


# readers ------------------------------------------------------------------------------


def export_raw(config: Path, out: Path) -> Path:
    """The image's virtual disk as a sparse raw file (through obd's stack reader)."""
    st = open_image(str(config), readonly=True)
    try:
        with open(out, "wb") as f:
            f.truncate(st.size())
            for e in st.extents():
                if e.kind.value == "data":
                    pos = e.offset
                    while pos < e.end:
                        n = min(4 << 20, e.end - pos)
                        f.seek(pos)
                        f.write(st.pread(pos, n))
                        pos += n
    finally:
        st.close()
    return out


def e2fsck(raw: Path, *, strict: bool = True) -> str:
    """``e2fsck -fn``: exit 0 and, when ``strict``, no question asked at all (e2fsck exits
    0 for wrong free-block and free-inode totals in the superblock, as upstream's
    overlaybd-apply leaves them: not obd)."""
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"e2fsck -fn found problems:\n{r.stdout}\n{r.stderr}"
    if strict:
        assert "? no" not in r.stdout, f"e2fsck -fn wanted to fix:\n{r.stdout}"
    return r.stdout


def _debugfs(raw: Path, cmds: list[str], tmp: Path) -> dict[str, str]:
    """Run ``cmds`` in one debugfs; the output of each, by command."""
    script = tmp / "debugfs.cmds"
    script.write_text("\n".join(cmds) + "\n")
    r = subprocess.run(
        ["debugfs", "-f", str(script), str(raw)],
        capture_output=True,
        timeout=300,
        env=dict(os.environ, DEBUGFS_PAGER="__none__", PAGER="__none__"),
    )
    out: dict[str, str] = {}
    cur: str | None = None
    buf: list[str] = []
    for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
        if line.startswith("debugfs: "):
            if cur is not None:
                out[cur] = "\n".join(buf)
            cur, buf = line[len("debugfs: ") :], []
        else:
            buf.append(line)
    if cur is not None:
        out[cur] = "\n".join(buf)
    return out


_KINDS = {0o100000: "file", 0o040000: "dir", 0o120000: "symlink", 0o020000: "char",
          0o060000: "block", 0o010000: "fifo", 0o140000: "socket"}  # fmt: skip


def debugfs_view(raw: Path, tmp: Path) -> View:
    """Every path of the ext4 in ``raw`` (except lost+found), read with debugfs."""
    tmp.mkdir(parents=True, exist_ok=True)
    entries: dict[str, tuple[int, int, int, int]] = {}  # path -> ino, mode, uid, gid
    todo = [""]
    while todo:
        outs = _debugfs(raw, [f'ls -p "/{d}"' for d in todo], tmp)
        nxt = []
        for d in todo:
            for line in outs.get(f'ls -p "/{d}"', "").splitlines():
                f = line.split("/")
                if len(f) < 7 or f[5] in (".", "..") or f[1] == "0":  # 0: an emptied slot
                    continue
                path = f"{d}/{f[5]}" if d else f[5]
                if path == "lost+found":
                    continue
                ino, mode, uid, gid = int(f[1]), int(f[2], 8), int(f[3]), int(f[4])
                entries[path] = (ino, mode, uid, gid)
                if mode & 0o170000 == 0o040000:
                    nxt.append(path)
        todo = nxt
    inos = sorted({v[0] for v in entries.values()})
    outs = _debugfs(raw, [c for i in inos for c in (f"stat <{i}>", f"ea_list <{i}>")], tmp)
    info: dict[int, dict[str, Any]] = {}
    getters: list[str] = []
    for i in inos:
        st = outs[f"stat <{i}>"]
        d: dict[str, Any] = {}
        m = re.search(r"^ mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", st, re.M)
        assert m, st
        sec = int(m.group(1), 16)
        sec = sec - (1 << 32) if sec & 0x80000000 else sec
        extra = int(m.group(2) or "0", 16)
        d["mtime"] = (sec + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)
        d["links"] = int(re.search(r"Links: (\d+)", st).group(1))  # type: ignore[union-attr]
        d["size"] = int(re.search(r"Size: (\d+)", st).group(1))  # type: ignore[union-attr]
        m = re.search(r"Device major/minor number: (\d+):(\d+)", st)
        d["dev"] = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        m = re.search(r'Fast link dest: "(.*)"$', st, re.M)
        d["fast"] = m.group(1) if m else None
        names = re.findall(r"^  (\S+) \(\d+\)", outs[f"ea_list <{i}>"], re.M)
        d["xattrs"] = names
        for k, name in enumerate(names):
            getters.append(f"ea_get -f {tmp}/{i}.x{k} <{i}> {name}")
        info[i] = d
    dumps = []
    for ino, mode, _, _ in entries.values():
        kind = _KINDS[mode & 0o170000]
        if kind == "file" or (kind == "symlink" and info[ino]["fast"] is None):
            dumps.append(f"dump <{ino}> {tmp}/{ino}.data")
    _debugfs(raw, sorted(set(dumps)) + getters, tmp)
    view: View = {}
    for path, (ino, mode, uid, gid) in entries.items():
        d = info[ino]
        kind = _KINDS[mode & 0o170000]
        data = b""
        target = ""
        if kind == "file":
            data = (tmp / f"{ino}.data").read_bytes()
        elif kind == "symlink":
            target = d["fast"] if d["fast"] is not None else (tmp / f"{ino}.data").read_text()
        xattrs = {n: (tmp / f"{ino}.x{k}").read_bytes() for k, n in enumerate(d["xattrs"])}
        view[path] = _row(
            kind, mode & 0o7777, uid, gid, d["mtime"], data, target, d["dev"], xattrs, d["links"]
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return view


def walk_view(root: Path) -> View:
    """Every path under a mounted filesystem ``root`` (except lost+found), by the kernel."""
    import stat as S

    view: View = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == "lost+found" or rel.startswith("lost+found/"):
                continue
            st = os.lstat(p)
            kind = {S.S_IFREG: "file", S.S_IFDIR: "dir", S.S_IFLNK: "symlink", S.S_IFCHR: "char",
                    S.S_IFBLK: "block", S.S_IFIFO: "fifo"}[S.S_IFMT(st.st_mode)]  # fmt: skip
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in os.listxattr(p, follow_symlinks=False)
            }
            view[rel] = _row(
                kind,
                S.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                p.read_bytes() if kind == "file" else b"",
                os.readlink(p) if kind == "symlink" else "",
                (os.major(st.st_rdev), os.minor(st.st_rdev)),
                xattrs,
                st.st_nlink,
            )
    return view


@contextlib.contextmanager
def kernel_mount(config: Path, tmp: Path) -> Iterator[Path]:
    """The image served by ``obd serve``, attached with nbdfuse + losetup, mounted ro."""
    from tests.nbd_helpers import ServeProcess, kernel_mounted

    with (
        ServeProcess(["--listen", "127.0.0.1:0", f"{config}=disk"]) as sp,
        kernel_mounted(sp.uri("disk"), tmp) as mnt,
    ):
        yield mnt
