"""The gzip member stage of the writer's coalescers (compressed output).

Theory of operation
-------------------
A coalescer's chunks must land in the output in the order it flushed them
(the lines of one producer handle keep their order), yet they are
compressed in worker threads, in parallel (python-isal releases the GIL).
So each chunk's task waits, before it is placed, for the event of the
chunk flushed before it by the same coalescer (``_placed``), and sets its
own once placed; the write itself runs free.  Members waiting for their
turn or their write hold a slot, as many as the pool has buffers, so that
memory stays bounded when the disk is slow.

Padded-striped output streams a coalescer's chunks into one member per
slot (:class:`~pwriter.compress.MemberBuilder`) until it fills about 90% of
a stripe; a member that has held text for ``max_delay`` is finished by the
writer's ticker (:meth:`MemberStage.finish_stale`), in its place in the
coalescer's order.  At close, :meth:`MemberStage.finish_all` finishes the
rest.  (The merge's readers do not come here: they compress in their own
threads, through :meth:`~pwriter.sink.ChunkSink.write_chunk_in_thread`.)
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .compress import MemberBuilder
from .sink import ChunkSink, compress_chunk

__all__ = ["MemberStage"]


class MemberStage:
    """Compresses the coalescers' chunks into gzip members, in each
    coalescer's order, and hands them to the sink (see the module docstring)."""

    def __init__(self, *, nursery: trio.Nursery, sink: ChunkSink, level: int, padded: bool, member_target: int,
                 slots: int) -> None:
        self._nursery = nursery
        self._sink = sink
        self._level = level
        self._member_target = member_target
        self._placed: dict[int, trio.Event] = {}
        self._compress_limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._member_slots = trio.Semaphore(slots)
        # Padded-striped gzip: members are built from many chunks, to fill their slot.
        self._builders: dict[int, MemberBuilder] | None = {} if padded else None
        self._member_since: dict[int, float] = {}  # lane -> when its unfinished member got its first text
        self._finishing = False  # set once the last members are being finished at close
        self.deadline_members = 0
        """Members finished because their oldest text waited ``max_delay``."""

    async def add(self, lane: int, text: memoryview, release: Callable[[], None]) -> None:
        """Take ``text`` (a chunk of whole lines of ``lane``) into the
        stage; ``release()`` is called once the text is no longer needed."""
        await self._compress_in_order(lane, text, release)

    def text_since(self) -> list[float]:
        """For the ticker: when each unfinished padded member got its first text."""
        return list(self._member_since.values())

    def finish_stale(self, now: float, delay: float) -> None:
        """The ticker's call: finish every member whose oldest text has waited ``delay``."""
        for lane, since in list(self._member_since.items()):
            if since + delay <= now and not self._finishing:
                self._finish_stale_member(lane)

    async def finish_all(self) -> None:
        """At close: wait until every chunk has its place, then finish and
        write the members still being built."""
        self._finishing = True  # (the ticker starts no member of its own from now on)
        for placed in list(self._placed.values()):
            await placed.wait()  # every compressed chunk has its place
        for lane, builder in sorted((self._builders or {}).items()):
            finished = await trio.to_thread.run_sync(builder.finish, limiter=self._compress_limiter)
            if finished is not None:
                placement, member = self._sink.place_member(lane, finished)
                self._nursery.start_soon(self._sink.write_placed, placement, member)

    def _finish_stale_member(self, lane: int) -> None:
        """Padded gzip: finish ``lane``'s member now, in its place in the
        lane's order, so that no text waits in a builder longer than
        ``max_delay``.  Skipped (until the next tick) when every member slot
        is taken."""
        try:
            self._member_slots.acquire_nowait()
        except trio.WouldBlock:
            return
        del self._member_since[lane]
        previous = self._placed.get(lane)
        mine = self._placed[lane] = trio.Event()
        self._nursery.start_soon(self._finish_member, lane, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _finish_member(self, lane: int, previous: trio.Event | None, mine: trio.Event) -> None:
        assert self._builders is not None
        try:
            if previous is not None:
                await previous.wait()
            builder = self._builders.get(lane)
            finished = None
            if builder is not None:
                finished = await trio.to_thread.run_sync(builder.finish, limiter=self._compress_limiter)
            if finished is None:
                mine.set()
                return
            self.deadline_members += 1
            placement, member = self._sink.place_member(lane, finished)
            mine.set()
            await self._sink.write_placed(placement, member)
        finally:
            self._member_slots.release()

    async def _compress_in_order(self, lane: int, text: memoryview, release: Callable[[], None]) -> None:
        # Compressed members wait for their write holding a slot, as many as
        # the pool has buffers: memory stays bounded when the disk is slow.
        await self._member_slots.acquire()
        previous = self._placed.get(lane)
        mine = self._placed[lane] = trio.Event()
        task = self._feed_member if self._builders is not None else self._compress_and_write
        self._nursery.start_soon(task, lane, text, release, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _feed_member(
        self, lane: int, text: memoryview, release: Callable[[], None], previous: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        assert self._builders is not None
        try:
            try:
                if previous is not None:
                    await previous.wait()  # a lane's chunks enter its member in order
                builder = self._builders.setdefault(lane, MemberBuilder(self._level))
                finished = await trio.to_thread.run_sync(
                    builder.feed, text, self._member_target, limiter=self._compress_limiter
                )
            finally:
                release()
            if finished is None:
                self._member_since.setdefault(lane, trio.current_time())
                mine.set()
                return
            self._member_since.pop(lane, None)
            placement, member = self._sink.place_member(lane, finished)
            mine.set()
            await self._sink.write_placed(placement, member)
        finally:
            self._member_slots.release()

    @trio.lowlevel.enable_ki_protection
    async def _compress_and_write(
        self, lane: int, text: memoryview, release: Callable[[], None], previous: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        try:
            try:
                member, events = await trio.to_thread.run_sync(
                    compress_chunk, text, self._level, limiter=self._compress_limiter
                )
            finally:
                release()  # the text is no longer needed
            if previous is not None:
                await previous.wait()
            placement, member = self._sink.place_member(lane, (member, text.nbytes, events))
            mine.set()
            await self._sink.write_placed(placement, member)
        finally:
            self._member_slots.release()
