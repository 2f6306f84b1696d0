"""Library misuse is loud: closed and shared handles, bad lines, the caller's
own exceptions, the open_writer keywords, and buffers on error paths."""

from __future__ import annotations

import collections
import fcntl
import os
import pathlib
import threading
import time

import pytest
import trio
import trio.lowlevel

import pwriter.data.inputs
import pwriter.service.lanes
from pwriter.data.backends import open_backend
from pwriter.data.inputs import collect_inputs
from pwriter.errors import BusyError, ClosedError, DataError, InputError, UsageError
from pwriter.faces.sync import merge_sync, open_writer_sync
from pwriter.faces.testing import read_events, write_corpus
from pwriter.plan.settings import ConfigError, load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.merge import merge
from pwriter.service.writer import open_writer

from helpers import expect_failure, run_cli

LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")


async def test_send_after_the_handle_or_the_writer_closed_raises(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, settings=settings_for(), fs=LOCAL) as writer:
        async with writer.producer() as early:
            await early.send_line(b'{"a":1}')
        with pytest.raises(ClosedError, match="closed"):
            await early.send_line(b'{"a":2}')
        late = writer.producer()
        await late.send_line(b'{"a":3}')
    for call in (late.send_line(b'{"a":4}'), late.send_lines([b'{"a":5}']), late.send_block(b'{"a":6}\n'),
                 late.flush()):
        with pytest.raises(ClosedError, match="writer closed"):
            await call
    with pytest.raises(ClosedError):
        writer.producer()
    assert sorted(read_events(target)) == [b'{"a":1}', b'{"a":3}']


async def test_one_handle_used_by_two_tasks_raises_and_loses_nothing(tmp_path, settings_for) -> None:
    """Issue 13: 40,000 lines through one shared handle gave duplicates and
    losses.  Now the second task's call is refused while the first waits in
    a flush; every accepted line is written exactly once."""
    target = str(tmp_path / "out.pfw")
    accepted: list[bytes] = []
    refused = 0
    async with open_writer(target, settings=settings_for(lanes=1, stripe_size="64KiB"), fs=LOCAL) as writer:
        shared = writer.producer(batch_bytes=500)

        async def use(task: int) -> None:
            nonlocal refused
            for n in range(20_000):
                line = b'{"task":%d,"n":%d}' % (task, n)
                try:
                    await shared.send_line(line)
                except BusyError:
                    refused += 1
                    await trio.lowlevel.checkpoint()
                else:
                    accepted.append(line)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(use, 0)
            nursery.start_soon(use, 1)
        await shared.aclose()
    assert refused > 0
    assert sorted(read_events(target)) == sorted(accepted)


@pytest.mark.parametrize(("line", "error", "words"), [
    (b'{"a":1}\n{"b":2}', ValueError, "no newline except at its end"),
    (b'{"a":1}\n\n', ValueError, "no newline except at its end"),
    (b"", ValueError, "must not be empty"),
    (b"\n", ValueError, "must not be empty"),
    ('{"a":1}', TypeError, "takes bytes"),
    (17, TypeError, "takes bytes"),
    (None, TypeError, "takes bytes"),
])
async def test_bad_lines_are_refused_in_our_words(tmp_path, settings_for, line: object, error: type,
                                                  words: str) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, settings=settings_for(), fs=LOCAL) as writer:
        async with writer.producer() as producer:
            with pytest.raises(error, match=words):
                await producer.send_line(line)  # type: ignore[arg-type]
            with pytest.raises(error, match=words.replace("takes bytes", "bytes")):
                await producer.send_lines([b'{"ok":1}', line])  # type: ignore[list-item]
            await producer.send_line(b'{"ok":2}')
    assert read_events(target) == [b'{"ok":2}']  # a refused batch takes none of its lines


async def test_bytes_like_lines_are_copied_at_the_call(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    line = bytearray(b'{"a":1}')
    block = bytearray(b'{"c":3}\n{"d":4}')
    async with open_writer(target, settings=settings_for(), fs=LOCAL) as writer:
        async with writer.producer() as producer:
            await producer.send_line(line)
            await producer.send_lines([line, memoryview(b'{"b":2}')])
            await producer.send_block(block)
            line[:] = b'{"x":9}'
            block[:] = b"garbage"
    assert line == bytearray(b'{"x":9}')  # never appended to
    assert read_events(target) == [b'{"a":1}', b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}']


async def test_the_callers_exception_group_comes_out_unchanged(tmp_path, settings_for) -> None:
    mine = ExceptionGroup("mine", [ValueError("one"), KeyError("two")])
    with pytest.raises(ExceptionGroup) as raised:
        async with open_writer(str(tmp_path / "out.pfw"), settings=settings_for(), fs=LOCAL):
            raise mine
    assert raised.value is mine
    assert [type(exc) for exc in raised.value.exceptions] == [ValueError, KeyError]
    assert os.listdir(tmp_path) == []
    single = LookupError("only")
    with pytest.raises(LookupError) as raised_single:
        async with open_writer(str(tmp_path / "out.pfw"), settings=settings_for(), fs=LOCAL):
            raise single
    assert raised_single.value is single


async def test_open_writer_keywords(tmp_path, backend_name: str) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, fsync=False, compress=True, level=2, backend=None, fs=LOCAL) as writer:
        assert writer.settings.fsync is False and writer.settings.level == 2 and writer.compressed
        async with writer.producer() as producer:
            await producer.send_line(b'{"a":1}')
    assert read_events(target) == [b'{"a":1}']
    with pytest.raises(ConfigError, match="level=9"):
        async with open_writer(str(tmp_path / "x.pfw.gz"), level=9, fs=LOCAL):
            pass


def test_cli_level_out_of_range_is_exit_2(tmp_path) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=1, events_per_file=10, seed=1)
    done = run_cli("merge", *inputs, "-o", str(tmp_path / "m.pfw.gz"), "--level", "9")
    expect_failure(done, 2, "level=9", "0 to 3")
    assert not os.path.exists(tmp_path / "m.pfw.gz")


@pytest.mark.parametrize("line", [b"not json", b'{"a":}', b"[", b'  {"a":1}'])
async def test_validate_refuses_what_verify_would(tmp_path, settings_for, line: bytes) -> None:
    target = str(tmp_path / "out.pfw")
    async with open_writer(target, settings=settings_for(), fs=LOCAL, validate=True) as writer:
        async with writer.producer() as producer:
            with pytest.raises(InputError, match="a line sent to"):
                await producer.send_line(line)
            with pytest.raises(InputError):
                await producer.send_lines([b'{"fine":1}', line])
            await producer.send_line(b'{"fine":2}')
    assert read_events(target) == [b'{"fine":2}']


async def test_run_maker_after_the_writer_closed_raises(tmp_path, settings_for) -> None:
    made: list[int] = []
    async with open_writer(str(tmp_path / "out.pfw"), settings=settings_for(), fs=LOCAL) as writer:
        pass
    with pytest.raises(ClosedError, match="run_maker"):
        await writer.run_maker(lambda sink, buffer: made.append(1))
    assert made == []


@pytest.mark.parametrize("how", ["bad input", "cancelled"])
async def test_reader_buffers_go_back_to_the_pool(tmp_path, settings_for, monkeypatch: pytest.MonkeyPatch,
                                                  how: str) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=4, events_per_file=3000, seed=2)
    if how == "bad input":
        with open(inputs[3], "ab") as handle:
            handle.write(b"\x00\x01 not a trace\n")
    seen: list[tuple[int, int]] = []
    real_close = pwriter.service.lanes.BufferPool.close

    def close(pool: pwriter.service.lanes.BufferPool) -> None:
        seen.append((pool.available, pool.count))
        real_close(pool)

    monkeypatch.setattr(pwriter.service.lanes.BufferPool, "close", close)
    real_fill = pwriter.data.inputs.InputRun.fill

    def slow_fill(run: pwriter.data.inputs.InputRun, *args: object) -> object:
        time.sleep(0.02)  # (in the reader's thread) so that the merge is surely running at the cancel
        return real_fill(run, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pwriter.data.inputs.InputRun, "fill", slow_fill)
    (tmp_path / "out").mkdir()
    with trio.move_on_after(0.05 if how == "cancelled" else 60):
        with pytest.raises(DataError) if how == "bad input" else _nothing():
            await merge(inputs, str(tmp_path / "out" / "m.pfw"),
                        settings=settings_for(stripe_size="64KiB", lanes=2))
    assert seen and seen[0][0] == seen[0][1]
    assert os.listdir(tmp_path / "out") == []


class _nothing:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> bool:
        return False


async def test_io_uring_permit_is_released_when_prep_fails(tmp_path) -> None:
    from pwriter.data.backends import available_backends

    if available_backends()["io_uring"] is not None:
        pytest.skip("io_uring unavailable")
    async with open_backend("io_uring", queue_depth=4) as backend:
        entries = backend._admit.value  # type: ignore[attr-defined]

        def prep(*args: object) -> object:
            raise MemoryError("injected")

        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            backend._prep_fsync = prep  # type: ignore[attr-defined]
            for _ in range(2 * entries):
                with pytest.raises(MemoryError):
                    await backend.fsync(fd)
            assert backend._admit.value == entries  # type: ignore[attr-defined]
        finally:
            os.close(fd)


async def test_a_full_non_blocking_pipe_is_waited_for_not_spun_on(backend_name: str) -> None:
    """EAGAIN from a full O_NONBLOCK pipe: the write waits (poll, in the
    writing thread) and completes once a slow reader drains the pipe."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    payload = os.urandom(1 << 20)
    got = bytearray()

    def slow_reader() -> None:
        time.sleep(0.3)
        while len(got) < len(payload):
            got.extend(os.read(read_end, 1 << 16))

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        async with open_backend(backend_name, queue_depth=4, write_call_size=256 << 10) as backend:
            backend.register(write_end, "pipe")
            await trio.to_thread.run_sync(backend.write, write_end, [payload], -1)
            retries = backend.statistics().interrupted
    finally:
        reader.join()
        os.close(read_end)
        os.close(write_end)
    assert bytes(got) == payload
    assert retries < 200  # a hot loop would retry tens of thousands of times in 0.3 s


async def test_wrong_argument_types_are_named(tmp_path) -> None:
    with pytest.raises(TypeError, match="open_writer takes a path"):
        async with open_writer(123, fs=LOCAL):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize(("target", "options", "needle"), [
    ("-", {"layout": "sharded"}, "layout='sharded'"),
    ("-", {"layout": "padded-striped"}, "layout='padded-striped'"),
    ("-", {"direct": True}, "direct"),
    ("out.pfw.gz", {"direct": True}, "direct=True"),
    ("out.pfw", {"direct": True, "compress": True}, "direct=True"),
    ("out.pfw.gz", {"compress": False}, "compress=False"),
    ("out.pfw", {"producers": 0}, "producers=0"),
    ("out.pfw", {"producers": -2}, "producers=-2"),
    ("out.pfw", {"level": 3}, "level=3"),
    ("-", {"level": 2}, "level=2"),
])
async def test_options_that_cannot_be_honoured_are_refused(tmp_path, target: str, options: dict[str, object],
                                                           needle: str) -> None:
    """Issue 19, case 19: a stream took --layout sharded as striped, --direct with gzip output wrote
    nothing with O_DIRECT (direct_writes 0), compress=False wrote plain text under a .gz name,
    producers=0 or -2 passed, and a level given for plain output compressed nothing: each was ignored.
    Each is a ValueError now, before anything is created."""
    path = target if target == "-" else str(tmp_path / target)
    with pytest.raises(ValueError, match=needle):
        async with open_writer(path, fs=LOCAL, fsync=False, **options):  # type: ignore[arg-type]
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("target", "options", "env", "needle"), [
    ("-", ["--layout", "sharded"], {}, "layout='sharded'"),
    ("-", ["--layout", "padded-striped"], {}, "layout='padded-striped'"),
    ("m.pfw.gz", ["--direct"], {}, "direct=True"),
    ("m.pfw", ["--direct", "--compress"], {}, "direct=True"),
    ("m.pfw.gz", [], {"PWRITER_COMPRESS": "false"}, "compress=False"),
    ("m.pfw", ["--level", "3"], {}, "level=3"),
])
def test_cli_options_that_cannot_be_honoured_are_exit_2(tmp_path, target: str, options: list[str],
                                                        env: dict[str, str], needle: str) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=2, events_per_file=10, seed=1)
    output = target if target == "-" else str(tmp_path / target)
    done = run_cli("merge", *inputs, "-o", output, *options, env=env)
    expect_failure(done, 2, needle)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_every_entrance_takes_settings_the_same_way(tmp_path) -> None:
    """Issue 19, case 21: open_writer took settings only through ``settings=``, merge and merge_sync required
    it, the pytest fixture took settings as keywords.  One rule now: ``settings`` optional, any setting as a
    keyword on top, an unknown keyword a TypeError naming it."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=20, seed=3)
    expected = collections.Counter(line for path in inputs for line in read_events(path))
    base = load_settings(fsync=False, backend="threads")

    async def through_the_trio_entrances() -> None:
        result = await merge(inputs, str(tmp_path / "a.pfw"), fsync=False, layout="sharded", lanes=2)
        assert (result.writer.layout, result.writer.lanes) == ("sharded", 2)
        async with open_writer(str(tmp_path / "b.pfw"), settings=base, layout="padded-striped",
                               stripe_size="64KiB", max_delay=5) as writer:
            assert (writer.sizing.layout, writer.sizing.stripe_size, writer.settings.max_delay) == (
                "padded-striped", 64 << 10, 5)
            assert writer.settings.backend == "threads"  # the rest of the given settings stands

    trio.run(through_the_trio_entrances)
    assert collections.Counter(read_events(str(tmp_path / "a.pfw.shards"))) == expected
    result = merge_sync(inputs, str(tmp_path / "c.pfw"), settings=base, layout="striped", stripe_size="64KiB")
    assert (result.writer.layout, result.writer.stripe_size, result.writer.backend) == ("striped", 64 << 10,
                                                                                      "threads")
    assert collections.Counter(read_events(str(tmp_path / "c.pfw"))) == expected
    with open_writer_sync(str(tmp_path / "d.pfw"), fsync=False, layout="padded-striped") as sync_writer:
        assert sync_writer.statistics().layout == "padded-striped"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(TypeError, match="merge.*'stripe_sise'"):
        merge_sync(inputs, str(tmp_path / "e.pfw"), stripe_sise="64KiB")
    with pytest.raises(TypeError, match="open_writer.*'layuot'"):
        with open_writer_sync(str(tmp_path / "e.pfw"), layuot="sharded"):
            pass

    async def unknown_keywords() -> None:
        with pytest.raises(TypeError, match="merge.*'max_dealy'"):
            await merge(inputs, str(tmp_path / "e.pfw"), max_dealy=3)
        with pytest.raises(TypeError, match="open_writer.*'compres'"):
            async with open_writer(str(tmp_path / "e.pfw"), compres=True):
                pass

    trio.run(unknown_keywords)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("inputs", ["one.pfw", b"one.pfw", pathlib.Path("one.pfw"), []])
def test_inputs_are_a_list_of_paths_and_not_empty(tmp_path, inputs: object) -> None:
    """Issue 19, case 21: merge_sync("a.pfw", ...) iterated the characters of the name, and merge_sync([])
    published an empty trace.  A single path is a TypeError in our words; no inputs a UsageError, as on the
    command line."""
    (tmp_path / "one.pfw").write_bytes(b'{"a":1}\n')
    os.chdir(tmp_path)
    error, needle = (UsageError, "no inputs") if inputs == [] else (TypeError, "a list of paths")
    with pytest.raises(error, match=needle):
        merge_sync(inputs, "out.pfw", fsync=False)  # type: ignore[arg-type]
    with pytest.raises(error, match=needle):
        trio.run(lambda: merge(inputs, "out.pfw", fsync=False))  # type: ignore[arg-type]
    if inputs != []:
        with pytest.raises(TypeError, match="a list of paths"):
            collect_inputs(inputs)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="a list of paths"):
            collect_inputs([], inputs)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["one.pfw"]
