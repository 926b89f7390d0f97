"""Registry auth (docs/formats.md §8.2) and credential sources (§6.4).

A request goes out anonymously, or with the header this module remembers for its host
and repository. A 401 answers with ``WWW-Authenticate``:

- ``Basic``: credentials are looked up for the URL and sent as Basic auth;
- ``Bearer realm=...,service=...,scope=...``: a token is fetched with
  ``GET <realm>?service=&scope=`` (Basic credentials added when the lookup finds some),
  its ``token`` (or ``access_token``) is sent as ``Authorization: Bearer``. Tokens are
  cached per (realm, service, scope, user) until ``expires_in`` (default 60 s) runs out,
  and dropped when the registry refuses one.

Credentials are looked up again whenever authentication is needed (§6.4): from a docker
``config.json``-like file (``auths``), or from a credential service over ``http``,
``https`` (client certificate, key and CA) or a Unix socket (``uds``). A credential's
password, a Basic header and a token never appear in a log line, an exception message or
a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from obd.errors import RemoteError
from obd.registry.url import safe_url

log = logging.getLogger(__name__)

DEFAULT_TOKEN_EXPIRY = 60.0


@dataclass(frozen=True)
class Credential:
    """A username and password (the password is left out of ``repr``)."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class CredentialProvider(Protocol):
    def lookup(self, url: str) -> Credential | None: ...


def url_prefixes(url: str) -> list[str]:
    """§6.4 candidate keys of ``scheme://host/v2/<p1>/.../<pk>/<kind>/<last>``:
    ``host``, ``host/p1``, ..., ``host/p1/.../pk`` (``v2`` and the last two segments, e.g.
    ``blobs/<digest>`` or ``manifests/<tag>``, are skipped)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return []
    words = rest.split("/")
    if len(words) < 2:
        return [words[0]]
    out = [words[0]]
    for w in words[2:-2]:
        out.append(out[-1] + "/" + w)
    return out


def _key_of(entry_key: str) -> str:
    """A config key as compared: without a scheme and trailing ``/`` (docker writes
    ``https://host/``-style keys; §6.4 compares plain ``host/path`` keys)."""
    k = entry_key.partition("://")[2] if "://" in entry_key else entry_key
    return k.rstrip("/")


def match_auths(auths: Any, url: str, problems: list[str] | None = None) -> Credential | None:
    """The first ``auths`` entry, in file order, whose key equals any §6.4 prefix of
    ``url``, with ``auth`` (base64 ``user:pass``) or ``username`` and ``password``. A
    matching entry that holds neither is passed over and said in ``problems``."""
    if not isinstance(auths, dict):
        return None
    prefixes = set(url_prefixes(url))
    for key, entry in auths.items():
        if _key_of(str(key)) not in prefixes or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, colon, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                _problem(problems, f"entry {key!r}: 'auth' is not base64 of user:pass")
                continue
            if not colon:
                _problem(problems, f"entry {key!r}: 'auth' holds no ':'")
                continue
            return Credential(user, pw)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credential(entry["username"], entry["password"])
        _problem(problems, f"entry {key!r} has neither 'auth' nor 'username' and 'password'")
    return None


def _problem(problems: list[str] | None, text: str) -> None:
    if problems is None:
        log.warning("credentials: %s", text)
    else:
        problems.append(text)


@dataclass(frozen=True)
class StaticCredentials:
    """One credential for every URL (``obd convert --user``-style use and tests)."""

    credential: Credential

    def lookup(self, url: str) -> Credential | None:
        return self.credential


@dataclass(frozen=True)
class CredentialSource:
    """``credentialConfig`` (§6.2, §6.4) as a value: ``mode`` is ``file``, ``http``,
    ``https`` or ``uds``; ``path`` the file, URL or socket. Build it from the global
    config with :meth:`from_config`."""

    mode: str
    path: str
    timeout: float = 1.0
    client_cert_path: str = ""
    client_key_path: str = ""
    server_ca_path: str = ""

    @classmethod
    def from_config(cls, cred: Any, legacy_file: str = "") -> CredentialSource | None:
        """From any object with ``credentialConfig``'s attributes (mode, path, timeout,
        client_cert_path, client_key_path, server_ca_path): an empty ``mode`` means the
        legacy ``credentialFilePath`` file, as upstream."""
        mode = getattr(cred, "mode", "")
        if not mode:
            return cls("file", legacy_file) if legacy_file else None
        return cls(
            mode,
            getattr(cred, "path", ""),
            float(getattr(cred, "timeout", 1) or 1),
            getattr(cred, "client_cert_path", ""),
            getattr(cred, "client_key_path", ""),
            getattr(cred, "server_ca_path", ""),
        )

    def describe(self) -> str:
        return f"credentialConfig {self.mode} {self.path}"

    def lookup(self, url: str) -> Credential | None:
        """The credential for ``url`` or None (a missing file, an unreachable service or a
        ``success: false`` reply are logged without secrets and give None, as upstream).
        Logged at INFO: a registry that then refuses the request says the same in its
        error (:meth:`Authenticator.hint`), and one that needs no credentials is fine."""
        cred, problem = self.explain(url)
        if problem:
            log.info("%s: %s", self.describe(), problem)
        return cred

    def explain(self, url: str) -> tuple[Credential | None, str]:
        """(the credential or None, why there is none: "" when the source has no entry)."""
        try:
            if self.mode == "file":
                return self._from_file(url), ""
            if self.mode in ("http", "https", "uds"):
                return self._from_service(url), ""
            return None, f"unknown mode {self.mode!r}"
        except _LookupProblem as e:
            return None, str(e)

    def _from_file(self, url: str) -> Credential | None:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            raise _LookupProblem("no such file") from None
        except OSError as e:
            raise _LookupProblem(e.strerror or "cannot read") from None
        except ValueError:
            raise _LookupProblem("not valid JSON") from None
        return _matched(doc.get("auths") if isinstance(doc, dict) else None, url)

    def _from_service(self, url: str) -> Credential | None:
        if not self.path:
            raise _LookupProblem("empty path")
        kw: dict[str, Any] = {"timeout": self.timeout}
        if self.mode == "uds":
            kw["transport"] = httpx.HTTPTransport(uds=self.path)
            request_url = "http://localhost/auth"
        else:
            request_url = self.path
            if self.mode == "https":
                ctx = ssl.create_default_context(cafile=self.server_ca_path or None)
                if self.client_cert_path:
                    ctx.load_cert_chain(self.client_cert_path, self.client_key_path or None)
                kw["verify"] = ctx
        # upstream appends the blob URL unescaped
        full = f"{request_url}?remote_url={url}"
        try:
            with httpx.Client(**kw) as c:
                r = c.get(full)
        except httpx.HTTPError as e:
            raise _LookupProblem(f"request failed: {type(e).__name__}") from None
        if r.status_code != 200:
            raise _LookupProblem(f"HTTP {r.status_code}")
        try:
            doc = r.json()
        except ValueError:
            raise _LookupProblem("reply is not JSON") from None
        if not isinstance(doc, dict) or not doc.get("success"):
            raise _LookupProblem(f"success is false (traceId {doc.get('traceId')!r})")
        data = doc.get("data")
        return _matched(data.get("auths") if isinstance(data, dict) else None, url)


class _LookupProblem(Exception):
    pass


def _matched(auths: Any, url: str) -> Credential | None:
    """:func:`match_auths`; when no entry answers, a matching entry's flaw is the problem."""
    problems: list[str] = []
    cred = match_auths(auths, url, problems)
    if cred is None and problems:
        raise _LookupProblem("; ".join(problems))
    return cred


class AuthError(RemoteError):
    """Authentication could not be done (the client adds the URL). ``retryable``: the
    token server failed in a way worth another try (a connection error or a 5xx)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate`` -> (scheme in lower case, params). Params are ``k="v"`` or
    ``k=v`` pairs split on the commas between them (§8.2)."""
    scheme, _, rest = value.strip().partition(" ")
    params = {
        k.lower(): (v[1:-1].replace('\\"', '"') if v.startswith('"') else v.strip())
        for k, v in re.findall(r'(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,]*)', rest)
    }
    return scheme.lower(), params


def repo_scope(repo: str, push: bool) -> str:
    return f"repository:{repo}:{'pull,push' if push else 'pull'}"


@dataclass
class _Token:
    value: str = field(repr=False)
    expires: float  # time.monotonic()


@dataclass(frozen=True)
class _Bearer:
    realm: str
    service: str


class Authenticator:
    """The auth state of one :class:`~obd.registry.client.RegistryClient`: which scheme
    each registry asked for, Basic headers, and the token cache. Thread-safe; a token is
    fetched once however many threads ask for it at the same time."""

    def __init__(
        self,
        credentials: CredentialProvider | None,
        http: httpx.Client,
        *,
        on_token_request: Callable[[], None] | None = None,
    ) -> None:
        self.credentials = credentials
        self._http = http
        self._lock = threading.Lock()
        self._flight: dict[tuple[str, ...], threading.Lock] = {}
        self._bearer: dict[str, _Bearer] = {}  # host -> realm/service
        self._basic_hosts: set[str] = set()
        self._basic: dict[tuple[str, str], str] = {}  # (host, repo) -> header
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._on_token_request = on_token_request

    def __repr__(self) -> str:
        return f"<Authenticator credentials={type(self.credentials).__name__}>"

    def _lookup(self, url: str) -> Credential | None:
        if self.credentials is None:
            return None
        return self.credentials.lookup(url)

    # -- the headers of a request -------------------------------------------------------
    def headers(self, host: str, repo: str, url: str, *, push: bool = False) -> dict[str, str]:
        """The Authorization header to send to ``host`` for ``repo`` (empty when the
        registry has not asked for auth yet)."""
        with self._lock:
            bearer = self._bearer.get(host)
            basic = self._basic.get((host, repo))
            basic_host = host in self._basic_hosts
        if bearer is not None:
            return {"Authorization": "Bearer " + self._token(bearer, repo_scope(repo, push), url)}
        if basic is not None:
            return {"Authorization": basic}
        if basic_host:
            return self._basic_for(host, repo, url)
        return {}

    def challenged(
        self, resp: httpx.Response, host: str, repo: str, url: str, *, push: bool = False
    ) -> dict[str, str]:
        """After a 401 from ``host``: remember the scheme it asks for, drop the credential
        that was refused, and return the header to retry with. A :class:`RemoteError`
        when the challenge is not one obd speaks or no credential can answer it."""
        value = resp.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(value)
        sent = resp.request.headers.get("Authorization", "")
        if scheme == "bearer":
            if not params.get("realm"):
                raise AuthError("Bearer challenge without a realm")
            bearer = _Bearer(params["realm"], params.get("service", ""))
            scope = params.get("scope") or repo_scope(repo, push)
            with self._lock:
                self._bearer[host] = bearer
                key = self._token_key(bearer, scope, None)
                for k, tok in list(self._tokens.items()):
                    if k[:3] == key[:3] and sent == "Bearer " + tok.value:
                        del self._tokens[k]
            return {"Authorization": "Bearer " + self._token(bearer, scope, url)}
        if scheme == "basic":
            with self._lock:
                self._basic_hosts.add(host)
                self._basic.pop((host, repo), None)
            h = self._basic_for(host, repo, url)
            if not h:
                raise AuthError("authentication required" + self.hint(url))
            return h
        raise AuthError(f"unsupported authentication challenge {scheme!r}")

    def hint(self, url: str) -> str:
        """Why a request to ``url`` went without credentials, for an auth error ("" when
        a credential was found)."""
        src = self.credentials
        if src is None:
            return " (no credentials configured)"
        if isinstance(src, CredentialSource):
            cred, problem = src.explain(url)
            if cred is None:
                return f" (no credentials for this URL in {src.describe()}" + (
                    f": {problem})" if problem else ")"
                )
            return f" (the registry refused the credentials from {src.describe()})"
        if src.lookup(url) is None:
            return " (no credentials for this URL)"
        return " (the registry refused the credentials)"

    def _basic_for(self, host: str, repo: str, url: str) -> dict[str, str]:
        cred = self._lookup(url)
        if cred is None:
            return {}
        h = cred.basic_header()
        with self._lock:
            self._basic[(host, repo)] = h
        return {"Authorization": h}

    # -- tokens ------------------------------------------------------------------------
    @staticmethod
    def _token_key(bearer: _Bearer, scope: str, user: str | None) -> tuple[str, ...]:
        return (bearer.realm, bearer.service, scope, user or "")

    def _token(self, bearer: _Bearer, scope: str, url: str) -> str:
        flight_key = (bearer.realm, bearer.service, scope)
        with self._lock:
            gate = self._flight.setdefault(flight_key, threading.Lock())
        with gate:
            now = time.monotonic()
            with self._lock:
                for k, tok in self._tokens.items():
                    if k[:3] == flight_key and tok.expires > now:
                        return tok.value
            cred = self._lookup(url)
            value, expires_in = self._fetch_token(bearer, scope, cred, url)
            margin = min(10.0, expires_in / 10)
            with self._lock:
                for k in [k for k in self._tokens if k[:3] == flight_key]:
                    del self._tokens[k]
                self._tokens[self._token_key(bearer, scope, cred.username if cred else None)] = (
                    _Token(value, time.monotonic() + expires_in - margin)
                )
            return value

    def _fetch_token(
        self, bearer: _Bearer, scope: str, cred: Credential | None, url: str
    ) -> tuple[str, float]:
        headers = {"Authorization": cred.basic_header()} if cred else {}
        params = {"scope": scope}
        if bearer.service:
            params = {"service": bearer.service, "scope": scope}
        if self._on_token_request is not None:
            self._on_token_request()
        where = safe_url(bearer.realm)
        try:
            r = self._http.get(bearer.realm, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise AuthError(
                f"authentication failed: token server {where}: {type(e).__name__}", retryable=True
            ) from None
        if r.status_code != 200:
            raise AuthError(
                f"authentication failed: token server {where} answered HTTP {r.status_code}"
                + ("" if cred else self.hint(url)),
                retryable=r.status_code >= 500 or r.status_code == 429,
            )
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or DEFAULT_TOKEN_EXPIRY)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"authentication failed: token server {where} sent no token")
        return token, max(1.0, expires_in)
