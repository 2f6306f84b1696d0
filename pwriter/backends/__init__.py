"""I/O backends: the one place where bytes meet the kernel.

A backend is a small class with the same few methods (there is no abstract
base; :class:`Backend` is only a typing protocol):

``await write(fd, buffers, offset)``
    Write every byte of ``buffers`` (a list of bytes-like objects, written in
    order) to ``fd`` from ``offset`` on, retrying short writes and EINTR.
    Returns only when all bytes are written; raises OSError (with errno and
    the file name given at :meth:`register`) otherwise.  The buffers belong
    to the backend until ``write`` returns *or* until the kernel is done with
    them, whichever is later: a cancelled ``write`` does not return before
    the kernel has let go of its buffers, so the caller may then reuse them.
``await fsync(fd)``
    Flush the file's data and metadata to stable storage.
``register(fd, name)`` / ``unregister(fd)``
    Tell the backend about a file before writing to it (and which name to
    put in errors).
``await aclose()``
    Release the backend's resources; idempotent.
``statistics()``
    A frozen :class:`BackendStatistics`.

The backend is chosen in exactly one place, :func:`open_backend`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Backend", "BackendStatistics", "BackendUnavailable", "BACKEND_NAMES", "available_backends", "open_backend"]

BACKEND_NAMES = ("io_uring", "threads")


class BackendUnavailable(UsageError):
    """The requested backend cannot run here; ``str()`` says why."""


@dataclasses.dataclass(frozen=True)
class BackendStatistics:
    """Counters of one backend since it was opened."""

    backend: str
    writes: int = 0
    """Write operations issued to the kernel (a retried short write counts again)."""
    bytes_written: int = 0
    short_writes: int = 0
    interrupted: int = 0
    fsyncs: int = 0
    most_in_flight: int = 0


class Backend(Protocol):
    name: str

    def register(self, fd: int, name: str) -> None: ...

    def unregister(self, fd: int) -> None: ...

    async def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None: ...

    async def fsync(self, fd: int) -> None: ...

    async def aclose(self) -> None: ...

    def statistics(self) -> BackendStatistics: ...


def _io_uring_unavailable_reason() -> str:
    return "the io_uring backend is not built into this version of pwriter yet; use --backend threads"


def available_backends() -> dict[str, str | None]:
    """Each backend name, with ``None`` when it can run here or the reason it cannot."""
    return {"io_uring": _io_uring_unavailable_reason(), "threads": None}


def open_backend(name: str, *, queue_depth: int) -> Backend:
    """Open the backend called ``name`` (``auto``: the best one available).

    ``queue_depth`` bounds the writes in flight at once.  Raises
    :class:`BackendUnavailable` when the named backend cannot run here.
    """
    reasons = available_backends()
    if name == "auto":
        name = next(candidate for candidate in BACKEND_NAMES if reasons[candidate] is None)
    if name not in reasons:
        raise BackendUnavailable(f"unknown backend {name!r} (choose from auto, {', '.join(BACKEND_NAMES)})")
    if reasons[name] is not None:
        raise BackendUnavailable(f"backend {name} is unavailable: {reasons[name]}")
    from .threads import ThreadBackend

    return ThreadBackend(queue_depth=queue_depth)
