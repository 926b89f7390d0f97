"""What a format validator finds: one :class:`Problem` per fact that is wrong or odd.

Each format module has a validator that yields every problem it finds; its reader
raises the first corruption (:func:`raise_first`) and ``obd check`` reports them all.
Severities (``obd-check(1)``): ``corruption`` (data may read wrong), ``leak`` (space
nothing explains), ``warning`` (unusual, harmless), ``note`` (normal and harmless),
``error`` (could not be checked, e.g. an unsupported feature).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from obd.errors import CorruptError

CORRUPTION = "corruption"
LEAK = "leak"
WARNING = "warning"
NOTE = "note"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Problem:
    """``code`` names the class of problem (stable, in ``obd check --json``); ``offset``
    is where it lies in the validated view; ``nbytes`` counts leaked or garbage bytes."""

    severity: str
    code: str
    message: str
    offset: int | None = None
    nbytes: int = 0

    def error(self, path: str | None) -> CorruptError:
        return CorruptError(self.message, path=path, offset=self.offset)


def raise_first(problems: Iterable[Problem], path: str | None) -> None:
    """Raise the first corruption among ``problems`` as :class:`CorruptError`."""
    for p in problems:
        if p.severity == CORRUPTION:
            raise p.error(path)
