"""The producer handles: the core both share (line checks, the batch, the handle's state) and the trio handle.

Theory of operation
-------------------
pwriter has two producer handles, :class:`Producer` for
trio tasks and :class:`~pwriter.faces.sync.SyncProducer` for plain threads.  Both
keep the same promises (lines checked and copied at the call, batched in the
handle, one user at a time, a call that returned took its lines and one
that raised took none), so both are built on one :class:`HandleCore`, which
holds everything that does not depend on trio or on threads:

* the checks of a line (bytes-like, not empty, one newline at its end at
  most, one added when missing), the copy, the join of many lines, and the
  writer's ``validate=True`` check, run exactly once over each byte: at the
  call that hands the line in, never again when batches are joined or
  pushed (a block formed here is sent on as it is);
* the batch: the lines queued so far, their size, when the oldest was
  queued, and the join of a push (:meth:`HandleCore.take`, then
  :meth:`~HandleCore.sent` or :meth:`~HandleCore.unsent`: a push that raises
  leaves the queue as it was, so a retried call writes its lines once);
* the handle's lifecycle, as one :class:`HandleState`, whose transitions
  are the methods below; each state says which error a call gets.

The core does no I/O and never waits, like a protocol state machine: the
trio handle sends the blocks it forms into a lane's channel, the sync
handle carries them into the writer's trio thread, and each wakes whoever
waits for a push to end.  A sync handle's core is changed only by the
thread that holds that handle's lock, or by the writer's close once no
call can start.

A trio channel ``send`` costs far more than appending to a list, and a
trace event is a few hundred bytes.  So a :class:`Producer` never sends
single lines: it appends them to its core's batch and sends one joined
*block* (whole, newline-terminated lines) when the batch holds
``batch_bytes``, with the trio time its oldest line was queued.  Each
producer is bound to one lane's bounded channel
(:mod:`pwriter.service.lanes`); all lines of one producer therefore pass
through one coalescer in order, and since a coalescer's chunks are placed
in the order it fills them, **lines of one producer keep their order** in
the output (in the sharded layout, in read order).  Across producers there
is no order.
"""

from __future__ import annotations

import enum
import math
import operator
import sys
import time
from collections.abc import Callable, Iterable

import trio

from ..errors import BusyError, ClosedError, InputError
from ..plan.traceformat import BlockCleaner, count_lines

__all__ = ["Block", "DEFAULT_BATCH_BYTES", "HandleCore", "HandleState", "Producer", "SCHEDULE_AFTER", "SCHEDULE_EVERY",
           "copy_of", "join_lines", "line_checker", "one_line"]

DEFAULT_BATCH_BYTES = 64 << 10
NEWLINE = b"\n"


class HandleState(enum.Enum):
    """Where a producer handle is in its life; the error a call gets follows from it."""

    OPEN = "open"
    """Takes calls."""
    BUSY = "busy"
    """A call is under way and may wait (trio: a push; sync: any call):
    another call is refused with BusyError."""
    CLOSING = "closing"
    """Its user's close is under way (it pushes the last lines): calls are refused."""
    CLOSED_PENDING = "closed, lines pending"
    """Closed by its user, but the close's push did not complete (it was
    cancelled): the lines wait for the writer, which pushes them."""
    CLOSED = "closed"
    """Closed by its user: everything is pushed, nothing more is sent."""
    WRITER_CLOSING = "writer closing"
    """The writer is closing: every call is refused; the writer pushes what the handle holds."""
    WRITER_CLOSING_BUSY = "writer closing, busy"
    """The writer is closing while a call, a close or the writer's own push
    is under way: the writer waits until it ends."""
    ENDED = "ended"
    """Closed by the writer (or discarded when the writer failed): nothing more is sent."""


OPEN = HandleState.OPEN
BUSY = HandleState.BUSY
CLOSING = HandleState.CLOSING
CLOSED_PENDING = HandleState.CLOSED_PENDING
CLOSED = HandleState.CLOSED
WRITER_CLOSING = HandleState.WRITER_CLOSING
WRITER_CLOSING_BUSY = HandleState.WRITER_CLOSING_BUSY
ENDED = HandleState.ENDED

_CLOSED_BY_USER = frozenset({CLOSING, CLOSED_PENDING, CLOSED})
_FINISHED = frozenset({CLOSED, ENDED})
_PUSHING = frozenset({BUSY, CLOSING, WRITER_CLOSING_BUSY})
# a push starts from these (its caller checked that it may) ...
_PUSH_STARTS = {OPEN: BUSY, CLOSING: CLOSING, WRITER_CLOSING: WRITER_CLOSING_BUSY}
# ... and ends in these (the writer's close, or a discard, may have come meanwhile)
_PUSH_ENDS = {BUSY: OPEN, CLOSING: CLOSED_PENDING, WRITER_CLOSING_BUSY: WRITER_CLOSING, ENDED: ENDED}
_REFUSED = {OPEN: WRITER_CLOSING, CLOSED_PENDING: WRITER_CLOSING, BUSY: WRITER_CLOSING_BUSY,
            CLOSING: WRITER_CLOSING_BUSY}


class HandleCore:
    """What a producer handle holds: its checks, its batch and its :class:`HandleState`.

    ``user`` names who uses a handle (``"task"`` or ``"thread"``) in the
    BusyError message; ``check`` is the writer's ``validate=True`` check
    (None without it); ``batch_bytes`` is how many bytes of lines the
    handle queues before a call pushes them; ``clock`` tells when a batch
    starts (the writer pushes a batch before its oldest line waited too long).
    """

    def __init__(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES, check: Callable[[bytes], None] | None = None,
                 user: str = "task", clock: Callable[[], float] | None = None) -> None:
        self.batch_bytes = batch_bytes
        self.check = check
        self.user = user
        self._clock = clock  # when a batch starts (trio: the trio clock; a sync handle's queue keeps no time)
        self.state = OPEN
        self.pending: list[bytes] = []
        """The queued blocks of lines (while a push is under way: its one joined block)."""
        self.pending_bytes = 0
        """The bytes of lines queued (a push's own lines are not counted until it is sent)."""
        self.pending_since = math.inf
        """When the oldest queued line was queued, on ``clock`` (inf when none is, or without a clock)."""

    # -- the checks: each returns newline-terminated lines, each byte checked once

    def line(self, line: bytes) -> bytes:
        """``line`` (bytes) as one checked, newline-terminated record."""
        newline = line.find(NEWLINE)
        if newline <= 0 or newline != len(line) - 1:  # (the hot path: a line that ends with its only newline)
            line = one_line(line)
        if self.check is not None:
            self.check(line)
        return line

    def lines(self, lines: Iterable[bytes]) -> bytes:
        """``lines`` joined into one checked block (empty if there are none)."""
        block = join_lines(lines)
        if block and self.check is not None:
            self.check(block)
        return block

    def block(self, block: bytes) -> bytes:
        """``block`` (bytes of whole lines) checked, with a newline added at its end if missing."""
        if not block:
            return block
        if not block.endswith(NEWLINE):
            block += NEWLINE
        if self.check is not None:
            self.check(block)
        return block

    # -- the batch

    def add(self, lines: bytes) -> bool:
        """Queue checked lines if the batch stays under ``batch_bytes`` with
        them (the first lines of a batch start its clock); False, queuing
        nothing, if it would not: the caller pushes the batch with them."""
        size = self.pending_bytes + len(lines)
        if size >= self.batch_bytes:
            return False
        if lines:
            if not self.pending and self._clock is not None:
                self.pending_since = self._clock()
            self.pending.append(lines)
            self.pending_bytes = size
        return True

    def take(self, lines: bytes = b"") -> bytes:
        """The queued lines, then ``lines``, as one block to push.

        Until :meth:`sent` or :meth:`unsent`, the queue holds that one block
        instead of the pieces it was made of (a push that waits holds one
        batch of memory, not two).
        """
        queued = self.pending
        if lines:
            block = b"".join([*queued, lines]) if queued else lines
        else:
            block = b"".join(queued) if len(queued) > 1 else queued[0]
        self.pending = [block]
        return block

    def sent(self) -> None:
        """The block of :meth:`take` was sent: the queue is empty."""
        self.pending = []
        self.pending_bytes = 0
        self.pending_since = math.inf

    def unsent(self) -> None:
        """The block of :meth:`take` was not sent: the queue holds what it held before."""
        block = self.pending[0]
        if not self.pending_bytes:
            self.pending = []
        elif len(block) > self.pending_bytes:
            self.pending = [block[: self.pending_bytes]]

    # -- the lifecycle

    def refusal(self, call: str) -> Exception:
        """The error for ``call`` on a handle that is not open (on one that
        is, BusyError: a sync handle's call is under way, and is just starting)."""
        state = self.state
        if state is BUSY or state is OPEN:
            return BusyError(f"{call} on a producer handle that another {self.user} is using "
                             f"(one handle per {self.user}): nothing was taken")
        if state in _CLOSED_BY_USER:
            return ClosedError(f"{call} on a producer handle that is closed: nothing was taken")
        return ClosedError(f"{call} on a producer handle whose writer closed (or is closing): nothing was taken")

    def start_call(self, call: str) -> None:
        """A call that may wait starts: OPEN becomes BUSY (else the call's refusal is raised)."""
        if self.state is not OPEN:
            raise self.refusal(call)
        self.state = BUSY

    def start_push(self) -> None:
        """A push starts (its caller checked that it may): the handle is busy until :meth:`end_push`."""
        # (OPEN is tested first, by identity: an enum member hashes in Python, on the hot path)
        self.state = BUSY if self.state is OPEN else _PUSH_STARTS[self.state]

    def end_push(self) -> None:
        """The push (or call) under way ended, whether or not it sent its block."""
        self.state = OPEN if self.state is BUSY else _PUSH_ENDS[self.state]

    end_call = end_push

    @property
    def pushing(self) -> bool:
        """Whether a call or push is under way (the writer waits for it; nobody else pushes)."""
        return self.state in _PUSHING

    @property
    def finished(self) -> bool:
        """Whether the handle sends nothing more (closed by its user or by the writer)."""
        return self.state in _FINISHED

    @property
    def may_push(self) -> bool:
        """Whether someone other than the handle's user (the writer) may push its lines now."""
        return not self.pushing and not self.finished

    def start_close(self, call: str) -> bool:
        """Its user closes the handle: True if the close is to be done
        (OPEN becomes CLOSING), False if it is closed or its writer is
        closing; BusyError while a call is under way."""
        if self.state is BUSY:
            raise self.refusal(call)
        if self.state is not OPEN:
            return False
        self.state = CLOSING
        return True

    def refuse(self) -> None:
        """The writer starts closing: every call is refused from now on."""
        self.state = _REFUSED.get(self.state, self.state)

    def finish(self) -> bool:
        """Nothing more is sent: True if the handle's channel is to be
        closed now, False if that was done before."""
        if self.state in _FINISHED:
            return False
        self.state = CLOSED if self.state in _CLOSED_BY_USER else ENDED
        return True


def copy_of(data: object, call: str) -> bytes:
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
    return b"".join([one_line(line if type(line) is bytes else copy_of(line, "send_lines")) for line in lines])


def line_checker(target: str) -> Callable[[bytes], None]:
    """``validate=True``: a check that raises InputError for a block that is not all JSON event lines."""
    name = f"a line sent to {target}"

    def check(block: bytes) -> None:
        cleaned = BlockCleaner(name, validate=True).feed(block)
        if cleaned != block:  # a wrapper, blank or untrimmed line: not an event line as sent
            raise InputError(name, "not a JSON event line as sent (blank, wrapper or surrounded by spaces)")

    return check


Block = tuple[float, bytes]
"""What a lane's channel carries: a block of whole lines and the trio time
its oldest line was queued (the coalescer's deadline counts from there)."""


SCHEDULE_EVERY = 256
"""A ``send_line`` or ``send_lines`` that only queues lets the scheduler
switch tasks once this many calls of its handle have passed since its last
schedule point (a push is one), or sooner (see :data:`SCHEDULE_AFTER`):
every call is a cancel point, but a schedule point costs more than queuing
a line."""

SCHEDULE_AFTER = 1 / 16
"""... and at the first such call once this fraction of the writer's
``max_delay`` has passed (trio clock) since the handle's last schedule
point: a task that works between its calls still lets the writer's
deadlines run in time, and a tight loop over many handles starves no task."""


def _elapsed_clock() -> Callable[[], float]:
    """What measures the time between a handle's schedule points: the clock
    trio's own runs on (cheaper to read than trio's), unless a test drives
    trio's clock with a MockClock.  (``trio.testing``, which imports pytest,
    is looked up, never imported: a MockClock in use implies it.)"""
    testing = sys.modules.get("trio.testing")
    if testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock):
        return trio.current_time
    return time.perf_counter


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

    Every call is a cancel point and, but for a ``send_line`` or ``send_lines`` that only queues (those yield
    at least once in :data:`SCHEDULE_EVERY` calls, or after :data:`SCHEDULE_AFTER` of ``max_delay``), a
    schedule point.  A call that returned accepted its lines; a call that raised, cancelled included, took none
    of them, as trio's own sends: a cancelled ``send_line``, ``send_lines`` or ``send_block`` leaves the lines
    queued before it as they were, and a cancelled :meth:`flush` keeps them queued (they go with the next push
    or at close: nothing is lost or sent twice).  So retrying a cancelled call writes its lines once.  Only
    cancelling the writer itself discards lines, and then nothing is published.

    The writer's close: from the moment it starts, every call raises
    :class:`~pwriter.errors.ClosedError` and takes nothing; a call already
    waiting to push is let finish first (the close waits for it), then the
    writer pushes what the handle holds.

    The checks, the batch and the handle's state are a
    :class:`~pwriter.service.handle.HandleCore`'s; this class sends what it forms.
    """

    def __init__(self, channel: trio.MemorySendChannel[Block], *, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 check: Callable[[bytes], None] | None = None, max_delay: float = 1.0) -> None:
        self._channel = channel
        self._core = HandleCore(batch_bytes=batch_bytes, check=check, user="task", clock=trio.current_time)
        self._push_done: trio.Event | None = None  # set when a push ends (the writer's close waits for it)
        self._calls_unyielded = 0  # calls since this handle last let the scheduler switch tasks
        self._schedule_after = max_delay * SCHEDULE_AFTER
        self._now = _elapsed_clock()
        self._schedule_by = self._now() + self._schedule_after  # when a call that only queues yields

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
            return
        self._calls_unyielded += 1
        if self._calls_unyielded >= SCHEDULE_EVERY or self._now() >= self._schedule_by:
            await self._schedule_point()

    async def _schedule_point(self) -> None:
        """Let the scheduler switch tasks (a call that queued without pushing, and is due to)."""
        self._scheduled()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _scheduled(self) -> None:
        """The handle passed a schedule point: the count and the time to the next one start again."""
        self._calls_unyielded = 0
        self._schedule_by = self._now() + self._schedule_after

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
            return
        self._calls_unyielded += 1
        if self._calls_unyielded >= SCHEDULE_EVERY or self._now() >= self._schedule_by:
            await self._schedule_point()

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
        self._scheduled()  # (a send into the lane's channel is a schedule point)

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
