"""The thread-pool backend: ``os.pwritev`` in worker threads.

Each write runs in a thread from trio's thread cache, admitted by this
backend's own CapacityLimiter (``queue_depth`` threads at most), so pwriter
never competes with the application for trio's shared default limiter.

Cancellation: ``trio.to_thread.run_sync`` is not abandoned on cancel, so a
cancelled :meth:`ThreadBackend.write` returns (raising Cancelled) only after
the thread's ``pwritev`` has finished: the kernel is done with the buffers
by then, and the caller may reuse them.  The cost is that cancellation waits
for at most one write per thread.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from . import BackendCounters, BackendStatistics, at, byte_views, consume, leading

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ThreadBackend", "WriteCounts", "pwritev_fully", "pwritev_counted"]


@dataclasses.dataclass
class WriteCounts:
    """What one :func:`pwritev_fully` call did, kept even when it fails."""

    calls: int = 0
    short: int = 0
    interrupted: int = 0
    written: int = 0


def pwritev_fully(fd: int, buffers: Sequence[Buffer], offset: int, name: str, counts: WriteCounts,
                  write_call_size: int | None = None) -> None:
    """Write all of ``buffers`` at ``offset``, counting into ``counts``.

    ``offset`` -1 writes at the file's own position (a stream, with
    ``writev``).  Each ``pwritev`` carries at most ``write_call_size`` bytes (``None``: all
    that is left).  A short write is resumed where it stopped; EINTR is
    retried; a write of zero bytes for a non-empty request is reported as
    EIO rather than looped on.  Errors raise OSError carrying ``name``.
    """
    views = byte_views(buffers)
    while views:
        batch, wanted = leading(views, write_call_size)
        try:
            counts.calls += 1
            done = os.pwritev(fd, batch, offset) if offset >= 0 else os.writev(fd, batch)
        except InterruptedError:
            counts.interrupted += 1
            continue
        except BlockingIOError:  # a non-blocking pipe or socket that is full: wait until it drains
            counts.interrupted += 1
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        except OSError as exc:
            raise OSError(exc.errno, f"write of {wanted} bytes{at(offset)} failed: {exc.strerror}", name) from None
        if done == 0:
            raise OSError(errno.EIO, f"write of {wanted} bytes{at(offset)} wrote nothing", name)
        counts.written += done
        if done < wanted:
            counts.short += 1
        if offset >= 0:
            offset += done
        consume(views, done)


def pwritev_counted(fd: int, buffers: Sequence[Buffer], offset: int, name: str, write_call_size: int | None,
                    counters: BackendCounters, lock: threading.Lock) -> None:
    """:func:`pwritev_fully`, adding what it did to ``counters`` under ``lock``
    (also when it fails): the write of every backend's ``write_in_thread``."""
    counts = WriteCounts()
    try:
        pwritev_fully(fd, buffers, offset, name, counts, write_call_size)
    finally:
        with lock:
            counters.writes += counts.calls
            counters.short_writes += counts.short
            counters.interrupted += counts.interrupted
            counters.bytes_written += counts.written


class ThreadBackend:
    """Writes with ``os.pwritev`` in up to ``queue_depth`` threads, each
    call at most ``write_call_size`` bytes (a larger write loops in its thread)."""

    name = "threads"
    inline = False

    def __init__(self, *, queue_depth: int, write_call_size: int | None = None) -> None:
        self.write_call_size = write_call_size
        self._limiter = trio.CapacityLimiter(max(1, queue_depth))
        self._names: dict[int, str] = {}
        self._counts = BackendCounters()
        self._counts_lock = threading.Lock()  # (write_in_thread counts from worker threads)
        self._in_flight = 0
        self._closed = False

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name

    def unregister(self, fd: int) -> None:
        self._names.pop(fd, None)

    def register_buffers(self, buffers: Sequence[memoryview]) -> None:
        pass  # plain pwritev gains nothing from knowing the buffers

    async def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        if self._closed:
            raise RuntimeError("backend is closed")
        self._in_flight += 1
        self._counts.most_in_flight = max(self._counts.most_in_flight, self._in_flight)
        try:
            await trio.to_thread.run_sync(self.write_in_thread, fd, buffers, offset, limiter=self._limiter)
        finally:
            self._in_flight -= 1

    def write_in_thread(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """:meth:`write`, in the calling worker thread (no thread of ours, no limiter)."""
        if self._closed:
            raise RuntimeError("backend is closed")
        pwritev_counted(fd, buffers, offset, self._names.get(fd, f"fd {fd}"), self.write_call_size, self._counts,
                        self._counts_lock)

    async def fsync(self, fd: int) -> None:
        name = self._names.get(fd, f"fd {fd}")
        try:
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self._limiter)
        except OSError as exc:
            raise OSError(exc.errno, f"fsync failed: {exc.strerror}", name) from None
        self._counts.fsyncs += 1

    async def aclose(self) -> None:
        self._closed = True

    def statistics(self) -> BackendStatistics:
        return self._counts.snapshot(self.name)
