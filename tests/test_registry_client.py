"""The registry client (obd/registry) against a real docker-registry, and the fixtures
of tests/registry_helpers.py themselves."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd.errors import ObdError, RemoteError
from obd.registry.auth import (
    Credential,
    CredentialSource,
    StaticCredentials,
    match_auths,
    parse_challenge,
    url_prefixes,
)
from obd.registry.client import BlobError, BlobLocation, RegistryClient
from obd.registry.url import (
    blob_url,
    is_loopback,
    parse_repo_blob_url,
    safe_url,
    scheme_for,
)
from tests.registry_helpers import (
    PASSWORD,
    USER,
    CredentialServer,
    Registry,
    basic_auth_header,
    fault_proxy,
    make_tls,
    registry,
    registry_basic,
    registry_redirect,
    registry_token,
    sha256_digest,
    start_registry,
    stop_process,
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


# -- the client ----------------------------------------------------------------------------

CRED = StaticCredentials(Credential(USER, PASSWORD))
BLOB = os.urandom(1 << 20) + b"tail"


def client(**kw: object) -> RegistryClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff", 0.01)
    return RegistryClient(**kw)  # type: ignore[arg-type]


def loc_of(reg: Registry, digest: str, repo: str = "ns/app") -> BlobLocation:
    return BlobLocation.from_url(reg.blob_url(repo), digest)


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    """One anonymous registry holding BLOB, for the tests that only read."""
    with start_registry(tmp_path_factory.mktemp("shared") / "registry") as reg:
        yield reg, reg.push_blob("ns/app", BLOB)


# urls


def test_blob_url_and_repo_blob_url() -> None:
    assert blob_url("http://h/v2/a/b/blobs", "sha256:x") == "http://h/v2/a/b/blobs/sha256:x"
    assert blob_url("http://h/v2/a/b/blobs/", "sha256:x") == "http://h/v2/a/b/blobs/sha256:x"
    assert parse_repo_blob_url("https://reg:5000/v2/ns/sub/app/blobs/") == (
        "https", "reg:5000", "ns/sub/app")  # fmt: skip
    for bad in ("ftp://h/v2/a/blobs", "http://h/a/blobs", "http://u:p@h/v2/a/blobs", "http://h/v2/blobs"):  # fmt: skip
        with pytest.raises(ObdError) as e:
            parse_repo_blob_url(bad)
        assert e.value.exit_code == 7 and "p@" not in str(e.value)


def test_plain_http_rule() -> None:
    for h in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        assert is_loopback(h) and scheme_for(h) == "http", h
    for h in ("reg.example.com", "10.0.0.1:5000", "[2001:db8::1]:443", "localhost.example.com"):
        assert not is_loopback(h) and scheme_for(h) == "https", h
    assert scheme_for("reg.example.com", plain_http=True) == "http"
    assert safe_url("https://u:p@h/v2/x?sig=SECRET#f") == "https://h/v2/x"


def test_p2p_url_rule() -> None:
    c = client(p2p="http://localhost:9731/accelerator/")
    url = "https://reg/v2/ns/app/blobs/sha256:" + "a" * 64
    assert c.p2p_url(url) == "http://localhost:9731/accelerator/" + url


# anonymous


def test_anonymous_reads(shared_registry: tuple[Registry, str]) -> None:
    reg, digest = shared_registry
    with client() as c:
        loc = loc_of(reg, digest)
        assert c.blob_size(loc) == len(BLOB)
        assert c.read_range(loc, 0, 1) == BLOB[:1]
        assert c.read_range(loc, 12345, 100_000) == BLOB[12345:112345]
        assert c.read_range(loc, len(BLOB) - 3, 100) == BLOB[-3:]  # clipped to the size
        assert c.read_range(loc, len(BLOB), 10) == b""
        assert b"".join(c.stream(loc, 1000, chunk_size=65536)) == BLOB[1000:]


def test_missing_blob_is_a_remote_error(shared_registry: tuple[Registry, str]) -> None:
    reg, _ = shared_registry
    loc = loc_of(reg, "sha256:" + "0" * 64)
    with client() as c, pytest.raises(BlobError) as e:
        c.read_range(loc, 0, 10)
    assert e.value.exit_code == 8 and e.value.kind == "not-found" and e.value.status == 404
    assert loc.url in str(e.value) and "404" in str(e.value)
    assert e.value.reason == "No such file or directory"


def test_connection_refused_is_bounded() -> None:
    loc = BlobLocation("127.0.0.1:1", "a", "sha256:" + "0" * 64, "http")
    t = time.monotonic()
    with client(retries=2) as c, pytest.raises(BlobError) as e:
        c.read_range(loc, 0, 10)
    assert e.value.kind == "connect" and "connection failed" in str(e.value)
    assert time.monotonic() - t < 5


# Basic


def test_basic_auth(registry_basic: Registry) -> None:
    digest = registry_basic.push_blob("ns/app", BLOB[:5000])
    loc = loc_of(registry_basic, digest)
    with client(credentials=CRED) as c:
        assert c.read_range(loc, 10, 20) == BLOB[10:30]
        n = c.stats.requests
        assert c.read_range(loc, 100, 20) == BLOB[100:120]
        assert c.stats.requests == n + 1  # the Basic header is sent up front after the 401
    with client() as c, pytest.raises(BlobError) as e:
        c.read_range(loc, 0, 10)
    assert e.value.kind == "auth" and "no credentials configured" in str(e.value)
    bad = StaticCredentials(Credential(USER, "wrong-password"))
    with client(credentials=bad) as c, pytest.raises(BlobError) as e:
        c.read_range(loc, 0, 10)
    assert e.value.kind == "auth" and e.value.status == 401
    assert "the registry refused the credentials" in str(e.value)


# Bearer


def test_bearer_token_cached_and_refreshed(tmp_path: Path) -> None:
    with start_registry(tmp_path, auth="token", token_expires_in=1) as reg:
        ts = reg.token_server
        assert ts is not None
        digest = reg.push_blob("ns/app", BLOB[:10000])
        base = ts.count
        loc = loc_of(reg, digest)
        with client(credentials=CRED) as c:
            for i in range(5):
                assert c.read_range(loc, i * 100, 100) == BLOB[i * 100 : i * 100 + 100]
            assert ts.count - base == 1 and c.stats.token_requests == 1
            assert ts.requests[-1]["user"] == USER
            assert ts.requests[-1]["query"]["scope"] == "repository:ns/app:pull"
            time.sleep(1.1)  # expires_in 1 s: the next read fetches a new token first
            assert c.read_range(loc, 0, 10) == BLOB[:10]
            assert ts.count - base == 2


def test_bearer_refused_token_is_fetched_again(registry_token: Registry) -> None:
    ts = registry_token.token_server
    assert ts is not None
    digest = registry_token.push_blob("ns/app", BLOB[:10000])
    loc = loc_of(registry_token, digest)
    ts.bad_next = 1  # the first token is already expired: the registry answers 401 again
    base = ts.count
    with client(credentials=CRED) as c:
        assert c.read_range(loc, 5, 10) == BLOB[5:15]
        assert ts.count - base == 2
        ts.bad_next = 5  # every token bad: a clear auth error, bounded
        c.auth._tokens.clear()
        with pytest.raises(BlobError) as e:
            c.read_range(loc, 0, 10)
        assert e.value.kind == "auth" and e.value.status == 401
        assert ts.count - base <= 5


def test_bearer_token_server_failures(registry_token: Registry) -> None:
    ts = registry_token.token_server
    assert ts is not None
    digest = registry_token.push_blob("ns/app", BLOB[:1000])
    loc = loc_of(registry_token, digest)
    ts.fail_next = 1  # a 500 from the token server is retried
    with client(credentials=CRED) as c:
        assert c.read_range(loc, 0, 10) == BLOB[:10]
    wrong = StaticCredentials(Credential(USER, "nope"))
    with client(credentials=wrong) as c, pytest.raises(BlobError) as e:
        c.read_range(loc, 0, 10)
    assert e.value.kind == "auth" and "token server" in str(e.value) and "401" in str(e.value)


def test_bearer_anonymous_pull(tmp_path: Path) -> None:
    with start_registry(tmp_path, auth="token", anonymous_pull=True) as reg:
        digest = reg.push_blob("pub/app", BLOB[:1000])
        with client() as c:
            assert c.read_range(loc_of(reg, digest, "pub/app"), 0, 10) == BLOB[:10]
            assert reg.token_server is not None
            assert reg.token_server.requests[-1]["user"] is None


# credentialConfig


def test_url_prefixes_and_matching() -> None:
    url = "https://reg:5000/v2/ns/sub/app/blobs/sha256:abc"
    assert url_prefixes(url) == ["reg:5000", "reg:5000/ns", "reg:5000/ns/sub", "reg:5000/ns/sub/app"]  # fmt: skip
    auths = {
        "other:5000": {"username": "x", "password": "y"},
        "reg:5000/ns/sub": {"auth": base64.b64encode(b"u1:p1").decode()},
        "reg:5000": {"username": "u2", "password": "p2"},
    }
    assert match_auths(auths, url) == Credential("u1", "p1")  # first in file order
    assert match_auths(auths, "https://reg:5000/v2/top/blobs/sha256:abc") == Credential("u2", "p2")
    assert match_auths(auths, "https://reg:5000/v2/nsx/app/blobs/d") == Credential("u2", "p2")
    assert match_auths({"reg:5000/ns/s": {"username": "a", "password": "b"}}, url) is None
    assert match_auths({"https://reg:5000/": {"username": "a", "password": "b"}}, url)
    assert "p1" not in repr(match_auths(auths, url))
    assert parse_challenge('Bearer realm="https://a/t,x",service="reg",scope="repository:a:pull"') == (
        "bearer", {"realm": "https://a/t,x", "service": "reg", "scope": "repository:a:pull"})  # fmt: skip


def _auths(reg: Registry) -> dict[str, object]:
    return {
        "elsewhere:1": {"username": "x", "password": "y"},
        f"{reg.host}/ns": {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    }


def test_credential_file_mode(registry_token: Registry, tmp_path: Path) -> None:
    digest = registry_token.push_blob("ns/app", BLOB[:1000])
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"auths": _auths(registry_token)}))

    class Cfg:  # the global config's credentialConfig, duck-typed
        mode = ""
        path = ""

    src = CredentialSource.from_config(Cfg(), legacy_file=str(cred))
    assert src == CredentialSource("file", str(cred))
    with client(credentials=src) as c:
        assert c.read_range(loc_of(registry_token, digest), 0, 10) == BLOB[:10]
    missing = CredentialSource("file", str(tmp_path / "nope.json"))
    with client(credentials=missing) as c, pytest.raises(BlobError) as e:
        c.read_range(loc_of(registry_token, digest), 0, 10)
    assert e.value.kind == "auth" and "nope.json" in str(e.value)


@pytest.mark.parametrize("mode", ["http", "uds", "https"])
def test_credential_service_modes(mode: str, registry_basic: Registry, tmp_path: Path) -> None:
    digest = registry_basic.push_blob("ns/app", BLOB[:1000])
    loc = loc_of(registry_basic, digest)
    tls = make_tls(tmp_path / "tls") if mode == "https" else None
    server = CredentialServer(
        _auths(registry_basic),
        socket_path=tmp_path / "cred.sock" if mode == "uds" else None,
        ssl_context=tls.server_context(require_client_cert=True) if tls else None,
    )
    with server.running():
        if mode == "uds":
            src = CredentialSource("uds", str(server.socket_path))
        elif tls is not None:
            src = CredentialSource("https", server.url, 5, str(tls.client_cert),
                                   str(tls.client_key), str(tls.ca))  # fmt: skip
        else:
            src = CredentialSource("http", server.url)
        with client(credentials=src) as c:
            assert c.read_range(loc, 3, 10) == BLOB[3:13]
        assert server.requests and server.requests[0] == loc.url  # remote_url, not escaped
        if tls is not None:  # without the client certificate the service refuses TLS
            nocert = CredentialSource("https", server.url, 5, server_ca_path=str(tls.ca))
            assert nocert.explain(loc.url)[0] is None
            assert "request failed" in nocert.explain(loc.url)[1]
        server.success = False
        with client(credentials=src) as c, pytest.raises(BlobError) as e:
            c.read_range(loc, 0, 10)
        assert e.value.kind == "auth" and "success is false" in str(e.value)


# redirects


def test_redirect_keeps_range_and_drops_authorization(registry_redirect: Registry) -> None:
    reg = registry_redirect
    assert reg.blob_store is not None
    digest = reg.push_blob("ns/app", BLOB)
    with fault_proxy(reg) as proxy, client(credentials=CRED) as c:
        loc = loc_of(reg, digest)
        for off, n in ((0, 1), (777, 4096), (len(BLOB) - 10, 10)):
            assert c.read_range(loc, off, n) == BLOB[off : off + n]
        assert b"".join(c.stream(loc, 5)) == BLOB[5:]
        registry_gets = proxy.count(f"GET /v2/ns/app/blobs/{digest}")
        assert registry_gets <= 2  # a 401 and one 307: the target is kept for the blob
        assert any("authorization" in r.headers for r in proxy.requests)
    got = [(h.get("Range"), "Authorization" in h) for m, _, h in reg.blob_store.requests]
    assert (f"bytes=777-{777 + 4095}", False) in got
    assert (f"bytes=5-{len(BLOB) - 1}", False) in got
    assert all(not has_auth for _, has_auth in got)
    assert not any(PASSWORD in json.dumps(h) for _, _, h in reg.blob_store.requests)


def test_redirect_target_failure_asks_the_registry_again(registry_redirect: Registry) -> None:
    reg = registry_redirect
    assert reg.blob_store is not None
    digest = reg.push_blob("ns/app", BLOB[:5000])
    with client(credentials=CRED) as c:
        loc = loc_of(reg, digest)
        assert c.read_range(loc, 0, 10) == BLOB[:10]
        target = c._target(loc)
        assert target is not None and not target.auth
        c._set_target(loc, target.url + "-gone", False)  # e.g. an expired signed URL
        assert c.read_range(loc, 10, 10) == BLOB[10:20]


# faults

FAULTS = [
    ("drop", {}),
    ("reset", {}),
    ("stall", {"seconds": 3}),
    ("truncate", {"keep": 100}),
    ("status", {"code": 500}),
    ("status", {"code": 502}),
    ("status", {"code": 503}),
    ("status", {"code": 429, "headers": {"Retry-After": "1"}}),
    ("strip_range", {}),
]


@pytest.mark.parametrize(("action", "params"), FAULTS, ids=[f"{a}-{p}" for a, p in FAULTS])
def test_fault_is_retried_to_the_right_bytes(
    action: str, params: dict[str, object], shared_registry: tuple[Registry, str]
) -> None:
    reg, digest = shared_registry
    with fault_proxy(reg) as proxy, client(timeout=0.5) as c:
        loc = loc_of(reg, digest)
        assert c.blob_size(loc) == len(BLOB)
        times = 1 if action in ("strip_range", "stall") or params.get("code") == 429 else 2
        proxy.add("GET /v2/.*/blobs/", action, times=times, **params)
        t = time.monotonic()
        assert c.read_range(loc, 300_000, 70_000) == BLOB[300_000:370_000]
        took = time.monotonic() - t
        if action == "status" and params["code"] == 429:
            assert took >= 1.0  # Retry-After: 1
        assert proxy.rules[0].hits == proxy.rules[0].times
        assert c.stats.retries == (0 if action == "strip_range" else times)
        proxy.add("GET /v2/.*/blobs/", action, times=1, **params)
        assert b"".join(c.stream(loc, 1000)) == BLOB[1000:]


@pytest.mark.parametrize("action", ["drop", "reset", "stall", "truncate", "status"])
def test_persistent_fault_gives_a_remote_error(action: str, shared_registry: tuple[Registry, str]) -> None:  # fmt: skip
    reg, digest = shared_registry
    with fault_proxy(reg) as proxy, client(timeout=0.3, retries=2) as c:
        loc = loc_of(reg, digest)
        c.blob_size(loc)
        proxy.add("GET /v2/.*/blobs/", action, times=-1, seconds=5)
        t = time.monotonic()
        with pytest.raises(BlobError) as e:
            c.read_range(loc, 0, 1000)
        assert time.monotonic() - t < 4
        assert proxy.count("GET /v2/.*/blobs/") - 1 == 3  # 1 + 2 retries
        assert e.value.exit_code == 8 and loc.url in str(e.value)
        if action == "status":
            assert e.value.status == 503
        with pytest.raises(BlobError):
            list(c.stream(loc))


def test_a_trickling_body_is_a_timeout(shared_registry: tuple[Registry, str]) -> None:
    """A server that sends a few bytes now and then never trips the socket timeout; the
    read's own deadline does, and the retry gets the right bytes."""
    reg, digest = shared_registry
    with fault_proxy(reg) as proxy, client(timeout=0.5) as c:
        loc = loc_of(reg, digest)
        c.blob_size(loc)
        proxy.add("GET /v2/.*/blobs/", "drip", times=1, chunk=64, interval=0.05)
        t = time.monotonic()
        assert c.read_range(loc, 5000, 20_000) == BLOB[5000:25_000]
        assert c.stats.retries == 1 and time.monotonic() - t < 3


def test_retry_after_is_bounded(shared_registry: tuple[Registry, str]) -> None:
    reg, digest = shared_registry
    with fault_proxy(reg) as proxy, client(max_retry_after=0.2, retries=1) as c:
        loc = loc_of(reg, digest)
        c.blob_size(loc)
        proxy.add("GET", "status", times=-1, code=429, headers={"Retry-After": "3600"})
        t = time.monotonic()
        with pytest.raises(BlobError) as e:
            c.read_range(loc, 0, 10)
        assert time.monotonic() - t < 2 and e.value.kind == "busy"
        assert e.value.reason == "Too many requests"


def test_retry_after_http_date_and_manifest_faults(shared_registry: tuple[Registry, str]) -> None:  # fmt: skip
    import email.utils

    from obd.registry.client import _retry_after

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    r = httpx.Response(429, headers={"Retry-After": when})
    assert 25 < (_retry_after(r) or 0) <= 31
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    reg, _ = shared_registry
    img = reg.push_overlaybd_image("ns/m", "v1", [b"layer-bytes"])
    with fault_proxy(reg) as proxy, client(timeout=0.5) as c:
        proxy.add("GET /v2/ns/m/manifests/", "status", times=1, code=503)
        proxy.add("GET /v2/ns/m/manifests/", "truncate", times=1, keep=10)
        assert c.get_manifest(reg.host, "ns/m", "v1")[0] == img.manifest
        assert proxy.count("GET /v2/ns/m/manifests/") == 3


# concurrency


def test_eight_threads_share_one_client(shared_registry: tuple[Registry, str]) -> None:
    reg, digest = shared_registry
    errors: list[BaseException] = []
    with fault_proxy(reg) as proxy, client() as c:
        loc = loc_of(reg, digest)

        def worker(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(25):
                    off = rnd.randrange(len(BLOB))
                    n = rnd.randrange(1, 100_000)
                    assert c.read_range(loc, off, n) == BLOB[off : off + n]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]
        assert proxy.count("GET") >= 200
        assert proxy.connections <= 16  # keep-alive: connections are reused


@pytest.fixture(scope="module")
def shared_client() -> Iterator[RegistryClient]:
    with client() as c:
        yield c


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(st.tuples(st.integers(0, len(BLOB) + 10), st.integers(0, 100_000)), min_size=1, max_size=8))  # fmt: skip
def test_read_range_model(shared_registry: tuple[Registry, str], shared_client: RegistryClient, reads: list[tuple[int, int]]) -> None:  # fmt: skip
    """read_range against the bytes model, offsets and lengths anywhere (past the end too)."""
    reg, digest = shared_registry
    loc = loc_of(reg, digest)
    for off, n in reads:
        assert shared_client.read_range(loc, off, n) == BLOB[off : off + n]


# P2P


def test_p2p_proxy_down_falls_back_to_the_registry(shared_registry: tuple[Registry, str]) -> None:
    reg, digest = shared_registry
    from tests.registry_helpers import free_port

    with client(p2p=f"http://127.0.0.1:{free_port()}/accelerator") as c:
        assert not c.p2p_active()
        assert c.read_range(loc_of(reg, digest), 10, 10) == BLOB[10:20]
        assert c.stats.p2p_requests == 0


class PrefixProxy:
    """A tiny stand-in for a P2P peer: ``/<prefix>/<url>`` is fetched from ``<url>`` with
    the request's Range and Authorization (the nginx one is in E's tests)."""

    def __init__(self) -> None:
        import http.server

        self.seen: list[tuple[str, dict[str, str]]] = []
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                target = self.path.split("/accel/", 1)[1]
                owner.seen.append((target, dict(self.headers.items())))
                fwd = {k: v for k, v in self.headers.items() if k.lower() in ("range", "authorization")}  # fmt: skip
                r = httpx.get(target, headers=fwd)
                self.send_response(r.status_code)
                for k in ("Content-Range", "WWW-Authenticate", "Location"):
                    if k in r.headers:
                        self.send_header(k, r.headers[k])
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}/accel"


def test_p2p_data_requests_go_through_the_proxy(registry_redirect: Registry) -> None:
    reg = registry_redirect
    assert reg.blob_store is not None
    digest = reg.push_blob("ns/app", BLOB)
    p = PrefixProxy()
    t = threading.Thread(target=p.server.serve_forever, daemon=True)
    t.start()
    try:
        with client(credentials=CRED, p2p=p.address) as c:
            loc = loc_of(reg, digest)
            assert c.p2p_active()
            assert c.read_range(loc, 4096, 8192) == BLOB[4096 : 4096 + 8192]
            assert c.stats.p2p_requests == 1
        # resolution (auth, 307) went to the registry; the proxy saw the redirect target
        target, headers = p.seen[0]
        assert target.startswith(reg.blob_store.url + "/docker/registry/v2/blobs/")
        assert headers["Range"] == f"bytes=4096-{4096 + 8191}" and "Authorization" not in headers
        # then the proxy goes away: reads fall back to the registry
        p.server.shutdown()
        p.server.server_close()
        with client(credentials=CRED, p2p=p.address) as c:
            assert c.read_range(loc, 0, 10) == BLOB[:10]
    finally:
        with contextlib.suppress(Exception):
            p.server.shutdown()


# TLS


def test_tls_registry_with_ca_and_client_cert(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    with start_registry(tmp_path / "reg", tls=tls) as reg:
        digest = reg.push_blob("ns/app", BLOB[:1000])
        loc = loc_of(reg, digest)
        assert loc.scheme == "https"
        with client(ca_file=str(tls.ca), cert=(str(tls.client_cert), str(tls.client_key))) as c:
            assert c.read_range(loc, 0, 10) == BLOB[:10]
        with client(retries=0) as c, pytest.raises(BlobError) as e:
            c.read_range(loc, 0, 10)  # the system CAs do not know the test CA
        assert e.value.kind == "connect"


# push side


def test_push_side_against_the_registry(registry_token: Registry, tmp_path: Path) -> None:
    reg = registry_token
    host = reg.host
    f = tmp_path / "blob"
    f.write_bytes(BLOB)
    digest = sha256_digest(BLOB)
    small = b"x" * 3000
    with client(credentials=CRED) as c:
        assert not c.blob_exists(host, "ns/a", digest)
        assert c.push_blob(host, "ns/a", str(f), digest, len(BLOB)) == digest
        assert c.blob_exists(host, "ns/a", digest)
        assert c.push_blob(host, "ns/a", small, sha256_digest(small), 3000, chunk_size=1024)
        it = sha256_digest(b"abc" * 1000)
        assert c.push_blob(host, "ns/a", lambda: iter([b"abc"] * 1000), it, 3000)
        assert c.read_range(BlobLocation.of(host, "ns/a", it), 0, 6) == b"abcabc"
        with open(f, "rb") as fo:
            fo.seek(100)
            d100 = sha256_digest(BLOB[100:])
            assert c.push_blob(host, "ns/f", fo, d100, len(BLOB) - 100) == d100
        assert c.fetch_blob(BlobLocation.of(host, "ns/f", d100)) == BLOB[100:]
        with pytest.raises(BlobError):
            c.fetch_blob(BlobLocation.of(host, "ns/f", d100), max_size=10)
        assert c.mount_blob(host, "ns/b", digest, "ns/a")
        assert c.blob_exists(host, "ns/b", digest)
        assert not c.mount_blob(host, "ns/c", "sha256:" + "1" * 64, "ns/a")
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256_digest(small), "size": 3000},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest, "size": len(BLOB)}],
        }).encode()  # fmt: skip
        mt = "application/vnd.oci.image.manifest.v1+json"
        md = c.push_manifest(host, "ns/a", "v1", manifest, mt)
        assert md == sha256_digest(manifest)
        assert c.get_manifest(host, "ns/a", "v1") == (manifest, mt, md)
        assert c.get_manifest(host, "ns/a", md) == (manifest, mt, md)
        with pytest.raises(BlobError) as e:
            c.get_manifest(host, "ns/a", "nope")
        assert e.value.status == 404 and "MANIFEST_UNKNOWN" in str(e.value)


def test_push_is_retried_through_faults(registry: Registry) -> None:
    with fault_proxy(registry) as proxy, client() as c:
        proxy.add("PUT .*/blobs/uploads/", "status", times=1, code=503)
        proxy.add("POST .*/blobs/uploads/", "drop", times=1)
        data = os.urandom(100_000)
        d = sha256_digest(data)
        assert c.push_blob(registry.host, "ns/r", data, d, len(data)) == d
        assert c.read_range(BlobLocation.of(registry.host, "ns/r", d), 0, len(data)) == data


# credentials never leak


def test_credentials_never_leak(registry_token: Registry, registry_basic: Registry, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    texts: list[str] = []
    for reg in (registry_token, registry_basic):
        digest = reg.push_blob("ns/app", BLOB[:2000])
        loc = loc_of(reg, digest)
        with client(credentials=CRED, retries=1) as c:
            c.read_range(loc, 0, 10)
            texts += [repr(c), repr(c.auth), repr(CRED), repr(CRED.credential), str(c.stats)]
            for bad in (loc_of(reg, "sha256:" + "2" * 64), BlobLocation("127.0.0.1:1", "x", digest, "http")):  # fmt: skip
                with pytest.raises(RemoteError) as e:
                    c.read_range(bad, 0, 10)
                texts += [str(e.value), repr(e.value)]
        wrong = StaticCredentials(Credential(USER, PASSWORD + "x"))
        with client(credentials=wrong, retries=0) as c, pytest.raises(RemoteError) as e:
            c.read_range(loc, 0, 10)
        texts += [str(e.value), repr(e.value)]
    src = CredentialSource("file", str(tmp_path / "cred.json"))
    (tmp_path / "cred.json").write_text(json.dumps({"auths": {"x": {"auth": b64}}}))
    texts.append(repr(src))
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    assert "127.0.0.1" in blob  # the texts are real
    for secret in (PASSWORD, b64):
        assert secret not in blob


def _serve_debug(cfg: Path, ref: str, timeout: float = 20) -> tuple[int, str, str]:
    """``obd --debug serve`` of ``ref`` until it listens (or exits), then SIGTERM."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    args = ["--debug", "serve", "--nbd", "--listen", "127.0.0.1:0", "--config", str(cfg), ref]
    proc = subprocess.Popen([sys.executable, "-m", "commands.main", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        err.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(ln.startswith("listening on ") for ln in err):
            time.sleep(0.3)
            break
        time.sleep(0.05)
    stop_process(proc, 15)
    out = proc.stdout.read() if proc.stdout else ""
    reader.join(5)
    return proc.returncode, out, "".join(err)


def test_credentials_never_leak_from_obd_serve(registry_basic: Registry, tmp_path: Path) -> None:
    """``obd --debug serve REF`` with credentials from credentialConfig, DEBUG logs and the
    audit log on: the password shows nowhere, neither when it works nor when it is wrong."""
    from obd.image import ops

    raw = tmp_path / "raw"
    raw.write_bytes(os.urandom(1 << 20))
    d, i, layer = (str(tmp_path / n) for n in ("l.data", "l.index", "l.layer"))
    ops.create(d, i, None, from_raw=str(raw))
    ops.commit(d, i, layer, zfile=ops.ZFileOptions())
    img = registry_basic.push_overlaybd_image("ns/leak", "v1", [layer])
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    texts = []
    for name, password in (("good", PASSWORD), ("bad", PASSWORD + "-wrong")):
        folder = tmp_path / name
        folder.mkdir()
        cred = folder / "cred.json"
        cred.write_text(json.dumps({"auths": {registry_basic.host: {"username": USER, "password": password}}}))  # fmt: skip
        cfg = folder / "overlaybd.json"
        cfg.write_text(json.dumps({
            "logConfig": {"logPath": str(folder / "obd.log"), "logLevel": 0},
            "enableAudit": True, "auditPath": str(folder / "audit.log"),
            "credentialConfig": {"mode": "file", "path": str(cred)},
            "cacheConfig": {"cacheType": "file", "cacheDir": str(folder / "cache")},
        }))  # fmt: skip
        _, out, err = _serve_debug(cfg, img.ref)
        texts += [out, err]
        for f in folder.rglob("*"):
            if f.is_file() and f != cred and f.stat().st_size < 10 << 20:
                texts.append(f.read_bytes().decode(errors="replace"))
        if name == "good":
            assert "listening on" in err, err
    blob = "\n".join(texts)
    if os.environ.get("OBD_SHOW_LEAK_TEXTS"):
        print(blob)
    assert "ns/leak" in blob  # the outputs are real
    assert "401 Unauthorized" in blob and "refused the credentials" in blob  # the bad run
    for secret in (PASSWORD, b64, base64.b64encode(f"{USER}:{PASSWORD}-wrong".encode()).decode()):
        assert secret not in blob
