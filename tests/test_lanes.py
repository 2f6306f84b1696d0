"""Unit tests of pwriter.service.lanes: the buffer pool, a coalescer without
a disk (its flushes recorded in memory), and WriteLanes driven directly
(handles, coalescers, ticker, close).

The lanes are built as the writer builds them (a planner, a ChunkSink over a file and a
real backend, a buffer pool); the oracle is the file read
back (decompressed with the gzip module for gzip output).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading

import pytest
import trio
import trio.testing

from pwriter.data.backends import open_backend
from pwriter.data.gzip_members import gzip_member
from pwriter.data.sink import ChunkSink
from pwriter.errors import ClosedError, WriteError
from pwriter.faces.testing import MemoryBackend
from pwriter.plan.layout import GZIP_MIN_PADDING, PaddedStripedPlanner, StripedPlanner
from pwriter.service.handle import Producer
from pwriter.service.lanes import BufferPool, Coalescer, WriteLanes
from pwriter.service.writer import _leaves

from helpers import recorded_coalescer

HEADER_TEXT = b"[\n"
FOOTER_TEXT = b"]\n"
STRIPE = 4096


class FileOutput:
    """What a ChunkSink uses of an OutputSet."""

    def __init__(self, path) -> None:
        self.targets = [str(path)]
        self.fds = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)]
        self.direct_fds: list[int] = []


def line(producer: int, seq: int) -> bytes:
    """A numbered event line of ``producer``, with text that compresses poorly."""
    noise = hashlib.sha256(b"%d.%d" % (producer, seq)).hexdigest().encode()[: 20 + seq % 13]
    return b'{"producer":%d,"seq":%d,"pad":"%s"}\n' % (producer, seq, noise)


def producer_order(text: bytes) -> dict[int, list[int]]:
    order: dict[int, list[int]] = {}
    for each in text.splitlines():
        if each.startswith(b'{"producer":'):
            producer, seq = (int(part.split(b":")[1]) for part in each.split(b",")[:2])
            order.setdefault(producer, []).append(seq)
    return order


async def run_lanes(backend, output, *, compressed: bool, padded: bool, producers: int, lines: int,
                    lanes: int = 2, max_delay: float = 0.5) -> ChunkSink:
    """Write ``lines`` lines through each of ``producers`` handles, as the writer does; close."""
    header = gzip_member(HEADER_TEXT, 1) if compressed else HEADER_TEXT
    footer = gzip_member(FOOTER_TEXT, 1) if compressed else FOOTER_TEXT
    if padded:
        planner = PaddedStripedPlanner(header_length=len(header), stripe_size=STRIPE,
                                       min_padding=GZIP_MIN_PADDING if compressed else 1)
    else:
        planner = StripedPlanner(header_length=len(header), stripe_size=STRIPE)
    for fd, name in zip(output.fds, output.targets, strict=True):
        backend.register(fd, name)
    pool = BufferPool(4, STRIPE)
    async with trio.open_nursery() as nursery:
        sink = ChunkSink(planner=planner, output=output, backend=backend, header=header,
                         header_text=len(HEADER_TEXT), compressed=compressed, level=1,
                         chunk_capacity=planner.chunk_capacity, writeback=False)
        write_lanes = WriteLanes(nursery=nursery, sink=sink, pool=pool, lanes=lanes,
                                 chunk_capacity=planner.chunk_capacity, max_delay=max_delay)
        placement = sink.placer.open()
        if placement is not None:
            nursery.start_soon(trio.to_thread.run_sync, sink.write_placed, placement, b"")
        write_lanes.start()
        handles = [write_lanes.producer(512, None) for _ in range(producers)]

        async def produce(number: int) -> None:
            for seq in range(lines):
                if seq % 10 == 9:
                    await handles[number].send_lines([line(number, seq)])
                else:
                    await handles[number].send_line(line(number, seq))
            # (the last lines stay in the handle: the close pushes them)

        async with trio.open_nursery() as producing:
            for number in range(producers):
                producing.start_soon(produce, number)
        await write_lanes.close()
        with pytest.raises(ClosedError):
            await handles[0].send_line(line(0, lines))  # refused after the close, taking nothing
        await write_footer(sink, footer)
    return sink


async def write_footer(sink: ChunkSink, footer: bytes) -> None:
    """What the writer does once the lanes are closed: the pool, the footer, then the padding left to write."""
    await trio.to_thread.run_sync(sink.write_end, footer, len(FOOTER_TEXT))


@pytest.mark.parametrize("padded", [False, True], ids=["striped", "padded"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_every_line_once_in_each_handle_order(tmp_path, backend_name: str, compressed: bool,
                                                    padded: bool) -> None:
    path = tmp_path / ("out.pfw.gz" if compressed else "out.pfw")
    output = FileOutput(path)
    async with open_backend(backend_name, queue_depth=8) as backend:
        sink = await run_lanes(backend, output, compressed=compressed, padded=padded, producers=5, lines=300)
    os.close(output.fds[0])
    data = path.read_bytes()
    text = gzip.decompress(data) if compressed else data
    assert text.startswith(HEADER_TEXT)
    assert text.rstrip(b" \n").endswith(FOOTER_TEXT.rstrip())
    assert producer_order(text) == {number: list(range(300)) for number in range(5)}
    events = [each for each in text.splitlines(keepends=True) if each.startswith(b"{")]
    assert sorted(events) == sorted(line(number, seq) for number in range(5) for seq in range(300))
    if padded:
        assert len(data) // STRIPE >= 3
        for slot in range(len(data) // STRIPE):  # a whole slot is whole lines (members)
            piece = data[slot * STRIPE : (slot + 1) * STRIPE]
            piece = gzip.decompress(piece) if compressed else piece
            assert piece.endswith(b"\n")
    assert sink.counts().bytes_written == len(data)


async def test_a_line_reaches_the_sink_within_max_delay(autojump_clock: trio.testing.MockClock) -> None:
    """One line, never flushed by its handle: the ticker and the coalescer
    hand it to the sink before it has waited ``max_delay`` (trio clock)."""
    memory = MemoryBackend()
    planner = StripedPlanner(header_length=len(HEADER_TEXT), stripe_size=STRIPE)
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        output = type("Output", (), {"targets": ["out.pfw"], "fds": [fd], "direct_fds": []})()
        memory.register(fd, "out.pfw")
        pool = BufferPool(2, STRIPE)
        sent_at = written_at = None
        async with trio.open_nursery() as nursery:
            sink = ChunkSink(planner=planner, output=output, backend=memory, header=HEADER_TEXT,
                             header_text=len(HEADER_TEXT), compressed=False, level=1,
                             chunk_capacity=planner.chunk_capacity, writeback=False)
            lanes = WriteLanes(nursery=nursery, sink=sink, pool=pool, lanes=1, chunk_capacity=planner.chunk_capacity,
                               max_delay=2.0)
            header = sink.placer.open()
            assert header is not None
            nursery.start_soon(sink.call, sink.write_placed, header, b"")
            lanes.start()
            handle = lanes.producer(1 << 20, None)
            await trio.sleep(1.0)
            sent_at = trio.current_time()
            await handle.send_line(line(0, 0))
            await trio.sleep(10.0)  # the deadline passes while the handle holds its line
            written = [write for write in memory.writes if line(0, 0) in write.data]
            assert len(written) == 1
            written_at = written[0].time
            await lanes.close()
            await write_footer(sink, FOOTER_TEXT)
        assert sent_at < written_at <= sent_at + 2.0
        assert memory.text() == HEADER_TEXT + line(0, 0) + FOOTER_TEXT
    finally:
        os.close(fd)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_a_merge_starts_no_coalescer_and_no_ticker(tmp_path, settings_for, compressed: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge's readers write through the sink from their own threads:
    the library's coalescers and its max_delay ticker never run."""
    from pwriter.faces.testing import read_events, write_corpus
    from pwriter.service.merge import merge

    def refused(*args: object) -> None:
        raise AssertionError("a merge started the write lanes")

    monkeypatch.setattr(Coalescer, "run", refused)
    monkeypatch.setattr(WriteLanes, "_push_stale_batches", refused)
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=200, seed=5)
    target = str(tmp_path / ("m.pfw.gz" if compressed else "m.pfw"))
    result = await merge(inputs, target, settings=settings_for(layout="padded-striped", stripe_size="64KiB"))
    assert result.events == 600
    assert len(read_events(target)) == 600


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
    pool, send, recorder, coalescer = recorded_coalescer(capacity=100)
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


async def test_line_longer_than_a_buffer_is_written_alone() -> None:
    pool, send, recorder, coalescer = recorded_coalescer(capacity=64)
    big = b"{" + b"x" * 300 + b"}\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.run)
        async with Producer(send) as producer:
            await producer.send_block(b"{a}\n" + big + b"{b}\n")
    assert recorder.oversized == [big]
    assert b"".join(recorder.chunks) == b"{a}\n" + big + b"{b}\n"
    assert coalescer.statistics().oversized_chunks == 1


async def test_max_delay_flushes_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    pool, send, recorder, coalescer = recorded_coalescer(capacity=4000, max_delay=10.0)
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
    pool, send, recorder, coalescer = recorded_coalescer(capacity=30, buffers=2, hold=True, channel=1)
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


async def test_large_blocks_are_written_without_a_copy() -> None:
    pool, send, recorder, coalescer = recorded_coalescer(capacity=100)
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


async def test_a_lane_writer_that_fails_leaves_only_its_own_error(tmp_path) -> None:
    """The lane writer's call fails while its coalescer waits to hand it the
    next chunk: the lanes raise that error alone.  The coalescer's send
    breaks when the lane writer's channel closes, and that
    BrokenResourceError must never reach the user in place of the write
    error (the coalescer is cancelled at its channel's close).  Trials
    cover both orders of trio's run batch."""
    planner = StripedPlanner(header_length=0, stripe_size=STRIPE)

    def failing_write(*args: object) -> None:
        gate.wait(10)
        raise WriteError("out.pfw", "No space left on device", 28)

    async with open_backend("threads", queue_depth=4) as backend:
        for trial in range(16):
            output = FileOutput(tmp_path / f"out{trial}.pfw")
            backend.register(output.fds[0], output.targets[0])
            gate = threading.Event()
            sink = ChunkSink(planner=planner, output=output, backend=backend, header=b"", header_text=0,
                             compressed=False, level=1, chunk_capacity=planner.chunk_capacity,
                             writeback=False)
            sink.write_chunk = sink.write_lines = failing_write  # type: ignore[method-assign]
            with pytest.raises(BaseExceptionGroup) as raised, trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    lanes = WriteLanes(nursery=nursery, sink=sink, pool=BufferPool(4, STRIPE), lanes=1,
                                       chunk_capacity=planner.chunk_capacity, max_delay=60)
                    lanes.start()
                    handle = lanes.producer(1 << 20, None)
                    for n in range(4):  # whole chunks: one in the failing call, one queued, one waiting to be sent
                        await handle.send_block(b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * 3000))
                    await trio.testing.wait_all_tasks_blocked()
                    assert lanes._chunk_sends[0].statistics().tasks_waiting_send == 1
                    gate.set()
            os.close(output.fds[0])
            errors = [leaf for leaf in _leaves(raised.value) if not isinstance(leaf, trio.Cancelled)]
            assert [type(error) for error in errors] == [WriteError], (trial, errors)


async def test_a_write_error_that_lands_while_the_lanes_are_cancelled_is_raised(tmp_path) -> None:
    """The lane writer's call fails after the writer began cancelling the
    lanes (its block failed, as when handles got ClosedError because of
    that very failure): the write error is raised, not replaced by a
    Cancelled at the close of the lane's channel (a checkpoint in that
    cleanup masked it, and with it the cause of the whole failure)."""
    planner = StripedPlanner(header_length=0, stripe_size=STRIPE)
    output = FileOutput(tmp_path / "out.pfw")
    gate = threading.Event()

    def failing_write(*args: object) -> None:
        gate.wait(10)
        raise WriteError("out.pfw", "No space left on device", 28)

    async with open_backend("threads", queue_depth=4) as backend:
        backend.register(output.fds[0], output.targets[0])
        sink = ChunkSink(planner=planner, output=output, backend=backend, header=b"", header_text=0,
                         compressed=False, level=1, chunk_capacity=planner.chunk_capacity,
                         writeback=False)
        sink.write_chunk = sink.write_lines = failing_write  # type: ignore[method-assign]
        raised: BaseException | None = None
        try:
            with trio.CancelScope() as scope, trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    lanes = WriteLanes(nursery=nursery, sink=sink, pool=BufferPool(4, STRIPE), lanes=1,
                                       chunk_capacity=planner.chunk_capacity, max_delay=60)
                    lanes.start()
                    handle = lanes.producer(1 << 20, None)
                    await handle.send_block(b'{"n":1,"pad":"%s"}\n' % (b"x" * 3000))
                    await trio.testing.wait_all_tasks_blocked()  # the lane writer's call waits at the gate
                    scope.cancel()
                    gate.set()
        except BaseException as error:  # (the test looks at what it is)
            raised = error
    os.close(output.fds[0])
    assert raised is not None, "the write error was lost"
    assert [type(leaf) for leaf in _leaves(raised) if not isinstance(leaf, trio.Cancelled)] == [WriteError]


async def test_a_coalescer_never_ends_quietly_when_its_lane_writer_vanished() -> None:
    """A coalescer whose chunk channel broke while nothing was cancelled
    (no lane writer failure explains it) raises ClosedError: its chunks
    would be missing from the output, so the writer must not publish."""
    pool = BufferPool(2, STRIPE)
    blocks_send, blocks_receive = trio.open_memory_channel[tuple[float, bytes]](4)
    chunk_send, chunk_receive = trio.open_memory_channel[tuple[memoryview, int, float, bool]](1)

    async def flush(lane: int, buffer: memoryview, filled: int, since: float) -> None:
        await chunk_send.send((buffer, filled, since, True))

    async def write_whole(lane: int, view: memoryview, since: float) -> None:
        await chunk_send.send((view, view.nbytes, since, False))

    coalescer = Coalescer(0, blocks_receive, pool, capacity=STRIPE, max_delay=60, flush=flush,
                          write_whole=write_whole)
    chunk_receive.close()  # the lane writer is gone, and nothing is cancelled
    await blocks_send.send((0.0, b'{"pad":"%s"}\n' % (b"x" * 3000)))
    blocks_send.close()
    with pytest.raises(ClosedError, match="lane 0's writer stopped"):
        await WriteLanes._coalesce(coalescer, chunk_send)
