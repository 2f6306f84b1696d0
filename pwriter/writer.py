"""The writer service: ``async with open_writer(path) as writer: ...``.

Task structure (all in one nursery owned by :func:`open_writer`)::

    producers --(blocks)--> coalescer 0 --(full buffer)--> write task --> backend
              --(blocks)--> coalescer 1 --(full buffer)--> write task --> backend
                                     ...
    ticker: pushes producer batches older than max_delay (and, for padded
            gzip, finishes members whose oldest text is older than that)

When the body of the ``async with`` ends normally, the writer pushes what
producers still hold, closes the channels, waits until every coalescer has
flushed and every chunk is placed, places and writes the footer, waits for
every write, fsyncs (unless disabled; with fsync, the writeback of each large
written range was already started when it was written), and publishes the
output all or nothing (:mod:`pwriter.output`).  When the body raises or is
cancelled, or a write fails, every task is cancelled, the temporary files
are removed (shielded from cancellation) and the target is untouched; the
body's own exception propagates as it was raised, else the writer's first
error with the others kept on it (:func:`error_to_raise`).  After the block
every handle and call raises ClosedError.

A stream output (standard output, a pipe) has no offsets to write at: each
write waits until every byte placed before it is written, so the stream
gets the read order.

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
import threading
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from .backends import Backend, BackendStatistics, open_backend
from .channels import DEFAULT_BATCH_BYTES, BufferPool, Coalescer, Producer
from .compress import MemberBuilder, check_level, gzip_member
from .errors import ClosedError, InputError, WriteError, attach_other_errors
from .layout import (GZIP_MIN_PADDING, Placement, Planner, gzip_padding, gzip_padding_members, make_planner,
                     plain_padding)
from .output import OutputSet, StreamOutput, member_index_path
from .settings import Settings, load_settings, settings_with
from .sizing import FsInfo, Sizing, plan_sizing
from .traceformat import BlockCleaner, count_newlines

__all__ = ["Writer", "WriterStatistics", "open_writer", "plan", "error_to_raise", "HEADER", "FOOTER"]

HEADER = b"[\n"
FOOTER = b"]\n"
CHANNEL_BLOCKS = 8
STREAM_POLL = 0.05  # seconds a stream write waiting for its turn sleeps between checks of cancellation
# With fsync on, every written range of at least this size gets
# posix_fadvise(DONTNEED), which starts its writeback at once (Linux) rather
# than leaving every dirty page to the final fsync: writing and flushing then
# overlap.  (Smaller ranges are left to the fsync.)
WRITEBACK_MIN = 256 << 10
DIRECT_ALIGNMENT = 4096


def plan(
    path: str, settings: Settings, *, producers: int | None = None, fs: FsInfo | None = None
) -> tuple[FsInfo, Sizing]:
    """Detect the filesystem of ``path`` (unless ``fs`` is given) and size the writer."""
    import psutil

    from .detect import detect_filesystem

    fs = fs if fs is not None else detect_filesystem(path)
    sizing = plan_sizing(
        fs,
        settings,
        producers=producers,
        available_memory=psutil.virtual_memory().available,
        cpu_count=os.cpu_count() or 1,
    )
    return fs, sizing


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
    ``worker``) keep their order in the output (in the sharded layout, in
    read order); across handles and workers there is no order.  Every line
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
        self._nursery = nursery
        self._planner = planner
        self._output = output
        self._backend = backend
        self._pool = pool
        self._header = header
        self._footer = footer
        self.compressed = compress
        self._header_text = header_text
        self._footer_text = footer_text
        self._padding = gzip_padding if compress else plain_padding
        # Compressed chunks are placed in the order they were flushed, per
        # worker, although they are compressed in parallel: each waits for the
        # event of the one before it.
        self._placed: dict[int, trio.Event] = {}
        self._compress_limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._member_slots = trio.Semaphore(pool.count)
        # file, offset, length, text length, events, listed (padding is not listed, but has text)
        self._members: list[tuple[int, int, int, int, int, bool]] = []
        # Padded-striped gzip: members are built from many chunks, to fill their slot.
        self._builders: dict[int, MemberBuilder] | None = (
            {} if compress and sizing.layout == "padded-striped" else None
        )
        self._member_target = int((sizing.stripe_size - len(header)) * 0.9)
        self._member_since: dict[int, float] = {}  # worker -> when its unfinished member got its first text
        self._finishing_members = False  # set once the last members are being finished at close
        self._deadline_members = 0
        self._fds = list(output.fds)
        self._direct_fds = list(output.direct_fds)  # empty unless O_DIRECT
        self._sends: list[trio.MemorySendChannel[bytes]] = []
        self._coalescers: list[Coalescer] = []
        self._producers: list[Producer] = []
        self._next_worker = 0
        self._coalesced = trio.Event()
        self._whole_slots = trio.Semaphore(pool.count)
        self._buffer_chunks = 0
        self._direct_writes = 0
        self._buffer_bytes = 0
        self._bytes_written = 0
        self._started = trio.current_time()
        self._finished: float | None = None
        self._closing = False
        self._check_lines = check_lines
        self._sink_lock = threading.Lock()  # placement, the member index and counters: threads write too
        self._thread_builder = threading.local()  # padded gzip: each reader thread's unfinished member
        # A stream output is written in offset order (see _write_in_thread).
        # As many threads as stream writes can wait at once (every pool
        # buffer, whole chunk and member in flight, the header and footer):
        # a write holding a thread must never keep an earlier one from one.
        self._stream = isinstance(output, StreamOutput)
        self._stream_turn = threading.Condition()
        self._stream_limiter = trio.CapacityLimiter(3 * pool.count + 4)
        self._writeback = (settings.fsync and settings.early_writeback and not self._stream
                           and hasattr(os, "posix_fadvise"))
        self._writeback_hints = 0
        self._stream_next = 0
        self.published = False

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
    def manifest(self) -> str | None:
        """The manifest of a sharded output, else None."""
        return self._output.manifest

    def producer(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Producer:
        """A new handle for one producer task; close it (``async with``) when done.

        Handles are spread over the workers in turn.  A handle left open when
        the writer's block ends is flushed and closed by the writer.
        """
        if self._closing:
            raise ClosedError("producer() on a writer that is closing or closed")
        send = self._sends[self._next_worker % len(self._sends)]
        self._next_worker += 1
        producer = Producer(send.clone(), batch_bytes=batch_bytes, check=self._check_lines)
        # A handle closed by its task is dropped here, unless its last push
        # was cancelled: the writer pushes that at its close.
        self._producers = [existing for existing in self._producers if not existing._channel_closed]
        self._producers.append(producer)
        return producer

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

    async def write_buffer(self, worker: int, buffer: memoryview, filled: int) -> None:
        """Write ``buffer[:filled]`` (whole lines, at most :attr:`chunk_capacity`
        bytes) as one chunk of ``worker``, after that worker's earlier chunks.

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
        self._buffer_chunks += 1
        self._buffer_bytes += filled
        await self._flush_buffer(worker, buffer, filled)

    async def write_lines(self, worker: int, lines: bytes) -> None:
        """Write ``lines`` (whole lines, any length) as one chunk of ``worker``,
        without a buffer; returns as soon as the chunk is placed.  The writer
        keeps a reference to ``lines`` until it is written (bytes are
        immutable, so the caller need not wait)."""
        if self._closing:
            raise ClosedError("write_lines() on a writer that is closing or closed")
        if type(lines) is not bytes:
            raise TypeError(f"write_lines takes bytes, not {type(lines).__name__}")
        self._buffer_chunks += 1
        self._buffer_bytes += len(lines)
        await self._write_whole(worker, memoryview(lines))

    def statistics(self) -> WriterStatistics:
        """A snapshot of what the writer did so far (cheap; safe to call while it runs)."""
        coalesced = [coalescer.statistics() for coalescer in self._coalescers]
        end = self._finished if self._finished is not None else trio.current_time()
        io = self._backend.statistics()
        return WriterStatistics(
            outputs=tuple(self.outputs),
            layout=self.sizing.layout,
            backend=self._backend.name,
            fs_kind=self.fs.kind.value,
            stripe_size=self.sizing.stripe_size,
            workers=self.sizing.workers,
            chunks=self._buffer_chunks + sum(stat.chunks for stat in coalesced),
            writes=io.writes,
            line_bytes=self._buffer_bytes + sum(stat.bytes for stat in coalesced),
            bytes_written=self._bytes_written,
            deadline_flushes=sum(stat.deadline_flushes for stat in coalesced) + self._deadline_members,
            uncopied_chunks=sum(stat.uncopied_chunks for stat in coalesced),
            oversized_chunks=sum(stat.oversized_chunks for stat in coalesced),
            buffer_waits=self._pool.waits,
            direct_writes=self._direct_writes,
            writeback_hints=self._writeback_hints,
            compressed=self.compressed,
            seconds=end - self._started,
            published=self.published,
            io=io,
        )

    # -- internals ---------------------------------------------------------

    def _start(self) -> None:
        for worker in range(self.sizing.workers):
            send, receive = trio.open_memory_channel[bytes](CHANNEL_BLOCKS)
            self._sends.append(send)
            self._coalescers.append(
                Coalescer(
                    worker,
                    receive,
                    self._pool,
                    capacity=self.chunk_capacity,
                    max_delay=self.settings.max_delay,
                    flush=self._flush_buffer,
                    write_whole=self._write_whole,
                )
            )
        header = self._planner.open()
        if header is not None:
            self._record(header, text=self._header_text, events=0)
            self._nursery.start_soon(self._write, header, b"")
        self._nursery.start_soon(self._run_coalescers)
        self._nursery.start_soon(self._push_stale_batches)

    @trio.lowlevel.enable_ki_protection
    async def _run_coalescers(self) -> None:
        async with trio.open_nursery() as nursery:
            for coalescer in self._coalescers:
                nursery.start_soon(coalescer.run)
        self._finishing_members = True  # (the ticker starts no member of its own from now on)
        for placed in list(self._placed.values()):
            await placed.wait()  # every compressed chunk has its place
        for worker, builder in sorted((self._builders or {}).items()):
            finished = await trio.to_thread.run_sync(builder.finish, limiter=self._compress_limiter)
            if finished is not None:
                placement, member = self._place_member(worker, finished)
                self._nursery.start_soon(self._write, placement, member)
        footer = self._planner.close(len(self._footer))
        self._record(footer, text=self._footer_text, events=0)
        self._coalesced.set()
        await self._write(footer, self._footer)

    @trio.lowlevel.enable_ki_protection
    async def _push_stale_batches(self) -> None:
        delay = self.settings.max_delay
        while not self._coalesced.is_set():
            with trio.move_on_after(delay / 2):
                await self._coalesced.wait()
            now = trio.current_time()
            for producer in self._producers:
                if producer.pending_since + delay <= now:
                    producer.send_pending_nowait()
            for worker, since in list(self._member_since.items()):
                if since + delay <= now and not self._finishing_members:
                    self._finish_stale_member(worker)

    def _finish_stale_member(self, worker: int) -> None:
        """Padded gzip: finish ``worker``'s member now, in its place in the
        worker's order, so that no text waits in a builder longer than
        ``max_delay``.  Skipped (until the next tick) when every member slot
        is taken."""
        try:
            self._member_slots.acquire_nowait()
        except trio.WouldBlock:
            return
        del self._member_since[worker]
        previous = self._placed.get(worker)
        mine = self._placed[worker] = trio.Event()
        self._nursery.start_soon(self._finish_member, worker, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _finish_member(self, worker: int, previous: trio.Event | None, mine: trio.Event) -> None:
        assert self._builders is not None
        try:
            if previous is not None:
                await previous.wait()
            builder = self._builders.get(worker)
            finished = None
            if builder is not None:
                finished = await trio.to_thread.run_sync(builder.finish, limiter=self._compress_limiter)
            if finished is None:
                mine.set()
                return
            self._deadline_members += 1
            placement, member = self._place_member(worker, finished)
            mine.set()
            await self._write(placement, member)
        finally:
            self._member_slots.release()

    async def _flush_buffer(self, worker: int, buffer: memoryview, filled: int) -> None:
        if self.compressed:
            await self._compress_in_order(worker, buffer[:filled], lambda: self._pool.give_back(buffer))
            return
        placement = self._place(worker, filled)
        self._nursery.start_soon(self._write_and_give_back, placement, buffer, filled)

    async def _compress_in_order(self, worker: int, text: memoryview, release: Callable[[], None]) -> None:
        # Compressed members wait for their write holding a slot, as many as
        # the pool has buffers: memory stays bounded when the disk is slow.
        await self._member_slots.acquire()
        previous = self._placed.get(worker)
        mine = self._placed[worker] = trio.Event()
        task = self._feed_member if self._builders is not None else self._compress_and_write
        self._nursery.start_soon(task, worker, text, release, previous, mine)

    @trio.lowlevel.enable_ki_protection
    async def _feed_member(
        self, worker: int, text: memoryview, release: Callable[[], None], previous: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        assert self._builders is not None
        try:
            try:
                if previous is not None:
                    await previous.wait()  # a worker's chunks enter its member in order
                builder = self._builders.setdefault(worker, MemberBuilder(self.settings.level))
                finished = await trio.to_thread.run_sync(
                    builder.feed, text, self._member_target, limiter=self._compress_limiter
                )
            finally:
                release()
            if finished is None:
                self._member_since.setdefault(worker, trio.current_time())
                mine.set()
                return
            self._member_since.pop(worker, None)
            placement, member = self._place_member(worker, finished)
            mine.set()
            await self._write(placement, member)
        finally:
            self._member_slots.release()

    def _place_member(self, worker: int, finished: tuple[bytes, int, int]) -> tuple[Placement, bytes]:
        """Place a finished member ``(member, text bytes, events)`` next in
        ``worker``'s order and record it for the index."""
        member, text, events = finished
        placement = self._place(worker, len(member))
        self._record(placement, text=text, events=events)
        return placement, member

    @trio.lowlevel.enable_ki_protection
    async def _compress_and_write(
        self, worker: int, text: memoryview, release: Callable[[], None], previous: trio.Event | None,
        mine: trio.Event,
    ) -> None:
        try:
            try:
                member, events = await trio.to_thread.run_sync(
                    _compress_chunk, text, self.settings.level, limiter=self._compress_limiter
                )
            finally:
                release()  # the text is no longer needed
            if previous is not None:
                await previous.wait()
            placement, member = self._place_member(worker, (member, text.nbytes, events))
            mine.set()
            await self._write(placement, member)
        finally:
            self._member_slots.release()

    def _record(self, placement: Placement, *, text: int, events: int) -> None:
        """Remember the gzip members of ``placement`` for the member index."""
        if not self.compressed:
            return
        with self._sink_lock:
            self._record_locked(placement, text=text, events=events)

    def _record_locked(self, placement: Placement, *, text: int, events: int) -> None:
        file, offset = placement.file, placement.offset
        if placement.head:
            self._members.append((file, offset, placement.head, self._header_text, 0, True))
        if placement.body:
            self._members.append((file, offset + placement.head, placement.body, text, events, True))
        if placement.pad:
            self._members.append((file, offset + placement.head + placement.body, placement.pad,
                                  gzip_padding_members(placement.pad), 0, False))

    def member_index(self) -> dict[str, object]:
        """The member index of a compressed output (see the README for the format)."""
        members = []
        text_offset = first_event = 0
        for file, offset, length, text, events, listed in sorted(self._members):
            if listed:
                members.append({
                    "file": file, "offset": offset, "length": length, "text_offset": text_offset,
                    "text_length": text, "first_event": first_event, "events": events,
                })
            text_offset += text
            first_event += events
        return {
            "format": "pwriter-members/1",
            "files": [os.path.basename(name) for name in self._output.targets],
            "members": members,
        }

    def _splice(self, placement: Placement, buffer: memoryview, filled: int) -> tuple[Placement, memoryview]:
        """Put the header and the padding of ``placement`` inside ``buffer``
        (around its first ``filled`` bytes) where they fit: one contiguous
        write of whole stripes (a registered buffer for io_uring, aligned for
        O_DIRECT).  Only the first chunk has a header to make room for; the
        bytes of ``buffer`` after ``filled`` may be overwritten."""
        if placement.head + filled + placement.pad <= len(buffer) and (placement.head or placement.pad):
            head = placement.head
            if head:
                buffer[head : head + filled] = buffer[:filled]
                buffer[:head] = self._header
            buffer[head + filled : head + filled + placement.pad] = plain_padding(placement.pad)
            filled = placement.length
            placement = dataclasses.replace(placement, head=0, body=filled, pad=0)
        return placement, buffer[:filled]

    @trio.lowlevel.enable_ki_protection
    async def _write_and_give_back(self, placement: Placement, buffer: memoryview, filled: int) -> None:
        try:
            placement, body = self._splice(placement, buffer, filled)
            await self._write(placement, body, aligned_memory=True)
        finally:
            # The backend returns only once the kernel is done with the buffer.
            self._pool.give_back(buffer)

    async def _write_whole(self, worker: int, chunk: memoryview) -> None:
        # Chunks that bypass the pool are bounded by their own slots, as many
        # as there are pool buffers, so that memory stays bounded.
        await self._whole_slots.acquire()
        if self.compressed:
            await self._compress_in_order(worker, chunk, self._whole_slots.release)
            return
        placement = self._place(worker, len(chunk))
        self._nursery.start_soon(self._write_and_release_slot, placement, chunk)

    @trio.lowlevel.enable_ki_protection
    async def _write_and_release_slot(self, placement: Placement, chunk: memoryview) -> None:
        try:
            await self._write(placement, chunk)
        finally:
            self._whole_slots.release()

    @trio.lowlevel.enable_ki_protection
    async def _write(self, placement: Placement, body: bytes | memoryview, *, aligned_memory: bool = False) -> None:
        """Write ``placement`` (header, ``body``, padding) to its file.

        With O_DIRECT, a write of one page-aligned buffer (``aligned_memory``)
        at an aligned offset and of an aligned length goes through the direct
        descriptor; any other (the footer, a line longer than a stripe) goes
        through the buffered one.  Their ranges never share a page.
        """
        if self._stream:  # in order, through the one gate of stream writes (a thread's)
            await trio.to_thread.run_sync(
                functools.partial(self._write_in_thread, placement, body, aligned_memory=aligned_memory),
                limiter=self._stream_limiter,
            )
            return
        fd, parts = self._parts(placement, body, aligned_memory)
        try:
            await self._backend.write(fd, parts, placement.offset)
        except OSError as exc:
            raise self._write_error(placement, exc) from None
        self._written(placement, fd)

    def _parts(self, placement: Placement, body: bytes | memoryview,
               aligned_memory: bool) -> tuple[int, list[bytes | memoryview]]:
        """The descriptor and the buffers of one write: header, ``body``, padding.

        With O_DIRECT, a write of one page-aligned buffer (``aligned_memory``)
        at an aligned offset and of an aligned length goes through the direct
        descriptor; any other goes through the buffered one.
        """
        parts: list[bytes | memoryview] = []
        if placement.head:
            parts.append(self._header)
        if placement.body:
            parts.append(body)
        if placement.pad:
            parts.append(self._padding(placement.pad))
        if (
            self._direct_fds
            and aligned_memory
            and len(parts) == 1
            and placement.offset % DIRECT_ALIGNMENT == 0
            and placement.length % DIRECT_ALIGNMENT == 0
        ):
            return self._direct_fds[placement.file], parts
        return self._fds[placement.file], parts

    def _write_error(self, placement: Placement, exc: OSError) -> WriteError:
        return WriteError(self._output.targets[placement.file], exc.strerror or str(exc), exc.errno)

    def _written(self, placement: Placement, fd: int) -> None:
        """Bookkeeping after a write (from the trio thread or a worker thread)."""
        with self._sink_lock:
            self._bytes_written += placement.length
            if fd in self._direct_fds:
                self._direct_writes += 1
        if self._writeback and placement.length >= WRITEBACK_MIN and fd not in self._direct_fds:
            # Durable output: start writing this range back now, so that the
            # final fsync finds little left to do (see WRITEBACK_MIN).
            os.posix_fadvise(fd, placement.offset, placement.length, os.POSIX_FADV_DONTNEED)
            with self._sink_lock:
                self._writeback_hints += 1

    # -- the chunk sink, called from the worker thread that made the chunk --

    def write_chunk_in_thread(self, lane: int, buffer: memoryview, filled: int) -> None:
        """From a worker thread that trio started (never the trio thread):
        write ``buffer[:filled]`` (whole lines, at most :attr:`chunk_capacity`
        bytes) as one chunk of ``lane``, now, in this thread: placed under a
        lock, compressed here for gzip output, written through the backend's
        ``write_in_thread``.  Returns once the kernel is done with the
        buffer; the caller keeps it (its bytes after ``filled`` may have been
        overwritten by padding).  Not for stream outputs (:attr:`is_stream`)."""
        if filled > self.chunk_capacity or filled < 0:
            raise ValueError(f"a chunk of {filled} bytes: it must hold 0 to {self.chunk_capacity} bytes")
        if filled == 0:
            return
        with self._sink_lock:
            self._buffer_chunks += 1
            self._buffer_bytes += filled
        if self.compressed:
            self._member_in_thread(lane, buffer[:filled])
            return
        placement, body = self._splice(self._place(lane, filled), buffer, filled)
        self._write_in_thread(placement, body, aligned_memory=True)

    def write_lines_in_thread(self, lane: int, lines: bytes) -> None:
        """:meth:`write_chunk_in_thread` for whole lines of any length, not in a pool buffer."""
        with self._sink_lock:
            self._buffer_chunks += 1
            self._buffer_bytes += len(lines)
        if self.compressed:
            self._member_in_thread(lane, memoryview(lines))
            return
        self._write_in_thread(self._place(lane, len(lines)), memoryview(lines))

    def finish_lane_in_thread(self, lane: int) -> None:
        """Padded gzip: finish and write this thread's unfinished member (at the end of its run)."""
        builder = getattr(self._thread_builder, "builder", None)
        self._thread_builder.builder = None
        if builder is not None:
            finished = builder.finish()
            if finished is not None:
                placement, member = self._place_member(lane, finished)
                self._write_in_thread(placement, member)

    @property
    def is_stream(self) -> bool:
        """Whether the output is a stream (written in order, from the trio thread only)."""
        return self._stream

    def _member_in_thread(self, lane: int, text: memoryview) -> None:
        if self._builders is None:  # a member per chunk
            member, events = _compress_chunk(text, self.settings.level)
            placement, member = self._place_member(lane, (member, text.nbytes, events))
            self._write_in_thread(placement, member)
            return
        builder = getattr(self._thread_builder, "builder", None)  # padded: members fill their slot
        if builder is None:
            builder = self._thread_builder.builder = MemberBuilder(self.settings.level)
        finished = builder.feed(text, self._member_target)
        if finished is not None:
            self._thread_builder.builder = None
            placement, member = self._place_member(lane, finished)
            self._write_in_thread(placement, member)

    def _write_in_thread(self, placement: Placement, body: bytes | memoryview, *,
                         aligned_memory: bool = False) -> None:
        fd, parts = self._parts(placement, body, aligned_memory)
        offset = placement.offset
        if self._stream:
            # A stream takes bytes in order: wait until every byte placed
            # before these is written (each placed chunk is being written by
            # the thread or task that placed it, so the earliest always goes).
            with self._stream_turn:
                while self._stream_next != offset:
                    self._stream_turn.wait(STREAM_POLL)
                    trio.from_thread.check_cancelled()
            offset = -1  # at the stream's own position
        try:
            self._backend.write_in_thread(fd, parts, offset)
        except OSError as exc:
            raise self._write_error(placement, exc) from None
        self._written(placement, fd)
        if self._stream:
            with self._stream_turn:
                self._stream_next += placement.length
                self._stream_turn.notify_all()

    def _place(self, lane: int, length: int) -> Placement:
        """The planner's placement of a chunk (under the lock: worker threads place too)."""
        with self._sink_lock:
            return self._planner.place(lane, length)

    async def _close_producers(self) -> None:
        for producer in self._producers:
            await producer.close_for_writer()
        self._closing = True
        for send in self._sends:
            send.close()
        await self._coalesced.wait()

    def _close_for_caller(self) -> None:
        """After the writer's block (published or not): every handle and call is closed."""
        self._closing = True
        for producer in self._producers:
            producer.discard_for_writer()

    async def _sync(self) -> None:
        for fd, name in zip(self._fds, self._output.targets):
            try:
                await self._backend.fsync(fd)
            except OSError as exc:
                raise WriteError(name, exc.strerror or str(exc), exc.errno) from None


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_writer(
    path: str | os.PathLike[str] | typing.BinaryIO,
    *,
    settings: Settings | None = None,
    producers: int | None = None,
    force: bool = False,
    inputs: Sequence[str] = (),
    header: bytes = HEADER,
    footer: bytes = FOOTER,
    fs: FsInfo | None = None,
    backend: Backend | None = None,
    compress: bool | None = None,
    fsync: bool | None = None,
    level: int | None = None,
    validate: bool = False,
) -> AsyncIterator[Writer]:
    """Open a writer that publishes ``path`` when the block ends without error.

    ``settings`` default to :func:`~pwriter.settings.load_settings` (the
    environment); ``fsync``, ``compress`` and ``level``, when given, replace
    the setting of that name.  ``producers`` is a hint for the sizing.  The
    output is refused (:class:`~pwriter.errors.UsageError`) when its
    directory does not exist, when it exists and ``force`` is false
    (:class:`~pwriter.errors.OutputExistsError`), when it is one of
    ``inputs``, and, even with ``force``, when the name is not a regular file
    or a symlink to one (a directory, FIFO, socket, device).  ``header``
    starts and ``footer`` ends the output in every layout.  ``fs`` replaces
    filesystem detection and ``backend`` the backend named in the settings
    (both for tests).  ``compress`` (default: the ``compress`` setting, or a
    ``path`` ending in ``.gz``) writes every chunk, the header and the footer
    as standalone gzip members, compressed in worker threads, and publishes
    a member index, ``<path>.members.json``; a ``level`` outside the
    codec's range is a :class:`~pwriter.settings.ConfigError`.  With
    ``validate``, every line sent through a producer handle must be a JSON
    event line (``{...}``, valid JSON, the same C check as ``pwriter merge
    --validate``); another raises :class:`~pwriter.errors.InputError` at the
    call and takes nothing.

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
    A file that ``force`` replaces is kept until the new output is wholly in
    place, and put back if publishing fails.

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
    overrides = {"fsync": fsync, "compress": compress, "level": level}
    settings = settings_with(settings, **overrides) if settings is not None else load_settings(**overrides)
    output: OutputSet | StreamOutput
    if _is_stream(path):
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
    if compress is None:
        compress = settings.compress or (target.endswith(".gz") and not isinstance(output, StreamOutput))
    if compress:
        check_level(settings.level)
    header_text, footer_text = len(header), len(footer)
    if compress:  # the header and the footer are gzip members of their own
        header, footer = gzip_member(header, settings.level), gzip_member(footer, settings.level)
    fs, sizing = plan(target if output is None else ".", settings, producers=producers, fs=fs)
    planner = make_planner(
        sizing.layout, header_length=len(header), stripe_size=sizing.stripe_size, workers=sizing.workers,
        min_padding=GZIP_MIN_PADDING if compress else 1,
    )
    if output is None:
        output = OutputSet(target, sharded=sizing.layout == "sharded", files=planner.files, force=force,
                           sidecars=[member_index_path(target)] if compress else [])
    output.check(inputs)
    pool = BufferPool(sizing.buffers, sizing.stripe_size)
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
                output.create(direct=settings.direct)
                for fd, name in zip(output.fds + output.direct_fds, output.targets + output.targets):
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
                        writer._start()
                        try:
                            yield writer
                        except BaseException as exc:
                            body_error = exc
                            raise
                        await writer._close_producers()
                    if settings.fsync and output.can_sync:
                        await writer._sync()
                finally:
                    for fd in output.fds + output.direct_fds:
                        io.unregister(fd)
        except BaseExceptionGroup as group:
            failure = error_to_raise(group, body_error)
        if failure is not None:
            raise failure
        assert writer is not None
        sidecars = {member_index_path(target): json.dumps(writer.member_index()).encode()} if compress else {}
        output.publish(fsync=settings.fsync, sidecars=sidecars)
        writer.published = True
        writer._finished = trio.current_time()
    finally:
        if writer is not None:
            writer._close_for_caller()
        with trio.CancelScope(shield=True):
            output.discard()
            pool.close()


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


def _compress_chunk(text: memoryview, level: int) -> tuple[bytes, int]:
    return gzip_member(text, level), count_newlines(text)


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
