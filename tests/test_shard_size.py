"""``--shard-size`` (issue 22, point 4): a sharded set whose lanes start a new
shard once theirs holds SIZE bytes of event lines; every shard a complete
trace, read alone; the manifest in an order that keeps every input's lines
in order; verify, the member index, MPI and ``--force`` over any number of shards."""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import shutil
import subprocess

import pytest
import trio

from pwriter.data.output import read_shard_set
from pwriter.faces.testing import read_events
from pwriter.plan.layout import SizedShardedPlanner
from pwriter.plan.settings import ConfigError
from pwriter.service.merge import merge
from pwriter.service.verify import verify
from pwriter.service.writer import open_writer

from helpers import BIN, dftracer_tool, expect_failure, run_cli

SIZE = 4096


def write_numbered_inputs(directory: pathlib.Path, files: int = 6, events: int = 300) -> tuple[list[str], int]:
    """Inputs whose events carry their file and a sequence number (``args.f``,
    ``args.seq``), lines of varied lengths; returns the paths and the longest line."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, longest = [], 0
    for number in range(files):
        lines = []
        for seq in range(events):
            pad = "x" * ((seq * 37 + number * 11) % 240)
            lines.append(f'{{"id":{seq},"name":"op","cat":"t","pid":{number},"tid":0,"ts":{seq},"dur":1,"ph":"X",'
                         f'"args":{{"f":{number},"seq":{seq},"pad":"{pad}"}}}}')
        longest = max(longest, *(len(line) + 1 for line in lines))
        name = directory / (f"rank_{number}.pfw.gz" if number % 2 else f"rank_{number}.pfw")
        text = ("[\n" + "\n".join(lines) + "\n]\n").encode()
        name.write_bytes(gzip.compress(text) if number % 2 else text)
        paths.append(str(name))
    return paths, longest


def check_order(shards: list[str]) -> None:
    """Read in the manifest's order, every input's events come in sequence, each once."""
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for shard in shards:
        for line in read_events(shard):
            args = json.loads(line)["args"]
            seen[args["f"]].append(args["seq"])
    for sequence in seen.values():
        assert sequence == list(range(len(sequence)))


def event_text(shard: str) -> list[bytes]:
    """A shard's event lines as written (with their newlines)."""
    data = pathlib.Path(shard).read_bytes()
    text = gzip.decompress(data) if shard.endswith(".gz") else data
    return [line + b"\n" for line in text.split(b"\n") if line.startswith(b"{")]


def check_shards(manifest: str, lanes: int, longest: int, *, compressed: bool) -> list[str]:
    """Every shard is a complete, wrapped trace of at most SIZE bytes of
    lines plus the one that crosses it; at most one shard per lane holds less."""
    shards = read_shard_set(manifest)
    assert len(shards) > lanes
    small = 0
    for shard in shards:
        data = pathlib.Path(shard).read_bytes()
        text = gzip.decompress(data) if compressed else data
        assert text.startswith(b"[\n") and text.endswith(b"\n]\n"), shard
        lines = event_text(shard)
        assert lines and read_events(shard) == [line[:-1] for line in lines]  # readable alone
        size = sum(map(len, lines))
        assert size - len(lines[-1]) < SIZE <= size or size < SIZE, (shard, size)
        assert size < SIZE + longest
        small += size < SIZE
    assert small <= lanes
    return shards


def check_member_index(manifest: str, output: str) -> None:
    index = json.loads(pathlib.Path(output + ".members.json").read_text())
    shards = read_shard_set(manifest)
    assert index["files"] == [os.path.basename(name) for name in shards]
    contents = [pathlib.Path(name).read_bytes() for name in shards]
    covered: dict[int, int] = collections.defaultdict(int)
    text_offset = 0
    for member in index["members"]:
        data = contents[member["file"]][member["offset"] : member["offset"] + member["length"]]
        text = gzip.decompress(data)
        assert len(text) == member["text_length"]
        assert member["text_offset"] == text_offset
        text_offset += len(text)
        assert text.count(b"\n{") + text.startswith(b"{") == member["events"]
        assert member["offset"] == covered[member["file"]]  # no byte between members, none left out
        covered[member["file"]] += member["length"]
    assert [covered[file] for file in range(len(shards))] == [len(content) for content in contents]


@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
async def test_merge_with_a_shard_size_writes_complete_shards_in_order(tmp_path, settings_for, suffix: str) -> None:
    inputs, longest = write_numbered_inputs(tmp_path / "in")
    output = str(tmp_path / "out" / f"merged{suffix}")
    os.mkdir(tmp_path / "out")
    result = await merge(inputs, output, settings=settings_for(layout="sharded", lanes=2, stripe_size="64KiB",
                                                               shard_size=SIZE), readers=3)
    assert result.manifest == output + ".shards"
    shards = check_shards(result.manifest, 3, longest, compressed=suffix.endswith(".gz"))
    check_order(shards)
    assert verify(output, inputs).match
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [os.path.basename(name) for name in shards] + [f"merged{suffix}.shards"]
        + ([f"merged{suffix}.members.json"] if suffix.endswith(".gz") else []))
    if suffix.endswith(".gz"):
        check_member_index(result.manifest, output)
        count = await trio.run_process([dftracer_tool("dftracer_event_count"), "-d", str(tmp_path / "out"),
                                        "--index-dir", str(tmp_path), "--log-level", "off"], capture_stdout=True)
        assert int(count.stdout.split()[-1]) == 6 * 300


@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
async def test_the_writer_with_a_shard_size_keeps_each_producer_in_order(tmp_path, settings_for, suffix: str) -> None:
    """The library path: producer handles through the coalescers (plain) and
    the member stage (gzip) are cut at the shard limits too."""
    output = str(tmp_path / f"w{suffix}")
    sent = 0
    async with open_writer(output, settings=settings_for(layout="sharded", lanes=2, stripe_size="64KiB",
                                                         shard_size=SIZE, max_delay=0.01)) as writer:
        async def produce(number: int) -> None:
            nonlocal sent
            async with writer.producer(batch_bytes=1000) as producer:
                for seq in range(400):
                    pad = "y" * (seq % 50)
                    await producer.send_line(f'{{"id":{seq},"args":{{"f":{number},"seq":{seq},"p":"{pad}"}}}}\n'
                                        .encode())
                    sent += 1
                    if seq % 97 == 0:
                        await trio.sleep(0.02)  # (deadline flushes: small chunks)

        async with trio.open_nursery() as nursery:
            for number in range(3):
                nursery.start_soon(produce, number)
    shards = check_shards(output + ".shards", 2, 130, compressed=suffix.endswith(".gz"))
    check_order(shards)
    assert sum(len(read_events(shard)) for shard in shards) == sent == 1200
    if suffix.endswith(".gz"):
        check_member_index(output + ".shards", output)


async def test_a_shard_size_with_nothing_written_is_one_empty_trace(tmp_path, settings_for) -> None:
    output = str(tmp_path / "empty.pfw.gz")
    async with open_writer(output, settings=settings_for(layout="sharded", shard_size=SIZE)):
        pass
    (shard,) = read_shard_set(output + ".shards")
    assert gzip.decompress(pathlib.Path(shard).read_bytes()) == b"[\n]\n"
    check_member_index(output + ".shards", output)


def test_a_line_longer_than_the_shard_size_fills_a_shard_alone() -> None:
    planner = SizedShardedPlanner(header_length=2, stripe_size=65536, shard_size=10)
    text = memoryview(b"a\n" + b"b" * 30 + b"\n" + b"cc\n" + b"dddddddd\n" + b"e\n")
    pieces = [bytes(piece) for piece in planner.cut(0, text)]
    assert pieces == [b"a\n" + b"b" * 30 + b"\n", b"cc\ndddddddd\n", b"e\n"]
    placements = [planner.place(0, len(piece)) for piece in pieces]
    assert [(p.file, p.offset, p.head) for p in placements] == [(0, 0, 2), (1, 0, 2), (2, 0, 2)]
    assert planner.place(1, 3).file == 3  # another lane: a shard of its own
    footers = planner.close_shards(2)
    assert [(f.file, f.offset) for f in footers] == [(0, 2 + 33), (1, 2 + 12), (2, 2 + 2), (3, 2 + 3)]


def test_force_replaces_a_set_of_any_number_of_shards(tmp_path) -> None:
    """Seven shards, then two, then seven again, then a striped file: each
    --force leaves only the new set."""
    inputs, _ = write_numbered_inputs(tmp_path / "in", files=4, events=200)
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "m.pfw.gz")

    def run(*options: str) -> list[str]:
        done = run_cli("merge", *inputs, "-o", target, "--force", "--stripe-size", "64KiB", "--lanes", "2",
                       "--no-fsync", "--json", *options)
        assert done.returncode == 0, done.stderr
        assert verify(target, inputs).match
        return sorted(os.listdir(out))

    def shard_set(size: str) -> list[str]:
        listing = run("--layout", "sharded", "--shard-size", size)
        shards = read_shard_set(target + ".shards")
        assert listing == sorted([os.path.basename(name) for name in shards] + ["m.pfw.gz.shards",
                                                                                 "m.pfw.gz.members.json"])
        return shards

    many = shard_set("12KiB")  # (about 160 KB of lines over two lanes)
    few = shard_set("1MiB")
    again = shard_set("12KiB")
    assert len(many) >= 7 and len(few) == 2 and len(again) == len(many)
    assert run("--layout", "striped") == ["m.pfw.gz", "m.pfw.gz.members.json"]


@pytest.mark.parametrize("options,needle", [
    (["--layout", "striped", "--shard-size", "1MiB"], "shard_size=1048576: a shard size is for the sharded layout"),
    (["--layout", "padded-striped", "--shard-size", "1MiB"], "layout, and this output's layout is padded-striped"),
    (["--layout", "sharded", "--shard-size", "0"], "shard_size"),
    (["--layout", "sharded", "--shard-size", "lots"], "shard_size"),
])
def test_a_shard_size_that_cannot_be_honoured_is_refused(tmp_path, options: list[str], needle: str) -> None:
    inputs, _ = write_numbered_inputs(tmp_path / "in", files=1, events=5)
    done = run_cli("merge", *inputs, "-o", str(tmp_path / "m.pfw"), *options)
    expect_failure(done, 2, needle)
    assert os.listdir(tmp_path) == ["in"]


def test_a_shard_size_on_standard_output_is_refused(tmp_path) -> None:
    inputs, _ = write_numbered_inputs(tmp_path / "in", files=1, events=5)
    done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-", "--shard-size", "1MiB"],
                          capture_output=True, text=True, timeout=60, env=os.environ, check=False)
    assert done.returncode == 2 and "shard_size=1048576" in done.stderr and done.stdout == ""


async def test_the_library_refuses_a_shard_size_for_another_layout(tmp_path) -> None:
    with pytest.raises(ConfigError, match="a shard size is for the sharded layout"):
        async with open_writer(str(tmp_path / "m.pfw"), layout="striped", shard_size="1MiB", backend="threads"):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("mpiexec", path=BIN) is None, reason="mpiexec is not installed")
@pytest.mark.parametrize("suffix", [".pfw", ".pfw.gz"])
def test_mpi_ranks_each_grow_their_shards(tmp_path, suffix: str) -> None:
    pytest.importorskip("mpi4py")
    inputs, longest = write_numbered_inputs(tmp_path / "in", files=5, events=200)
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / f"m{suffix}")
    done = subprocess.run([shutil.which("mpiexec", path=BIN), "-n", "2", os.path.join(BIN, "pwriter"), "merge",
                           *inputs, "-o", target, "--layout", "sharded", "--shard-size", str(SIZE), "--lanes", "1",
                           "--stripe-size", "64KiB", "--no-fsync", "--verify"],
                          capture_output=True, text=True, timeout=120, env=os.environ, check=False)
    assert done.returncode == 0, done.stderr
    shards = check_shards(target + ".shards", 2, longest, compressed=suffix.endswith(".gz"))
    check_order(shards)
    # The read order is rank 0's shards, then rank 1's: the inputs' order.
    files = [json.loads(line)["args"]["f"] for shard in shards for line in read_events(shard)]
    assert files == sorted(files)
    if suffix.endswith(".gz"):
        check_member_index(target + ".shards", target)
    assert sorted(os.listdir(out)) == sorted(
        [os.path.basename(name) for name in shards] + [f"m{suffix}.shards"]
        + ([f"m{suffix}.members.json"] if suffix.endswith(".gz") else []))


def test_a_merge_killed_while_its_lanes_start_shards_leaves_the_old_set_and_temporaries(tmp_path) -> None:
    """The crash table holds for shards made during the run: a SIGKILL while
    lanes are starting shards leaves the old set whole and only hidden
    temporaries (and the lock), which the next run removes."""
    import signal
    import time

    inputs, _ = write_numbered_inputs(tmp_path / "in", files=4, events=200)
    fifo = tmp_path / "in" / "zz_live.pfw"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "m.pfw")
    old = run_cli("merge", inputs[0], "-o", target, "--layout", "sharded", "--shard-size", str(SIZE), "--no-fsync")
    assert old.returncode == 0, old.stderr
    old_listing = sorted(os.listdir(out))
    old_events = read_events(target + ".shards")
    process = subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", *inputs, str(fifo), "-o", target, "--force",
                                "--layout", "sharded", "--shard-size", str(SIZE), "--lanes", "2", "--no-fsync"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ)
    feed = None
    try:
        deadline = time.monotonic() + 60
        while feed is None and time.monotonic() < deadline:
            try:
                feed = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the merge opens it to read
            except OSError:
                time.sleep(0.02)
        assert feed is not None, "the merge never read the FIFO"
        os.write(feed, b'{"id":1,"name":"live","args":{"f":9,"seq":0}}\n' * 200)
        while time.monotonic() < deadline:
            temporaries = [name for name in os.listdir(out)
                           if name.startswith(".m.") and ".shard_" in name and name.endswith(".tmp")]
            if len(temporaries) >= 5:
                break
            time.sleep(0.02)
        assert len(temporaries) >= 5, os.listdir(out)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if feed is not None:
            os.close(feed)
        if process.poll() is None:
            process.kill()
            process.communicate()
    listing = sorted(os.listdir(out))
    assert [name for name in listing if not name.startswith(".")] == old_listing  # the old set, whole
    assert read_events(target + ".shards") == old_events
    os.unlink(fifo)
    done = run_cli("merge", "-d", str(tmp_path / "in"), "-o", target, "--force", "--layout", "sharded",
                   "--shard-size", str(SIZE), "--no-fsync", "--verify")
    assert done.returncode == 0, done.stderr
    shards = read_shard_set(target + ".shards")
    assert sorted(os.listdir(out)) == sorted([os.path.basename(name) for name in shards] + ["m.pfw.shards"])
