"""Gzip members for compressed output (blocking; run in worker threads).

Each chunk becomes one standalone gzip member, so that any member can be
decompressed alone (see :class:`~pwriter.sink.MemberIndex`) and the
concatenation is an ordinary multi-member gzip file.  python-isal compresses
(it releases the GIL, so worker threads compress in parallel); its levels are
0 to 3, and a higher level is an error (:func:`check_level`).  Without isal, zlib does it (levels
1 to 9).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import TYPE_CHECKING

from .traceformat import count_newlines, rfind_newline

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["gzip_member", "check_level", "Member", "SlotMembers"]


def check_level(level: int) -> None:
    """Refuse (:class:`~pwriter.settings.ConfigError`) a level the codec does not have."""
    from .settings import ConfigError

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
                    member = self._make(text[done : done + _first_line_end(text[done:])])
                place([member])
            else:
                self.hold(member)
            done += member[1]

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


def _first_line_end(text: memoryview) -> int:
    """The length of the first line of ``text``, its newline included (all of it if it has none)."""
    start = 0
    while start < text.nbytes:
        found = bytes(text[start : start + 65536]).find(b"\n")
        if found >= 0:
            return start + found + 1
        start += 65536
    return text.nbytes
