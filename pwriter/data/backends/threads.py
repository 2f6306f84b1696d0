"""The thread backend: ``os.pwritev`` in the thread that made the chunk.

A write is a blocking call made by the data plane from a thread
that trio started (:mod:`pwriter.data.sink`): it returns once every byte is
written, so the kernel is done with the buffers.  fsync runs in a thread
of this backend's own CapacityLimiter (``queue_depth`` threads at most), so
pwriter never competes with the application for trio's shared default limiter.
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

from . import MECHANISMS, BackendCounters, BackendStatistics, at, byte_views, consume, leading

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["ThreadBackend", "pwritev_fully", "PwritevWrites"]


def pwritev_fully(fd: int, buffers: Sequence[Buffer], offset: int, name: str, counts: BackendCounters,
                  write_call_size: int | None = None) -> None:
    """Write all of ``buffers`` at ``offset``, counting its system calls,
    bytes, short writes and retries into ``counts`` (kept when it fails).

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
            counts.writes += 1
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
        counts.bytes_written += done
        if done < wanted:
            counts.short_writes += 1
        if offset >= 0:
            offset += done
        consume(views, done)


class PwritevWrites:
    """The writes of a backend: ``pwritev`` in the calling thread (the maker's
    thread), every byte, counted under a lock, with the most writes
    in flight at once."""

    def __init__(self, write_call_size: int | None) -> None:
        self.write_call_size = write_call_size
        self.counters = BackendCounters()
        self.lock = threading.Lock()
        self._in_flight = 0

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int, name: str) -> None:
        """:func:`pwritev_fully`, adding what it did to the counters (also when it fails)."""
        counts = BackendCounters()
        with self.lock:
            self._in_flight += 1
            self.counters.most_in_flight = max(self.counters.most_in_flight, self._in_flight)
        try:
            pwritev_fully(fd, buffers, offset, name, counts, self.write_call_size)
        finally:
            with self.lock:
                self._in_flight -= 1
                self.counters.add_writes(counts)

    def snapshot(self) -> BackendCounters:
        with self.lock:
            return dataclasses.replace(self.counters)


class ThreadBackend:
    """Writes with ``os.pwritev`` in the calling thread, each call at
    most ``write_call_size`` bytes (a larger write loops); fsyncs in a thread
    of its own, ``queue_depth`` at most at once."""

    name = "threads"
    inline = False
    mechanism = MECHANISMS["threads"]

    def __init__(self, *, queue_depth: int, write_call_size: int | None = None) -> None:
        self._limiter = trio.CapacityLimiter(max(1, queue_depth))
        self._names: dict[int, str] = {}
        self._writes = PwritevWrites(write_call_size)
        self._fsyncs = 0
        self._closed = False

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name

    def unregister(self, fd: int) -> None:
        self._names.pop(fd, None)

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """Blocking, in the calling thread (see the package docstring)."""
        if self._closed:
            raise RuntimeError("backend is closed")
        self._writes.write(fd, buffers, offset, self._names.get(fd, f"fd {fd}"))

    async def fsync(self, fd: int) -> None:
        name = self._names.get(fd, f"fd {fd}")
        try:
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self._limiter)
        except OSError as exc:
            raise OSError(exc.errno, f"fsync failed: {exc.strerror}", name) from None
        self._fsyncs += 1

    async def aclose(self) -> None:
        self._closed = True

    def statistics(self) -> BackendStatistics:
        counters = self._writes.snapshot()
        counters.fsyncs = self._fsyncs
        return counters.snapshot(self.name, self.mechanism)
