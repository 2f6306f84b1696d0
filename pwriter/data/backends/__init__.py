"""I/O backends: the one place where bytes meet the kernel.

A backend is a small class with the same few methods (there is no abstract
base; :class:`Backend` is only a typing protocol):

``write(fd, buffers, offset)``
    Write every byte of ``buffers`` (a list of bytes-like objects, written in
    order) to ``fd`` from ``offset`` on, retrying short writes and EINTR, in
    calls of at most ``write_call_size`` bytes (given when the backend is
    opened; ``None``: one call).  ``offset`` -1 writes at the file's own
    position (for streams: pipes, sockets, standard output).  Blocking:
    called by the data plane (:mod:`pwriter.data.sink`) from the thread
    that made the chunk, never from the trio thread, with no hop back to
    trio.  Returns once the kernel is done with the buffers; raises OSError
    (with errno and the file name given at :meth:`register`) otherwise.
``mechanism``
    How this backend's writes (and fsyncs) go to the kernel, in words: shown
    by ``pwriter info`` and in the statistics (:attr:`BackendStatistics.mechanism`).
``inline``
    True only for a test double whose writes complete in the trio thread
    (:class:`~pwriter.faces.testing.MemoryBackend`): the data plane then makes
    its blocking sink calls there, not in threads, so that a mock
    clock sees exact times.
``await fsync(fd)``
    Flush the file's data and metadata to stable storage.
``register(fd, name)`` / ``unregister(fd)``
    Tell the backend about a file before writing to it (and which name to
    put in errors).
``await aclose()``
    Release the backend's resources; idempotent.
``statistics()``
    A frozen :class:`BackendStatistics`.

The backend is chosen in exactly one place, :func:`open_backend`, an async
context manager (the io_uring backend runs a reaper task while it is open).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import trio

from ...errors import UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "Backend",
    "BackendCounters",
    "BackendStatistics",
    "BackendUnavailable",
    "BACKEND_NAMES",
    "MECHANISMS",
    "leading",
    "at",
    "available_backends",
    "open_backend",
    "resolve_backend_name",
]

BACKEND_NAMES = ("io_uring", "threads")
#: How each backend's writes and fsyncs go to the kernel.
MECHANISMS = {
    "io_uring": "pwritev from the maker threads; fsync through io_uring",
    "threads": "pwritev from the maker threads; fsync in a thread",
}


class BackendUnavailable(UsageError):
    """The requested backend cannot run here; ``str()`` says why."""


@dataclasses.dataclass(frozen=True)
class BackendStatistics:
    """Counters of one backend since it was opened."""

    backend: str
    mechanism: str = ""
    """How the writes (and fsyncs) went to the kernel (:data:`MECHANISMS`)."""
    writes: int = 0
    """Write operations issued to the kernel (a resumed short write counts again)."""
    bytes_written: int = 0
    short_writes: int = 0
    interrupted: int = 0
    fsyncs: int = 0
    most_in_flight: int = 0
    submissions: int = 0
    """io_uring: operations submitted (writes and fsyncs)."""
    enter_calls: int = 0
    """io_uring: io_uring_enter system calls made to submit them."""

    @property
    def ops_per_enter(self) -> float:
        return self.submissions / self.enter_calls if self.enter_calls else 0.0


@dataclasses.dataclass
class BackendCounters:
    """The running counters of one backend; :meth:`snapshot` freezes them."""

    writes: int = 0
    bytes_written: int = 0
    short_writes: int = 0
    interrupted: int = 0
    fsyncs: int = 0
    most_in_flight: int = 0
    submissions: int = 0
    enter_calls: int = 0

    def add_writes(self, call: BackendCounters) -> None:
        """Add the write counts of ``call`` (one :func:`~pwriter.data.backends.threads.pwritev_fully`'s)."""
        self.writes += call.writes
        self.bytes_written += call.bytes_written
        self.short_writes += call.short_writes
        self.interrupted += call.interrupted

    def snapshot(self, backend: str, mechanism: str) -> BackendStatistics:
        return BackendStatistics(backend=backend, mechanism=mechanism, **dataclasses.asdict(self))


class Backend(Protocol):
    name: str
    inline: bool
    mechanism: str

    def register(self, fd: int, name: str) -> None: ...

    def unregister(self, fd: int) -> None: ...

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None: ...

    async def fsync(self, fd: int) -> None: ...

    async def aclose(self) -> None: ...

    def statistics(self) -> BackendStatistics: ...


def byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """The non-empty ``buffers`` as flat byte views, in order."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    return [view for view in views if view.nbytes]


def leading(views: list[memoryview], limit: int | None) -> tuple[list[memoryview], int]:
    """The first ``limit`` bytes of ``views`` (all of them when ``limit`` is
    ``None``) as views, and how many bytes that is: what one write call carries."""
    if limit is None:
        return views, sum(view.nbytes for view in views)
    batch: list[memoryview] = []
    size = 0
    for view in views:
        if size + view.nbytes >= limit:
            batch.append(view[: limit - size])
            return batch, limit
        batch.append(view)
        size += view.nbytes
    return batch, size


def at(offset: int) -> str:
    """`` at offset N`` for an error message (nothing for a stream's own position, -1)."""
    return f" at offset {offset}" if offset >= 0 else ""


def consume(views: list[memoryview], count: int) -> None:
    """Drop the first ``count`` bytes of ``views`` (after a short write)."""
    while count:
        if count >= views[0].nbytes:
            count -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][count:]
            count = 0


def available_backends() -> dict[str, str | None]:
    """Each backend name, with ``None`` when it can run here or the reason it cannot."""
    from .io_uring import unavailable_reason

    return {"io_uring": unavailable_reason(), "threads": None}


def resolve_backend_name(name: str) -> str:
    """The backend ``name`` stands for (``auto``: io_uring when it can run here,
    else threads); raises :class:`BackendUnavailable` with the reason."""
    reasons = available_backends()
    if name == "auto":
        return next(candidate for candidate in BACKEND_NAMES if reasons[candidate] is None)
    if name not in reasons:
        raise BackendUnavailable(f"unknown backend {name!r} (choose from auto, {', '.join(BACKEND_NAMES)})")
    reason = reasons[name]
    if reason is not None:
        raise BackendUnavailable(f"backend {name} is unavailable: {reason}")
    return name


@asynccontextmanager
async def open_backend(name: str, *, queue_depth: int, write_call_size: int | None = None) -> AsyncIterator[Backend]:
    """Open the backend called ``name`` (``auto``: the best one available).

    ``queue_depth`` bounds the fsyncs in flight at once (io_uring entries,
    or threads; a write is made in the thread of its chunk's maker, so the
    makers bound the writes); ``write_call_size`` bounds the bytes of one write call (``None``: a
    write is one call, however large).  On exit the
    backend waits (shielded) for what is in flight and releases its
    resources.  Raises :class:`BackendUnavailable` when the named backend
    cannot run here.
    """
    name = resolve_backend_name(name)
    if name == "io_uring":
        from .io_uring import open_io_uring_backend

        async with open_io_uring_backend(queue_depth=queue_depth, write_call_size=write_call_size) as backend:
            yield backend
        return
    from .threads import ThreadBackend

    threads = ThreadBackend(queue_depth=queue_depth, write_call_size=write_call_size)
    try:
        yield threads
    finally:
        with trio.CancelScope(shield=True):
            await threads.aclose()
