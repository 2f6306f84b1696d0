import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pwriter.plan.layout import (
    PaddedStripedPlanner,
    Placement,
    ShardedPlanner,
    StripedPlanner,
    make_planner,
    plain_padding,
)

chunk_lengths = st.lists(st.integers(min_value=1, max_value=5000), max_size=40)


def apply(planner, chunks: list[tuple[int, int]], header: int, footer: int) -> list[Placement]:
    placements = []
    opened = planner.open()
    if opened is not None:
        placements.append(opened)
    for lane, length in chunks:
        placements.append(planner.place(lane, length))
    placements.append(planner.close(footer))
    return placements


def assert_tiles(placements: list[Placement], sizes: list[int]) -> None:
    """Every file is covered from 0 to its size with no gap and no overlap."""
    for file, size in enumerate(sizes):
        extents = sorted((p.offset, p.end) for p in placements if p.file == file and p.length)
        position = 0
        for start, end in extents:
            assert start == position, f"gap or overlap at {position} in file {file}"
            position = end
        assert position == size


@given(chunk_lengths, st.integers(0, 8), st.integers(0, 8))
def test_striped_tiles_with_header_first_and_footer_last(lengths, header, footer) -> None:
    planner = StripedPlanner(header_length=header, stripe_size=4096)
    placements = apply(planner, [(i % 3, n) for i, n in enumerate(lengths)], header, footer)
    sizes = planner.file_sizes()
    assert sizes == [header + sum(lengths) + footer]
    assert_tiles(placements, sizes)
    assert placements[0] == Placement(0, 0, header, 0, 0)
    assert placements[-1].end == sizes[0] and placements[-1].body == footer


def slot_owners(placements: list[tuple[int, Placement]], stripe: int) -> dict[int, set[int]]:
    """Slot number -> the lanes whose chunks (not padding) were placed in it."""
    owners: dict[int, set[int]] = {}
    for lane, placement in placements:
        if placement.body:
            for slot in range(placement.offset // stripe, (placement.end - 1) // stripe + 1):
                owners.setdefault(slot, set()).add(lane)
    return owners


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5000)), max_size=40), st.integers(1, 8),
       st.integers(1, 8), st.sampled_from([1, 22, 23, 25]), st.sampled_from([64, 100, 4096]))
@example(chunks=[(0, 63), (1, 1), (0, 1)], header=1, footer=1, min_padding=1, stripe=64)
def test_padded_lanes_keep_their_slots_and_never_a_short_pad(chunks, header, footer, min_padding, stripe) -> None:
    planner = PaddedStripedPlanner(header_length=header, stripe_size=stripe, min_padding=min_padding)
    assert planner.open() is None
    placed: list[tuple[int, Placement]] = []
    paddings: list[Placement] = []
    ends: dict[int, int] = {}  # lane -> end of its last chunk
    for lane, length in chunks:
        room = planner.room(lane)
        placement = planner.place(lane, length)
        left = room - length
        if lane in ends and (left == 0 or left >= min_padding):
            assert placement.offset == ends[lane], "a chunk that fits its lane's slot goes right after its last"
        ends[lane] = placement.end - placement.pad
        if placement.pad or placement.end % stripe == 0:
            ends.pop(lane)  # the slot is full (padded with it, or filled exactly): the next chunk takes another
        placed.append((lane, placement))
        paddings += planner.paddings()
    closing = planner.close(footer)
    paddings += planner.paddings()
    assert planner.paddings() == []  # each handed out once
    sizes = planner.file_sizes()
    everything = [p for _, p in placed] + paddings + [closing]
    assert_tiles(everything, sizes)
    # One writer per slot: no slot holds the chunks of two lanes.
    assert all(len(lanes) == 1 for lanes in slot_owners(placed, stripe).values())
    for placement in [p for _, p in placed] + paddings:
        assert placement.pad == 0 or placement.pad >= min_padding
        if placement.pad:  # padding always ends a slot
            assert placement.end % stripe == 0
        # within one slot, or whole slots
        if placement.offset // stripe != (placement.end - 1) // stripe:
            assert placement.offset % stripe == 0 and placement.end % stripe == 0
    for padding in paddings:
        assert padding.head == padding.body == 0
    # The header starts the file, once; the footer ends it.
    with_header = [p for p in everything if p.head]
    assert len(with_header) == 1 and with_header[0].offset == 0
    assert closing.end == sizes[0] and closing.body == footer and closing.pad == 0
    # The cost: every slot but those of lines longer than a slot is shared
    # only by its lane's chunks; at most one slot per lane is left partly
    # padded at a time, and the file's last slot is not padded at all.
    text = header + sum(length for _, length in chunks) + footer
    if all(length + header + min_padding <= stripe for _, length in chunks):
        left_slots = sum(1 for p in paddings if p.pad >= planner.full_below)
        assert sizes[0] <= text + (left_slots + len({lane for lane, _ in chunks})) * stripe


def test_padded_oversized_chunk_takes_whole_slots() -> None:
    planner = PaddedStripedPlanner(header_length=2, stripe_size=100, min_padding=1)
    assert planner.chunk_capacity == 98
    first = planner.place(0, 98)
    assert (first.offset, first.head, first.body, first.pad) == (0, 2, 98, 0)
    big = planner.place(0, 250)
    assert (big.offset, big.length) == (100, 300)
    after = planner.place(1, 10)
    assert after.offset == 400
    # A remainder smaller than the smallest padding runs on through another slot.
    gz = PaddedStripedPlanner(header_length=2, stripe_size=100, min_padding=25)
    tight = gz.place(0, 80)  # 2 + 80 leaves 18 < 25
    assert (tight.length, tight.pad) == (200, 118)


def test_padded_without_chunks_is_header_and_footer() -> None:
    planner = PaddedStripedPlanner(header_length=2, stripe_size=4096)
    assert planner.open() is None
    closing = planner.close(2)
    assert closing == Placement(0, 0, 2, 2, 0)
    assert planner.file_sizes() == [4]


@given(chunk_lengths, st.integers(1, 5), st.integers(0, 8), st.integers(0, 8))
def test_sharded_header_in_first_footer_in_last(lengths, shards, header, footer) -> None:
    planner = ShardedPlanner(header_length=header, stripe_size=4096, shards=shards)
    chunks = [(i % 7, n) for i, n in enumerate(lengths)]
    placements = apply(planner, chunks, header, footer)
    sizes = planner.file_sizes()
    assert_tiles(placements, sizes)
    assert placements[0] == Placement(0, 0, header, 0, 0)
    assert placements[-1].file == shards - 1 and placements[-1].end == sizes[-1]
    for (lane, _), placement in zip(chunks, placements[1:-1], strict=True):
        assert placement.file == lane % shards
    assert sum(sizes) == header + sum(lengths) + footer


@settings(max_examples=50)
@given(st.sampled_from(["striped", "padded-striped", "sharded"]), chunk_lengths)
def test_chunks_of_one_lane_keep_their_order(layout, lengths) -> None:
    planner = make_planner(layout, header_length=2, stripe_size=4096, lanes=3)
    planner.open()
    offsets = [planner.place(1, n) for n in lengths]
    assert all(a.file == b.file and a.offset < b.offset for a, b in zip(offsets, offsets[1:], strict=False))


def test_no_chunk_after_close() -> None:
    planner = StripedPlanner(header_length=2, stripe_size=4096)
    planner.open()
    planner.close(2)
    with pytest.raises(RuntimeError):
        planner.place(0, 10)


@given(st.integers(0, 10_000))
def test_plain_padding_is_whitespace_ending_in_newline(length) -> None:
    padding = plain_padding(length)
    assert len(padding) == length
    if length:
        assert padding.endswith(b"\n") and padding.strip() == b"" and b"\x00" not in padding


@given(st.integers(0, 300_000).filter(lambda n: n == 0 or n >= 23))
def test_gzip_padding_is_whitespace_line_members_of_exact_length(length) -> None:
    import gzip

    from pwriter.plan.layout import gzip_padding, gzip_padding_members

    padding = gzip_padding(length)
    assert len(padding) == length
    newlines = gzip_padding_members(length)
    assert gzip.decompress(padding) == b"\n" * newlines
    whole = gzip.compress(b"a\n") + padding + gzip.compress(b"b\n")
    assert gzip.decompress(whole) == b"a\n" + b"\n" * newlines + b"b\n"


def test_gzip_padding_refuses_what_cannot_be_built() -> None:
    from pwriter.plan.layout import gzip_padding

    with pytest.raises(ValueError):
        gzip_padding(22)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5000)), max_size=40), st.integers(1, 8),
       st.sampled_from(["striped", "padded-striped"]), st.sampled_from([1, 23]), st.sampled_from([64, 4096]))
def test_shares_of_one_counter_tile_one_file(chunks, header, layout, min_padding, stripe) -> None:
    """Four shares (MPI ranks) of one file, chunks interleaved at random: the
    file is tiled, the header once at 0 (padded: alone in slot 0), padded
    chunks on whole slots, and the footer at the counter's last value."""
    from pwriter.plan.layout import LocalCounter, SharedPaddedPlanner, SharedStripedPlanner

    if layout == "padded-striped" and header + min_padding > stripe:
        return
    start = header if layout == "striped" else stripe
    counter = LocalCounter(start)
    if layout == "striped":
        shares = [SharedStripedPlanner(counter=counter, header_length=header, stripe_size=stripe,
                                      writes_header=rank == 0) for rank in range(4)]
    else:
        shares = [SharedPaddedPlanner(counter=counter, header_length=header, stripe_size=stripe,
                                     min_padding=min_padding, writes_header=rank == 0) for rank in range(4)]
    placements = [opened for share in shares if (opened := share.open()) is not None]
    assert len(placements) == 1 and placements[0].offset == 0 and placements[0].head == header
    placed = []
    for rank, length in chunks:
        placement = shares[rank].place(0, min(length, shares[rank].chunk_capacity))
        placed.append((rank, placement))
        placements += [placement, *shares[rank].paddings()]
    for share in shares:  # the shares place no footer ...
        placements += [share.close(0), *share.paddings()]
    footer = Placement(0, counter.fetch_add(5), 0, 5, 0)  # ... the last one to finish places it at the end
    placements.append(footer)
    assert_tiles(placements, [footer.end])
    if layout == "padded-striped":
        assert all(len(ranks) == 1 for ranks in slot_owners(placed, stripe).values())  # one rank per slot
        for placement in placements[:-1]:
            assert placement.pad == 0 or placement.pad >= min_padding
            if placement.pad:
                assert placement.end % stripe == 0
