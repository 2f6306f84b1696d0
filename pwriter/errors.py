"""pwriter's exceptions; each carries the command-line exit code it maps to.

Exit codes (also in ``docs/faults.md``):

* 0: success
* 1: an error found while working: an input that is not a trace, a corrupt
  or truncated gzip input, a failed read or write (:class:`DataError`)
* 2: an error found before any data is read: a bad option or setting, a
  missing or unreadable input, an output that exists, an output that is one
  of the inputs, a missing output directory, an unavailable backend
  (:class:`UsageError`)

130 and 143 (SIGINT, SIGTERM before publishing) are the command line's own.
"""

from __future__ import annotations

__all__ = ["attach_other_errors", "other_errors", "ClosedError", "BusyError", "PwriterError", "UsageError",
           "OutputExistsError", "DataError", "InputError", "WriteError"]


class PwriterError(Exception):
    """Base of pwriter's errors; ``str()`` is one line that names the file."""

    exit_code = 1


class UsageError(PwriterError):
    """Wrong before any data was read (exit code 2)."""

    exit_code = 2


class ClosedError(PwriterError, RuntimeError):
    """A producer handle or a writer was used after it closed; the call took nothing."""


class BusyError(PwriterError, RuntimeError):
    """One producer handle was used by two tasks (or threads) at once; the
    second call took nothing.  Give each task a handle of its own."""


class OutputExistsError(UsageError):
    """The output exists and replacing it was not asked for (``force``).

    ``str()`` names the library's keyword; the command line says ``--force``
    (:meth:`message` with the flag's name).
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(self.message("force=True"))

    def message(self, how_to_force: str) -> str:
        """The one-line error, naming ``how_to_force`` as the way to replace the output."""
        return f"{self.path}: {self.problem} (use {how_to_force} to replace it)"


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


def attach_other_errors(error: BaseException, others: list[BaseException]) -> BaseException:
    """Keep ``others`` (errors that happened alongside ``error``, which is
    the one raised) on ``error``: :func:`other_errors` gives them back, and a
    traceback shows them as notes.  Returns ``error``."""
    if others:
        error.pwriter_other_errors = tuple(others)  # type: ignore[attr-defined]
        for other in others:
            error.add_note(f"also: {type(other).__name__}: {other}")
    return error


def other_errors(error: BaseException) -> tuple[BaseException, ...]:
    """The errors kept on ``error`` by :func:`attach_other_errors`."""
    return tuple(getattr(error, "pwriter_other_errors", ()))
