"""The library path's write lanes: producer handles, coalescers and the ticker.

Theory of operation
-------------------
Each write lane is one trio memory channel and one
:class:`~pwriter.channels.Coalescer`.  Producer handles are spread over the
lanes in turn; a handle sends whole batches (blocks of lines) into its
lane's channel, and the coalescer copies them into pool buffers of at most
``chunk_capacity`` bytes, or passes a block that is already chunk-sized on
whole.  Every chunk a coalescer makes goes to the chunk sink right there:
placed at once (so a lane's chunks keep its order), written by a task of its
own; for gzip output it goes through the member stage instead, which
compresses in worker threads and places in the lane's order.

Every block carries the time its oldest line was queued, and a line waits
at most ``max_delay`` from its call to its chunk's hand-off to the sink:
the ticker pushes each handle's batch before its oldest line has waited
``max_delay`` (once it has waited half of it, so that the ticker wakes at
most about twice per ``max_delay``), and a coalescer flushes its buffer
when the oldest line in it has waited ``max_delay`` since its call (the
time it spent in the handle counts).  For padded gzip, the ticker also
finishes a member once it has held text for ``max_delay``.  All deadlines
are on the trio clock, so ``autojump_clock`` drives them in tests.

At close, :meth:`WriteLanes.close` first makes every handle refuse new
calls (ClosedError), waits for a push already under way, pushes what
handles still hold, closes the channels, and waits until every coalescer
has flushed, every member is finished and the footer is placed; the writes
themselves are the nursery's tasks, which ``open_writer`` waits for.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .channels import Block, BufferPool, Coalescer, CoalescerStatistics, Producer
from .layout import Placement
from .members import MemberStage
from .sink import ChunkSink

__all__ = ["WriteLanes", "CHANNEL_BLOCKS"]

CHANNEL_BLOCKS = 8  # blocks a lane's channel holds before a producer's send waits


class WriteLanes:
    """The coalescers of one writer and the handles that feed them.

    ``footer`` (bytes already in their output form) is placed once the
    last coalescer is done, ``footer_text`` is its length as text (for the
    member index).  Chunk buffers come from ``pool``; chunks that bypass it
    (whole blocks) hold one of as many slots as the pool has buffers, so
    that memory stays bounded whatever the producers send.
    """

    def __init__(self, *, nursery: trio.Nursery, sink: ChunkSink, pool: BufferPool, lanes: int,
                 chunk_capacity: int, max_delay: float, compressed: bool, members: MemberStage) -> None:
        self._nursery = nursery
        self._sink = sink
        self._pool = pool
        self._max_delay = max_delay
        self._compressed = compressed
        self._members = members
        self._whole_slots = trio.Semaphore(pool.count)
        self._coalesced = trio.Event()
        self._started = False
        self._ticker_wake = trio.Event()  # set when the ticker must look again before its next tick
        members.on_held_text = self._wake_ticker
        self._producers: list[Producer] = []
        self._next_lane = 0
        self._sends: list[trio.MemorySendChannel[Block]] = []
        self._coalescers: list[Coalescer] = []
        for lane in range(lanes):
            send, receive = trio.open_memory_channel[Block](CHANNEL_BLOCKS)
            self._sends.append(send)
            self._coalescers.append(Coalescer(lane, receive, pool, capacity=chunk_capacity, max_delay=max_delay,
                                              flush=self.write_buffer, write_whole=self.write_whole))

    def start(self) -> None:
        """Start the coalescers and the ticker in the writer's nursery (once;
        later calls do nothing)."""
        if self._started:
            return
        self._started = True
        self._nursery.start_soon(self._run_coalescers)
        self._nursery.start_soon(self._push_stale_batches)

    def producer(self, batch_bytes: int, check: Callable[[bytes], None] | None) -> Producer:
        """A new handle on the next lane in turn."""
        send = self._sends[self._next_lane % len(self._sends)]
        self._next_lane += 1
        producer = Producer(send.clone(), batch_bytes=batch_bytes, check=check)
        # A handle closed by its task is dropped here, unless its last push
        # was cancelled: close() pushes that.
        self._producers = [existing for existing in self._producers if not existing._channel_closed]
        self._producers.append(producer)
        return producer

    def statistics(self) -> list[CoalescerStatistics]:
        return [coalescer.statistics() for coalescer in self._coalescers]

    @property
    def deadline_members(self) -> int:
        """Padded gzip members finished because their oldest text waited ``max_delay``."""
        return self._members.deadline_members

    async def write_buffer(self, lane: int, buffer: memoryview, filled: int, since: float | None = None) -> None:
        """Place ``buffer[:filled]`` as ``lane``'s next chunk and write it in a
        task of its own, which gives the buffer back to the pool once written.
        ``since``: when its oldest line was queued (default: now)."""
        if self._compressed:
            await self._members.add(lane, buffer[:filled], lambda: self._pool.give_back(buffer),
                                    trio.current_time() if since is None else since)
            return
        pieces = self._sink.place_chunk(lane, buffer[:filled])
        self._nursery.start_soon(self._write_and_give_back, pieces, buffer)

    async def write_whole(self, lane: int, chunk: memoryview, since: float | None = None) -> None:
        """Place ``chunk`` (not a pool buffer) as ``lane``'s next chunk; waits
        for a slot while as many such chunks as the pool has buffers are in flight."""
        await self._whole_slots.acquire()
        if self._compressed:
            await self._members.add(lane, chunk, self._whole_slots.release,
                                    trio.current_time() if since is None else since)
            return
        pieces = self._sink.place_chunk(lane, chunk)
        self._nursery.start_soon(self._write_and_release_slot, pieces)

    async def close(self) -> None:
        """Refuse every new call of every handle, push what each holds (once a
        push already under way has ended), end the channels, and return once
        every chunk is placed (the caller places the footer)."""
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
    async def _run_coalescers(self) -> None:
        async with trio.open_nursery() as nursery:
            for coalescer in self._coalescers:
                nursery.start_soon(coalescer.run)
        await self._members.finish_all()
        self._coalesced.set()
        self._wake_ticker()

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
            self._members.finish_stale(now, delay)

    def _wake_ticker(self) -> None:
        """The writer is done, or a padded gzip member holds new text: the
        ticker computes its next tick again (that text's line may be due
        before the tick it sleeps until)."""
        self._ticker_wake.set()

    def _next_tick(self, delay: float) -> float:
        """When the ticker looks next: when the oldest line queued in a
        handle, or the oldest text of a padded gzip member, will have waited
        ``delay``; ``delay`` from now when nothing waits (a line queued later
        has its deadline after that).  What is overdue already could not be
        pushed (its lane's channel is full, or its task is pushing it) and
        is looked at again a quarter of ``delay`` from now."""
        now = trio.current_time()
        tick = now + delay
        for since in [*(producer.pending_since for producer in self._producers), *self._members.text_since()]:
            due = since + delay
            tick = min(tick, due if due > now else now + delay / 4)
        return tick

    @trio.lowlevel.enable_ki_protection
    async def _write_and_give_back(self, pieces: list[tuple[Placement, memoryview]], buffer: memoryview) -> None:
        try:
            await self._sink.write_pieces(pieces, buffer)
        finally:
            # The backend returns only once the kernel is done with the buffer.
            self._pool.give_back(buffer)

    @trio.lowlevel.enable_ki_protection
    async def _write_and_release_slot(self, pieces: list[tuple[Placement, memoryview]]) -> None:
        try:
            await self._sink.write_pieces(pieces)
        finally:
            self._whole_slots.release()
