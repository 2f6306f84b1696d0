"""The writer service, end to end on a real disk, for every layout and backend."""

from __future__ import annotations

import collections
import errno
import gzip
import os
import re

import pytest
import trio
import trio.lowlevel
import trio.testing

from pwriter.data.backends import open_backend
from pwriter.data.output import is_temporary_name
from pwriter.errors import UsageError, WriteError
from pwriter.faces.testing import FaultBackend, MemoryBackend, read_events, read_text
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.writer import open_writer

from helpers import published

LAYOUTS = ["striped", "padded-striped", "sharded"]
LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")


def leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if is_temporary_name(name)]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_many_producers_every_line_once(tmp_path, settings_for, layout: str) -> None:
    target = str(tmp_path / "out.pfw")
    settings = settings_for(layout=layout, stripe_size="64KiB", lanes=3)
    expected: collections.Counter[bytes] = collections.Counter()
    lane_of: dict[int, int] = {}  # producer -> its lane: handles go to the lanes in turn
    async with open_writer(target, settings=settings, fs=LOCAL) as writer:

        async def produce(index: int) -> None:
            lane_of[index] = len(lane_of) % 3
            async with writer.producer(batch_bytes=1000) as producer:
                for n in range(700):
                    line = b'{"producer":%d,"n":%d,"pad":"%s"}' % (index, n, b"y" * (n % 50))
                    await producer.send_line(line)

        for index in range(12):
            expected.update(b'{"producer":%d,"n":%d,"pad":"%s"}' % (index, n, b"y" * (n % 50)) for n in range(700))
        async with trio.open_nursery() as nursery:
            for index in range(12):
                nursery.start_soon(produce, index)
        assert not os.path.exists(target)  # nothing visible before publication
    text = read_text(published(target, layout))
    assert text.startswith(b"[\n") and text.endswith(b"]\n")
    assert b"\x00" not in text
    events = read_events(published(target, layout))
    assert collections.Counter(events) == expected
    # Within one producer, order is kept.
    for index in range(12):
        mine = [e for e in events if e.startswith(b'{"producer":%d,' % index)]
        assert [int(e.split(b'"n":')[1].split(b",")[0]) for e in mine] == list(range(700))
    stats = writer.statistics()
    assert stats.published and stats.layout == layout
    assert stats.line_bytes == sum(len(line) + 1 for line in expected.elements())
    assert stats.bytes_written == sum(os.path.getsize(p) for p in writer.outputs)
    assert stats.io.bytes_written == stats.bytes_written
    assert leftovers(tmp_path) == []
    if layout == "padded-striped":  # each slot holds the lines of one lane
        data = read_text(target)
        for start in range(0, len(data), 64 << 10):
            producers = re.findall(rb'"producer":(\d+)', data[start : start + (64 << 10)])
            assert len({lane_of[int(producer)] for producer in producers}) <= 1
    if layout == "sharded":
        assert len(writer.outputs) == 3
        assert read_text(writer.outputs[0]).startswith(b"[\n")
        assert read_text(writer.outputs[-1]).endswith(b"]\n")


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_empty_output_is_header_and_footer(tmp_path, settings_for, layout: str) -> None:
    target = str(tmp_path / "empty.pfw")
    async with open_writer(target, settings=settings_for(layout=layout, lanes=2), fs=LOCAL):
        pass
    assert read_text(published(target, layout)) == b"[\n]\n"


async def test_oversized_line_in_every_layout(tmp_path, settings_for) -> None:
    for layout in LAYOUTS:
        target = str(tmp_path / f"{layout}.pfw")
        big = b'{"big":"' + b"z" * 200_000 + b'"}'
        async with open_writer(target, settings=settings_for(layout=layout, stripe_size="64KiB"), fs=LOCAL) as w:
            async with w.producer() as producer:
                await producer.send_line(b'{"small":1}')
                await producer.send_line(big)
                await producer.send_line(b'{"small":2}')
        assert read_events(published(target, layout)) == [b'{"small":1}', big, b'{"small":2}']
        assert w.statistics().oversized_chunks == 1


async def test_error_in_body_removes_temporaries_and_propagates_unwrapped(tmp_path, settings_for) -> None:
    target = tmp_path / "out.pfw"
    with pytest.raises(KeyError, match="boom"):
        async with open_writer(str(target), settings=settings_for(), fs=LOCAL) as writer:
            async with writer.producer() as producer:
                await producer.send_line(b'{"a":1}')
            raise KeyError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


async def test_cancellation_removes_temporaries(tmp_path, settings_for) -> None:
    target = tmp_path / "out.pfw"
    with trio.move_on_after(0.2) as scope:
        async with open_writer(str(target), settings=settings_for(), fs=LOCAL) as writer:
            async with writer.producer() as producer:
                while True:
                    await producer.send_line(b'{"forever":true}')
    assert scope.cancelled_caught
    assert not target.exists()
    assert os.listdir(tmp_path) == []


async def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path, settings_for) -> None:
    target = tmp_path / "out.pfw"
    target.write_bytes(b"precious\n")
    with pytest.raises(UsageError, match="exists"):
        async with open_writer(str(target), settings=settings_for(), fs=LOCAL):
            pass
    assert target.read_bytes() == b"precious\n"
    async with open_writer(str(target), settings=settings_for(), fs=LOCAL, force=True) as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"new":1}')
    assert target.read_bytes() == b'[\n{"new":1}\n]\n'


async def test_output_that_is_an_input_is_refused(tmp_path, settings_for) -> None:
    source = tmp_path / "in.pfw"
    source.write_bytes(b'{"a":1}\n')
    alias = tmp_path / "alias.pfw"
    os.link(source, alias)
    with pytest.raises(UsageError, match="is the input"):
        async with open_writer(str(alias), settings=settings_for(), fs=LOCAL, force=True, inputs=[str(source)]):
            pass
    assert source.read_bytes() == b'{"a":1}\n'


async def test_missing_output_directory(tmp_path, settings_for) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        async with open_writer(str(tmp_path / "nope" / "out.pfw"), settings=settings_for(), fs=LOCAL):
            pass


async def test_sharded_force_removes_stale_shards(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, settings=settings_for(layout="sharded", lanes=4), fs=LOCAL):
        pass
    assert len([n for n in os.listdir(tmp_path) if ".shard_" in n]) == 4
    async with open_writer(target, settings=settings_for(layout="sharded", lanes=2), fs=LOCAL, force=True) as w:
        pass
    # The new set has names of another generation than the set it replaces
    # (a reader of the old manifest never sees a new shard); the old ones are gone.
    new = ["out.g1.shard_000.pfw", "out.g1.shard_001.pfw"]
    assert sorted(n for n in os.listdir(tmp_path) if ".shard_" in n) == new
    assert read_text(target + ".shards") == b"[\n]\n"
    assert [os.path.basename(p) for p in w.outputs] == new
    async with open_writer(target, settings=settings_for(layout="sharded", lanes=3), fs=LOCAL, force=True) as w:
        pass
    again = ["out.shard_000.pfw", "out.shard_001.pfw", "out.shard_002.pfw"]
    assert sorted(n for n in os.listdir(tmp_path) if ".shard_" in n) == again
    assert [os.path.basename(p) for p in w.outputs] == again
    assert sorted(os.listdir(tmp_path)) == sorted([*again, "out.pfw.shards"])


async def test_fsync_on_close_when_enabled(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, settings=settings_for(fsync=True, layout="sharded", lanes=2), fs=LOCAL) as w:
        pass
    assert w.statistics().io.fsyncs == 2


async def test_stale_batches_are_pushed_after_max_delay(tmp_path, settings_for, autojump_clock) -> None:
    target = str(tmp_path / "out.pfw")
    memory = MemoryBackend()
    async with open_writer(target, settings=settings_for(max_delay=10.0), fs=LOCAL, backend=memory) as writer:
        producer = writer.producer()
        start = trio.current_time()
        await producer.send_line(b'{"lonely":1}')
        await trio.sleep(100)
        data_writes = [write for write in memory.writes if b"lonely" in write.data]
        assert len(data_writes) == 1
        # The ticker pushes the batch, and the coalescer flushes its buffer,
        # when the line has waited max_delay since its call (issue 19: before,
        # the two waits added up to 20 to 25 seconds).
        assert data_writes[0].time - start == 10.0
    assert memory.contents()[target] == b'[\n{"lonely":1}\n]\n'
    assert writer.statistics().deadline_flushes == 1


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, errno.EBADF])
@pytest.mark.parametrize(("on", "fail_at"), [("write", 1), ("write", 2), ("write", 5), ("fsync", 1)])
async def test_failed_operation_publishes_nothing_and_names_the_output(
    tmp_path, backend_name: str, error: int, on: str, fail_at: int
) -> None:
    target = tmp_path / "out.pfw"
    settings = load_settings(backend=backend_name, stripe_size="64KiB", fsync=True)
    async with open_backend(backend_name, queue_depth=8) as inner:
        faulty = FaultBackend(inner, fail_at=fail_at, error=error, on=on)
        with pytest.raises(WriteError) as caught:
            async with open_writer(str(target), settings=settings, fs=LOCAL, backend=faulty) as writer:
                async with writer.producer() as producer:
                    for n in range(20_000):
                        await producer.send_line(b'{"n":%d}' % n)
    assert faulty.failed
    assert str(target) in str(caught.value)
    assert os.strerror(error) in str(caught.value)
    assert caught.value.errno == error
    assert not target.exists()
    assert os.listdir(tmp_path) == []


async def test_slow_completions_still_give_a_complete_output(tmp_path, backend_name: str, autojump_clock) -> None:
    target = tmp_path / "out.pfw"
    settings = load_settings(backend=backend_name, stripe_size="64KiB", fsync=True, lanes=2)
    async with open_backend(backend_name, queue_depth=4) as inner:
        slow = FaultBackend(inner, delay=3.0)
        async with open_writer(str(target), settings=settings, fs=LOCAL, backend=slow) as writer:
            async with writer.producer() as producer:
                for n in range(5000):
                    await producer.send_line(b'{"n":%d}' % n)
    assert read_events(target) == [b'{"n":%d}' % n for n in range(5000)]


async def test_short_writes_and_eintr_under_the_whole_service(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread backend's syscall writes at most 1000 bytes at a time and
    is interrupted every third call: the service still publishes every line,
    and the backend counts what it absorbed.  (io_uring resubmits short
    writes in the kernel's completion path: tests/test_backends.py provokes
    them for real with RLIMIT_FSIZE.)"""
    real = os.pwritev
    calls = 0

    def stingy_and_interrupted(fd, buffers, offset):
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return real(fd, [memoryview(buffers[0])[:1000]], offset)

    monkeypatch.setattr(os, "pwritev", stingy_and_interrupted)
    target = tmp_path / "out.pfw"
    settings = load_settings(backend="threads", stripe_size="64KiB", fsync=True, lanes=2)
    lines = [b'{"n":%d,"pad":"%s"}' % (n, b"y" * (n % 300)) for n in range(3000)]
    async with open_writer(str(target), settings=settings, fs=LOCAL) as writer:
        async with writer.producer() as producer:
            await producer.send_lines(lines)
    assert read_events(target) == lines
    statistics = writer.statistics().io
    assert statistics.short_writes > 10 and statistics.interrupted > 10


async def test_output_that_appears_while_writing_is_never_replaced(tmp_path, settings_for) -> None:
    """Another process creates the target while we write (without --force):
    its file stays, ours is discarded, and the error says why."""
    target = tmp_path / "out.pfw"
    with pytest.raises(UsageError, match="appeared while writing"):
        async with open_writer(str(target), settings=settings_for(), fs=LOCAL) as writer:
            async with writer.producer() as producer:
                await producer.send_line(b'{"ours":1}')
            target.write_bytes(b"theirs\n")
    assert target.read_bytes() == b"theirs\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("early_writeback", [True, False])
async def test_early_writeback_with_fsync(tmp_path, settings_for, early_writeback: bool) -> None:
    """With fsync on, every written range of 256 KiB or more has its
    writeback started at once; without fsync (or when turned off), none."""
    target = str(tmp_path / "out.pfw")
    line = b'{"pad":"%s"}' % (b"x" * 1000)
    for fsync in (True, False):
        settings = settings_for(fsync=fsync, early_writeback=early_writeback, stripe_size="1MiB", lanes=1)
        async with open_writer(target, settings=settings, fs=LOCAL, force=True) as writer:
            async with writer.producer() as producer:
                await producer.send_lines([line] * 5000)
        hints = writer.statistics().writeback_hints
        assert (hints >= 4) if (fsync and early_writeback) else (hints == 0)
        assert read_events(target) == [line] * 5000


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_a_shard_that_got_nothing_holds_one_padding_line(tmp_path, settings_for, compressed: bool) -> None:
    """An empty .gz file is not a gzip file (zcat and dftracer_event_count choke on it): a lane that
    wrote nothing leaves a shard of one whitespace line (plain) or one gzip member of it."""
    import gzip

    target = str(tmp_path / ("out.pfw.gz" if compressed else "out.pfw"))
    async with open_writer(target, settings=settings_for(layout="sharded", lanes=3), fs=LOCAL) as writer:
        async with writer.producer() as producer:  # (the first handle: lane 0)
            await producer.send_line(b'{"id":1}')
    shards = writer.outputs
    with open(shards[1], "rb") as shard:
        middle = shard.read()
    assert (gzip.decompress(middle) if compressed else middle) == b"\n"
    assert read_events(published(target, "sharded")) == [b'{"id":1}']
    if compressed:
        import json

        with open(target + ".members.json") as held:
            index = json.load(held)
        assert [member["file"] for member in index["members"]] == [0, 0, 2]  # the padding member is not listed


async def send_until_closed(writer, index: int, accepted: collections.Counter[bytes], errors: list[str],
                            seed: int) -> None:
    """One producer task: every kind of call at random, each call's lines
    counted only if it returned, until the writer refuses with ClosedError."""
    import random

    from pwriter.errors import ClosedError

    rng = random.Random(seed * 100 + index)
    try:
        producer = writer.producer(batch_bytes=rng.choice([1, 300, 4000]))
    except ClosedError:
        errors.append("ClosedError")
        return
    n = 0
    async with producer:
        while True:
            kind = rng.randrange(4)
            count = 1 if kind in (0, 3) else rng.randint(1, 60)
            lines = [b'{"p":%d,"n":%d,"pad":"%s"}' % (index, k, b"z" * (k % 70)) for k in range(n, n + count)]
            n += count
            try:
                if kind == 0:
                    await producer.send_line(lines[0])
                elif kind == 1:
                    await producer.send_lines(lines)
                elif kind == 2:
                    await producer.send_block(b"\n".join(lines))
                else:  # two calls: the line is taken once send_line returns; flush takes nothing of its own
                    await producer.send_line(lines[0])
                    accepted.update(lines)
                    lines = []
                    await producer.flush()
            except ClosedError:
                errors.append("ClosedError")
                return
            except BaseException as error:
                errors.append(type(error).__name__)
                raise
            accepted.update(lines)


@pytest.mark.parametrize("layout", ["striped", "sharded"])
async def test_producers_outside_the_writers_block_while_it_closes(tmp_path, settings_for, layout: str) -> None:
    """Issue 19, case 4: producer tasks in an outer nursery go on sending
    while the writer's block ends.  The close publishes (never BusyError):
    a call already waiting is let finish, any later one raises ClosedError
    (never a raw trio.BrokenResourceError), and the output holds exactly the
    lines of the calls that returned."""
    for seed in range(15):
        target = str(tmp_path / f"out{seed}.pfw")
        accepted: collections.Counter[bytes] = collections.Counter()
        errors: list[str] = []
        settings = settings_for(layout=layout, lanes=2, stripe_size="64KiB")
        async with trio.open_nursery() as outer:
            async with open_writer(target, settings=settings, fs=LOCAL) as writer:
                for index in range(6):
                    outer.start_soon(send_until_closed, writer, index, accepted, errors, seed)
                for _ in range(seed * 7):
                    await trio.lowlevel.checkpoint()
        assert set(errors) == {"ClosedError"}
        assert writer.statistics().published
        assert collections.Counter(read_events(published(target, layout))) == accepted


async def test_retrying_a_cancelled_send_writes_each_line_once(tmp_path, settings_for) -> None:
    """Issue 19, case 5: the trio reflex, retrying a call that was cancelled,
    writes every line exactly once (before, a cancelled ``send_lines`` had
    queued its lines, so the retry wrote them twice)."""
    target = str(tmp_path / "out.pfw")
    expected: collections.Counter[bytes] = collections.Counter()
    cancelled = 0
    async with open_writer(target, settings=settings_for(lanes=2, stripe_size="64KiB"), fs=LOCAL) as writer:

        async def produce(index: int) -> None:
            nonlocal cancelled
            async with writer.producer(batch_bytes=2000) as producer:
                for n in range(0, 3000, 30):
                    lines = [b'{"p":%d,"n":%d,"pad":"%s"}' % (index, k, b"q" * (k % 40)) for k in range(n, n + 30)]
                    for attempt in range(2):
                        with trio.CancelScope() as scope:
                            if attempt == 0 and n % 60 == 0:
                                scope.cancel()  # this attempt is cancelled: retried below
                            if n % 90 == 0:
                                for one in lines:
                                    await producer.send_line(one)
                                    expected[one] += 1  # (each send_line is a call of its own)
                                lines = []
                            else:
                                await producer.send_lines(lines)
                                expected.update(lines)
                        if not scope.cancelled_caught:
                            break
                        cancelled += 1

        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(produce, index)
    assert cancelled > 0
    assert collections.Counter(read_events(target)) == expected


@pytest.mark.parametrize("layout, compress", [("striped", False), ("sharded", False), ("padded-striped", False),
                                              ("striped", True), ("padded-striped", True)])
async def test_no_line_waits_longer_than_max_delay(tmp_path, layout: str, compress: bool, autojump_clock) -> None:
    """Issue 19, case 22: ``max_delay`` bounds the wait of a line from its
    call to the write of its chunk (trio clock); before, the ticker's
    half-delay tick and the coalescer's own deadline made it up to twice
    that.  Lines arrive at random moments through handles of random batch
    sizes; each line's chunk is written at most ``max_delay`` after the call
    that queued it.  Padded gzip members, held until they fill their lane's
    slot, are bound the same way (they were once written ``max_delay`` after
    the member stage got their text, up to twice ``max_delay`` after the call)."""
    import random

    delay = 10.0
    memory = MemoryBackend()
    sent_at: dict[bytes, float] = {}
    settings = load_settings(layout=layout, lanes=2, stripe_size="64KiB", fsync=False, max_delay=delay)
    target = str(tmp_path / ("out.pfw.gz" if compress else "out.pfw"))
    async with open_writer(target, settings=settings, fs=LOCAL, backend=memory) as writer:

        async def produce(index: int) -> None:
            rng = random.Random(index)
            async with writer.producer(batch_bytes=rng.choice([100, 1000, 1 << 20])) as producer:
                for n in range(60):
                    line = b'{"p":%d,"n":%d}' % (index, n)
                    sent_at[line] = trio.current_time()
                    await producer.send_line(line)
                    await trio.sleep(rng.choice([0.0, 0.1, 1.0, 3.0, 7.0, 11.0]))

        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(produce, index)
        await trio.sleep(100)  # (the last lines' deadlines pass before the close)
    waits = []
    for write in memory.writes:
        text = gzip.decompress(write.data) if compress else write.data
        for line in text.split(b"\n"):
            if line in sent_at:
                waits.append(write.time - sent_at.pop(line))
    assert not sent_at  # every line was written
    assert max(waits) <= delay + 1e-9
    assert writer.statistics().deadline_flushes > 0
