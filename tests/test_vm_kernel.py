"""The kernel tests: ONE VM boot (tests/vm) runs every test of tests/vm_tests against a real
Linux kernel (TCMU + tcm_loop, nbd); each in-VM test is reported here as its own result.

Tests that check on the host what the VM left behind (a commit of what was written through
a TCMU disk) run after the VM is gone, from the shared scratch folder.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vectors import VECTORS
from tests.vm import NO_STATUS, run_vm, skip_reason

REPO = Path(__file__).resolve().parent.parent
IN_VM_DIR = REPO / "tests" / "vm_tests"
MODULES = [
    "target_core_user",
    "tcm_loop",
    "target_core_file",
    "nbd",
    "loop",
    "sd_mod",
    "sg",
    "crc32c_generic",
    "ext4",
]
VM_TIMEOUT = float(os.environ.get("OBD_VM_TIMEOUT", "330"))
# the module fixture boots the VM inside the first test's time limit
pytestmark = pytest.mark.timeout(VM_TIMEOUT + 60)


def in_vm_tests() -> list[str]:
    """``file::test`` of each test function in tests/vm_tests/test_in_vm_*.py."""
    out = []
    for f in sorted(IN_VM_DIR.glob("test_in_vm_*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.append(f"{f.stem}::{node.name}")
    return out


@dataclass
class VmRun:
    rc: int
    output: str
    seconds: float
    scratch: Path
    results: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """``file::test`` -> (outcome, message) per case (several for a parametrized test)."""
    error: str = ""


def _parse_junit(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        stem = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "").split("[", 1)[0]
        outcome, msg = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                msg = (el.get("message") or "") + "\n" + (el.text or "")
                break
        out.setdefault(f"{stem}::{name}", []).append((outcome, msg.strip()))
    return out


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    why = skip_reason()
    if why:
        pytest.skip(f"no kernel VM here: {why}")
    scratch = tmp_path_factory.mktemp("vmscratch", numbered=True)
    env = {
        "OBD_IN_VM": "1",
        "OBD_VM_SCRATCH": str(scratch),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("OBD_VM_NDEV"):
        env["OBD_VM_NDEV"] = os.environ["OBD_VM_NDEV"]
    shares = [REPO, scratch]
    if VECTORS.is_dir():
        # shared at its real path: the host root the guest sees has /tmp replaced by a
        # tmpfs, so ../shared beside a clone in /tmp would not be there
        vectors = VECTORS.resolve()
        shares.append(vectors)
        env["OBD_VECTORS"] = str(vectors)
    cmd = (
        f"cd {REPO} && {sys.executable} -m pytest -q -p no:cacheprovider -o addopts= "
        f"-o testpaths=tests/vm_tests --timeout=150 -rfEs --durations=0 "
        f"--junitxml=/run/vm/ctl/junit.xml " + os.environ.get("OBD_VM_SELECT", "tests/vm_tests")
    )
    res = run_vm(cmd, rw=shares, mods=MODULES, timeout=VM_TIMEOUT, env=env)
    run = VmRun(res.rc, res.output, res.seconds, scratch)
    junit = res.ctl / "junit.xml"
    try:
        if junit.exists():
            run.results = _parse_junit(junit)
        (scratch / "vm-console.txt").write_text(res.output)
        (scratch / "vm-dmesg.txt").write_text(res.dmesg)
        if res.rc == NO_STATUS:
            run.error = f"the VM gave no exit status after {res.seconds:.0f} s (panic or timeout)"
        elif not run.results:
            run.error = f"the in-VM pytest wrote no results (exit {res.rc})"
    finally:
        res.cleanup()
    print(f"\nkernel VM: {res.seconds:.1f} s, in-VM pytest exit {res.rc}", file=sys.stderr)
    return run


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.parametrize("name", in_vm_tests())
def test_in_vm(vm_run: VmRun, name: str) -> None:
    cases = vm_run.results.get(name)
    if not cases:
        pytest.fail(f"{name}: no result from the VM. {vm_run.error}\n{_tail(vm_run.output)}")
    failed = [m for o, m in cases if o == "failed"]
    if failed:
        pytest.fail(f"{name} failed in the VM:\n" + "\n\n".join(failed), pytrace=False)
    if all(o == "skipped" for o, _ in cases):
        pytest.skip(f"skipped in the VM: {cases[0][1]}")


def test_vm_commit_of_written_disk(vm_run: VmRun) -> None:
    """On the host, after the VM: commit the writable layer a TCMU disk was written
    through and read the committed image back: the bytes written in the VM are there."""
    from obd.image import open_image, ops
    from tests.nbd_helpers import image_config

    note = vm_run.scratch / "written.json"
    writer = vm_run.results.get("test_in_vm_tcmu::test_write_sync_detach", [])
    if not note.exists() and writer and all(o == "skipped" for o, _ in writer):
        pytest.skip(f"the VM's write test was skipped: {writer[0][1]}")
    if not note.exists():
        pytest.fail(f"the VM left no {note.name} (its write test did not run)\n{vm_run.error}")
    info = json.loads(note.read_text())
    layer = vm_run.scratch / "committed.lsmt"
    ops.commit(info["data"], info["index"], str(layer))
    cfg = image_config(vm_run.scratch, "committed", lowers=[*info["lowers"], str(layer)])
    img = open_image(str(cfg))
    try:
        for w in info["writes"]:
            got = img.pread(w["offset"], w["length"])
            assert got == bytes.fromhex(w["pattern"]) * (
                w["length"] // len(bytes.fromhex(w["pattern"]))
            )
    finally:
        img.close()


def test_serve_tcmu_without_the_module() -> None:
    """On a kernel without target_core_user, obd serve --tcmu exits 3 at once with one
    line saying how to load it (this host; the VM has the module)."""
    from tests.conftest import assert_one_line_error, run_obd

    if os.path.isdir("/sys/kernel/config/target/core"):
        pytest.skip("this kernel has TCMU loaded")
    r = run_obd("serve", "--tcmu", timeout=60)
    assert_one_line_error(r, 3, "target_core_user", "modprobe target_core_user")
    r = run_obd("attach", "--size", "1M", "/nonexistent.json", timeout=60)
    assert_one_line_error(r, 3, "modprobe target_core_user")


def test_tcmu_systemd_unit_ships_in_the_package() -> None:
    from importlib.resources import files

    unit = files("obd").joinpath("data/obd-tcmu.service").read_text()
    assert "ExecStart=/usr/bin/env obd serve --tcmu" in unit
    assert "Restart=always" in unit and "modprobe target_core_user" in unit


# -- host-side checks of the kernel-facing parts that need no kernel ------------------------


def test_netlink_messages_round_trip() -> None:
    """An ADDED_DEVICE message as the kernel builds it parses into its DeviceEvent; an
    NLMSG_ERROR becomes its errno."""
    import struct

    from obd.serve.tcmu import netlink as nl
    from obd.serve.tcmu import uapi

    name = b"tcm-user/1/dev_x/overlaybd//a/b.json;7\0"
    attrs = (
        nl.pack_attr(uapi.TCMU_ATTR_DEVICE, name)
        + nl.pack_attr(uapi.TCMU_ATTR_MINOR, struct.pack("=I", 3))
        + nl.pack_attr(uapi.TCMU_ATTR_DEVICE_ID, struct.pack("=I", 42))
        + nl.pack_attr(uapi.TCMU_ATTR_DEV_SIZE, struct.pack("=Q", 1 << 30))
    )
    body = nl.GENLMSGHDR.pack(uapi.TCMU_CMD_ADDED_DEVICE, 2, 0) + attrs
    msg = nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(body), 0x1A, 0, 9, 0) + body
    err = (
        nl.NLMSGHDR.pack(nl.NLMSGHDR.size + 20, nl.NLMSG_ERROR, 0, 9, 0)
        + struct.pack("=i", -19)
        + bytes(16)
    )
    parsed = nl.parse_messages(msg + err)
    assert parsed[1] == -19
    m = parsed[0]
    assert isinstance(m, nl.Message) and m.type == 0x1A and m.seq == 9
    ev = nl.DeviceEvent.from_message(m)
    assert (ev.device, ev.minor, ev.dev_id, ev.dev_size) == (name[:-1].decode(), 3, 42, 1 << 30)
    # a truncated attribute ends the parse instead of raising
    assert nl.parse_attrs(attrs[:-3])[uapi.TCMU_ATTR_DEVICE] == name


def test_uio_names_and_cfgstrings() -> None:
    from obd.errors import ObdError
    from obd.serve.tcmu.configfs import cfgstring, parse_cfgstring
    from obd.serve.tcmu.uio import UioName

    n = UioName.parse("tcm-user/3/dev_a/overlaybd//root/config.v1.json;dev9")
    assert n == UioName(3, "dev_a", "overlaybd", "/root/config.v1.json;dev9")
    assert parse_cfgstring(f"overlaybd/{n.cfgstring}") == ("/root/config.v1.json", "dev9")
    assert parse_cfgstring("overlaybd//x.json") == ("/x.json", None)
    assert UioName.parse("uio_pdrv_genirq") is None
    assert UioName.parse("tcm-user/x/dev/overlaybd/c") is None
    assert cfgstring("/a.json", "7") == "overlaybd//a.json;7"
    with pytest.raises(ObdError, match="256"):
        cfgstring("/" + "a" * 300)
    with pytest.raises(ObdError, match=","):
        cfgstring("/a,b.json")


def test_configfs_failures_name_path_and_errno(tmp_path: Path) -> None:
    """Against a plain folder standing in for configfs: a step that fails says which
    path, which step and which errno, and what attach made is removed again."""
    from obd.serve.tcmu import configfs

    target = tmp_path / "target"
    (target / "core").mkdir(parents=True)
    with pytest.raises(configfs.ConfigfsError) as ei:
        configfs.write_attr(str(tmp_path / "no" / "control"), "x")
    assert "no/control: open failed" in str(ei.value) and "ENOENT" in str(ei.value)
    assert ei.value.exit_code == 3
    # a plain folder has no control file: the first write fails, the device dir goes
    with pytest.raises(configfs.ConfigfsError, match=r"/control: open failed: .*ENOENT"):
        configfs.attach(str(tmp_path / "c.json"), 1 << 20, target=str(target))
    assert os.listdir(target / "core") == []


def test_tcmu_missing_says_how_to_load(tmp_path: Path) -> None:
    from obd.serve.tcmu import configfs

    why = configfs.tcmu_missing(str(tmp_path))
    assert why and "modprobe target_core_user" in why
    with pytest.raises(configfs.TcmuUnavailableError):
        configfs.require_tcmu(str(tmp_path))


def test_netlink_family_lookup_on_this_kernel() -> None:
    """CTRL_CMD_GETFAMILY against the host's real kernel: without target_core_user the
    family is unknown, a NetlinkError (exit 3) naming TCM-USER and ENOENT."""
    from obd.serve.tcmu.netlink import NetlinkError, TcmuNetlink

    try:
        nl = TcmuNetlink()
    except NetlinkError as e:
        assert "TCM-USER" in str(e) and "ENOENT" in str(e), str(e)
        assert e.exit_code == 3
        return
    nl.close()
    pytest.skip("this kernel has the TCM-USER family (target_core_user loaded)")
