"""UUID text fields of overlaybd headers (docs/formats.md §0.2)."""

from __future__ import annotations

import uuid as _uuid

NULL_UUID = "00000000-0000-0000-0000-000000000000"
_HEX = set("0123456789abcdefABCDEF")


def is_valid(text: str | None) -> bool:
    """Upstream's validator: 36 chars, hex everywhere except '-' allowed at 8, 13, 18, 23."""
    if text is None or len(text) != 36:
        return False
    for i, ch in enumerate(text):
        if ch in _HEX:
            continue
        if ch == "-" and i in (8, 13, 18, 23):
            continue
        return False
    return True


def normalize(text: str | None) -> str:
    """The stored form of ``text``: upper-case 8-4-4-4-12, or the null UUID when invalid."""
    if not is_valid(text):
        return NULL_UUID
    assert text is not None
    h = "".join(ch for i, ch in enumerate(text) if i not in (8, 13, 18, 23)).upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def generate() -> str:
    return str(_uuid.uuid4()).upper()


def encode_field(text: str) -> bytes:
    """37-byte header field: the 36 characters plus NUL."""
    return normalize(text).encode("ascii") + b"\0"


def decode_field(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return text
