#!/usr/bin/env bash
# Install obd and show its main job on the bundled example: a small OCI image made here
# from examples/rootfs (two layers, the second one deleting and adding files) is
# converted into an overlaybd image, files are read out of its ext4 with obd itself,
# and the image is served over NBD and read as a disk (mounted read-only when root).
set -euo pipefail
cd "$(dirname "$0")"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e .
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt" || true; fi
    if mountpoint -q "$work/nbd" 2>/dev/null; then fusermount3 -u "$work/nbd" 2>/dev/null || umount "$work/nbd" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# 1. an OCI image layout of examples/rootfs: layer 1 is the folder, layer 2 deletes
#    srv/pattern.txt (an OCI whiteout) and adds etc/motd
python3 - "$work/image" <<'EOF'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]
os.makedirs(f"{out}/blobs/sha256")
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d
def layer(add):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    tar = buf.getvalue()
    gz = gzip.compress(tar, mtime=0)
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": blob(gz), "size": len(gz)}, "sha256:" + hashlib.sha256(tar).hexdigest()
def base(tf):
    for name in sorted(os.listdir("examples/rootfs")):
        tf.add(f"examples/rootfs/{name}", arcname=name,
               filter=lambda t: (setattr(t, "uid", 0), setattr(t, "gid", 0),
                                 setattr(t, "uname", "root"), setattr(t, "gname", "root"), t)[-1])
def top(tf):
    wh = tarfile.TarInfo("srv/.wh.pattern.txt")  # an OCI whiteout: deletes srv/pattern.txt
    tf.addfile(wh)
    motd = b"converted by obd from an OCI image\n"
    ti = tarfile.TarInfo("etc/motd"); ti.size = len(motd); ti.mode = 0o644; ti.mtime = int(os.path.getmtime("examples/rootfs/etc/hostname"))
    tf.addfile(ti, io.BytesIO(motd))
layers = [layer(base), layer(top)]
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "config": {"Cmd": ["/bin/sh"]},
                     "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
                     "history": [{"created_by": "examples/rootfs"}, {"created_by": "demo.sh"}]}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": blob(config), "size": len(config)},
                       "layers": [d for d, _ in layers]}).encode()
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": blob(manifest), "size": len(manifest),
           "annotations": {"org.opencontainers.image.ref.name": "demo"}}]},
          open(f"{out}/index.json", "w"))
open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
echo "demo: made the OCI image oci:$work/image:demo (2 gzip layers) from examples/rootfs"

# 2. convert it: each layer applied into ext4 and committed as a ZFile layer, the image
#    written as ACI's converter writes it; a local image config for obd itself
set -x
obd convert --vsize 1G --store "$work/store" --config-out "$work/config.v1.json" \
    "oci:$work/image:demo" "oci:$work/converted:demo"
obd ls "$work/config.v1.json" /etc
obd cat "$work/config.v1.json" /etc/motd
{ set +x; } 2>/dev/null
if obd cat "$work/config.v1.json" /srv/pattern.txt >/dev/null 2>&1; then
    echo "demo: FAILED: srv/pattern.txt was deleted by layer 2 but is still there" >&2; exit 1
fi
echo "demo: /srv/pattern.txt is gone (whited out by layer 2), /etc/motd is there"

# 3. serve it over NBD on a Unix socket and read the disk through the server
set -x
obd serve --socket "$work/obd.sock" "$work/config.v1.json=demo" &
{ set +x; } 2>/dev/null
server=$!
for _ in $(seq 100); do [ -S "$work/obd.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///demo?socket=$work/obd.sock"
if command -v nbdinfo >/dev/null; then
    nbdinfo "$uri" | grep -E 'export-size|is_read_only' || true
fi
if [ "$(id -u)" = 0 ] && command -v nbdfuse >/dev/null && [ -e /dev/fuse ]; then
    mkdir "$work/nbd" "$work/mnt"
    nbdfuse "$work/nbd" "$uri" &
    for _ in $(seq 100); do [ -e "$work/nbd/nbd" ] && break; sleep 0.1; done
    if mount -o ro,loop "$work/nbd/nbd" "$work/mnt" 2>/dev/null; then
        echo "demo: the served disk, mounted read-only at $work/mnt:"
        ls -l "$work/mnt/etc" "$work/mnt/srv"
        cat "$work/mnt/etc/hostname"
        umount "$work/mnt"
    else
        echo "demo: (no loop mount here; read the served disk with debugfs instead)"
        debugfs -R "cat /etc/hostname" "$work/nbd/nbd" 2>/dev/null
    fi
    fusermount3 -u "$work/nbd" 2>/dev/null || umount "$work/nbd"
elif command -v nbdcopy >/dev/null && command -v debugfs >/dev/null; then
    nbdcopy "$uri" "$work/disk.raw"
    echo "demo: copied the served disk; its /etc/hostname, read by debugfs:"
    debugfs -R "cat /etc/hostname" "$work/disk.raw" 2>/dev/null
fi
kill "$server"; wait "$server" 2>/dev/null || true; server=""
echo "demo: an OCI image became an overlaybd image (oci:$work/converted:demo), read by obd and served as a disk"
