"""The library's write lanes: from the blocks of producer handles to chunk-sink calls, in order and on time.

Theory of operation
-------------------
Each write lane is one trio memory channel, one
:class:`~pwriter.service.channels.Coalescer` and one lane writer task.  Producer
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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from ..data.sink import ChunkSink
from .channels import Block, BufferPool, Coalescer, CoalescerStatistics, Producer

__all__ = ["WriteLanes", "CHANNEL_BLOCKS", "LANE_CHUNKS"]

CHANNEL_BLOCKS = 8  # blocks a lane's channel holds before a producer's send waits
LANE_CHUNKS = 1  # chunks waiting for a lane's writer while it writes one (then the coalescer waits)

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
        producer = Producer(send.clone(), batch_bytes=batch_bytes, check=check)
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
        async with chunks:  # (its end ends the lane writer's loop)
            await coalescer.run()

    @trio.lowlevel.enable_ki_protection
    async def _write_lane(self, lane: int, chunks: trio.MemoryReceiveChannel[LaneChunk]) -> None:
        """Write ``lane``'s chunks one at a time, in order, through the sink
        in a thread; what the sink holds for the lane is written once
        its oldest line has waited ``max_delay``, and at the end."""
        sink = self._sink
        async with chunks:
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
