"""The io_uring backend: writes with ``pwritev`` from the maker threads, fsyncs through io_uring.

Theory of operation
-------------------
What this backend does, honestly (``mechanism`` in its statistics):

* Writes are plain ``pwritev`` calls in the thread that made the chunk
  (:meth:`IoUringBackend.write`, the thread backend's code): a ring per
  thread, or one shared ring under a lock, was slower, since a buffered
  write is handed to an io-wq kernel worker while the thread waits
  (``bench/floor.py``, ``docs/performance.md``).

* fsync goes through one ring driven by trio.  A ring has a submission
  queue of ``entries`` entries and a completion queue of twice that; a trio
  Semaphore admits at most ``entries`` operations, so an SQE is always
  available (the reaper still honours the CQ overflow flag: a lost
  completion would hang its waiter).  A task preps its SQE and yields once,
  uncancellable; the first to run again submits everything prepared
  meanwhile (one ``io_uring_enter``: "ops per enter" in the statistics).

* Completions are announced on an eventfd registered with the ring.  One
  reaper task, run by :func:`open_io_uring_backend`, waits for it with
  ``trio.lowlevel.wait_readable``, reads the eventfd *first* (after draining,
  it could swallow the wake-up of a completion posted in between), then
  drains every CQE.  The eventfd is only a hint: one wake-up can stand for
  many completions, or none.  The submitter waits for its CQE shielded.

* Registered files: :meth:`register` puts a file in a sparse table and its
  operations carry IOSQE_FIXED_FILE; kernels that refuse it get plain descriptors.

* Ctrl-C: the code here is KI-protected, and a wait for a completion holds
  a KeyboardInterrupt back until the kernel is done, then re-raises it.

* Closing (shielded): wait until nothing is in flight, stop the reaper,
  unregister the files and the eventfd, ``notify_closing`` the eventfd
  before closing it, and exit the ring.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import MECHANISMS, BackendCounters, BackendStatistics, BackendUnavailable
from .threads import PwritevWrites

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["IoUringBackend", "open_io_uring_backend", "unavailable_reason", "PW_ABI"]

#: Must equal PW_ABI in pwriter/_uring_build.py (a test checks it).
PW_ABI = 1
FILE_TABLE_SIZE = 64
REAP_BATCH = 256
MAX_ENTRIES = 4096
_RETRY_SUBMIT = (errno.EAGAIN, errno.EBUSY, errno.EINTR)
_U64 = (1 << 64) - 1


def _load() -> tuple[Any, Any]:
    try:
        from ... import _uring
    except ImportError as exc:
        raise BackendUnavailable(
            f"the io_uring extension is not built ({exc}); install liburing-dev and reinstall pwriter"
        ) from None
    if _uring.lib.pw_abi() != PW_ABI:
        raise BackendUnavailable("the compiled io_uring extension is stale; reinstall pwriter from a clean tree")
    return _uring.ffi, _uring.lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when an io_uring can be created here, else why not (cached)."""
    try:
        ffi, lib = _load()
    except BackendUnavailable as exc:
        return str(exc)
    ring = ffi.new("struct io_uring *")
    rc = lib.io_uring_queue_init(2, ring, 0)
    if rc < 0:
        return f"the kernel refuses io_uring ({os.strerror(-rc)}; seccomp or kernel.io_uring_disabled?)"
    lib.io_uring_queue_exit(ring)
    return None


async def _wait_through_interrupts(event: trio.Event) -> None:
    """Wait for ``event`` whatever happens: shielded from cancellation, and
    holding back a KeyboardInterrupt (trio delivers it to the main task even
    inside shielded scopes) until the event is set; then re-raise it."""
    interrupted: BaseException | None = None
    while not event.is_set():
        try:
            with trio.CancelScope(shield=True):
                await event.wait()
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


class _Operation:
    """One submitted operation (an fsync): its completion and its result."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result = 0


class IoUringBackend:
    """Writes with ``pwritev`` in the calling thread, each call at most
    ``write_call_size`` bytes; fsyncs through one io_uring of at least
    ``queue_depth`` entries (see the module docstring).

    Open it with :func:`open_io_uring_backend`, which also runs its reaper.
    """

    name = "io_uring"
    inline = False
    mechanism = MECHANISMS["io_uring"]

    def __init__(self, *, queue_depth: int, write_call_size: int | None = None) -> None:
        self._ffi, self._lib = _load()
        wanted = max(2, min(queue_depth, MAX_ENTRIES))
        self.entries = 1 << (wanted - 1).bit_length()
        self._ring = self._ffi.new("struct io_uring *")
        rc = self._lib.io_uring_queue_init(self.entries, self._ring, 0)
        if rc < 0:
            raise BackendUnavailable(f"cannot create an io_uring of {self.entries} entries: {os.strerror(-rc)}")
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        rc = self._lib.io_uring_register_eventfd(self._ring, self._eventfd)
        if rc < 0:
            os.close(self._eventfd)
            self._lib.io_uring_queue_exit(self._ring)
            raise BackendUnavailable(f"cannot register an eventfd with io_uring: {os.strerror(-rc)}")
        self.fixed_files = self._lib.io_uring_register_files_sparse(self._ring, FILE_TABLE_SIZE) == 0
        self._free_file_indexes = list(range(FILE_TABLE_SIZE - 1, -1, -1)) if self.fixed_files else []
        self._file_index: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._admit = trio.Semaphore(self.entries)
        self._operations: dict[int, _Operation] = {}
        self._next_user_data = 1
        self._queued: collections.deque[int] = collections.deque()  # prepped, not yet submitted
        self._broken: OSError | None = None
        self._reap_user_data = self._ffi.new(f"uint64_t[{REAP_BATCH}]")
        self._reap_result = self._ffi.new(f"int32_t[{REAP_BATCH}]")
        self._idle = trio.Event()
        self._idle.set()
        self._reaper_scope = trio.CancelScope(shield=True)
        self._closed = False
        self._counts = BackendCounters()  # (the ring's: fsyncs, submissions, enter calls)
        self._writes = PwritevWrites(write_call_size)  # (the maker threads' writes, counted under a lock)

    # -- files -------------------------------------------------------------

    def register(self, fd: int, name: str) -> None:
        self._names[fd] = name
        if self._free_file_indexes:
            index = self._free_file_indexes.pop()
            files = self._ffi.new("int[1]", [fd])
            if self._lib.io_uring_register_files_update(self._ring, index, files, 1) == 1:
                self._file_index[fd] = index
            else:
                self._free_file_indexes.append(index)

    def unregister(self, fd: int) -> None:
        self._names.pop(fd, None)
        index = self._file_index.pop(fd, None)
        if index is not None:
            files = self._ffi.new("int[1]", [-1])
            self._lib.io_uring_register_files_update(self._ring, index, files, 1)
            self._free_file_indexes.append(index)

    # -- operations --------------------------------------------------------

    def write(self, fd: int, buffers: Sequence[Buffer], offset: int) -> None:
        """Blocking, from a thread: ``pwritev`` in that thread (see
        the module docstring: a ring of the thread's own was slower)."""
        if self._closed:
            raise RuntimeError("io_uring backend is closed")
        self._writes.write(fd, buffers, offset, self._names.get(fd, f"fd {fd}"))

    @trio.lowlevel.enable_ki_protection
    async def fsync(self, fd: int) -> None:
        result = await self._operate(functools.partial(self._prep_fsync, fd))
        if result < 0:
            raise OSError(-result, f"fsync failed: {os.strerror(-result)}", self._names.get(fd, f"fd {fd}"))
        self._counts.fsyncs += 1

    def _target(self, fd: int) -> tuple[int, int]:
        index = self._file_index.get(fd)
        return (fd, 0) if index is None else (index, 1)

    def _prep_fsync(self, fd: int, user_data: int) -> int:
        target, fixed_file = self._target(fd)
        return int(self._lib.pw_prep_fsync(self._ring, target, fixed_file, user_data))

    async def _operate(self, prep: Callable[[int], int]) -> int:
        """Prep one SQE, get it submitted, and wait (uncancellably) for its CQE."""
        if self._closed:
            raise RuntimeError("io_uring backend is closed")
        if self._broken is not None:
            raise self._broken
        await self._admit.acquire()  # cancellable: nothing is submitted yet
        user_data = self._next_user_data
        self._next_user_data += 1
        try:
            rc = prep(user_data)
        except BaseException:
            self._admit.release()  # nothing was queued
            raise
        if rc < 0:
            self._admit.release()
            raise OSError(-rc, f"cannot queue an io_uring operation: {os.strerror(-rc)}")
        operation = _Operation()
        self._operations[user_data] = operation
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._queued.append(user_data)
        self._counts.submissions += 1
        self._counts.most_in_flight = max(self._counts.most_in_flight, len(self._operations))
        interrupted: BaseException | None = None
        try:
            # Let the other ready tasks prep theirs, then submit them all at once.
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()
            except KeyboardInterrupt as exc:
                interrupted = exc
            if self._queued:
                self._submit()
            while self._queued and self._queued[0] <= user_data and self._broken is None:
                # io_uring_enter refused for now (EAGAIN, EBUSY): try again
                # shortly; nothing else would submit if nothing is in flight.
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.001)
                self._submit()
            await _wait_through_interrupts(operation.done)
        finally:
            self._admit.release()
        if interrupted is not None:
            raise interrupted
        return operation.result

    def _submit(self) -> None:
        """Submit every prepped SQE with one io_uring_enter.

        A retryable failure (EAGAIN, EBUSY, EINTR) leaves them queued: the
        reaper submits again after its next drain.  Any other failure means
        the kernel took none of them: their operations fail with that errno
        and the backend refuses further work (the SQEs are never submitted).
        """
        rc = self._lib.io_uring_submit(self._ring)
        self._counts.enter_calls += 1
        if rc >= 0:
            for _ in range(min(rc, len(self._queued))):
                self._queued.popleft()
            return
        if -rc in _RETRY_SUBMIT:
            return
        self._broken = OSError(-rc, f"io_uring_enter failed: {os.strerror(-rc)}")
        while self._queued:
            operation = self._operations.pop(self._queued.popleft())
            operation.result = rc
            operation.done.set()
        if not self._operations:
            self._idle.set()

    # -- completions -------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def reap_forever(self) -> None:
        """Wait for completions and hand each result to its waiter, until
        :meth:`stop_reaping`.  Shielded: an outer cancellation must not stop
        the reaper while operations are in flight, or their waiters (which
        cannot be cancelled) would wait forever."""
        with self._reaper_scope:
            while True:
                await trio.lowlevel.wait_readable(self._eventfd)
                try:
                    os.eventfd_read(self._eventfd)
                except BlockingIOError:
                    pass
                self.drain()

    def stop_reaping(self) -> None:
        self._reaper_scope.cancel()

    def drain(self) -> None:
        """Reap every completion the ring holds (and any it kept aside on overflow)."""
        while True:
            count = self._lib.pw_reap(self._ring, self._reap_user_data, self._reap_result, REAP_BATCH)
            for index in range(count):
                operation = self._operations.pop(self._reap_user_data[index])
                operation.result = self._reap_result[index]
                operation.done.set()
            if count == REAP_BATCH:
                continue
            if self._lib.pw_cq_has_overflow(self._ring):
                self._lib.io_uring_submit_and_wait(self._ring, 0)  # flushes the overflowed CQEs
                continue
            break
        if self._queued and self._broken is None:
            self._submit()
        if not self._operations:
            self._idle.set()

    # -- closing -----------------------------------------------------------

    async def wait_idle(self) -> None:
        """Return once no operation is in flight (cancellation and Ctrl-C wait too)."""
        while self._operations:
            await _wait_through_interrupts(self._idle)

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Release the ring; the caller has waited for :meth:`wait_idle`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.fixed_files:
            self._lib.io_uring_unregister_files(self._ring)
        self._lib.io_uring_unregister_eventfd(self._ring)
        trio.lowlevel.notify_closing(self._eventfd)
        os.close(self._eventfd)
        self._lib.io_uring_queue_exit(self._ring)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> BackendStatistics:
        ring = self._counts
        writes = self._writes.snapshot()
        return dataclasses.replace(writes, fsyncs=ring.fsyncs, submissions=ring.submissions,
                                   enter_calls=ring.enter_calls,
                                   most_in_flight=max(writes.most_in_flight, ring.most_in_flight)
                                   ).snapshot(self.name, self.mechanism)


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def open_io_uring_backend(*, queue_depth: int, write_call_size: int | None = None
                                ) -> AsyncIterator[IoUringBackend]:
    """An :class:`IoUringBackend` with its reaper running; on exit (shielded)
    waits for every operation in flight, then closes the ring."""
    backend = IoUringBackend(queue_depth=queue_depth, write_call_size=write_call_size)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.reap_forever)
            try:
                yield backend
            finally:
                with trio.CancelScope(shield=True):
                    await backend.wait_idle()
                backend.stop_reaping()
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()
