"""The sync API: the same correctness as the trio API (every line once, per
handle order, nothing published on error) from threads and from asyncio."""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from pwriter.data.output import is_temporary_name
from pwriter.errors import BusyError, ClosedError, InputError, OutputExistsError, WriteError
from pwriter.faces.sync import merge_sync, open_writer_sync
from pwriter.faces.testing import FaultBackend, MemoryBackend, event_counter, read_events, write_corpus

from helpers import published

LAYOUTS = ["striped", "padded-striped", "sharded"]


def line(worker: int, n: int) -> bytes:
    return b'{"worker":%d,"n":%d,"pad":"%s"}' % (worker, n, b"x" * (n % 50))


def run_threads(target: Callable[[int], None], count: int) -> None:
    """``target(0)``, ..., ``target(count - 1)`` in threads of their own, all joined."""
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_each_worker_in_order(events: list[bytes], threads: int, count: int) -> None:
    assert len(events) == threads * count
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for event in events:
        worker = int(event.split(b'"worker":')[1].split(b",")[0])
        seen[worker].append(int(event.split(b'"n":')[1].split(b",")[0]))
    assert {worker: numbers for worker, numbers in seen.items()} == {w: list(range(count)) for w in range(threads)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_four_threads_every_line_once_in_order(tmp_path, settings_for, layout: str) -> None:
    target = str(tmp_path / "out.pfw.gz") if layout == "padded-striped" else str(tmp_path / "out.pfw")
    settings = settings_for(layout=layout, lanes=2, stripe_size="64KiB")
    with open_writer_sync(target, settings=settings) as writer:
        def work(worker: int) -> None:
            with writer.producer(batch_bytes=3000) as producer:
                for n in range(0, 5000, 50):
                    if n % 100:
                        producer.send_lines([line(worker, k) for k in range(n, n + 50)])
                    else:
                        for k in range(n, n + 50):
                            producer.send_line(line(worker, k))

        run_threads(work, 4)
    assert writer.statistics().published
    assert_each_worker_in_order(read_events(published(target, layout)), 4, 5000)


def test_from_asyncio_and_a_pool(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")

    async def main() -> None:
        with open_writer_sync(target, settings=settings_for(lanes=2)) as writer:
            async def worker(index: int) -> None:
                producer = writer.producer(batch_bytes=2000)
                for n in range(0, 2000, 100):
                    await asyncio.to_thread(producer.send_lines, [line(index, k) for k in range(n, n + 100)])
                await asyncio.to_thread(producer.close)

            await asyncio.gather(*(worker(index) for index in range(4)))

    asyncio.run(main())
    assert_each_worker_in_order(read_events(target), 4, 2000)

    pooled = str(tmp_path / "pool.pfw")
    with open_writer_sync(pooled, settings=settings_for()) as writer, ThreadPoolExecutor(4) as pool:
        def work(index: int) -> None:
            with writer.producer() as producer:
                producer.send_lines(line(index, n) for n in range(1000))

        list(pool.map(work, range(8)))
    assert_each_worker_in_order(read_events(pooled), 8, 1000)


def test_an_exception_in_the_block_publishes_nothing(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    mine = ExceptionGroup("mine", [KeyError("a"), ValueError("b")])
    with pytest.raises(ExceptionGroup) as raised:
        with open_writer_sync(target, settings=settings_for()) as writer:
            with writer.producer() as producer:
                producer.send_lines([line(0, n) for n in range(10_000)])
            raise mine
    assert raised.value is mine
    assert os.listdir(tmp_path) == []
    with pytest.raises(ClosedError):
        producer.send_line(line(0, 1))


def test_one_handle_shared_by_two_threads_is_refused_and_loses_nothing(tmp_path, settings_for) -> None:
    target = str(tmp_path / "out.pfw")
    accepted: list[bytes] = []
    refused = [0]
    lock = threading.Lock()
    with open_writer_sync(target, settings=settings_for(lanes=1)) as writer:
        shared = writer.producer(batch_bytes=300)

        def hammer(worker: int) -> None:
            for n in range(20_000):
                try:
                    shared.send_line(line(worker, n))
                except BusyError:
                    with lock:
                        refused[0] += 1
                else:
                    with lock:
                        accepted.append(line(worker, n))

        run_threads(hammer, 2)
        shared._enter("send_line")  # a call in progress in another thread is refused, deterministically
        with pytest.raises(BusyError, match="another thread"):
            shared.send_line(line(9, 9))
        shared._leave()
    assert refused[0] > 0
    assert collections.Counter(read_events(target)) == collections.Counter(accepted)


def test_errors_reach_the_callers_thread_with_the_trio_types(tmp_path, settings_for) -> None:
    (tmp_path / "exists.pfw").write_bytes(b"[\n]\n")
    with pytest.raises(OutputExistsError, match="force=True"):
        with open_writer_sync(str(tmp_path / "exists.pfw"), settings=settings_for()):
            pass
    with open_writer_sync(str(tmp_path / "v.pfw"), settings=settings_for(), validate=True) as writer:
        with writer.producer() as producer:
            with pytest.raises(InputError):
                producer.send_line(b"not json")
            with pytest.raises(ValueError):
                producer.send_line(b'{"a":1}\n{"b":2}')
            producer.send_line(b'{"a":1}')
    assert read_events(str(tmp_path / "v.pfw")) == [b'{"a":1}']
    failing = FaultBackend(MemoryBackend(), fail_at=2, error=errno.ENOSPC)
    with pytest.raises(WriteError, match="No space left on device"):
        with open_writer_sync(str(tmp_path / "full.pfw"), settings=settings_for(stripe_size="64KiB"),
                              backend=failing) as writer:
            with writer.producer() as producer:
                for n in range(100_000):
                    producer.send_line(line(0, n))
    assert not os.path.exists(tmp_path / "full.pfw")
    assert not [name for name in os.listdir(tmp_path) if is_temporary_name(name)]


def test_merge_sync(tmp_path, settings_for) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=4, events_per_file=500, seed=1)
    result = merge_sync(inputs, str(tmp_path / "m.pfw"), settings=settings_for())
    assert result.events == 2000
    assert event_counter([str(tmp_path / "m.pfw")]) == event_counter(inputs)
    (tmp_path / "bad.pfw").write_bytes(b"\x00\x01\x02 binary\n")
    with pytest.raises(InputError, match="bad.pfw"):
        merge_sync([*inputs, str(tmp_path / "bad.pfw")], str(tmp_path / "m2.pfw"), settings=settings_for())
    assert not os.path.exists(tmp_path / "m2.pfw")


class Ledger:
    """What the producers' calls did, kept from several threads: the lines of
    every call that returned, and the kinds of error the others raised."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: collections.Counter[bytes] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def returned(self, lines: list[bytes]) -> None:
        with self.lock:
            self.accepted.update(lines)

    def raised(self, error: BaseException) -> None:
        with self.lock:
            self.errors[type(error).__name__] += 1


def send_until_closed(writer, worker: int, ledger: Ledger, seed: int) -> None:
    """Send with every call of a handle, at random, until the writer refuses:
    only ClosedError may end it."""
    import random

    rng = random.Random(seed * 1000 + worker)
    try:
        producer = writer.producer(batch_bytes=rng.choice([1, 300, 4000]))
    except ClosedError as error:
        ledger.raised(error)
        return
    n = 0
    while True:
        kind = rng.randrange(4)
        count = 1 if kind in (0, 3) else rng.randint(1, 60)
        lines = [line(worker, k) for k in range(n, n + count)]
        n += count
        try:
            if kind == 0:
                producer.send_line(lines[0])
            elif kind == 1:
                producer.send_lines(lines)
            elif kind == 2:
                producer.send_block(b"\n".join(lines))
            else:  # two calls: the line is taken once send_line returns; flush takes nothing of its own
                producer.send_line(lines[0])
                ledger.returned(lines)
                lines = []
                producer.flush()
        except ClosedError as error:
            ledger.raised(error)
            break
        ledger.returned(lines)
    producer.close()  # (after the writer closed: nothing to do, no error)


@pytest.mark.parametrize("layout", ["striped", "sharded"])
def test_leaving_the_block_while_threads_send_keeps_every_returned_call(tmp_path, settings_for,
                                                                         layout: str) -> None:
    """Issue 19, case 3: the block ends while other threads send on their own
    handles.  Every call that returned is in the output exactly once, every
    call that raised (ClosedError, nothing else) has none of its lines, and
    the close publishes (it never raises BusyError)."""
    for seed in range(12):
        target = str(tmp_path / f"out{seed}.pfw")
        ledger = Ledger()
        threads = []
        with open_writer_sync(target, settings=settings_for(layout=layout, lanes=2, stripe_size="64KiB")) as writer:
            for worker in range(4):
                thread = threading.Thread(target=send_until_closed, args=(writer, worker, ledger, seed))
                thread.start()
                threads.append(thread)
            while sum(ledger.accepted.values()) < 200 * (seed % 4 + 1):
                time.sleep(0.001)
        for thread in threads:
            thread.join()
        assert set(ledger.errors) == {"ClosedError"}
        assert writer.statistics().published
        assert collections.Counter(read_events(published(target, layout))) == ledger.accepted


def test_a_pool_that_outlives_the_writer_gets_closed_errors_and_loses_nothing(tmp_path, settings_for) -> None:
    """Issue 19, case 3: a ThreadPoolExecutor whose ``with`` encloses the
    writer's: its threads go on after the writer closed, and get
    ClosedError (never trio.RunFinishedError); the output holds exactly the
    lines of the calls that returned."""
    for seed in range(10):
        target = str(tmp_path / f"out{seed}.pfw")
        ledger = Ledger()
        with ThreadPoolExecutor(4) as pool:
            with open_writer_sync(target, settings=settings_for(lanes=2, stripe_size="64KiB")) as writer:
                futures = [pool.submit(send_until_closed, writer, worker, ledger, seed) for worker in range(8)]
                while sum(ledger.accepted.values()) < 100 * (seed % 3 + 1):
                    time.sleep(0.001)
            for future in futures:
                future.result()  # no worker raised anything but the ClosedError it recorded
        assert set(ledger.errors) == {"ClosedError"}
        assert writer.statistics().published
        assert collections.Counter(read_events(target)) == ledger.accepted


CTRL_C_DURING_A_SEND = r"""
import faulthandler, os, signal, sys, threading, time
faulthandler.dump_traceback_later(30, exit=True)  # a hang shows where every thread waits
from pwriter.plan.settings import load_settings
from pwriter.faces.sync import open_writer_sync
from pwriter.faces.testing import FaultBackend, MemoryBackend

directory = sys.argv[1]
stuck = FaultBackend(MemoryBackend(), delay=3600)  # no write ever completes: sends wait for room
sent = [0]

def press_ctrl_c() -> None:
    last = -1
    while sent[0] != last:  # until the main thread's send has waited a while
        last = sent[0]
        time.sleep(0.3)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

try:
    with open_writer_sync(os.path.join(directory, "out.pfw"), backend=stuck,
                          settings=load_settings(fsync=False, stripe_size="64KiB", lanes=1)) as writer:
        threading.Thread(target=press_ctrl_c, daemon=True).start()
        with writer.producer() as producer:
            while True:
                producer.send_lines([b'{"n":%d}' % n for n in range(1000)])
                sent[0] += 1
except KeyboardInterrupt:
    print("interrupted after", sent[0], "sends:", sorted(os.listdir(directory)))
"""


def test_ctrl_c_during_a_send_ends_promptly_and_publishes_nothing(tmp_path) -> None:
    """Issue 19, case 15: Ctrl-C while the main thread waits in a send (the
    disk is stuck) raises KeyboardInterrupt there at once; the writer
    publishes nothing and removes its temporaries.  Before, the call waited
    60 seconds for the service's thread to end."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CTRL_C_DURING_A_SEND, str(tmp_path)], capture_output=True,
                          text=True, timeout=40, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("interrupted after ") and done.stdout.strip().endswith("sends: []"), done.stdout


def test_a_call_interrupted_by_ctrl_c_then_caught_publishes_nothing(tmp_path, settings_for,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, case 15: Ctrl-C that lands while a call waits for the
    service leaves unknown whether the call took its lines (the service may
    finish it).  If the program catches the KeyboardInterrupt and leaves the
    block normally, the close raises and publishes nothing (never an output
    with the lines of a call that raised), and later calls raise ClosedError."""
    import trio

    from pwriter.errors import PwriterError

    real_run = trio.from_thread.run

    def run_then_interrupt(function, *args, **kwargs):
        real_run(function, *args, **kwargs)  # the service took the block ...
        raise KeyboardInterrupt  # ... but Ctrl-C reached the caller first

    target = tmp_path / "out.pfw"
    with pytest.raises(PwriterError, match="interrupted"):
        with open_writer_sync(str(target), settings=settings_for()) as writer:
            with writer.producer() as producer:
                producer.send_line(line(0, 0))
                monkeypatch.setattr(trio.from_thread, "run", run_then_interrupt)
                with pytest.raises(KeyboardInterrupt):
                    producer.flush()
                monkeypatch.setattr(trio.from_thread, "run", real_run)
                with pytest.raises(ClosedError, match="Ctrl-C"):
                    producer.send_line(line(0, 1))
    assert os.listdir(tmp_path) == []
