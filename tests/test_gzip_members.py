"""Unit tests of pwriter.data.gzip_members: the one gzip member maker (LaneMembers,
SlotMembers), driven through its callbacks alone (no sink); the oracle is
the members decompressed with the gzip module."""

from __future__ import annotations

import gzip
import hashlib

from pwriter.data.gzip_members import LaneMembers, Member
from pwriter.plan.layout import GZIP_MIN_PADDING

SLOT = 4096


def text_of(count: int, start: int = 0) -> bytes:
    """``count`` event lines whose text compresses poorly."""
    return b"".join(b'{"seq":%d,"x":"%s"}\n' % (seq, hashlib.sha256(b"%d" % seq).hexdigest().encode())
                    for seq in range(start, start + count))


class Slots:
    """A lane's slots as a padded planner keeps them: ``room`` shrinks with
    every write, and a write that leaves less than ``full_below`` fills the slot."""

    full_below = SLOT // 8

    def __init__(self) -> None:
        self.used: dict[int, int] = {}
        self.writes: list[tuple[int, list[Member]]] = []

    def room(self, lane: int) -> int:
        return SLOT - self.used.get(lane, 0)

    def write(self, lane: int, members: list[Member]) -> None:
        self.writes.append((lane, members))
        used = self.used.get(lane, 0) + sum(len(member) for member, _, _ in members)
        self.used[lane] = 0 if SLOT - used < self.full_below or used > SLOT else used

    def maker(self, *, padded: bool, cut=lambda lane, text: [text]) -> LaneMembers:  # type: ignore[no-untyped-def]
        return LaneMembers(1, padded=padded, write=self.write, cut=cut, room=self.room, capacity=SLOT,
                           min_padding=GZIP_MIN_PADDING, full_below=self.full_below)

    def text(self, lane: int | None = None) -> bytes:
        return b"".join(gzip.decompress(member) for written, members in self.writes for member, _, _ in members
                        if lane is None or written == lane)


def test_unpadded_one_member_per_piece_in_order() -> None:
    slots = Slots()
    halves = lambda lane, text: [text[: text.nbytes // 2], text[text.nbytes // 2 :]]  # noqa: E731
    maker = slots.maker(padded=False, cut=halves)
    text = text_of(10)
    maker.add(0, memoryview(text), since=1.0)
    assert [len(members) for _, members in slots.writes] == [1, 1]  # a member for each piece
    assert slots.text() == text
    assert [events for _, members in slots.writes for _, _, events in members] == [5, 5]
    assert maker.held_since(0) is None and maker.take(0) == []  # nothing is held unpadded


def test_padded_members_fill_slots_and_hold_the_rest_with_its_time() -> None:
    slots = Slots()
    maker = slots.maker(padded=True)
    first = text_of(200)
    maker.add(3, memoryview(first), since=5.0)
    assert slots.writes  # full slots went out
    for _, members in slots.writes:  # each write fits a slot, with room for its padding
        assert sum(len(member) for member, _, _ in members) <= SLOT - GZIP_MIN_PADDING
    assert maker.held_since(3) == 5.0  # the rest is held, since the text's time
    maker.add(3, memoryview(text_of(1, start=200)), since=9.0)
    assert maker.held_since(3) in (5.0, 9.0)  # (9.0 only if a slot was written meanwhile)
    assert maker.flush(3) and maker.held_since(3) is None and not maker.flush(3)
    assert slots.text(3) == first + text_of(1, start=200)


def test_members_made_elsewhere_fill_the_pool_lane() -> None:
    slots = Slots()
    maker = slots.maker(padded=True)
    lanes = [text_of(8, start=100 * lane) for lane in range(4)]
    for lane, text in enumerate(lanes):
        maker.add(lane, memoryview(text), since=None)
    taken = [member for lane in range(4) for member in maker.take(lane)]
    assert len(taken) == 4 and not slots.writes  # each lane held its few lines
    maker.add_members(-1, taken)
    rest = maker.take(-1)
    written = [member for _, members in slots.writes for member in members]
    assert written + rest == taken  # every member once, in order: in full slots, or left for the close
    assert b"".join(gzip.decompress(member) for member, _, _ in written + rest) == b"".join(lanes)
