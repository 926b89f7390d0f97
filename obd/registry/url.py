"""Blob URLs (docs/formats.md §8.1) and the plain-HTTP rule.

A blob URL is ``repoBlobUrl`` + ``/`` (unless it already ends with one) + digest, where
``repoBlobUrl`` is ``scheme://host[:port]/v2/<repo>/blobs``. Registries on ``localhost``
or 127.0.0.0/8 (and ``::1``) speak plain HTTP, as docker and containerd assume; a
caller's ``plain_http=True`` forces it for every host; HTTPS otherwise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse

from obd.errors import ConfigError

DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data`` (an OCI digest)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(s: str) -> bool:
    """Whether ``s`` is an OCI digest (``algorithm:encoded``); sha256 must be 64 hex."""
    if s.startswith("sha256:"):
        return SHA256_RE.fullmatch(s) is not None
    return DIGEST_RE.fullmatch(s) is not None


def blob_url(repo_blob_url: str, digest: str) -> str:
    """§8.1: ``repoBlobUrl`` + ``/`` if it does not end with one + ``digest``."""
    return repo_blob_url + ("" if repo_blob_url.endswith("/") else "/") + digest


def host_name(host: str) -> str:
    """The name or address part of ``host[:port]`` (brackets of an IPv6 address removed)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1), with or without a port."""
    name = host_name(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def scheme_for(host: str, plain_http: bool | None = None) -> str:
    """``http`` for a loopback registry or when ``plain_http`` is set, else ``https``."""
    return "http" if plain_http or is_loopback(host) else "https"


def parse_repo_blob_url(url: str) -> tuple[str, str, str]:
    """Split ``scheme://host/v2/<repo>/blobs[/]`` into (scheme, host, repo); a
    :class:`ConfigError` naming the URL when it has another shape."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"repoBlobUrl {url!r} is not an http(s) URL")
    if "@" in parts.netloc:
        raise ConfigError("repoBlobUrl must not hold credentials (use credentialConfig)")
    if parts.query or parts.fragment:
        raise ConfigError(f"repoBlobUrl {url!r} has a query or fragment")
    if not path.startswith("/v2/") or not path.endswith("/blobs") or len(path) <= len("/v2//blobs"):
        raise ConfigError(f"repoBlobUrl {url!r} is not of the form scheme://host/v2/<repo>/blobs")
    return parts.scheme, parts.netloc, path[len("/v2/") : -len("/blobs")]


def repo_blob_url(scheme: str, host: str, repo: str) -> str:
    return f"{scheme}://{host}/v2/{repo}/blobs"


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: what messages and logs may show (a
    redirect target's query often holds a signature)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = p.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))
