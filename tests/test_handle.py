"""The producer handles (pwriter/service/handle.py): the core's states, its
checks, its batch, and the promise that ``validate=True`` checks each byte
once, through the trio handle and the sync handle alike; then the trio
handle (:class:`Producer`) over a coalescer whose flushes are recorded in
memory: what a call takes, cancelled or not, and its schedule points."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

import pwriter.service.writer
from pwriter.errors import BusyError, ClosedError, InputError
from pwriter.faces.sync import open_writer_sync
from pwriter.faces.testing import MemoryBackend, read_events
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.handle import SCHEDULE_EVERY, HandleCore, HandleState, Producer, copy_of, join_lines
from pwriter.service.writer import open_writer

from helpers import recorded_coalescer

LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")

S = HandleState


def core_in(state: HandleState, **options: object) -> HandleCore:
    """A core brought to ``state`` through its own transitions."""
    core = HandleCore(**options)  # type: ignore[arg-type]
    steps: dict[HandleState, Callable[[], object]] = {
        S.OPEN: lambda: None,
        S.BUSY: lambda: core.start_call("send_line"),
        S.CLOSING: lambda: core.start_close("aclose"),
        S.CLOSED_PENDING: lambda: (core.start_close("aclose"), core.start_push(), core.end_push()),
        S.CLOSED: lambda: (core.start_close("aclose"), core.finish()),
        S.WRITER_CLOSING: core.refuse,
        S.WRITER_CLOSING_BUSY: lambda: (core.start_call("send_line"), core.refuse()),
        S.ENDED: lambda: (core.refuse(), core.finish()),
    }
    steps[state]()
    assert core.state is state
    return core


# -- the lifecycle ---------------------------------------------------------

@pytest.mark.parametrize(("state", "error", "words"), [
    (S.BUSY, BusyError, "another task is using"),
    (S.CLOSING, ClosedError, "handle that is closed"),
    (S.CLOSED_PENDING, ClosedError, "handle that is closed"),
    (S.CLOSED, ClosedError, "handle that is closed"),
    (S.WRITER_CLOSING, ClosedError, "whose writer closed"),
    (S.WRITER_CLOSING_BUSY, ClosedError, "whose writer closed"),
    (S.ENDED, ClosedError, "whose writer closed"),
])
def test_every_state_but_open_refuses_a_call_in_its_own_words(state: HandleState, error: type, words: str) -> None:
    core = core_in(state)
    with pytest.raises(error, match=words) as raised:
        core.start_call("send_line")
    assert str(raised.value).startswith("send_line on a producer handle")
    assert str(raised.value).endswith("nothing was taken")
    assert core.state is state  # a refused call changes nothing


def test_the_busy_message_names_the_user() -> None:
    core = core_in(S.BUSY, user="thread")
    assert "another thread is using (one handle per thread)" in str(core.refusal("flush"))


def test_a_push_from_each_state_that_may_push_ends_where_it_should() -> None:
    for start, during, after in [(S.OPEN, S.BUSY, S.OPEN), (S.CLOSING, S.CLOSING, S.CLOSED_PENDING),
                                 (S.WRITER_CLOSING, S.WRITER_CLOSING_BUSY, S.WRITER_CLOSING)]:
        core = core_in(start)
        core.start_push()
        assert core.state is during and core.pushing and not core.may_push
        core.end_push()
        assert core.state is after and not core.pushing
    for state in (S.BUSY, S.CLOSED_PENDING, S.CLOSED, S.WRITER_CLOSING_BUSY, S.ENDED):
        with pytest.raises(KeyError):  # never pushes: its caller checked
            core_in(state).start_push()


def test_the_writer_refuses_calls_and_waits_for_a_push_under_way() -> None:
    refused = {S.OPEN: S.WRITER_CLOSING, S.CLOSED_PENDING: S.WRITER_CLOSING, S.BUSY: S.WRITER_CLOSING_BUSY,
               S.CLOSING: S.WRITER_CLOSING_BUSY, S.CLOSED: S.CLOSED, S.WRITER_CLOSING: S.WRITER_CLOSING,
               S.WRITER_CLOSING_BUSY: S.WRITER_CLOSING_BUSY, S.ENDED: S.ENDED}
    for state, expected in refused.items():
        core = core_in(state)
        core.refuse()
        assert core.state is expected, state
    core = core_in(S.BUSY)
    core.refuse()
    assert core.pushing  # the writer's close waits ...
    core.end_call()
    assert core.state is S.WRITER_CLOSING and core.may_push  # ... then pushes what is left
    assert core.finish() and core.state is S.ENDED and core.finished
    assert not core.finish()  # the channel is closed once


def test_a_discard_under_a_waiting_push_ends_the_handle_for_good() -> None:
    core = core_in(S.BUSY)
    core.refuse()
    assert core.finish() and core.state is S.ENDED
    core.end_push()  # the push raised ClosedError
    assert core.state is S.ENDED and not core.may_push


def test_the_users_close() -> None:
    core = core_in(S.OPEN)
    assert core.start_close("aclose") and core.state is S.CLOSING
    assert core.finish() and core.state is S.CLOSED and core.finished
    assert not core.start_close("aclose")  # idempotent
    with pytest.raises(BusyError):
        core_in(S.BUSY).start_close("aclose")  # another task's call is under way
    for state in (S.CLOSING, S.CLOSED_PENDING, S.WRITER_CLOSING, S.WRITER_CLOSING_BUSY, S.ENDED):
        core = core_in(state)
        assert not core.start_close("aclose") and core.state is state
    # The writer came while the close pushed: the handle ends as the writer's.
    core = core_in(S.CLOSING)
    core.start_push()
    core.refuse()
    core.end_push()
    assert core.finish() and core.state is S.ENDED
    # A cancelled close leaves its lines to the writer, which may push them.
    core = core_in(S.CLOSED_PENDING)
    assert core.may_push and not core.finished
    core.refuse()
    assert core.state is S.WRITER_CLOSING


# -- the checks ------------------------------------------------------------

def test_line_lines_and_block_add_newlines_and_refuse_bad_lines() -> None:
    core = HandleCore()
    assert core.line(b"{a}") == b"{a}\n" and core.line(b"{a}\n") == b"{a}\n"
    assert core.lines([b"{a}", b"{b}\n", b"{c}"]) == b"{a}\n{b}\n{c}\n"
    assert core.lines([]) == b"" and core.lines(iter([b"{a}"])) == b"{a}\n"
    assert core.block(b"{a}\n{b}") == b"{a}\n{b}\n" and core.block(b"") == b""
    for bad, words in [(b"", "must not be empty"), (b"\n", "must not be empty"),
                       (b"{a}\n{b}", "no newline except at its end"), (b"{a}\n\n", "no newline except at its end")]:
        with pytest.raises(ValueError, match=words):
            core.line(bad)
        with pytest.raises(ValueError, match=words):
            core.lines([b"{ok}", bad])
    with pytest.raises(TypeError, match="send_lines takes bytes"):
        join_lines([b"{ok}", "{text}"])  # type: ignore[list-item]
    assert join_lines([bytearray(b"{a}"), memoryview(b"{b}\n")]) == b"{a}\n{b}\n"


def test_copy_of_copies_bytes_like_objects_and_refuses_the_rest() -> None:
    data = bytearray(b"{a}")
    copied = copy_of(data, "send_line")
    data[:] = b"{x}"
    assert copied == b"{a}" and type(copied) is bytes
    for wrong in ("{a}", 17, None, [1, 2]):
        with pytest.raises(TypeError, match=f"send_line takes bytes .*not {type(wrong).__name__}"):
            copy_of(wrong, "send_line")


def test_the_check_sees_what_a_call_hands_in_and_a_refusal_takes_nothing() -> None:
    seen: list[bytes] = []

    def check(block: bytes) -> None:
        seen.append(block)
        if b"bad" in block:
            raise InputError("a line", "not JSON")

    core = HandleCore(check=check)
    assert core.add(core.line(b"{a}")) and core.add(core.lines([b"{b}", b"{c}"]))
    with pytest.raises(InputError):
        core.lines([b"{d}", b"bad"])
    assert core.block(b"") == b"" and seen == [b"{a}\n", b"{b}\n{c}\n", b"{d}\nbad\n"]
    assert core.pending == [b"{a}\n", b"{b}\n{c}\n"] and core.pending_bytes == 12


# -- the batch -------------------------------------------------------------

def test_take_then_sent_or_unsent_leaves_the_queue_as_it_should() -> None:
    times = iter([5.0, 6.0])
    core = HandleCore(batch_bytes=10, clock=lambda: next(times))
    assert core.pending_since == math.inf
    assert not core.add(b"{a-long}\n\n") and core.add(b"") and core.pending == []
    assert core.add(b"{a}\n") and core.add(b"{b}\n")  # (the clock is read when a batch starts)
    assert not core.add(b"{c}\n")  # 12 bytes: the call pushes the batch with its lines
    assert core.pending_since == 5.0 and core.pending_bytes == 8 and core.pending == [b"{a}\n", b"{b}\n"]
    assert core.take(b"{c}\n") == b"{a}\n{b}\n{c}\n"
    assert core.pending == [b"{a}\n{b}\n{c}\n"]  # what waits is the one block
    core.unsent()  # the push raised: the call's lines were not taken
    assert core.pending == [b"{a}\n{b}\n"] and core.pending_bytes == 8 and core.pending_since == 5.0
    assert core.take() == b"{a}\n{b}\n"
    core.unsent()
    assert core.pending == [b"{a}\n{b}\n"]
    core.take()
    core.sent()
    assert core.pending == [] and core.pending_bytes == 0 and core.pending_since == math.inf
    assert core.take(b"{d}\n") == b"{d}\n"  # nothing queued: the call's lines alone
    core.unsent()
    assert core.pending == [] and core.pending_bytes == 0


# -- validation once, whichever the face -----------------------------------

class CountingChecks:
    """Wraps the writer's ``validate=True`` check, counting its calls and bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.bytes = 0
        real = pwriter.service.writer.line_checker

        def make(target: str) -> Callable[[bytes], None]:
            check = real(target)

            def counted(block: bytes) -> None:
                self.calls += 1
                self.bytes += len(block)
                check(block)

            return counted

        monkeypatch.setattr(pwriter.service.writer, "line_checker", make)


LINES = [b'{"a":1}'] * 1000  # 8 bytes each with its newline: 8,000 bytes


def test_the_sync_api_checks_each_byte_once(tmp_path, settings_for, monkeypatch) -> None:
    """Before the one core, the sync handle checked a batch at the call and
    its trio handle checked it again when it was sent: 1,000 lines of 8
    bytes made 2 check calls over 16,000 bytes."""
    checks = CountingChecks(monkeypatch)
    target = str(tmp_path / "lines.pfw")
    with open_writer_sync(target, settings=settings_for(), validate=True) as writer:
        with writer.producer() as producer:
            producer.send_lines(LINES)
    assert (checks.calls, checks.bytes) == (1, 8000)
    assert read_events(target) == LINES

    checks = CountingChecks(monkeypatch)
    target = str(tmp_path / "mixed.pfw")
    with open_writer_sync(target, settings=settings_for(), validate=True) as writer:
        with writer.producer(batch_bytes=1000) as producer:  # full batches are pushed on the way
            for line in LINES[:500]:
                producer.send_line(line)
            producer.send_block(b"".join(line + b"\n" for line in LINES[500:900]))
            producer.send_lines(LINES[900:])
            producer.flush()
        left = writer.producer()
        left.send_lines(LINES[:10])  # pushed by the writer's close
    assert checks.bytes == 8080 and checks.calls == 500 + 1 + 1 + 1
    assert sorted(read_events(target)) == sorted(LINES + LINES[:10])  # (two handles: no order between them)


async def test_the_trio_api_checks_each_byte_once(tmp_path, settings_for, monkeypatch) -> None:
    checks = CountingChecks(monkeypatch)
    target = str(tmp_path / "lines.pfw")
    async with open_writer(target, settings=settings_for(), validate=True) as writer:
        async with writer.producer(batch_bytes=1000) as producer:
            for line in LINES[:500]:
                await producer.send_line(line)
            await producer.send_block(b"".join(line + b"\n" for line in LINES[500:900]))
            await producer.send_lines(LINES[900:])
        left = writer.producer()
        await left.send_lines(LINES[:10])
    assert checks.bytes == 8080 and checks.calls == 500 + 1 + 1 + 1
    assert sorted(read_events(target)) == sorted(LINES + LINES[:10])  # (two handles: no order between them)


def test_a_handle_reports_its_state(tmp_path, settings_for) -> None:
    with open_writer_sync(str(tmp_path / "s.pfw"), settings=settings_for()) as writer:
        closed = writer.producer()
        closed.close()
        left = writer.producer()
        assert closed.state is S.CLOSED and left.state is S.OPEN
    assert left.state is S.ENDED and closed.state is S.CLOSED

    async def trio_face() -> None:
        async with open_writer(str(tmp_path / "t.pfw"), settings=settings_for()) as writer:
            closed = writer.producer()
            await closed.aclose()
            left = writer.producer()
            assert closed.state is S.CLOSED and closed.finished and left.state is S.OPEN
        assert left.state is S.ENDED and left.finished

    trio.run(trio_face)


async def test_missing_newlines_are_added_never_glued() -> None:
    pool, send, recorder, coalescer = recorded_coalescer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            await producer.send_line(b"{1}")
            await producer.send_lines([b"{2}", b"{3}\n", b"{4}"])
            await producer.send_block(b"{5}\n{6}")
            await producer.send_line(b"{7}\n")
    assert b"".join(recorder.chunks) == b"{1}\n{2}\n{3}\n{4}\n{5}\n{6}\n{7}\n"


async def test_cancelled_send_loses_nothing_already_accepted() -> None:
    pool, send, recorder, coalescer = recorded_coalescer(capacity=4000, channel=1)
    async with trio.open_nursery() as nursery:
        producer = Producer(send, batch_bytes=1 << 20)
        await producer.send_block(b"{first}\n")  # fills the channel: nobody receives yet
        await producer.send_line(b"{queued}")
        with trio.move_on_after(0.01) as scope:
            await producer.flush()  # blocks: the channel is full
        assert scope.cancelled_caught
        with trio.move_on_after(0.01):
            await producer.send_block(b"{cancelled}\n")
        nursery.start_soon(coalescer.run)
        await producer.aclose()
    assert b"".join(recorder.chunks) == b"{first}\n{queued}\n"


async def test_a_cancelled_send_takes_nothing_whichever_the_method(autojump_clock: trio.testing.MockClock) -> None:
    """Issue 19, case 5: a cancelled ``send_line``, ``send_lines`` or
    ``send_block`` takes nothing, as trio's own sends (before, the first two
    had queued their lines all the same); the handle's queue is as it was
    before the call, and a cancelled flush keeps what earlier calls queued."""
    pool, send, recorder, coalescer = recorded_coalescer(capacity=4000, channel=1)
    producer = Producer(send, batch_bytes=20)
    await producer.send_block(b"{first}\n")  # fills the channel: nobody receives yet
    await producer.send_line(b"{queued}")  # 9 bytes of 20: stays queued
    for call in (lambda: producer.send_line(b"{cancelled-line}"),
                 lambda: producer.send_lines([b"{cancelled}", b"{lines}"]),
                 lambda: producer.send_block(b"{cancelled-block}\n"), producer.flush):
        with trio.move_on_after(1) as scope:
            await call()  # each one must push (a full batch, a block, a flush), and the channel is full
        assert scope.cancelled_caught
        assert producer._core.pending == [b"{queued}\n"] and producer._core.pending_bytes == 9
    for call in (lambda: producer.send_line(b"{c}"), lambda: producer.send_lines([b"{c}"]),
                 lambda: producer.send_lines([]), lambda: producer.send_block(b"{c}\n"),
                 lambda: producer.send_block(b""), producer.flush):
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before the call: a checkpoint raises at once, taking nothing
            await call()
        assert scope.cancelled_caught
        assert producer._core.pending == [b"{queued}\n"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        await producer.aclose()
    assert b"".join(recorder.chunks) == b"{first}\n{queued}\n"


async def test_every_send_is_a_cancel_point_and_a_tight_loop_lets_others_run() -> None:
    """Issue 19, case 22: a tight loop of ``send_line`` or ``send_lines``
    lets other tasks run (a schedule point at least once in SCHEDULE_EVERY
    calls, and at every push); every call is a cancel point (the test above
    cancels each one before it starts); ``send_block`` and ``flush`` are
    full checkpoints."""
    pool, send, recorder, coalescer = recorded_coalescer(capacity=1 << 20)
    ran, done = 0, False

    async def other_task() -> None:
        nonlocal ran
        while not done:
            ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        nursery.start_soon(other_task)
        async with Producer(send, batch_bytes=1 << 20) as producer:
            for call in (lambda: producer.send_line(b"{a}"), lambda: producer.send_lines([b"{b}", b"{c}"]),
                         lambda: producer.send_lines([])):
                before = ran
                for _ in range(2 * SCHEDULE_EVERY):  # (twice: the order within a scheduler batch is random)
                    await call()
                assert ran > before  # the other task ran during the loop
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await call()
                assert scope.cancelled_caught
            for call in (lambda: producer.send_block(b"{d}\n"), lambda: producer.send_block(b""),
                         lambda: producer.flush(), lambda: producer.flush()):
                with trio.testing.assert_checkpoints():
                    await call()
        done = True
    expected = b"{a}\n" * 2 * SCHEDULE_EVERY + b"{b}\n{c}\n" * 2 * SCHEDULE_EVERY + b"{d}\n"
    assert b"".join(recorder.chunks) == expected


async def test_a_push_that_fails_is_no_schedule_point() -> None:
    """A push whose send fails (the lane's channel is gone: ClosedError,
    the lines stay queued) let no other task run, so it does not restart
    the handle's count of calls since its last schedule point: the call
    that completes SCHEDULE_EVERY calls that only queue still yields."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](1)
    await receive.aclose()
    producer = Producer(send, batch_bytes=1 << 20, max_delay=1e9)  # (no schedule point for time)
    for _ in range(SCHEDULE_EVERY - 1):
        await producer.send_line(b"{a}")
    with pytest.raises(ClosedError, match="nothing was taken"):
        await producer.flush()
    assert b"".join(producer._core.pending) == b"{a}\n" * (SCHEDULE_EVERY - 1)  # (nothing was taken)
    with trio.testing.assert_checkpoints():  # (the count's SCHEDULE_EVERY-th call)
        await producer.send_line(b"{b}")


@pytest.mark.parametrize("handles", [1, 50])
def test_a_task_that_works_between_its_calls_still_gets_max_delay(tmp_path, monkeypatch, handles: int) -> None:
    """A producer task that does blocking work between its calls (0.1 s of
    it, shown by jumping the mock clock: no other task runs meanwhile),
    over one handle or round-robin over many: the writer's ticker still
    pushes every batch before its oldest line waited ``max_delay`` plus
    about one call's work.  Yielding once in SCHEDULE_EVERY calls alone
    let batches wait 6 to 12 s with ``max_delay=1``; each call now also
    checks the time since its handle's last schedule point.  (The memory
    backend writes in the trio thread: a real thread's write would take no
    mock time and the jumps would outrun it.)"""
    waits: list[float] = []
    real = Producer.send_pending_nowait

    def recorded(self: Producer) -> bool:
        wait = trio.current_time() - self.pending_since if self._core.pending else None
        pushed = real(self)
        if wait is not None and pushed:
            waits.append(wait)
        return pushed

    monkeypatch.setattr(Producer, "send_pending_nowait", recorded)
    clock = trio.testing.MockClock()
    memory = MemoryBackend()

    async def main() -> None:
        async with open_writer(str(tmp_path / "out.pfw"), max_delay=1.0, backend=memory, fs=LOCAL) as writer:
            producers = [await writer.producer().__aenter__() for _ in range(handles)]
            await trio.lowlevel.checkpoint()  # the lanes and the ticker run
            for n in range(400):
                clock.jump(0.1)  # blocking work in the producer's task
                await producers[n % handles].send_line(b'{"n":%d}' % n)
            for producer in producers:
                await producer.aclose()

    trio.run(main, clock=clock)
    assert waits and max(waits) <= 1.0 + 0.2 + 1e-9, max(waits)
    text = memory.text().decode()
    assert sorted(json.loads(line)["n"] for line in text.splitlines() if line.startswith("{")) == list(range(400))
