"""The one error tree of obd.

Every error obd raises on purpose is an :class:`ObdError`. Each class carries the exit
code the command line uses for it; the message is a single line that names the file
and the problem. Only ``commands`` turns these into exit codes and printed lines.

Exit codes (also listed in ``obd(1)``):

====  ==========================================================
 0    success
 1    generic failure (:class:`ObdError`)
 2    usage error: bad option or argument (:class:`UsageError`)
 3    a file is missing or cannot be read/written (:class:`FileAccessError`)
 4    a file is corrupt or not of the expected format (:class:`CorruptError`)
 5    the output exists and ``-f`` was not given (:class:`OutputExistsError`)
 6    a valid file uses a feature obd does not support (:class:`UnsupportedError`)
 7    an image config is invalid (:class:`ConfigError`)
 8    a remote peer (registry, client) misbehaved (:class:`RemoteError`)
 9    the operation is not allowed on this object, e.g. a write to a read-only image
      (:class:`ReadOnlyError`)
 130  interrupted (SIGINT)
====  ==========================================================

``obd check`` uses its own qemu-img style codes: 0 clean, 1 could not check, 2 corruption,
3 leaks only.
"""

from __future__ import annotations

import os


class ObdError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def with_path(self, path: str | os.PathLike[str]) -> ObdError:
        """Return a copy of this error naming ``path`` (when it names none yet)."""
        if self.path is not None:
            return self
        err = type(self).__new__(type(self))
        ObdError.__init__(err, self.message, path=path)
        err.__dict__.update(
            {k: v for k, v in self.__dict__.items() if k not in ("path", "message")}
        )
        return err


class UsageError(ObdError):
    exit_code = 2


class FileAccessError(ObdError):
    exit_code = 3


class CorruptError(ObdError):
    """The bytes of a file break its format. ``offset`` is the file offset of the problem."""

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
    ) -> None:
        self.offset = offset
        if offset is not None:
            message = f"{message} (at offset {offset})"
        super().__init__(message, path=path)


class OutputExistsError(ObdError):
    exit_code = 5


class UnsupportedError(ObdError):
    exit_code = 6


class ConfigError(ObdError):
    exit_code = 7


class RemoteError(ObdError):
    exit_code = 8


class ReadOnlyError(ObdError):
    exit_code = 9


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        ObdError,
        UsageError,
        FileAccessError,
        CorruptError,
        OutputExistsError,
        UnsupportedError,
        ConfigError,
        RemoteError,
        ReadOnlyError,
    )
}
