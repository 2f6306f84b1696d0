"""``pwriter merge``: many trace files in, one well-formed trace out.

The inputs are cut, in order, into one run per reader of about equal bytes
(:func:`partition`).  This module only starts the readers: each runs
:func:`~pwriter.data.inputs.read_and_write` in a thread of its own
(:meth:`~pwriter.service.writer.Writer.run_maker`), which fills a stripe
buffer taken from the writer's pool straight from its inputs (read,
decompress, clean in place) and writes every full buffer, in that thread,
as one chunk of its lane (:meth:`~pwriter.data.sink.ChunkSink.write_chunk`).
A small input costs no thread hop of its own; a bare-event text is never
copied in Python.  The lines of one input keep their order.  They are
together in the output only when its reader has a file of its own (sharded,
no more readers than shards): otherwise the readers' chunks are placed as
they fill, interleaved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..data.inputs import InputReader, InputRun, collect_inputs, input_size, path_list, read_and_write, starts_array
from ..errors import DataError, UsageError
from ..plan.completeness import Incomplete, InputEnd, incomplete_inputs
from ..plan.settings import Settings, settings_from, settings_with
from .writer import WriterShare, WriterStatistics, error_to_raise, open_share, open_writer

__all__ = ["MergeResult", "MergeProgress", "collect_inputs", "merge", "partition", "InputReader", "InputRun",
           "input_size", "resolve_wrap", "IncompleteInputsError", "INCOMPLETE_SHOWN"]

#: Incomplete inputs named one by one in an error or a report; the rest are counted.
INCOMPLETE_SHOWN = 10


def partition(sizes: Sequence[int], count: int) -> list[range]:
    """Cut the inputs, in order, into ``min(count, len(sizes))`` non-empty runs
    of about equal bytes."""
    count = max(1, min(count, len(sizes)))
    goal = sum(sizes) / count
    runs: list[range] = []
    start = filled = 0
    for index, size in enumerate(sizes):
        filled += size
        files_left = len(sizes) - index - 1
        runs_left = count - len(runs) - 1  # after cutting here
        if runs_left and files_left and (filled >= goal * (len(runs) + 1) or files_left == runs_left):
            runs.append(range(start, index + 1))
            start = index + 1
    runs.append(range(start, len(sizes)))
    return runs


@dataclasses.dataclass
class MergeProgress:
    """Live counters of a merge (read by the progress display)."""

    total_input_bytes: int
    runs: list[InputRun] = dataclasses.field(default_factory=list)

    @property
    def files_done(self) -> int:
        return sum(run.files_done for run in self.runs)

    @property
    def events(self) -> int:
        return sum(run.events for run in self.runs)

    def input_bytes(self) -> int:
        return sum(run.input_bytes() for run in self.runs)

    @property
    def files(self) -> int:
        return sum(len(run.paths) for run in self.runs)

    @property
    def text_bytes(self) -> int:
        return sum(run.text_bytes for run in self.runs)


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What a merge produced."""

    inputs: int
    events: int
    input_bytes: int
    writer: WriterStatistics
    manifest: str | None
    salvaged: tuple[tuple[str, str, int], ...] = ()
    """With ``salvage``: (input, what was dropped, lines dropped) per damaged input."""
    member_entries: tuple[tuple[int, int, int, int, int, bool], ...] = ()
    """Gzip output: the members written (:class:`~pwriter.data.gzip_members.MemberIndex` entries)."""
    ends: tuple[InputEnd, ...] = ()
    """How each input ends, in read order (:mod:`pwriter.plan.completeness`)."""
    incomplete: tuple[Incomplete, ...] = ()
    """The incomplete inputs among them (:func:`~pwriter.plan.completeness.incomplete_inputs`)."""
    wrap: str = "array"
    """How the output is wrapped: ``array`` or ``none`` (``auto`` resolved)."""

    @property
    def dropped_lines(self) -> int:
        return sum(lines for _, _, lines in self.salvaged)


class IncompleteInputsError(DataError):
    """``require_complete``: an input of the merge is incomplete (exit 1; nothing is published)."""

    def __init__(self, incomplete: Sequence[Incomplete]) -> None:
        shown = "; ".join(f"{entry.path}: {entry.why}" for entry in incomplete[:INCOMPLETE_SHOWN])
        more = len(incomplete) - INCOMPLETE_SHOWN
        super().__init__(f"{len(incomplete)} incomplete input{'s' if len(incomplete) != 1 else ''} "
                         f"(--require-complete): {shown}{f'; and {more} more' if more > 0 else ''}")
        self.incomplete = tuple(incomplete)


def resolve_wrap(inputs: Sequence[str], wrap: str) -> str:
    """``wrap`` with ``auto`` resolved: ``array`` when an input is array
    style (its text begins with ``[``) or is a pipe or FIFO (which cannot be
    looked at before it is read), else ``none``.  Looks at the inputs in
    order and stops at the first that decides (blocking: a few bytes of each)."""
    if wrap != "auto":
        return wrap
    return "array" if any(starts_array(path) is not False for path in inputs) else "none"


def check_complete(ends: Sequence[InputEnd], require_complete: bool) -> tuple[Incomplete, ...]:
    """The incomplete inputs of a merge; with ``require_complete``, any is
    an :class:`IncompleteInputsError`."""
    incomplete = tuple(incomplete_inputs(ends))
    if incomplete and require_complete:
        raise IncompleteInputsError(incomplete)
    return incomplete


async def _run_readers(runs: Sequence[InputRun], read_run: Callable[[int, InputRun], Awaitable[None]]) -> None:
    """Run ``read_run`` for every run, each in a task of its own; the readers'
    own errors: one raised, the others kept on it (:func:`error_to_raise`)."""
    failure = None
    try:
        async with trio.open_nursery() as nursery:
            for index, run in enumerate(runs):  # a lane each (sharded: shard lane % lanes)
                nursery.start_soon(read_run, index, run)
    except BaseExceptionGroup as group:  # the readers' own: one error raised, the others kept on it
        failure = error_to_raise(group)
    if failure is not None:
        raise failure


async def merge(
    inputs: Sequence[str],
    output: str,
    *,
    settings: Settings | None = None,
    force: bool = False,
    progress: MergeProgress | None = None,
    readers: int | None = None,
    salvage: bool = False,
    validate: bool = False,
    require_complete: bool = False,
    share: WriterShare | None = None,
    **overrides: Any,
) -> MergeResult:
    """Merge ``inputs`` (a list of paths, checked by :func:`collect_inputs`) into ``output``.

    ``settings`` and any setting as a keyword as for
    :func:`~pwriter.service.writer.open_writer`.  A single path (a str) where the
    list belongs is a TypeError; no inputs at all is a
    :class:`~pwriter.errors.UsageError`, as on the command line.

    Every event line of every input appears exactly once in the output; the
    lines of one input keep their order (with more than one reader, lines
    of other inputs may come between them).  The ``wrap`` setting
    says what surrounds them: ``array`` (the default) a ``[`` first line and
    a ``]`` last line, ``none`` nothing (NDJSON), ``auto`` array only when
    an input is array style or a pipe (:func:`resolve_wrap`).

    Every input's end is checked (:mod:`pwriter.plan.completeness`): the result's
    ``incomplete`` lists the inputs that are empty, salvaged, cut before
    their DFTracer ``end`` event or whose ``num_events`` differs from the
    events read; with ``require_complete`` any of them is an
    :class:`IncompleteInputsError` and nothing is published.  Raises
    :class:`~pwriter.errors.InputError` / :class:`DataError` (and publishes nothing) when an input is damaged or a
    read or write fails.  With ``salvage``, the damaged tail of an input
    cut short by a crash (a last line that is not a whole event, a gzip file
    without its end) is dropped instead, and reported in ``salvaged``.  With
    ``validate``, every event line is parsed as JSON (in C, in the reader
    threads, in parallel) and a line that is not valid JSON is damage too:
    an error, or with ``salvage`` dropped and counted.  ``share``: this
    process merges its share into a share of an output that several processes
    write (:mod:`pwriter.faces.mpi`).
    """
    inputs = path_list(inputs, "merge")
    if not inputs and share is None:  # (an MPI rank may have no share of the inputs)
        raise UsageError("no inputs: merge() was given an empty list of trace files")
    settings = settings_from(settings, overrides, "merge")
    if settings.wrap == "auto":
        settings = settings_with(settings, wrap=await trio.to_thread.run_sync(resolve_wrap, inputs, "auto"))
    sizes = [input_size(path) for path in inputs]
    if progress is None:
        progress = MergeProgress(total_input_bytes=0)
    progress.total_input_bytes = sum(sizes)
    if readers is None:
        # One reader per CPU: more contend for the GIL (measured: "One
        # reader per CPU" in docs/performance.md).
        # An explicit --lanes still gets that many lanes (shards).
        readers = max(1, min(len(inputs), max(os.cpu_count() or 1, settings.lanes or 1)))
    limiter = trio.CapacityLimiter(readers)
    progress.runs = [
        InputRun([inputs[i] for i in run], [sizes[i] for i in run], salvage=salvage, validate=validate)
        for run in partition(sizes, readers)
    ]

    async def read_run(lane: int, run: InputRun) -> None:
        # Each reader fills a stripe buffer of its own, straight from its
        # inputs, and writes every full one as a chunk of its lane, from its
        # own thread: no hop back to trio per chunk.
        try:
            await writer.run_maker(lambda sink, buffer: read_and_write(sink, run, lane, buffer), limiter=limiter)
        finally:
            run.close()

    opened = open_share(share) if share is not None else open_writer(
        output, settings=settings, producers=len(progress.runs), force=force, inputs=inputs,
        expected_bytes=sum(sizes))
    async with opened as writer:
        await _run_readers(progress.runs, read_run)
        ends = tuple(end for run in progress.runs for end in run.ends)
        # (An MPI share: the ranks' ends are judged together, on rank 0.)
        incomplete = check_complete(ends, require_complete) if share is None else ()
    return MergeResult(
        inputs=len(inputs),
        events=progress.events,
        input_bytes=sum(sizes),
        writer=writer.statistics(),
        manifest=writer.manifest,
        salvaged=tuple(entry for run in progress.runs for entry in run.salvaged),
        member_entries=tuple(writer.sink.placer.members.entries()) if writer.compressed else (),
        ends=ends,
        incomplete=incomplete,
        wrap=settings.wrap,
    )
