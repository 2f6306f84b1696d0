"""Unit tests of pwriter.members: the MemberStage, driven directly.

The stage compresses a lane's chunks in threads and hands them to
a ChunkSink (over a real backend and file) in the lane's order; the oracle
is the file, decompressed here with the gzip module.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time

import pytest
import trio

import pwriter.members
from pwriter.backends import open_backend
from pwriter.compress import gzip_member
from pwriter.layout import GZIP_MIN_PADDING, PaddedStripedPlanner, StripedPlanner
from pwriter.members import MemberStage
from pwriter.sink import ChunkSink, compress_chunk

HEADER_TEXT = b"[\n"
FOOTER_TEXT = b"]\n"
STRIPE = 4096


def lines_of(lane: int, count: int) -> list[bytes]:
    """Numbered event lines of ``lane`` with text that compresses poorly."""
    return [b'{"lane":%d,"seq":%d,"h":"%s"}\n' % (lane, seq, hashlib.sha512(b"%d.%d" % (lane, seq)).hexdigest()
                                                  .encode()[:48]) for seq in range(count)]


def lane_order(text: bytes) -> dict[int, list[int]]:
    order: dict[int, list[int]] = {}
    for line in text.splitlines():
        if line.startswith(b'{"lane":'):
            lane, seq = (int(part.split(b":")[1]) for part in line.split(b",")[:2])
            order.setdefault(lane, []).append(seq)
    return order


def open_file(path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)


class FileOutput:
    """What a ChunkSink uses of an OutputSet."""

    def __init__(self, path) -> None:
        self.targets = [str(path)]
        self.fds = [open_file(path)]
        self.direct_fds: list[int] = []


def make_sink(planner, output, backend, *, padded: bool) -> ChunkSink:
    backend.register(output.fds[0], output.targets[0])
    return ChunkSink(planner=planner, output=output, backend=backend, header=gzip_member(HEADER_TEXT, 1),
                     header_text=len(HEADER_TEXT), compressed=True, padded=padded, level=1,
                     chunk_capacity=planner.chunk_capacity, writeback=False, stream_threads=8)


async def finish(sink: ChunkSink, stage: MemberStage) -> None:
    """What the writer does at close: the stage's last members, the footer, the padding."""
    await stage.finish_all()
    footer = gzip_member(FOOTER_TEXT, 1)
    for placement in sink.close(len(footer), len(FOOTER_TEXT)):
        await sink.write_placed(placement, footer)
    for padding in sink.fill_empty_files():
        await sink.write_placed(padding, b"")


def check_index(sink: ChunkSink, data: bytes, text: bytes) -> None:
    """Every listed member decompresses to the text at its text offset; members tile the file."""
    members = sink.member_index()["members"]
    assert isinstance(members, list)
    for member in members:
        piece = gzip.decompress(data[member["offset"] : member["offset"] + member["length"]])
        assert piece == text[member["text_offset"] : member["text_offset"] + member["text_length"]]
    position = 0
    for _file, offset, length, _text, _events, _listed in sorted(sink.members.entries()):
        assert offset == position
        position += length
    assert position == len(data)


async def test_members_finished_out_of_order_keep_each_lane_order(tmp_path, backend_name: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane's earlier chunks compress slowest, so later members finish
    first: the output still has each lane's lines in order, each once."""
    finished: list[bytes] = []
    lock = threading.Lock()

    def slow_first(text: memoryview, level: int) -> tuple[bytes, int]:
        seq = int(bytes(text[:40]).split(b",")[1].split(b":")[1])
        time.sleep(0.03 if seq == 0 else 0.001)  # each lane's first chunk is its slowest
        result = compress_chunk(text, level)
        with lock:
            finished.append(bytes(text[:20]))
        return result

    monkeypatch.setattr(pwriter.members, "compress_chunk", slow_first)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # (the stage compresses in as many threads)
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    planner = StripedPlanner(header_length=len(gzip_member(HEADER_TEXT, 1)), stripe_size=STRIPE)
    sent = {lane: lines_of(lane, 30) for lane in range(2)}
    released: list[tuple[int, int]] = []
    async with open_backend(backend_name, queue_depth=8) as backend:
        sink = make_sink(planner, output, backend, padded=False)
        async with trio.open_nursery() as nursery:
            stage = MemberStage(nursery=nursery, sink=sink, level=1, padded=False, slots=8)
            header = sink.open()
            assert header is not None
            nursery.start_soon(sink.write_placed, header, b"")
            for start in range(0, 30, 6):
                for lane in range(2):
                    chunk = b"".join(sent[lane][start : start + 6])
                    await stage.add(lane, memoryview(chunk), lambda key=(lane, start): released.append(key),
                                    trio.current_time())
            await finish(sink, stage)
    os.close(output.fds[0])
    firsts = [key for key, piece in enumerate(finished) if b'"seq":0,' in piece]
    assert firsts and max(firsts) > 1  # a first chunk finished after a later one
    assert sorted(released) == sorted((lane, start) for lane in range(2) for start in range(0, 30, 6))
    data = path.read_bytes()
    text = gzip.decompress(data)
    assert text.startswith(HEADER_TEXT) and text.endswith(FOOTER_TEXT)
    assert lane_order(text) == {0: list(range(30)), 1: list(range(30))}
    assert sorted(text.splitlines(keepends=True)[1:-1]) == sorted(sent[0] + sent[1])
    check_index(sink, data, text)


async def test_padded_stage_fills_slots(tmp_path, backend_name: str) -> None:
    """Padded gzip through the stage: whole slots decompress on their own,
    their padding is whitespace lines, every line is there once in its lane's order."""
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    planner = PaddedStripedPlanner(header_length=len(gzip_member(HEADER_TEXT, 1)), stripe_size=STRIPE,
                                   min_padding=GZIP_MIN_PADDING)
    sent = {lane: lines_of(lane, 300) for lane in range(2)}
    async with open_backend(backend_name, queue_depth=8) as backend:
        sink = make_sink(planner, output, backend, padded=True)
        async with trio.open_nursery() as nursery:
            stage = MemberStage(nursery=nursery, sink=sink, level=1, padded=True, slots=8)
            assert sink.open() is None
            for start in range(0, 300, 25):
                for lane in range(2):
                    chunk = b"".join(sent[lane][start : start + 25])
                    await stage.add(lane, memoryview(chunk), lambda: None, trio.current_time())
            await finish(sink, stage)
    os.close(output.fds[0])
    data = path.read_bytes()
    text = gzip.decompress(data)
    assert lane_order(text) == {0: list(range(300)), 1: list(range(300))}
    assert sorted(line for line in text.splitlines(keepends=True) if line.strip()) == sorted(
        [HEADER_TEXT, FOOTER_TEXT, *sent[0], *sent[1]])
    whole = len(data) // STRIPE
    assert whole >= 4
    for slot in range(whole):
        assert gzip.decompress(data[slot * STRIPE : (slot + 1) * STRIPE]).strip()
    padding = [(offset, length) for _f, offset, length, _t, _e, listed in sorted(sink.members.entries()) if not listed]
    assert padding
    for offset, length in padding:
        assert set(gzip.decompress(data[offset : offset + length])) == {10}
    check_index(sink, data, text)


async def wait_until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await trio.sleep(0.001)
    raise AssertionError(f"never: {what}")


async def test_stale_padded_members_are_written_in_place(tmp_path, backend_name: str) -> None:
    """A padded lane's held members whose oldest text waited ``delay`` are
    written by finish_stale at the lane's next offset, unpadded; the lane
    goes on filling the same slot."""
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    planner = PaddedStripedPlanner(header_length=len(gzip_member(HEADER_TEXT, 1)), stripe_size=STRIPE,
                                   min_padding=GZIP_MIN_PADDING)
    first, second = lines_of(0, 6)[:3], lines_of(0, 6)[3:]
    async with open_backend(backend_name, queue_depth=8) as backend:
        sink = make_sink(planner, output, backend, padded=True)
        async with trio.open_nursery() as nursery:
            stage = MemberStage(nursery=nursery, sink=sink, level=1, padded=True, slots=8)
            assert sink.open() is None
            since = trio.current_time()
            await stage.add(0, memoryview(b"".join(first)), lambda: None, since)
            await wait_until(lambda: stage.text_since() == [since], "the members are held")
            assert os.path.getsize(path) == 0  # held: the slot is far from full
            stage.finish_stale(since + 0.5, 1.0)  # not yet due
            assert stage.deadline_members == 0
            stage.finish_stale(since + 1.0, 1.0)
            await wait_until(lambda: stage.deadline_members == 1 and os.path.getsize(path) > 0, "the stale write")
            await wait_until(lambda: sink.counts().bytes_written == os.path.getsize(path), "the write's end")
            early = path.read_bytes()
            assert gzip.decompress(early) == HEADER_TEXT + b"".join(first)  # header, then the held members, no pad
            assert stage.text_since() == []
            await stage.add(0, memoryview(b"".join(second)), lambda: None, trio.current_time())
            await finish(sink, stage)
    os.close(output.fds[0])
    data = path.read_bytes()
    assert data.startswith(early)
    text = gzip.decompress(data)
    assert text == HEADER_TEXT + b"".join(first + second) + FOOTER_TEXT
    assert len(data) < STRIPE  # one slot: the lane went on filling it
    check_index(sink, data, text)
