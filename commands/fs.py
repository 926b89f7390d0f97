"""``obd ls`` / ``obd cat``: read the ext4 filesystem inside an image, rootless."""

from __future__ import annotations

import json
import stat
import sys
import time

import click

_TYPE_CHAR = {
    "file": "-",
    "dir": "d",
    "symlink": "l",
    "char": "c",
    "block": "b",
    "fifo": "p",
    "socket": "s",
}


@click.command(short_help="List a folder inside an image's ext4 filesystem.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path", default="/")
def ls(as_json: bool, image: str, path: str) -> None:
    """List PATH (default /) inside the ext4 filesystem of IMAGE, as ls -l does.

    IMAGE is an image config (its whole stack), a read-only layer file, or a
    writable layer's data file (X.data, its index X.index). Read in userspace
    through libext2fs: no mount, no root.

    \b
    JSON (--json): {"image", "path", "entries": [{name, type (file, dir, symlink,
      char, block, fifo, socket), mode (octal string, permission bits with
      setuid/setgid/sticky), uid, gid, size, links, mtime_ns, target (symlinks),
      devmajor, devminor, inode}]}
    """
    from obd.oci.ext4 import image_fs, list_path

    with image_fs(image) as fs:
        rows = list_path(fs, path)
    if as_json:
        entries = [
            {
                "name": name,
                "type": st.kind.value,
                "mode": f"{st.mode:04o}",
                "uid": st.uid,
                "gid": st.gid,
                "size": st.size,
                "links": st.links,
                "mtime_ns": st.mtime_ns,
                "target": target or None,
                "devmajor": st.devmajor,
                "devminor": st.devminor,
                "inode": st.ino,
            }
            for name, st, target in rows
        ]
        click.echo(json.dumps({"image": image, "path": path, "entries": entries}, indent=2))
        return
    for name, st, target in rows:
        kind = _TYPE_CHAR.get(st.kind.value, "?")
        perms = stat.filemode(st.mode | stat.S_IFREG)[1:]
        size = f"{st.devmajor}, {st.devminor}" if kind in "cb" else str(st.size)
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.mtime_ns // 1_000_000_000))
        line = f"{kind}{perms} {st.links:>3} {st.uid:>5} {st.gid:>5} {size:>10} {when} {name}"
        if target:
            line += f" -> {target}"
        click.echo(line)


@click.command(short_help="Print a file inside an image's ext4 filesystem.")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("path")
def cat(image: str, path: str) -> None:
    """Write the file PATH inside the ext4 filesystem of IMAGE to stdout.

    IMAGE is an image config (its whole stack), a read-only layer file, or a
    writable layer's data file (X.data, its index X.index). Symlinks are followed
    inside the image. Read in userspace through libext2fs: no mount, no root.
    """
    from obd.oci.ext4 import image_fs, read_path

    out = sys.stdout.buffer
    with image_fs(image) as fs:
        for chunk in read_path(fs, path):
            out.write(chunk)
    out.flush()
