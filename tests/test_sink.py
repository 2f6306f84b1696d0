"""Unit tests of pwriter.data.sink: ChunkSink, its member index, the stream gate and the slot pool.

The sink is driven directly, through its own interface (a planner, a small
output of open files, a real backend); the oracle is the bytes on disk,
decompressed here with the gzip module.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import zlib

import trio

from pwriter.data.backends import open_backend
from pwriter.data.gzip_members import MemberIndex, gzip_member
from pwriter.data.output import StreamOutput
from pwriter.data.sink import ChunkSink, StreamGate
from pwriter.plan.layout import GZIP_MIN_PADDING, PaddedStripedPlanner, Placement, StripedPlanner, gzip_padding_members

HEADER_TEXT = b"[\n"
FOOTER_TEXT = b"]\n"


class FileOutput:
    """What a ChunkSink uses of an OutputSet: the targets and their descriptors."""

    def __init__(self, *paths: os.PathLike[str]) -> None:
        self.targets = [str(path) for path in paths]
        self.fds = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for path in paths]
        self.direct_fds: list[int] = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def lines_of(lane: int, count: int, start: int = 0, pad: int = 0) -> list[bytes]:
    """Event lines of ``lane``, numbered; ``pad`` bytes of hex that compress poorly in each."""
    return [b'{"lane":%d,"seq":%d,"x":"%s"}\n' % (lane, seq, hashlib.sha512(b"%d.%d" % (lane, seq)).hexdigest()
                                                   .encode()[:pad]) for seq in range(start, start + count)]


def make_sink(planner, output, backend, *, compressed: bool) -> ChunkSink:
    header = gzip_member(HEADER_TEXT, 1) if compressed else HEADER_TEXT
    return ChunkSink(planner=planner, output=output, backend=backend, header=header, header_text=len(HEADER_TEXT),
                     compressed=compressed, level=1, chunk_capacity=planner.chunk_capacity,
                     writeback=False)


async def write_placed(sink: ChunkSink, placement: Placement, body: bytes) -> None:
    """The sink's blocking write, in a thread (as the writer calls it)."""
    await trio.to_thread.run_sync(sink.write_placed, placement, body)


def lane_order(text: bytes) -> dict[int, list[int]]:
    """Each lane's sequence numbers, in the order its lines appear in ``text``."""
    order: dict[int, list[int]] = {}
    for line in text.splitlines():
        if line.startswith(b'{"lane":'):
            lane = int(line.split(b",")[0].split(b":")[1])
            order.setdefault(lane, []).append(int(line.split(b",")[1].split(b":")[1]))
    return order


def check_member_index(sink: ChunkSink, data: bytes, text: bytes) -> list[dict[str, int]]:
    """The index lists members whose bytes decompress to the text at their
    text offsets; listed and unlisted (padding) members tile the file."""
    index = sink.placer.member_index()
    assert index["format"] == "pwriter-members/1"
    members = index["members"]
    assert isinstance(members, list)
    for member in members:
        piece = gzip.decompress(data[member["offset"] : member["offset"] + member["length"]])
        assert len(piece) == member["text_length"]
        assert text[member["text_offset"] : member["text_offset"] + member["text_length"]] == piece
        assert member["events"] == sum(line.startswith(b"{") for line in piece.splitlines())
        assert member["first_event"] == text[: member["text_offset"]].count(b"\n{") + text.startswith(b"{")
    entries = sorted(sink.placer.members.entries())
    position = 0
    for _file, offset, length, _text, _events, _listed in entries:
        assert offset == position  # contiguous: no hole, no overlap
        position += length
    assert position == len(data)
    return members


async def test_thread_members_out_of_order_keep_lane_order(tmp_path, backend_name: str) -> None:
    """Lanes compress and write in their own threads, concurrently: each
    lane's lines keep its order, every line is there once, and the member
    index lists every member exactly."""
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    planner = StripedPlanner(header_length=len(gzip_member(HEADER_TEXT, 1)), stripe_size=4096)
    sent = {lane: lines_of(lane, 60) for lane in range(3)}
    async with open_backend(backend_name, queue_depth=8) as backend:
        backend.register(output.fds[0], output.targets[0])
        sink = make_sink(planner, output, backend, compressed=True)
        header = sink.placer.open()
        assert header is not None

        def lane_thread(lane: int) -> None:
            buffer = memoryview(bytearray(planner.chunk_capacity))
            for start in range(0, 60, 12):  # five chunks of twelve lines each
                chunk = b"".join(sent[lane][start : start + 12])
                buffer[: len(chunk)] = chunk
                sink.write_chunk(lane, buffer, len(chunk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_placed, sink, header, b"")
            for lane in (2, 0, 1):
                nursery.start_soon(trio.to_thread.run_sync, lane_thread, lane)
        footer = gzip_member(FOOTER_TEXT, 1)
        for placement in sink.placer.close(len(footer), len(FOOTER_TEXT)):
            await write_placed(sink, placement, footer)
    output.close()
    data = path.read_bytes()
    text = gzip.decompress(data)
    assert text.startswith(HEADER_TEXT) and text.endswith(FOOTER_TEXT)
    assert sorted(text.splitlines(keepends=True)) == sorted([HEADER_TEXT, FOOTER_TEXT, *sum(sent.values(), [])])
    assert lane_order(text) == {lane: list(range(60)) for lane in range(3)}
    members = check_member_index(sink, data, text)
    assert len(members) == 1 + 15 + 1  # header, a member per chunk, footer
    counts = sink.counts()
    assert counts.chunks == 15
    assert counts.line_bytes == sum(len(line) for lines in sent.values() for line in lines)
    assert counts.bytes_written == len(data)


async def test_members_written_in_reverse_land_in_placement_order(tmp_path, backend_name: str) -> None:
    """Members placed in a lane's order but written last first (as compressed
    members finish out of order) land at their places: the output reads in
    the lane's order."""
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    planner = StripedPlanner(header_length=len(gzip_member(HEADER_TEXT, 1)), stripe_size=4096)
    sent = lines_of(0, 40)
    async with open_backend(backend_name, queue_depth=8) as backend:
        backend.register(output.fds[0], output.targets[0])
        sink = make_sink(planner, output, backend, compressed=True)
        header = sink.placer.open()
        assert header is not None
        placed = []
        for start in range(0, 40, 8):
            chunk = b"".join(sent[start : start + 8])
            placed.append(sink.placer.place_members(0, [(gzip_member(chunk, 1), len(chunk), 8)]))
        footer = gzip_member(FOOTER_TEXT, 1)
        (footer_placement,) = sink.placer.close(len(footer), len(FOOTER_TEXT))
        await write_placed(sink, footer_placement, footer)
        for placement, body in reversed(placed):
            await write_placed(sink, placement, body)
        await write_placed(sink, header, b"")
    output.close()
    data = path.read_bytes()
    text = gzip.decompress(data)
    assert text == HEADER_TEXT + b"".join(sent) + FOOTER_TEXT
    members = check_member_index(sink, data, text)
    assert [member["events"] for member in members] == [0, 8, 8, 8, 8, 8, 0]
    assert [member["first_event"] for member in members] == [0, 0, 8, 16, 24, 32, 40]


async def test_padded_members_fill_their_slots(tmp_path, backend_name: str) -> None:
    """Padded gzip from threads: every whole slot decompresses on its
    own (members never straddle a slot), the padding after a slot's members
    is whitespace-line members that the index does not list, and the pool
    takes the lanes' last partial slots."""
    stripe = 4096
    path = tmp_path / "out.pfw.gz"
    output = FileOutput(path)
    header_member = gzip_member(HEADER_TEXT, 1)
    planner = PaddedStripedPlanner(header_length=len(header_member), stripe_size=stripe,
                                   min_padding=GZIP_MIN_PADDING)
    sent = {lane: lines_of(lane, 400, pad=40) for lane in range(2)}
    async with open_backend(backend_name, queue_depth=8) as backend:
        backend.register(output.fds[0], output.targets[0])
        sink = make_sink(planner, output, backend, compressed=True)
        assert sink.placer.open() is None  # the header rides with the first slot

        def lane_thread(lane: int) -> None:
            buffer = memoryview(bytearray(planner.chunk_capacity))
            for start in range(0, 400, 50):
                chunk = b"".join(sent[lane][start : start + 50])
                assert len(chunk) <= planner.chunk_capacity
                buffer[: len(chunk)] = chunk
                sink.write_chunk(lane, buffer, len(chunk))
            sink.finish_lane(lane)

        async with trio.open_nursery() as nursery:
            for lane in range(2):
                nursery.start_soon(trio.to_thread.run_sync, lane_thread, lane)
        for placement, body in sink.pool.place_rest():
            await write_placed(sink, placement, body)
        footer = gzip_member(FOOTER_TEXT, 1)
        for placement in sink.placer.close(len(footer), len(FOOTER_TEXT)):
            await write_placed(sink, placement, footer)
        for padding in sink.placer.fill_empty_files():
            await write_placed(sink, padding, b"")
    output.close()
    data = path.read_bytes()
    text = gzip.decompress(data)
    events = [line for line in text.splitlines() if line.strip()]
    assert sorted(events) == sorted(line.rstrip(b"\n") for line in [HEADER_TEXT, FOOTER_TEXT, *sum(sent.values(), [])])
    assert lane_order(text) == {lane: list(range(400)) for lane in range(2)}
    whole_slots = len(data) // stripe
    assert whole_slots >= 4
    for slot in range(whole_slots):
        piece = gzip.decompress(data[slot * stripe : (slot + 1) * stripe])  # raises if a member straddles
        assert piece.strip()  # every slot holds lines
    members = check_member_index(sink, data, text)
    listed = {(member["offset"], member["length"]) for member in members}
    unlisted = [(offset, length, text_length) for _f, offset, length, text_length, _e, is_listed
                in sorted(sink.placer.members.entries()) if not is_listed]
    assert unlisted  # slots were padded
    for offset, length, text_length in unlisted:
        assert (offset, length) not in listed
        padding = gzip.decompress(data[offset : offset + length])
        assert padding == b"\n" * text_length == b"\n" * gzip_padding_members(length)
        assert (offset + length) % stripe == 0  # padding ends its slot
    assert sum(member["events"] for member in members) == 800


async def test_stream_chunks_written_in_offset_order(tmp_path, backend_name: str) -> None:
    """A stream output: chunks placed in order but whose writes start last
    first still reach the stream in placement order (the stream gate)."""
    path = tmp_path / "stream.pfw"
    with open(path, "wb") as stream:
        output = StreamOutput(stream)
        planner = StripedPlanner(header_length=len(HEADER_TEXT), stripe_size=4096)
        async with open_backend(backend_name, queue_depth=8) as backend:
            backend.register(output.fds[0], output.targets[0])
            sink = make_sink(planner, output, backend, compressed=False)
            header = sink.placer.open()
            assert header is not None
            chunks = [b"".join(lines_of(0, 5, start)) for start in range(0, 30, 5)]
            placed = [(sink.placer.place(0, len(chunk)), chunk) for chunk in chunks]
            (footer,) = sink.placer.close(len(FOOTER_TEXT), len(FOOTER_TEXT))
            writes = [(header, b""), *placed, (footer, FOOTER_TEXT)]

            async def write_late(rank: int, placement: Placement, body: bytes) -> None:
                await trio.sleep(0.005 * (len(writes) - rank))  # the last placed starts first
                await write_placed(sink, placement, body)

            async with trio.open_nursery() as nursery:
                for rank, (placement, body) in enumerate(writes):
                    nursery.start_soon(write_late, rank, placement, body)
    assert path.read_bytes() == HEADER_TEXT + b"".join(chunks) + FOOTER_TEXT


async def test_stream_gate_lets_writes_through_in_offset_order() -> None:
    """StreamGate alone: threads that arrive last offset first pass in offset order."""
    gate = StreamGate()
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    passed: list[int] = []
    lock = threading.Lock()

    def write(offset: int, length: int) -> None:
        gate.wait_for(offset)
        with lock:
            passed.append(offset)
        gate.advance(length)

    async with trio.open_nursery() as nursery:
        for offset, length in reversed(list(zip(offsets, lengths, strict=True))):
            nursery.start_soon(trio.to_thread.run_sync, write, offset, length)
            await trio.sleep(0.002)
    assert passed == offsets


async def test_stream_gate_wait_is_cancellable() -> None:
    """A write waiting for a turn that never comes ends with the cancellation."""
    gate = StreamGate()
    with trio.move_on_after(0.2) as scope:
        await trio.to_thread.run_sync(gate.wait_for, 10)
    assert scope.cancelled_caught


def test_member_index_offsets_and_unlisted_padding() -> None:
    """MemberIndex: entries sorted by place whatever order they were recorded
    in; a padding member is not listed but its text counts in the text
    offsets after it."""
    index = MemberIndex(header_text=2)
    index.record_members(Placement(0, 10, 0, 30, 25), [(12, 100, 3), (18, 50, 2)])
    index.record(Placement(0, 65, 0, 7, 0), text=9, events=1)
    index.record(Placement(0, 0, 10, 0, 0), text=0, events=0)  # the header, recorded last
    result = index.index(["out.pfw.gz"])
    assert result["files"] == ["out.pfw.gz"]
    pad_text = gzip_padding_members(25)
    assert result["members"] == [
        {"file": 0, "offset": 0, "length": 10, "text_offset": 0, "text_length": 2, "first_event": 0, "events": 0},
        {"file": 0, "offset": 10, "length": 12, "text_offset": 2, "text_length": 100, "first_event": 0,
         "events": 3},
        {"file": 0, "offset": 22, "length": 18, "text_offset": 102, "text_length": 50, "first_event": 3,
         "events": 2},
        {"file": 0, "offset": 65, "length": 7, "text_offset": 152 + pad_text, "text_length": 9, "first_event": 5,
         "events": 1},
    ]
    joined = MemberIndex(header_text=2)
    joined.add_entries([list(entry) for entry in index.entries()])
    assert joined.index(["out.pfw.gz"]) == result


def test_write_chunk_refuses_a_chunk_over_capacity(tmp_path) -> None:
    output = FileOutput(tmp_path / "out.pfw")
    planner = StripedPlanner(header_length=len(HEADER_TEXT), stripe_size=64)
    sink = make_sink(planner, output, backend=None, compressed=False)
    try:
        buffer = memoryview(bytearray(128))
        try:
            sink.write_chunk(0, buffer, 65)
        except ValueError as exc:
            assert "65 bytes" in str(exc)
        else:
            raise AssertionError("a chunk over capacity was taken")
        assert sink.counts().chunks == 0
    finally:
        output.close()


def test_compress_chunk_is_one_member_of_its_lines() -> None:
    from pwriter.data.gzip_members import compress_chunk

    text = b"".join(lines_of(0, 7))
    member, events = compress_chunk(memoryview(text), 1)
    assert events == 7
    inflater = zlib.decompressobj(wbits=31)
    assert inflater.decompress(member) == text
    assert inflater.eof and inflater.unused_data == b""  # exactly one member


async def test_held_text_is_written_by_flush_lane_without_padding(tmp_path) -> None:
    """Padded layouts, plain and gzip: text that does not fill its lane's
    slot is held (held_since says since when); flush_lane writes it at the
    next offset of the slot, unpadded, and the lane's next chunk goes right
    after it in the same slot; write_end pads the slot and ends the file."""
    from pwriter.faces.testing import MemoryBackend

    for compressed in (False, True):
        memory = MemoryBackend()
        output = FileOutput(tmp_path / ("held.pfw.gz" if compressed else "held.pfw"))
        header = gzip_member(HEADER_TEXT, 1) if compressed else HEADER_TEXT
        planner = PaddedStripedPlanner(header_length=len(header), stripe_size=4096,
                                       min_padding=GZIP_MIN_PADDING if compressed else 1)
        memory.register(output.fds[0], output.targets[0])
        sink = make_sink(planner, output, memory, compressed=compressed)
        first, second = b"".join(lines_of(0, 3)), b"".join(lines_of(0, 3, start=3))
        sink.write_lines(0, first, since=7.0)
        assert memory.writes == [] and sink.held_since(0) == 7.0
        assert sink.flush_lane(0) and sink.held_since(0) is None
        assert not sink.flush_lane(0)  # nothing held any more
        (flushed,) = memory.writes
        assert flushed.offset == 0  # the header and the lines, at the slot's start, without padding
        assert (gzip.decompress(flushed.data) if compressed else flushed.data) == HEADER_TEXT + first
        sink.write_lines(0, second, since=9.0)
        assert sink.held_since(0) == 9.0
        sink.flush_lane(0)
        assert memory.writes[1].offset == len(flushed.data)  # right after, in the same slot
        footer = gzip_member(FOOTER_TEXT, 1) if compressed else FOOTER_TEXT
        sink.write_end(footer, len(FOOTER_TEXT))
        data = memory.contents()[output.targets[0]]
        text = gzip.decompress(data) if compressed else data
        assert text == HEADER_TEXT + first + second + FOOTER_TEXT  # (the file's last slot: no padding)
        output.close()
