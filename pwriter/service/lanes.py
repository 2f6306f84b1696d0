"""The library's write lanes: from the blocks of producer handles to chunk-sink calls, in order and on time.

Theory of operation
-------------------
Each write lane is one trio memory channel, one
:class:`Coalescer` and one lane writer task.  Producer
handles are spread over the lanes in turn; a handle sends whole batches
(blocks of lines) into its lane's channel, and the coalescer copies them
into pool buffers of at most ``chunk_capacity`` bytes, or passes a block
that is already chunk-sized on whole.  Every chunk a coalescer makes goes
through a small channel to its lane's writer, which hands it to the chunk
sink's one way in (:meth:`~pwriter.data.sink.ChunkSink.write_chunk`, a
blocking call: cut, gzip members, place, write) in a thread, and
then gives the buffer back to the pool.  So a lane's chunks keep its order
(one call at a time), and a coalescer fills its next buffer while the
previous one is written.  The call in the thread is never abandoned: a
cancelled lane writer waits for it, so a buffer goes back to the pool only
once no thread uses it.

Every block carries the time its oldest line was queued, and a line waits
at most ``max_delay`` from its call to its chunk's hand-off to the sink:
the ticker pushes each handle's batch by the time its oldest line has
waited ``max_delay`` (with every other batch that has waited half of it,
so that the ticker wakes at most about twice per ``max_delay``), and a
coalescer flushes its buffer when the oldest line in it has waited
``max_delay`` since its call (the time it spent in the handle counts).  In a padded layout the sink may hold
text (or gzip members) that does not fill the lane's slot: the lane writer
has it written, without padding, once its oldest line has waited
``max_delay`` (:meth:`~pwriter.data.sink.ChunkSink.flush_lane`), in its place
in the lane's order.  All deadlines are on the trio clock, so
``autojump_clock`` drives them in tests.

At close, :meth:`WriteLanes.close` first makes every handle refuse new
calls (ClosedError), waits for a push already under way, pushes what
handles still hold, closes the channels, and waits until every coalescer
has flushed and every lane writer has written its chunks and what the
sink still held for its lane, in the lane's slot
(:meth:`~pwriter.data.sink.ChunkSink.flush_lane`: a slot holds the lines of one
lane); the writer then writes the end of the output.

The coalescer and the buffer pool
---------------------------------
A :class:`Coalescer` receives blocks and copies them into a stripe buffer
taken from the :class:`BufferPool`, a fixed set of page-aligned buffers
carved from one anonymous ``mmap``.  A buffer is handed to ``flush`` when the
next line would not fit, when its oldest line has waited ``max_delay``
seconds on the trio clock since its producer's call queued it (blocks
already in the channel join it first), or when the channel closes.  Blocks
are cut only at newlines, so a chunk always holds whole lines.  A block
that fills at least half a buffer by itself is not copied: it is written as
it is, as a chunk of its own (an *uncopied* chunk).  So is a single line
longer than a buffer (an *oversized* chunk).

Backpressure: ``flush`` hands the buffer to its lane's writer, which gives
it back to the pool when the kernel is done with it.  When every buffer is
taken, ``pool.take()`` waits, the coalescer stops receiving, its channel
fills, and producers wait in ``send``.  Memory is thus bounded by the pool
plus :data:`CHANNEL_BLOCKS` blocks per coalescer (and the whole blocks
waiting for each lane's writer) plus one batch per producer.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Awaitable, Callable

import trio

from ..data.sink import ChunkSink
from ..errors import ClosedError
from .handle import NEWLINE, Block, Producer

__all__ = ["WriteLanes", "CHANNEL_BLOCKS", "LANE_CHUNKS", "Block", "BufferPool", "Coalescer", "CoalescerStatistics"]

CHANNEL_BLOCKS = 8  # blocks a lane's channel holds before a producer's send waits
LANE_CHUNKS = 1  # chunks waiting for a lane's writer while it writes one (then the coalescer waits)

_KEPT_ALIVE: list[object] = []


class BufferPool:
    """``count`` page-aligned buffers of ``size`` bytes each.

    :meth:`take` gives a buffer (a writable memoryview) and waits while all
    are out; :meth:`give_back` returns one.  The caller that took a buffer
    owns it until it gives it back.
    """

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError("a pool needs at least one buffer of at least one byte")
        self.count = count
        self.size = size
        self._memory = mmap.mmap(-1, count * size)
        whole = memoryview(self._memory)
        self.buffers = [whole[index * size : (index + 1) * size] for index in range(count)]
        """Every buffer of the pool, taken or not (released by :meth:`close`)."""
        whole.release()
        self._free = self.buffers[::-1]  # a stack: the first buffer is taken first
        self._free_count = trio.Semaphore(count)
        self.waits = 0

    @property
    def available(self) -> int:
        return len(self._free)

    async def take(self) -> memoryview:
        try:
            self._free_count.acquire_nowait()
        except trio.WouldBlock:
            self.waits += 1
            await self._free_count.acquire()
        return self._free.pop()

    def give_back(self, buffer: memoryview) -> None:
        self._free.append(buffer)
        self._free_count.release()

    def close(self) -> None:
        """Release the memory; every buffer must have been given back."""
        self._free.clear()
        try:
            for buffer in self.buffers:
                buffer.release()
            self._memory.close()
        except BufferError:
            # Something still exports a buffer (an aborted operation, a live
            # traceback).  Never unmap memory that may still be referenced:
            # keep it, and its views, to the end of the process.
            _KEPT_ALIVE.append((self._memory, self.buffers))


@dataclasses.dataclass(frozen=True)
class CoalescerStatistics:
    """What one coalescer did: ``chunks`` flushed (``bytes`` of lines in them),
    how many were flushed by the delay deadline, how many were large blocks
    written without a copy, and how many oversized single-line chunks."""

    lane: int
    chunks: int
    bytes: int
    deadline_flushes: int
    uncopied_chunks: int
    oversized_chunks: int


FlushBuffer = Callable[[int, memoryview, int, float], Awaitable[None]]
WriteWhole = Callable[[int, memoryview, float], Awaitable[None]]


class Coalescer:
    """Packs the blocks of one channel into stripe buffers (see module docstring).

    ``flush(lane, buffer, filled, since)`` takes ownership of ``buffer`` (it
    must give it back to the pool when written); ``write_whole(lane, view,
    since)`` hands on a chunk of whole lines that did not go through a
    buffer, to be written (it may return before the write is done: it keeps
    ``view``).  ``since`` is the trio time the chunk's oldest line was
    queued, so that the chunk sink, which may hold a padded lane's text or
    gzip members further, keeps the ``max_delay`` bound from the line's call.
    """

    def __init__(
        self,
        lane: int,
        blocks: trio.MemoryReceiveChannel[Block],
        pool: BufferPool,
        *,
        capacity: int,
        max_delay: float,
        flush: FlushBuffer,
        write_whole: WriteWhole,
    ) -> None:
        if capacity > pool.size:
            raise ValueError("chunk capacity exceeds the pool's buffer size")
        self.lane = lane
        self._blocks = blocks
        self._pool = pool
        self._capacity = capacity
        self._max_delay = max_delay
        self._flush = flush
        self._write_whole = write_whole
        self._buffer: memoryview | None = None
        self._filled = 0
        self._deadline = math.inf  # when the oldest line in the buffer will have waited max_delay
        self._taken = 0  # buffers taken so far (tells a buffer from the next)
        self._chunks = 0
        self._bytes = 0
        self._deadline_flushes = 0
        self._uncopied = 0
        self._oversized = 0

    def statistics(self) -> CoalescerStatistics:
        return CoalescerStatistics(
            self.lane, self._chunks, self._bytes, self._deadline_flushes, self._uncopied, self._oversized
        )

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """Consume blocks until the channel is closed, then flush the last buffer."""
        with self._blocks:
            while True:
                with trio.move_on_at(self._deadline) as waited:
                    try:
                        since, block = await self._blocks.receive()
                    except trio.EndOfChannel:
                        break
                if waited.cancelled_caught:
                    self._deadline_flushes += 1
                    await self._flush_due()
                    continue
                await self._add(since, block)
        await self._flush_buffer()

    async def _flush_due(self) -> None:
        """The buffer's oldest line has waited ``max_delay``: blocks already
        waiting in the channel (they waited too) join it while it has room,
        then it is flushed."""
        due = self._taken
        while self._taken == due and self._buffer is not None:
            try:
                since, block = self._blocks.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            await self._add(since, block)
        if self._taken == due:
            await self._flush_buffer()

    async def _add(self, since: float, block: bytes) -> None:
        view = memoryview(block)
        position, size = 0, len(block)
        if self._capacity // 2 <= size <= self._capacity:
            await self._flush_buffer()  # what came before goes first
            self._uncopied += 1
            self._chunks += 1
            self._bytes += size
            await self._write_whole(self.lane, view, since)
            return
        while position < size:
            if self._buffer is None:
                self._buffer = await self._pool.take()
                self._filled = 0
                self._taken += 1
            room = self._capacity - self._filled
            if size - position <= room:
                cut = size
            else:
                cut = block.rfind(NEWLINE, position, position + room) + 1
                if cut <= 0:  # not even one line fits in what is left
                    if self._filled:
                        await self._flush_buffer()
                        continue
                    cut = block.index(NEWLINE, position) + 1  # one line larger than a buffer
                    self._oversized += 1
                    self._chunks += 1
                    self._bytes += cut - position
                    await self._write_whole(self.lane, view[position:cut], since)
                    position = cut
                    continue
            length = cut - position
            self._buffer[self._filled : self._filled + length] = view[position:cut]
            self._filled += length
            self._deadline = min(self._deadline, since + self._max_delay)
            position = cut
            if self._filled >= self._capacity or cut < size:
                await self._flush_buffer()

    async def _flush_buffer(self) -> None:
        buffer, filled = self._buffer, self._filled
        since = self._deadline - self._max_delay  # (when the buffer's oldest line was queued)
        self._deadline = math.inf
        if buffer is None:
            return
        self._buffer, self._filled = None, 0
        if not filled:
            self._pool.give_back(buffer)
            return
        self._chunks += 1
        self._bytes += filled
        await self._flush(self.lane, buffer, filled, since)


# A chunk for a lane writer: its bytes, how many, when its oldest line was
# queued, and whether it is a pool buffer (given back once written).
LaneChunk = tuple[memoryview, int, float, bool]


class WriteLanes:
    """The coalescers and lane writers of one writer and the handles that feed them.

    Chunk buffers come from ``pool``; chunks that bypass it (whole blocks)
    wait in their lane's small channel, so that memory stays bounded
    whatever the producers send.
    """

    def __init__(self, *, nursery: trio.Nursery, sink: ChunkSink, pool: BufferPool, lanes: int,
                 chunk_capacity: int, max_delay: float) -> None:
        self._nursery = nursery
        self._sink = sink
        self._pool = pool
        self._max_delay = max_delay
        self._coalesced = trio.Event()
        self._started = False
        self._ticker_wake = trio.Event()  # set when the ticker must stop before its next tick
        self._threads = trio.CapacityLimiter(lanes)  # (a lane writer waits for one call at a time)
        self._producers: list[Producer] = []
        self._next_lane = 0
        self._sends: list[trio.MemorySendChannel[Block]] = []
        self._coalescers: list[Coalescer] = []
        self._chunk_sends: list[trio.MemorySendChannel[LaneChunk]] = []
        self._chunk_receives: list[trio.MemoryReceiveChannel[LaneChunk]] = []
        self.deadline_flushes = 0
        """Writes of held text (or padded gzip members) whose oldest line waited ``max_delay``."""
        for lane in range(lanes):
            send, receive = trio.open_memory_channel[Block](CHANNEL_BLOCKS)
            self._sends.append(send)
            self._coalescers.append(Coalescer(lane, receive, pool, capacity=chunk_capacity, max_delay=max_delay,
                                              flush=self.write_buffer, write_whole=self.write_whole))
            chunk_send, chunk_receive = trio.open_memory_channel[LaneChunk](LANE_CHUNKS)
            self._chunk_sends.append(chunk_send)
            self._chunk_receives.append(chunk_receive)

    def start(self) -> None:
        """Start the coalescers, the lane writers and the ticker in the
        writer's nursery (once; later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self._nursery.start_soon(self._run_lanes)
        self._nursery.start_soon(self._push_stale_batches)

    def producer(self, batch_bytes: int, check: Callable[[bytes], None] | None) -> Producer:
        """A new handle on the next lane in turn."""
        send = self._sends[self._next_lane % len(self._sends)]
        self._next_lane += 1
        producer = Producer(send.clone(), batch_bytes=batch_bytes, check=check, max_delay=self._max_delay)
        # A handle closed by its task is dropped here, unless its last push
        # was cancelled: close() pushes that.
        self._producers = [existing for existing in self._producers if not existing.finished]
        self._producers.append(producer)
        return producer

    def statistics(self) -> list[CoalescerStatistics]:
        return [coalescer.statistics() for coalescer in self._coalescers]

    async def write_buffer(self, lane: int, buffer: memoryview, filled: int, since: float) -> None:
        """Hand ``buffer[:filled]`` (whose oldest line was queued at ``since``)
        to ``lane``'s writer, which gives the buffer back to the pool once written."""
        await self._chunk_sends[lane].send((buffer, filled, since, True))

    async def write_whole(self, lane: int, chunk: memoryview, since: float) -> None:
        """Hand ``chunk`` (whole lines, not a pool buffer) to ``lane``'s writer."""
        await self._chunk_sends[lane].send((chunk, chunk.nbytes, since, False))

    async def close(self) -> None:
        """Refuse every new call of every handle, push what each holds (once a
        push already under way has ended), end the channels, and return once
        every chunk is written and every lane finished (the caller writes the end)."""
        for producer in self._producers:
            producer.refuse_calls()
        for producer in self._producers:
            await producer.close_for_writer()
        for send in self._sends:
            send.close()
        if self._started:
            await self._coalesced.wait()

    def discard(self) -> None:
        """After the writer's block: every handle raises ClosedError from now on."""
        for producer in self._producers:
            producer.discard_for_writer()

    @trio.lowlevel.enable_ki_protection
    async def _run_lanes(self) -> None:
        async with trio.open_nursery() as nursery:
            for lane, coalescer in enumerate(self._coalescers):
                nursery.start_soon(self._coalesce, coalescer, self._chunk_sends[lane])
                nursery.start_soon(self._write_lane, lane, self._chunk_receives[lane])
        self._coalesced.set()
        self._ticker_wake.set()

    @staticmethod
    async def _coalesce(coalescer: Coalescer, chunks: trio.MemorySendChannel[LaneChunk]) -> None:
        # Channels close with a plain ``with``: a checkpoint in this cleanup
        # could put a Cancelled in place of the error on its way out.
        with chunks:  # (its end ends the lane writer's loop)
            try:
                await coalescer.run()
            except trio.BrokenResourceError:
                # The lane writer is gone: it failed or was cancelled, and the
                # lanes are cancelled by now; that is what is raised.  Never
                # end quietly otherwise: chunks would be missing from the output.
                await trio.lowlevel.checkpoint_if_cancelled()
                raise ClosedError(f"lane {coalescer.lane}'s writer stopped before its chunks were written") from None

    @trio.lowlevel.enable_ki_protection
    async def _write_lane(self, lane: int, chunks: trio.MemoryReceiveChannel[LaneChunk]) -> None:
        """Write ``lane``'s chunks one at a time, in order, through the sink
        in a thread; what the sink holds for the lane is written once
        its oldest line has waited ``max_delay``, and at the end."""
        sink = self._sink
        with chunks:
            while True:
                held_since = sink.held_since(lane)  # (no call of this lane's is running)
                with trio.move_on_at(math.inf if held_since is None else held_since + self._max_delay) as waited:
                    try:
                        view, filled, since, pooled = await chunks.receive()
                    except trio.EndOfChannel:
                        break
                if waited.cancelled_caught:
                    if await sink.call(sink.flush_lane, lane, limiter=self._threads):
                        self.deadline_flushes += 1
                    continue
                try:
                    if pooled:
                        await sink.call(sink.write_chunk, lane, view, filled, since, limiter=self._threads)
                    else:
                        await sink.call(sink.write_lines, lane, view, since, limiter=self._threads)
                finally:
                    if pooled:  # (the call has returned: the kernel is done with the buffer)
                        self._pool.give_back(view)
        # What the lane holds goes in its own slot (a slot holds one lane's lines).
        await sink.call(sink.flush_lane, lane, limiter=self._threads)

    @trio.lowlevel.enable_ki_protection
    async def _push_stale_batches(self) -> None:
        delay = self._max_delay
        while not self._coalesced.is_set():
            with trio.move_on_at(self._next_tick(delay)):
                await self._ticker_wake.wait()
            self._ticker_wake = trio.Event()
            if self._coalesced.is_set():
                break
            now = trio.current_time()
            for producer in self._producers:
                if producer.pending_since + delay / 2 <= now:
                    producer.send_pending_nowait()

    def _next_tick(self, delay: float) -> float:
        """When the ticker looks next: when the oldest line queued in a
        handle will have waited ``delay``; ``delay`` from now when nothing
        waits (a line queued later has its deadline after that).  What is
        overdue already could not be pushed (its lane's channel is full, or
        its task is pushing it) and is looked at again a quarter of
        ``delay`` from now."""
        now = trio.current_time()
        tick = now + delay
        for since in (producer.pending_since for producer in self._producers):
            due = since + delay
            tick = min(tick, due if due > now else now + delay / 4)
        return tick
