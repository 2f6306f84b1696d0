"""pwriter's exceptions; each carries the command-line exit code it maps to.

Exit codes (also in the README):

* 0: success
* 1: an error found while working: an input that is not a trace, a corrupt
  or truncated gzip input, a failed read or write (:class:`DataError`)
* 2: an error found before any data is read: a bad option or setting, a
  missing or unreadable input, an output that exists, an output that is one
  of the inputs, a missing output directory, an unavailable backend
  (:class:`UsageError`)
"""

from __future__ import annotations

__all__ = ["PwriterError", "UsageError", "DataError", "InputError", "WriteError"]


class PwriterError(Exception):
    """Base of pwriter's errors; ``str()`` is one line that names the file."""

    exit_code = 1


class UsageError(PwriterError):
    """Wrong before any data was read (exit code 2)."""

    exit_code = 2


class DataError(PwriterError):
    """Found while working: bad input data or a failed read or write (exit code 1)."""

    exit_code = 1


class InputError(DataError):
    """An input is not a well-formed trace.

    ``path`` is the input, ``offset`` the byte offset (in the decompressed
    text for gzip inputs) where the problem was found, when known.
    """

    def __init__(self, path: str, problem: str, offset: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}: {problem}{where}")


class WriteError(DataError):
    """Writing, syncing or publishing an output failed; ``errno`` is kept."""

    def __init__(self, path: str, problem: str, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(f"{path}: {problem}")
