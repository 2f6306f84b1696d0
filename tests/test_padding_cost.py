"""What padding costs (issue 21): a padded-striped output is about the size
of a striped one.  Gzip members are sized by what they compress to, so a
lane fills its slot and only the tail is padding; a lane keeps its slot
across deadline flushes; the merge's readers pool their last, partial
slots, and the file's last slot is not padded."""

from __future__ import annotations

import gzip
import json
import pathlib
import re

import pytest
import trio
from test_field_readers import event_count, split

from pwriter.faces.testing import MemoryBackend, read_events
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.writer import open_writer

from helpers import fake_ranks, run_cli

MiB = 1 << 20
LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Eight DFTracer ranks, as in the issue: 26.5 MB of text, 2.2 MB gzipped."""
    directory = tmp_path_factory.mktemp("ranks")
    fake_ranks(directory, ranks=8, epochs=4, steps=200)
    return directory


def merged_size(ranks: pathlib.Path, out: pathlib.Path, layout: str, stripe: str, backend: str) -> int:
    done = run_cli("merge", "-d", str(ranks), "-o", str(out), "--layout", layout, "--stripe-size", stripe,
                   "--backend", backend, "--no-fsync", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["layout"] == layout
    return out.stat().st_size


@pytest.mark.parametrize("stripe", ["1MiB", "4MiB"])
@pytest.mark.parametrize("suffix, bound", [(".pfw", 1.05), (".pfw.gz", 1.15)])
def test_padded_merge_costs_about_what_striped_does(ranks: pathlib.Path, tmp_path: pathlib.Path, backend_name: str,
                                                    stripe: str, suffix: str, bound: float) -> None:
    striped = merged_size(ranks, tmp_path / f"striped{suffix}", "striped", stripe, backend_name)
    padded_out = tmp_path / "padded" / f"merged{suffix}"
    padded_out.parent.mkdir()
    padded = merged_size(ranks, padded_out, "padded-striped", stripe, backend_name)
    assert padded <= striped * bound, f"padded {padded} against striped {striped}: {padded / striped:.2f}x"
    assert sorted(read_events(str(padded_out))) == sorted(read_events(str(tmp_path / f"striped{suffix}")))
    if suffix == ".pfw.gz":
        # The member index stays exact: every member decompresses alone to its text.
        data = padded_out.read_bytes()
        text = gzip.decompress(data)
        index = json.loads(pathlib.Path(str(padded_out) + ".members.json").read_text())
        for member in index["members"]:
            alone = gzip.decompress(data[member["offset"] : member["offset"] + member["length"]])
            assert text[member["text_offset"] : member["text_offset"] + member["text_length"]] == alone
        assert sum(member["events"] for member in index["members"]) == text.count(b"\n{")


@pytest.mark.parametrize("stripe", ["1MiB", "4MiB"])
def test_padded_gzip_merge_is_read_whole_by_the_field_tools(ranks: pathlib.Path, tmp_path: pathlib.Path,
                                                           stripe: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = run_cli("merge", "-d", str(ranks), "-o", str(out / "merged.pfw.gz"), "--layout", "padded-striped",
                   "--stripe-size", stripe, "--no-fsync")
    assert done.returncode == 0, done.stderr
    (out / "merged.pfw.gz.members.json").unlink()  # the tools read *.pfw.gz only
    events = event_count(ranks)
    assert event_count(out) == events
    split_out = tmp_path / "split"
    assert split(out, split_out) == split(ranks, tmp_path / "reference")  # split read every event of it
    assert event_count(split_out) == events


async def trickle(target: str, backend: object, *, seconds: float = 8.0, producers: int = 8,
                  lanes: int = 4) -> tuple[int, int, int, dict[int, int]]:
    """``producers`` tasks each sending one small event (``"pid"``: the
    task's number) every 0.1 s for ``seconds`` (trio clock), max_delay
    0.25, padded-striped, 1 MiB stripes.  Returns (bytes written, bytes of
    text sent, deadline flushes, the lane of each pid)."""
    settings = load_settings(layout="padded-striped", stripe_size="1MiB", max_delay=0.25, lanes=lanes,
                             fsync=False, backend="threads")
    text = 0
    lane_of_pid: dict[int, int] = {}  # handles go to the lanes in turn
    async with open_writer(target, settings=settings, fs=LOCAL, backend=backend) as writer:  # type: ignore[arg-type]

        async def produce(index: int) -> None:
            nonlocal text
            lane_of_pid[index] = len(lane_of_pid) % lanes
            async with writer.producer() as producer:
                for n in range(int(seconds * 10)):
                    line = b'{"id":%d,"name":"read","cat":"POSIX","pid":%d,"ts":%d}' % (n, index, n * 100000)
                    await producer.send_line(line)
                    text += len(line) + 1
                    await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            for index in range(producers):
                nursery.start_soon(produce, index)
    stats = writer.statistics()
    return stats.bytes_written, text, stats.deadline_flushes, lane_of_pid


@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
async def test_a_trickling_writer_pads_each_slot_once(tmp_path: pathlib.Path, autojump_clock: object,
                                                      settings_for: object, backend_name: str, suffix: str) -> None:
    """Deadline flushes write into the lane's slot, without padding: a
    writer trickling events for 8 s writes at most its text plus (lanes + 2)
    stripes, however many deadline flushes it made."""
    from pwriter.data.backends import open_backend

    target = str(tmp_path / f"trickle{suffix}")
    async with open_backend(backend_name, queue_depth=8) as backend:
        written, text, flushes, _ = await trickle(target, backend)
    assert flushes >= 20  # (many deadline flushes; how many depends on the threads the clock waits for)
    print(f"{written} bytes for {text} bytes of text, {flushes} deadline flushes")
    assert written <= text + (4 + 2) * MiB
    assert written == pathlib.Path(target).stat().st_size
    events = read_events(target)
    assert len(events) == 8 * 80 and len(set(events)) == len(events)


@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
async def test_no_slot_is_written_by_two_lanes(tmp_path: pathlib.Path, autojump_clock: object, suffix: str) -> None:
    """Record every write of a trickling writer: a slot holds the lines of
    one lane only (handles go to the lanes in turn; the pid says whose line
    it is), and every slot but the file's last ends in padding."""
    memory = MemoryBackend()
    target = str(tmp_path / f"trickle{suffix}")
    *_, lane_of_pid = await trickle(target, memory, seconds=3.0)
    writers_of_slot: dict[int, set[int]] = {}
    for write in memory.writes:
        text = gzip.decompress(write.data) if suffix == ".pfw.gz" else write.data
        pids = {int(pid) for pid in re.findall(rb'"pid":(\d+)', text)}
        first, last = write.offset // MiB, (write.offset + len(write.data) - 1) // MiB
        assert first == last or not pids, "a write of lines stays inside one slot"
        writers_of_slot.setdefault(first, set()).update(lane_of_pid[pid] for pid in pids)
    assert all(len(lanes) <= 1 for lanes in writers_of_slot.values()), writers_of_slot
    assert len([slot for slot, lanes in writers_of_slot.items() if lanes]) == 4  # one slot per lane
    data = memory.contents()[target]
    # Every slot before the last ends in padding: spaces and a newline, or a
    # gzip member of "\n" (its trailer: the CRC of "\n", then its length, 1).
    padding_end = (0x32D70693).to_bytes(4, "little") + (1).to_bytes(4, "little") if suffix == ".pfw.gz" else b"  \n"
    for slot in range(len(data) // MiB):
        assert data[: (slot + 1) * MiB].endswith(padding_end)
    text = gzip.decompress(data) if suffix == ".pfw.gz" else data
    assert len([line for line in text.split(b"\n") if line.startswith(b"{")]) == 8 * 30


async def test_a_deadline_flush_costs_no_padding(tmp_path: pathlib.Path, autojump_clock: object,
                                                 settings_for: object, backend_name: str) -> None:
    """Plain output, one lane: a few lines go at their deadline into the
    lane's slot; the full buffers that follow fill the rest of that slot
    first (cut at a line end), so no slot is left part empty."""
    settings = settings_for(layout="padded-striped", stripe_size="1MiB", max_delay=0.25, lanes=1)  # type: ignore[operator]
    target = tmp_path / "bursts.pfw"
    text = 0
    async with open_writer(str(target), settings=settings, fs=LOCAL) as writer:
        async with writer.producer() as producer:
            for burst in range(4):
                await producer.send_line(b'{"burst":%d}' % burst)
                await trio.sleep(1)  # the line is written at its deadline
                lines = [b'{"burst":%d,"n":%d,"pad":"%s"}' % (burst, n, b"z" * (n % 200)) for n in range(12000)]
                await producer.send_lines(lines)
                text += len(b'{"burst":%d}\n' % burst) + sum(len(line) + 1 for line in lines)
    stats = writer.statistics()
    assert stats.deadline_flushes >= 4
    assert stats.bytes_written <= text + 64 * 1024, f"{stats.bytes_written - text} bytes of padding"
    events = read_events(str(target))
    assert len(events) == 4 * 12001 and [event for event in events if event.count(b",") == 0] == [
        b'{"burst":%d}' % burst for burst in range(4)]
