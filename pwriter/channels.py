"""Producer handles, coalescers and the buffer pool: from many producer tasks to full stripe buffers.

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

Backpressure: ``flush`` hands the buffer to a write that gives it back to the
pool when the kernel is done with it.  When every buffer is in flight,
``pool.take()`` waits, the coalescer stops receiving, its channel fills, and
producers wait in ``send``.  Memory is thus bounded by the pool plus
``channel_blocks`` blocks per coalescer plus one batch per producer.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import operator
from collections.abc import Awaitable, Callable, Iterable

import trio

from .traceformat import count_lines

__all__ = ["Block", "BufferPool", "Producer", "join_lines", "one_line", "Coalescer", "CoalescerStatistics",
           "DEFAULT_BATCH_BYTES"]

DEFAULT_BATCH_BYTES = 64 << 10
NEWLINE = b"\n"
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
        """Every buffer of the pool (for registration with a backend), taken or not."""
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
    now, and the writer pushes a batch before its oldest line has waited
    ``max_delay`` seconds (trio clock).  Closing the handle pushes what is
    left.  The lines of one handle keep their order in the output.  A call
    after the handle closed raises :class:`~pwriter.errors.ClosedError`.

    Every call is a checkpoint.  A call that returned accepted its lines; a
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
    """

    def __init__(self, channel: trio.MemorySendChannel[Block], *, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 check: Callable[[bytes], None] | None = None) -> None:
        self._channel = channel
        self._batch_bytes = batch_bytes
        self._check = check  # validate=True: raises for a block that is not event lines
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.pending_since = math.inf
        # Nonzero while a push of this handle waits, or once the handle takes
        # no call (closed, or its writer closing): one test on the hot path
        # covers every refusal.
        self._blocked = 0
        self.closed = False
        self.closed_by_writer = False
        self._channel_closed = False
        self._sending = False  # a push waits for room (the writer's pushes keep off)
        self._push_done: trio.Event | None = None  # set when that push ends (the writer's close waits for it)

    async def send_line(self, line: bytes) -> None:
        """Queue one line (a newline is added if it has none)."""
        # The hot path of the library: kept to a few operations per line.
        if type(line) is not bytes:
            line = _copy_of(line, "send_line")
        if self._blocked:
            raise self._misuse("send_line")
        line = one_line(line)
        if self._check is not None:
            self._check(line)
        if self._pending_bytes + len(line) < self._batch_bytes:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._queue(line)
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._push(line)

    async def send_lines(self, lines: Iterable[bytes]) -> None:
        """Queue many lines at once (newlines added where missing; every
        line is checked as in :meth:`send_line`, and if one is refused,
        none of them is taken)."""
        if self._blocked:
            raise self._misuse("send_lines")
        block = join_lines(lines)
        if block and self._check is not None:
            self._check(block)
        if self._pending_bytes + len(block) < self._batch_bytes or not block:
            await trio.lowlevel.checkpoint_if_cancelled()
            if block:
                self._queue(block)
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._push(block)

    async def send_block(self, block: bytes) -> None:
        """Send a block of whole lines (newline-terminated; one is added at the end if missing).

        The block is copied unless it is ``bytes``, and sent as it is, after
        anything queued before it.
        """
        if type(block) is not bytes:
            block = _copy_of(block, "send_block")
        if self._blocked:
            raise self._misuse("send_block")
        if not block:
            await trio.lowlevel.checkpoint()
            return
        if not block.endswith(NEWLINE):
            block += NEWLINE
        if self._check is not None:
            self._check(block)
        self._start_push()
        try:
            if self._pending:
                await self._send_queued()
            await self._send(trio.current_time(), block)
        finally:
            self._finish_push()

    async def flush(self) -> None:
        """Send the queued lines now.

        If cancelled, the lines stay queued (nothing is lost or sent twice).
        """
        if self._blocked:
            raise self._misuse("flush")
        if not self._pending:
            await trio.lowlevel.checkpoint()
            return
        await self._push()

    def _queue(self, lines: bytes) -> None:
        if not self._pending:
            self.pending_since = trio.current_time()
        self._pending.append(lines)
        self._pending_bytes += len(lines)

    async def _push(self, lines: bytes = b"") -> None:
        """Push the queued lines and ``lines`` (the current call's, if any;
        one of the two holds something) as one block, marked as a push under
        way (the caller checked that the handle takes calls)."""
        self._start_push()
        try:
            await self._send_queued(lines)
        finally:
            self._finish_push()

    def _start_push(self) -> None:
        """A push may wait: a second task's call is refused meanwhile, the writer's pushes keep off."""
        self._blocked += 1
        self._sending = True

    def _finish_push(self) -> None:
        self._blocked -= 1
        self._sending = False
        if self._push_done is not None:
            self._push_done.set()

    async def _send_queued(self, lines: bytes = b"") -> None:
        """Send the queued lines, then ``lines``, as one block.

        If this raises (cancelled included), the queue holds what it held
        before and ``lines`` was not taken.
        """
        queued = self._pending
        since = self.pending_since if queued else trio.current_time()
        if lines:
            block = b"".join([*queued, lines]) if queued else lines
        else:
            block = b"".join(queued) if len(queued) > 1 else queued[0]
        # What waits for room is the block, not also the line objects it was
        # made of: a waiting producer holds one batch of memory, not two.
        self._pending = [block]
        try:
            await self._send(since, block)
        except BaseException:
            if not queued:
                self._pending = []
            else:
                self._pending = [block[: self._pending_bytes] if lines else block]
            raise
        self._clear_pending()

    async def _send(self, since: float, block: bytes) -> None:
        """Send one block (a checkpoint; if it raises, the block was not sent)."""
        try:
            await self._channel.send((since, block))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            from .errors import ClosedError

            raise ClosedError("a send on a producer handle whose writer closed while it waited: "
                              "nothing was taken") from None

    def send_pending_nowait(self) -> bool:
        """Send the queued lines if the channel has room now; False if not.

        Used by the writer to push a batch that waited too long (also one
        left in a handle closed under cancellation).  Does nothing while a
        push of the handle waits.
        """
        if not self._pending:
            return True
        if self._sending or self._channel_closed:
            return False
        try:
            self._channel.send_nowait((self.pending_since, b"".join(self._pending)))
        except trio.WouldBlock:
            return False
        self._clear_pending()
        return True

    def _clear_pending(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        self.pending_since = math.inf

    def _misuse(self, call: str) -> Exception:
        from .errors import BusyError, ClosedError

        if self.closed_by_writer:
            return ClosedError(f"{call} on a producer handle whose writer closed (or is closing): nothing was taken")
        if self.closed:
            return ClosedError(f"{call} on a producer handle that is closed: nothing was taken")
        return BusyError(f"{call} on a producer handle that another task is using (one handle per task): "
                         "nothing was taken")

    async def aclose(self) -> None:
        """Push what is queued and close this handle's channel; idempotent.

        If the push is cancelled (the producer's own task was), the lines
        stay queued and the writer pushes them: lines a call accepted are
        never lost, only the writer's own cancellation drops them.  Once the
        writer is closing, this does nothing: the writer pushes what the
        handle holds.
        """
        if self.closed or self.closed_by_writer:
            return
        if self._blocked:
            raise self._misuse("aclose")
        self.closed = True
        self._blocked += 1  # (no call from now on)
        if self._pending:
            await self._push()
        self._close_channel()

    def refuse_calls(self) -> None:
        """The writer starts closing: from now on every call raises
        :class:`~pwriter.errors.ClosedError` and takes nothing (a push
        already waiting goes on)."""
        if not self.closed_by_writer:
            self.closed_by_writer = True
            self._blocked += 1

    async def close_for_writer(self) -> None:
        """At the writer's close: refuse calls, wait until a push already
        waiting (a call of the handle's task, or its ``aclose``) has ended,
        then push what the handle still holds and close its channel."""
        self.refuse_calls()
        while self._sending:
            self._push_done = trio.Event()
            await self._push_done.wait()
        self.closed = True
        if not self._channel_closed:
            if self._pending:
                await self._push()
            self._close_channel()

    def discard_for_writer(self) -> None:
        """The writer ended without publishing (or is past publishing): close
        the handle as it is; a push still waiting raises ClosedError, and
        so does every later call."""
        self.refuse_calls()
        self.closed = True
        self._close_channel()

    def _close_channel(self) -> None:
        if not self._channel_closed:
            self._channel_closed = True
            self._channel.close()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _copy_of(data: object, call: str) -> bytes:
    """``data`` (any bytes-like object) as new bytes; TypeError in our words otherwise."""
    if isinstance(data, (str, int)):
        raise TypeError(f"{call} takes bytes (a line of UTF-8 text), not {type(data).__name__}")
    try:
        with memoryview(data) as view:  # type: ignore[arg-type]
            return view.tobytes()
    except TypeError:
        raise TypeError(f"{call} takes bytes (a line of UTF-8 text), not {type(data).__name__}") from None


def one_line(line: bytes) -> bytes:
    """``line`` (bytes) as one newline-terminated record; ValueError for an
    empty line or one with a newline other than at its end."""
    newline = line.find(NEWLINE)
    if newline < 0:
        if line:
            return line + NEWLINE
    elif newline == len(line) - 1 and newline:
        return line
    raise _bad_line(line)


def _bad_line(line: bytes) -> ValueError:
    if not line.strip(NEWLINE):
        return ValueError("a line must not be empty")
    shown = line[:60] + (b"..." if len(line) > 60 else b"")
    return ValueError(f"a line must be one record with no newline except at its end: {shown!r}")


_last_item = operator.itemgetter(-1)


def join_lines(lines: Iterable[bytes]) -> bytes:
    """``lines`` as one block of newline-terminated lines, copied.

    Each line must be bytes-like, not empty, with no newline except at its
    end (one is added where missing); raises TypeError or ValueError
    otherwise.  The usual cases (no line ends with a newline, or every
    line does) are checked and joined in C, with no Python step per line:
    the joined block's newlines (one per line, none empty) and, for lines
    that bring their own, each line's last byte tell that each line holds
    exactly one newline, at its end.
    """
    if not isinstance(lines, (list, tuple)):
        lines = list(lines)
    if not lines:
        return b""
    count = len(lines)
    try:
        if lines[0][-1:] != NEWLINE:  # the usual case of lines without their newline
            block = b"\n".join([*lines, b""])
            if count_lines(block) == (count, False):
                return block  # no line had a newline inside, none is empty
        elif bytes(map(_last_item, lines)).count(10) == count:  # every line ends with a newline ...
            block = b"".join(lines)
            if count_lines(block) == (count, False):
                return block  # ... and has no other, none is empty
    except (TypeError, ValueError, IndexError):  # not bytes, or an empty line: see below, line by line
        pass
    # A mix: line by line.
    return b"".join([one_line(line if type(line) is bytes else _copy_of(line, "send_lines")) for line in lines])


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
    since)`` places a chunk of whole lines that did not go through a buffer
    and gets it written (it may return before the write completes: it keeps
    ``view``).  ``since`` is the trio time the chunk's oldest line was
    queued, so that a stage that holds text further (padded gzip members)
    keeps the ``max_delay`` bound from the line's call.
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
