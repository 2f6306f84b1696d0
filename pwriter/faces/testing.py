"""Helpers for tests of code that writes through pwriter: reading outputs back, comparing event lines,
building corpora, and test doubles (a memory backend, a fault backend, fake filesystems) that the pytest
plugin (:mod:`pwriter.faces.pytest_plugin`) hands out as fixtures.
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

from ..data.backends import Backend, BackendStatistics
from ..data.output import read_shard_set
from ..plan.sizing import FS_MAGIC, FsInfo, FsKind
from ..plan.traceformat import BlockCleaner, is_gzip_magic
from .corpus import events, write_corpus

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["read_text", "read_events", "event_counter", "assert_same_events", "events", "write_corpus",
           "MemoryBackend", "RecordedWrite", "FaultBackend", "FakeFilesystems", "FS_MAGIC_OF"]


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
    return _events_of_text(read_text(path), os.fspath(path))


def _events_of_text(text: bytes, name: str) -> list[bytes]:
    cleaner = BlockCleaner(name)
    cleaned = cleaner.feed(text) + cleaner.finish()
    return cleaned.split(b"\n")[:-1] if cleaned else []


def event_counter(paths: Iterable[str | os.PathLike[str]]) -> collections.Counter[bytes]:
    """The multiset of event lines of all ``paths``."""
    counter: collections.Counter[bytes] = collections.Counter()
    for path in paths:
        counter.update(read_events(path))
    return counter


def assert_same_events(
    output: str | os.PathLike[str] | Sequence[bytes],
    expected: Iterable[str | os.PathLike[str]] | Iterable[bytes],
) -> None:
    """Assert that ``output`` (a path, or event lines such as ``MemoryBackend.events()``) holds exactly the
    ``expected`` event lines (input paths, or the lines sent), as multisets; the AssertionError says how
    many are missing and extra, with examples."""
    got = collections.Counter(
        read_events(output) if isinstance(output, (str, os.PathLike)) else [line.strip() for line in output]
    )
    wanted: collections.Counter[bytes] = collections.Counter()
    for item in expected:
        if isinstance(item, bytes):
            wanted[item.strip()] += 1
        else:
            wanted.update(read_events(item))
    if got == wanted:
        return
    missing, extra = wanted - got, got - wanted
    raise AssertionError(
        f"{sum(missing.values())} event lines missing (e.g. {list(missing)[:3]}), "
        f"{sum(extra.values())} extra (e.g. {list(extra)[:3]}); "
        f"{sum(got.values())} in the output, {sum(wanted.values())} expected"
    )


@dataclasses.dataclass(frozen=True)
class RecordedWrite:
    """One write seen by :class:`MemoryBackend`, with the trio time it completed."""

    name: str
    offset: int
    data: bytes
    time: float


class MemoryBackend:
    """A backend that keeps every write (``writes``, in completion order) in memory; the published files
    stay empty.  It is ``inline``: the writer's own chunk-sink calls run in the trio thread, so tests with
    ``autojump_clock`` see exact times (a merge's readers still write from their threads).
    """

    name = "memory"
    inline = True
    mechanism = "in memory, in the trio thread (a test backend)"

    def __init__(self) -> None:
        self.writes: list[RecordedWrite] = []
        self._names: dict[int, str] = {}
        self._fsyncs = 0

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name

    def unregister(self, fd: int) -> None:
        pass

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """Record the write, with its trio time (from the trio thread, or a thread trio started)."""
        data = b"".join(bytes(buffer) for buffer in buffers)
        try:
            now = trio.current_time()
        except RuntimeError:  # (a thread: a merge's reader)
            now = trio.from_thread.run_sync(trio.current_time)
        self.writes.append(RecordedWrite(self._names.get(fd, f"fd {fd}"), offset, data, now))

    async def fsync(self, fd: int) -> None:
        await trio.lowlevel.checkpoint()
        self._fsyncs += 1

    async def aclose(self) -> None:
        pass

    def contents(self) -> dict[str, bytes]:
        """Each file's bytes as the writes left them (holes as NUL bytes), in read order."""
        files: dict[str, bytearray] = {name: bytearray() for name in self._names.values()}
        for write in self.writes:
            data = files.setdefault(write.name, bytearray())
            end = write.offset + len(write.data)
            if len(data) < end:
                data.extend(bytes(end - len(data)))
            data[write.offset : end] = write.data
        return {name: bytes(data) for name, data in files.items()}

    def text(self) -> bytes:
        """The whole output as a reader would see it: every file, in read order."""
        return b"".join(self.contents().values())

    def events(self) -> list[bytes]:
        """The event lines of :meth:`text` (padding and wrapper lines dropped)."""
        return _events_of_text(self.text(), "memory")

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            backend=self.name,
            mechanism=self.mechanism,
            writes=len(self.writes),
            bytes_written=sum(len(write.data) for write in self.writes),
            fsyncs=self._fsyncs,
        )


FAULT_OPERATIONS = ("any", "write", "fsync")


def errno_number(error: int | str) -> int:
    """An errno given as a number or by name (``"ENOSPC"``); ValueError for anything else."""
    if isinstance(error, str):
        number = getattr(errno, error, None) if error.startswith("E") else None
        if not isinstance(number, int):
            raise ValueError(f"error={error!r}: not an errno name (e.g. 'ENOSPC', 'EIO')")
        return number
    if isinstance(error, bool) or not isinstance(error, int) or error not in errno.errorcode:
        raise ValueError(f"error={error!r}: not an errno (e.g. errno.ENOSPC or 'ENOSPC')")
    return error


class FaultBackend:
    """Wraps a backend and makes operation number ``fail_at`` (writes and fsyncs from 1, or only those
    ``on`` names) fail with ``OSError(error)`` (an errno or its name); ``delay`` seconds (trio clock) before
    every operation.  Another ``on`` or an unknown errno is a ValueError.  (Short writes and EINTR are not
    injected: every backend absorbs them itself.)
    """

    def __init__(self, inner: Backend, *, fail_at: int | None = None, error: int | str = errno.EIO,
                 on: str = "any", delay: float = 0.0) -> None:
        self.inner = inner
        self.name = inner.name
        self.inline = False  # (its writes wait for trio from a thread)
        self.mechanism = inner.mechanism
        self.fail_at = fail_at
        self.error = error  # (checked, as a number: see the property)
        self.on = on
        self.delay = delay
        self.operations = 0
        self.failed = False
        self._names: dict[int, str] = {}

    @property
    def error(self) -> int:
        """The errno of the failure (set as a number or a name such as ``"ENOSPC"``)."""
        return self._error

    @error.setter
    def error(self, error: int | str) -> None:
        self._error = errno_number(error)

    @property
    def on(self) -> str:
        """Which operations count: ``"any"``, ``"write"`` or ``"fsync"``."""
        return self._on

    @on.setter
    def on(self, on: str) -> None:
        if on not in FAULT_OPERATIONS:
            raise ValueError(f"on={on!r}: which operations count, one of {', '.join(map(repr, FAULT_OPERATIONS))}")
        self._on = on

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name
        self.inner.register(fd, name)

    def unregister(self, fd: int) -> None:
        self.inner.unregister(fd)

    async def _maybe_fail(self, kind: str, fd: int) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self.on in ("any", kind):
            self.operations += 1
            if self.operations == self.fail_at:
                self.failed = True
                raise OSError(self.error, os.strerror(self.error), self._names.get(fd, f"fd {fd}"))

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """From a thread: counted, failed and delayed in trio, in order; then the inner write."""
        trio.from_thread.run(self._maybe_fail, "write", fd)
        self.inner.write(fd, buffers, offset)

    async def fsync(self, fd: int) -> None:
        await self._maybe_fail("fsync", fd)
        await self.inner.fsync(fd)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> BackendStatistics:
        return self.inner.statistics()


#: A statfs magic number for each kind (the first :data:`~pwriter.plan.sizing.FS_MAGIC` has; ext4's for local).
FS_MAGIC_OF: dict[FsKind, int] = {**{kind: magic for magic, kind in reversed(FS_MAGIC.items())}, FsKind.LOCAL: 0xEF53}


class FakeFilesystems:
    """Paths that pretend to be on another filesystem: :meth:`detect` stands in for
    :func:`pwriter.data.detect.detect_filesystem`, answering from :meth:`add`'s declarations first.
    """

    def __init__(self) -> None:
        from ..data.detect import detect_filesystem

        self.declared: dict[str, FsInfo] = {}
        self._real_detection = detect_filesystem

    def add(self, path: str | os.PathLike[str], kind: FsKind | str, *, stripe_size: int | str | None = None,
            stripe_count: int | None = None, block_size: int = 4096) -> FsInfo:
        """Everything under ``path`` is on a ``kind`` filesystem (``"lustre"``, ``"nfs"``, ...) with this stripe
        geometry (``stripe_size`` in bytes or as ``"1MiB"``); returns what detection will report."""
        from ..plan.settings import parse_size

        kind = FsKind(kind)
        size = parse_size(stripe_size) if stripe_size is not None else None
        if kind is FsKind.GPFS and size is not None:
            block_size = size  # GPFS reports its block size as the stripe
        root = os.path.abspath(os.fspath(path))
        info = FsInfo(kind=kind, magic=FS_MAGIC_OF[kind], mount_point=root, block_size=block_size,
                      stripe_size=size, stripe_count=stripe_count)
        self.declared[root] = info
        return info

    def detect(self, path: str) -> FsInfo:
        """What detection reports for ``path`` while these fakes are installed."""
        where = os.path.abspath(path)
        for root in sorted(self.declared, key=len, reverse=True):
            if where == root or where.startswith(root.rstrip(os.sep) + os.sep):
                return self.declared[root]
        return self._real_detection(path)
