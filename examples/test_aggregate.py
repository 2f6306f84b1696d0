"""Tests of the aggregation pipeline, written as a user of pwriter writes
them: with the fixtures of pwriter's pytest plugin (``pwriter_open_writer``,
``pwriter_memory_backend``, ``pwriter_fault_backend``, ``pwriter_fake_fs``)
and trio's virtual clock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from aggregate import Progress, aggregate, file_lines, rank_name, tag

from pwriter.errors import WriteError
from pwriter.faces.testing import assert_same_events, read_events, write_corpus


def expected_lines(paths: list[str], drop: tuple[str, ...] = ()) -> list[bytes]:
    lines = []
    for path in paths:
        for line in read_events(path):
            tagged = tag(line, rank_name(path), drop)
            if tagged is not None:
                lines.append(tagged)
    return lines


@pytest.mark.trio
async def test_every_event_arrives_once_tagged_with_its_rank(pwriter_open_writer, tmp_path) -> None:
    paths = write_corpus(str(tmp_path / "traces"), files=6, events_per_file=400)
    reports: list[Progress] = []
    async with pwriter_open_writer("all.pfw", producers=6) as writer:
        progress = await aggregate({rank_name(p): file_lines(p) for p in paths}, writer,
                                   report=lambda elapsed, progress, stats: reports.append(progress))
    assert (progress.ranks_done, progress.events_in, progress.events_out) == (6, 2400, 2400)
    assert_same_events(tmp_path / "all.pfw", expected_lines(paths))
    assert reports[-1].events_out == 2400
    # The lines of one rank keep their order.
    merged = read_events(tmp_path / "all.pfw")
    rank_3 = [line for line in merged if b'"rank":"rank_3"' in line]
    assert rank_3 == expected_lines([paths[3]])


@pytest.mark.trio
async def test_dropped_categories_are_counted_in_not_out(pwriter_open_writer, tmp_path) -> None:
    paths = write_corpus(str(tmp_path / "traces"), files=3, events_per_file=300)
    async with pwriter_open_writer(layout="sharded", lanes=2) as writer:
        progress = await aggregate({rank_name(p): file_lines(p) for p in paths}, writer, drop_categories=("APP",),
                                   report=lambda *_: None)
    wanted = expected_lines(paths, drop=("APP",))
    assert progress.events_in == 900 and progress.events_out == len(wanted) < 900
    assert_same_events(str(tmp_path / "out.pfw.shards"), wanted)


async def slow_rank(rank: int, events: int, every: float) -> AsyncIterator[bytes]:
    for n in range(events):
        await trio.sleep(every)
        yield b'{"id":%d,"name":"step","cat":"APP","pid":%d}' % (n, rank)


@pytest.mark.trio
async def test_progress_is_reported_on_the_trio_clock(pwriter_open_writer, pwriter_memory_backend,
                                                      autojump_clock) -> None:
    """Four ranks that take 30 s (virtual) each, reports every 10 s and a
    writer that flushes after 5 s: the test runs at once."""
    reports: list[tuple[float, int]] = []
    async with pwriter_open_writer(backend=pwriter_memory_backend, max_delay=5) as writer:
        await aggregate({f"r{rank}": slow_rank(rank, 30, 1.0) for rank in range(4)}, writer, report_every=10,
                        report=lambda elapsed, progress, stats: reports.append((elapsed, progress.events_out)))
        # Events flow out while the ranks still run: the writer's deadline flushes.
        assert writer.statistics().deadline_flushes >= 1
    assert [elapsed for elapsed, _ in reports[:3]] == [10, 20, 30][: len(reports[:3])]
    assert reports[-1] == (30, 120)
    assert len(pwriter_memory_backend.events()) == 120
    assert all(json.loads(line)["args"]["rank"].startswith("r") for line in pwriter_memory_backend.events())


@pytest.mark.trio
@pytest.mark.pwriter_fault(fail_at=2, error=errno.ENOSPC, on="write")
async def test_a_full_disk_stops_the_pipeline_and_publishes_nothing(pwriter_open_writer, pwriter_fault_backend,
                                                                    tmp_path) -> None:
    with pytest.raises(WriteError) as raised:
        async with pwriter_open_writer("all.pfw", backend=pwriter_fault_backend, stripe_size="64KiB") as writer:
            await aggregate({f"r{rank}": slow_rank(rank, 5000, 0) for rank in range(4)}, writer,
                            report=lambda *_: None)
    assert raised.value.errno == errno.ENOSPC and "all.pfw" in str(raised.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.trio
async def test_on_lustre_the_output_is_padded_and_still_reads_back(pwriter_fake_fs, pwriter_open_writer,
                                                                   tmp_path) -> None:
    pwriter_fake_fs("lustre", stripe_size="64KiB", stripe_count=4)
    paths = write_corpus(str(tmp_path / "traces"), files=4, events_per_file=1000)
    async with pwriter_open_writer("all.pfw") as writer:
        assert writer.sizing.layout == "padded-striped" and writer.sizing.stripe_size == 64 << 10
        await aggregate({rank_name(p): file_lines(p) for p in paths}, writer, report=lambda *_: None)
    assert_same_events(tmp_path / "all.pfw", expected_lines(paths))


def test_the_command_line(tmp_path) -> None:
    paths = write_corpus(str(tmp_path / "traces"), files=5, events_per_file=200)
    script = os.path.join(os.path.dirname(__file__), "aggregate.py")
    out = tmp_path / "all.pfw"
    done = subprocess.run([sys.executable, script, str(out), *paths, "--every", "0.05"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"1000 events from 5 ranks in {out}"
    assert "5/5 ranks done" in done.stderr.splitlines()[-1]
    assert_same_events(out, expected_lines(paths))
    again = subprocess.run([sys.executable, script, str(out), *paths], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("aggregate: error: ") and "exists" in again.stderr
