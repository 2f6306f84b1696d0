"""The writer service (the control plane): open an output, run its write lanes, close and publish it.

Used as ``async with open_writer(path) as writer: ...``: :func:`open_writer`
detects and sizes, builds a pure :class:`WriterPlan` (:func:`writer_plan`),
and :func:`run_writer` runs it (an MPI rank runs its share's plan through
:func:`open_share`).

Task structure (all in one nursery owned by :func:`run_writer`)::

    producers --(blocks)--> coalescer 0 --(chunk)--> lane writer 0 --thread--+
              --(blocks)--> coalescer 1 --(chunk)--> lane writer 1 --thread--+--> chunk sink --> backend
                            ...  ticker                                      |    (pwriter.data.sink)
    merge readers (threads) --(chunk, written in the reader's own thread)----+

The writer is the control plane: it opens the output and the backend,
starts the write lanes with the first producer handle
(:mod:`pwriter.service.lanes`: the coalescers, lane writers and ticker of
the library path; a merge starts none), and closes and publishes.
Placement, gzip members and writing are the chunk sink's
(:mod:`pwriter.data.sink`), which every maker calls in a thread.

When the body of the ``async with`` ends normally, the writer refuses
every new call of a producer handle (ClosedError), lets a push already
waiting finish, pushes what producers still hold, closes the channels, waits until every coalescer has
flushed and every chunk is placed, places and writes the footer, waits for
every write, fsyncs (unless disabled; with fsync, the writeback of each large
written range was already started when it was written), and publishes the
output all or nothing (:mod:`pwriter.data.output`).  When the body raises or is
cancelled, or a write fails, every task is cancelled, the temporary files
are removed (no checkpoint in that cleanup: a cancellation cannot cut it
short) and the target is untouched; the
body's own exception propagates as it was raised, else the writer's first
error with the others kept on it (:func:`error_to_raise`).  After the block
every handle and call raises ClosedError.

The writer's own code is KI-protected: Ctrl-C never lands in the middle of
its bookkeeping, only at a checkpoint of the main task (or in user code),
so that cleanup always runs whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from ..data.backends import Backend, BackendStatistics, open_backend
from ..data.gzip_members import check_level, gzip_member
from ..data.output import Output, OutputSet, StreamOutput, member_index_path
from ..data.sink import ChunkSink
from ..errors import ClosedError, attach_other_errors
from ..plan.layout import GZIP_MIN_PADDING, Planner, make_planner
from ..plan.settings import ConfigError, Settings, settings_from, settings_with
from ..plan.sizing import FsInfo, Sizing, follow_layout_set, plan_sizing
from .handle import DEFAULT_BATCH_BYTES, Producer, line_checker
from .lanes import BufferPool, WriteLanes

__all__ = ["Writer", "WriterStatistics", "open_writer", "plan", "output_compression", "check_shard_size",
           "error_to_raise", "HEADER", "FOOTER", "wrapper_lines", "OutputFormat", "output_format", "WriterPlan",
           "writer_plan", "stream_settings", "run_writer", "WriterShare", "open_share", "combine_statistics"]

HEADER = b"[\n"
FOOTER = b"]\n"


def wrapper_lines(settings: Settings) -> tuple[bytes, bytes]:
    """The header and footer text of ``settings.wrap``: ``[`` and ``]``
    lines for ``array``, nothing for ``none``.  ``auto`` follows the inputs
    of a merge (:func:`pwriter.service.merge.merge` resolves it first): a writer
    given it raises :class:`~pwriter.plan.settings.ConfigError`."""
    if settings.wrap == "auto":
        raise ConfigError("invalid setting wrap='auto': it follows the inputs of a merge; a writer writes "
                          "wrap='array' ([ and ] lines) or wrap='none' (NDJSON)")
    return (HEADER, FOOTER) if settings.wrap == "array" else (b"", b"")


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """How an output's bytes are framed: gzip members or plain text, and the
    header and footer as written (each a gzip member of its own when
    compressed; ``*_text``: their lengths before compression)."""

    compress: bool
    header: bytes
    footer: bytes
    header_text: int
    footer_text: int


def output_format(target: str, settings: Settings, *, stream: bool = False, header: bytes | None = None,
                  footer: bytes | None = None) -> OutputFormat:
    """The framing of ``target`` from plain values (no I/O): its compression
    (:func:`output_compression`), and ``header`` and ``footer`` (None: from
    the ``wrap`` setting, :func:`wrapper_lines`)."""
    compress = output_compression(target, settings, stream=stream)
    if compress:
        check_level(settings.level)
    if header is None or footer is None:
        wrapped = wrapper_lines(settings)
        header, footer = wrapped[0] if header is None else header, wrapped[1] if footer is None else footer
    header_text, footer_text = len(header), len(footer)
    if compress:  # the header and the footer are gzip members of their own (none for no text)
        header = gzip_member(header, settings.level) if header else b""
        footer = gzip_member(footer, settings.level) if footer else b""
    return OutputFormat(compress, header, footer, header_text, footer_text)


@dataclasses.dataclass(frozen=True)
class WriterPlan(OutputFormat):
    """Everything a writer decides before it touches a file, as plain values
    (built by :func:`writer_plan`; printable, and testable without I/O): its
    framing (the fields of :class:`OutputFormat`) and the rest.

    The planner's parameters are ``sizing.layout``, ``header_length``,
    ``sizing.stripe_size``, ``sizing.lanes``, ``min_padding`` and
    ``settings.shard_size`` (:meth:`planner`).  ``header_length`` is the
    header's place in the output, which a share of an output that does not
    write the header (:meth:`for_share`) still leaves before its data.
    ``files`` and ``sidecars`` are the file set to create (a sharded set
    with a shard size: none yet, its shards are made as lanes start them).
    """

    target: str
    stream: bool
    settings: Settings
    fs: FsInfo
    sizing: Sizing
    header_length: int
    files: int
    sidecars: tuple[str, ...]
    validate: bool = False

    @property
    def sharded(self) -> bool:
        return self.sizing.layout == "sharded"

    @property
    def min_padding(self) -> int:
        """The least padding the layout may write (a gzip member of a whitespace line, or one byte)."""
        return GZIP_MIN_PADDING if self.compress else 1

    def planner(self) -> Planner:
        """The layout's planner for this plan (pure)."""
        return make_planner(self.sizing.layout, header_length=self.header_length, stripe_size=self.sizing.stripe_size,
                            lanes=self.sizing.lanes, min_padding=self.min_padding,
                            shard_size=self.settings.shard_size)

    def following(self, fs: FsInfo, sizing: Sizing) -> WriterPlan:
        """This plan sized anew (Lustre: by the layout the file got on create)."""
        return dataclasses.replace(self, fs=fs, sizing=sizing)

    def for_share(self, *, writes_header: bool, writes_footer: bool) -> WriterPlan:
        """This plan for one share of an output that several write: without the
        header or the footer that another share writes (their place stays)."""
        header, header_text = (self.header, self.header_text) if writes_header else (b"", 0)
        footer, footer_text = (self.footer, self.footer_text) if writes_footer else (b"", 0)
        return dataclasses.replace(self, header=header, header_text=header_text, footer=footer,
                                   footer_text=footer_text)


def writer_plan(target: str, settings: Settings, form: OutputFormat, fs: FsInfo, sizing: Sizing, *,
                stream: bool = False, validate: bool = False) -> WriterPlan:
    """The plan of a writer of ``target`` from plain values: its settings, its
    framing (:func:`output_format`), the filesystem and the sizing
    (:func:`plan`).  A shard size the layout cannot honour is refused
    (:func:`check_shard_size`)."""
    check_shard_size(settings, sizing)
    sharded = sizing.layout == "sharded"
    # (with a shard size, the set grows: its shards are made as they are started)
    files = (0 if settings.shard_size is not None else sizing.lanes) if sharded else 1
    framing = {field.name: getattr(form, field.name) for field in dataclasses.fields(OutputFormat)}
    return WriterPlan(
        **framing, target=target, stream=stream, settings=settings, fs=fs, sizing=sizing,
        header_length=len(form.header), files=files,
        sidecars=(member_index_path(target),) if form.compress else (), validate=validate,
    )


def plan(
    path: str, settings: Settings, *, producers: int | None = None, fs: FsInfo | None = None,
    expected_bytes: int | None = None, processes_per_node: int = 1,
) -> tuple[FsInfo, Sizing]:
    """Detect the filesystem of ``path`` (unless ``fs`` is given) and size the
    writer (``expected_bytes``: the output's size, when known) for its share
    of this machine: its memory and CPUs divided among ``processes_per_node``
    writers (MPI ranks on one node)."""
    from ..data.detect import detect_filesystem

    fs = fs if fs is not None else detect_filesystem(path)
    sizing = plan_sizing(fs, settings, producers=producers, expected_bytes=expected_bytes,
                         **_machine_share(processes_per_node))
    return fs, sizing


def _machine_share(processes_per_node: int) -> dict[str, int]:
    if processes_per_node < 1:
        raise ValueError(f"processes_per_node={processes_per_node}: at least 1")
    import psutil

    return {"available_memory": psutil.virtual_memory().available // processes_per_node,
            "cpu_count": max(1, (os.cpu_count() or 1) // processes_per_node)}


def follow_layout_of(temporary: str, fs: FsInfo, sizing: Sizing, settings: Settings,
                     processes_per_node: int = 1) -> tuple[FsInfo, Sizing]:
    """Lustre: read back the layout ``temporary`` got on create, and size by it (see :func:`plan`)."""
    from ..data.detect import file_striping

    stripe_size, stripe_count = file_striping(temporary)
    return follow_layout_set(sizing, fs, settings, stripe_size=stripe_size, stripe_count=stripe_count,
                             **_machine_share(processes_per_node))


@dataclasses.dataclass(frozen=True)
class WriterStatistics:
    """What a writer did so far.

    ``line_bytes`` counts the bytes of lines received; ``bytes_written``
    every byte placed in the output files (lines, header, footer, padding).
    ``seconds`` is measured on the trio clock from open.
    """

    outputs: tuple[str, ...]
    layout: str
    backend: str
    fs_kind: str
    stripe_size: int
    lanes: int
    """Write lanes (``--lanes``; the shards of a sharded output)."""
    chunks: int
    writes: int
    """Write operations issued by the backend (a resumed short write counts again)."""
    line_bytes: int
    bytes_written: int
    deadline_flushes: int
    """Buffers (and padded gzip members) written because their oldest line waited ``max_delay``."""
    uncopied_chunks: int
    oversized_chunks: int
    buffer_waits: int
    direct_writes: int
    """Writes that went through the O_DIRECT descriptor."""
    writeback_hints: int
    """Written ranges whose writeback was started at once (``early_writeback``)."""
    compressed: bool
    seconds: float
    published: bool
    io: BackendStatistics


def combine_statistics(stats: Sequence[WriterStatistics]) -> WriterStatistics:
    """The statistics of several writers of one output (MPI ranks) as one:
    every count summed (the backend's too, lanes included), except the
    stripe size and the backend's ``most_in_flight`` (the largest); the
    rest (names, layout, ``seconds``, ``published``) the first writer's."""
    first = stats[0]

    def combined(records: Sequence[typing.Any], keep: dict[str, typing.Any]) -> dict[str, typing.Any]:
        return {field.name: sum(getattr(record, field.name) for record in records)
                for field in dataclasses.fields(records[0]) if field.type in ("int", int) and field.name not in keep}

    io_kept: dict[str, typing.Any] = {"most_in_flight": max(s.io.most_in_flight for s in stats)}
    io = dataclasses.replace(first.io, **io_kept, **combined([s.io for s in stats], io_kept))
    return dataclasses.replace(first, io=io, **combined(stats, {"stripe_size": first.stripe_size}))


class Writer:
    """A running writer; obtain one from :func:`open_writer`.

    Lines reach it through producer handles (:meth:`producer`) or, for
    code that fills whole chunks itself in a thread, through
    :meth:`run_maker`.

    Ordering: the lines of one producer handle (and the chunks of one
    ``lane``) keep their order in the output (in the sharded layout, in
    read order); across handles and lanes there is no order.  Every line
    accepted is written exactly once, whole, never glued to another.

    Use it from the trio run and the task tree that opened it; it is not
    thread-safe.
    """

    def __init__(
        self,
        *,
        nursery: trio.Nursery,
        plan: WriterPlan,
        planner: Planner,
        output: Output,
        backend: Backend,
        pool: BufferPool,
    ) -> None:
        settings, sizing, compress = plan.settings, plan.sizing, plan.compress
        self.plan = plan
        """What this writer runs (:class:`WriterPlan`)."""
        self.settings = settings
        self.fs = plan.fs
        self.sizing = sizing
        self.compressed = compress
        self.published = False
        self.line_check = line_checker(plan.target) if plan.validate else None
        """The check every line sent through a handle passes (``validate=True``), else None."""
        self._planner = planner
        self._output = output
        self._backend = backend
        self._pool = pool
        self._started = trio.current_time()
        self._finished: float | None = None
        self._closing = False
        self._sink = ChunkSink(
            planner=planner, output=output, backend=backend, header=plan.header, header_text=plan.header_text,
            compressed=compress, level=settings.level, chunk_capacity=self.chunk_capacity,
            writeback=settings.fsync and settings.early_writeback,
        )
        self._lanes = WriteLanes(nursery=nursery, sink=self._sink, pool=pool, lanes=sizing.lanes,
                                 chunk_capacity=self.chunk_capacity, max_delay=settings.max_delay)
        # The writer's own sink calls (the header, the end) get a thread of
        # their own: makers holding every token of another limiter, their
        # writes waiting at a stream's gate behind the header, cannot hold it up.
        self._own_thread = trio.CapacityLimiter(1)
        header = self._sink.placer.open()  # (placed before any chunk)
        if header is not None:
            nursery.start_soon(functools.partial(self._sink.call, self._sink.write_placed, header, b"",
                                                 limiter=self._own_thread))

    @property
    def outputs(self) -> list[str]:
        """The output files in read order (their final names)."""
        return list(self._output.targets)

    @property
    def chunk_capacity(self) -> int:
        """The most bytes of lines one chunk holds (a block at least half this
        size, and at most this size, is written without a copy)."""
        return self._pool.size if self.compressed else self._planner.chunk_capacity

    @property
    def sink(self) -> ChunkSink:
        """Where chunks are placed and written: makers in threads (the
        merge's readers) write through :meth:`ChunkSink.write_chunk`."""
        return self._sink

    @property
    def manifest(self) -> str | None:
        """The manifest of a sharded output, else None."""
        return self._output.manifest

    def producer(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Producer:
        """A new handle for one producer task; close it (``async with``) when done.

        Handles are spread over the write lanes in turn.  A handle left open when
        the writer's block ends is flushed and closed by the writer.  The
        first handle starts the write lanes (their coalescers and the
        ``max_delay`` ticker): a writer that never makes one (a merge) runs none.
        """
        if self._closing:
            raise ClosedError("producer() on a writer that is closing or closed")
        self._lanes.start()
        return self._lanes.producer(batch_bytes, self.line_check)

    async def run_maker(self, make: Callable[[ChunkSink, memoryview], None], *,
                        limiter: trio.CapacityLimiter | None = None) -> None:
        """Run ``make(sink, buffer)`` in a thread (``limiter``: trio's
        default if None): a maker of chunks that writes them itself through
        the sink's blocking entrance (the merge's readers), with a stripe
        buffer of the writer's pool (at least :attr:`chunk_capacity` bytes;
        waits while all are in use) that is its own until it returns.  The
        buffer goes back to the pool then, once the kernel is done with it,
        whatever happened (a cancelled call returns only once the thread has
        returned)."""
        if self._closing:
            raise ClosedError("run_maker() on a writer that is closing or closed")
        buffer = await self._pool.take()
        try:
            await trio.to_thread.run_sync(make, self._sink, buffer, limiter=limiter)
        finally:
            self._pool.give_back(buffer)

    def statistics(self) -> WriterStatistics:
        """A snapshot of what the writer did so far (cheap; safe to call while it runs)."""
        coalesced = self._lanes.statistics()
        end = self._finished if self._finished is not None else trio.current_time()
        io = self._backend.statistics()
        sink = self._sink.counts()
        return WriterStatistics(
            outputs=tuple(self.outputs),
            layout=self.sizing.layout,
            backend=self._backend.name,
            fs_kind=self.fs.kind.value,
            stripe_size=self.sizing.stripe_size,
            lanes=self.sizing.lanes,
            chunks=sink.chunks,
            writes=io.writes,
            line_bytes=sink.line_bytes,
            bytes_written=sink.bytes_written,
            deadline_flushes=sum(stat.deadline_flushes for stat in coalesced) + self._lanes.deadline_flushes,
            uncopied_chunks=sum(stat.uncopied_chunks for stat in coalesced),
            oversized_chunks=sum(stat.oversized_chunks for stat in coalesced),
            buffer_waits=self._pool.waits,
            direct_writes=sink.direct_writes,
            writeback_hints=sink.writeback_hints,
            compressed=self.compressed,
            seconds=end - self._started,
            published=self.published,
            io=io,
        )

    async def _close(self) -> None:
        """The block ended normally: push what handles hold, wait until every
        chunk is placed, then write what the sink's pool holds (the last,
        partial slots of makers in threads), the footer (after every
        chunk) and the padding of slots and files left unfilled."""
        self._closing = True
        await self._lanes.close()
        await self._sink.call(self._sink.write_end, self.plan.footer, self.plan.footer_text,
                              limiter=self._own_thread)

    def _close_for_caller(self) -> None:
        """After the writer's block (published or not): every handle and call is closed."""
        self._closing = True
        self._lanes.discard()


@dataclasses.dataclass(frozen=True)
class WriterShare:
    """One process's share of an output that several write (see
    :mod:`pwriter.faces.mpi`): its plan (:meth:`WriterPlan.for_share`), its files
    (``output``, created by :func:`open_share`; "publishing" only means that
    this share is written and synced) and its planner."""

    plan: WriterPlan
    output: Output
    planner: Planner


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_share(share: WriterShare) -> AsyncIterator[Writer]:
    """Create the files of ``share`` and run a writer on them (:func:`run_writer`)."""
    share.output.create(direct=share.plan.settings.direct)
    async with run_writer(share.plan, share.output, planner=share.planner) as writer:
        yield writer


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_writer(
    path: str | os.PathLike[str] | typing.BinaryIO,
    *,
    settings: Settings | None = None,
    producers: int | None = None,
    force: bool = False,
    inputs: Sequence[str] = (),
    header: bytes | None = None,
    footer: bytes | None = None,
    fs: FsInfo | None = None,
    backend: Backend | str | None = None,
    validate: bool = False,
    expected_bytes: int | None = None,
    **overrides: typing.Any,
) -> AsyncIterator[Writer]:
    """Open a writer that publishes ``path`` when the block ends without error.

    ``settings`` default to :func:`~pwriter.plan.settings.load_settings` (the
    environment); any setting given as a keyword (``fsync=False``,
    ``layout="sharded"``, ``stripe_size="1MiB"``, ``max_delay=10``, ...)
    replaces the one of that name; a keyword that names no setting is a
    TypeError (:func:`~pwriter.plan.settings.settings_from`, the rule of every
    entrance).  ``producers``, a hint for the sizing, is at least 1.  The
    output is refused (:class:`~pwriter.errors.UsageError`) when its
    directory does not exist, when another run is writing it (its lock,
    :class:`~pwriter.data.output.OutputLock`, names that run's host and pid),
    when it exists and ``force`` is false
    (:class:`~pwriter.errors.OutputExistsError`), when it is one of
    ``inputs``, and, even with ``force``, when the name is not a regular file
    or a symlink to one (a directory, FIFO, socket, device).  ``header``
    starts and ``footer`` ends the output in every layout (a sharded set:
    its first and last shard; with a ``shard_size``, every shard: each is a
    complete trace, and the set has as many shards as its lanes started; a
    shard size for another layout, or for a stream, is a
    :class:`~pwriter.plan.settings.ConfigError`); by default they follow the
    ``wrap`` setting: ``"array"`` (the default) the lines ``[`` and ``]``,
    ``"none"`` nothing (NDJSON); ``"auto"`` is for merges and is refused
    here (:func:`wrapper_lines`).  ``fs`` replaces
    filesystem detection and a ``backend`` object the backend named in the
    settings (both for tests; a backend name is the setting).  ``compress``
    (default: a ``path`` ending in ``.gz``; :func:`output_compression`
    refuses what cannot be honoured) writes every chunk, the header and the
    footer as standalone gzip members, compressed in threads, and publishes
    a member index, ``<path>.members.json``; a ``level`` outside the
    codec's range is a :class:`~pwriter.plan.settings.ConfigError`.  With
    ``validate``, every line sent through a producer handle must be a JSON
    event line (``{...}``, valid JSON, the same C check as ``pwriter merge
    --validate``); another raises :class:`~pwriter.errors.InputError` at the
    call and takes nothing.  ``expected_bytes``, the output's size when known,
    guides the Lustre layout set on create (``stripe_count`` auto).  (One
    process's share of an output that several write is run by
    :func:`open_share`.)

    ``path`` may also be ``"-"`` (standard output) or a binary stream with a
    ``fileno()`` (a pipe, a socket, an open file): the output is then
    written to it in read order, as it is made, in the striped layout; a
    compressed stream has no member index.  A stream cannot be unwritten:
    on error, what was written stays, the footer is missing, and the error
    is raised as for a file.

    When the block ends without error, the writer closes every producer
    handle still open (pushing what they queued), writes every accepted
    line, fsyncs the files (``settings.fsync``, default on), renames them
    into place and fsyncs the directory: when ``async with`` returns, the
    output is complete under its final name (sharded: the manifest, written
    last, commits the set).  ``Writer.statistics().published`` is then true.
    ``force`` replaces the whole set the name stands for, whatever its
    layout or compression; what it replaces is kept until the new output is
    wholly in place, and put back if publishing fails.  A data file whose
    close reports an error (NFS reports failed writes there) fails the
    close: nothing is published.

    On error or cancellation (of the block or of any task inside it) the
    temporary files are removed, the target is untouched (a file it would
    have replaced stays), and the exception propagates: the block's own
    exception (an exception group included) exactly as it was raised, else
    the writer's first error, with any others kept on it
    (:func:`~pwriter.errors.other_errors`).  Writes the kernel already holds
    are waited for, shielded, before buffers are released.  After the block,
    every producer handle and writer call raises
    :class:`~pwriter.errors.ClosedError`.
    """
    if isinstance(backend, str):
        overrides["backend"], backend = backend, None
    settings = settings_from(settings, overrides, "open_writer")
    if producers is not None and (type(producers) is not int or producers < 1):
        raise ValueError(f"producers={producers!r}: the number of producers expected, at least 1 (or None)")
    stream: StreamOutput | None = None
    if _is_stream(path):
        settings = stream_settings(settings)
        stream = StreamOutput(path)
        target = stream.target
    elif isinstance(path, (str, os.PathLike)):
        target = os.fspath(path)
        if not isinstance(target, str):
            raise TypeError(f"open_writer takes a str path, not {type(target).__name__}")
    else:
        raise TypeError(f"open_writer takes a path, '-' or a binary stream with fileno(), not {type(path).__name__}")
    form = output_format(target, settings, stream=stream is not None, header=header, footer=footer)
    fs, sizing = plan(target if stream is None else ".", settings, producers=producers, fs=fs,
                      expected_bytes=expected_bytes)
    the_plan = writer_plan(target, settings, form, fs, sizing, stream=stream is not None, validate=validate)
    output: Output
    if stream is not None:
        output = stream
    else:
        output = files = OutputSet(target, sharded=the_plan.sharded, files=the_plan.files, force=force,
                                   sidecars=list(the_plan.sidecars), striping=sizing.striping)
        files.check(inputs)
    output.create(direct=settings.direct)
    async with run_writer(the_plan, output, backend=backend) as writer:
        yield writer


def stream_settings(settings: Settings) -> Settings:
    """The settings of a stream output: the striped layout (read order);
    another layout, ``direct`` or a shard size is refused
    (:class:`~pwriter.plan.settings.ConfigError`)."""
    if settings.layout not in ("auto", "striped") or settings.direct or settings.shard_size is not None:
        what = (f"layout={settings.layout!r}" if settings.layout not in ("auto", "striped") else "direct"
                if settings.direct else f"shard_size={settings.shard_size}")
        raise ConfigError(f"invalid setting {what}: a stream (-o -) is written in read order, in the "
                          "striped layout, without O_DIRECT")
    return settings_with(settings, layout="striped")


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def run_writer(plan: WriterPlan, output: Output, *, planner: Planner | None = None,
                     backend: Backend | None = None) -> AsyncIterator[Writer]:
    """The lifecycle of a writer that runs ``plan`` on ``output`` (its files
    created): the backend, the writer's tasks, the close, then publish, or
    on error discard (see :func:`open_writer`).  ``planner``: one given by a
    share of an output that several write, else the plan's own (sized
    first by the Lustre layout the file got on create)."""
    try:
        if planner is None:
            if plan.sizing.striping is not None and isinstance(output, OutputSet) and output.temporaries:
                plan = plan.following(*follow_layout_of(output.temporaries[0], plan.fs, plan.sizing, plan.settings))
            planner = plan.planner()
        assert planner.files == len(output.fds), "one file per shard"
        pool = BufferPool(plan.sizing.buffers, plan.sizing.stripe_size)
    except BaseException:
        output.discard()
        raise
    settings = plan.settings
    writer: Writer | None = None
    body_error: BaseException | None = None
    failure: BaseException | None = None
    opened = contextlib.nullcontext(backend) if backend is not None else open_backend(
        settings.backend, queue_depth=plan.sizing.queue_depth, write_call_size=plan.sizing.write_call_size
    )
    try:
        try:
            async with opened as io:
                for fd, name in zip(output.fds + output.direct_fds, output.targets + output.targets, strict=False):
                    io.register(fd, name)
                try:
                    async with trio.open_nursery() as nursery:
                        writer = Writer(nursery=nursery, plan=plan, planner=planner, output=output, backend=io,
                                        pool=pool)
                        try:
                            yield writer
                        except BaseException as exc:
                            body_error = exc
                            raise
                        await writer._close()
                    if settings.fsync and output.can_sync:
                        await writer._sink.sync()
                finally:
                    for fd in output.fds + output.direct_fds:
                        io.unregister(fd)
        except BaseExceptionGroup as group:
            failure = error_to_raise(group, body_error)
        if failure is not None:
            raise failure
        assert writer is not None
        sidecars = ({member_index_path(plan.target): json.dumps(writer._sink.placer.member_index()).encode()}
                    if plan.compress else {})
        output.publish(fsync=settings.fsync, sidecars=sidecars)
        writer.published = True
        writer._finished = trio.current_time()
    finally:  # (no checkpoint here: a cancellation cannot cut this cleanup short)
        if writer is not None:
            writer._close_for_caller()
        output.discard()
        pool.close()


def check_shard_size(settings: Settings, sizing: Sizing) -> None:
    """A shard size is only for the sharded layout: refused
    (:class:`~pwriter.plan.settings.ConfigError`) for any other, so that it is
    never silently ignored (``layout`` auto: whichever the sizing chose)."""
    if settings.shard_size is not None and sizing.layout != "sharded":
        chosen = "" if settings.layout != "auto" else " (chosen by layout auto: give layout sharded)"
        raise ConfigError(f"invalid setting shard_size={settings.shard_size}: a shard size is for the sharded "
                          f"layout, and this output's layout is {sizing.layout}{chosen}")


def output_compression(target: str, settings: Settings, *, stream: bool = False) -> bool:
    """Whether ``target`` is written as gzip members: the ``compress``
    setting, or when it is auto (None) a name ending in ``.gz`` (a stream:
    plain).  What cannot be honoured is refused with
    :class:`~pwriter.plan.settings.ConfigError`: ``compress`` false for a ``.gz``
    name (the output would be plain text under a gzip name), ``direct`` with
    gzip members (they are never whole aligned stripes: O_DIRECT would
    write nothing), a ``level`` given for plain output (nothing is
    compressed at that level)."""
    gz_name = target.endswith(".gz") and not stream
    if settings.compress is False and gz_name:
        raise ConfigError(f"invalid setting compress=False: the output {target} ends in .gz, the name of a gzip "
                          "file (compress it, or name it without .gz)")
    compress = settings.compress if settings.compress is not None else gz_name
    if not compress and "level" in settings.model_fields_set:
        raise ConfigError(f"invalid setting level={settings.level}: the output {target} is plain text, which is not "
                          "compressed at any level (name it .gz, or give compress, for gzip output)")
    if compress and settings.direct:
        raise ConfigError(f"invalid setting direct=True: {target}: gzip output is never written with O_DIRECT "
                          "(its members are not whole aligned stripes); write it plain, or without --direct")
    return compress


def _is_stream(path: object) -> bool:
    return path == "-" or (not isinstance(path, (str, bytes, os.PathLike)) and hasattr(path, "fileno"))


def _leaves(exc: BaseException, skip: BaseException | None = None) -> list[BaseException]:
    """The exceptions in ``exc``, groups opened, leaving out ``skip`` (and what it holds)."""
    if exc is skip:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner, skip)]
    return [exc]


def _only_consequences(body_error: BaseException) -> bool:
    """Whether the body's exception is only cancellations and handles' ClosedErrors (see :func:`error_to_raise`)."""
    return all(isinstance(leaf, (trio.Cancelled, ClosedError)) for leaf in _leaves(body_error))


def error_to_raise(group: BaseExceptionGroup[BaseException], body_error: BaseException | None = None
                   ) -> BaseException:
    """The one exception to raise for a group that pwriter's own nurseries made.

    ``body_error``, the exception of the caller's own code (an exception
    group included), is returned as it is, untouched unless pwriter's tasks
    failed too.  Otherwise the first error that is not ``Cancelled`` nor
    a :class:`~pwriter.errors.ClosedError` (a handle refusing a push because
    the lanes had stopped: a consequence), if there is one; so too when
    the body's exception is only such consequences (a group of them from
    the body's own nursery included).  The other errors
    are kept on it (:func:`~pwriter.errors.attach_other_errors`), never
    dropped.
    """
    leaves = _leaves(group, skip=body_error)
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if body_error is not None and errors and _only_consequences(body_error):
        errors += [leaf for leaf in _leaves(body_error) if not isinstance(leaf, trio.Cancelled)]
        body_error = None
    errors.sort(key=lambda error: isinstance(error, ClosedError))  # (the consequences last)
    if body_error is not None and not isinstance(body_error, trio.Cancelled):
        return attach_other_errors(body_error, errors)
    if errors:
        return attach_other_errors(errors[0], errors[1:])
    if body_error is not None:
        return body_error
    return leaves[0] if leaves else group
