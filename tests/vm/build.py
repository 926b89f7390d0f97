"""Build the test VM's boot files: an uncompressed vmlinux (booted through PVH, which skips
the in-guest decompression: seconds under TCG) and a busybox initramfs with the kernel
modules the kernel tests need (signatures stripped: their checks cost time under TCG).

Both are cached under ``/var/tmp/obd-vm/<kernel version>-<hash of init + module list>/``
and written by rename, so concurrent runs never boot half a file.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT = HERE / "init.sh"
CACHE = Path(os.environ.get("OBD_VM_CACHE", "/var/tmp/obd-vm"))

MODULES = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "configfs",
    "uio",
    "target_core_mod",
    "target_core_user",
    "tcm_loop",
    "target_core_file",
    "target_core_iblock",
    "nbd",
    "loop",
    "sd_mod",
    "sg",
    "scsi_mod",
    "crct10dif_generic",
    "crc32c_generic",
    "ext4",
]

SIG_MAGIC = b"~Module signature appended~\n"


@dataclass(frozen=True)
class BootFiles:
    kver: str
    kernel: Path
    initrd: Path


def kernel_version() -> str | None:
    """The installed kernel package's version (``OBD_VM_KVER`` picks one), or None."""
    want = os.environ.get("OBD_VM_KVER")
    mods = Path("/lib/modules")
    versions = sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []
    for v in [want] if want else versions:
        if (mods / v / "modules.dep").is_file() and Path(f"/boot/vmlinuz-{v}").is_file():
            return v
    return None


def missing() -> str | None:
    """Why a VM cannot be built here, or None."""
    for tool in ("qemu-system-x86_64", "busybox", "cpio"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-system-x86 busybox-static cpio)"
    if kernel_version() is None:
        return (
            "no kernel with modules in /boot and /lib/modules (apt-get install linux-image-amd64)"
        )
    return None


def _key(kver: str) -> str:
    h = hashlib.sha256(INIT.read_bytes())
    h.update(" ".join(MODULES).encode())
    h.update(Path(__file__).read_bytes())
    return f"{kver}-{h.hexdigest()[:12]}"


def boot_files() -> BootFiles:
    kver = kernel_version()
    if kver is None:
        raise RuntimeError(missing() or "no kernel")
    key = _key(kver)
    d = CACHE / key
    if not d.exists():  # an older init or module list: its files are no use any more
        for old in CACHE.glob(f"{kver}-*"):
            shutil.rmtree(old, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    kernel = d / "vmlinux"
    if not kernel.exists():
        _write(kernel, extract_vmlinux(Path(f"/boot/vmlinuz-{kver}").read_bytes()))
    initrd = d / "initramfs.cpio"
    if not initrd.exists():
        _write(initrd, build_initramfs(kver))
    return BootFiles(kver, kernel, initrd)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def extract_vmlinux(bz: bytes) -> bytes:
    """The ELF payload of an xz- or gzip-compressed bzImage."""
    i = bz.find(b"\xfd7zXZ\x00")
    if i >= 0:
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bz[i:])
    else:
        i = bz.find(b"\x1f\x8b\x08")
        if i < 0:
            raise RuntimeError("bzImage has no xz or gzip payload")
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bz[i:])
    if data[:4] != b"\x7fELF":
        raise RuntimeError("bzImage payload is not an ELF vmlinux")
    return data


def strip_signature(ko: bytes) -> bytes:
    if not ko.endswith(SIG_MAGIC):
        return ko
    tail = ko[-len(SIG_MAGIC) - 12 : -len(SIG_MAGIC)]
    signer_len, keyid_len = tail[3], tail[4]
    sig_len = int.from_bytes(tail[8:12], "big")
    return ko[: len(ko) - len(SIG_MAGIC) - 12 - sig_len - signer_len - keyid_len]


def _module_closure(moddir: Path) -> dict[str, str]:
    """modules.dep path -> its line, for MODULES and everything they depend on."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path)).replace("-", "_")
        deps[name] = (path, rest.split())
    out: dict[str, str] = {}

    def add(name: str) -> None:
        if name not in deps:
            return  # built in
        path, needs = deps[name]
        if path in out:
            return
        out[path] = f"{path}: {' '.join(needs)}".rstrip()
        for n in needs:
            add(re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(n)).replace("-", "_"))

    for m in MODULES:
        add(m)
    return out


def build_initramfs(kver: str) -> bytes:
    busybox = shutil.which("busybox")
    assert busybox is not None
    if b"/lib64/ld-linux" in Path(busybox).read_bytes():
        raise RuntimeError(f"{busybox} is not static (apt-get install busybox-static)")
    moddir = Path("/lib/modules") / kver
    with tempfile.TemporaryDirectory(prefix="obd-vm-") as w:
        root = Path(w)
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "run", "etc", f"lib/modules/{kver}"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, root / "bin/busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout
        for a in applets.split():
            if a != "busybox":
                os.symlink("busybox", root / "bin" / a)
        for a in ("modprobe", "insmod", "poweroff", "mdev"):
            os.symlink("../bin/busybox", root / "sbin" / a)
        lines = []
        for path, line in _module_closure(moddir).items():
            data = (moddir / path).read_bytes()
            if path.endswith(".xz"):
                data = lzma.decompress(data)
            elif path.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True).stdout
            plain = re.sub(r"\.ko\.\w+$", ".ko", path)
            out = root / "lib/modules" / kver / plain
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(strip_signature(data))
            lines.append(re.sub(r"\.ko\.(xz|zst)", ".ko", line))
        (root / "lib/modules" / kver / "modules.dep").write_text("\n".join(lines) + "\n")
        for extra in ("modules.alias", "modules.builtin", "modules.softdep", "modules.symbols"):
            if (moddir / extra).exists():
                shutil.copy(moddir / extra, root / "lib/modules" / kver / extra)
        shutil.copy(INIT, root / "init")
        os.chmod(root / "init", 0o755)
        names = subprocess.run(
            ["find", ".", "-print0"], cwd=root, capture_output=True, check=True
        ).stdout
        return subprocess.run(
            ["cpio", "--null", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=names,
            capture_output=True,
            check=True,
        ).stdout
