"""Bad input through the real command line: ``obd inspect REF [--json]`` and ``obd serve
REF`` against a real docker-registry (tests/registry_helpers.py). Each failure is one
line on stderr naming the reference, URL or file and the problem, a documented exit code
(obd.errors), no traceback, and never a credential."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Result, run_obd
from tests.registry_helpers import PASSWORD, USER, PushedImage, Registry, free_port, start_registry

pytestmark = pytest.mark.timeout(120)

LAYER = b"obd-cli-layer " * 600  # any bytes: inspect reads manifests only


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("reg")) as r:
        yield r


@pytest.fixture(scope="module")
def reg_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("regb"), auth="htpasswd") as r:
        yield r


@pytest.fixture(scope="module")
def image(reg: Registry) -> PushedImage:
    return reg.push_overlaybd_image("obd/cli", "v1", [LAYER])


def one_line(r: Result, code: int, *needles: str) -> str:
    """The single stderr line of a failed run (checked: exit code, no traceback, the
    needles in it, no password in any output)."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == code, f"exit {r.code}, expected {code}: {r.err!r}"
    assert "Traceback" not in r.err
    assert len(lines) == 1, f"expected one line on stderr: {r.err!r}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    secret = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (r.out, r.err):
        assert PASSWORD not in text and secret not in text
    return lines[0]


def gconfig(folder: Path, **doc: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base: dict[str, object] = {
        "logConfig": {"logPath": str(folder / "obd.log"), "logLevel": 0},
        "auditPath": str(folder / "audit.log"),
        "cacheConfig": {"cacheType": "file", "cacheDir": str(folder / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(folder / "creds.json")},
    }
    base.update(doc)
    p = folder / "overlaybd.json"
    p.write_text(json.dumps(base))
    return p


def serve(cfg: Path, *args: str) -> Result:
    return run_obd("serve", "--listen", "127.0.0.1:0", "--config", cfg, *args, timeout=60)


def test_inspect_ok_lists_layers(reg: Registry, image: PushedImage, tmp_path: Path) -> None:
    r = run_obd("inspect", "--config", gconfig(tmp_path), image.ref, "--json")
    assert r.code == 0, r.err
    (im,) = json.loads(r.out)["images"]
    assert im["digest"] == image.digest
    assert [(la["digest"], la["size"]) for la in im["layers"]] == image.layers


@pytest.mark.parametrize(
    "ref",
    ["127.0.0.1:5000/Upper/Case:v1", "127.0.0.1:5000/obd/x::v1", "localhost/obd@sha256:12ab"],
)
def test_malformed_reference(ref: str, tmp_path: Path) -> None:
    # before: 'no such file' (exit 3) for inspect and two lines for serve
    line = one_line(run_obd("inspect", ref), 2, ref, "image reference")
    assert "no such file" not in line
    if ref.startswith("127.0.0.1:5000/Upper"):  # serve checks references the same way
        one_line(serve(gconfig(tmp_path), ref), 2, ref, "image reference")


def test_unreachable_registry(tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/obd/cli:v1"
    host = ref.split("/", 1)[0]
    one_line(run_obd("inspect", "--config", gconfig(tmp_path), ref), 8, host, "connection failed")
    one_line(run_obd("inspect", "--config", gconfig(tmp_path), ref, "--json"), 8, host)
    one_line(serve(gconfig(tmp_path), ref), 8, host, "connection failed")


def test_manifest_404(reg: Registry, image: PushedImage, tmp_path: Path) -> None:
    cfg = gconfig(tmp_path)
    one_line(run_obd("inspect", "--config", cfg, f"{reg.host}/obd/cli:nope"), 8, "/manifests/nope", "404")  # fmt: skip
    one_line(run_obd("inspect", "--config", cfg, f"{reg.host}/obd/none:v1", "--json"), 8, "/v2/obd/none/", "404")  # fmt: skip
    one_line(serve(cfg, f"{reg.host}/obd/cli:nope"), 8, "/manifests/nope", "404")


def test_401_without_credentials(reg_basic: Registry, tmp_path: Path) -> None:
    img = reg_basic.push_overlaybd_image("obd/cli", "v1", [LAYER])
    cfg = gconfig(tmp_path)  # its credential file does not exist
    # before: a WARNING line about the credential file, then the error
    line = one_line(run_obd("inspect", "--config", cfg, img.ref), 8, reg_basic.host)
    assert "authentication required" in line and "creds.json" in line and "no such file" in line
    # credentials for another host only
    (tmp_path / "creds.json").write_text(
        json.dumps({"auths": {"other.example:5000": {"username": USER, "password": PASSWORD}}})
    )
    line = one_line(run_obd("inspect", "--config", cfg, img.ref, "--json"), 8, reg_basic.host)
    assert "no credentials for this URL" in line
    # the right host with a wrong password: refused, and the password shown nowhere
    (tmp_path / "creds.json").write_text(
        json.dumps({"auths": {reg_basic.host: {"username": USER, "password": PASSWORD + "x"}}})
    )
    line = one_line(run_obd("inspect", "--config", cfg, img.ref), 8, reg_basic.host)
    assert "refused" in line
    # and right: the image is listed
    (tmp_path / "creds.json").write_text(
        json.dumps({"auths": {reg_basic.host: {"username": USER, "password": PASSWORD}}})
    )
    r = run_obd("inspect", "--config", cfg, img.ref, "--json")
    assert r.code == 0, r.err
    assert PASSWORD not in r.out + r.err


def test_bad_credential_file(reg_basic: Registry, tmp_path: Path) -> None:
    img = reg_basic.push_overlaybd_image("obd/cli", "v1", [LAYER])
    cfg = gconfig(tmp_path)
    # a broken file that holds the password: its text must not be echoed
    broken = json.dumps({"auths": {reg_basic.host: {"username": USER, "password": PASSWORD}}})
    (tmp_path / "creds.json").write_text(broken[:-3])
    line = one_line(run_obd("inspect", "--config", cfg, img.ref), 8, reg_basic.host)
    assert "creds.json" in line and "not valid JSON" in line
    line = one_line(serve(cfg, img.ref), 8)
    assert "creds.json" in line and "not valid JSON" in line
    # an entry for the host whose 'auth' is not user:pass (here: the password alone)
    # before: a WARNING line, then an error saying only that no entry matched
    bad = base64.b64encode(PASSWORD.encode()).decode()
    (tmp_path / "creds.json").write_text(json.dumps({"auths": {reg_basic.host: {"auth": bad}}}))
    line = one_line(run_obd("inspect", "--config", cfg, img.ref), 8, reg_basic.host)
    assert "'auth' holds no ':'" in line and bad not in line
    log = (tmp_path / "obd.log").read_text()
    assert PASSWORD not in log


def test_plain_oci_image(reg: Registry, tmp_path: Path) -> None:
    from obd.oci import annotations as A

    plain = reg.push_overlaybd_image("obd/plain", "v1", [LAYER], media_type=A.MT_OCI_MANIFEST, annotate=False)  # fmt: skip
    cfg = gconfig(tmp_path)
    for args in ((plain.ref,), (plain.ref, "--json")):
        one_line(run_obd("inspect", "--config", cfg, *args), 6, plain.ref, "not an overlaybd image")
    one_line(serve(cfg, plain.ref), 6, plain.ref, "not an overlaybd image")


def test_bad_global_config(reg: Registry, image: PushedImage, tmp_path: Path) -> None:
    cache = {"cacheType": "file", "cacheDir": str(tmp_path), "refillSize": 1000}
    bad_cache = gconfig(tmp_path / "a", cacheConfig=cache)
    line = one_line(serve(bad_cache, image.ref), 7, str(bad_cache), "refillSize")
    assert "1000" in line
    not_json = tmp_path / "broken.json"
    not_json.write_text('{"cacheConfig": ')
    one_line(run_obd("inspect", "--config", not_json, image.ref), 7, str(not_json))
    one_line(serve(not_json, image.ref), 7, str(not_json))


def test_debug_shows_traceback(tmp_path: Path) -> None:
    ref = f"127.0.0.1:{free_port()}/obd/cli:v1"
    r = run_obd("--debug", "inspect", "--config", gconfig(tmp_path), ref)
    assert r.code == 8
    assert "Traceback" in r.err and "connection failed" in r.err


def test_config_image_result_file_reasons(reg: Registry, reg_basic: Registry, tmp_path: Path) -> None:  # fmt: skip
    """An image config whose layer lives only in a registry: the resultFile says §6.5's
    'failed to open remote file <url>: <reason>' and the command one line, exit 8."""
    secured = reg_basic.push_blob("obd/cli", LAYER)
    cases = [
        (reg_basic.blob_url("obd/cli"), secured, "Authentication failed"),
        (reg.blob_url("obd/cli"), "sha256:" + "ab" * 32, "No such file or directory"),
        (f"http://127.0.0.1:{free_port()}/v2/obd/cli/blobs", secured, "Connection failed"),
    ]
    for i, (repo_blob_url, digest, reason) in enumerate(cases):
        result = tmp_path / f"img{i}.result"
        cfgp = tmp_path / f"img{i}.json"
        cfgp.write_text(json.dumps({
            "repoBlobUrl": repo_blob_url,
            "lowers": [{"digest": digest, "size": len(LAYER)}],
            "resultFile": str(result),
        }))  # fmt: skip
        url = f"{repo_blob_url}/{digest}"
        one_line(serve(gconfig(tmp_path / f"g{i}"), str(cfgp)), 8, url, reason)
        assert result.read_text() == f"failed:failed to open remote file {url}: {reason}"
