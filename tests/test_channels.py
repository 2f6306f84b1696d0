"""Producers and coalescers, without a disk: flushes are recorded in memory."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pwriter.service.channels import SCHEDULE_EVERY, BufferPool, Coalescer, Producer


class Recorder:
    """Plays the writer: records each flushed chunk and gives buffers back."""

    def __init__(self, pool: BufferPool, hold: bool = False) -> None:
        self.pool = pool
        self.chunks: list[bytes] = []
        self.oversized: list[bytes] = []
        self.flush_times: list[float] = []
        self.held: list[memoryview] = []
        self.hold = hold

    async def flush(self, lane: int, buffer: memoryview, filled: int, since: float) -> None:
        self.chunks.append(bytes(buffer[:filled]))
        self.flush_times.append(trio.current_time())
        if self.hold:
            self.held.append(buffer)
        else:
            self.pool.give_back(buffer)

    async def write_whole(self, lane: int, view: memoryview, since: float) -> None:
        self.oversized.append(bytes(view))
        self.chunks.append(bytes(view))

    def release(self) -> None:
        while self.held:
            self.pool.give_back(self.held.pop())


def make(capacity: int = 100, buffers: int = 4, max_delay: float = 1.0, hold: bool = False, channel: int = 8):
    pool = BufferPool(buffers, max(capacity, 4096))
    send, receive = trio.open_memory_channel[bytes](channel)
    recorder = Recorder(pool, hold=hold)
    coalescer = Coalescer(0, receive, pool, capacity=capacity, max_delay=max_delay, flush=recorder.flush,
                          write_whole=recorder.write_whole)
    return pool, send, recorder, coalescer


def test_pool_buffers_are_page_aligned_and_disjoint() -> None:
    import ctypes

    pool = BufferPool(3, 8192)

    async def take_all() -> list[memoryview]:
        return [await pool.take() for _ in range(3)]

    buffers = trio.run(take_all)
    addresses = sorted(ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in buffers)
    assert all(address % 4096 == 0 for address in addresses)
    assert [b - a for a, b in zip(addresses, addresses[1:], strict=False)] == [8192, 8192]
    for buffer in buffers:
        pool.give_back(buffer)
    pool.close()


async def test_pool_reuses_the_last_buffer_given_back_and_serves_waiters_in_order() -> None:
    pool = BufferPool(3, 4096)
    first, second, third = [await pool.take() for _ in range(3)]
    assert pool.available == 0
    pool.give_back(first)
    pool.give_back(second)
    assert await pool.take() is second  # the one given back last: still warm in the caches
    assert await pool.take() is first
    served: list[str] = []

    async def wait_for_one(name: str) -> None:
        buffer = await pool.take()
        served.append(name)
        pool.give_back(buffer)

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(wait_for_one, name)
            await trio.testing.wait_all_tasks_blocked()
        assert served == [] and pool.waits == 3
        pool.give_back(first)
    assert served == ["a", "b", "c"]
    pool.give_back(second)
    pool.give_back(third)
    assert pool.available == 3
    pool.close()


async def test_chunks_hold_whole_lines_and_everything_arrives() -> None:
    pool, send, recorder, coalescer = make(capacity=100)
    lines = [f'{{"id":{i},"pad":"{"x" * (i % 37)}"}}\n'.encode() for i in range(200)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send, batch_bytes=150) as producer:
            for line in lines:
                await producer.send_line(line)
    joined = b"".join(recorder.chunks)
    assert joined == b"".join(lines)  # one producer: order kept
    for chunk in recorder.chunks:
        assert chunk.endswith(b"\n") and len(chunk) <= 100
    stats = coalescer.statistics()
    assert stats.chunks == len(recorder.chunks) and stats.bytes == len(joined)


async def test_missing_newlines_are_added_never_glued() -> None:
    pool, send, recorder, coalescer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            await producer.send_line(b"{1}")
            await producer.send_lines([b"{2}", b"{3}\n", b"{4}"])
            await producer.send_block(b"{5}\n{6}")
            await producer.send_line(b"{7}\n")
    assert b"".join(recorder.chunks) == b"{1}\n{2}\n{3}\n{4}\n{5}\n{6}\n{7}\n"


async def test_line_longer_than_a_buffer_is_written_alone() -> None:
    pool, send, recorder, coalescer = make(capacity=64)
    big = b"{" + b"x" * 300 + b"}\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            await producer.send_block(b"{a}\n" + big + b"{b}\n")
    assert recorder.oversized == [big]
    assert b"".join(recorder.chunks) == b"{a}\n" + big + b"{b}\n"
    assert coalescer.statistics().oversized_chunks == 1


async def test_max_delay_flushes_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    pool, send, recorder, coalescer = make(capacity=4000, max_delay=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            start = trio.current_time()
            await producer.send_block(b"{early}\n")
            await trio.sleep(60)
            assert recorder.chunks == [b"{early}\n"]
            assert recorder.flush_times[0] - start == pytest.approx(10.0)
    assert coalescer.statistics().deadline_flushes == 1


async def test_backpressure_when_the_pool_is_empty() -> None:
    pool, send, recorder, coalescer = make(capacity=30, buffers=2, hold=True, channel=1)
    blocks = [b"{%03d....}\n" % i for i in range(20)]  # 10 bytes: three per buffer
    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)

        async def produce() -> None:
            nonlocal sent
            async with Producer(send) as producer:
                for block in blocks:
                    await producer.send_block(block)
                    sent += 1

        nursery.start_soon(produce)
        await trio.testing.wait_all_tasks_blocked()
        # Two buffers flushed and held; the coalescer waits for a third; the
        # channel (1 block) is full; the producer waits.
        assert len(recorder.chunks) == 2
        assert sent < 20
        stalled = sent
        await trio.testing.wait_all_tasks_blocked()
        assert sent == stalled
        while sent < 20 or b"".join(recorder.chunks) != b"".join(blocks):
            recorder.release()
            await trio.testing.wait_all_tasks_blocked()
    recorder.release()
    assert b"".join(recorder.chunks) == b"".join(blocks)
    assert all(len(chunk) <= 30 for chunk in recorder.chunks)
    assert pool.waits > 0


async def test_cancelled_send_loses_nothing_already_accepted() -> None:
    pool, send, recorder, coalescer = make(capacity=4000, channel=1)
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


async def test_large_blocks_are_written_without_a_copy() -> None:
    pool, send, recorder, coalescer = make(capacity=100)
    half = b"{" + b"h" * 58 + b"}\n"  # 61 bytes: at least half a buffer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            await producer.send_block(b"{s}\n")
            await producer.send_block(half)
            await producer.send_block(b"{t}\n")
    assert recorder.chunks == [b"{s}\n", half, b"{t}\n"]  # order kept: the small one is flushed first
    assert recorder.oversized == [half]
    assert coalescer.statistics().uncopied_chunks == 1


async def test_a_cancelled_send_takes_nothing_whichever_the_method(autojump_clock: trio.testing.MockClock) -> None:
    """Issue 19, case 5: a cancelled ``send_line``, ``send_lines`` or
    ``send_block`` takes nothing, as trio's own sends (before, the first two
    had queued their lines all the same); the handle's queue is as it was
    before the call, and a cancelled flush keeps what earlier calls queued."""
    pool, send, recorder, coalescer = make(capacity=4000, channel=1)
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
    pool, send, recorder, coalescer = make(capacity=1 << 20)
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
