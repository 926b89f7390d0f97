#!/usr/bin/env bash
# Install obd and run it on the bundled example: a small ext4 disk becomes a layer,
# is committed and compressed, and is flattened back to a raw disk identical to the
# original.
set -euo pipefail
cd "$(dirname "$0")"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e .
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
disk="$work/disk.raw"
if command -v mkfs.ext4 >/dev/null; then
    truncate -s 32M "$disk"
    mkfs.ext4 -q -F -E root_owner=0:0 -d examples/rootfs "$disk"
else
    # no e2fsprogs: a raw disk of the example files laid end to end
    cat examples/rootfs/*/* > "$disk"
    truncate -s 32M "$disk"
fi
set -x
obd create --from "$disk" "$work/layer.data" "$work/layer.index" 32M
obd commit -m "demo layer" "$work/layer.data" "$work/layer.index" "$work/layer.lsmt"
obd zfile "$work/layer.lsmt" "$work/layer.zfile"
obd merge --raw -o "$work/back.raw" "$work/layer.zfile"
cmp "$disk" "$work/back.raw"
{ set +x; } 2>/dev/null
if obd inspect --help >/dev/null 2>&1; then obd inspect "$work/layer.zfile"; fi
echo "demo: the disk came back byte for byte through create, commit, zfile and merge"
