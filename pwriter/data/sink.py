"""The chunk sink: where a chunk of whole lines becomes bytes in the output.

Theory of operation
-------------------
Whoever made a chunk hands it to the sink, which places it (the pure
planners of :mod:`pwriter.plan.layout`, under one lock), puts the header and the
padding around it, and writes it through the backend.  There is one way in,
for every maker (the merge's readers, the library's lane writers, the
header and footer): a blocking call made in a thread that trio
started, :meth:`ChunkSink.write_chunk` (and :meth:`~ChunkSink.write_lines`,
:meth:`~ChunkSink.flush_lane`, :meth:`~ChunkSink.finish_lane`,
:meth:`~ChunkSink.write_placed`, :meth:`~ChunkSink.write_end`), which cuts
the text at its shard limits, compresses it into gzip members for gzip
output, places it, splices and writes it right there, through the
backend's blocking ``write``, and returns once the kernel is done with
the buffer: no hop back to trio.  The placement is taken when the chunk is
ready, so the chunks of one lane (whose calls are made one at a time) are
placed in the order their maker made them.  Placement is the sink's
:class:`Placer` (the planner under one lock, the shards a shard size adds,
the padding owed, the gzip member index); the gzip members are made by
:class:`~pwriter.data.gzip_members.LaneMembers`, which writes through the
sink's callbacks.

In a padded layout a lane keeps its slot (see :mod:`pwriter.plan.layout`): the
padding of a slot the lane leaves is written with the lane's next chunk, by
whoever writes that chunk.  Gzip members there are sized by what they
compress to, to fill the slot (:mod:`pwriter.data.gzip_members`).  A
lane writes only slots it fills: what does not fill one is held (until the
lane's next chunk, or a deadline, :meth:`ChunkSink.flush_lane`, which
writes it in the slot without padding), and at the lane's end its last,
partial slot's worth goes to the sink's pool (:class:`SlotPool`), whose
full slots are written by whoever fills them and whose rest ends the file
at close, before the footer, unpadded when it is the file's last slot.  So
a padded merge costs about what a striped one does.

A sharded output with a shard size (:class:`~pwriter.plan.layout.SizedShardedPlanner`)
grows while it is written: every chunk is first cut at its lane's shard
limits (:meth:`Placer.cut`, the planner's ``cut``; for gzip output before
it is compressed, one member per piece), and a placement that starts a new
shard makes the sink create its file, under the placement lock, before the
placement is handed out (:meth:`~pwriter.data.output.OutputFiles.add_shard`, then
the backend's ``register``).  Each shard gets the header with its first
chunk and the footer at close (:meth:`Placer.close`), whatever bytes the
writer gave as header and footer.

A stream output (standard output, a pipe) has no
offsets to write at: every write of a stream passes one
gate that lets it through once every byte placed before it is written
(each placed chunk is being written by whoever placed it, so the earliest
one always can go).  With fsync on, the writeback of each large written
range is started at once (``early_writeback``), so that the final fsync
finds little left to do.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from ..errors import WriteError
from ..plan.layout import GZIP_MIN_PADDING, Placement, Planner, gzip_padding, plain_padding
from ..plan.traceformat import rfind_newline
from .backends import Backend
from .gzip_members import LaneMembers, Member, MemberIndex
from .output import OutputFiles, StreamOutput

__all__ = ["ChunkSink", "Placer", "SinkCounts", "StreamGate", "SlotPool", "DIRECT_ALIGNMENT", "WRITEBACK_MIN",
           "POOL_LANE"]

DIRECT_ALIGNMENT = 4096
# With fsync on, every written range of at least this size gets
# posix_fadvise(DONTNEED), which starts its writeback at once (Linux) rather
# than leaving every dirty page to the final fsync: writing and flushing then
# overlap.  (Smaller ranges are left to the fsync.)
WRITEBACK_MIN = 256 << 10
STREAM_POLL = 0.05  # seconds a stream write waiting for its turn sleeps between checks of cancellation
POOL_LANE = -1  # the lane of the pool's slots (padded layouts)
T = TypeVar("T")


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
    A padded-striped planner's layout keeps slots (:attr:`padded`; the
    planner has ``full_below`` and ``min_padding``).

    Every method that writes blocks, and is called from a thread
    that trio started (never from the trio thread; see :meth:`call`); one
    lane's calls are made one at a time, in the lane's order.
    """

    def __init__(self, *, planner: Planner, output: OutputFiles, backend: Backend, header: bytes,
                 header_text: int, compressed: bool, level: int, chunk_capacity: int,
                 writeback: bool) -> None:
        self.placer = Placer(planner, output, backend, header_text=header_text, compressed=compressed)
        self._output = output
        self._backend = backend
        self._header = header
        self.compressed = compressed
        self.chunk_capacity = chunk_capacity
        self.padded = planner.layout == "padded-striped"
        self._padding = gzip_padding if compressed else plain_padding
        self._full_below: int = getattr(planner, "full_below", 0)  # (padded layouts, see pwriter.plan.layout)
        self._capacity = planner.chunk_capacity
        # Padded plain: a lane's text that did not fill its slot, and when its oldest line was queued.
        self._held: dict[int, tuple[bytes, float | None]] = {}
        self._members = LaneMembers(level, padded=self.padded, write=self.write_members, cut=self.placer.cut,
                                    room=self.placer.room, capacity=planner.chunk_capacity,
                                    min_padding=getattr(planner, "min_padding", 0), full_below=self._full_below)
        self.pool = SlotPool(self, self._members)
        self._stream_gate = StreamGate() if isinstance(output, StreamOutput) else None
        self._writeback = writeback and self._stream_gate is None and hasattr(os, "posix_fadvise")
        self._lock = threading.Lock()  # the counts
        self._counts = [0, 0, 0, 0, 0]  # (as SinkCounts)

    def counts(self) -> SinkCounts:
        """A snapshot of what the sink wrote so far (safe from any thread)."""
        with self._lock:
            return SinkCounts(*self._counts)

    async def call(self, method: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
        """From trio: call ``method`` (a blocking method of this sink, its way
        in) in a thread (``limiter``: trio's default if None), never
        abandoned: a cancelled call returns only once the thread has.  With
        a backend whose writes complete in the trio thread (``inline``: the
        testing :class:`~pwriter.faces.testing.MemoryBackend`, so that a mock
        clock sees exact times), in the trio thread instead."""
        if self._backend.inline:
            await trio.lowlevel.checkpoint()
            return method(*args)
        return await trio.to_thread.run_sync(method, *args, limiter=limiter)

    # -- the one way in: blocking, from the thread of a chunk's maker --

    def write_chunk(self, lane: int, buffer: memoryview, filled: int, since: float | None = None) -> None:
        """Write ``buffer[:filled]`` (whole lines, at most :attr:`chunk_capacity`
        bytes) as ``lane``'s next chunk, now, in this thread: cut at its
        shard limits, compressed into gzip members for gzip output, placed
        under the lock, spliced with the header and padding into ``buffer``
        (one write of whole stripes), written through the backend.  Returns
        once the kernel is done with the buffer; the caller keeps it (its
        bytes after ``filled`` may have been overwritten by padding).  In a
        padded layout, text that does not fill the lane's slot is held
        (copied) until the lane's next chunk, :meth:`flush_lane` or
        :meth:`finish_lane`; ``since`` is when its oldest line was queued
        (:meth:`held_since`).  A stream output's writes wait for their turn."""
        if filled > self.chunk_capacity or filled < 0:
            raise ValueError(f"a chunk of {filled} bytes: it must hold 0 to {self.chunk_capacity} bytes")
        if filled:
            self._write_text(lane, buffer[:filled], since, buffer)

    def write_lines(self, lane: int, lines: bytes | memoryview, since: float | None = None) -> None:
        """:meth:`write_chunk` for whole lines of any length, not in a pool buffer."""
        view = memoryview(lines)
        if view.nbytes:
            self._write_text(lane, view, since, None)

    def flush_lane(self, lane: int) -> bool:
        """Write what ``lane`` holds now (padded layouts: text or gzip members
        that do not fill its slot), at the next offset of its slot, without
        padding (a deadline).  Returns whether there was anything."""
        if self.compressed:
            return self._members.flush(lane)
        held = self._held.pop(lane, None)
        if held is not None:
            self.write_placed(self.placer.place(lane, len(held[0])), held[0])
        return held is not None

    def held_since(self, lane: int) -> float | None:
        """When the oldest line ``lane`` holds was queued (None: it holds none, or no time was given)."""
        if self.compressed:
            return self._members.held_since(lane)
        held = self._held.get(lane)
        return held[1] if held is not None else None

    def finish_lane(self, lane: int) -> None:
        """The end of ``lane``: padded layouts put what it held back (less
        than a slot) into the pool (:class:`SlotPool`), whose rest
        :meth:`write_end` writes.  A lane number is used by one maker only."""
        if self.compressed:
            self.pool.add_members(self._members.take(lane))
        elif self.padded:
            self.pool.add_text(self._held.pop(lane, (b"", None))[0])

    def write_end(self, footer: bytes, footer_text: int) -> None:
        """Once every lane is finished: write what the pool holds, the
        footer (``footer_text``: its text length) after every chunk (with a
        shard size: every shard's), then the padding of the slots and files
        left unfilled (:meth:`Placer.fill_empty_files`)."""
        for placement, body in self.pool.place_rest():
            self.write_placed(placement, body)
        for placement in self.placer.close(len(footer), footer_text):
            if placement.length:  # (a share of a shared output may have no footer to write)
                self.write_placed(placement, footer)
        for padding in self.placer.fill_empty_files():
            self.write_placed(padding, b"")

    def write_members(self, lane: int, members: Sequence[Member]) -> None:
        """Place gzip ``members`` as ``lane``'s next chunk (recorded for the index) and write them."""
        self.write_placed(*self.placer.place_members(lane, members))

    def write_placed(self, placement: Placement, body: bytes | memoryview, *,
                     aligned_memory: bool = False) -> None:
        """Write ``placement`` (header, ``body``, padding), after the padding
        its chunk owes (:meth:`Placer.place`); a stream output waits for its
        turn first (:class:`StreamGate`).

        With O_DIRECT, a write of one page-aligned buffer (``aligned_memory``)
        at an aligned offset and of an aligned length goes through the direct
        descriptor; any other (the footer, a line longer than a stripe) goes
        through the buffered one.  Their ranges never share a page.
        """
        for padding in self.placer.take_owed(placement):
            self.write_placed(padding, b"")
        fd, buffers = self._buffers(placement, body, aligned_memory)
        offset = placement.offset
        if self._stream_gate is not None:
            # A stream takes bytes in order: wait until every byte placed
            # before these is written (each placed chunk is being written by
            # the thread that placed it, so the earliest always goes).
            self._stream_gate.wait_for(offset)
            offset = -1  # at the stream's own position
        try:
            self._backend.write(fd, buffers, offset)
        except OSError as exc:
            raise WriteError(self._output.targets[placement.file], exc.strerror or str(exc), exc.errno) from None
        self._written(placement, fd)
        if self._stream_gate is not None:
            self._stream_gate.advance(placement.length)

    def _write_text(self, lane: int, text: memoryview, since: float | None, buffer: memoryview | None) -> None:
        """The way of every chunk (see :meth:`write_chunk`); ``buffer``: the
        pool buffer ``text`` starts, if it is in one."""
        with self._lock:
            self._counts[0] += 1
            self._counts[1] += text.nbytes
        if self.compressed:
            self._members.add(lane, text, since)
            return
        pieces = self.placer.cut(lane, text)
        if len(pieces) > 1:
            for piece in pieces:
                self.write_placed(self.placer.place(lane, piece.nbytes), piece)
            return
        if self.padded:
            text, buffer = self._fill_slot(lane, text, buffer)
            if not text.nbytes:
                return
            if self.placer.room(lane) - text.nbytes >= self._full_below:
                # It does not fill its slot: held (copied), written before the
                # lane's next chunk, at a deadline, or pooled at the lane's end.
                self._held[lane] = (bytes(text), since)
                return
        placement = self.placer.place(lane, text.nbytes)
        if buffer is None:
            self.write_placed(placement, text)
            return
        self.write_placed(*splice(placement, buffer, text.nbytes, self._header), aligned_memory=True)

    def _fill_slot(self, lane: int, text: memoryview, buffer: memoryview | None
                   ) -> tuple[memoryview, memoryview | None]:
        """Padded plain: write what ``lane`` held, then the first lines of
        ``text`` that fill the rest of the lane's slot when ``text`` does not
        fit it (so that a deadline flush costs no padding).  Returns the rest
        of ``text``, and ``buffer`` if the rest still starts it."""
        self.flush_lane(lane)
        room = self.placer.room(lane)
        if text.nbytes > room and room < self._capacity:  # the lane keeps a slot with some room
            cut = rfind_newline(text, 0, room) + 1
            if cut:
                self.write_placed(self.placer.place(lane, cut), text[:cut])
                return text[cut:], None
        return text, buffer

    def _buffers(self, placement: Placement, body: bytes | memoryview,
               aligned_memory: bool) -> tuple[int, list[bytes | memoryview]]:
        """The descriptor and the buffers of one write: header, ``body``, padding
        (the direct descriptor for an aligned write, see :meth:`write_placed`)."""
        buffers = [buffer for buffer, length in ((self._header, placement.head), (body, placement.body),
                                           (self._padding(placement.pad), placement.pad)) if length]
        direct_fds = self.placer.direct_fds
        direct = (direct_fds and aligned_memory and len(buffers) == 1
                  and placement.offset % DIRECT_ALIGNMENT == 0 and placement.length % DIRECT_ALIGNMENT == 0)
        return (direct_fds if direct else self.placer.fds)[placement.file], buffers

    def _written(self, placement: Placement, fd: int) -> None:
        """Bookkeeping after a write."""
        direct = fd in self.placer.direct_fds
        hint = self._writeback and placement.length >= WRITEBACK_MIN and not direct
        if hint:
            # Durable output: start writing this range back now, so that the
            # final fsync finds little left to do (see WRITEBACK_MIN).
            os.posix_fadvise(fd, placement.offset, placement.length, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self._counts[2] += placement.length
            self._counts[3] += direct
            self._counts[4] += hint

    async def sync(self) -> None:
        """fsync every file of the output (WriteError naming the file on failure)."""
        for fd, name in zip(self.placer.fds, self._output.targets, strict=False):
            try:
                await self._backend.fsync(fd)
            except OSError as exc:
                raise WriteError(name, exc.strerror or str(exc), exc.errno) from None


class Placer:
    """The placement of one output's chunks (safe from any thread): the
    planner under one lock, the shards a shard size adds (created and
    registered with ``backend`` before a placement names them), the padding
    a chunk owes (written before it), and the gzip member index
    (``compressed``; ``header_text``: the header's text length)."""

    def __init__(self, planner: Planner, output: OutputFiles, backend: Backend, *, header_text: int,
                 compressed: bool) -> None:
        self._planner = planner
        self._output = output
        self._backend = backend
        self._header_text = header_text
        self._compressed = compressed
        self._lock = threading.Lock()
        self.fds = list(output.fds)
        self.direct_fds = list(output.direct_fds)  # empty unless O_DIRECT
        self.members = MemberIndex(header_text)
        self._owed: dict[tuple[int, int], list[Placement]] = {}  # (file, offset) of a chunk -> padding it writes first

    def open(self) -> Placement | None:
        """Place the header, before any chunk (call it first): its placement
        to write (an empty body), or None when the layout puts it in the
        first chunk, or when this writer writes no header (a share of an
        output that several processes write)."""
        with self._lock:
            header = self._planner.open()
        if header is None or header.length == 0:
            return None
        self.record(header, text=self._header_text, events=0)
        return header

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        """The planner's placement of a chunk of ``length`` bytes holding
        ``text`` bytes of lines (None: ``length``).  The padding of a slot
        the lane left for it is owed: written before it (:meth:`take_owed`).
        A placement in a shard not yet made makes it first."""
        with self._lock:
            placement = self._planner.place(lane, length, text)
            self._add_files(placement.file)
            owed = self._planner.paddings()
            if owed:
                self._owed[(placement.file, placement.offset)] = owed
        for padding in owed:
            self.record(padding, text=0, events=0)
        return placement

    def place_members(self, lane: int, members: Sequence[Member]) -> tuple[Placement, bytes]:
        """Place gzip ``members`` (``(member, text bytes, events)``) next in
        ``lane``'s order, as one chunk, and record them for the index."""
        body = members[0][0] if len(members) == 1 else b"".join(member for member, _, _ in members)
        placement = self.place(lane, len(body), sum(text for _, text, _ in members))
        if self._compressed:
            self.members.record_members(placement, [(len(member), text, events) for member, text, events in members])
        return placement, body

    def take_owed(self, placement: Placement) -> list[Placement]:
        """The padding to write before ``placement`` (each handed out once)."""
        if not self._owed:
            return []
        with self._lock:
            return self._owed.pop((placement.file, placement.offset), [])

    def cut(self, lane: int, text: memoryview) -> list[memoryview]:
        """``text`` in the pieces that each go to one file (the planner's ``cut``)."""
        with self._lock:
            return self._planner.cut(lane, text)

    def room(self, lane: int) -> int:
        """The most bytes ``lane`` can place without starting a new slot (see :meth:`Planner.room`)."""
        with self._lock:
            return self._planner.room(lane)

    def close(self, footer_length: int, footer_text: int) -> list[Placement]:
        """The footers' placements, after every chunk's: one, or with a
        shard size one for each shard (see the module docstring)."""
        with self._lock:
            footers = self._planner.close_files(footer_length)
            self._add_files(footers[-1].file)
        for footer in footers:
            self.record(footer, text=footer_text, events=0)
        return footers

    def fill_empty_files(self) -> list[Placement]:
        """After :meth:`close`: placements of padding alone, recorded for
        the member index: the rest of every slot a lane still kept (padded
        layouts), and one whitespace line (or a gzip member holding one) for
        every file that got no byte.  A shard whose lane had nothing to
        write is still a file every reader reads (an empty .gz file is not)."""
        with self._lock:
            sizes = self._planner.file_sizes()
            placements = self._planner.paddings()
        pad = GZIP_MIN_PADDING if self._compressed else 1
        if not self._planner.shared_file:  # (a shared file: the one who finishes it knows, pwriter.faces.mpi)
            placements += [Placement(file, 0, 0, 0, pad) for file, size in enumerate(sizes) if size == 0]
        for placement in placements:
            self.record(placement, text=0, events=0)
        return placements

    def record(self, placement: Placement, *, text: int, events: int) -> None:
        """Remember the gzip members of ``placement`` for the member index."""
        if self._compressed:
            self.members.record(placement, text=text, events=events)

    def member_index(self) -> dict[str, object]:
        """The member index of a compressed output (its format: ``docs/layouts.md``)."""
        return self.members.index([os.path.basename(name) for name in self._output.targets])

    def _add_files(self, file: int) -> None:
        """Under the lock: create the shards up to number ``file`` that do not exist yet, and register them."""
        while len(self.fds) <= file:
            fd, direct_fd = self._output.add_shard()  # (only a set whose shards grow: a shard size)
            name = self._output.targets[len(self.fds)]
            self._backend.register(fd, name)
            if direct_fd is not None:
                self._backend.register(direct_fd, name)
                self.direct_fds.append(direct_fd)
            self.fds.append(fd)


class SlotPool:
    """Padded layouts: what the makers held back at the end of their lanes
    (less than a slot each), gathered into slots of the pool's own lane,
    :data:`POOL_LANE`.  A slot the pool fills is written at once by the
    thread that filled it; the rest is placed at close (:meth:`place_rest`),
    the last data of the file.  One lock keeps the pool's slots in order and
    written by one thread at a time."""

    def __init__(self, sink: ChunkSink, members: LaneMembers) -> None:
        self._sink = sink
        self._members = members  # gzip output: the pool's lane among the others
        self._lock = threading.Lock()
        self._text = bytearray()  # plain output

    def add_text(self, text: bytes) -> None:
        """Whole lines; writes every slot they fill."""
        with self._lock:
            self._text += text
            while self._text and len(self._text) >= self._sink.placer.room(POOL_LANE):
                self._sink.write_placed(*self._place_text())

    def add_members(self, members: list[Member]) -> None:
        """Gzip members; writes every slot they fill."""
        if members:
            with self._lock:
                self._members.add_members(POOL_LANE, members)

    def place_rest(self) -> list[tuple[Placement, bytes]]:
        """At close (every maker is done): place what the pool holds; the caller writes it."""
        with self._lock:
            placed = []
            while self._text:
                placed.append(self._place_text())
            held = self._members.take(POOL_LANE)
            if held:
                placed.append(self._sink.placer.place_members(POOL_LANE, held))
            return placed

    def _place_text(self) -> tuple[Placement, bytes]:
        """The next piece of the pool's text: what fits the pool's slot (at
        least one line)."""
        text = self._text
        room = self._sink.placer.room(POOL_LANE)
        cut = len(text) if len(text) <= room else rfind_newline(memoryview(text), 0, room) + 1
        if cut == 0:
            cut = text.index(b"\n") + 1
        body = bytes(text[:cut])
        del text[:cut]
        return self._sink.placer.place(POOL_LANE, len(body)), body


class StreamGate:
    """Lets the writes of a stream through in offset order, from any thread.

    Each placed chunk is being written by the thread or task that placed it,
    so the write at the earliest offset not yet written can always go.
    """

    def __init__(self) -> None:
        self._next = 0
        self._turn = threading.Condition()

    def wait_for(self, offset: int) -> None:
        """Block (in a thread trio started) until every byte before ``offset`` is written."""
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
    write of whole stripes (one buffer, aligned for
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
