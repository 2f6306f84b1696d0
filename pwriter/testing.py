"""Helpers for tests of code that writes through pwriter.

``read_text`` gives the whole text of an output (plain, gzip, or a sharded
set through its manifest, in read order); ``read_events`` the event lines of
any trace or output, wrapper and blank lines dropped; ``event_counter`` a
multiset of event lines, to compare the events of inputs and outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import gzip
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from .backends import Backend, BackendStatistics
from .output import read_shard_set
from .traceformat import BlockCleaner, is_gzip_magic

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["read_text", "read_events", "event_counter", "MemoryBackend", "RecordedWrite", "FaultBackend"]


def read_text(path: str | os.PathLike[str]) -> bytes:
    """The full text of ``path``: decompressed if gzip; a ``.shards``
    manifest gives its shards concatenated in read order."""
    name = os.fspath(path)
    if name.endswith(".shards"):
        return b"".join(read_text(shard) for shard in read_shard_set(name))
    with open(name, "rb") as handle:
        data = handle.read()
    return gzip.decompress(data) if is_gzip_magic(data) else data


def read_events(path: str | os.PathLike[str]) -> list[bytes]:
    """Event lines (trimmed, without newline) of a trace or output, in file order."""
    cleaner = BlockCleaner(os.fspath(path))
    text = cleaner.feed(read_text(path)) + cleaner.finish()
    return text.split(b"\n")[:-1] if text else []


def event_counter(paths: Iterable[str | os.PathLike[str]]) -> collections.Counter[bytes]:
    """The multiset of event lines of all ``paths``."""
    counter: collections.Counter[bytes] = collections.Counter()
    for path in paths:
        counter.update(read_events(path))
    return counter


@dataclasses.dataclass(frozen=True)
class RecordedWrite:
    """One write seen by :class:`MemoryBackend`: the file name given at
    register, the offset, the bytes, and the trio time it completed."""

    name: str
    offset: int
    data: bytes
    time: float


class MemoryBackend:
    """A backend that keeps every write in memory instead of on disk.

    ``writes`` lists them in completion order; :meth:`contents` rebuilds each
    file's bytes.  Writes checkpoint once and complete in the trio thread, so
    tests with ``autojump_clock`` see exact times.  The files the writer
    publishes stay empty.
    """

    name = "memory"

    def __init__(self) -> None:
        self.writes: list[RecordedWrite] = []
        self._names: dict[int, str] = {}
        self._fsyncs = 0

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name

    def unregister(self, fd: int) -> None:
        pass

    def register_buffers(self, buffers: Sequence[memoryview]) -> None:
        pass

    async def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        await trio.lowlevel.checkpoint()
        data = b"".join(bytes(buffer) for buffer in buffers)
        self.writes.append(RecordedWrite(self._names.get(fd, f"fd {fd}"), offset, data, trio.current_time()))

    async def fsync(self, fd: int) -> None:
        await trio.lowlevel.checkpoint()
        self._fsyncs += 1

    async def aclose(self) -> None:
        pass

    def contents(self) -> dict[str, bytes]:
        """Each file's bytes as the writes left them (holes as NUL bytes)."""
        files: dict[str, bytearray] = {}
        for write in self.writes:
            data = files.setdefault(write.name, bytearray())
            end = write.offset + len(write.data)
            if len(data) < end:
                data.extend(bytes(end - len(data)))
            data[write.offset : end] = write.data
        return {name: bytes(data) for name, data in files.items()}

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            backend=self.name,
            writes=len(self.writes),
            bytes_written=sum(len(write.data) for write in self.writes),
            fsyncs=self._fsyncs,
        )


class FaultBackend:
    """Wraps a real backend and makes operation number ``fail_at`` (counting
    writes and fsyncs from 1) fail with ``OSError(error)``, like a disk that
    fills up (ENOSPC), breaks (EIO) or loses the file (EBADF); ``delay``
    seconds (trio clock) are added before every operation completes.

    Short writes and EINTR are not injected here: every backend absorbs them
    itself (tests/test_backends.py provokes them for real).
    """

    def __init__(self, inner: Backend, *, fail_at: int | None = None, error: int = errno.EIO,
                 on: str = "any", delay: float = 0.0) -> None:
        self.inner = inner
        self.name = inner.name
        self.fail_at = fail_at
        self.error = error
        self.on = on  # "any", "write" or "fsync": which operations count
        self.delay = delay
        self.operations = 0
        self.failed = False
        self._names: dict[int, str] = {}

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name
        self.inner.register(fd, name)

    def unregister(self, fd: int) -> None:
        self.inner.unregister(fd)

    def register_buffers(self, buffers: Sequence[memoryview]) -> None:
        self.inner.register_buffers(buffers)

    async def _maybe_fail(self, kind: str, fd: int) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self.on in ("any", kind):
            self.operations += 1
            if self.operations == self.fail_at:
                self.failed = True
                raise OSError(self.error, os.strerror(self.error), self._names.get(fd, f"fd {fd}"))

    async def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        await self._maybe_fail("write", fd)
        await self.inner.write(fd, buffers, offset)

    async def fsync(self, fd: int) -> None:
        await self._maybe_fail("fsync", fd)
        await self.inner.fsync(fd)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> BackendStatistics:
        return self.inner.statistics()
