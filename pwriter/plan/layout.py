"""Layout planners: which file, and which offset, every byte goes to.

Theory of operation
-------------------
Makers (the writer's coalescers, the merge's readers) fill buffers with
whole lines; each chunk belongs to a write *lane* (a shard, when sharded).
When a buffer is full, the chunk sink asks the planner for a
:class:`Placement`: a file index, an offset, and what surrounds the chunk
there.  The planner answers at once and never does I/O (nor locks: the sink
calls it under its placement lock); the sink writes ``[header] + chunk +
[padding]`` there in one vectored write.  Offsets are decided when a chunk
is *ready*, so lanes never wait for each other.

Each planner keeps one invariant, checked by the property tests: its
placements tile every file from offset 0 to its final size with no gap (a
hole of zero bytes, which trace readers refuse) and no overlap (lost data).

* **striped**: one file.  The header takes ``[0, len(header))`` at open;
  every chunk takes the next ``len(chunk)`` bytes from a counter; the footer
  is reserved last, at close.

* **padded-striped**: one file cut into slots of ``stripe_size`` bytes, each
  written by one lane only.  A lane keeps the slot of its first chunk: its
  next chunks go right after (a deadline flush writes a few lines there),
  until a chunk would not fit; then the rest of the slot is padding and the
  chunk starts the lane's next slot.  A chunk that leaves less than
  ``full_below`` bytes of its slot is written with its padding, so a full
  slot is one write of a whole stripe.  The header rides with the first
  chunk at offset 0.  A chunk larger than a slot (a line longer than the
  stripe) takes as many whole slots as it needs.  Padding is never shorter
  than ``min_padding`` (plain: 1 byte; gzip: one padding member).  The
  padding of slots left behind is handed out by :meth:`paddings`; at close
  the lanes' last slots are padded too, except the file's last, which the
  footer follows directly.

* **sharded**: one file per lane.  The header starts shard 0, the footer ends
  the last shard; read order is shard 0, 1, 2, ...

* **sharded with a shard size** (:class:`SizedShardedPlanner`): each lane
  writes shards of its own, starting a new one once its shard holds
  ``shard_size`` bytes of lines; every shard is a complete trace, and files
  are numbered (and read) in the order they are started.  The sink cuts a
  lane's text at the shard limits before placing it
  (:meth:`SizedShardedPlanner.cut`, before compression).

Several processes (MPI ranks, :mod:`pwriter.faces.mpi`) can write one
striped or padded-striped file, each its *share*, through shared-file
planners (:class:`SharedStripedPlanner`, :class:`SharedPaddedPlanner`)
whose offsets come from one :class:`Counter` that the caller provides (an
atomic fetch-add; the planners stay pure).  The header is placed by the
share that writes it (padded: alone in slot 0), the footer by whoever
finishes the file, at the counter's last value.

Plain padding is ``n - 1`` spaces and a newline, a line every trace reader
skips (``docs/layouts.md``).  Gzip padding is gzip members with an FEXTRA
field that each hold one ``"\n"`` (23 bytes at least); never an empty
member, which one field reader stops at.  Chunks are then whole members.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

from .traceformat import line_end

__all__ = [
    "Placement",
    "Planner",
    "StripedPlanner",
    "PaddedStripedPlanner",
    "ShardedPlanner",
    "SizedShardedPlanner",
    "SharedStripedPlanner",
    "SharedPaddedPlanner",
    "Counter",
    "LocalCounter",
    "padded_length",
    "make_planner",
    "plain_padding",
    "gzip_padding",
    "gzip_padding_members",
    "GZIP_MIN_PADDING",
    "FULL_FRACTION",
]

LayoutName = Literal["striped", "padded-striped", "sharded"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one write goes: ``head`` header bytes, then ``body`` bytes of
    chunk (or footer), then ``pad`` bytes of padding, from ``offset`` on in
    output file number ``file``."""

    file: int
    offset: int
    head: int
    body: int
    pad: int

    @property
    def length(self) -> int:
        return self.head + self.body + self.pad

    @property
    def end(self) -> int:
        return self.offset + self.length


class Planner(Protocol):
    """The interface shared by the three planners."""

    layout: LayoutName
    files: int
    chunk_capacity: int
    shared_file: bool

    def open(self) -> Placement | None:
        """Placement of the header at open, or None when it rides with the first chunk."""

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        """Reserve room for a chunk of ``length`` bytes (``length`` > 0) from
        ``lane``, which holds ``text`` bytes of lines (None: ``length``; a
        gzip chunk holds more; only a shard size counts them)."""

    def close(self, footer_length: int) -> Placement:
        """Reserve the footer; no chunk may be placed afterwards."""

    def close_files(self, footer_length: int) -> list[Placement]:
        """:meth:`close` for every file that ends in a footer (a shard size:
        every shard), in file order."""

    def cut(self, lane: int, text: memoryview) -> list[memoryview]:
        """``text`` (whole lines, ``lane``'s next) in the pieces that each go
        to one file, to be placed one by one in this order (a shard size:
        cut at the shard limits; otherwise ``[text]``)."""

    def file_sizes(self) -> list[int]:
        """Size each file has once everything placed so far is written."""

    def room(self, lane: int) -> int:
        """The most bytes ``lane``'s next chunk can take without starting a
        new slot (padded layouts; others: ``chunk_capacity``)."""

    def paddings(self) -> list[Placement]:
        """The padding owed so far (padded layouts: of the slots lanes left,
        and after :meth:`close` of every slot), each handed out once."""


def plain_padding(length: int) -> bytes:
    """``length`` bytes of plain-text padding: spaces ending in a newline."""
    if length <= 0:
        return b""
    return b" " * (length - 1) + b"\n"


#: A padded slot is full when less than ``stripe_size // FULL_FRACTION`` bytes of it are left.
FULL_FRACTION = 256
#: The smallest padding gzip allows: one padding member (see :func:`gzip_padding`).
GZIP_MIN_PADDING = 23
_GZIP_MAX_MEMBER = GZIP_MIN_PADDING + 0xFFFF
# The text of a padding member: one whitespace line.  Not an empty member:
# dftracer_split (0.0.14) stops reading a file at its first empty member.
_PADDING_TEXT = b"\n"
# b"\n" as a final fixed-Huffman deflate block, then its CRC32 and ISIZE.
_PADDING_DEFLATE = b"\xe3\x02\x00"
_PADDING_TRAILER = (0x32D70693).to_bytes(4, "little") + len(_PADDING_TEXT).to_bytes(4, "little")


def _padding_member(size: int) -> bytes:
    # Header with FEXTRA (flag 0x04), XLEN, XLEN bytes of spaces (to make
    # the member exactly ``size`` bytes), then the deflated "\n".
    extra = size - GZIP_MIN_PADDING
    return (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + extra.to_bytes(2, "little")
        + b" " * extra
        + _PADDING_DEFLATE
        + _PADDING_TRAILER
    )


def gzip_padding(length: int) -> bytes:
    """``length`` bytes of gzip padding: gzip members whose header carries
    an FEXTRA field (sized to fill exactly ``length`` bytes) and whose text
    is one whitespace line, ``"\n"``, which every trace reader skips
    (zcat, Python, dftracer's split, event_count and validate).  Never an
    empty member, never a byte between members.  ``length`` is 0 or at
    least :data:`GZIP_MIN_PADDING`."""
    if length == 0:
        return b""
    if length < GZIP_MIN_PADDING:
        raise ValueError(f"gzip padding of {length} bytes is impossible (at least {GZIP_MIN_PADDING})")
    count = gzip_padding_members(length)
    base, extra = divmod(length, count)
    return b"".join(_padding_member(base + (1 if index < extra else 0)) for index in range(count))


def gzip_padding_members(length: int) -> int:
    """How many members :func:`gzip_padding` makes ``length`` bytes of (each
    decompresses to one ``"\n"``: that many bytes of text)."""
    return -(-length // _GZIP_MAX_MEMBER)


class _Closed:
    closed = False
    shared_file = False
    """Whether the file is shared with other writers (MPI ranks), so that
    this share cannot know whether it stays empty (see :meth:`file_sizes`)."""
    chunk_capacity: int

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("planner is closed: no chunk may follow the footer")

    def room(self, lane: int) -> int:
        return self.chunk_capacity

    def paddings(self) -> list[Placement]:
        return []

    def close(self, footer_length: int) -> Placement:
        raise NotImplementedError

    def close_files(self, footer_length: int) -> list[Placement]:
        return [self.close(footer_length)]

    def cut(self, lane: int, text: memoryview) -> list[memoryview]:
        return [text]


class StripedPlanner(_Closed):
    """One file; header, chunks and footer from one running counter."""

    layout: LayoutName = "striped"
    files = 1

    def __init__(self, *, header_length: int, stripe_size: int) -> None:
        self.header_length = header_length
        self.chunk_capacity = stripe_size
        self._next = 0

    def open(self) -> Placement:
        self._next = self.header_length
        return Placement(0, 0, self.header_length, 0, 0)

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        self._check_open()
        offset, self._next = self._next, self._next + length
        return Placement(0, offset, 0, length, 0)

    def close(self, footer_length: int) -> Placement:
        self._check_open()
        self.closed = True
        offset, self._next = self._next, self._next + footer_length
        return Placement(0, offset, 0, footer_length, 0)

    def file_sizes(self) -> list[int]:
        return [self._next]


class _SlotKeeper(_Closed):
    """Slots kept by their lanes (see the module docstring); a subclass says
    where new slots come from (:meth:`_take`) and where the header goes."""

    def __init__(self, *, header_length: int, stripe_size: int, min_padding: int) -> None:
        if min_padding >= stripe_size:
            raise ValueError("min_padding must be smaller than a stripe")
        self.header_length = header_length
        self.stripe_size = stripe_size
        self.min_padding = min_padding
        self.chunk_capacity = stripe_size - header_length
        self.full_below = max(min_padding, stripe_size // FULL_FRACTION)
        """A chunk that leaves less of its slot than this fills it (its padding goes with it)."""
        self._open: dict[int, tuple[int, int]] = {}  # lane -> (next offset in its slot, slot end)
        self._owed: list[Placement] = []  # padding of slots left behind, not yet handed out

    def _take(self, length: int) -> int:
        """The offset of ``length`` bytes of new whole slots."""
        raise NotImplementedError

    def _head(self) -> int:
        """Header bytes the next new slot starts with (0 when the header is elsewhere)."""
        return 0

    def room(self, lane: int) -> int:
        """The most bytes ``lane`` can place without starting a new slot (a
        lane without a slot: a new slot's, less the header's length, since
        any new slot may be the one that carries it)."""
        kept = self._open.get(lane)
        if kept is None:
            return self.chunk_capacity
        return kept[1] - kept[0]

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        self._check_open()
        kept = self._open.pop(lane, None)
        if kept is not None:
            offset, end = kept
            left = end - offset - length
            if left == 0 or left >= self.min_padding:
                return self._keep(lane, Placement(0, offset, 0, length, 0), end)
            self._owed.append(Placement(0, offset, 0, 0, end - offset))  # the lane leaves its slot
        head = self._head()
        used = head + length
        total = padded_length(used, self.stripe_size, self.min_padding)
        offset = self._take(total)
        if total == self.stripe_size:
            return self._keep(lane, Placement(0, offset, head, length, 0), offset + total)
        return Placement(0, offset, head, length, total - used)  # larger than a slot: whole slots, padded

    def _keep(self, lane: int, placement: Placement, end: int) -> Placement:
        """``placement`` in ``lane``'s slot (which ends at ``end``): pad it now
        if the slot is full, else keep the slot for the lane's next chunk."""
        left = end - placement.end
        if left < self.full_below:
            return dataclasses.replace(placement, pad=left)
        self._open[lane] = (placement.end, end)
        return placement

    def paddings(self) -> list[Placement]:
        owed, self._owed = self._owed, []
        return owed

    def _pad_kept(self, unpadded_end: int | None = None) -> None:
        """At close: owe the padding of every kept slot but the one ending at ``unpadded_end``."""
        for offset, end in sorted(self._open.values()):
            if end != unpadded_end:
                self._owed.append(Placement(0, offset, 0, 0, end - offset))
        self._open.clear()


class PaddedStripedPlanner(_SlotKeeper):
    """One file of stripe-aligned slots, each kept by one lane (see the module docstring)."""

    layout: LayoutName = "padded-striped"
    files = 1

    def __init__(self, *, header_length: int, stripe_size: int, min_padding: int = 1) -> None:
        if header_length >= stripe_size:
            raise ValueError("the header must be shorter than a stripe")
        super().__init__(header_length=header_length, stripe_size=stripe_size, min_padding=min_padding)
        self._next = 0  # the next free slot: always a multiple of stripe_size
        self._header_pending = True

    def open(self) -> None:
        return None

    def _head(self) -> int:
        head = self.header_length if self._header_pending else 0
        self._header_pending = False
        return head

    def _take(self, length: int) -> int:
        offset, self._next = self._next, self._next + length
        return offset

    def close(self, footer_length: int) -> Placement:
        self._check_open()
        self.closed = True
        head = self._head()
        offset = self._next
        last = [kept for kept in self._open.values() if kept[1] == self._next]
        if last:  # the file's last slot is still a lane's: the footer follows its lines
            offset = last[0][0]
        self._pad_kept(unpadded_end=self._next if last else None)
        placement = Placement(0, offset, head, footer_length, 0)
        self._next = placement.end
        return placement

    def file_sizes(self) -> list[int]:
        return [self._next]


def padded_length(used: int, stripe_size: int, min_padding: int) -> int:
    """The whole slots ``used`` bytes take, padding of at least ``min_padding`` bytes (or none) included."""
    slots = -(-used // stripe_size)
    pad = slots * stripe_size - used
    if 0 < pad < min_padding:
        pad += stripe_size
    return used + pad


class Counter(Protocol):
    """A running offset that every share of a shared file reserves from."""

    def fetch_add(self, amount: int) -> int:
        """Add ``amount``; return the value before (atomically, across every share)."""


class LocalCounter:
    """A :class:`Counter` in this process (its callers hold one lock)."""

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def fetch_add(self, amount: int) -> int:
        value, self.value = self.value, self.value + amount
        return value


class _Share:
    """One share of a file that several processes write: new bytes are
    taken from the shared ``counter``; the share ends where the furthest of
    them does."""

    files = 1
    shared_file = True
    counter: Counter
    _end: int

    def _take(self, length: int) -> int:
        offset = self.counter.fetch_add(length)
        self._end = max(self._end, offset + length)
        return offset

    def file_sizes(self) -> list[int]:
        return [self._end]  # of this share: the file ends at the counter's last value


class SharedStripedPlanner(_Share, _Closed):
    """One share of a striped file that several processes write: each chunk
    takes the next bytes of the shared ``counter``, which starts after the
    header.  Only the share with ``writes_header`` places the header (at
    open); no share places the footer (its :meth:`close` reserves nothing:
    the footer goes at the counter's value once every share is done)."""

    layout: LayoutName = "striped"

    def __init__(self, *, counter: Counter, header_length: int, stripe_size: int, writes_header: bool) -> None:
        self.counter = counter
        self.header_length = header_length
        self.chunk_capacity = stripe_size
        self.writes_header = writes_header
        self._end = header_length

    def open(self) -> Placement | None:
        return Placement(0, 0, self.header_length, 0, 0) if self.writes_header else None

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        self._check_open()
        return Placement(0, self._take(length), 0, length, 0)

    def close(self, footer_length: int) -> Placement:
        self._check_open()
        self.closed = True
        return Placement(0, self._end, 0, 0, 0)


class SharedPaddedPlanner(_Share, _SlotKeeper):
    """One share of a padded-striped file that several processes write:
    slot 0 holds the header alone (padded), placed by the share with
    ``writes_header``; every new slot is taken whole from the shared
    ``counter``, which starts at slot 1 (at 0 when there is no header), so no two shares ever write the same
    stripe, and a share's lanes keep their slots as in
    :class:`PaddedStripedPlanner`.  The footer follows the last slot (see
    :class:`SharedStripedPlanner`); every kept slot is padded at close."""

    layout: LayoutName = "padded-striped"

    def __init__(self, *, counter: Counter, header_length: int, stripe_size: int, min_padding: int,
                 writes_header: bool) -> None:
        if header_length + min_padding > stripe_size:
            raise ValueError("the header and its padding must fit one stripe")
        super().__init__(header_length=header_length, stripe_size=stripe_size, min_padding=min_padding)
        self.counter = counter
        self.writes_header = writes_header
        self._end = stripe_size if header_length else 0  # (no header: no slot 0 of its own, the counter starts at 0)

    def open(self) -> Placement | None:
        if not self.writes_header or not self.header_length:
            return None
        return Placement(0, 0, self.header_length, 0, self.stripe_size - self.header_length)

    def close(self, footer_length: int) -> Placement:
        self._check_open()
        self.closed = True
        self._pad_kept()
        return Placement(0, self._end, 0, 0, 0)


class ShardedPlanner(_Closed):
    """One file per lane; header starts shard 0, footer ends the last."""

    layout: LayoutName = "sharded"

    def __init__(self, *, header_length: int, stripe_size: int, shards: int) -> None:
        if shards < 1:
            raise ValueError("at least one shard is needed")
        self.header_length = header_length
        self.chunk_capacity = stripe_size
        self.files = shards
        self._next = [0] * shards

    def open(self) -> Placement:
        self._next[0] = self.header_length
        return Placement(0, 0, self.header_length, 0, 0)

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        self._check_open()
        shard = lane % self.files
        offset = self._next[shard]
        self._next[shard] = offset + length
        return Placement(shard, offset, 0, length, 0)

    def close(self, footer_length: int) -> Placement:
        self._check_open()
        self.closed = True
        last = self.files - 1
        offset = self._next[last]
        self._next[last] = offset + footer_length
        return Placement(last, offset, 0, footer_length, 0)

    def file_sizes(self) -> list[int]:
        return list(self._next)


class SizedShardedPlanner(_Closed):
    """Sharded, each lane's lines in shards of about ``shard_size`` bytes
    of text, each a complete trace (see the module docstring).

    File numbers are given out as shards are started (:attr:`files` grows);
    the caller creates file ``n`` when a placement first names it.  A lane
    starts a new shard with the placement that follows one which brought its
    shard's text to ``shard_size`` or more; that placement carries the
    header (``head``).  :meth:`close_shards` places a footer at the end of
    every shard (and, when no chunk was placed at all, makes shard 0 of the
    header and the footer alone).
    """

    layout: LayoutName = "sharded"

    def __init__(self, *, header_length: int, stripe_size: int, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError("a shard size is at least 1 byte")
        self.header_length = header_length
        self.chunk_capacity = stripe_size
        self.shard_size = shard_size
        self.files = 0
        self._sizes: list[int] = []
        self._shard: dict[int, tuple[int, int]] = {}  # lane -> (its shard, the text placed in it)
        self._cut: dict[int, int] = {}  # lane -> the text its shard holds, as cut (see cut)

    def open(self) -> None:
        return None

    def cut(self, lane: int, text: memoryview) -> list[memoryview]:
        """``text`` (whole lines, ``lane``'s next) in pieces that each go to
        one shard: a piece ends with the line that brings its shard to
        ``shard_size`` bytes of text, or with ``text``.  Place the pieces
        one by one, in this order, before the lane's next cut."""
        pieces = []
        filled = self._cut.get(lane, 0)
        while text.nbytes:
            if filled >= self.shard_size:
                filled = 0  # (the next piece starts a new shard)
            need = self.shard_size - filled
            end = text.nbytes if text.nbytes < need else line_end(text, need - 1)
            pieces.append(text[:end])
            filled += end
            text = text[end:]
        self._cut[lane] = filled
        return pieces

    def place(self, lane: int, length: int, text: int | None = None) -> Placement:
        """Place ``length`` bytes holding ``text`` bytes of lines (plain: ``length``)."""
        self._check_open()
        shard = self._shard.get(lane)
        head = 0
        if shard is None or shard[1] >= self.shard_size:
            shard, head = (self._new_file(), 0), self.header_length
        file, filled = shard
        offset = self._sizes[file]
        self._sizes[file] = offset + head + length
        self._shard[lane] = (file, filled + (length if text is None else text))
        return Placement(file, offset, head, length, 0)

    def close_shards(self, footer_length: int) -> list[Placement]:
        """The footer of every shard, in file order; no chunk may be placed afterwards."""
        self._check_open()
        self.closed = True
        if not self.files:
            self._new_file()
            self._sizes[0] = self.header_length + footer_length
            return [Placement(0, 0, self.header_length, footer_length, 0)]
        footers = [Placement(file, size, 0, footer_length, 0) for file, size in enumerate(self._sizes)]
        self._sizes = [size + footer_length for size in self._sizes]
        return footers

    def close(self, footer_length: int) -> Placement:
        """:meth:`close_shards`' last footer (the sink takes them all)."""
        return self.close_shards(footer_length)[-1]

    def close_files(self, footer_length: int) -> list[Placement]:
        return self.close_shards(footer_length)

    def file_sizes(self) -> list[int]:
        return list(self._sizes)

    def _new_file(self) -> int:
        self._sizes.append(0)
        self.files += 1
        return self.files - 1


def make_planner(
    layout: LayoutName, *, header_length: int, stripe_size: int, lanes: int, min_padding: int = 1,
    shard_size: int | None = None,
) -> Planner:
    """The planner for ``layout``; sharded layouts get one shard per lane,
    or with ``shard_size`` shards of that many bytes of lines (:class:`SizedShardedPlanner`)."""
    if shard_size is not None:
        if layout != "sharded":
            raise ValueError(f"a shard size is for the sharded layout, not {layout}")
        return SizedShardedPlanner(header_length=header_length, stripe_size=stripe_size, shard_size=shard_size)
    if layout == "striped":
        return StripedPlanner(header_length=header_length, stripe_size=stripe_size)
    if layout == "padded-striped":
        return PaddedStripedPlanner(header_length=header_length, stripe_size=stripe_size, min_padding=min_padding)
    if layout == "sharded":
        return ShardedPlanner(header_length=header_length, stripe_size=stripe_size, shards=lanes)
    raise ValueError(f"unknown layout {layout!r}")
