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

In a padded layout a lane keeps its slot (see :mod:`pwriter.layout`), and
its chunks are cut into members sized by what they compress to, so that
they fill the slot (:class:`~pwriter.compress.SlotMembers`; a lane's chunks
are compressed one after the other, since each member's size depends on
the room the last one left).  The members of a slot are held until it is
full and then written in one write that ends in its padding.  Members held
for ``max_delay`` are written by the writer's ticker
(:meth:`MemberStage.finish_stale`) at the next offset in the lane's slot,
without padding, in their place in the lane's order; the lane goes on
filling that slot.  At close, :meth:`MemberStage.finish_all` writes what
the lanes hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .compress import Member, SlotMembers
from .layout import Placement
from .sink import ChunkSink, compress_chunk

__all__ = ["MemberStage"]


class MemberStage:
    """Compresses the coalescers' chunks into gzip members, in each
    coalescer's order, and hands them to the sink (see the module docstring)."""

    def __init__(self, *, nursery: trio.Nursery, sink: ChunkSink, level: int, padded: bool, slots: int) -> None:
        self._nursery = nursery
        self._sink = sink
        self._level = level
        self._placed: dict[int, trio.Event] = {}
        self._compress_limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._member_slots = trio.Semaphore(slots)
        # Padded gzip: each lane's members, sized to fill its slot.
        self._lanes: dict[int, SlotMembers] | None = {} if padded else None
        self._member_since: dict[int, float] = {}  # lane -> when the oldest line its held members hold was queued
        self.on_held_text: Callable[[], None] = lambda: None
        """Called when a lane's held members get text with an earlier deadline (the ticker looks again)."""
        self._finishing = False  # set once the last members are being written at close
        self.deadline_members = 0
        """Writes of held members whose oldest text waited ``max_delay``."""

    async def add(self, lane: int, text: memoryview, release: Callable[[], None], since: float) -> None:
        """Take ``text`` (a chunk of whole lines of ``lane``, whose oldest
        line was queued at trio time ``since``) into the stage; ``release()``
        is called once the text is no longer needed.  With a shard size, each
        piece of it that goes to one shard
        (:meth:`~pwriter.sink.ChunkSink.shard_pieces`) is a member of its own."""
        pieces = self._sink.shard_pieces(lane, text)
        if len(pieces) > 1:
            release = _after_calls(len(pieces), release)
        for piece in pieces:
            await self._compress_in_order(lane, piece, release, since)

    def text_since(self) -> list[float]:
        """For the ticker: when the oldest line of each lane's held padded members was queued."""
        return list(self._member_since.values())

    def finish_stale(self, now: float, delay: float) -> None:
        """The ticker's call: write the members of every lane whose oldest text has waited ``delay``."""
        for lane, since in list(self._member_since.items()):
            if since + delay <= now and not self._finishing:
                self._write_stale_members(lane)

    async def finish_all(self) -> None:
        """At close: wait until every chunk has its place, then write what
        the lanes hold."""
        self._finishing = True  # (the ticker starts no write of its own from now on)
        for placed in list(self._placed.values()):
            await placed.wait()  # every compressed chunk has its place
        for lane, members in sorted((self._lanes or {}).items()):
            if members.held:
                self._nursery.start_soon(self._sink.write_placed, *self._sink.place_members(lane, members.take()))

    def _write_stale_members(self, lane: int) -> None:
        """Padded gzip: write ``lane``'s held members now, in their place in
        the lane's order, so that no text waits longer than ``max_delay``.
        Skipped (until the next tick) when every member slot is taken."""
        try:
            self._member_slots.acquire_nowait()
        except trio.WouldBlock:
            return
        del self._member_since[lane]
        previous = self._placed.get(lane)
        mine = self._placed[lane] = trio.Event()
        self._nursery.start_soon(self._write_held, lane, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _write_held(self, lane: int, previous: trio.Event | None, mine: trio.Event) -> None:
        assert self._lanes is not None
        try:
            if previous is not None:
                await previous.wait()
            members = self._lanes.get(lane)
            if members is None or not members.held:
                mine.set()
                return
            self.deadline_members += 1
            placed = self._sink.place_members(lane, members.take())
            mine.set()
            await self._sink.write_placed(*placed)
        finally:
            self._member_slots.release()

    async def _compress_in_order(self, lane: int, text: memoryview, release: Callable[[], None],
                                 since: float) -> None:
        # Compressed members wait for their write holding a slot, as many as
        # the pool has buffers: memory stays bounded when the disk is slow.
        await self._member_slots.acquire()
        previous = self._placed.get(lane)
        mine = self._placed[lane] = trio.Event()
        task = self._fill_slots if self._lanes is not None else self._compress_and_write
        self._nursery.start_soon(task, lane, text, release, since, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _fill_slots(
        self, lane: int, text: memoryview, release: Callable[[], None], since: float, previous: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        assert self._lanes is not None
        try:
            placed: list[tuple[Placement, bytes]] = []

            def place(members: list[Member]) -> None:  # (in the worker thread: the sink places under its lock)
                placed.append(self._sink.place_members(lane, members))

            try:
                if previous is not None:
                    await previous.wait()  # a lane's chunks enter its slot in order
                members = self._lanes.get(lane)
                if members is None:
                    members = self._lanes[lane] = self._sink.slot_members(lane)
                held_before = bool(members.held)
                await trio.to_thread.run_sync(members.add, text, place, limiter=self._compress_limiter)
            finally:
                release()
            if not members.held:
                self._member_since.pop(lane, None)
            else:
                if placed or not held_before:  # what it holds now came with this chunk
                    self._member_since[lane] = since
                else:
                    self._member_since[lane] = min(self._member_since.get(lane, since), since)
                self.on_held_text()
            mine.set()
            for placement, body in placed:
                await self._sink.write_placed(placement, body)
        finally:
            self._member_slots.release()

    @trio.lowlevel.enable_ki_protection
    async def _compress_and_write(
        self, lane: int, text: memoryview, release: Callable[[], None], since: float, previous: trio.Event | None,
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
            placement, member = self._sink.place_members(lane, [(member, text.nbytes, events)])
            mine.set()
            await self._sink.write_placed(placement, member)
        finally:
            self._member_slots.release()


def _after_calls(count: int, call: Callable[[], None]) -> Callable[[], None]:
    """A function that calls ``call()`` on its ``count``-th call (from the trio thread)."""
    left = [count]

    def countdown() -> None:
        left[0] -= 1
        if left[0] == 0:
            call()

    return countdown
