"""``obd serve REF``: images whose layers live only in a real registry, served over NBD.

Real parts: Debian's docker-registry (tests/registry_helpers.py), a two-layer ext4 image
committed as ZFile layers by obd (tests/registry_images.py), ``obd serve`` as a process,
nbdcopy, and for the mount nbdfuse + losetup + mount. Faults come from the tests' fault
proxy in front of the registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.nbd_helpers import (
    RawClient,
    ServeProcess,
    kernel_mounted,
    obd,
    require_tools,
    run,
    wait_until,
)
from tests.registry_helpers import PushedImage, Registry, fault_proxy, free_port, start_registry
from tests.registry_images import Ext4Image, layered_ext4

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Ext4Image:
    return layered_ext4(tmp_path_factory.mktemp("ext4"), size_mb=64, data_mb=8)


def global_config(folder: Path, **extra: object) -> Path:
    doc: dict[str, object] = {
        "logConfig": {"logPath": str(folder / "obd.log"), "logLevel": 1},
        "enableAudit": True,
        "auditPath": str(folder / "audit.log"),
        "cacheConfig": {
            "cacheType": "file",
            "cacheDir": str(folder / "cache"),
            "cacheSizeGB": 1,
            "refillSize": 262144,
        },
        "credentialConfig": {"mode": "file", "path": str(folder / "no-creds.json")},
    }
    doc.update(extra)
    path = folder / "overlaybd.json"
    path.write_text(json.dumps(doc))
    return path


def push(reg: Registry, image: Ext4Image, repo: str = "obd/ext4", tag: str = "v1") -> PushedImage:
    return reg.push_overlaybd_image(repo, tag, [str(p) for p in image.layers])


def nbdcopy(uri: str, out: Path) -> bytes:
    run(["nbdcopy", uri, str(out)], timeout=120)
    return out.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(folder: Path, *images: str, config: Path | None = None, workers: int = 8) -> ServeProcess:
    cfg = config or global_config(folder)
    return ServeProcess(["--listen", "127.0.0.1:0", "--config", str(cfg), "--workers", str(workers), *images])  # fmt: skip


def bottom_data(image: Ext4Image, start: int) -> list[int]:
    """Offsets from ``start``, 1 MiB apart, where 64 KiB of data come from the bottom layer
    (the top layer is small: it is all cached at open)."""
    from obd.image import open_layers
    from obd.io.base import ExtentKind

    out: list[int] = []
    with open_layers([str(p) for p in image.layers]) as stack:
        for e in stack.extents():
            at = max(e.offset, start)
            while e.kind is ExtentKind.DATA and e.depth == 1 and e.end - at >= 65536:
                if not out or at - out[-1] >= 1 << 20:
                    out.append(at)
                at += 1 << 20
    return out


def audit_events(folder: Path) -> list[str]:
    p = folder / "audit.log"
    return [ln.split("|", 3)[3] for ln in p.read_text().splitlines()] if p.exists() else []


# -- the image, end to end --------------------------------------------------------------------


def test_serve_reference_read_mount_and_reread_from_cache(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    require_tools("nbdcopy")
    with start_registry(tmp_path / "registry") as reg:
        pushed = push(reg, ext4_image)
        r = obd("inspect", pushed.ref, "--json")
        doc = json.loads(r.stdout)
        layers = doc["images"][0]["layers"]
        assert [(x["digest"], x["size"]) for x in layers] == [tuple(x) for x in pushed.layers]
        blob_bytes = sum(size for _, size in pushed.layers)
        with serve(tmp_path, pushed.ref) as sp:
            assert "export ext4:" in sp.stderr
            uri = sp.uri("ext4")
            want = ext4_image.raw.read_bytes()
            # mount first: a cold start reads a small part of the image
            with kernel_mounted(uri, tmp_path) as mnt:
                small = mnt / "etc" / "conf3.txt"
                assert sha(small.read_bytes()) == ext4_image.files["etc/conf3.txt"]
                cached = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "cache").glob("sha256:*") if not p.name.endswith(".units"))  # fmt: skip
                assert cached < blob_bytes  # lazily: not everything was fetched
                for rel, digest in ext4_image.files.items():
                    assert sha((mnt / rel).read_bytes()) == digest, rel
            assert sha(nbdcopy(uri, tmp_path / "out.raw")) == sha(want)
            reg.stop()  # the registry is gone: everything comes from the cache now
            assert sha(nbdcopy(uri, tmp_path / "out2.raw")) == sha(want)
        events = audit_events(tmp_path)
        assert any(e.startswith("download[pathname=http://") for e in events)


def test_registry_fault_mid_read_is_eio_for_that_request_only(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    with start_registry(tmp_path / "registry") as reg, fault_proxy(reg) as proxy:
        pushed = push(reg, ext4_image)
        want = ext4_image.raw.read_bytes()
        with serve(tmp_path, pushed.ref, workers=0) as sp:
            c = RawClient(sp.port, "ext4")
            err, data = c.read(0, 65536)
            assert err == 0 and data == want[:65536]
            tried: set[int] = set()

            def first_failing_read() -> int:
                """Read bottom-layer data not read yet: EIO exactly when it had to fetch."""
                for at in bottom_data(ext4_image, 1 << 20):
                    if at in tried:
                        continue
                    tried.add(at)
                    n = len(proxy.requests)
                    err, data = c.read(at, 65536)
                    fetched = len(proxy.requests) > n
                    assert bool(err) == fetched, (at, err, fetched)
                    if err:
                        return at
                    assert data == want[at : at + 65536]
                raise AssertionError("every read was served from the cache")

            proxy.add(r"GET .*/blobs/", "reset", times=-1)  # the registry resets
            failed = first_failing_read()
            err, data = c.read(0, 4096)  # cached: still served
            assert err == 0 and data == want[:4096]
            proxy.clear()  # the registry is back
            err, data = c.read(failed, 65536)
            assert err == 0 and data == want[failed : failed + 65536]
            reg.stop()  # the registry process is gone (connections refused)
            failed = first_failing_read()
            with start_registry(tmp_path / "registry") as again:  # same storage, new port
                proxy.upstream = ("127.0.0.1", again.port)
                err, data = c.read(failed, 65536)
                assert err == 0 and data == want[failed : failed + 65536]
                proxy.add(r"GET .*/blobs/", "truncate", times=3)
                at = failed + (2 << 20)  # a truncated body is retried, never kept
                err, data = c.read(at, 1 << 20)
                assert err == 0 and data == want[at : at + (1 << 20)]
                c.disconnect()
                assert sp.proc.poll() is None
                assert sha(nbdcopy(sp.uri("ext4"), tmp_path / "all.raw")) == sha(want)


def test_registry_down_at_open_fails_that_export_only(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    require_tools("nbdcopy")
    dead = free_port()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({
        "repoBlobUrl": f"http://127.0.0.1:{dead}/v2/obd/ext4/blobs",
        "lowers": [{"digest": "sha256:" + "ab" * 32, "size": 100}],
        "resultFile": str(tmp_path / "bad.result"),
    }))  # fmt: skip
    with start_registry(tmp_path / "registry") as reg:
        pushed = push(reg, ext4_image)
        good = tmp_path / "good.json"
        good.write_text(json.dumps({
            "repoBlobUrl": f"http://{reg.host}/v2/obd/ext4/blobs",
            "lowers": [{"digest": d, "size": s} for d, s in pushed.layers],
            "resultFile": str(tmp_path / "good.result"),
        }))  # fmt: skip
        with serve(tmp_path, str(bad), str(good)) as sp:
            assert (tmp_path / "good.result").read_text() == "success"
            reason = (tmp_path / "bad.result").read_text()
            assert reason == (
                f"failed:failed to open remote file http://127.0.0.1:{dead}/v2/obd/ext4/blobs/"
                f"sha256:{'ab' * 32}: Connection failed"
            ), reason
            out = nbdcopy(sp.uri("good"), tmp_path / "good.raw")
            assert sha(out) == sha(ext4_image.raw.read_bytes())


def test_background_download_switches_to_the_local_file(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    require_tools("nbdcopy")
    mport = free_port()
    with start_registry(tmp_path / "registry") as reg, fault_proxy(reg) as proxy:
        pushed = push(reg, ext4_image)
        dirs = [tmp_path / f"layer{i}" for i in range(len(pushed.layers))]
        cfgp = tmp_path / "img.json"
        lowers = [
            {"digest": d, "size": s, "dir": str(dirs[i])} for i, (d, s) in enumerate(pushed.layers)
        ]
        download = {"enable": True, "delay": 1, "delayExtra": 1, "maxMBps": 8, "blockSize": 65536}
        cfgp.write_text(
            json.dumps(
                {
                    "repoBlobUrl": f"http://{reg.host}/v2/obd/ext4/blobs",
                    "lowers": lowers,
                    "download": download,
                }
            )
        )
        gcfg = global_config(tmp_path, exporterConfig={"enable": True, "port": mport})
        want = ext4_image.raw.read_bytes()
        with serve(tmp_path, str(cfgp), config=gcfg) as sp:
            uri = sp.uri("img")
            # reads go on while the layers are downloaded and switched
            copies = 0
            while not all((d / "overlaybd.commit").exists() for d in dirs) or copies < 2:
                assert sha(nbdcopy(uri, tmp_path / "out.raw")) == sha(want)
                copies += 1
                assert copies < 30, "background download did not finish"
            for d, (digest, _) in zip(dirs, pushed.layers, strict=True):
                assert "sha256:" + sha((d / "overlaybd.commit").read_bytes()) == digest
                assert not (d / ".download").exists()
            metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
            assert f'obd_registry_download_state{{digest="{pushed.layers[0][0]}"}} 2.0' in metrics
            assert (
                "obd_registry_fetched_bytes" in metrics
                and "obd_registry_cache_hit_bytes" in metrics
            )
            # the switch is made: the registry may go away now
            assert wait_until(lambda: "reads now go to" in (tmp_path / "obd.log").read_text(), 10)
            proxy.add(r"GET ", "reset", times=-1)
            served = proxy.bytes_served
            assert sha(nbdcopy(uri, tmp_path / "out3.raw")) == sha(want)
            assert proxy.bytes_served == served
        assert any(e.startswith("bk_download[") for e in audit_events(tmp_path))


def test_remote_layer_without_repo_blob_url_says_so(tmp_path: Path) -> None:
    cfgp = tmp_path / "img.json"
    cfgp.write_text(json.dumps({
        "lowers": [{"digest": "sha256:" + "cd" * 32, "size": 10, "dir": str(tmp_path / "d")}],
        "resultFile": str(tmp_path / "img.result"),
    }))  # fmt: skip
    r = obd("serve", "--listen", "127.0.0.1:0", "--config", str(global_config(tmp_path)), str(cfgp), check=False)  # fmt: skip
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert (tmp_path / "img.result").read_text() == "failed:empty repoBlobUrl"
    assert not (tmp_path / "cache").exists()  # no registry side was built


def test_serve_reference_from_a_token_registry_with_credentials(tmp_path: Path, ext4_image: Ext4Image) -> None:  # fmt: skip
    """Bearer auth with credentials from credentialConfig, through the server; the password
    appears in nothing the server wrote."""
    import base64

    from tests.registry_helpers import PASSWORD, USER

    require_tools("nbdcopy")
    mport = free_port()
    with start_registry(tmp_path / "registry", auth="token") as reg:
        pushed = push(reg, ext4_image)
        creds = tmp_path / "creds.json"
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        creds.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        cfg = global_config(tmp_path, credentialConfig={"mode": "file", "path": str(creds)},
                            exporterConfig={"enable": True, "port": mport})  # fmt: skip
        with serve(tmp_path, pushed.ref, config=cfg) as sp:
            out = nbdcopy(sp.uri("ext4"), tmp_path / "out.raw")
            assert sha(out) == sha(ext4_image.raw.read_bytes())
            metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
            stderr = sp.stderr
        assert reg.token_server is not None and reg.token_server.count > 0
        written = [stderr, metrics] + [
            p.read_text(errors="replace") for p in tmp_path.glob("*.log")
        ]
        for text in written:
            assert PASSWORD not in text and auth not in text
