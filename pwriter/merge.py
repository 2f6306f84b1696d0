"""``pwriter merge``: many trace files in, one well-formed trace out.

Reader tasks take input files one at a time from a shared channel; each
reads its file in blocks in a worker thread (decompressing gzip there, where
zlib releases the GIL), cleans each block (:mod:`pwriter.traceformat`) and
sends it through its own producer handle, so the lines of one input stay in
order and together.  The writer does the rest.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import zlib
from collections.abc import Sequence

import trio

from .errors import DataError, InputError, UsageError
from .output import is_temporary_name
from .settings import Settings
from .traceformat import BlockCleaner, is_gzip_magic
from .writer import WriterStatistics, open_writer

__all__ = ["MergeResult", "MergeProgress", "collect_inputs", "merge", "InputReader"]

READ_SIZE = 1 << 20
TRACE_SUFFIXES = (".pfw", ".pfw.gz")


def _natural_key(path: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def collect_inputs(paths: Sequence[str], directory: str | None = None, *, exclude: Sequence[str] = ()) -> list[str]:
    """The input files, checked before any data is read.

    ``paths`` are taken as given; ``directory`` adds every ``*.pfw`` and
    ``*.pfw.gz`` file in it (not hidden, not pwriter temporaries, and not one
    of ``exclude``, which names the output's files so that a merge into the
    directory it reads can be repeated).  The same file given twice is read
    once.  Raises :class:`UsageError` (exit 2) for a missing, unreadable or
    non-regular input and for a directory with no traces.
    """
    found: list[str] = list(paths)
    if directory is not None:
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: not a directory")
        excluded = set()
        for name in exclude:
            try:
                stat = os.stat(name)
            except OSError:
                continue
            excluded.add((stat.st_dev, stat.st_ino))
        listed = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or is_temporary_name(entry.name):
                    continue
                if not entry.name.endswith(TRACE_SUFFIXES) or not entry.is_file():
                    continue
                stat = entry.stat()
                if (stat.st_dev, stat.st_ino) in excluded:
                    continue
                listed.append(entry.path)
        if not listed:
            raise UsageError(f"{directory}: no *.pfw or *.pfw.gz traces in this directory")
        found.extend(sorted(listed, key=_natural_key))
    if not found:
        raise UsageError("no inputs: give trace files or -d DIR")
    inputs: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in found:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"{path}: input does not exist") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the input: {exc.strerror}") from None
        if os.path.isdir(path):
            raise UsageError(f"{path}: input is a directory (use -d DIR to merge the traces in it)")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{path}: cannot read the input: permission denied")
        key = (stat.st_dev, stat.st_ino)
        if key not in seen:
            seen.add(key)
            inputs.append(path)
    return inputs


class InputReader:
    """Reads one input (plain or gzip, told apart by its magic number) in
    cleaned blocks; blocking, meant to run in a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._raw = io.BufferedReader(io.FileIO(path, "rb"), buffer_size=READ_SIZE)
            head = self._raw.peek(2)[:2]  # no seek: pipes and FIFOs are inputs too
        except OSError as exc:
            raise DataError(f"{path}: cannot open the input: {exc.strerror}") from None
        self.compressed = is_gzip_magic(head)
        self._stream: io.BufferedReader[io.FileIO] | gzip.GzipFile = (
            gzip.GzipFile(fileobj=self._raw, mode="rb") if self.compressed else self._raw
        )
        self._cleaner = BlockCleaner(path)
        self._done = False

    @property
    def events(self) -> int:
        return self._cleaner.events

    @property
    def raw_offset(self) -> int:
        """Bytes of the file (compressed, for gzip) consumed so far."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def read_block(self) -> bytes | None:
        """The next block of event lines (may be empty), or None at the end."""
        if self._done:
            return None
        try:
            text = self._stream.read(READ_SIZE)
        except EOFError:
            raise InputError(self.path, "truncated gzip: the file ends inside a compressed member "
                             f"(after {self._cleaner.offset} bytes of text)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(self.path, f"corrupt gzip: {exc} (after {self._cleaner.offset} bytes of text)") from None
        except OSError as exc:
            raise DataError(f"{self.path}: read failed: {exc.strerror or exc}") from None
        if text:
            return self._cleaner.feed(text)
        self._done = True
        return self._cleaner.finish()

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()


@dataclasses.dataclass
class MergeProgress:
    """Live counters of a merge (read by the progress display)."""

    total_input_bytes: int
    done_input_bytes: int = 0
    files_done: int = 0
    events: int = 0
    open_readers: dict[int, InputReader] = dataclasses.field(default_factory=dict)

    def input_bytes(self) -> int:
        return self.done_input_bytes + sum(reader.raw_offset for reader in list(self.open_readers.values()))


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What a merge produced."""

    inputs: int
    events: int
    input_bytes: int
    writer: WriterStatistics
    manifest: str | None


async def merge(
    inputs: Sequence[str],
    output: str,
    *,
    settings: Settings,
    force: bool = False,
    progress: MergeProgress | None = None,
    readers: int | None = None,
) -> MergeResult:
    """Merge ``inputs`` (checked by :func:`collect_inputs`) into ``output``.

    Every event line of every input appears exactly once in the output,
    between a ``[`` first line and a ``]`` last line; lines of one input
    keep their order.  Raises :class:`InputError` / :class:`DataError` (and
    publishes nothing) when an input is damaged or a read or write fails.
    """
    sizes = [os.path.getsize(path) for path in inputs]
    if progress is None:
        progress = MergeProgress(total_input_bytes=sum(sizes))
    if readers is None:
        readers = max(1, min(len(inputs), 2 * (os.cpu_count() or 1)))
    limiter = trio.CapacityLimiter(readers)
    send_paths, receive_paths = trio.open_memory_channel[int](len(inputs))
    for index in range(len(inputs)):
        send_paths.send_nowait(index)
    send_paths.close()

    async def read_inputs(producer_index: int, paths: trio.MemoryReceiveChannel[int]) -> None:
        async with writer.producer() as producer:
            with paths:
                async for index in paths:
                    path = inputs[index]
                    reader = await trio.to_thread.run_sync(InputReader, path, limiter=limiter)
                    progress.open_readers[producer_index] = reader
                    try:
                        while True:
                            block = await trio.to_thread.run_sync(reader.read_block, limiter=limiter)
                            if block is None:
                                break
                            if block:
                                await producer.send_block(block)
                    finally:
                        del progress.open_readers[producer_index]
                        reader.close()
                    progress.done_input_bytes += sizes[index]
                    progress.files_done += 1
                    progress.events += reader.events

    async with open_writer(output, settings=settings, producers=readers, force=force, inputs=inputs) as writer:
        async with trio.open_nursery() as nursery:
            with receive_paths:
                for producer_index in range(readers):
                    nursery.start_soon(read_inputs, producer_index, receive_paths.clone())
    return MergeResult(
        inputs=len(inputs),
        events=progress.events,
        input_bytes=sum(sizes),
        writer=writer.statistics(),
        manifest=writer.manifest,
    )

