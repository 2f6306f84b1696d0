"""The writer service (the control plane): open an output, run its write lanes, close and publish it.

Used as ``async with open_writer(path) as writer: ...``.

Task structure (all in one nursery owned by :func:`open_writer`)::

    producers --(blocks)--> write lanes: coalescer 0 --(chunk)--+
              --(blocks)-->             coalescer 1 --(chunk)--+--> chunk sink --> backend
                                        ...  ticker            |    (pwriter.sink)
    merge readers (worker threads) --(chunk, written in the thread)+

The writer is the control plane: it opens the output and the backend,
starts the write lanes (:mod:`pwriter.lanes`: the handles, coalescers and
ticker of the library path), and closes and publishes.  Placement and
writing are the chunk sink's (:mod:`pwriter.sink`), which makers in worker
threads call directly; the coalescers' gzip members are the member stage's
(:mod:`pwriter.members`).

When the body of the ``async with`` ends normally, the writer refuses
every new call of a producer handle (ClosedError), lets a push already
waiting finish, pushes what producers still hold, closes the channels, waits until every coalescer has
flushed and every chunk is placed, places and writes the footer, waits for
every write, fsyncs (unless disabled; with fsync, the writeback of each large
written range was already started when it was written), and publishes the
output all or nothing (:mod:`pwriter.output`).  When the body raises or is
cancelled, or a write fails, every task is cancelled, the temporary files
are removed (shielded from cancellation) and the target is untouched; the
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
import json
import os
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from .backends import Backend, BackendStatistics, open_backend
from .channels import DEFAULT_BATCH_BYTES, BufferPool, Producer
from .compress import check_level, gzip_member
from .errors import ClosedError, InputError, attach_other_errors
from .lanes import WriteLanes
from .layout import GZIP_MIN_PADDING, Planner, make_planner
from .members import MemberStage
from .output import OutputSet, StreamOutput, member_index_path
from .settings import ConfigError, Settings, settings_from, settings_with
from .sink import ChunkSink
from .sizing import FsInfo, Sizing, follow_layout_set, plan_sizing
from .traceformat import BlockCleaner

__all__ = ["Writer", "WriterStatistics", "open_writer", "plan", "output_compression", "check_shard_size",
           "error_to_raise", "HEADER", "FOOTER", "wrapper_lines"]

HEADER = b"[\n"
FOOTER = b"]\n"


def wrapper_lines(settings: Settings) -> tuple[bytes, bytes]:
    """The header and footer text of ``settings.wrap``: ``[`` and ``]``
    lines for ``array``, nothing for ``none``.  ``auto`` follows the inputs
    of a merge (:func:`pwriter.merge.merge` resolves it first): a writer
    given it raises :class:`~pwriter.settings.ConfigError`."""
    if settings.wrap == "auto":
        raise ConfigError("invalid setting wrap='auto': it follows the inputs of a merge; a writer writes "
                          "wrap='array' ([ and ] lines) or wrap='none' (NDJSON)")
    return (HEADER, FOOTER) if settings.wrap == "array" else (b"", b"")


def plan(
    path: str, settings: Settings, *, producers: int | None = None, fs: FsInfo | None = None,
    expected_bytes: int | None = None, processes_per_node: int = 1,
) -> tuple[FsInfo, Sizing]:
    """Detect the filesystem of ``path`` (unless ``fs`` is given) and size the
    writer (``expected_bytes``: the output's size, when known) for its share
    of this machine: its memory and CPUs divided among ``processes_per_node``
    writers (MPI ranks on one node)."""
    from .detect import detect_filesystem

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
    from .detect import file_striping

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
    workers: int
    """Write lanes (``--workers``; the shards of a sharded output)."""
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


class Writer:
    """A running writer; obtain one from :func:`open_writer`.

    Lines reach it through producer handles (:meth:`producer`) or, for
    code that fills whole chunks itself, through :meth:`take_buffer` /
    :meth:`write_buffer` and :meth:`write_lines`.

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
        settings: Settings,
        fs: FsInfo,
        sizing: Sizing,
        planner: Planner,
        output: OutputSet | StreamOutput,
        backend: Backend,
        pool: BufferPool,
        header: bytes,
        footer: bytes,
        compress: bool,
        header_text: int,
        footer_text: int,
        check_lines: Callable[[bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self.fs = fs
        self.sizing = sizing
        self.compressed = compress
        self.published = False
        self.line_check = check_lines
        """The check every line sent through a handle passes (``validate=True``), else None."""
        self._planner = planner
        self._output = output
        self._backend = backend
        self._pool = pool
        self._started = trio.current_time()
        self._finished: float | None = None
        self._closing = False
        padded = planner.layout == "padded-striped"
        self._sink = ChunkSink(
            planner=planner, output=output, backend=backend, header=header, header_text=header_text,
            compressed=compress, padded=padded, level=settings.level, chunk_capacity=self.chunk_capacity,
            writeback=settings.fsync and settings.early_writeback,
            # every pool buffer, whole chunk and member in flight, the header and the footer
            stream_threads=3 * pool.count + 4,
        )
        members = MemberStage(nursery=nursery, sink=self._sink, level=settings.level, padded=compress and padded,
                              slots=pool.count)
        self._lanes = WriteLanes(nursery=nursery, sink=self._sink, pool=pool, lanes=sizing.workers,
                                 chunk_capacity=self.chunk_capacity, max_delay=settings.max_delay,
                                 compressed=compress, members=members, footer=footer, footer_text=footer_text)
        header_placement = self._sink.open()
        if header_placement is not None:
            nursery.start_soon(self._sink.write_placed, header_placement, b"")
        self._lanes.start()

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
        """Where chunks are placed and written: makers in worker threads (the
        merge's readers) write through :meth:`ChunkSink.write_chunk_in_thread`."""
        return self._sink

    @property
    def manifest(self) -> str | None:
        """The manifest of a sharded output, else None."""
        return self._output.manifest

    def producer(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Producer:
        """A new handle for one producer task; close it (``async with``) when done.

        Handles are spread over the write lanes in turn.  A handle left open when
        the writer's block ends is flushed and closed by the writer.
        """
        if self._closing:
            raise ClosedError("producer() on a writer that is closing or closed")
        return self._lanes.producer(batch_bytes, self.line_check)

    async def take_buffer(self) -> memoryview:
        """A stripe buffer from the writer's pool (at least
        :attr:`chunk_capacity` bytes; waits while all are in use).

        For producers that fill whole chunks themselves: the caller owns the
        buffer until it passes it to :meth:`write_buffer` or :meth:`give_back`.
        """
        if self._closing:
            raise ClosedError("take_buffer() on a writer that is closing or closed")
        return await self._pool.take()

    def give_back(self, buffer: memoryview) -> None:
        """Return a buffer from :meth:`take_buffer` unwritten (on an error path, say)."""
        self._pool.give_back(buffer)

    async def write_buffer(self, lane: int, buffer: memoryview, filled: int) -> None:
        """Write ``buffer[:filled]`` (whole lines, at most :attr:`chunk_capacity`
        bytes) as one chunk of ``lane``, after that lane's earlier chunks.

        The writer owns ``buffer`` from now on, whatever happens (on an error
        it is back in the pool), and returns it to the pool once written;
        returns as soon as the chunk is placed.
        """
        if filled > self.chunk_capacity or filled < 0 or self._closing:
            self._pool.give_back(buffer)
            if self._closing:
                raise ClosedError("write_buffer() on a writer that is closing or closed")
            raise ValueError(f"a chunk of {filled} bytes: it must hold 0 to {self.chunk_capacity} bytes "
                             "(the chunk capacity)")
        if filled == 0:
            self._pool.give_back(buffer)
            return
        self._sink.count_chunk(filled)
        await self._lanes.write_buffer(lane, buffer, filled)

    async def write_lines(self, lane: int, lines: bytes) -> None:
        """Write ``lines`` (whole lines, any length) as one chunk of ``lane``,
        without a buffer; returns as soon as the chunk is placed.  The writer
        keeps a reference to ``lines`` until it is written (bytes are
        immutable, so the caller need not wait)."""
        if self._closing:
            raise ClosedError("write_lines() on a writer that is closing or closed")
        if type(lines) is not bytes:
            raise TypeError(f"write_lines takes bytes, not {type(lines).__name__}")
        self._sink.count_chunk(len(lines))
        await self._lanes.write_whole(lane, memoryview(lines))

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
            workers=self.sizing.workers,
            chunks=sink.chunks + sum(stat.chunks for stat in coalesced),
            writes=io.writes,
            line_bytes=sink.line_bytes + sum(stat.bytes for stat in coalesced),
            bytes_written=sink.bytes_written,
            deadline_flushes=sum(stat.deadline_flushes for stat in coalesced) + self._lanes.deadline_members,
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
        """The block ended normally: push what handles hold and wait until every chunk is placed."""
        self._closing = True
        await self._lanes.close()

    def _close_for_caller(self) -> None:
        """After the writer's block (published or not): every handle and call is closed."""
        self._closing = True
        self._lanes.discard()


class SharedOutputPart(typing.Protocol):
    """One process's part of an output that several write (see :mod:`pwriter.mpi`)."""

    fs: FsInfo
    sizing: Sizing
    output: typing.Any
    """Like an :class:`~pwriter.output.OutputSet`: this part's files, opened by ``create``."""
    writes_header: bool
    writes_footer: bool

    def planner(self, *, header_length: int, min_padding: int) -> Planner: ...


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
    part: SharedOutputPart | None = None,
    **overrides: typing.Any,
) -> AsyncIterator[Writer]:
    """Open a writer that publishes ``path`` when the block ends without error.

    ``settings`` default to :func:`~pwriter.settings.load_settings` (the
    environment); any setting given as a keyword (``fsync=False``,
    ``layout="sharded"``, ``stripe_size="1MiB"``, ``max_delay=10``, ...)
    replaces the one of that name; a keyword that names no setting is a
    TypeError (:func:`~pwriter.settings.settings_from`, the rule of every
    entrance).  ``producers``, a hint for the sizing, is at least 1.  The
    output is refused (:class:`~pwriter.errors.UsageError`) when its
    directory does not exist, when another run is writing it (its lock,
    :class:`~pwriter.output.OutputLock`, names that run's host and pid),
    when it exists and ``force`` is false
    (:class:`~pwriter.errors.OutputExistsError`), when it is one of
    ``inputs``, and, even with ``force``, when the name is not a regular file
    or a symlink to one (a directory, FIFO, socket, device).  ``header``
    starts and ``footer`` ends the output in every layout (a sharded set:
    its first and last shard; with a ``shard_size``, every shard: each is a
    complete trace, and the set has as many shards as its lanes started; a
    shard size for another layout, or for a stream, is a
    :class:`~pwriter.settings.ConfigError`); by default they follow the
    ``wrap`` setting: ``"array"`` (the default) the lines ``[`` and ``]``,
    ``"none"`` nothing (NDJSON); ``"auto"`` is for merges and is refused
    here (:func:`wrapper_lines`).  ``fs`` replaces
    filesystem detection and a ``backend`` object the backend named in the
    settings (both for tests; a backend name is the setting).  ``compress``
    (default: a ``path`` ending in ``.gz``; :func:`output_compression`
    refuses what cannot be honoured) writes every chunk, the header and the
    footer as standalone gzip members, compressed in worker threads, and publishes
    a member index, ``<path>.members.json``; a ``level`` outside the
    codec's range is a :class:`~pwriter.settings.ConfigError`.  With
    ``validate``, every line sent through a producer handle must be a JSON
    event line (``{...}``, valid JSON, the same C check as ``pwriter merge
    --validate``); another raises :class:`~pwriter.errors.InputError` at the
    call and takes nothing.  ``expected_bytes``, the output's size when known,
    guides the Lustre layout set on create (``stripe_count`` auto).  ``part``
    makes this writer one part of an output that several processes write
    (:mod:`pwriter.mpi`): its sizing, files and planner come from there,
    and "publishing" only means that this part is written (and synced).

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
    output: OutputSet | StreamOutput
    if _is_stream(path):
        if settings.layout not in ("auto", "striped") or settings.direct or settings.shard_size is not None:
            what = (f"layout={settings.layout!r}" if settings.layout not in ("auto", "striped") else "direct"
                    if settings.direct else f"shard_size={settings.shard_size}")
            raise ConfigError(f"invalid setting {what}: a stream (-o -) is written in read order, in the "
                              "striped layout, without O_DIRECT")
        output = StreamOutput(path)
        target = output.target
        settings = settings_with(settings, layout="striped")
    elif isinstance(path, (str, os.PathLike)):
        target = os.fspath(path)
        if not isinstance(target, str):
            raise TypeError(f"open_writer takes a str path, not {type(target).__name__}")
        output = None  # type: ignore[assignment]  # made once the layout is known
    else:
        raise TypeError(f"open_writer takes a path, '-' or a binary stream with fileno(), not {type(path).__name__}")
    compress = output_compression(target, settings, stream=isinstance(output, StreamOutput))
    if compress:
        check_level(settings.level)
    if header is None or footer is None:
        wrapped = wrapper_lines(settings)
        header, footer = wrapped[0] if header is None else header, wrapped[1] if footer is None else footer
    header_text, footer_text = len(header), len(footer)
    if compress:  # the header and the footer are gzip members of their own (none for no text)
        header = gzip_member(header, settings.level) if header else b""
        footer = gzip_member(footer, settings.level) if footer else b""
    min_padding = GZIP_MIN_PADDING if compress else 1
    if part is not None:  # one rank's part of a shared output (pwriter.mpi): decided and created already
        fs, sizing, output = part.fs, part.sizing, part.output
        planner = part.planner(header_length=len(header), min_padding=min_padding)
        if not part.writes_header:
            header, header_text = b"", 0
        if not part.writes_footer:
            footer, footer_text = b"", 0
        output.create(direct=settings.direct)
    else:
        fs, sizing = plan(target if output is None else ".", settings, producers=producers, fs=fs,
                          expected_bytes=expected_bytes)
        check_shard_size(settings, sizing)
        if output is None:
            # (with a shard size, the set grows: its shards are made as they are started)
            files = (0 if settings.shard_size is not None else sizing.workers) if sizing.layout == "sharded" else 1
            output = OutputSet(target, sharded=sizing.layout == "sharded", files=files, force=force,
                               sidecars=[member_index_path(target)] if compress else [])
        output.check(inputs)
        output.create(direct=settings.direct, striping=sizing.striping)
    try:
        if part is None:
            if sizing.striping is not None and isinstance(output, OutputSet) and output.temporaries:
                fs, sizing = follow_layout_of(output.temporaries[0], fs, sizing, settings)
            planner = make_planner(sizing.layout, header_length=len(header), stripe_size=sizing.stripe_size,
                                   workers=sizing.workers, min_padding=min_padding, shard_size=settings.shard_size)
        assert planner.files == len(output.fds), "one file per shard"
        pool = BufferPool(sizing.buffers, sizing.stripe_size)
    except BaseException:
        output.discard()
        raise
    writer: Writer | None = None
    body_error: BaseException | None = None
    failure: BaseException | None = None
    opened = contextlib.nullcontext(backend) if backend is not None else open_backend(
        settings.backend, queue_depth=sizing.queue_depth, write_call_size=sizing.write_call_size
    )
    try:
        try:
            async with opened as io:
                io.register_buffers(pool.buffers)
                for fd, name in zip(output.fds + output.direct_fds, output.targets + output.targets, strict=False):
                    io.register(fd, name)
                try:
                    async with trio.open_nursery() as nursery:
                        writer = Writer(
                            nursery=nursery,
                            settings=settings,
                            fs=fs,
                            sizing=sizing,
                            planner=planner,
                            output=output,
                            backend=io,
                            pool=pool,
                            header=header,
                            footer=footer,
                            compress=compress,
                            header_text=header_text,
                            footer_text=footer_text,
                            check_lines=_line_checker(target) if validate else None,
                        )
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
        sidecars = {member_index_path(target): json.dumps(writer._sink.member_index()).encode()} if compress else {}
        output.publish(fsync=settings.fsync, sidecars=sidecars)
        writer.published = True
        writer._finished = trio.current_time()
    finally:
        if writer is not None:
            writer._close_for_caller()
        with trio.CancelScope(shield=True):
            output.discard()
            pool.close()


def check_shard_size(settings: Settings, sizing: Sizing) -> None:
    """A shard size is only for the sharded layout: refused
    (:class:`~pwriter.settings.ConfigError`) for any other, so that it is
    never silently ignored (``layout`` auto: whichever the sizing chose)."""
    if settings.shard_size is not None and sizing.layout != "sharded":
        chosen = "" if settings.layout != "auto" else " (chosen by layout auto: give layout sharded)"
        raise ConfigError(f"invalid setting shard_size={settings.shard_size}: a shard size is for the sharded "
                          f"layout, and this output's layout is {sizing.layout}{chosen}")


def output_compression(target: str, settings: Settings, *, stream: bool = False) -> bool:
    """Whether ``target`` is written as gzip members: the ``compress``
    setting, or when it is auto (None) a name ending in ``.gz`` (a stream:
    plain).  What cannot be honoured is refused with
    :class:`~pwriter.settings.ConfigError`: ``compress`` false for a ``.gz``
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


def _line_checker(target: str) -> Callable[[bytes], None]:
    """``validate=True``: a check that raises InputError for a block that is not all JSON event lines."""
    name = f"a line sent to {target}"

    def check(block: bytes) -> None:
        cleaned = BlockCleaner(name, validate=True).feed(block)
        if cleaned != block:  # a wrapper, blank or untrimmed line: not an event line as sent
            raise InputError(name, "not a JSON event line as sent (blank, wrapper or surrounded by spaces)")

    return check


def error_to_raise(group: BaseExceptionGroup[BaseException], body_error: BaseException | None = None
                   ) -> BaseException:
    """The one exception to raise for a group that pwriter's own nurseries made.

    ``body_error``, the exception of the caller's own code (an exception
    group included), is returned as it is, untouched unless pwriter's tasks
    failed too.  Otherwise the first error that is not ``Cancelled``.  The
    other errors are kept on it (:func:`~pwriter.errors.attach_other_errors`),
    never dropped.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if exc is body_error:
            return
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if body_error is not None and not isinstance(body_error, trio.Cancelled):
        return attach_other_errors(body_error, errors)
    if errors:
        return attach_other_errors(errors[0], errors[1:])
    if body_error is not None:
        return body_error
    return leaves[0] if leaves else group
