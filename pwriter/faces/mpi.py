"""``mpiexec -n N pwriter merge ...``: one merge over many MPI ranks into one output.

Theory of operation
-------------------
Every rank runs the same command line and goes through the same steps in
the same order; each step ends in an *agreement* (a non-blocking
all-reduce of "did anyone fail?", polled from trio, then the first
failure's message), so that an error on any rank ends every rank the same
way, with the same exit code, and nothing is published:

1. **Decide** (rank 0): collect and check the inputs and the output, detect
   the filesystem, size the writer (memory and CPUs divided among the ranks
   of each node), create the shared file's temporary (on Lustre with its
   layout, read back).  The decision goes to every rank.
2. **Open**: each rank takes its share of the inputs
   (:func:`~pwriter.service.merge.partition`, by size) and opens the shared
   file by name; sharded, it creates its own ``lanes`` shards, so that
   thousands of ranks never wait for one to create every shard.
3. **Merge**: each rank merges its share with the normal data plane, as one
   *share* of the output (:class:`RankShare`):

   * striped: each chunk takes the next bytes of one counter shared by every
     rank, an MPI one-sided fetch-and-add on rank 0 (:class:`WindowCounter`);
     or, with ``--mpi-offsets exscan``, each rank first counts its share's
     bytes (one more read), and an exclusive prefix sum gives it its own
     range;
   * padded-striped: each chunk takes whole stripe slots from the shared
     counter, so no two ranks write one stripe; slot 0 holds the header;
   * sharded: rank r writes shards r x w to r x w + w - 1; the header starts
     rank 0's first, the footer ends the last rank's last.  With a shard
     size, each rank makes its shards as its lanes start them, each a
     complete trace, at least one; the set's read order is rank 0's shards,
     then rank 1's, ...

   A rank that fails adds a huge value to the shared counter, so that every
   other rank fails at its next placement.
4. **Close**: each rank waits for its writes and fsyncs its files; the
   agreement says whether every share is whole.
5. **Commit** (rank 0): the footer at the counter's last value, the member
   index and the shard names gathered from every rank, the manifest; then
   the one all-or-nothing publish of :mod:`pwriter.data.output`, agreed too.

On failure rank 0 removes the shared file's temporary and each rank the
shards it created.  A rank killed outright makes mpiexec kill every rank:
nothing is published, and the next merge into the output whose rank 0 runs
on the same host removes the temporaries, as after one process's SIGKILL.
SIGTERM to the launcher reaches every rank, and each ends as one process
does (exit 143).  A rank that hangs would keep the others waiting at the
next agreement: after ``World.timeout`` (``PWRITER_MPI_TIMEOUT``) a waiting
rank gives up (:class:`RankTimeout`), removes what it created, says so, and
aborts the job (``MPI_Abort``).

mpi4py is imported only here, and only under an MPI launcher or with
``--mpi`` (``pip install 'pwriter[mpi]'``).
"""

from __future__ import annotations

import array
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ..data.output import CreatedFiles, OutputSet
from ..errors import PwriterError, UsageError, WriteError
from ..plan.layout import (
    GZIP_MIN_PADDING,
    Counter,
    LocalCounter,
    Placement,
    Planner,
    ShardedPlanner,
    SharedPaddedPlanner,
    SharedStripedPlanner,
    SizedShardedPlanner,
)
from ..plan.settings import Settings
from ..plan.sizing import FsInfo, Sizing, Striping, shard_offsets

if TYPE_CHECKING:
    from ..data.gzip_members import MemberIndex
    from ..service.writer import OutputFormat, WriterShare

__all__ = ["launched_by_mpi", "RankFailed", "RankTimeout", "World", "WindowCounter", "RankShare", "RankOutput",
           "merge_over_ranks", "RankMergeResult"]

_ENV_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
ABORTED = 1 << 62  # added to the shared counter by a rank that fails
# Seconds between tests of a pending agreement, doubling: a waiting rank takes little CPU from the others.
POLL_FIRST, POLL_MAX = 0.0005, 0.01


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun) started this process with other ranks."""
    for name in _ENV_SIZES:
        try:
            if int(os.environ.get(name, "0")) > 1:
                return True
        except ValueError:
            continue
    return False


class RankFailed(PwriterError):
    """Another rank failed; ``str()`` is its error, with its rank."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RankTimeout(PwriterError):
    """This rank waited longer than ``World.timeout`` at one agreement: another hangs, so after its own
    cleanup the rank ends the job (:meth:`World.abort`)."""


class World:
    """The ranks of one merge, with the agreements and exchanges the steps need (collective: every rank
    makes the same calls in order).  ``timeout``: the longest wait at one agreement (trio clock seconds;
    None: for ever), then :class:`RankTimeout`."""

    def __init__(self, comm: Any = None, *, timeout: float | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise UsageError("--mpi: mpi4py is not installed (pip install 'pwriter[mpi]')") from None
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise UsageError("--mpi: this MPI does not provide MPI_THREAD_MULTIPLE, which pwriter's reader "
                             "threads need")
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.timeout = timeout
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.node_ranks: int = node.Get_size()
        node.Free()

    async def agree(self, error: BaseException | None, *, name_rank: bool = True) -> None:
        """Every rank says whether it failed; every rank raises the lowest failing rank's failure:
        :class:`RankFailed` with its message naming the rank (``name_rank``; the failing rank chains its own
        error, and re-raises a cancellation or KeyboardInterrupt as it is), else its own exception there.
        A rank stopped only by another's failure yields to a rank with an error of its own.  Shielded;
        given up after ``timeout`` with :class:`RankTimeout`."""
        if error is None:
            key = 2 * self.size
        elif isinstance(error, RankFailed):
            key = self.size + self.rank
        else:
            key = self.rank
        mine, lowest = array.array("q", [key]), array.array("q", [0])
        with trio.CancelScope(shield=True):
            request = self.comm.Iallreduce(mine, lowest, op=self.MPI.MIN)
            pause = POLL_FIRST
            deadline = trio.current_time() + (self.timeout if self.timeout is not None else math.inf)
            while not request.Test():
                if trio.current_time() >= deadline:
                    raise RankTimeout(f"rank {self.rank} waited {self.timeout:g} s for the other ranks to reach "
                                      "the same step of the merge: one of them hangs (PWRITER_MPI_TIMEOUT sets "
                                      "the wait); the job is aborted")
                await trio.sleep(pause)
                pause = min(2 * pause, POLL_MAX)
            if lowest[0] == 2 * self.size:
                return
            failed = int(lowest[0]) % self.size
            said = self.comm.bcast(_describe(error, self.rank) if self.rank == failed else None, root=failed)
        if self.rank == failed:
            assert error is not None
            if name_rank and isinstance(error, Exception) and not isinstance(error, RankFailed):
                raise RankFailed(*said) from error
            raise error
        raise RankFailed(*said)

    async def decide(self, work: Any) -> Any:
        """Rank 0 runs ``work()`` (sync); its result goes to every rank, or its error is raised on every rank."""
        result = error = None
        if self.rank == 0:
            try:
                result = work()
            except Exception as exc:  # agreed below: every rank raises it
                error = exc
        await self.agree(error, name_rank=False)  # (rank 0 alone decides: its own error, as one process says it)
        return self.comm.bcast(result, root=0)

    def abort(self, exit_code: int) -> NoReturn:
        """End every rank of the job now (``MPI_Abort``), this process first (after a :class:`RankTimeout`:
        a normal exit would wait in ``MPI_Finalize`` for the rank that hangs)."""
        try:
            self.comm.Abort(exit_code)
        finally:
            os._exit(exit_code)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere); only after an agreement."""
        gathered: list[Any] | None = self.comm.gather(value, root=0)
        return gathered


def _describe(error: BaseException | None, rank: int) -> tuple[str, int]:
    """The one line (and exit code) that every rank reports for ``error`` of ``rank``."""
    if isinstance(error, RankFailed):
        return str(error), error.exit_code
    if isinstance(error, (KeyboardInterrupt, trio.Cancelled)):
        return f"rank {rank} was interrupted or terminated", 1
    message = str(error) or type(error).__name__
    if not isinstance(error, PwriterError):
        message = f"{type(error).__name__}: {message}"
    return f"{message} (on rank {rank})", int(getattr(error, "exit_code", 1))


class WindowCounter:
    """The shared counter of a striped or padded-striped output: a 64-bit integer in an MPI window on rank 0,
    reserved from with ``MPI_Fetch_and_op`` (one lock-all epoch for the merge; callers hold the chunk sink's
    lock).  Created and freed collectively."""

    def __init__(self, world: World, start: int) -> None:
        MPI = world.MPI
        self._MPI = MPI
        self._window = MPI.Win.Allocate(8 if world.rank == 0 else 0, 8, comm=world.comm)
        if world.rank == 0:
            self._window.Lock(0, MPI.LOCK_EXCLUSIVE)
            self._window.Put(array.array("q", [start]), 0)
            self._window.Unlock(0)
        world.comm.Barrier()
        self._window.Lock_all()
        self._result = array.array("q", [0])

    def fetch_add(self, amount: int) -> int:
        """Reserve ``amount`` bytes; raises :class:`RankFailed` once another rank has failed."""
        value = self._fetch_add(amount)
        if value >= ABORTED:
            raise RankFailed("stopped: another rank failed", 1)
        return value

    def _fetch_add(self, amount: int) -> int:
        self._window.Fetch_and_op(array.array("q", [amount]), self._result, 0, 0, self._MPI.SUM)
        self._window.Flush(0)
        return int(self._result[0])

    def abort(self) -> None:
        """Tell every rank that this one failed (their next reservation raises)."""
        self._fetch_add(ABORTED)

    def free(self) -> None:
        """Collective: end the epoch and free the window."""
        self._window.Unlock_all()
        self._window.Free()


class RankOutput(CreatedFiles):
    """One rank's files of the output (an :class:`~pwriter.data.output.Output`): the shared file rank 0
    created, opened by name; or (sharded) the shards this rank creates itself (``first``: the file number
    of its first), named finally by rank 0 at the commit.  ``publish`` only records that the share is
    written; rank 0 publishes the whole output."""

    def __init__(self, target: str, targets: Sequence[str], *, temporaries: Sequence[str] = (),
                 first: int = 0, striping: Striping | None = None, generation: int = 0) -> None:
        super().__init__(target, targets, striping=striping, first=first, generation=generation)
        self.temporaries = list(temporaries)
        self._creates = not temporaries  # a sharded share: this rank creates its shards
        self.manifest: str | None = None
        self.written = False

    def create(self, *, direct: bool = False) -> list[int]:
        """Create this rank's shards, or open the shared file rank 0 created."""
        if self._creates:
            self._create_files(direct=direct)
            return self.fds
        try:
            for name in self.temporaries:
                self.fds.append(os.open(name, os.O_WRONLY | os.O_CLOEXEC))
                if direct:
                    self.direct_fds.append(os.open(name, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC))
        except OSError as exc:
            self.discard()
            raise WriteError(exc.filename or self.targets[0], f"cannot open the output: {exc.strerror}",
                             exc.errno) from None
        return self.fds

    def publish(self, *, fsync: bool, sidecars: dict[str, bytes] | None = None) -> None:
        """This share is written: close its files, checking each close (a failure fails the job)."""
        self._close_files_checked()
        self.written = True

    def discard(self) -> None:
        """Close this rank's descriptors; remove the shards it created unless its share was written."""
        self.close_files()
        if not self.written:
            self.remove_created()

    def remove_created(self) -> None:
        """Remove the shards this rank created (nothing for a shared file)."""
        from ..data.output import _unlink_quietly

        if self._creates:
            for name in self.temporaries:
                _unlink_quietly(name, self._dir_fd)
            self.temporaries = []

    def close_directory(self) -> None:
        """Close the descriptor of the output's directory (after :meth:`remove_created`, if that is wanted)."""
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


@dataclasses.dataclass
class RankShare:
    """What one rank writes; :meth:`writer_share` makes its writer's plan."""

    fs: FsInfo
    sizing: Sizing
    output: RankOutput
    writes_header: bool
    writes_footer: bool
    counter: Counter | None
    """Striped and padded-striped: where offsets come from."""
    form: OutputFormat
    """The output's compression and framing (:func:`pwriter.service.writer.output_format`)."""
    shard_size: int | None = None
    """Sharded: the shard size (each shard then has the header and the footer)."""

    def writer_share(self, target: str, settings: Settings) -> WriterShare:
        """This rank's writer: its plan (rank 0's sizing; no header or footer another rank writes), files
        and planner."""
        from ..service.writer import WriterShare, writer_plan

        plan = writer_plan(target, settings, self.form, self.fs, self.sizing)
        planner = self.planner(header_length=plan.header_length, min_padding=plan.min_padding)
        return WriterShare(plan.for_share(writes_header=self.writes_header, writes_footer=self.writes_footer),
                           self.output, planner)

    def planner(self, *, header_length: int, min_padding: int) -> Planner:
        layout, stripe = self.sizing.layout, self.sizing.stripe_size
        if layout == "sharded" and self.shard_size is not None:
            return SizedShardedPlanner(header_length=header_length, stripe_size=stripe, shard_size=self.shard_size)
        if layout == "sharded":
            return ShardedPlanner(header_length=header_length if self.writes_header else 0, stripe_size=stripe,
                                  shards=self.sizing.lanes)
        assert self.counter is not None
        if layout == "striped":
            return SharedStripedPlanner(counter=self.counter, header_length=header_length, stripe_size=stripe,
                                        writes_header=self.writes_header)
        return SharedPaddedPlanner(counter=self.counter, header_length=header_length, stripe_size=stripe,
                                   min_padding=min_padding, writes_header=self.writes_header)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What rank 0 decided in step 1, sent to every rank."""

    inputs: list[str]
    sizes: list[int]
    fs: FsInfo
    sizing: Sizing
    compressed: bool
    temporaries: list[str]
    """The shared file's temporary (sharded: none yet; each rank creates its own shards)."""
    targets: list[str]
    manifest: str | None
    striping: Striping | None
    wrap: str
    """The output's wrapping, ``array`` or ``none`` (``auto`` resolved from every input)."""
    generation: int = 0
    """Sharded: the generation of the shards' names (:class:`~pwriter.data.output.OutputSet`)."""


@dataclasses.dataclass(frozen=True)
class RankMergeResult:
    """The merge of every rank, on rank 0: the aggregated result and each rank's share."""

    result: Any  # pwriter.service.merge.MergeResult, with statistics summed over the ranks
    ranks: int
    per_rank: list[dict[str, Any]]
    inputs: list[str]


def _decide(world: World, paths: Sequence[str], directories: Sequence[str] | None, output: str,
            settings: Settings, force: bool, offsets: str, recursive: bool = False) -> tuple[Decision, OutputSet]:
    """Step 1, on rank 0: returns the decision and the OutputSet (kept on rank 0 to publish)."""
    from ..data.inputs import collect_inputs, input_size
    from ..data.output import member_index_path, names_of_output
    from ..service.merge import resolve_wrap
    from ..service.writer import check_shard_size, follow_layout_of, output_compression, plan

    compressed = output_compression(output, settings)
    if offsets == "exscan" and (compressed or settings.direct
                                or settings.layout not in ("auto", "striped")):
        raise UsageError("--mpi-offsets exscan: only for a striped, plain output (its ranges are counted "
                         "before they are written); the shared counter does every layout")
    inputs = collect_inputs(paths, directories, exclude=names_of_output(output), recursive=recursive)
    sizes = [input_size(path) for path in inputs]
    wrap = resolve_wrap(inputs, settings.wrap)
    fs, sizing = plan(output, settings, expected_bytes=sum(sizes), processes_per_node=world.node_ranks)
    check_shard_size(settings, sizing)
    sharded = sizing.layout == "sharded"
    files = world.size * sizing.lanes if sharded else 1
    striping = sizing.striping
    if striping is not None and sharded:
        striping = dataclasses.replace(striping, offsets=shard_offsets(files, fs.ost_count))
    if settings.shard_size is not None:
        files = 0  # (a growing set: each rank makes its shards as it starts them)
    outputs = OutputSet(output, sharded=sharded, files=files, force=force,
                        sidecars=[member_index_path(output)] if compressed else [], striping=striping)
    outputs.check(inputs)  # (takes the output's lock, kept until rank 0 publishes or discards)
    if not sharded:  # (sharded: each rank creates its own shards, step 2)
        outputs.create(direct=settings.direct)
        try:
            if striping is not None:
                fs, sizing = follow_layout_of(outputs.temporaries[0], fs, sizing, settings, world.node_ranks)
            outputs.close_files()  # every rank, rank 0 too, opens the file by name
        except BaseException:
            outputs.discard()
            raise
    decision = Decision(inputs, sizes, fs, sizing, compressed, list(outputs.temporaries), list(outputs.targets),
                        outputs.manifest, striping, wrap, outputs.generation)
    return decision, outputs


async def merge_over_ranks(
    world: World,
    paths: Sequence[str],
    directories: Sequence[str] | None,
    output: str,
    *,
    settings: Settings | None = None,
    force: bool = False,
    salvage: bool = False,
    validate: bool = False,
    require_complete: bool = False,
    progress: Any = None,
    offsets: str = "counter",
    recursive: bool = False,
) -> RankMergeResult | None:
    """Merge ``paths`` (and the traces of ``directories``, below them with ``recursive``) into ``output``
    with every rank of ``world``.  Collective: the result on rank 0, None elsewhere; when any rank fails,
    every rank raises and nothing is published.  ``offsets``: ``counter`` or ``exscan`` (striped, plain
    output).  Rank 0 decides the wrapping and judges every input's completeness (``require_complete``:
    an incomplete one fails the job before publishing)."""
    from ..plan.settings import load_settings, settings_with
    from ..service.writer import output_format

    if offsets not in ("counter", "exscan"):  # (every rank finds it: no agreement needed)
        raise ValueError(f"offsets={offsets!r}: expected 'counter' or 'exscan'")
    given = settings if settings is not None else load_settings()
    started = time.perf_counter()
    decision, outputs = await _decide_everywhere(world, paths, directories, output, given, force, offsets, recursive)
    settings = settings_with(given, wrap=decision.wrap)  # (every rank writes as rank 0 decided)
    exscan = offsets == "exscan" and decision.sizing.layout == "striped"
    counter: WindowCounter | None = None
    share_output: RankOutput | None = None
    hung = False  # another rank hangs: nothing collective any more
    try:
        form = output_format(output, settings)  # (a level the codec lacks fails here, agreed on below)
        inputs = _inputs_of_rank(world, decision)
        share_output = _rank_output(world, decision, output)
        counter, share_counter, counted = await _rank_offsets(world, decision, inputs, len(form.header), exscan,
                                                             salvage, validate)
        share = _rank_share(world, decision, settings, share_output, share_counter, form)
        result, failure = await _merge_share(world, inputs, output, settings, share, counter, counted, exscan,
                                             force=force, progress=progress, salvage=salvage, validate=validate)
        with trio.CancelScope(shield=True):  # collective from here on: every rank takes part
            await world.agree(failure)
            assert result is not None
            gathered = world.gather(_rank_report(world, decision, settings, result, share_output, started))
            commit_error: BaseException | None = None
            footer_bytes = 0
            incomplete: tuple[Any, ...] = ()
            if world.rank == 0:
                assert gathered is not None and outputs is not None
                decision = _make_global(outputs, decision, settings, gathered, output)
                try:
                    incomplete, footer_bytes = _check_and_commit(outputs, decision, counter, form, gathered,
                                                                 settings, exscan, require_complete)
                except Exception as exc:
                    commit_error = exc
            await world.agree(commit_error)
    except BaseException as exc:
        hung = isinstance(exc, RankTimeout)
        if share_output is not None:
            share_output.remove_created()
        if world.rank == 0 and outputs is not None:
            outputs.discard()
        raise
    finally:
        if counter is not None and not hung:
            counter.free()
        if share_output is not None:
            share_output.close_directory()
    if world.rank != 0:
        return None
    assert gathered is not None
    return _aggregate(gathered, decision, footer_bytes, time.perf_counter() - started, incomplete)


async def _decide_everywhere(world: World, paths: Sequence[str], directories: Sequence[str] | None, output: str,
                             settings: Settings, force: bool, offsets: str, recursive: bool
                             ) -> tuple[Decision, OutputSet | None]:
    """Step 1: rank 0 decides, every rank learns it; with the OutputSet rank 0 keeps (None elsewhere)."""
    kept: list[OutputSet] = []  # rank 0: the OutputSet, to publish or discard

    def decide() -> Decision:
        decision, outputs = _decide(world, paths, directories, output, settings, force, offsets, recursive)
        kept.append(outputs)
        return decision

    try:
        decision: Decision = await world.decide(decide)
    except BaseException:  # (rank 0 gave up waiting for the others: its temporary goes)
        if kept:
            kept[0].discard()
        raise
    return decision, kept[0] if kept else None


def _inputs_of_rank(world: World, decision: Decision) -> list[str]:
    """Step 2: this rank's share of the inputs (by size, in order; none for a rank beyond the inputs)."""
    from ..service.merge import partition

    share = partition(decision.sizes, world.size) if decision.sizes else []
    mine = share[world.rank] if world.rank < len(share) else range(0)
    return [decision.inputs[index] for index in mine]


def _rank_output(world: World, decision: Decision, output: str) -> RankOutput:
    """Step 2: this rank's files: its own shards (sharded), else the shared file rank 0 created."""
    if decision.sizing.layout == "sharded":
        first = world.rank * decision.sizing.lanes
        return RankOutput(output, decision.targets[first : first + decision.sizing.lanes], first=first,
                          striping=decision.striping, generation=decision.generation)
    return RankOutput(output, decision.targets, temporaries=decision.temporaries)


async def _rank_offsets(world: World, decision: Decision, inputs: list[str], header_length: int, exscan: bool,
                        salvage: bool, validate: bool) -> tuple[WindowCounter | None, Counter | None, int]:
    """Step 2 (collective), striped and padded-striped: the shared counter, the counter offsets come from
    (with ``exscan`` one of the rank's own range), and the bytes ``exscan`` counted."""
    sizing = decision.sizing
    if sizing.layout == "sharded":
        return None, None, 0
    start = header_length if sizing.layout == "striped" or not header_length else sizing.stripe_size
    if exscan:
        counted, before = await _count_and_exscan(world, inputs, sizing, salvage, validate)
        return None, LocalCounter(start + before), counted
    counter = WindowCounter(world, start)
    return counter, counter, 0


def _rank_share(world: World, decision: Decision, settings: Settings, share_output: RankOutput,
               share_counter: Counter | None, form: OutputFormat) -> RankShare:
    """What this rank writes: the header (rank 0, or every sized shard) and the footer (the last rank's
    last shard, or every sized shard)."""
    sharded = decision.sizing.layout == "sharded"
    sized = sharded and settings.shard_size is not None
    return RankShare(fs=decision.fs, sizing=decision.sizing, output=share_output,
                    writes_header=world.rank == 0 or sized,
                    writes_footer=sized or (sharded and world.rank == world.size - 1), counter=share_counter,
                    form=form, shard_size=settings.shard_size if sized else None)


async def _merge_share(world: World, inputs: list[str], output: str, settings: Settings, share: RankShare,
                       counter: WindowCounter | None, counted: int, exscan: bool, *, force: bool, progress: Any,
                       salvage: bool, validate: bool) -> tuple[Any, BaseException | None]:
    """Step 3: merge this rank's inputs as its share; returns the result, or the failure to agree on
    (told to the shared counter first, so that the others stop early)."""
    from ..errors import DataError
    from ..service.merge import MergeProgress, merge

    try:
        result = await merge(inputs, output, settings=settings, force=force,
                             progress=progress if progress is not None else MergeProgress(0),
                             readers=max(1, min(len(inputs), (os.cpu_count() or 1) // world.node_ranks)),
                             salvage=salvage, validate=validate, share=share.writer_share(output, settings))
        if exscan and result.writer.line_bytes != counted:
            raise DataError(f"an input of rank {world.rank} changed while it was read: {counted} bytes of "
                            f"events counted, {result.writer.line_bytes} written")
    except BaseException as exc:
        if counter is not None:
            counter.abort()
        return None, exc
    return result, None


def _rank_report(world: World, decision: Decision, settings: Settings, result: Any, share_output: RankOutput,
                 started: float) -> dict[str, Any]:
    """Step 4: what this rank sends rank 0 for the commit and the report."""
    sharded = decision.sizing.layout == "sharded"
    sized = sharded and settings.shard_size is not None
    stats = result.writer
    file_base = world.rank * decision.sizing.lanes if sharded and not sized else 0  # (sized: made global later)
    return {
        "rank": world.rank, "inputs": result.inputs, "events": result.events,
        "input_bytes": result.input_bytes, "bytes": stats.bytes_written,
        "seconds": round(time.perf_counter() - started, 6), "stats": stats, "salvaged": result.salvaged,
        "entries": [(entry[0] + file_base, *entry[1:]) for entry in result.member_entries],
        "ends": result.ends,
        "temporaries": share_output.temporaries if sharded else [],
    }


def _make_global(outputs: OutputSet, decision: Decision, settings: Settings, gathered: list[dict[str, Any]],
                 output: str) -> Decision:
    """Step 5 on rank 0, sharded: every rank's shards, in read order, join the OutputSet; with a shard size,
    with their final names and file numbers.  Returns the decision with the final targets."""
    from ..data.output import shard_paths

    if decision.sizing.layout != "sharded":
        return decision
    outputs.temporaries = [name for item in gathered for name in item["temporaries"]]
    if settings.shard_size is None:
        return decision
    base = 0
    for item in gathered:
        item["entries"] = [(entry[0] + base, *entry[1:]) for entry in item["entries"]]
        base += len(item["temporaries"])
    outputs.targets = shard_paths(output, base, decision.generation)
    return dataclasses.replace(decision, targets=list(outputs.targets))


async def _count_and_exscan(world: World, inputs: list[str], sizing: Sizing, salvage: bool,
                            validate: bool) -> tuple[int, int]:
    """``--mpi-offsets exscan``: this rank's bytes of events (one read of its
    share), and the sum over the ranks before it (``MPI_Exscan``)."""
    from ..data.inputs import InputRun, input_size, read_and_write

    class Count:
        chunk_capacity = sizing.stripe_size
        total = 0

        def write_chunk(self, lane: int, buffer: memoryview, filled: int) -> None:
            self.total += filled

        def write_lines(self, lane: int, lines: bytes) -> None:
            self.total += len(lines)

        def finish_lane(self, lane: int) -> None:
            pass

    count, error = Count(), None
    try:
        run = InputRun(inputs, [input_size(path) for path in inputs], salvage=salvage, validate=validate)
        try:
            buffer = memoryview(bytearray(sizing.stripe_size))
            counting_sink: Any = count  # the three calls read_and_write makes
            await trio.to_thread.run_sync(read_and_write, counting_sink, run, 0, buffer)
        finally:
            run.close()
    except Exception as exc:
        error = exc
    await world.agree(error)
    before = world.comm.exscan(count.total)
    return count.total, int(before or 0)


def _check_and_commit(outputs: OutputSet, decision: Decision, counter: WindowCounter | None, form: OutputFormat,
                      gathered: list[dict[str, Any]], settings: Settings, exscan: bool,
                      require_complete: bool) -> tuple[tuple[Any, ...], int]:
    """Step 5 on rank 0: judge every input's completeness, then the footer (shared file), the member index,
    publish.  Returns the incomplete inputs and the footer's bytes."""
    from ..data.gzip_members import MemberIndex
    from ..data.output import member_index_path
    from ..service.merge import check_complete

    incomplete = check_complete([end for item in gathered for end in item["ends"]], require_complete)
    index = MemberIndex(form.header_text)
    for item in gathered:
        index.add_entries(item["entries"])
    written = 0
    if decision.sizing.layout != "sharded":
        if exscan:
            end = len(form.header) + sum(item["stats"].line_bytes for item in gathered)
        else:
            assert counter is not None
            end = counter.fetch_add(len(form.footer))
        written = _write_footer(decision, settings, index, end, form.footer, form.footer_text)
    sidecars = {}
    if decision.compressed:
        files = [os.path.basename(name) for name in decision.targets]
        sidecars[member_index_path(outputs.target)] = json.dumps(index.index(files)).encode()
    outputs.publish(fsync=settings.fsync, sidecars=sidecars)
    return incomplete, written


def _write_footer(decision: Decision, settings: Settings, index: MemberIndex, end: int, footer: bytes,
                  footer_text: int) -> int:
    """Rank 0, a shared file: write ``footer`` at ``end`` through a chunk sink and record it in ``index``
    (a file that would be empty gets one padding line instead).  Returns the bytes written."""
    from ..data.backends.threads import ThreadBackend
    from ..data.sink import ChunkSink

    if not footer and end:
        return 0
    fd = os.open(decision.temporaries[0], os.O_WRONLY | os.O_CLOEXEC)
    try:
        backend = ThreadBackend(queue_depth=1)
        backend.register(fd, decision.temporaries[0])
        the_file = _SharedFile([decision.temporaries[0]], [fd])
        sink = ChunkSink(planner=SharedStripedPlanner(counter=LocalCounter(end), header_length=0, stripe_size=1,
                                                      writes_header=False),
                         output=the_file, backend=backend, header=b"", header_text=0,
                         compressed=decision.compressed, level=settings.level, chunk_capacity=1,
                         writeback=False)
        sink.placer.members = index
        if footer:
            placement = sink.placer.place(0, len(footer))
            sink.placer.record(placement, text=footer_text, events=0)
            sink.write_placed(placement, footer)
        else:  # (end 0: never an empty file)
            placement = Placement(0, 0, 0, 0, GZIP_MIN_PADDING if decision.compressed else 1)
            sink.placer.record(placement, text=0, events=0)
            sink.write_placed(placement, b"")
        if settings.fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return placement.length


@dataclasses.dataclass
class _SharedFile:
    """The shared file as rank 0's footer sink writes to it (an :class:`~pwriter.data.output.OutputFiles`)."""

    targets: list[str]
    fds: list[int]
    direct_fds: list[int] = dataclasses.field(default_factory=list)

    def add_shard(self) -> tuple[int, int | None]:
        raise AssertionError("a shared file does not grow by shards")


def _aggregate(gathered: list[dict[str, Any]], decision: Decision, footer_bytes: int, seconds: float,
               incomplete: tuple[Any, ...] = ()) -> RankMergeResult:
    from ..service.merge import MergeResult
    from ..service.writer import combine_statistics

    combined = combine_statistics([item["stats"] for item in gathered])
    writer = dataclasses.replace(combined, outputs=tuple(decision.targets), seconds=seconds, published=True,
                                 bytes_written=combined.bytes_written + footer_bytes)
    result = MergeResult(
        inputs=sum(item["inputs"] for item in gathered),
        events=sum(item["events"] for item in gathered),
        input_bytes=sum(item["input_bytes"] for item in gathered),
        writer=writer,
        manifest=decision.manifest,
        salvaged=tuple(entry for item in gathered for entry in item["salvaged"]),
        ends=tuple(end for item in gathered for end in item["ends"]),
        incomplete=incomplete,
        wrap=decision.wrap,
    )
    per_rank = [{"rank": item["rank"], "inputs": item["inputs"], "events": item["events"], "bytes": item["bytes"],
                 "seconds": item["seconds"]} for item in gathered]
    return RankMergeResult(result=result, ranks=len(gathered), per_rank=per_rank, inputs=decision.inputs)
