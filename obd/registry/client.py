"""The OCI distribution client (docs/formats.md §8.1–§8.3): ranged blob reads, manifests,
and the push side (uploads, mounts, manifest PUTs).

One :class:`RegistryClient` per process, shared by every thread: httpx's sync client
keeps a pool of keep-alive HTTP/1.1 connections (chosen because it is thread-safe, has a
Unix-socket transport for the ``uds`` credential mode, and the same API for plain and TLS
registries).

A blob read goes to the registry's blob URL with ``Range`` and the auth the registry asked
for (:mod:`obd.registry.auth`). A 307 (or other 3xx) answer names the blob's storage URL:
it is followed with the ``Range`` kept and **no** ``Authorization`` (upstream sends none
to a redirect target), and kept for the blob for ``redirect_ttl`` seconds (dropped after
a failed request there). With a P2P proxy (§8.3) the data requests go to
``<p2p address>/<actual url>`` while auth and redirect resolution still go to the
registry; when the proxy does not answer, reads go straight to the registry.

Faults (connection drops and resets, 408/429/5xx, stalls past ``timeout``, truncated
bodies) are retried ``retries`` times with bounded exponential backoff, honouring
``Retry-After`` (at most ``max_retry_after`` s); then a :class:`BlobError` (a
:class:`~obd.errors.RemoteError`) names the URL and the status or cause. A read returns
exactly the bytes asked for or raises: never short or wrong data.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import httpx

from obd import __version__
from obd.errors import RemoteError
from obd.registry.auth import Authenticator, AuthError, CredentialProvider
from obd.registry.url import (
    blob_url,
    is_digest,
    parse_repo_blob_url,
    repo_blob_url,
    safe_url,
    scheme_for,
    sha256_digest,
)

log = logging.getLogger(__name__)
# httpx and httpcore log every URL (a redirect's signed query included) and, at DEBUG,
# every response header: obd's own lines say what happened without them.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 30.0  # §8.2.6
DEFAULT_RETRIES = 4
DEFAULT_USER_AGENT = f"obd/{__version__}"
REDIRECT_TTL = 300.0  # §8.2: the actual URL is kept at least 300 s
MAX_REDIRECTS = 8
MAX_MANIFEST = 4 << 20
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-bundle.crt")
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")

# §6.5's messages per kind of failure
REASONS = {
    "auth": "Authentication failed",
    "connect": "Connection failed",
    "timeout": "Get meta timedout",
    "not-found": "No such file or directory",
    "busy": "Too many requests",
    "unexpected": "Unexpected response",
}


class BlobError(RemoteError):
    """A registry request failed. ``kind`` is one of :data:`REASONS`' keys, ``status`` the
    HTTP status (None for connection failures); ``reason`` is upstream's §6.5 wording."""

    def __init__(self, message: str, *, url: str, kind: str, status: int | None = None) -> None:
        super().__init__(message, path=safe_url(url))
        self.kind = kind
        self.status = status

    @property
    def reason(self) -> str:
        return REASONS.get(self.kind, "Unexpected response")


class _Retry(Exception):
    """One attempt failed in a way worth another (``after``: the server's Retry-After)."""

    def __init__(self, error: BlobError, after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.after = after


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob lives: ``scheme://host/v2/<repo>/blobs/<digest>``."""

    host: str
    repo: str
    digest: str
    scheme: str = "https"

    @classmethod
    def from_url(cls, repo_blob_url: str, digest: str) -> BlobLocation:
        """From an image config's ``repoBlobUrl`` and a layer's ``digest`` (§8.1)."""
        scheme, host, repo = parse_repo_blob_url(repo_blob_url)
        return cls(host, repo, digest, scheme)

    @classmethod
    def of(
        cls, host: str, repo: str, digest: str, *, plain_http: bool | None = None
    ) -> BlobLocation:
        return cls(host, repo, digest, scheme_for(host, plain_http))

    @property
    def repo_blob_url(self) -> str:
        return repo_blob_url(self.scheme, self.host, self.repo)

    @property
    def url(self) -> str:
        return blob_url(self.repo_blob_url, self.digest)


@dataclass
class ClientStats:
    """Counters of one client (the server's metrics keep their own per blob)."""

    requests: int = 0
    bytes_fetched: int = 0  # blob body bytes received
    retries: int = 0
    token_requests: int = 0
    p2p_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


@dataclass
class _Target:
    url: str
    auth: bool  # send the registry's Authorization (False for a redirect target)
    until: float


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("Retry-After")
    if not v:
        return None
    v = v.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _detail(resp: httpx.Response) -> str:
    """The registry's first error code and message, when its body says one."""
    try:
        if not resp.is_stream_consumed:
            resp.read()
        err = resp.json()["errors"][0]
        return f" ({err.get('code', '')}: {str(err.get('message', ''))[:200]})"
    except Exception:
        return ""


def _status_error(resp: httpx.Response, url: str, what: str = "") -> BlobError:
    s = resp.status_code
    kind = (
        "auth"
        if s in (401, 403)
        else "not-found"
        if s == 404
        else "busy"
        if s == 429
        else "timeout"
        if s in (408, 504)
        else "unexpected"
    )
    return BlobError(
        f"{what}HTTP {s} {resp.reason_phrase}{_detail(resp)}", url=url, kind=kind, status=s
    )


def _transport_error(e: httpx.TransportError, url: str) -> BlobError:
    kind = "timeout" if isinstance(e, httpx.TimeoutException) else "connect"
    causes: dict[type[httpx.TransportError], str] = {
        httpx.ConnectError: "connection failed",
        httpx.ConnectTimeout: "connect timed out",
        httpx.ReadTimeout: "timed out waiting for data",
        httpx.WriteTimeout: "timed out sending",
        httpx.PoolTimeout: "no free connection",
        httpx.RemoteProtocolError: "connection closed by the server",
        httpx.ReadError: "connection reset",
        httpx.WriteError: "connection reset while sending",
    }
    cause = causes.get(type(e), type(e).__name__)
    return BlobError(cause, url=url, kind=kind)


class RegistryClient:
    """A thread-safe registry client; see the module's docstring.

    ``credentials``: a credential provider (:class:`~obd.registry.auth.CredentialSource`,
    :class:`~obd.registry.auth.StaticCredentials`, or anything with ``lookup(url)``).
    ``plain_http``: True forces HTTP for references to any host (loopback hosts always
    use it); a ``repoBlobUrl`` keeps its own scheme. ``cert``: (certFile, keyFile) of a
    client certificate; ``ca_file``: a CA bundle (default: the system's). ``p2p``: the
    P2P proxy's address (``p2pConfig.address`` when enabled, else None).
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        plain_http: bool | None = None,
        cert: tuple[str, str] | None = None,
        ca_file: str | None = None,
        p2p: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        max_retry_after: float = 30.0,
        redirect_ttl: float = REDIRECT_TTL,
        p2p_check_interval: float = 30.0,
        user_agent: str = DEFAULT_USER_AGENT,
        max_connections: int = 64,
    ) -> None:
        self.plain_http = plain_http
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.redirect_ttl = redirect_ttl
        self.p2p = p2p.rstrip("/") if p2p else None
        self.p2p_check_interval = p2p_check_interval
        self.stats = ClientStats()
        ctx = ssl.create_default_context(
            cafile=ca_file or next((p for p in CA_BUNDLES if os.path.exists(p)), None)
        )
        if cert and cert[0]:
            ctx.load_cert_chain(cert[0], cert[1] or None)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=ctx,
            follow_redirects=False,
            headers={"User-Agent": user_agent},
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.auth = Authenticator(
            credentials, self._http, on_token_request=lambda: self.stats.add(token_requests=1)
        )
        self._lock = threading.Lock()
        self._targets: dict[BlobLocation, _Target] = {}
        self._sizes: dict[BlobLocation, int] = {}
        self._p2p_state: tuple[bool, float] | None = None  # (up, checked at)

    def __repr__(self) -> str:
        return f"<RegistryClient p2p={self.p2p!r} timeout={self.timeout}>"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the request machinery ----------------------------------------------------------
    def scheme(self, host: str) -> str:
        return scheme_for(host, self.plain_http)

    def _send(
        self,
        method: str,
        url: str,
        *,
        host: str | None,
        repo: str = "",
        push: bool = False,
        headers: dict[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request. ``host``: the registry (its auth applies, a 401 is answered up to
        twice), or None for a redirect target or proxy (no auth). Transport errors raise
        :class:`_Retry`."""
        hdrs = dict(headers or {})
        if host is not None:
            with self._auth_errors(url):
                hdrs.update(self.auth.headers(host, repo, url, push=push))
        for round_ in range(3):
            try:
                req = self._http.build_request(
                    method, url, headers=hdrs, content=content() if content else None
                )
                self.stats.add(requests=1)
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as e:
                raise _Retry(_transport_error(e, url)) from None
            except httpx.InvalidURL:
                raise BlobError("invalid URL", url=url, kind="unexpected") from None
            if resp.status_code != 401 or host is None or round_ == 2:
                return resp
            resp.close()
            with self._auth_errors(url):
                hdrs.update(self.auth.challenged(resp, host, repo, url, push=push))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _auth_errors(self, url: str) -> Iterator[None]:
        try:
            yield
        except AuthError as e:
            err = BlobError(e.message, url=url, kind="auth")
            if e.retryable:
                raise _Retry(err) from None
            raise err from None

    def _attempts(self, fn: Callable[[], Any], url: str) -> Any:
        """Run ``fn`` until it returns, retrying :class:`_Retry` ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _Retry as r:
                if attempt == self.retries:
                    raise r.error from None
                delay = min(self.max_backoff, self.backoff * (2**attempt))
                delay *= 0.5 + random.random() / 2
                if r.after is not None:
                    delay = max(delay, min(r.after, self.max_retry_after))
                log.debug(
                    "%s: %s; retry %d in %.2fs", safe_url(url), r.error.message, attempt + 1, delay
                )
                self.stats.add(retries=1)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _check(self, resp: httpx.Response, url: str, what: str = "") -> None:
        """Raise for a failed status: :class:`_Retry` for 408/429/5xx, else BlobError."""
        if resp.status_code < 400:
            return
        err = _status_error(resp, url, what)
        resp.close()
        if resp.status_code in (401, 403):
            err = BlobError(
                err.message + self.auth.hint(url), url=url, kind="auth", status=resp.status_code
            )
        if resp.status_code in _RETRY_STATUS:
            raise _Retry(err, _retry_after(resp))
        raise err

    # -- P2P ----------------------------------------------------------------------------
    def p2p_active(self) -> bool:
        """Whether data requests go through the P2P proxy: one is configured and a TCP
        connect to it succeeded (checked again every ``p2p_check_interval`` s)."""
        if not self.p2p:
            return False
        now = time.monotonic()
        with self._lock:
            state = self._p2p_state
        if state is not None and now - state[1] < self.p2p_check_interval:
            return state[0]
        p = urllib.parse.urlsplit(self.p2p)
        port = p.port or (443 if p.scheme == "https" else 80)
        try:
            with socket.create_connection((p.hostname or "localhost", port), timeout=1):
                up = True
        except OSError:
            up = False
        if not up:
            log.info("P2P proxy %s does not answer; reading from the registry", safe_url(self.p2p))
        with self._lock:
            self._p2p_state = (up, now)
        return up

    def _p2p_down(self) -> None:
        with self._lock:
            self._p2p_state = (False, time.monotonic())

    def p2p_url(self, actual_url: str) -> str:
        """§8.3: ``<p2p address>/<actual url>``."""
        assert self.p2p
        return f"{self.p2p}/{actual_url}"

    # -- blob targets (§8.2 resolve) ----------------------------------------------------
    def _target(self, loc: BlobLocation) -> _Target | None:
        with self._lock:
            t = self._targets.get(loc)
            if t is not None and t.until < time.monotonic():
                del self._targets[loc]
                t = None
        return t

    def _set_target(self, loc: BlobLocation, url: str, auth: bool) -> None:
        with self._lock:
            self._targets[loc] = _Target(url, auth, time.monotonic() + self.redirect_ttl)

    def _drop_target(self, loc: BlobLocation) -> None:
        with self._lock:
            self._targets.pop(loc, None)

    def _open_blob(self, loc: BlobLocation, range_: str, *, p2p: bool) -> httpx.Response:
        """GET the blob with ``Range: range_`` and return the (streamed) answer, having
        followed redirects (Range kept, no Authorization off the registry)."""
        target = self._target(loc)
        if target is None:
            url, auth = loc.url, True
        else:
            url, auth = target.url, target.auth
        via_p2p = p2p and self.p2p_active()
        if via_p2p and target is None:
            self._resolve(loc)
            t = self._target(loc)
            url, auth = (t.url, t.auth) if t else (loc.url, True)
        base = {"Range": range_, "Accept-Encoding": "identity"}
        for _hop in range(MAX_REDIRECTS + 1):
            send_url = self.p2p_url(url) if via_p2p else url
            try:
                resp = self._send(
                    "GET",
                    send_url,
                    host=loc.host if auth else None,
                    repo=loc.repo,
                    headers=base,
                    stream=True,
                )
                if via_p2p:
                    self.stats.add(p2p_requests=1)
            except _Retry:
                if via_p2p:
                    self._p2p_down()
                    via_p2p = False
                    continue
                if url != loc.url:
                    self._drop_target(loc)
                raise
            if via_p2p and resp.status_code >= 500:
                resp.close()
                self._p2p_down()
                via_p2p = False
                continue
            if resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                resp.close()
                url = urllib.parse.urljoin(url, resp.headers["Location"])
                auth = auth and urllib.parse.urlsplit(url).netloc == loc.host
                self._set_target(loc, url, auth)
                continue
            if resp.status_code < 300 and target is None and not via_p2p:
                self._set_target(loc, url, auth)
            if resp.status_code >= 400 and resp.status_code != 416 and url != loc.url:
                # a redirect target refusing (expired signature, gone): ask the registry again
                self._drop_target(loc)
                err = _status_error(resp, url)
                resp.close()
                raise _Retry(err)
            return resp
        raise BlobError("too many redirects", url=loc.url, kind="unexpected")

    def _resolve(self, loc: BlobLocation) -> None:
        """Find and keep the blob's actual URL, asking the registry directly (§8.2 step 3;
        a ``bytes=0-0`` GET, which also gives the size)."""
        self.blob_size(loc, direct=True)

    # -- blob reads ---------------------------------------------------------------------
    def blob_size(self, loc: BlobLocation, *, direct: bool = False) -> int:
        """The blob's size (§8.2 step 5: a ``bytes=0-0`` GET; the total of Content-Range,
        or Content-Length), kept for the client's life. Resolves the actual URL too."""
        with self._lock:
            size = self._sizes.get(loc)
        if size is not None and (not direct or self._target(loc) is not None):
            return size

        def attempt() -> int:
            resp = self._open_blob(loc, "bytes=0-0", p2p=not direct)
            try:
                if resp.status_code in (206, 416):
                    resp.read()  # a byte or none: read, so the connection is kept
                if resp.status_code == 416:
                    m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                    if m:
                        return int(m[1])
                self._check(resp, loc.url)
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if resp.status_code == 206 and m and m[3] != "*":
                    return int(m[3])
                if resp.status_code == 200 and "Content-Length" in resp.headers:
                    return int(resp.headers["Content-Length"])
                raise BlobError(
                    f"HTTP {resp.status_code} without a blob size", url=loc.url, kind="unexpected"
                )
            finally:
                resp.close()

        size = self._attempts(attempt, loc.url)
        with self._lock:
            self._sizes[loc] = size
        return int(size)

    def read_range(self, loc: BlobLocation, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of the blob at ``offset`` (clipped to the blob's size
        when it is known), or a :class:`BlobError` after the retries."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self._lock:
            size = self._sizes.get(loc)
        if size is not None:
            length = max(0, min(length, size - offset))
        if length == 0:
            return b""
        end = offset + length - 1

        def attempt() -> bytearray:
            resp = self._open_blob(loc, f"bytes={offset}-{end}", p2p=True)
            url = str(resp.request.url)
            try:
                if resp.status_code == 416 and size is None:
                    m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                    if m and offset >= int(m[1]):  # past the end of a blob of unknown size
                        self._learn_size(loc, int(m[1]))
                        return bytearray()
                self._check(resp, url)
                if resp.status_code == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    total = int(m[3]) if m and m[3] != "*" else None
                    if total is not None:
                        self._learn_size(loc, total)
                    # the server clips a range that runs past the end of the blob
                    want = end if total is None else min(end, total - 1)
                    if m and int(m[1]) == offset and int(m[2]) == want:
                        return self._body(resp, url, 0, want - offset + 1)
                    raise BlobError(
                        f"asked for bytes {offset}-{end}, got Content-Range "
                        f"{resp.headers.get('Content-Range')!r}",
                        url=url,
                        kind="unexpected",
                    )
                if resp.status_code == 200:  # the server ignored Range: skip to offset
                    n = resp.headers.get("Content-Length")
                    if n is not None and n.isdigit():
                        self._learn_size(loc, int(n))
                        if offset >= int(n):
                            return bytearray()
                        return self._body(resp, url, offset, min(length, int(n) - offset))
                    return self._body(resp, url, offset, length)
                raise BlobError(
                    f"HTTP {resp.status_code} to a range request", url=url, kind="unexpected"
                )
            finally:
                resp.close()

        return bytes(self._attempts(attempt, loc.url))

    def _learn_size(self, loc: BlobLocation, size: int) -> None:
        with self._lock:
            self._sizes.setdefault(loc, size)

    def _body(self, resp: httpx.Response, url: str, skip: int, length: int) -> bytearray:
        """``length`` bytes after ``skip`` of the body; a short body is a retried fault, and
        so is one trickling in slower than ``timeout`` per 8 MiB (each socket read has the
        timeout too, but a server sending a byte now and then would pass that)."""
        buf = bytearray()
        whole = skip == 0  # a 206: read its body to the end, so the connection is kept
        deadline = time.monotonic() + self.timeout * (1 + (skip + length) / (8 << 20))
        try:
            for chunk in resp.iter_raw():
                if time.monotonic() > deadline:
                    self.stats.add(bytes_fetched=len(buf))
                    raise _Retry(
                        BlobError(
                            f"transfer too slow: {len(buf)} of {length} bytes "
                            f"in {self.timeout:g} s",
                            url=url,
                            kind="timeout",
                        )
                    )
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                buf += chunk
                if len(buf) >= length and not whole:
                    break
        except httpx.TransportError as e:
            self.stats.add(bytes_fetched=len(buf))
            raise _Retry(_transport_error(e, url)) from None
        self.stats.add(bytes_fetched=len(buf))
        if len(buf) < length:
            raise _Retry(
                BlobError(
                    f"body ended after {len(buf)} of {length} bytes", url=url, kind="unexpected"
                )
            )
        if whole and len(buf) > length:
            raise BlobError(f"body has {len(buf)} bytes, not {length}", url=url, kind="unexpected")
        del buf[length:]
        return buf

    def stream(
        self, loc: BlobLocation, offset: int = 0, *, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """The blob from ``offset`` to its end as chunks; a broken transfer resumes where
        it stopped (each stop is a retried fault; the count starts again after progress).
        Ends with exactly ``size - offset`` bytes or raises :class:`BlobError`."""
        size = self.blob_size(loc)
        pos = offset
        failures = 0
        while pos < size:
            try:
                resp = self._open_blob(loc, f"bytes={pos}-{size - 1}", p2p=True)
            except _Retry as r:
                failures = self._stream_fault(r, failures, loc)
                continue
            url = str(resp.request.url)
            try:
                try:
                    self._check(resp, url)
                except _Retry as r:
                    failures = self._stream_fault(r, failures, loc)
                    continue
                skip = 0
                if resp.status_code == 200:
                    skip = pos
                elif resp.status_code != 206 or not resp.headers.get(
                    "Content-Range", ""
                ).startswith(f"bytes {pos}-"):
                    raise BlobError(
                        f"unexpected answer to bytes={pos}-: HTTP {resp.status_code}",
                        url=url,
                        kind="unexpected",
                    )
                try:
                    for chunk in resp.iter_raw(chunk_size):
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        chunk = chunk[: size - pos]
                        if not chunk:
                            break
                        pos += len(chunk)
                        self.stats.add(bytes_fetched=len(chunk))
                        failures = 0
                        yield chunk
                        if pos >= size:
                            break
                except httpx.TransportError as e:
                    failures = self._stream_fault(_Retry(_transport_error(e, url)), failures, loc)
                    continue
                if pos < size:
                    err = BlobError(
                        f"body ended at byte {pos} of {size}", url=url, kind="unexpected"
                    )
                    failures = self._stream_fault(_Retry(err), failures, loc)
            finally:
                resp.close()

    def _stream_fault(self, r: _Retry, failures: int, loc: BlobLocation) -> int:
        if failures >= self.retries:
            raise r.error from None
        delay = min(self.max_backoff, self.backoff * (2**failures))
        if r.after is not None:
            delay = max(delay, min(r.after, self.max_retry_after))
        self.stats.add(retries=1)
        time.sleep(delay)
        return failures + 1

    def fetch_blob(self, loc: BlobLocation, *, max_size: int = 64 << 20) -> bytes:
        """A whole (small) blob, e.g. an image's config, checked against its sha256
        digest; a :class:`BlobError` when larger than ``max_size`` or the digest differs."""
        size = self.blob_size(loc)
        if size > max_size:
            raise BlobError(
                f"blob of {size} bytes is larger than {max_size}", url=loc.url, kind="unexpected"
            )
        data = self.read_range(loc, 0, size) if size else b""
        if loc.digest.startswith("sha256:"):
            got = sha256_digest(data)
            if got != loc.digest:
                raise BlobError(f"blob content hashes to {got}", url=loc.url, kind="unexpected")
        return data

    # -- manifests ----------------------------------------------------------------------
    def get_manifest(
        self,
        host: str,
        repo: str,
        reference: str,
        accept: Iterable[str] = MANIFEST_ACCEPT,
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index by tag or digest; a manifest
        asked for by digest must hash to it."""
        url = f"{self.scheme(host)}://{host}/v2/{repo}/manifests/{reference}"
        headers = {"Accept": ", ".join(accept)}

        def attempt() -> tuple[bytes, str]:
            resp = self._send("GET", url, host=host, repo=repo, headers=headers, stream=True)
            try:
                self._check(resp, url, "manifest: ")
                if resp.status_code != 200:
                    raise BlobError(
                        f"manifest: HTTP {resp.status_code}", url=url, kind="unexpected"
                    )
                buf = bytearray()
                try:
                    for chunk in resp.iter_bytes():
                        buf += chunk
                        if len(buf) > MAX_MANIFEST:
                            raise BlobError(
                                "manifest larger than 4 MiB", url=url, kind="unexpected"
                            )
                except httpx.TransportError as e:
                    raise _Retry(_transport_error(e, url)) from None
                n = resp.headers.get("Content-Length")
                if n is not None and int(n) != len(buf):
                    raise _Retry(BlobError("manifest body truncated", url=url, kind="unexpected"))
                mt = resp.headers.get("Content-Type", "").split(";")[0].strip()
                return bytes(buf), mt
            finally:
                resp.close()

        data, media_type = self._attempts(attempt, url)
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise BlobError(
                f"manifest digest is {digest}, not {reference}", url=url, kind="unexpected"
            )
        return data, media_type, digest

    # -- the push side ------------------------------------------------------------------
    def blob_exists(self, host: str, repo: str, digest: str) -> bool:
        url = blob_url(repo_blob_url(self.scheme(host), host, repo), digest)

        def attempt() -> bool:
            resp = self._send("HEAD", url, host=host, repo=repo)
            if resp.status_code == 404:
                return False
            self._check(resp, url)
            return True

        return bool(self._attempts(attempt, url))

    def mount_blob(self, host: str, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False when the registry would rather take an upload."""
        base = f"{self.scheme(host)}://{host}/v2/{repo}/blobs/uploads/"
        url = f"{base}?mount={digest}&from={from_repo}"

        def attempt() -> bool:
            resp = self._send("POST", url, host=host, repo=repo, push=True)
            self._check(resp, url)
            if resp.status_code == 201:
                return True
            if resp.status_code == 202 and "Location" in resp.headers:
                loc = urllib.parse.urljoin(url, resp.headers["Location"])
                with contextlib.suppress(RemoteError, _Retry):
                    self._send("DELETE", loc, host=host, repo=repo, push=True).close()
            return False

        return bool(self._attempts(attempt, url))

    def push_blob(
        self,
        host: str,
        repo: str,
        data: bytes | str | os.PathLike[str] | BinaryIO | Callable[[], Iterable[bytes]],
        digest: str,
        size: int,
        *,
        chunk_size: int | None = None,
    ) -> str:
        """Upload a blob (skipped when the registry has it): POST, then one PUT with the
        whole body, or PATCHes of ``chunk_size`` bytes and a closing PUT. ``data``: bytes,
        a file path, a seekable binary file (read from its current position; rewound there
        for a retry), or a callable returning a fresh iterable of bytes (called again for
        a retry). Returns the digest; the registry must confirm it."""
        if self.blob_exists(host, repo, digest):
            return digest
        start_url = f"{self.scheme(host)}://{host}/v2/{repo}/blobs/uploads/"

        start = 0 if isinstance(data, bytes | str | os.PathLike) or callable(data) else data.tell()

        def pieces() -> Iterator[bytes]:
            if isinstance(data, bytes):
                yield data
            elif isinstance(data, str | os.PathLike):
                with open(data, "rb") as f:
                    while piece := f.read(1 << 20):
                        yield piece
            elif callable(data):
                yield from data()
            else:
                data.seek(start)
                while piece := data.read(1 << 20):
                    yield piece

        def attempt() -> str:
            resp = self._send("POST", start_url, host=host, repo=repo, push=True)
            self._check(resp, start_url, "upload: ")
            loc = urllib.parse.urljoin(start_url, resp.headers.get("Location", ""))
            octet = {"Content-Type": "application/octet-stream"}
            if chunk_size:
                done = 0
                for part in _rechunk(pieces(), chunk_size):
                    hdrs = {**octet, "Content-Range": f"{done}-{done + len(part) - 1}"}
                    r = self._send(
                        "PATCH",
                        loc,
                        host=host,
                        repo=repo,
                        push=True,
                        headers=hdrs,
                        content=_const(part),
                    )
                    self._check(r, loc, "upload: ")
                    loc = urllib.parse.urljoin(loc, r.headers.get("Location", loc))
                    done += len(part)
                body: Callable[[], Any] | None = None
            else:
                body = pieces
                octet["Content-Length"] = str(size)
            sep = "&" if "?" in loc else "?"
            put = f"{loc}{sep}digest={digest}"
            r = self._send("PUT", put, host=host, repo=repo, push=True, headers=octet, content=body)
            self._check(r, put, "upload: ")
            got = r.headers.get("Docker-Content-Digest", digest)
            if r.status_code != 201 or got != digest:
                raise BlobError(
                    f"upload: HTTP {r.status_code}, digest {got}", url=put, kind="unexpected"
                )
            return digest

        return str(self._attempts(attempt, start_url))

    def push_manifest(self, host: str, repo: str, ref: str, data: bytes, media_type: str) -> str:
        url = f"{self.scheme(host)}://{host}/v2/{repo}/manifests/{ref}"
        digest = sha256_digest(data)

        def attempt() -> None:
            r = self._send(
                "PUT",
                url,
                host=host,
                repo=repo,
                push=True,
                headers={"Content-Type": media_type},
                content=lambda: data,
            )
            self._check(r, url, "manifest: ")
            if r.status_code != 201:
                raise BlobError(f"manifest: HTTP {r.status_code}", url=url, kind="unexpected")

        self._attempts(attempt, url)
        return digest


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _rechunk(pieces: Iterable[bytes], n: int) -> Iterator[bytes]:
    buf = bytearray()
    for p in pieces:
        buf += p
        while len(buf) >= n:
            yield bytes(buf[:n])
            del buf[:n]
    if buf:
        yield bytes(buf)
