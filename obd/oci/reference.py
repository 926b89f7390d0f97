"""Image references: ``host[:port]/repo[:tag][@digest]`` (docker's grammar, from
distribution's ``reference`` package).

The first component must be a registry host: it holds a ``.`` or a ``:``, is
``localhost``, or is a bracketed IPv6 address. obd gives a bare name (``ubuntu:22.04``)
no default host (there is no implied Docker Hub here): it is a
:class:`~obd.errors.UsageError` that says to write the host. Without a tag or a digest
the tag is ``latest``; with a digest the digest is what is fetched (a tag beside it is
kept for display only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from obd.errors import UsageError

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REF = re.compile(
    rf"^(?P<host>{_HOST})/(?P<repo>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
MAX_NAME = 255
DEFAULT_TAG = "latest"


def _looks_like_host(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.startswith("[")


@dataclass(frozen=True)
class Reference:
    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``; a :class:`UsageError` naming it and the problem otherwise."""
        first = text.split("/", 1)[0]
        if "/" not in text or not _looks_like_host(first):
            raise UsageError(
                f"image reference {text!r} has no registry host "
                "(write host[:port]/repository[:tag])"
            )
        m = _REF.match(text)
        if m is None:
            raise UsageError(
                f"image reference {text!r} is not host[:port]/repository[:tag][@digest] "
                "(repository: lower-case letters, digits, '.', '_', '-' and '/')"
            )
        if len(m["host"]) + 1 + len(m["repo"]) > MAX_NAME:
            raise UsageError(f"image reference {text!r}: name longer than {MAX_NAME} characters")
        digest = m["digest"]
        if digest is not None and digest.startswith("sha256:") and len(digest) != 7 + 64:
            raise UsageError(f"image reference {text!r}: a sha256 digest has 64 hex digits")
        return cls(m["host"], m["repo"], m["tag"], digest)

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest, else the tag, else ``latest``."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repo}"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repo, self.tag, digest)


def looks_like_reference(text: str) -> bool:
    """Whether ``text`` is meant as an image reference rather than a path (for commands
    that take either; the caller checks first that no such file exists): it parses, or it
    starts with a host that has a port, ``localhost`` or ``[IPv6]``, or holds ``@sha256:``
    (a path rarely does), so a mistyped reference gets :meth:`Reference.parse`'s error
    instead of 'no such file'."""
    if is_reference(text):
        return True
    first, slash, _ = text.partition("/")
    if not slash:
        return False
    host_with_port = re.fullmatch(_HOST, first) is not None and (":" in first or "[" in first)
    return host_with_port or first == "localhost" or "@sha256:" in text


def is_reference(text: str) -> bool:
    """Whether ``text`` reads as an image reference rather than a path (for commands that
    take either): it parses, and names no existing file (the caller checks that)."""
    try:
        Reference.parse(text)
    except UsageError:
        return False
    return True
