"""Faults of the data plane (pwriter.data.sink and the lanes that call it in
threads), on the real backends and real files: write errors in a lane
writer's thread, cancellation, deadlines, streams and empty writers.  The
oracle is the file read back (or its absence, with the error raised)."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Awaitable

import pytest
import trio

from pwriter.data.backends import open_backend
from pwriter.errors import ClosedError, WriteError, other_errors
from pwriter.faces.testing import FaultBackend, read_events
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.handle import Producer
from pwriter.service.writer import error_to_raise, open_writer

LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")


def event(producer: int, n: int) -> bytes:
    return b'{"id":%d,"p":%d,"pad":"%s"}' % (n, producer, b"z" * (n % 300))


async def test_the_ticker_keeps_lines_when_the_lanes_are_gone() -> None:
    """A lane's coalescer gone (its writer failed): the ticker's push keeps
    the handle's lines queued and raises nothing (it crashed the writer
    with a raw BrokenResourceError, raised in place of the write error)."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](1)
    producer = Producer(send)
    await producer.send_line(b'{"id":1}')
    await receive.aclose()
    assert producer.send_pending_nowait() is False
    assert producer.pending_since < float("inf")  # still queued


async def raised_by(call: Awaitable[object]) -> BaseException | None:
    """What ``call`` raised (None if nothing), within a time limit (a hang fails)."""
    try:
        with trio.fail_after(30):
            await call
    except trio.TooSlowError:
        raise
    except BaseException as exc:  # (the test looks at what it is)
        return exc
    return None


async def write_through(target, settings, backend, producers: int, lines: int = 5000) -> None:
    """Send ``lines`` lines from each of ``producers`` tasks in the writer's block."""
    async with open_writer(str(target), settings=settings, fs=LOCAL, backend=backend) as writer:

        async def produce(index: int) -> None:
            async with writer.producer() as producer:
                for n in range(lines):
                    await producer.send_line(event(index, n))

        async with trio.open_nursery() as nursery:
            for index in range(producers):
                nursery.start_soon(produce, index)


@pytest.mark.parametrize("layout", ["striped", "padded-striped", "sharded"])
@pytest.mark.parametrize("producers", [1, 4])
async def test_a_write_error_in_a_lane_thread_is_raised_under_deadlines(tmp_path, settings_for, layout: str,
                                                                        producers: int) -> None:
    """A write that fails in a lane writer's thread while the ``max_delay``
    ticker runs and producers send (one task, or a nursery of them): the
    WriteError is what the block raises (not a BrokenResourceError of the
    ticker, not the body's group of Cancelled), nothing is published, no
    temporary is left."""
    settings = settings_for(layout=layout, stripe_size="64KiB", max_delay=0.001, lanes=4)
    for trial in range(3):
        target = tmp_path / f"out{trial}.pfw"
        async with open_backend(settings.backend, queue_depth=8) as inner:
            faulty = FaultBackend(inner, fail_at=2 + trial, on="write", error="ENOSPC")
            raised = await raised_by(write_through(target, settings, faulty, producers))
        assert faulty.failed
        assert isinstance(raised, WriteError), repr(raised)
        assert "No space left on device" in str(raised)
        assert os.listdir(tmp_path) == []


def test_the_error_raised_is_the_cause_not_its_consequences() -> None:
    """A handle's ClosedError (the lanes stopped under it) and a body's group
    of Cancelled are what a write error does: the write error is raised,
    the ClosedError kept on it; a body's own error is still raised as it is."""
    failed = WriteError("out.pfw", "No space left on device", 28)
    closed = ClosedError("a send on a producer handle whose writer closed while it waited")
    assert error_to_raise(BaseExceptionGroup("writer", [closed, ExceptionGroup("lanes", [failed])])) is failed
    assert other_errors(failed) == (closed,)
    cancelled = trio.Cancelled._create(source="nursery")
    body = BaseExceptionGroup("body", [cancelled, ExceptionGroup("producers", [ClosedError("x")])])
    failed = WriteError("out.pfw", "No space left on device", 28)
    assert error_to_raise(BaseExceptionGroup("writer", [body, failed]), body) is failed
    own = ValueError("the body's own")
    body = BaseExceptionGroup("body", [cancelled, own])
    assert error_to_raise(BaseExceptionGroup("writer", [body, failed]), body) is body


class SteadyBuffers:
    """A backend around a real one that checks that the bytes of every write
    stay as they were while the write is under way (a pool buffer given
    back to the pool while a thread writes it would be refilled)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.inline, self.mechanism = inner.name, False, inner.mechanism
        self.changed = 0

    def register(self, fd: int, name: str) -> None:
        self.inner.register(fd, name)

    def unregister(self, fd: int) -> None:
        self.inner.unregister(fd)

    def write(self, fd: int, buffers, offset: int) -> None:
        before = [bytes(buffer) for buffer in buffers]
        time.sleep(0.0005)  # (a window for a coalescer to refill a buffer given back too early)
        self.inner.write(fd, buffers, offset)
        self.changed += [bytes(buffer) for buffer in buffers] != before

    async def fsync(self, fd: int) -> None:
        await self.inner.fsync(fd)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self):
        return self.inner.statistics()


@pytest.mark.parametrize("layout", ["striped", "padded-striped"])
@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
async def test_cancelling_the_block_while_lane_threads_write(tmp_path, settings_for, layout: str,
                                                            suffix: str) -> None:
    """The writer's block cancelled at several moments while lane writers
    write in threads (short ``max_delay``: deadline flushes too): the
    cancellation is caught by its scope, nothing is published or left, no
    buffer changes under a write; a block that was not cancelled in time
    published every line once."""
    settings = settings_for(layout=layout, stripe_size="64KiB", max_delay=0.001, lanes=3)
    for trial, after in enumerate((0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 10.0)):
        target = tmp_path / f"out{trial}{suffix}"
        async with open_backend(settings.backend, queue_depth=8) as inner:
            steady = SteadyBuffers(inner)
            with trio.move_on_after(after) as scope:
                await write_through(target, settings, steady, producers=4, lines=2000)
        assert steady.changed == 0
        if scope.cancelled_caught:
            assert not [name for name in os.listdir(tmp_path) if name.startswith(f"out{trial}")]
        else:
            assert collections.Counter(read_events(target)) == collections.Counter(
                event(index, n) for index in range(4) for n in range(2000))


@pytest.mark.parametrize("stream", [False, True])
async def test_the_writer_does_not_wait_for_trios_default_thread_limiter(tmp_path, settings_for, stream: bool) -> None:
    """The header and the end are written in a thread of the writer's own:
    with every token of trio's default limiter held elsewhere (an
    application's own blocking calls), a writer still opens, writes and
    closes (a stream's writes wait at its gate behind the header). Before,
    they took a token of the default limiter and waited for it."""
    default = trio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(default.total_tokens))]
    read: list[bytes] = []
    if stream:
        read_end, write_end = os.pipe()
        target: object = os.fdopen(write_end, "wb")

        def read_all() -> None:
            with os.fdopen(read_end, "rb") as pipe:
                read.append(pipe.read())

        reader = threading.Thread(target=read_all)
        reader.start()
    else:
        target = str(tmp_path / "out.pfw")
    for holder in holders:
        default.acquire_on_behalf_of_nowait(holder)
    try:
        with trio.fail_after(20):
            async with open_writer(target, settings=settings_for(wrap="array")) as writer:
                async with writer.producer() as producer:
                    await producer.send_lines([event(0, n) for n in range(1000)])
    finally:
        for holder in holders:
            default.release_on_behalf_of(holder)
        if stream:
            target.close()  # type: ignore[attr-defined]
            reader.join()
    lines = (read[0] if stream else (tmp_path / "out.pfw").read_bytes()).splitlines()
    assert lines[0] == b"[" and lines[-1] == b"]"
    assert sorted(line for line in lines[1:-1] if line.strip()) == sorted(event(0, n) for n in range(1000))
