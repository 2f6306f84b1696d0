"""The sizing policy: how to write, given where and with what.

This module is pure (no I/O, no trio).  Detection (:mod:`pwriter.data.detect`)
turns a path into a :class:`FsInfo`; :func:`plan_sizing` turns that, the
machine and the user's :class:`~pwriter.plan.settings.Settings` into a
:class:`Sizing`, with a one-line reason for every automatic choice (shown by
``pwriter info``).

The rules (explicit settings always win):

Filesystem kind
    From the ``statfs`` f_type magic of the target (or its nearest existing
    parent): NFS, Lustre, GPFS, BeeGFS, tmpfs/ramfs, anything else is local.

Stripe size (the unit of every write, and the flush threshold)
    Lustre: the layout's stripe size.  GPFS: the block size, which GPFS
    stripes by.  Otherwise 2 MiB: the per-chunk work in Python costs little,
    and larger buffers were no faster (``bench/buffer_sizes.py --part 2``).
    Always a multiple of 4 KiB, for O_DIRECT.

Layout
    O_DIRECT: padded-striped, the one layout whose writes all start and end
    on stripe boundaries.
    NFS: sharded (no coherence between writers of one file beyond
    close-to-open, and writes serialised per inode).
    Lustre, GPFS, BeeGFS with a known stripe size: padded-striped, so that
    each write covers whole stripes and no two lanes contend for one
    stripe's lock.  With an unknown stripe size: sharded.
    Local disks, tmpfs: striped (the page cache makes alignment irrelevant).

Lustre layout on create (``stripe_count``)
    A new Lustre file gets the directory's default layout, often one stripe.
    pwriter sets each temporary's layout before its first byte
    (:mod:`pwriter.data.lustre`): an explicit count N (-1: every OST) as
    asked; ``auto`` stripes an output of ``AUTO_STRIPE_ALL_FROM`` or more over
    every OST, gives each shard one stripe with the first OSTs spread evenly,
    and leaves smaller or unsized outputs to the default; 0 always leaves
    it.  The stripe size set is the one above.  The writer reads the layout
    back and sizes itself by what it got.

Lanes (the library's coalescers, the merge's readers; sharded, each with its file)
    Never more than the producers, nor 2 x the CPUs; on Lustre, nor the
    stripe count of a shared file (more writers than stripes add only
    contention).  Otherwise at most 4 on local disks and tmpfs and 8 on
    networked and parallel filesystems (latency hiding).

Buffers
    ``buffers_per_lane`` (default 4) stripe-sized buffers per lane, in one
    pool, cut down to fit the memory budget (at most a quarter of the
    available memory and 256 MiB unless set): fewer buffers per lane first
    (down to 2), then fewer lanes.

Queue depth
    How many fsyncs the backend may have in flight (one per buffer unless
    set); writes are made in their chunk's maker thread, so the makers bound them.

Write call size (the most bytes one write system call carries)
    Buffered writes: 512 KiB (at most the stripe size).  Kernels fill the
    page cache with folios as large as the write call allows, and on a
    virtual machine that hands free memory back to its host, large folios
    are slow now and then; 512 KiB was never far from the best
    (``bench/buffer_sizes.py --part 3``).  O_DIRECT: one call per stripe.
"""

from __future__ import annotations

import dataclasses
import enum

from .layout import LayoutName
from .settings import ConfigError, Settings

__all__ = [
    "FsKind",
    "FsInfo",
    "Sizing",
    "fs_kind_from_magic",
    "plan_sizing",
    "Striping",
    "AUTO_STRIPE_ALL_FROM",
    "shard_offsets",
    "follow_layout_set",
    "DEFAULT_STRIPE_SIZE",
    "FS_MAGIC",
]

MiB = 1 << 20
DEFAULT_STRIPE_SIZE = 2 * MiB
DEFAULT_BUFFERS_PER_LANE = 4
BUFFERED_WRITE_CALL_SIZE = 512 << 10
DEFAULT_MEMORY_CAP = 256 * MiB
MAX_STRIPE_SIZE = 256 * MiB
PAGE = 4096
LUSTRE_STRIPE_UNIT = 64 << 10  # Lustre stripe sizes are multiples of 64 KiB
AUTO_STRIPE_ALL_FROM = 1 << 30  # stripe_count auto: outputs of this size and more go over every OST



class FsKind(str, enum.Enum):
    """The kinds of filesystem the policy tells apart."""

    LUSTRE = "lustre"
    GPFS = "gpfs"
    BEEGFS = "beegfs"
    NFS = "nfs"
    TMPFS = "tmpfs"
    LOCAL = "local"

    @property
    def is_parallel(self) -> bool:
        return self in (FsKind.LUSTRE, FsKind.GPFS, FsKind.BEEGFS)


#: statfs f_type magic numbers (linux/magic.h and the filesystems' sources).
FS_MAGIC: dict[int, FsKind] = {
    0x6969: FsKind.NFS,
    0x0BD00BD0: FsKind.LUSTRE,
    0x47504653: FsKind.GPFS,
    0x19830326: FsKind.BEEGFS,
    0x01021994: FsKind.TMPFS,
    0x858458F6: FsKind.TMPFS,  # ramfs: memory-backed like tmpfs
}


def fs_kind_from_magic(magic: int) -> FsKind:
    """Map a statfs f_type to a kind; unknown magic numbers are local disks."""
    return FS_MAGIC.get(magic & 0xFFFFFFFF, FsKind.LOCAL)


@dataclasses.dataclass(frozen=True)
class FsInfo:
    """What detection learned about the filesystem holding a path.

    ``stripe_size`` / ``stripe_count`` are ``None`` when unknown;
    ``block_size`` is statfs's f_bsize.
    """

    kind: FsKind
    magic: int
    mount_point: str
    block_size: int = PAGE
    stripe_size: int | None = None
    stripe_count: int | None = None
    ost_count: int | None = None
    """Lustre: the OSTs of the filesystem (``lfs osts``), when known."""
    layout_setter: str | None = None
    """Lustre: how a layout can be set on create (``"liblustreapi"`` or ``"lfs"``), or None."""


@dataclasses.dataclass(frozen=True)
class Striping:
    """The Lustre layout to set on each new output file, before its first byte.

    ``stripe_count`` -1 means every OST; ``offsets`` holds each file's first
    OST in read order (-1: Lustre's allocator chooses).
    """

    stripe_count: int
    stripe_size: int
    offsets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The decisions: how many lanes, how big each write, how many buffers.

    ``stripe_size`` is the capacity of every buffer and the flush threshold in
    bytes; ``buffers`` is the total number of such buffers (the writer's
    whole memory for data is ``buffers * stripe_size``); ``queue_depth`` is
    the number of fsyncs the backend may have in flight at once;
    ``write_call_size`` is the most bytes the backend puts in one write
    system call: a write of a larger chunk takes several.
    """

    layout: LayoutName
    lanes: int
    stripe_size: int
    buffers: int
    queue_depth: int
    write_call_size: int
    memory_budget: int
    fs_kind: FsKind
    reasons: tuple[str, ...]
    striping: Striping | None = None
    """Lustre: the layout to set on create (None: the directory's default)."""


def plan_sizing(
    fs: FsInfo,
    settings: Settings,
    *,
    producers: int | None,
    available_memory: int,
    cpu_count: int,
    expected_bytes: int | None = None,
) -> Sizing:
    """Decide the sizing from plain values (see the module docstring).

    ``producers`` is how many producer tasks will write (``None`` when not
    known in advance); ``expected_bytes`` the size of the output, when known
    (for ``stripe_count`` auto).  Raises :class:`ConfigError` when explicit
    settings cannot be honoured (a budget smaller than two stripes, a Lustre
    layout that cannot be set).
    """
    stripe_size, stripe_reason = _stripe_size(fs, settings)
    layout, layout_reason = _layout(fs, settings, stripe_known=settings.stripe_size is not None or bool(fs.stripe_size))
    reasons = [stripe_reason, layout_reason]
    # Lustre layout on create (the stripe size and count the files will have).
    striping, striping_reason = _plan_striping(fs, settings, layout, stripe_size, expected_bytes)
    if striping_reason is not None:
        reasons.append(striping_reason)
    stripe_count = fs.stripe_count
    if striping is not None:
        stripe_count = striping.stripe_count if striping.stripe_count > 0 else fs.ost_count
    lanes, lanes_reason = _lanes(fs, settings, layout, stripe_count, producers, max(1, cpu_count))
    budget, budget_reason = _memory_budget(settings, available_memory)
    reasons += [lanes_reason, budget_reason]
    lanes, per_lane = _fit_buffers(settings, lanes, stripe_size, budget)
    buffers = lanes * per_lane
    if striping is not None:  # one entry per file
        files = lanes if layout == "sharded" else 1
        offsets = shard_offsets(files, fs.ost_count) if layout == "sharded" else (-1,)
        striping = dataclasses.replace(striping, offsets=offsets)
    reasons.append(f"buffers {buffers}: {per_lane} per lane, {buffers * stripe_size} bytes in all")
    queue_depth = settings.queue_depth if settings.queue_depth is not None else buffers
    reasons.append(f"queue depth {queue_depth}")
    write_call_size, write_call_reason = _write_call_size(settings, stripe_size)
    reasons.append(write_call_reason)
    return Sizing(
        layout=layout,
        lanes=lanes,
        stripe_size=stripe_size,
        buffers=buffers,
        queue_depth=queue_depth,
        write_call_size=write_call_size,
        memory_budget=budget,
        fs_kind=fs.kind,
        reasons=tuple(reasons),
        striping=striping,
    )


def _stripe_size(fs: FsInfo, settings: Settings) -> tuple[int, str]:
    """The stripe size and its reason."""
    if settings.stripe_size is not None:
        stripe_size = settings.stripe_size
        reason = f"stripe size {stripe_size} bytes: set explicitly"
    elif fs.stripe_size:
        stripe_size = fs.stripe_size
        reason = f"stripe size {stripe_size} bytes: the {fs.kind.value} stripe size"
    else:
        stripe_size = DEFAULT_STRIPE_SIZE
        reason = f"stripe size {stripe_size} bytes: default for {fs.kind.value}"
    if stripe_size % PAGE or stripe_size > MAX_STRIPE_SIZE:
        raise ConfigError(
            f"invalid setting stripe_size={stripe_size}: must be a multiple of 4096 and at most 256MiB"
        )
    return stripe_size, reason


def _layout(fs: FsInfo, settings: Settings, *, stripe_known: bool) -> tuple[LayoutName, str]:
    """The layout and its reason."""
    if settings.direct and settings.layout not in ("auto", "padded-striped"):
        raise ConfigError(
            f"invalid setting layout={settings.layout!r}: O_DIRECT (direct) needs the padded-striped layout, "
            "whose writes cover whole stripes"
        )
    if settings.direct:
        return "padded-striped", "layout padded-striped: O_DIRECT needs writes of whole, aligned stripes"
    if settings.layout != "auto":
        return settings.layout, f"layout {settings.layout}: set explicitly"
    if fs.kind is FsKind.NFS:
        return "sharded", "layout sharded: NFS does not keep shared-file writers coherent"
    if fs.kind.is_parallel and stripe_known:
        return "padded-striped", f"layout padded-striped: {fs.kind.value} with a known stripe size"
    if fs.kind.is_parallel:
        return "sharded", f"layout sharded: {fs.kind.value} with an unknown stripe size"
    return "striped", f"layout striped: {fs.kind.value} filesystem"


def _lanes(fs: FsInfo, settings: Settings, layout: LayoutName, stripe_count: int | None, producers: int | None,
           cpus: int) -> tuple[int, str]:
    """The write lanes before the memory budget is applied, and the reason."""
    if settings.lanes is not None:
        return settings.lanes, f"lanes {settings.lanes}: set explicitly"
    if fs.kind is FsKind.LUSTRE and stripe_count and layout != "sharded":
        cap, why = stripe_count, "the Lustre stripe count"
    elif fs.kind.is_parallel or fs.kind is FsKind.NFS:
        cap, why = 8, f"at most 8 on {fs.kind.value}"
    else:
        cap, why = 4, f"at most 4 on {fs.kind.value}"
    lanes = min(cap, 2 * cpus)
    if lanes < cap:
        why = f"2 x {cpus} CPUs"
    if producers is not None and 0 < producers < lanes:
        lanes, why = producers, f"{producers} producers"
    lanes = max(1, lanes)
    return lanes, f"lanes {lanes}: {why}"


def _memory_budget(settings: Settings, available_memory: int) -> tuple[int, str]:
    """The memory budget for buffers and its reason."""
    if settings.memory_budget is not None:
        return settings.memory_budget, f"memory budget {settings.memory_budget} bytes: set explicitly"
    budget = max(16 * MiB, min(DEFAULT_MEMORY_CAP, available_memory // 4))
    return budget, f"memory budget {budget} bytes: a quarter of available memory, at most 256MiB"


def _fit_buffers(settings: Settings, lanes: int, stripe_size: int, budget: int) -> tuple[int, int]:
    """The lanes and buffers per lane that fit the budget: fewer buffers per
    lane first (down to 2), then fewer lanes (neither when set explicitly)."""
    per_lane = settings.buffers_per_lane or DEFAULT_BUFFERS_PER_LANE
    if settings.buffers_per_lane is None:
        while per_lane > 2 and lanes * per_lane * stripe_size > budget:
            per_lane -= 1
    if settings.lanes is None:
        while lanes > 1 and lanes * per_lane * stripe_size > budget:
            lanes -= 1
    if lanes * per_lane * stripe_size > budget:
        raise ConfigError(
            f"invalid setting memory_budget={budget}: too small for {lanes} lane(s) x "
            f"{per_lane} buffers x {stripe_size}-byte stripes"
        )
    return lanes, per_lane


def _write_call_size(settings: Settings, stripe_size: int) -> tuple[int, str]:
    """The most bytes of one write call, and the reason."""
    if settings.write_call_size is not None:
        write_call_size = settings.write_call_size
        if write_call_size % PAGE:
            raise ConfigError(
                f"invalid setting write_call_size={write_call_size}: must be a multiple of 4096 (O_DIRECT writes "
                "are cut at these sizes)"
            )
        return write_call_size, f"write calls of at most {write_call_size} bytes: set explicitly"
    if settings.direct:
        return stripe_size, "write calls of one stripe: O_DIRECT bypasses the page cache"
    write_call_size = min(stripe_size, BUFFERED_WRITE_CALL_SIZE)
    return write_call_size, f"write calls of at most {write_call_size} bytes: page-cache folios no larger than that"


def _plan_striping(fs: FsInfo, settings: Settings, layout: LayoutName, stripe_size: int,
                   expected_bytes: int | None) -> tuple[Striping | None, str | None]:
    """The Lustre layout to set on create, or None (the directory's default), and the reason (none off Lustre)."""
    if fs.kind is not FsKind.LUSTRE:
        return None, None
    count = settings.stripe_count
    if count == 0:
        return None, "Lustre layout: the directory's default (stripe_count 0)"
    if fs.layout_setter is None:
        if count != "auto":
            raise ConfigError(f"invalid setting stripe_count={count}: cannot set a Lustre layout here "
                              "(neither liblustreapi nor the lfs command was found)")
        return None, "Lustre layout: the directory's default (neither liblustreapi nor lfs was found)"
    if count == "auto" and layout == "sharded":
        count, why = 1, "auto: one stripe per shard, shards spread over the OSTs"
    elif count == "auto" and expected_bytes is not None and expected_bytes >= AUTO_STRIPE_ALL_FROM:
        count, why = -1, f"auto: every OST for an output of {expected_bytes} bytes (at least {AUTO_STRIPE_ALL_FROM})"
    elif count == "auto":
        size = "of unknown size" if expected_bytes is None else f"of {expected_bytes} bytes"
        return None, (f"Lustre layout: the directory's default (auto: an output {size}; every OST from "
                      f"{AUTO_STRIPE_ALL_FROM} bytes)")
    else:
        why = "set explicitly"
    assert isinstance(count, int)
    if stripe_size % LUSTRE_STRIPE_UNIT:
        raise ConfigError(f"invalid setting stripe_size={stripe_size}: a Lustre stripe size must be a multiple "
                          f"of {LUSTRE_STRIPE_UNIT} (64 KiB)")
    if fs.ost_count and count > fs.ost_count:
        raise ConfigError(f"invalid setting stripe_count={count}: this filesystem has {fs.ost_count} OSTs")
    if layout == "sharded" and fs.ost_count:
        why += f"; shard i starts on OST i x {fs.ost_count} / shards"
    return Striping(stripe_count=count, stripe_size=stripe_size, offsets=(-1,)), (
        f"Lustre layout: stripe count {count}, stripe size {stripe_size} ({why}; set by {fs.layout_setter})")


def shard_offsets(shards: int, ost_count: int | None) -> tuple[int, ...]:
    """The first OST of each shard: spread evenly over ``ost_count`` OSTs
    (-1, Lustre's choice, when the count is not known)."""
    if not ost_count:
        return (-1,) * shards
    return tuple((shard * ost_count // shards) % ost_count if shards <= ost_count else shard % ost_count
                 for shard in range(shards))


def follow_layout_set(
    sizing: Sizing,
    fs: FsInfo,
    settings: Settings,
    *,
    stripe_size: int | None,
    stripe_count: int | None,
    available_memory: int,
    cpu_count: int,
) -> tuple[FsInfo, Sizing]:
    """The filesystem and sizing once the layout of :attr:`Sizing.striping`
    is set and read back (``stripe_size``, ``stripe_count``; None where the
    read-back did not tell).  The files exist: the layout and the number of
    write lanes stay; the stripe size follows what the files got."""
    assert sizing.striping is not None
    got_size = stripe_size or sizing.striping.stripe_size
    fs = dataclasses.replace(fs, stripe_size=got_size, stripe_count=stripe_count or fs.stripe_count)
    read_back = f"Lustre layout read back: stripe count {stripe_count or 'unknown'}, stripe size {got_size}"
    if got_size == sizing.stripe_size:
        return fs, dataclasses.replace(sizing, reasons=sizing.reasons + (read_back,))
    pinned = settings.model_copy(update={"stripe_size": got_size, "lanes": sizing.lanes, "layout": sizing.layout,
                                         "stripe_count": 0})
    again = plan_sizing(fs, pinned, producers=None, available_memory=available_memory, cpu_count=cpu_count)
    return fs, dataclasses.replace(again, striping=sizing.striping,
                                   reasons=sizing.reasons + (read_back + " (sized again for it)",))
