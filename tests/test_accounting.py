"""One oracle at every entrance (issue 19).

Whatever the entrance (trio handles, sync handles from threads, asyncio
through the sync API, the command line, MPI ranks) and whatever happens
around the calls (flushes, handle closes, the writer's close racing sends,
cancellations, exceptions, signals):

* a call that returned normally has its lines in the output exactly once;
* a call that raised (``Cancelled`` and ``ClosedError`` included) has none;
* a close either publishes exactly the accepted lines, or raises and
  publishes nothing (no output name, no temporary, no lock is left).

The ledger below is the oracle: it is filled only by the test, from what
each call did (returned or raised), never from pwriter's own counters.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwriter.errors import ClosedError
from pwriter.faces.sync import open_writer_sync
from pwriter.faces.testing import MemoryBackend, event_counter, read_events, write_corpus
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.plan.traceformat import BlockCleaner
from pwriter.service.writer import open_writer

from helpers import BIN

LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")
LAYOUTS = ["striped", "padded-striped", "sharded"]


class Ledger:
    """What calls returned: the lines the output must hold (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: collections.Counter[bytes] = collections.Counter()
        self.raised = 0

    def returned(self, lines: list[bytes]) -> None:
        with self._lock:
            self.accepted.update(line.rstrip(b"\n") for line in lines)

    def refused(self) -> None:
        with self._lock:
            self.raised += 1


def make_line(entrance: str, producer: int, n: int, size: int) -> bytes:
    head = b'{"e":"%s","p":%d,"n":%d,"x":"' % (entrance.encode(), producer, n)
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def events_of_bytes(text: bytes, name: str) -> list[bytes]:
    cleaner = BlockCleaner(name)
    cleaned = cleaner.feed(text) + cleaner.finish()
    return cleaned.split(b"\n")[:-1] if cleaned else []


def published_events(target: str) -> collections.Counter[bytes] | None:
    """The output's event lines, or None when nothing is published under
    ``target`` (its directory then holds nothing of it at all)."""
    manifest = target + ".shards"
    if os.path.exists(manifest):
        return collections.Counter(read_events(manifest))
    if os.path.exists(target):
        return collections.Counter(read_events(target))
    return None


def assert_nothing_left(directory: str, why: object = "") -> None:
    left = os.listdir(directory)
    assert left == [], f"nothing was published, yet {left} is left {why}"


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    """The exit code and stderr of ``process``, which must end within a minute."""
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("a process did not end: it hangs")
    return process.returncode, err


def check_outcome(target: str, ledger: Ledger, close_raised: BaseException | None) -> None:
    """The close published exactly the accepted lines, or raised and published nothing."""
    got = published_events(target)
    if close_raised is not None:
        assert got is None, f"the close raised {close_raised!r} but published {sum(got.values())} lines"
        assert_nothing_left(os.path.dirname(target))
        return
    assert got is not None, "the close returned but nothing is published"
    missing, extra = ledger.accepted - got, got - ledger.accepted
    assert not missing and not extra, (
        f"{sum(missing.values())} accepted lines missing (e.g. {list(missing)[:2]}), "
        f"{sum(extra.values())} extra (e.g. {list(extra)[:2]})")


# -- trio handles -------------------------------------------------------------

trio_ops = st.lists(
    st.tuples(
        st.sampled_from(["line", "lines", "block", "flush", "sleep", "close"]),
        st.integers(1, 40),  # lines in the call, or a pause in hundredths of max_delay
        st.sampled_from([None, None, None, "now", "soon"]),  # cancel the call: before it runs, or while it waits
    ),
    min_size=1, max_size=30,
)


@dataclass
class TrioPlan:
    producers: list[list[tuple[str, int, str | None]]]
    layout: str
    lanes: int
    max_delay: float
    batch_bytes: int
    size: int
    close_after: float | None  # the writer's block ends this long after the start, racing the sends
    body_raises: bool
    compress: bool
    trials_left: list[int] = field(default_factory=list)


async def trio_producer(writer: object, index: int, ops: list[tuple[str, int, str | None]], ledger: Ledger,
                        plan: TrioPlan) -> None:
    try:
        handle = writer.producer(batch_bytes=plan.batch_bytes)  # type: ignore[attr-defined]
    except ClosedError:
        ledger.refused()
        return
    n = 0
    for what, count, cancel in ops:
        if what == "sleep":
            await trio.sleep(plan.max_delay * count / 100)
            continue
        lines = [make_line("trio", index, n + k, plan.size) for k in range(count if what in ("lines", "block") else 1)]
        n += len(lines)
        returned = False
        try:
            with trio.CancelScope() as scope:
                if cancel == "now":
                    scope.cancel()
                elif cancel == "soon":
                    scope.deadline = trio.current_time() + plan.max_delay / 7
                if what == "line":
                    await handle.send_line(lines[0])
                elif what == "lines":
                    await handle.send_lines(lines)
                elif what == "block":
                    await handle.send_block(b"".join(line + b"\n" for line in lines))
                elif what == "flush":
                    await handle.flush()
                    lines = []
                else:
                    await handle.aclose()
                    lines = []
                returned = True
        except ClosedError:
            ledger.refused()
            return
        if returned:
            ledger.returned(lines)
        else:
            ledger.refused()
        if what == "close" and returned:
            return


def run_trio_plan(plan: TrioPlan, directory: str, backend: object | None, *, clock: bool = True) -> None:
    ledger = Ledger()
    suffix = ".pfw.gz" if plan.compress else ".pfw"
    target = os.path.join(directory, "out" + suffix)

    class BodyError(Exception):
        pass

    close_raised: list[BaseException] = []

    async def main() -> None:
        settings_ = load_settings(layout=plan.layout, lanes=plan.lanes, stripe_size="64KiB", fsync=False,
                                  max_delay=plan.max_delay,
                                  **({"backend": backend} if isinstance(backend, str) else {}))
        opened = open_writer(target, settings=settings_, fs=LOCAL, producers=len(plan.producers),
                             **({} if backend is None or isinstance(backend, str) else {"backend": backend}))
        async with trio.open_nursery() as outer:  # the producers live outside the writer's block: they race its close
            try:
                async with opened as writer:
                    for index, ops in enumerate(plan.producers):
                        outer.start_soon(trio_producer, writer, index, ops, ledger, plan)
                    if plan.close_after is not None:
                        await trio.sleep(plan.close_after)
                    elif clock:
                        await trio.testing.wait_all_tasks_blocked()
                    else:
                        await trio.sleep(0.05)
                    if plan.body_raises:
                        raise BodyError
            except BodyError as exc:
                close_raised.append(exc)

    if clock:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    else:
        trio.run(main)
    if isinstance(backend, MemoryBackend):
        # The memory backend leaves the published files empty: the oracle reads its writes.
        if close_raised:
            assert not os.path.exists(target) and not os.path.exists(target + ".shards"), "published, yet raised"
            return
        got = collections.Counter()
        for name, data in backend.contents().items():
            got.update(events_of_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data, name))
        assert got == ledger.accepted, (sum((ledger.accepted - got).values()), sum((got - ledger.accepted).values()))
        return
    check_outcome(target, ledger, close_raised[0] if close_raised else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(producers=st.lists(trio_ops, min_size=1, max_size=6), layout=st.sampled_from(LAYOUTS),
       lanes=st.integers(1, 3), max_delay=st.sampled_from([0.01, 0.5]),
       batch_bytes=st.sampled_from([1, 300, 65536]), size=st.integers(20, 3000),
       close_after=st.one_of(st.none(), st.floats(0, 0.3)), body_raises=st.booleans(), compress=st.booleans())
def test_trio_handles_every_returned_call_once(producers: list[list[tuple[str, int, str | None]]], layout: str,
                                               lanes: int, max_delay: float, batch_bytes: int, size: int,
                                               close_after: float | None, body_raises: bool, compress: bool,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    plan = TrioPlan(producers, layout, lanes, max_delay, batch_bytes, size, close_after, body_raises and
                    close_after is None, compress)
    run_trio_plan(plan, str(tmp_path_factory.mktemp("trio")), MemoryBackend())


@pytest.mark.parametrize("seed", range(6))
def test_trio_handles_on_real_files(tmp_path, backend_name: str, seed: int) -> None:
    """The same oracle with a real backend and real files (seeded plans, the real clock)."""
    rng = random.Random(seed)
    producers = [[(rng.choice(["line", "lines", "block", "flush", "sleep", "close"]), rng.randint(1, 40),
                   rng.choice([None, None, "now", "soon"])) for _ in range(rng.randint(5, 40))]
                 for _ in range(rng.randint(2, 6))]
    plan = TrioPlan(producers, LAYOUTS[seed % 3], rng.randint(1, 3), 0.02, rng.choice([1, 300, 65536]),
                    rng.randint(20, 2000), rng.choice([None, 0.0, 0.005, 0.02]), False, seed % 2 == 1)
    run_trio_plan(plan, str(tmp_path), backend_name, clock=False)


# -- sync handles from threads, and asyncio through them -----------------------

def sync_thread(writer: object, index: int, ledger: Ledger, rng: random.Random, size: int, calls: int) -> None:
    """Random calls on a handle of its own until done or refused; records what returned."""
    try:
        handle = writer.producer(batch_bytes=rng.choice([1, 500, 65536]))  # type: ignore[attr-defined]
    except ClosedError:
        ledger.refused()
        return
    n = 0
    for _ in range(calls):
        what = rng.choice(["line", "lines", "lines", "block", "flush", "close"])
        count = rng.randint(1, 60) if what in ("lines", "block") else 1
        lines = [make_line("sync", index, n + k, size) for k in range(count)]
        n += count
        try:
            if what == "line":
                handle.send_line(lines[0])
            elif what == "lines":
                handle.send_lines(lines)
            elif what == "block":
                handle.send_block(b"".join(line + b"\n" for line in lines))
            elif what == "flush":
                handle.flush()
                lines = []
            else:
                handle.close()
                ledger.returned([])
                return
        except ClosedError:
            ledger.refused()
            return
        ledger.returned(lines)
        if rng.random() < 0.05:
            time.sleep(0.001)


@pytest.mark.parametrize("seed", range(12))
def test_sync_threads_racing_the_close(tmp_path, settings_for, seed: int) -> None:
    """Threads keep sending on their own handles while the main thread leaves
    ``with``: what returned is in the output once, what raised ClosedError is
    not, and nothing else is raised."""
    rng = random.Random(seed)
    ledger = Ledger()
    target = str(tmp_path / ("out.pfw.gz" if seed % 4 == 3 else "out.pfw"))
    errors: list[BaseException] = []

    def guarded(index: int, writer: object) -> None:
        try:
            sync_thread(writer, index, ledger, random.Random(seed * 100 + index), rng.randint(20, 500), 200)
        except BaseException as exc:  # anything but ClosedError is a failure of the entrance
            errors.append(exc)

    threads: list[threading.Thread] = []
    with open_writer_sync(target, settings=settings_for(layout=LAYOUTS[seed % 3], lanes=2,
                                                         stripe_size="64KiB")) as writer:
        for index in range(rng.randint(2, 6)):
            thread = threading.Thread(target=guarded, args=(index, writer))
            thread.start()
            threads.append(thread)
        time.sleep(rng.choice([0, 0.001, 0.005, 0.02]))
    for thread in threads:
        thread.join()
    assert not errors, errors
    check_outcome(target, ledger, None)


@pytest.mark.parametrize("seed", range(6))
def test_sync_pool_enclosing_the_writer(tmp_path, settings_for, seed: int) -> None:
    """A ThreadPoolExecutor whose ``with`` encloses the writer's: the writer
    closes while the pool's tasks still send."""
    rng = random.Random(seed)
    ledger = Ledger()
    target = str(tmp_path / "out.pfw")
    with ThreadPoolExecutor(4) as pool:
        with open_writer_sync(target, settings=settings_for(layout=LAYOUTS[seed % 3], lanes=2,
                                                             stripe_size="64KiB")) as writer:
            futures = [pool.submit(sync_thread, writer, index, ledger, random.Random(seed * 10 + index),
                                   rng.randint(20, 400), 100) for index in range(8)]
            time.sleep(rng.choice([0, 0.002, 0.01]))
    for future in futures:
        future.result()  # no raw trio error reaches a thread
    check_outcome(target, ledger, None)


@pytest.mark.parametrize("seed", range(4))
def test_sync_block_that_raises_publishes_nothing(tmp_path, settings_for, seed: int) -> None:
    ledger = Ledger()
    target = str(tmp_path / "out.pfw")
    with pytest.raises(KeyError):
        with open_writer_sync(target, settings=settings_for(layout=LAYOUTS[seed % 3])) as writer:
            threads = [threading.Thread(target=sync_thread, args=(writer, index, ledger, random.Random(index),
                                                                  100, 50)) for index in range(3)]
            for thread in threads:
                thread.start()
            time.sleep(0.002 * seed)
            raise KeyError("the caller's own error")
    for thread in threads:
        thread.join()
    check_outcome(target, ledger, KeyError())


@pytest.mark.parametrize("seed", range(4))
def test_asyncio_through_the_sync_api(tmp_path, settings_for, seed: int) -> None:
    """asyncio tasks calling the sync handles through ``asyncio.to_thread``,
    some of them cancelled; the ledger records the sync calls that returned."""
    ledger = Ledger()
    target = str(tmp_path / "out.pfw")
    rng = random.Random(seed)

    async def main() -> None:
        with open_writer_sync(target, settings=settings_for(layout=LAYOUTS[seed % 3], lanes=2)) as writer:
            async def task(index: int) -> None:
                handle = writer.producer(batch_bytes=rng.choice([1, 4000]))
                for n in range(0, 400, 20):
                    lines = [make_line("asyncio", index, k, 120) for k in range(n, n + 20)]

                    def call(lines: list[bytes] = lines) -> None:
                        handle.send_lines(lines)
                        ledger.returned(lines)

                    await asyncio.to_thread(call)
                await asyncio.to_thread(handle.close)

            tasks = [asyncio.create_task(task(index)) for index in range(5)]
            await asyncio.sleep(0.001 * seed)
            tasks[0].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(result is None or isinstance(result, asyncio.CancelledError) for result in results), results
            # (a cancelled task's thread call may still be running: give it its own end)
            await asyncio.sleep(0.05)

    asyncio.run(main())
    check_outcome(target, ledger, None)


SYNC_CTRL_C = """
import sys, threading
from pwriter.faces.sync import open_writer_sync
from pwriter.plan.settings import load_settings
target = sys.argv[1]
with open_writer_sync(target, settings=load_settings(fsync=False, backend=sys.argv[2])) as writer:
    def work(index):
        with writer.producer() as producer:
            n = 0
            while True:
                producer.send_lines([b'{"t":%d,"n":%d}' % (index, n + k) for k in range(100)])
                n += 100
    for index in range(3):
        threading.Thread(target=work, args=(index,), daemon=True).start()
    print("ready", flush=True)
    work(3)  # the main thread sends too: Ctrl-C lands in a send
"""


def test_sync_program_interrupted_by_ctrl_c_publishes_nothing_and_ends(tmp_path, backend_name: str) -> None:
    target = str(tmp_path / "out" / "t.pfw")
    os.mkdir(tmp_path / "out")
    with subprocess.Popen([sys.executable, "-c", SYNC_CTRL_C, target, backend_name], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        code, err = finish(process)
    assert code != 0
    assert "KeyboardInterrupt" in err
    assert_nothing_left(str(tmp_path / "out"))


# -- the command line -----------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two directories of traces (plain and gzip, array and NDJSON) with different events."""
    base = tmp_path_factory.mktemp("corpus")
    first = write_corpus(str(base / "a"), files=12, events_per_file=400, seed=11)
    second = write_corpus(str(base / "b"), files=9, events_per_file=300, seed=12)
    return os.path.dirname(first[0]), os.path.dirname(second[0])


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("seed", range(8))
def test_cli_merge_signalled_at_random_moments(tmp_path, corpus: tuple[str, str], backend_name: str,
                                               seed: int) -> None:
    """A merge interrupted at a random moment (or not at all): exit 0 with
    exactly the inputs' events, or 130/143 with nothing left."""
    rng = random.Random(seed)
    first, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    name = "m.pfw.gz" if seed % 2 else "m.pfw"
    target = str(out / name)
    process = cli("-d", first, "-o", target, "--layout", LAYOUTS[seed % 3], "--backend", backend_name,
                  "--no-fsync", "--stripe-size", "64KiB")
    how = rng.choice([None, signal.SIGINT, signal.SIGTERM])
    if how is not None:
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(how)
    code, err = finish(process)
    if code == 0:
        assert published_events(target) == event_counter(os.path.join(first, f) for f in os.listdir(first)), err
    else:
        # (a signal that lands before Python's start-up is done ends the process by default: -signal)
        assert how is not None and code in ({signal.SIGINT: 130, signal.SIGTERM: 143}[how], -how), (code, err)
        assert_nothing_left(str(out), (code, err))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_forced_merges_onto_one_output(tmp_path, corpus: tuple[str, str], layout: str) -> None:
    """Two ``--force`` merges of different inputs onto one name at once: the
    published set is exactly one run's events, never a mix, and a run that
    did not publish says so (exit 2)."""
    first, second = corpus
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "m.pfw.gz")
    for _ in range(3):
        runs = [cli("-d", directory, "-o", target, "--force", "--layout", layout, "--no-fsync",
                    "--stripe-size", "64KiB") for directory in (first, second)]
        codes = [finish(run) for run in runs]
        assert {code for code, _ in codes} <= {0, 2}, codes
        assert any(code == 0 for code, _ in codes), codes
        got = published_events(target)
        wanted = [event_counter(os.path.join(d, f) for f in os.listdir(d)) for d in (first, second)]
        assert got in wanted, "the output mixes two runs"
        assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)


# -- MPI ranks ----------------------------------------------------------------------

MPIEXEC = os.path.join(BIN, "mpiexec")


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec is not installed (pip install 'pwriter[mpi]')")
@pytest.mark.parametrize("seed", range(3))
def test_mpi_ranks_signalled_or_not(tmp_path, corpus: tuple[str, str], seed: int) -> None:
    """Two ranks into one output: exit 0 with exactly the inputs' events, or
    a failure with nothing left (or, when the launcher itself was signalled
    after the ranks published, the whole output)."""
    rng = random.Random(seed)
    first, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / ("m.pfw.gz" if seed % 2 else "m.pfw"))
    process = subprocess.Popen([MPIEXEC, "-n", "2", os.path.join(BIN, "pwriter"), "merge", "-d", first, "-o",
                                target, "--layout", LAYOUTS[seed % 3], "--no-fsync", "--stripe-size", "64KiB"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    signalled = seed == 2
    if signalled:
        time.sleep(rng.uniform(0.3, 0.8))
        os.killpg(process.pid, signal.SIGTERM)
    code, err = finish(process)
    expected = event_counter(os.path.join(first, f) for f in os.listdir(first))
    if code == 0:
        assert published_events(target) == expected, err
        return
    assert signalled, (code, err)
    # The launcher, signalled itself, exits with a code of its own (MPICH's: 15, or the ranks' 143) even
    # when the ranks had published: the output is then whole; else nothing is left.
    if published_events(target) is not None:
        assert published_events(target) == expected
        assert not [name for name in os.listdir(out) if name.startswith(".")], os.listdir(out)
    else:
        assert_nothing_left(str(out))
