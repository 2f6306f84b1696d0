"""Compressed output: gzip members in every layout, read by every reader."""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import random
import subprocess
import zlib

import pytest
import trio
import trio.lowlevel

from pwriter.faces.corpus import write_corpus
from pwriter.faces.testing import event_counter, read_events, read_text
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.writer import open_writer

from helpers import dftracer_tool, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]


def members_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """Walk a multi-member gzip file: (offset, length, text) of each member.
    Fails on any byte between members."""
    members, offset = [], 0
    while offset < len(data):
        assert data[offset : offset + 2] == b"\x1f\x8b", f"not a gzip member at byte {offset}"
        inflater = zlib.decompressobj(wbits=31)
        text = inflater.decompress(data[offset:]) + inflater.flush()
        assert inflater.eof, f"member at {offset} does not end"
        length = len(data) - offset - len(inflater.unused_data)
        members.append((offset, length, text))
        offset += length
    return members


def assert_slots_kept(members: list[tuple[int, int, bytes]], slot: int) -> None:
    """Padded-striped: no member is empty (padding holds one "\n"); a
    member lies inside one slot, or starts one (a line longer than a slot);
    padding fills the rest of a slot to its end (or ends the file's last
    data before the footer)."""
    for index, (offset, length, text) in enumerate(members):
        assert text
        end = offset + length
        if offset // slot != (end - 1) // slot and text != b"\n":
            assert offset % slot == 0, f"member at {offset} crosses a slot"
        following = members[index + 1][2] if index + 1 < len(members) else None
        if text == b"\n" and following != b"\n":
            assert end % slot == 0, f"padding at {offset} ends inside a slot"


def output_files(out: str, report: dict[str, object]) -> list[str]:
    directory = os.path.dirname(out)
    return [os.path.join(directory, os.path.basename(str(p))) for p in report["outputs"]]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("gz-corpus")
    write_corpus(str(directory), files=40, events_per_file=150, seed=3)
    return str(directory)


def inputs_of(corpus: str) -> list[str]:
    return sorted(os.path.join(corpus, n) for n in os.listdir(corpus) if n.endswith((".pfw", ".pfw.gz")))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gzip_output_every_layout(corpus: str, tmp_path, backend_name: str, layout: str) -> None:
    out = str(tmp_path / "merged.pfw.gz")
    done = run_cli("merge", "-d", corpus, "-o", out, "--layout", layout, "--backend", backend_name,
                   "--stripe-size", "64KiB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    files = output_files(out, report)
    expected = event_counter(inputs_of(corpus))

    # Python's gzip and zcat read the same text: "[", the events, "]".
    text = b"".join(gzip.decompress(pathlib.Path(path).read_bytes()) for path in files)
    zcat = b"".join(subprocess.run(["zcat", path], capture_output=True, check=True).stdout for path in files)
    assert zcat == text
    lines = text.split(b"\n")
    assert lines[0] == b"[" and lines[-2:] == [b"]", b""]
    assert collections.Counter(line for line in lines[1:-2] if line) == expected  # (padding: blank lines)

    # Members follow each other with no byte between them, in every file.
    walked = [members_of(pathlib.Path(path).read_bytes()) for path in files]
    if layout == "padded-striped":
        assert_slots_kept(walked[0], 65536)

    # The member index lets a reader decompress any member alone.
    index = json.loads(pathlib.Path(out + ".members.json").read_text())
    assert index["format"] == "pwriter-members/1"
    assert index["files"] == [os.path.basename(p) for p in files]
    assert sum(m["events"] for m in index["members"]) == sum(expected.values())
    data = [pathlib.Path(path).read_bytes() for path in files]
    text_offset = 0
    for member in index["members"]:
        raw = data[member["file"]][member["offset"] : member["offset"] + member["length"]]
        alone = gzip.decompress(raw)
        assert len(alone) == member["text_length"]
        assert alone.count(b"\n") >= member["events"]
        assert text[member["text_offset"] : member["text_offset"] + member["text_length"]] == alone
        assert text[text_offset : member["text_offset"]].strip(b"\n") == b""  # between: padding's blank lines
        text_offset = member["text_offset"] + member["text_length"]
    assert text_offset == len(text)

    # The field's own tools read it (they look for *.pfw.gz names).
    validate = subprocess.run([dftracer_tool("dftracer_validate"), "--files", *files, "--log-level", "off"],
                              capture_output=True, text=True)
    assert validate.returncode == 0 and " 0 failed" in validate.stdout, validate.stdout + validate.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_event_count_matches_the_inputs(corpus: str, tmp_path, layout: str) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    done = run_cli("merge", "-d", corpus, "-o", str(outdir / "merged.pfw.gz"), "--stripe-size", "64KiB",
                   "--layout", layout)
    assert done.returncode == 0, done.stderr
    ingz = tmp_path / "in"
    ingz.mkdir()
    for index, path in enumerate(inputs_of(corpus)):
        (ingz / f"in_{index}.pfw.gz").write_bytes(gzip.compress(read_text(path)))

    def count(directory) -> int:
        return int(subprocess.run([dftracer_tool("dftracer_event_count"), "-d", str(directory)],
                                  capture_output=True, text=True, check=True).stdout.split()[-1])

    assert count(outdir) == count(ingz)


@pytest.mark.parametrize("stripe", ["64KiB", "128KiB"])
async def test_padded_gzip_sweep_never_leaves_bytes_between_members(tmp_path, backend_name: str, stripe: str) -> None:
    """Lines of every length, some incompressible, so members end anywhere
    in their slot, including a few bytes before its end."""
    rng = random.Random(stripe)
    settings = load_settings(backend=backend_name, layout="padded-striped", stripe_size=stripe, fsync=False,
                             lanes=2, level=1)
    target = str(tmp_path / "sweep.pfw.gz")
    sent = []
    async with open_writer(target, settings=settings, fs=FsInfo(FsKind.LOCAL, 0, "/")) as writer:
        async with writer.producer(batch_bytes=4096) as producer:
            for n in range(3000):
                noise = os.urandom(rng.randint(0, 120)).hex().encode()
                line = b'{"n":%d,"r":"%s"}' % (n, noise)
                sent.append(line)
                await producer.send_line(line)
                if n % 97 == 0:
                    await trio.lowlevel.checkpoint()
    data = pathlib.Path(target).read_bytes()
    members = members_of(data)
    lines = b"".join(text for _, _, text in members).split(b"\n")[1:-2]
    assert [line for line in lines if line] == sent  # one producer: in order
    slot = 65536 if stripe == "64KiB" else 131072
    assert_slots_kept(members, slot)
    assert read_events(target) == sent


def test_info_reports_members(corpus: str, tmp_path) -> None:
    out = tmp_path / "m.pfw.gz"
    assert run_cli("merge", "-d", corpus, "-o", str(out)).returncode == 0
    info = run_cli("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["members"]["count"] >= 3
    assert report["members"]["events"] == sum(event_counter(inputs_of(corpus)).values())


@pytest.mark.parametrize("short_by", range(1, 31))
def test_members_ending_just_before_a_stripe_boundary(short_by: int) -> None:
    """A member that ends 1 to 30 bytes before its slot's end leaves a
    remainder smaller than one padding member: the padding runs on through
    the next slot, and still no byte lies between members."""
    from pwriter.plan.layout import GZIP_MIN_PADDING, PaddedStripedPlanner, gzip_padding

    stripe = 65536
    header = gzip.compress(b"[\n", mtime=0)
    footer = gzip.compress(b"]\n", mtime=0)

    def stored_member(length: int) -> tuple[bytes, bytes]:  # a member of exactly `length` bytes (level 0)
        for size in range(length - 40, length):
            compressor = zlib.compressobj(0, zlib.DEFLATED, 31)
            member = compressor.compress(b"x" * size) + compressor.flush()
            if len(member) == length:
                return member, b"x" * size
        raise AssertionError("no stored member of that length")

    planner = PaddedStripedPlanner(header_length=len(header), stripe_size=stripe, min_padding=GZIP_MIN_PADDING)
    first, first_text = stored_member(stripe - len(header) - short_by)
    second, second_text = stored_member(stripe - short_by)
    image = bytearray()
    for member in (first, second):
        placement = planner.place(0, len(member))
        assert placement.pad == 0 or placement.pad >= GZIP_MIN_PADDING
        parts = ([header] if placement.head else []) + [member, gzip_padding(placement.pad)]
        assert placement.offset == len(image)
        image += b"".join(parts)
    closing = planner.close(len(footer))
    image += footer
    assert closing.end == len(image)
    walked = members_of(bytes(image))
    texts = [text for _, _, text in walked if text != b"\n"]
    assert texts == [b"[\n", first_text, second_text, b"]\n"]
    assert all(text for _, _, text in walked)  # never an empty member: padding holds one "\n"
    # A remainder of one padding member or more is padding; a smaller one spills into the next slot.
    second_slot = stripe if short_by >= GZIP_MIN_PADDING else 2 * stripe
    assert [offset for offset, _, text in walked if text.startswith(b"x")] == [len(header), second_slot]


async def test_padded_gzip_members_are_finished_after_max_delay(tmp_path) -> None:
    """Padded-striped gzip streams chunks into a member until it fills a
    slot; a slow producer's lines must still reach the disk after the
    delays (batch, buffer, member: max_delay each), not only at close.
    (Real clock: compression runs in threads, which a virtual clock would
    outrun; the wait is bounded, not timed.)"""
    from pwriter.faces.testing import MemoryBackend
    from pwriter.plan.settings import load_settings
    from pwriter.plan.sizing import FsInfo, FsKind
    from pwriter.service.writer import open_writer

    memory = MemoryBackend()
    target = str(tmp_path / "out.pfw.gz")
    settings = load_settings(layout="padded-striped", stripe_size="1MiB", max_delay=0.05, fsync=False)

    def written_text() -> bytes:
        data = b"".join(write.data for write in sorted(memory.writes, key=lambda write: write.offset))
        return gzip.decompress(data) if data else b""

    async with open_writer(target, settings=settings, fs=FsInfo(FsKind.LOCAL, 0xEF53, "/"),
                           backend=memory) as writer:
        async with writer.producer() as producer:
            for number in (1, 2):
                await producer.send_line(b'{"slow":%d}' % number)
                with trio.fail_after(30):
                    while b'{"slow":%d}\n' % number not in written_text():  # noqa: ASYNC110 (polls a test double)
                        await trio.sleep(0.01)
    assert writer.statistics().deadline_flushes >= 4  # two buffers and two members
    text = gzip.decompress(memory.contents()[target])
    assert [line for line in text.split(b"\n") if line] == [b"[", b'{"slow":1}', b'{"slow":2}', b"]"]
