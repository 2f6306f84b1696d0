"""The chunk sink: where a chunk of whole lines becomes bytes in the output.

Theory of operation
-------------------
Whoever made a chunk hands it to the sink, which places it (the pure
planners of :mod:`pwriter.layout`, under one lock: worker threads place
too), puts the header and the padding around it, and writes it through the
backend.  There are two ways in, for the two kinds of makers:

* from a worker thread that trio started (the merge's readers):
  :meth:`ChunkSink.write_chunk_in_thread` places, compresses (gzip output)
  and writes right there, through the backend's ``write_in_thread``, and
  returns once the kernel is done with the buffer: no hop back to trio;
* from the trio thread (the writer's coalescers, the header and footer):
  :meth:`ChunkSink.place` now, then ``await`` :meth:`ChunkSink.write_placed` in a
  task of its own.

Either way the placement is taken when the chunk is ready, so the chunks of
one lane are placed in the order their maker made them.  The sink keeps the
gzip member index (every member's file, offset, length and text) and the
counts of what it wrote.  A stream output (standard output, a pipe) has no
offsets to write at: every write of a stream, from either way in, passes one
gate that lets it through once every byte placed before it is written
(each placed chunk is being written by whoever placed it, so the earliest
one always can go).  With fsync on, the writeback of each large written
range is started at once (``early_writeback``), so that the final fsync
finds little left to do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Iterable, Sequence

import trio

from .backends import Backend
from .compress import MemberBuilder, gzip_member
from .errors import WriteError
from .layout import GZIP_MIN_PADDING, Placement, Planner, gzip_padding, gzip_padding_members, plain_padding
from .output import OutputSet, StreamOutput
from .traceformat import count_newlines

__all__ = ["ChunkSink", "SinkCounts", "MemberIndex", "StreamGate", "ThreadMembers", "compress_chunk", "DIRECT_ALIGNMENT", "WRITEBACK_MIN"]

DIRECT_ALIGNMENT = 4096
# With fsync on, every written range of at least this size gets
# posix_fadvise(DONTNEED), which starts its writeback at once (Linux) rather
# than leaving every dirty page to the final fsync: writing and flushing then
# overlap.  (Smaller ranges are left to the fsync.)
WRITEBACK_MIN = 256 << 10
STREAM_POLL = 0.05  # seconds a stream write waiting for its turn sleeps between checks of cancellation


@dataclasses.dataclass(frozen=True)
class SinkCounts:
    """What a sink wrote: chunks handed to it and their bytes of lines, every
    byte placed in the files, writes through the O_DIRECT descriptor, and
    ranges whose writeback was started early."""

    chunks: int
    line_bytes: int
    bytes_written: int
    direct_writes: int
    writeback_hints: int


class ChunkSink:
    """Places and writes the chunks of one output (see the module docstring).

    ``header`` is what the planner's header placement holds (a gzip member
    for compressed output); ``header_text`` its text length, for the member
    index.  ``chunk_capacity`` is the most bytes of lines one chunk holds.
    ``member_target``: padded gzip members are finished at about that size.
    """

    def __init__(self, *, planner: Planner, output: OutputSet | StreamOutput, backend: Backend, header: bytes,
                 header_text: int, compressed: bool, padded_members: bool, level: int, member_target: int,
                 chunk_capacity: int, writeback: bool, stream_threads: int) -> None:
        self._planner = planner
        self._output = output
        self._backend = backend
        self._header = header
        self._header_text = header_text
        self.compressed = compressed
        self.chunk_capacity = chunk_capacity
        self._padding = gzip_padding if compressed else plain_padding
        self._fds = list(output.fds)
        self._direct_fds = list(output.direct_fds)  # empty unless O_DIRECT
        self._lock = threading.Lock()  # placement and the counts
        self.members = MemberIndex(header_text)
        self._thread_members = ThreadMembers(self, level=level, padded=padded_members, member_target=member_target)
        self._stream = isinstance(output, StreamOutput)
        self._stream_gate = StreamGate()
        # As many threads as stream writes can wait at once: a write holding
        # a thread must never keep an earlier one from getting one.
        self._stream_limiter = trio.CapacityLimiter(stream_threads)
        self._writeback = writeback and not self._stream and hasattr(os, "posix_fadvise")
        self._chunks = 0
        self._line_bytes = 0
        self._bytes_written = 0
        self._direct_writes = 0
        self._writeback_hints = 0

    def counts(self) -> SinkCounts:
        """A snapshot of what the sink wrote so far (safe from any thread)."""
        with self._lock:
            return SinkCounts(self._chunks, self._line_bytes, self._bytes_written, self._direct_writes,
                              self._writeback_hints)

    def count_chunk(self, line_bytes: int) -> None:
        """Count a chunk of ``line_bytes`` bytes of lines handed to the sink."""
        with self._lock:
            self._chunks += 1
            self._line_bytes += line_bytes

    def open(self) -> Placement | None:
        """The header's placement (None when the layout puts it in the first
        chunk, or when this writer writes no header: a part of a shared output)."""
        with self._lock:
            header = self._planner.open()
        if header is not None and header.length == 0:
            return None
        if header is not None:
            self.record(header, text=self._header_text, events=0)
        return header

    def close(self, footer_length: int, footer_text: int) -> Placement:
        """The footer's placement, after every chunk's."""
        with self._lock:
            footer = self._planner.close(footer_length)
        self.record(footer, text=footer_text, events=0)
        return footer

    def fill_empty_files(self) -> list[Placement]:
        """After :meth:`close`: a placement of padding alone (one whitespace
        line, or a gzip member holding one) for every file that got no byte,
        recorded for the member index.  A shard whose lane had nothing to
        write is still a file every reader reads (an empty .gz file is not)."""
        with self._lock:
            sizes = self._planner.file_sizes()
        pad = GZIP_MIN_PADDING if self.compressed else 1
        placements = [Placement(file, 0, 0, 0, pad) for file, size in enumerate(sizes) if size == 0]
        for placement in placements:
            self.record(placement, text=0, events=0)
        return placements

    def record(self, placement: Placement, *, text: int, events: int) -> None:
        """Remember the gzip members of ``placement`` for the member index."""
        if self.compressed:
            self.members.record(placement, text=text, events=events)

    def member_index(self) -> dict[str, object]:
        """The member index of a compressed output (see the README for the format)."""
        return self.members.index([os.path.basename(name) for name in self._output.targets])

    def splice(self, placement: Placement, buffer: memoryview, filled: int) -> tuple[Placement, memoryview]:
        """:func:`splice` with this output's header."""
        return splice(placement, buffer, filled, self._header)

    @trio.lowlevel.enable_ki_protection
    async def write_placed(self, placement: Placement, body: bytes | memoryview, *, aligned_memory: bool = False) -> None:
        """Write ``placement`` (header, ``body``, padding) to its file.

        With O_DIRECT, a write of one page-aligned buffer (``aligned_memory``)
        at an aligned offset and of an aligned length goes through the direct
        descriptor; any other (the footer, a line longer than a stripe) goes
        through the buffered one.  Their ranges never share a page.
        """
        if self._stream:  # in order, through the one gate of stream writes (a thread's)
            await trio.to_thread.run_sync(
                functools.partial(self.write_placed_in_thread, placement, body, aligned_memory=aligned_memory),
                limiter=self._stream_limiter,
            )
            return
        fd, parts = self._parts(placement, body, aligned_memory)
        try:
            await self._backend.write(fd, parts, placement.offset)
        except OSError as exc:
            raise self._write_error(placement, exc) from None
        self._written(placement, fd)

    def _parts(self, placement: Placement, body: bytes | memoryview,
               aligned_memory: bool) -> tuple[int, list[bytes | memoryview]]:
        """The descriptor and the buffers of one write: header, ``body``, padding.

        With O_DIRECT, a write of one page-aligned buffer (``aligned_memory``)
        at an aligned offset and of an aligned length goes through the direct
        descriptor; any other goes through the buffered one.
        """
        parts = [part for part, length in ((self._header, placement.head), (body, placement.body),
                                           (self._padding(placement.pad), placement.pad)) if length]
        direct = (self._direct_fds and aligned_memory and len(parts) == 1
                  and placement.offset % DIRECT_ALIGNMENT == 0 and placement.length % DIRECT_ALIGNMENT == 0)
        return (self._direct_fds if direct else self._fds)[placement.file], parts

    def _write_error(self, placement: Placement, exc: OSError) -> WriteError:
        return WriteError(self._output.targets[placement.file], exc.strerror or str(exc), exc.errno)

    def _written(self, placement: Placement, fd: int) -> None:
        """Bookkeeping after a write (from the trio thread or a worker thread)."""
        direct = fd in self._direct_fds
        hint = self._writeback and placement.length >= WRITEBACK_MIN and not direct
        if hint:
            # Durable output: start writing this range back now, so that the
            # final fsync finds little left to do (see WRITEBACK_MIN).
            os.posix_fadvise(fd, placement.offset, placement.length, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self._bytes_written += placement.length
            self._direct_writes += direct
            self._writeback_hints += hint

    # -- the chunk sink, called from the worker thread that made the chunk --

    def write_chunk_in_thread(self, lane: int, buffer: memoryview, filled: int) -> None:
        """From a worker thread that trio started (never the trio thread):
        write ``buffer[:filled]`` (whole lines, at most :attr:`chunk_capacity`
        bytes) as one chunk of ``lane``, now, in this thread: placed under a
        lock, compressed here for gzip output, written through the backend's
        ``write_in_thread``.  Returns once the kernel is done with the
        buffer; the caller keeps it (its bytes after ``filled`` may have been
        overwritten by padding).  A stream output's chunks wait for their
        turn (see :meth:`write_placed_in_thread`)."""
        if filled > self.chunk_capacity or filled < 0:
            raise ValueError(f"a chunk of {filled} bytes: it must hold 0 to {self.chunk_capacity} bytes")
        if filled == 0:
            return
        self.count_chunk(filled)
        if self.compressed:
            self._thread_members.add(lane, buffer[:filled])
            return
        placement, body = self.splice(self.place(lane, filled), buffer, filled)
        self.write_placed_in_thread(placement, body, aligned_memory=True)

    def write_lines_in_thread(self, lane: int, lines: bytes) -> None:
        """:meth:`write_chunk_in_thread` for whole lines of any length, not in a pool buffer."""
        self.count_chunk(len(lines))
        if self.compressed:
            self._thread_members.add(lane, memoryview(lines))
            return
        self.write_placed_in_thread(self.place(lane, len(lines)), memoryview(lines))

    def finish_lane_in_thread(self, lane: int) -> None:
        """Padded gzip: finish and write this thread's unfinished member (at the end of its run)."""
        self._thread_members.finish(lane)

    def write_placed_in_thread(self, placement: Placement, body: bytes | memoryview, *,
                         aligned_memory: bool = False) -> None:
        """Write ``placement`` (header, ``body``, padding), blocking, from a worker
        thread trio started; a stream output waits for its turn first."""
        fd, parts = self._parts(placement, body, aligned_memory)
        offset = placement.offset
        if self._stream:
            # A stream takes bytes in order: wait until every byte placed
            # before these is written (each placed chunk is being written by
            # the thread or task that placed it, so the earliest always goes).
            self._stream_gate.wait_for(offset)
            offset = -1  # at the stream's own position
        try:
            self._backend.write_in_thread(fd, parts, offset)
        except OSError as exc:
            raise self._write_error(placement, exc) from None
        self._written(placement, fd)
        if self._stream:
            self._stream_gate.advance(placement.length)

    def place(self, lane: int, length: int) -> Placement:
        """The planner's placement of a chunk (under the lock: worker threads place too)."""
        with self._lock:
            return self._planner.place(lane, length)

    def place_member(self, lane: int, finished: tuple[bytes, int, int]) -> tuple[Placement, bytes]:
        """Place a finished member ``(member, text bytes, events)`` next in
        ``lane``'s order and record it for the index."""
        member, text, events = finished
        placement = self.place(lane, len(member))
        self.record(placement, text=text, events=events)
        return placement, member

    async def sync(self) -> None:
        """fsync every file of the output (WriteError naming the file on failure)."""
        for fd, name in zip(self._fds, self._output.targets):
            try:
                await self._backend.fsync(fd)
            except OSError as exc:
                raise WriteError(name, exc.strerror or str(exc), exc.errno) from None


class ThreadMembers:
    """Gzip members made in the thread of the maker of their text (the
    merge's readers): a member per chunk, or, for padded-striped output, one
    member per stripe slot built from many of that thread's chunks (about
    ``member_target`` bytes), each written through the sink at once."""

    def __init__(self, sink: ChunkSink, *, level: int, padded: bool, member_target: int) -> None:
        self._sink = sink
        self._level = level
        self._padded = padded
        self._member_target = member_target
        self._unfinished = threading.local()  # padded: this thread's member being built

    def add(self, lane: int, text: memoryview) -> None:
        """Compress ``text`` (whole lines of ``lane``) into this thread's members; write what is finished."""
        if not self._padded:
            member, events = compress_chunk(text, self._level)
            self._write(lane, (member, text.nbytes, events))
            return
        builder = getattr(self._unfinished, "builder", None)
        if builder is None:
            builder = self._unfinished.builder = MemberBuilder(self._level)
        finished = builder.feed(text, self._member_target)
        if finished is not None:
            self._unfinished.builder = None
            self._write(lane, finished)

    def finish(self, lane: int) -> None:
        """Write this thread's unfinished member, if any (at the end of its run)."""
        builder = getattr(self._unfinished, "builder", None)
        self._unfinished.builder = None
        finished = builder.finish() if builder is not None else None
        if finished is not None:
            self._write(lane, finished)

    def _write(self, lane: int, finished: tuple[bytes, int, int]) -> None:
        placement, member = self._sink.place_member(lane, finished)
        self._sink.write_placed_in_thread(placement, member)


class MemberIndex:
    """The gzip members of one output, for its member index (safe from any thread).

    An entry is ``(file, offset, length, text length, events, listed)``:
    padding members are not listed, but their text counts in the
    ``text_offset`` of the members after them.  Entries of several writers
    of one output (MPI ranks) can be joined with :meth:`add_entries`.
    """

    def __init__(self, header_text: int) -> None:
        self._header_text = header_text
        self._lock = threading.Lock()
        self._entries: list[tuple[int, int, int, int, int, bool]] = []

    def record(self, placement: Placement, *, text: int, events: int) -> None:
        """Remember the members of ``placement``: its header, body and padding."""
        file, offset = placement.file, placement.offset
        entries = []
        if placement.head:
            entries.append((file, offset, placement.head, self._header_text, 0, True))
        if placement.body:
            entries.append((file, offset + placement.head, placement.body, text, events, True))
        if placement.pad:
            entries.append((file, offset + placement.head + placement.body, placement.pad,
                            gzip_padding_members(placement.pad), 0, False))
        with self._lock:
            self._entries.extend(entries)

    def entries(self) -> list[tuple[int, int, int, int, int, bool]]:
        with self._lock:
            return list(self._entries)

    def add_entries(self, entries: Iterable[Sequence[int]]) -> None:
        """Join entries taken from another index (:meth:`entries`, or lists of their values)."""
        joined = [(int(f), int(o), int(n), int(t), int(e), bool(li)) for f, o, n, t, e, li in entries]
        with self._lock:
            self._entries.extend(joined)

    def index(self, files: list[str]) -> dict[str, object]:
        """The member index (see the README for the format) over ``files`` (base names, in read order)."""
        members = []
        text_offset = first_event = 0
        for file, offset, length, text, events, listed in sorted(self.entries()):
            if listed:
                members.append({
                    "file": file, "offset": offset, "length": length, "text_offset": text_offset,
                    "text_length": text, "first_event": first_event, "events": events,
                })
            text_offset += text
            first_event += events
        return {"format": "pwriter-members/1", "files": files, "members": members}


class StreamGate:
    """Lets the writes of a stream through in offset order, from any thread.

    Each placed chunk is being written by the thread or task that placed it,
    so the write at the earliest offset not yet written can always go.
    """

    def __init__(self) -> None:
        self._next = 0
        self._turn = threading.Condition()

    def wait_for(self, offset: int) -> None:
        """Block (in a worker thread trio started) until every byte before ``offset`` is written."""
        with self._turn:
            while self._next != offset:
                self._turn.wait(STREAM_POLL)
                trio.from_thread.check_cancelled()

    def advance(self, length: int) -> None:
        """The write at the gate's offset is done: let the next one through."""
        with self._turn:
            self._next += length
            self._turn.notify_all()


def splice(placement: Placement, buffer: memoryview, filled: int, header: bytes) -> tuple[Placement, memoryview]:
    """Put ``header`` and the padding of ``placement`` inside ``buffer``
    (around its first ``filled`` bytes) where they fit: one contiguous
    write of whole stripes (a registered buffer for io_uring, aligned for
    O_DIRECT).  Only the first chunk has a header to make room for; the
    bytes of ``buffer`` after ``filled`` may be overwritten.  Returns the
    placement of that one write and its bytes."""
    if placement.head + filled + placement.pad <= len(buffer) and (placement.head or placement.pad):
        head = placement.head
        if head:
            buffer[head : head + filled] = buffer[:filled]
            buffer[:head] = header
        buffer[head + filled : head + filled + placement.pad] = plain_padding(placement.pad)
        filled = placement.length
        placement = dataclasses.replace(placement, head=0, body=filled, pad=0)
    return placement, buffer[:filled]


def compress_chunk(text: memoryview, level: int) -> tuple[bytes, int]:
    """``text`` as one gzip member, and the lines in it."""
    return gzip_member(text, level), count_newlines(text)
