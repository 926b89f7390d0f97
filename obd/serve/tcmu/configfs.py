"""Creating and removing TCMU devices through configfs, the steps containerd's
accelerated-container-image (ACI) does (docs/tcmu.md):

1. ``mkdir core/user_<hba>/dev_<id>``; write ``dev_config=overlaybd/<config>[;<dev_id>]``,
   ``dev_size=<bytes>`` and ``max_data_area_mb=<n>`` to its ``control``; a unique hex unit
   serial to ``wwn/vpd_unit_serial`` (devices with equal serials get the same WWID and
   multipath merges them); ``1`` to ``enable`` (the kernel asks the handler, over netlink,
   to open the image; a refusal fails this write).
2. a ``tcm_loop`` target ``loopback/naa.<wwn>/tpgt_1``, its ``nexus``, then
   ``lun/lun_0`` symlinked to the device: the kernel adds a SCSI disk, ``/dev/sdX``.

Removal is the reverse. Every failure names the configfs path and the errno.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass

from obd.errors import FileAccessError, ObdError

TARGET = "/sys/kernel/config/target"
SUBTYPE = "overlaybd"
CONFIG_LEN = 256  # the kernel's TCMU_CONFIG_LEN, with the NUL
DEFAULT_HBA = 1
DEFAULT_MAX_DATA_AREA_MB = 64
DEFAULT_HW_MAX_SECTORS = 2048
"""1 MiB commands (the kernel's default, 128 sectors, makes 64 KiB ones: 5x slower)."""
MODPROBE_HINT = "modprobe target_core_user tcm_loop"


class ConfigfsError(FileAccessError):
    """A configfs step failed (exit code 3); the message names the path and the errno."""


class TcmuUnavailableError(FileAccessError):
    """This kernel has no TCMU (target_core_user not loaded; exit code 3)."""


def _fail(op: str, path: str, e: OSError) -> ConfigfsError:
    return ConfigfsError(
        f"{op} failed: {e.strerror or e} (errno {e.errno} {errno.errorcode.get(e.errno or 0, '')})",
        path=path,
    )


def write_attr(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise _fail("open", path, e) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise _fail(f"write {value!r}", path, e) from None
    finally:
        os.close(fd)


def read_attr(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise _fail("read", path, e) from None


def _mkdir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _fail("mkdir", path, e) from None


def _rmdir(path: str, *, quiet: tuple[int, ...] = (errno.ENOENT,)) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in quiet:
            raise _fail("rmdir", path, e) from None


def _module_present(name: str) -> bool:
    """Loaded, or built into the running kernel."""
    if os.path.isdir(f"/sys/module/{name}"):
        return True
    try:
        with open(f"/lib/modules/{os.uname().release}/modules.builtin") as f:
            return any(line.rstrip().endswith(f"/{name}.ko") for line in f)
    except OSError:
        return False


def tcmu_missing(target: str = TARGET) -> str | None:
    """Why TCMU devices cannot be made on this machine (one line), or None."""
    if not os.path.isdir(f"{target}/core"):
        return (
            f"{target}/core is missing: the kernel module target_core_user is not loaded "
            f"(load it with `{MODPROBE_HINT}`; configfs must be mounted on /sys/kernel/config)"
        )
    if target == TARGET and not _module_present("target_core_user"):
        return f"the kernel module target_core_user is not loaded (load it with `{MODPROBE_HINT}`)"
    return None


def require_tcmu(target: str = TARGET) -> None:
    why = tcmu_missing(target)
    if why:
        raise TcmuUnavailableError(why)


def cfgstring(config_path: str, dev_id: str | None = None) -> str:
    """``overlaybd/<config path>[;<dev_id>]`` as the kernel's dev_config holds it."""
    s = f"{SUBTYPE}/{config_path}" + (f";{dev_id}" if dev_id else "")
    if len(s) >= CONFIG_LEN or "," in s or "\n" in s:
        raise ObdError(
            f"dev_config {s!r} must be under {CONFIG_LEN} bytes, without ',' or newline",
            path=config_path,
        )
    return s


def parse_cfgstring(cfg: str) -> tuple[str, str | None]:
    """(config path, dev_id or None) of ``<subtype>/<config path>[;<dev_id>]``."""
    _, _, rest = cfg.partition("/")
    path, sep, dev_id = rest.partition(";")
    return path, (dev_id if sep else None)


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass
class Attachment:
    """A TCMU device and its tcm_loop target, as configfs holds them."""

    name: str
    """``user_<hba>/dev_<id>``"""
    device_dir: str
    config: str
    """The device's dev_config (``overlaybd/<config>[;<dev_id>]``), "" when unknown."""
    naa: str | None = None
    lun_link: str | None = None
    block: str | None = None
    """``/dev/sdX`` when the SCSI disk is there."""

    @property
    def config_path(self) -> str:
        return parse_cfgstring(self.config)[0]


def _dev_config(device_dir: str) -> str:
    try:
        return read_attr(f"{device_dir}/attrib/dev_config").strip()
    except ConfigfsError:
        pass
    try:
        info = read_attr(f"{device_dir}/info")
    except ConfigfsError:
        return ""
    for word in info.replace("\n", " ").split("  "):
        word = word.strip()
        if word.startswith("Config: "):
            return word[len("Config: ") :].split(" Size:")[0].strip()
    return ""


def _loop_targets(target: str) -> dict[str, tuple[str, str]]:
    """realpath of a device dir -> (naa dir, lun link) for each tcm_loop LUN 0."""
    out: dict[str, tuple[str, str]] = {}
    loop = f"{target}/loopback"
    if not os.path.isdir(loop):
        return out
    for naa in os.listdir(loop):
        lun = f"{loop}/{naa}/tpgt_1/lun/lun_0"
        if not os.path.isdir(lun):
            continue
        for e in os.listdir(lun):
            p = f"{lun}/{e}"
            if os.path.islink(p):
                out[os.path.realpath(p)] = (f"{loop}/{naa}", p)
    return out


def block_device(naa_dir: str) -> str | None:
    """The ``/dev/sdX`` of a tcm_loop target's LUN 0, or None (yet)."""
    try:
        addr = read_attr(f"{naa_dir}/tpgt_1/address").strip()
    except ConfigfsError:
        return None
    host, _, tgt = addr.partition(":0:")
    if not host.isdigit():
        return None
    blk = f"/sys/bus/scsi/devices/{host}:0:{tgt}:0/block"
    try:
        names = os.listdir(blk)
    except OSError:
        return None
    return f"/dev/{names[0]}" if names else None


def attachments(target: str = TARGET) -> list[Attachment]:
    """Every ``user_*`` device there is, with its tcm_loop target when it has one."""
    core = f"{target}/core"
    loops = _loop_targets(target)
    out = []
    for hba in sorted(os.listdir(core)) if os.path.isdir(core) else []:
        if not hba.startswith("user_"):
            continue
        for dev in sorted(os.listdir(f"{core}/{hba}")):
            d = f"{core}/{hba}/{dev}"
            if not os.path.isdir(d) or dev == "hba_info" or not os.path.exists(f"{d}/control"):
                continue
            a = Attachment(f"{hba}/{dev}", d, _dev_config(d))
            hit = loops.get(os.path.realpath(d))
            if hit:
                a.naa, a.lun_link = hit
                a.block = block_device(a.naa)
            out.append(a)
    return out


def attach(
    config_path: str,
    size: int,
    *,
    dev_id: str | None = None,
    hba: int = DEFAULT_HBA,
    name: str | None = None,
    max_data_area_mb: int = DEFAULT_MAX_DATA_AREA_MB,
    cmd_ring_size_mb: int | None = None,
    hw_max_sectors: int | None = DEFAULT_HW_MAX_SECTORS,
    wait: float = 30.0,
    lun: bool = True,
    target: str = TARGET,
) -> Attachment:
    """Create the device and (with ``lun``) its tcm_loop LUN; waits up to ``wait`` s for
    ``/dev/sdX``.

    On failure, what was made is removed again.
    """
    require_tcmu(target)
    config_path = os.path.abspath(config_path)
    cfg = cfgstring(config_path, dev_id)
    key = f"{config_path};{dev_id or ''}"
    name = name or f"dev_{_hex(key, 12)}"
    d = f"{target}/core/user_{hba}/{name}"
    if os.path.exists(d):
        raise ConfigfsError("already exists: detach it first", path=d)
    naa_dir = f"{target}/loopback/naa.5001405{_hex(key, 9)}"
    att = Attachment(f"user_{hba}/{name}", d, cfg, naa=naa_dir)
    try:
        _mkdir(d)
        write_attr(f"{d}/control", f"dev_config={cfg}")
        write_attr(f"{d}/control", f"dev_size={size}")
        write_attr(f"{d}/control", f"max_data_area_mb={max_data_area_mb}")
        if cmd_ring_size_mb is not None:  # kernel memory, 8 MiB per device by default
            write_attr(f"{d}/control", f"cmd_ring_size_mb={cmd_ring_size_mb}")
        if hw_max_sectors is not None:  # the largest command the disk advertises (VPD B0)
            write_attr(f"{d}/control", f"hw_max_sectors={hw_max_sectors}")
        write_attr(f"{d}/wwn/vpd_unit_serial", _hex(key, 32))
        write_attr(f"{d}/enable", "1")
        if lun:
            link_lun(att, wait=wait, target=target)
        else:
            att.naa = None
        return att
    except BaseException:
        try:
            detach(att, target=target)
        except ObdError:
            pass
        raise


def link_lun(att: Attachment, *, wait: float = 30.0, target: str = TARGET) -> str:
    """Give an enabled device a tcm_loop target and LUN 0 (nexus first, then the LUN
    symlink); wait up to ``wait`` s for its ``/dev/sdX``, which is returned."""
    name = os.path.basename(att.device_dir)
    naa_dir = att.naa or f"{target}/loopback/naa.5001405{_hex(att.device_dir, 9)}"
    att.naa = naa_dir
    if not os.path.isdir(f"{target}/loopback"):
        _mkdir(f"{target}/loopback")  # loads tcm_loop when it is a module
    _mkdir(f"{naa_dir}/tpgt_1/lun/lun_0")
    write_attr(f"{naa_dir}/tpgt_1/nexus", os.path.basename(naa_dir))
    link = f"{naa_dir}/tpgt_1/lun/lun_0/{name}"
    try:
        os.symlink(att.device_dir, link)
    except OSError as e:
        raise _fail(f"symlink to {att.device_dir}", link, e) from None
    att.lun_link = link
    deadline = time.monotonic() + wait
    while True:
        att.block = block_device(naa_dir)
        if att.block and os.path.exists(att.block):
            return att.block
        if time.monotonic() > deadline:
            raise ConfigfsError(
                f"no SCSI disk appeared in {wait:g} s (is a handler for {SUBTYPE} devices, "
                "`obd serve --tcmu`, running and answering?)",
                path=naa_dir,
            )
        time.sleep(0.05)


def image_size(config_path: str) -> int:
    """The virtual size of the image ``config_path`` names (opened read-only, closed)."""
    from obd.image import open_image

    img = open_image(config_path, readonly=True)
    try:
        return int(img.size())
    finally:
        img.close()


def attach_image(config_path: str, size: int | None = None, **options: object) -> Attachment:
    """:func:`attach` with the image's own size by default; a refused ``enable`` (the
    handler could not open the image, or none is running) says what the resultFile says."""
    require_tcmu(str(options.get("target", TARGET)))
    if size is None:
        size = image_size(config_path)
    try:
        return attach(config_path, size, **options)  # type: ignore[arg-type]
    except ConfigfsError as e:
        if not (e.path or "").endswith("/enable"):
            raise
        from obd.image.config import load_image_config

        try:
            result = load_image_config(config_path).resultFile
            with open(result) as f:
                text = f.read().strip()
        except (ObdError, OSError):
            raise e from None
        raise ConfigfsError(f"{e.message}; resultFile {result}: {text}", path=e.path) from None


def detach(att: Attachment, *, target: str = TARGET) -> None:
    """Remove the LUN, the tcm_loop target and the device (whatever of them exists)."""
    naa = att.naa
    if naa and os.path.isdir(f"{naa}/tpgt_1/lun/lun_0"):
        lun = f"{naa}/tpgt_1/lun/lun_0"
        for e in os.listdir(lun):
            p = f"{lun}/{e}"
            if os.path.islink(p):
                try:
                    os.unlink(p)
                except OSError as ex:
                    raise _fail("unlink", p, ex) from None
        _rmdir(lun)
    if naa and os.path.isdir(f"{naa}/tpgt_1"):
        _rmdir(f"{naa}/tpgt_1")
    if naa and os.path.isdir(naa):
        _rmdir(naa)
    if os.path.isdir(att.device_dir):
        _rmdir(att.device_dir)
    _rmdir(os.path.dirname(att.device_dir), quiet=(errno.ENOENT, errno.ENOTEMPTY, errno.EBUSY))


def find_or_none(what: str, target: str = TARGET) -> Attachment | None:
    try:
        return find(what, target)
    except ConfigfsError:
        return None


def find(what: str, target: str = TARGET) -> Attachment:
    """The attachment of a ``/dev/sdX``, an image config path, or a ``user_N/dev_X`` name."""
    real = os.path.realpath(what)
    for a in attachments(target):
        if a.name == what or (a.block and os.path.realpath(a.block) == real):
            return a
        if a.config and os.path.realpath(a.config_path) == real:
            return a
    raise ConfigfsError("no TCMU device is attached for it", path=what)


__all__ = [
    "Attachment",
    "ConfigfsError",
    "TcmuUnavailableError",
    "attach",
    "attach_image",
    "attachments",
    "cfgstring",
    "detach",
    "find",
    "find_or_none",
    "link_lun",
    "parse_cfgstring",
    "require_tcmu",
    "tcmu_missing",
]
