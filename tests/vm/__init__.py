"""The kernel-test VM: Debian's kernel booted under QEMU (TCG) with a busybox initramfs, the
host's root shared read-only over 9p and the command run chrooted in it, so the host's
Python and the project run unchanged against a real Linux kernel (TCMU, tcm_loop, nbd...).

    from tests.vm import run_vm, skip_reason
    res = run_vm("python3 -c pass", rw=[repo], mods=["target_core_user"], timeout=120)
    res.rc, res.output

``/dev/kvm`` is not used: on this machine class it is PVM, which runs an ordinary guest
kernel ~1000x slower than TCG.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.vm.build import CACHE, boot_files, missing

NO_STATUS = 125
"""rc when the guest gave no exit status (panic, timeout)."""


def skip_reason() -> str | None:
    """Why the VM cannot run here (for ``pytest.skip``), or None."""
    return missing()


@dataclass
class VmResult:
    rc: int
    output: str
    """The guest's serial console (the command's stdout and stderr)."""
    ctl: Path
    """The control dir: files the guest wrote to /run/vm/ctl stay here until cleanup."""
    seconds: float
    dmesg: str

    def cleanup(self) -> None:
        shutil.rmtree(self.ctl, ignore_errors=True)


def _check_path(p: str) -> str:
    # a qemu -fsdev option value (a comma would end it) and a line of ctl/rw
    if not os.path.isabs(p) or any(c in p for c in ",\n"):
        raise ValueError(f"VM share path must be absolute, without commas or newlines: {p!r}")
    return p


def qemu_argv(
    ctl: Path,
    rw: Sequence[str | os.PathLike[str]] = (),
    mods: Sequence[str] = (),
    mem: str = "512M",
    smp: int = 1,
    verbose: bool = False,
) -> list[str]:
    files = boot_files()
    append = [
        "console=ttyS0",
        "panic=-1",
        "oops=panic",
        "mitigations=off",
        "nokaslr",
        "tsc=reliable",
        "no_timer_check",
        "i8042.noaux",
        "i8042.nokbd",
    ]
    if not verbose:
        append += ["quiet", "loglevel=0"]
    if mods:
        append.append("vmmods=" + ",".join(mods))
    fs = [
        "-fsdev", f"local,id=ctl,path={ctl},security_model=none",
        "-device", "virtio-9p-pci,fsdev=ctl,mount_tag=ctl",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]  # fmt: skip
    if len(rw) > 10:
        raise ValueError("at most 10 read-write shares")
    # where each rw share goes, in the control dir (not on the kernel command line, where
    # a dot in a path, as in mktemp's tmp.XXXX, would make it a module parameter)
    places = []
    for i, d in enumerate(rw):
        p = _check_path(os.path.realpath(d))
        places.append(f"{i} {p}\n")
        fs += [
            "-fsdev", f"local,id=rw{i},path={p},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}",
        ]  # fmt: skip
    (ctl / "rw").write_text("".join(places))
    return [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "max",
        "-smp", str(smp), "-m", mem,
        "-nodefaults", "-no-user-config", "-net", "none", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", str(files.kernel), "-initrd", str(files.initrd),
        "-append", " ".join(append), *fs,
    ]  # fmt: skip


def run_vm(
    command: str | Sequence[str],
    *,
    rw: Sequence[str | os.PathLike[str]] = (),
    mods: Sequence[str] = (),
    timeout: float = 300,
    mem: str = "512M",
    smp: int = 1,
    verbose: bool = False,
    env: dict[str, str] | None = None,
) -> VmResult:
    """Boot, run ``command`` (a shell snippet, or an argv) chrooted in the host root with
    cwd ``/``, power off. ``rw`` dirs are shared read-write at their own paths.

    The qemu process is killed by its pid when ``timeout`` passes (rc NO_STATUS then).
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    ctl = Path(tempfile.mkdtemp(prefix="ctl-", dir=CACHE))
    script = command if isinstance(command, str) else shlex.join(command)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    (ctl / "cmd.sh").write_text(exports + script + "\n")
    argv = qemu_argv(ctl, rw, mods, mem, smp, verbose)
    out_path = ctl / "console"
    t0 = time.monotonic()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except BaseException:  # interrupted (e.g. the test's time limit): leave nothing
            stop_pid(proc)
            shutil.rmtree(ctl, ignore_errors=True)
            raise
        finally:
            stop_pid(proc)
    seconds = time.monotonic() - t0
    output = out_path.read_bytes().decode(errors="replace").replace("\r", "")
    rc_file = ctl / "rc"
    text = rc_file.read_text().strip() if rc_file.exists() else ""
    rc = int(text) if text.isdigit() else NO_STATUS
    dmesg_file = ctl / "dmesg"
    dmesg = dmesg_file.read_text(errors="replace") if dmesg_file.exists() else ""
    return VmResult(rc, output, ctl, seconds, dmesg)


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 5) -> int:
    """Stop a child by its pid: SIGTERM, then SIGKILL after ``timeout`` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


__all__ = ["NO_STATUS", "VmResult", "qemu_argv", "run_vm", "skip_reason", "stop_pid"]
