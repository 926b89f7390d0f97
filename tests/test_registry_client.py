"""The registry client (obd/registry) against a real docker-registry, and the fixtures
of tests/registry_helpers.py themselves."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from tests.registry_helpers import (
    USER,
    Registry,
    basic_auth_header,
    fault_proxy,
    registry,
    registry_basic,
    registry_redirect,
    registry_token,
    sha256_digest,
)

__all__ = ["registry", "registry_basic", "registry_redirect", "registry_token"]

pytestmark = pytest.mark.timeout(60)


# -- the fixtures themselves ---------------------------------------------------------------


def _layers(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(2):
        p = tmp_path / f"layer{i}"
        p.write_bytes(os.urandom(100_000 + i))
        out.append(p)
    return out


@pytest.mark.parametrize(
    "fixture", ["registry", "registry_basic", "registry_token", "registry_redirect"]
)
def test_fixture_push_and_pull(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    reg: Registry = request.getfixturevalue(fixture)
    files = _layers(tmp_path)
    img = reg.push_overlaybd_image("ns/app", "v1", files)
    assert [d for d, _ in img.layers] == [sha256_digest(f.read_bytes()) for f in files]
    # unauthenticated access is refused when auth is on
    anon = httpx.get(f"{reg.url}/v2/ns/app/manifests/v1")
    assert anon.status_code == (200 if fixture == "registry" else 401)
    r = reg.get("/v2/ns/app/manifests/v1", headers={"Accept": img.media_type})
    assert r.status_code == 200 and r.content == img.manifest
    r = reg.get(f"/v2/ns/app/blobs/{img.layers[1][0]}", headers={"Range": "bytes=10-19"})
    if fixture == "registry_redirect":
        assert r.status_code == 307
        r = httpx.get(r.headers["Location"], headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == files[1].read_bytes()[10:20]


def test_fixture_token_server_counts(registry_token: Registry) -> None:
    ts = registry_token.token_server
    assert ts is not None
    registry_token.push_blob("a/b", b"hello")
    assert ts.count >= 1 and ts.requests[-1]["user"] == USER
    r = httpx.get(ts.realm, params={"service": "x", "scope": "repository:a/b:pull"},
                  headers={"Authorization": basic_auth_header(USER, "wrong")})  # fmt: skip
    assert r.status_code == 401


def test_fixture_fault_proxy(registry: Registry) -> None:
    data = os.urandom(50_000)
    digest = registry.push_blob("r", data)
    with fault_proxy(registry) as proxy:
        url = f"{registry.url}/v2/r/blobs/{digest}"
        assert registry.url == proxy.url
        assert httpx.get(url).content == data
        proxy.add("blobs", "status", code=429, headers={"Retry-After": "1"})
        r = httpx.get(url)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        proxy.add("blobs", "truncate", keep=100)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url)
        proxy.add("blobs", "drop")
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url)
        proxy.add("blobs", "reset")
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(url)
        proxy.add("blobs", "stall", seconds=5)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(url, timeout=0.3)
        assert proxy.count("GET /v2/r/blobs") == 6
        assert proxy.bytes_served == len(data) + 100
        with httpx.Client() as c:  # keep-alive through the proxy
            for _ in range(3):
                assert hashlib.sha256(c.get(url).content).hexdigest() == digest[7:]
