"""From many producer tasks to full stripe buffers: the trio producer handle, the coalescer, the buffer pool.

Theory of operation
-------------------
A trio channel ``send`` costs far more than appending to a list, and a
trace event is a few hundred bytes.  So
a :class:`Producer` never sends single lines: it appends them to a local list
and sends one joined *block* (whole, newline-terminated lines) when the list
holds ``batch_bytes``, with the trio time its oldest line was queued.  Each
producer is bound to one coalescer's bounded channel; all lines of one
producer therefore pass through one coalescer in order, and since a
coalescer's chunks are placed in the order it fills them, **lines of one
producer keep their order** in the output (in the sharded
layout, in read order).  Across producers there is no order.

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
plus :data:`~pwriter.service.lanes.CHANNEL_BLOCKS` blocks per coalescer
(and the whole blocks waiting for each lane's writer) plus one batch per
producer.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..errors import ClosedError
from .handle import DEFAULT_BATCH_BYTES, NEWLINE, HandleCore, HandleState, copy_of

__all__ = ["Block", "BufferPool", "Producer", "Coalescer", "CoalescerStatistics"]

OPEN = HandleState.OPEN
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


Block = tuple[float, bytes]
"""What a lane's channel carries: a block of whole lines and the trio time
its oldest line was queued (the coalescer's deadline counts from there)."""


SCHEDULE_EVERY = 64
"""A ``send_line`` or ``send_lines`` that only queues lets the scheduler
switch tasks once in this many calls: every call is a cancel point, but a
schedule point costs more than queuing a line, and a tight loop that yields
this often starves no other task."""


class Producer:
    """A handle through which one task writes lines.

    Use it from one task at a time (``async with writer.producer() as p:``);
    a second task that calls it while the first waits inside a call gets
    :class:`~pwriter.errors.BusyError` (nothing of its call is taken).  A line
    is one record: bytes-like, not empty, with no newline except at its end
    (one is added when missing); anything else raises ``TypeError`` or
    ``ValueError`` and takes nothing.  Lines are copied at the call (a
    ``bytearray`` may be reused as soon as the call returns) and batched
    locally; they reach the writer in blocks: :meth:`flush` pushes the batch
    now, and the writer pushes a batch by the time its oldest line has waited
    ``max_delay`` seconds (trio clock).  Closing the handle pushes what is
    left.  The lines of one handle keep their order in the output.  A call
    after the handle closed raises :class:`~pwriter.errors.ClosedError`.

    Every call is a cancel point and, but for a ``send_line`` or
    ``send_lines`` that only queues (those yield once in
    :data:`SCHEDULE_EVERY` calls), a schedule point.  A call that returned accepted its lines; a
    call that raised, cancelled included, took none of them, as trio's own
    sends: a cancelled ``send_line``, ``send_lines`` or ``send_block``
    leaves the lines queued before it as they were, and a cancelled
    :meth:`flush` keeps them queued (they go with the next push or at close:
    nothing is lost or sent twice).  So retrying a cancelled call writes its
    lines once.  Only cancelling the writer itself discards lines, and then
    nothing is published.

    The writer's close: from the moment it starts, every call raises
    :class:`~pwriter.errors.ClosedError` and takes nothing; a call already
    waiting to push is let finish first (the close waits for it), then the
    writer pushes what the handle holds.

    The checks, the batch and the handle's state are a
    :class:`~pwriter.service.handle.HandleCore`'s; this class sends what it forms.
    """

    def __init__(self, channel: trio.MemorySendChannel[Block], *, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 check: Callable[[bytes], None] | None = None) -> None:
        self._channel = channel
        self._core = HandleCore(batch_bytes=batch_bytes, check=check, user="task", clock=trio.current_time)
        self._push_done: trio.Event | None = None  # set when a push ends (the writer's close waits for it)
        self._calls_unyielded = 0  # calls since this handle last let the scheduler switch tasks

    @property
    def state(self) -> HandleState:
        """Where the handle is in its life."""
        return self._core.state

    @property
    def pending_since(self) -> float:
        """The trio time the oldest queued line was queued (inf when none is)."""
        return self._core.pending_since

    @property
    def finished(self) -> bool:
        """Whether the handle sends nothing more (its channel is closed)."""
        return self._core.finished

    async def send_line(self, line: bytes) -> None:
        """Queue one line (a newline is added if it has none)."""
        # The hot path of the library: kept to a few operations per line.
        if type(line) is not bytes:
            line = copy_of(line, "send_line")
        core = self._core
        if core.state is not OPEN:
            raise core.refusal("send_line")
        line = core.line(line)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not core.add(line):
            await self._push(line)
        elif self._yield_due():
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _yield_due(self) -> bool:
        """Whether this call, one that queued without pushing, is a schedule point."""
        self._calls_unyielded += 1
        if self._calls_unyielded < SCHEDULE_EVERY:
            return False
        self._calls_unyielded = 0
        return True

    async def send_lines(self, lines: Iterable[bytes]) -> None:
        """Queue many lines at once (newlines added where missing; every
        line is checked as in :meth:`send_line`, and if one is refused,
        none of them is taken)."""
        core = self._core
        if core.state is not OPEN:
            raise core.refusal("send_lines")
        block = core.lines(lines)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not core.add(block):
            await self._push(block)
        elif self._yield_due():
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_block(self, block: bytes) -> None:
        """Send a block of whole lines (newline-terminated; one is added at the end if missing).

        The block is copied unless it is ``bytes``, and sent as it is, after
        anything queued before it.
        """
        if type(block) is not bytes:
            block = copy_of(block, "send_block")
        core = self._core
        if core.state is not OPEN:
            raise core.refusal("send_block")
        block = core.block(block)
        if not block:
            await trio.lowlevel.checkpoint()
            return
        await self._push(block=block)

    async def _send_checked(self, block: bytes) -> None:
        """For a sync handle: send ``block``, whole lines that the sync
        handle's own core formed and checked (each byte is checked once)."""
        if self._core.state is not OPEN:
            raise self._core.refusal("send_block")
        await self._push(block=block)

    async def flush(self) -> None:
        """Send the queued lines now.

        If cancelled, the lines stay queued (nothing is lost or sent twice).
        """
        core = self._core
        if core.state is not OPEN:
            raise core.refusal("flush")
        if not core.pending:
            await trio.lowlevel.checkpoint()
            return
        await self._push()

    async def _push(self, lines: bytes = b"", *, block: bytes = b"") -> None:
        """Push the queued lines and ``lines`` (the current call's) as one
        block, then ``block`` as a block of its own; the handle is busy
        meanwhile (its caller checked that it may push).

        If this raises (cancelled included), ``lines`` and ``block`` were
        not taken, and the queue holds what it held before unless it was sent.
        """
        core = self._core
        core.start_push()
        try:
            if core.pending or lines:
                since = core.pending_since if core.pending else trio.current_time()
                joined = core.take(lines)
                try:
                    await self._send(since, joined)
                except BaseException:
                    core.unsent()
                    raise
                core.sent()
            if block:
                await self._send(trio.current_time(), block)
        finally:
            core.end_push()
            if self._push_done is not None:
                self._push_done.set()

    async def _send(self, since: float, block: bytes) -> None:
        """Send one block (a checkpoint; if it raises, the block was not sent)."""
        try:
            await self._channel.send((since, block))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ClosedError("a send on a producer handle whose writer closed while it waited: "
                              "nothing was taken") from None

    def send_pending_nowait(self) -> bool:
        """Send the queued lines if the channel has room now; False if not
        (the lines stay queued; so when the lane's coalescer is gone, as
        when the writer fails).

        Used by the writer to push a batch that waited too long (also one
        left in a handle closed under cancellation).  Does nothing while a
        push of the handle waits.
        """
        core = self._core
        if not core.pending:
            return True
        if not core.may_push:
            return False
        since = core.pending_since
        try:
            self._channel.send_nowait((since, core.take()))
        except (trio.WouldBlock, trio.BrokenResourceError):  # (broken: the lane is gone, the writer is failing)
            core.unsent()
            return False
        core.sent()
        return True

    async def aclose(self) -> None:
        """Push what is queued and close this handle's channel; idempotent.

        If the push is cancelled (the producer's own task was), the lines
        stay queued and the writer pushes them: lines a call accepted are
        never lost, only the writer's own cancellation drops them.  Once the
        writer is closing, this does nothing: the writer pushes what the
        handle holds.
        """
        core = self._core
        if not core.start_close("aclose"):
            return
        if core.pending:
            await self._push()
        self._finish()

    def refuse_calls(self) -> None:
        """The writer starts closing: from now on every call raises
        :class:`~pwriter.errors.ClosedError` and takes nothing (a push
        already waiting goes on)."""
        self._core.refuse()

    async def close_for_writer(self) -> None:
        """At the writer's close: refuse calls, wait until a push already
        waiting (a call of the handle's task, or its ``aclose``) has ended,
        then push what the handle still holds and close its channel."""
        core = self._core
        core.refuse()
        while core.pushing:
            self._push_done = trio.Event()
            await self._push_done.wait()
        if not core.finished:
            if core.pending:
                await self._push()
            self._finish()

    def discard_for_writer(self) -> None:
        """The writer ended without publishing (or is past publishing): close
        the handle as it is; a push still waiting raises ClosedError, and
        so does every later call."""
        self._core.refuse()
        self._finish()

    def _finish(self) -> None:
        if self._core.finish():
            self._channel.close()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


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
