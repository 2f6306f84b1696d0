"""Gzip members: the one maker of the members of compressed output, and their index.

Each chunk becomes standalone gzip members, so that any member can be
decompressed alone (see :class:`MemberIndex`) and the concatenation is an
ordinary multi-member gzip file.  python-isal compresses (it releases the
GIL, so threads compress in parallel); its levels are 0 to 3, and a
higher level is an error (:func:`check_level`).  Without isal, zlib does it
(levels 1 to 9).

:class:`LaneMembers` makes the members of every lane of an output, in the
thread of the lane's maker (blocking): a member per chunk, or in a padded
layout members sized by what they compress to, to fill the lane's slots
(:class:`SlotMembers`).  It places and writes through the callbacks it is
given (the chunk sink's, :mod:`pwriter.data.sink`, which imports this module;
this module never imports the sink).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..plan.layout import Placement, gzip_padding_members
from ..plan.traceformat import count_newlines, line_end, rfind_newline

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["gzip_member", "check_level", "compress_chunk", "Member", "SlotMembers", "LaneMembers", "MemberIndex"]


def check_level(level: int) -> None:
    """Refuse (:class:`~pwriter.plan.settings.ConfigError`) a level the codec does not have."""
    from ..plan.settings import ConfigError

    try:
        from isal import igzip  # noqa: F401
    except ImportError:
        lowest, highest, codec = 1, 9, "zlib"
    else:
        lowest, highest, codec = 0, 3, "python-isal"
    if not lowest <= level <= highest:
        raise ConfigError(f"invalid setting level={level}: {codec} compresses at levels {lowest} to {highest}")


def gzip_member(data: Buffer, level: int) -> bytes:
    """``data`` as one gzip member (mtime 0, so output is reproducible)."""
    try:
        from isal import igzip
    except ImportError:
        return gzip.compress(bytes(data), compresslevel=max(1, level), mtime=0)
    return igzip.compress(data, compresslevel=min(level, 3), mtime=0)


def compress_chunk(text: memoryview, level: int) -> tuple[bytes, int]:
    """``text`` as one gzip member, and the lines in it."""
    return gzip_member(text, level), count_newlines(text)


Member = tuple[bytes, int, int]
"""A gzip member, the bytes of text in it, and its lines."""

# Bytes a gzip member costs beyond its deflate stream (header and trailer),
# and a little more.
MEMBER_OVERHEAD = 24
# A member's text is cut at the learned ratio times this, so that a member
# seldom outgrows the room it was sized for (one that does is made again from
# less text).
RATIO_MARGIN = 1.04


class SlotMembers:
    """The gzip members of one lane in a padded layout, sized by what they
    compress to, so that they fill the lane's slots.

    The lane's text (whole lines) is cut into members that fit the room left
    in its slot (``room()``, less the members held and ``min_padding``): the
    text a member may take is guessed from the compression ratio of the
    lane's last member, and a member that comes out too large is made again
    from fewer lines.  Members are held until the slot is full (less than
    ``full_below`` bytes left, or the next line does not fit), then handed
    to ``place`` together, as one write that ends in the slot's padding.
    :meth:`take` hands out the members held before that (a deadline, the end
    of the lane).  A line that does not fit even a new slot
    (``capacity`` bytes) is a member alone, over whole slots.

    Blocking; one lane's members are made by one thread at a time.
    """

    def __init__(self, level: int, *, room: Callable[[], int], capacity: int, min_padding: int,
                 full_below: int) -> None:
        self.level = level
        self.ratio = 0.5  # compressed bytes per byte of text, with RATIO_MARGIN; learned from every member
        self._room = room
        self._capacity = capacity
        self._min_padding = min_padding
        self._full_below = full_below
        self.held: list[Member] = []
        self.held_bytes = 0

    def add(self, text: memoryview, place: Callable[[list[Member]], None]) -> None:
        """Cut ``text`` into members; ``place`` every slot's worth that is full."""
        done, total = 0, text.nbytes
        while done < total:
            available = self._room() - self.held_bytes
            if self.held and available < self._full_below:
                place(self.take())
                continue
            member = self._member(text[done:], available - self._min_padding)
            if member is None and self.held:  # the slot is as full as this text can make it
                place(self.take())
                continue
            if member is None:
                # Not one line fits what is left of the lane's slot: the
                # member goes to a new slot (the lane leaves this one), or
                # alone over whole slots if not even a new one holds it.
                member = self._member(text[done:], self._capacity - self._min_padding)
                if member is None:
                    member = self._make(text[done : line_end(text, done)])
                place([member])
            else:
                self.hold(member)
            done += member[1]

    def add_members(self, members: Iterable[Member], place: Callable[[list[Member]], None]) -> None:
        """Hold members made elsewhere (the lanes' last, partial slots: the
        pool's lane); ``place`` every slot's worth that is full."""
        for member in members:
            available = self._room() - self.held_bytes
            if self.held and len(member[0]) != available and len(member[0]) > available - self._min_padding:
                place(self.take())
            self.hold(member)
        if self.held and self._room() - self.held_bytes < self._full_below:
            place(self.take())

    def hold(self, member: Member) -> None:
        """Hold ``member`` with the others until the slot is written."""
        self.held.append(member)
        self.held_bytes += len(member[0])

    def take(self) -> list[Member]:
        """The members held (none is lost: the caller places them)."""
        held, self.held, self.held_bytes = self.held, [], 0
        return held

    def _member(self, text: memoryview, budget: int) -> Member | None:
        """A member of the longest run of whole lines at the start of
        ``text`` that compresses to at most ``budget`` bytes, as far as the
        ratio guesses; None if not one line fits."""
        total = text.nbytes
        cut = total
        for _ in range(8):
            if budget <= MEMBER_OVERHEAD:
                return None
            fits = int((budget - MEMBER_OVERHEAD) / self.ratio)
            if fits < cut:
                cut = rfind_newline(text, 0, fits) + 1
                if cut == 0:
                    return None
            member = self._make(text[:cut])
            if len(member[0]) <= budget:
                return member
            budget -= 1 + (len(member[0]) - budget) // 2  # too large: aim lower
        return None

    def _make(self, text: memoryview) -> Member:
        member = gzip_member(text, self.level)
        self.ratio = max(len(member) - MEMBER_OVERHEAD, 1) / text.nbytes * RATIO_MARGIN
        return member, text.nbytes, count_newlines(text)


class LaneMembers:
    """Makes the gzip members of every lane of one output (see the module
    docstring), in the thread of the lane's maker; one lane's calls are
    made one at a time.

    ``write(lane, members)`` places and writes ``members`` as ``lane``'s
    next chunk; ``cut(lane, text)`` is ``text`` in its shard pieces (each a
    member of its own); ``room(lane)`` is the room left in ``lane``'s slot
    (padded layouts, whose slots are ``capacity`` bytes, end in at least
    ``min_padding`` bytes of padding and are full below ``full_below``).
    In a padded layout, what does not fill a slot is held, with when its
    oldest line was queued (:meth:`held_since`).
    """

    def __init__(self, level: int, *, padded: bool, write: Callable[[int, list[Member]], None],
                 cut: Callable[[int, memoryview], list[memoryview]], room: Callable[[int], int], capacity: int,
                 min_padding: int, full_below: int) -> None:
        self.level = level
        self._padded = padded
        self._write = write
        self._cut = cut
        self._room = room
        self._capacity = capacity
        self._min_padding = min_padding
        self._full_below = full_below
        self._lanes: dict[int, SlotMembers] = {}  # padded: each lane's members
        self._since: dict[int, float] = {}  # padded: when the oldest line of a lane's held members was queued

    def add(self, lane: int, text: memoryview, since: float | None) -> None:
        """Compress ``text`` (whole lines of ``lane``, whose oldest was queued
        at ``since``) into members; write what is finished."""
        if not self._padded:
            for piece in self._cut(lane, text):
                member, events = compress_chunk(piece, self.level)
                self._write(lane, [(member, piece.nbytes, events)])
            return
        members = self._slots(lane)
        held_before = bool(members.held)
        wrote: list[bool] = []

        def write(finished: list[Member]) -> None:
            wrote.append(True)
            self._write(lane, finished)

        members.add(text, write)
        if not members.held or since is None:
            self._since.pop(lane, None)
        elif wrote or not held_before:  # what it holds came with this text
            self._since[lane] = since
        else:
            self._since[lane] = min(self._since.get(lane, since), since)

    def add_members(self, lane: int, members: Iterable[Member]) -> None:
        """Members made elsewhere, into ``lane``'s slots (the pool's lane); writes every full slot."""
        self._slots(lane).add_members(members, lambda finished: self._write(lane, finished))

    def held_since(self, lane: int) -> float | None:
        """When the oldest line of ``lane``'s held members was queued (None: none held, or no time given)."""
        return self._since.get(lane)

    def flush(self, lane: int) -> bool:
        """Write ``lane``'s held members now, without padding; whether there were any."""
        held = self.take(lane)
        if held:
            self._write(lane, held)
        return bool(held)

    def take(self, lane: int) -> list[Member]:
        """The members ``lane`` holds (less than a slot), taken: the caller places them."""
        self._since.pop(lane, None)
        members = self._lanes.get(lane)
        return members.take() if members is not None else []

    def _slots(self, lane: int) -> SlotMembers:
        members = self._lanes.get(lane)
        if members is None:
            members = self._lanes[lane] = SlotMembers(
                self.level, room=lambda: self._room(lane), capacity=self._capacity, min_padding=self._min_padding,
                full_below=self._full_below)
        return members


class MemberIndex:
    """The gzip members of one output, for its member index (safe from any thread).

    An entry is ``(file, offset, length, text length, events, listed)``:
    padding members are not listed, but their text counts in the
    ``text_offset`` of the members after them.  Entries of several writers
    of one output (MPI ranks) can be joined with :meth:`add_entries`.
    """

    def __init__(self, header_text: int) -> None:
        self._header_text = header_text
        self._lock = threading.Lock()
        self._entries: list[tuple[int, int, int, int, int, bool]] = []

    def record_members(self, placement: Placement, members: Sequence[tuple[int, int, int]]) -> None:
        """Remember the members of ``placement``: its header, the body's
        ``members`` (length, text length, events) one after the other, and its padding."""
        file, offset = placement.file, placement.offset + placement.head
        if placement.head:
            self.record(Placement(file, placement.offset, placement.head, 0, 0), text=0, events=0)
        for length, text, events in members:
            self.record(Placement(file, offset, 0, length, 0), text=text, events=events)
            offset += length
        if placement.pad:
            self.record(Placement(file, offset, 0, 0, placement.pad), text=0, events=0)

    def record(self, placement: Placement, *, text: int, events: int) -> None:
        """Remember the members of ``placement``: its header, body and padding."""
        file, offset = placement.file, placement.offset
        entries = []
        if placement.head:
            entries.append((file, offset, placement.head, self._header_text, 0, True))
        if placement.body:
            entries.append((file, offset + placement.head, placement.body, text, events, True))
        if placement.pad:
            entries.append((file, offset + placement.head + placement.body, placement.pad,
                            gzip_padding_members(placement.pad), 0, False))
        with self._lock:
            self._entries.extend(entries)

    def entries(self) -> list[tuple[int, int, int, int, int, bool]]:
        with self._lock:
            return list(self._entries)

    def add_entries(self, entries: Iterable[Sequence[int]]) -> None:
        """Join entries taken from another index (:meth:`entries`, or lists of their values)."""
        joined = [(int(f), int(o), int(n), int(t), int(e), bool(li)) for f, o, n, t, e, li in entries]
        with self._lock:
            self._entries.extend(joined)

    def index(self, files: list[str]) -> dict[str, object]:
        """The member index (its format: ``docs/layouts.md``) over ``files`` (base names, in read order)."""
        members = []
        text_offset = first_event = 0
        for file, offset, length, text, events, listed in sorted(self.entries()):
            if listed:
                members.append({
                    "file": file, "offset": offset, "length": length, "text_offset": text_offset,
                    "text_length": text, "first_event": first_event, "events": events,
                })
            text_offset += text
            first_event += events
        return {"format": "pwriter-members/1", "files": files, "members": members}
