"""The writer for code that is not trio: plain threads, asyncio, dask.

Theory of operation
-------------------
:func:`open_writer_sync` runs the very same service as :func:`~pwriter.service.writer.open_writer` on a
trio loop in a background thread.  The caller's threads never run trio code: a :class:`SyncProducer`
batches lines in the calling thread and carries one block at a time into the trio thread
(``trio.from_thread.run``), so the hop is paid once per ``batch_bytes``, not per line.  A handle is used
by one thread at a time: a call while another thread is inside one raises
:class:`~pwriter.errors.BusyError` and takes nothing.

Ending the ``with`` block normally first stops the calls (from then on each raises
:class:`~pwriter.errors.ClosedError` and takes nothing; a call under way in another thread ends first),
then closes every handle, lets the service publish, and joins the thread: when ``with`` returns, the
output is complete.  An exception inside the block (Ctrl-C included) cancels the service, which publishes
nothing; the exception propagates unchanged.  Ctrl-C while a call waits for the service leaves unknown
whether it took its lines: the writer then publishes nothing (later calls raise ClosedError, and so does
the close).  When the service fails on its own, the next call and the end of the block raise that error,
with the trio API's exception type.
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from ..data.inputs import path_list
from ..errors import BusyError, ClosedError, InputError, PwriterError
from ..plan.settings import Settings
from ..service.handle import DEFAULT_BATCH_BYTES, HandleCore, HandleState, Producer, copy_of
from ..service.merge import MergeResult, merge
from ..service.writer import Writer, WriterStatistics, error_to_raise, open_writer

__all__ = ["open_writer_sync", "SyncWriter", "SyncProducer", "merge_sync"]


class _Aborted(Exception):
    """The caller's block raised: the service must publish nothing."""


class SyncWriter:
    """A running writer for plain threads; obtain one from :func:`open_writer_sync`."""

    def __init__(self, path: Any, options: dict[str, Any]) -> None:
        self._path = path
        self._options = options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._writer: Writer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._finish: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._abort = False
        self._handles: list[SyncProducer] = []
        self._handles_lock = threading.Lock()
        self._closing = False  # set once: no call starts any more
        self._interrupted = False  # set once: Ctrl-C landed while a call waited for the service
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pwriter-sync", daemon=True)

    # -- the trio side -----------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._serve, strict_exception_groups=True)
        except _Aborted:
            pass
        except BaseExceptionGroup as group:
            self._error = error_to_raise(group)
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._finish = trio.Event()
        with trio.CancelScope() as self._scope:  # cancelled by Ctrl-C in the caller's close
            async with open_writer(self._path, **self._options) as writer:
                self._writer = writer
                self._ready.set()
                await self._finish.wait()
                if self._abort:
                    raise _Aborted
                # No call is in progress and none starts any more (_end saw
                # to it): the handles' queues are the trio thread's now.
                for handle in self._handles:
                    await handle._async_close()
        if self._scope.cancelled_caught:
            raise _Aborted

    def _call(self, function: Any, *args: Any) -> Any:
        """``await function(*args)`` in the trio thread; the service's own error, if it failed, instead of
        what that failure made the call raise."""
        if self._closed:
            raise ClosedError("the writer is closed")
        try:
            return trio.from_thread.run(function, *args, trio_token=self._token)
        except KeyboardInterrupt:
            # Ctrl-C while this thread waited: the call may still be going on
            # in the service, so whether it took its lines is unknown.
            self._interrupted = True  # the writer will publish nothing
            raise
        except (ValueError, TypeError, BusyError, InputError):
            raise  # the call's own misuse: the service goes on
        except ClosedError as closed:
            # The service closed the handle or its lane: it is ending.
            raise self._ended(closed) from None
        except (trio.RunFinishedError, trio.Cancelled):
            raise self._ended(ClosedError("the writer closed: nothing was taken")) from None
        except BaseException:
            if not self._thread.is_alive() and self._error is not None:
                raise self._error from None
            raise

    def _ended(self, closed: ClosedError) -> BaseException:
        """The service is ending: its error once its thread has ended, else ``closed``."""
        self._thread.join()
        return self._error if self._error is not None else closed

    def _refusal(self, call: str) -> ClosedError | None:
        """The error for ``call`` once the writer closes (or a call was interrupted by Ctrl-C), else None."""
        if self._closing:
            return ClosedError(f"{call}: its writer is closing or closed: nothing was taken")
        if self._interrupted:
            return self._interruption(call)
        return None

    @staticmethod
    def _interruption(call: str) -> ClosedError:
        return ClosedError(f"{call}: a call was interrupted by Ctrl-C, the writer publishes nothing: "
                           "nothing was taken")

    # -- the caller's side -------------------------------------------------

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _end(self, exc: BaseException | None) -> None:
        """Finish the service: publish (``exc`` None: calls under way end first) or abort (they raise
        ClosedError), and join its thread.  Ctrl-C while waiting aborts."""
        try:
            with self._handles_lock:
                self._closing = True
                handles = list(self._handles)
            self._abort = exc is not None or self._interrupted
            for handle in handles:
                handle._refuse(wait=not self._abort)
            self._soon(self._finish_soon)
            self._thread.join()
        except KeyboardInterrupt:
            self._abort = True
            self._soon(self._cancel_soon)
            while self._thread.is_alive():  # the cleanup is prompt: let it finish
                try:
                    self._thread.join()
                except KeyboardInterrupt:
                    pass
            self._set_closed()
            raise
        self._set_closed()
        if exc is None and self._error is not None:
            raise self._error
        if exc is None and self._interrupted:
            raise PwriterError(f"{self._path}: a call was interrupted (KeyboardInterrupt) while it waited for the "
                               "writer, so what it took is unknown: nothing was published")

    def _set_closed(self) -> None:
        self._closed = True
        for handle in self._handles:
            handle._finish()

    def _soon(self, function: Callable[[], None]) -> None:
        """Run ``function()`` in the trio thread soon (nothing if the service has ended)."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(function)
        except trio.RunFinishedError:
            pass

    def _finish_soon(self) -> None:
        assert self._finish is not None
        self._finish.set()

    def _cancel_soon(self) -> None:
        assert self._finish is not None and self._scope is not None
        self._finish.set()
        self._scope.cancel()

    def producer(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES) -> SyncProducer:
        """A new handle for one thread (close it, or use it as a context manager)."""
        async def make() -> Producer:
            assert self._writer is not None
            return self._writer.producer(batch_bytes=batch_bytes)

        assert self._writer is not None
        refusal = self._refusal("producer()")
        if refusal is not None:
            raise refusal
        handle = SyncProducer(self, self._call(make), batch_bytes, self._writer.line_check)
        with self._handles_lock:
            refusal = self._refusal("producer()")
            if refusal is not None:
                raise refusal  # (the new handle is the trio writer's to close)
            self._handles.append(handle)
        return handle

    def statistics(self) -> WriterStatistics:
        """A snapshot of what the writer did so far."""
        assert self._writer is not None
        if self._closed:
            return self._writer.statistics()

        async def snapshot() -> WriterStatistics:
            assert self._writer is not None
            return self._writer.statistics()

        try:
            return typing.cast(WriterStatistics, self._call(snapshot))
        except ClosedError:  # the service ended meanwhile (its thread has been joined)
            return self._writer.statistics()

    @property
    def outputs(self) -> list[str]:
        """The output files in read order (their final names)."""
        assert self._writer is not None
        return self._writer.outputs


class SyncProducer:
    """A handle through which one thread writes lines, with the promises of
    :class:`~pwriter.service.handle.Producer` and blocking calls.  Lines wait in the handle until it holds
    ``batch_bytes`` (or :meth:`flush`, :meth:`close`); the writer's ``max_delay`` does not reach them.  The
    checks and the batch (a :class:`~pwriter.service.handle.HandleCore`) run in the calling thread.
    """

    def __init__(self, writer: SyncWriter, inner: Producer, batch_bytes: int,
                 check: Callable[[bytes], None] | None) -> None:
        self._writer = writer
        self._inner = inner
        self._core = HandleCore(batch_bytes=batch_bytes, check=check, user="thread")
        self._guard = threading.Lock()

    @property
    def state(self) -> HandleState:
        """Where the handle is in its life."""
        return self._core.state

    def _enter(self, call: str) -> None:
        """A call starts: it holds the handle's lock (which a closing writer waits for), BUSY, until
        :meth:`_leave`."""
        self._lock(call)
        try:
            self._core.start_call(call)
        except BaseException:
            self._guard.release()
            raise

    def _lock(self, call: str) -> None:
        """Take the handle's lock for ``call`` (held by a call while it runs, and by the writer while it changes
        the core's state), or raise what refuses it."""
        writer = self._writer
        if writer._closing or writer._interrupted or not self._guard.acquire(blocking=False):
            raise self._refusal(call)

    def _refusal(self, call: str) -> Exception:
        """The error for ``call`` when the writer is closing (it may hold the
        lock), else for another thread's call holding the lock."""
        refusal = self._writer._refusal(f"{call} on a producer handle")
        return refusal if refusal is not None else self._core.refusal(call)

    def _leave(self) -> None:
        """The call ends and releases the lock (an aborting writer left the handle for it to refuse)."""
        self._core.end_call()
        if self._writer._closing:
            self._core.refuse()
        self._guard.release()

    def send_line(self, line: bytes) -> None:
        """Queue one line (a newline is added if it has none)."""
        if type(line) is not bytes:
            line = copy_of(line, "send_line")
        # _enter and _leave written out: the hot path of a thread's lines, three calls fewer per line
        writer, core = self._writer, self._core
        if writer._closing or writer._interrupted or not self._guard.acquire(blocking=False):
            raise self._refusal("send_line")
        try:
            core.start_call("send_line")
            try:
                line = core.line(line)
                if not core.add(line):
                    self._push(line)
            finally:
                core.end_call()
                if writer._closing:
                    core.refuse()
        finally:
            self._guard.release()

    def send_lines(self, lines: Iterable[bytes]) -> None:
        """Queue many lines at once; if one is refused, none is taken."""
        self._enter("send_lines")
        try:
            block = self._core.lines(lines)
            if not self._core.add(block):
                self._push(block)
        finally:
            self._leave()

    def _push(self, lines: bytes = b"") -> None:
        """Send the queued lines and ``lines`` as one block (on failure, none taken)."""
        core = self._core
        block = core.take(lines)
        try:
            self._writer._call(self._inner._send_checked, block)
        except BaseException:
            core.unsent()
            raise
        core.sent()

    def send_block(self, block: bytes) -> None:
        """Send a block of whole lines, after anything queued before it."""
        if type(block) is not bytes:
            block = copy_of(block, "send_block")
        self._enter("send_block")
        try:
            block = self._core.block(block)
            if self._core.pending:
                self._push()
            if block:
                self._writer._call(self._inner._send_checked, block)
        finally:
            self._leave()

    def flush(self) -> None:
        """Hand the queued lines to the writer now."""
        self._enter("flush")
        try:
            if self._core.pending:
                self._push()
        finally:
            self._leave()

    def close(self) -> None:
        """Push what is queued and close the handle; idempotent (once the writer closes, it does that)."""
        try:
            self._lock("close")
        except ClosedError:
            return
        core = self._core
        try:
            if not core.start_close("close"):
                return
            try:
                if core.pending:
                    self._push()
                self._writer._call(self._inner.aclose)
            except BaseException:
                core.end_call()  # closed: its lines (if any) are left for the writer
                raise
            core.finish()
        finally:
            self._guard.release()

    def _refuse(self, *, wait: bool) -> None:
        """The writer starts closing: refuse every call from now on (``wait``: a call under way ends first;
        else the handle is left to it)."""
        if self._guard.acquire(blocking=wait):
            self._core.refuse()
            self._guard.release()

    def _finish(self) -> None:
        """The writer has ended: the handle sends nothing more (unless a call, after an abort, still has it)."""
        if self._guard.acquire(blocking=False):
            self._core.finish()
            self._guard.release()

    async def _async_close(self) -> None:
        """At the writer's close, in the trio thread (no call in progress): the handle's last lines go too."""
        core = self._core
        if core.pending and not core.finished:
            await self._inner._send_checked(core.take())
            core.sent()
        self._finish()
        await self._inner.aclose()

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextmanager
def open_writer_sync(path: Any, *, settings: Settings | None = None, **options: Any) -> Iterator[SyncWriter]:
    """:func:`~pwriter.service.writer.open_writer` as a plain context manager, for code that is not trio:
    the same keywords and promises.  ``writer.producer()`` gives a handle per thread.  Leaving the block
    normally publishes the output (complete when ``with`` returns); an exception inside it publishes
    nothing and propagates unchanged.
    """
    writer = SyncWriter(path, {"settings": settings, **options})
    writer._start()
    try:
        yield writer
    except BaseException as exc:
        writer._end(exc)
        raise
    writer._end(None)


def merge_sync(inputs: Sequence[str], output: str, *, settings: Settings | None = None,
               **options: Any) -> MergeResult:
    """:func:`~pwriter.service.merge.merge` for code that is not trio (a trio loop of its own in the calling
    thread), with the same keywords and errors."""
    inputs = path_list(inputs, "merge_sync")  # (refused here, before a trio loop starts)
    try:
        return trio.run(lambda: merge(inputs, output, settings=settings, **options), strict_exception_groups=True)
    except BaseExceptionGroup as group:
        raise error_to_raise(group) from None
