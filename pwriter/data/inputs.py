"""Reading trace inputs: find, open, decompress and clean them into stripe buffers.

Their text goes straight into the caller's buffers.

An :class:`InputReader` reads one input, plain or gzip (told apart by its
magic number; decompressed with python-isal, which releases the GIL), and
cleans its text in place (:mod:`pwriter.plan.traceformat`, in C where built).
An :class:`InputRun` is the inputs of one reader, read one after another
into the same buffers, so that many small inputs cost one thread hop, not
one each.  :func:`fill_step` is the one step every reader takes (the merge's
readers and ``pwriter verify`` alike): fill the buffer with whole cleaned
lines, or finish a line longer than the buffer.  :func:`read_and_write` is
the merge's reader loop: fill steps, each full buffer written as a chunk
through the writer's chunk sink, in the reader's own thread.  ``--salvage`` keeps what a
crashed rank's damaged input still holds.  Everything here blocks: it is
meant to run in threads (whose waits on a pipe or FIFO a trio
cancellation ends).  An input is read as it was when opened (see
:class:`InputReader`).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import select
import stat as stat_module
import typing
import zlib
from collections.abc import Sequence

import trio

from ..errors import DataError, InputError, UsageError
from ..plan.completeness import InputEnd, input_end
from ..plan.traceformat import BOM, BlockCleaner, is_gzip_magic, is_valid_json, preview, rfind_newline
from .output import is_temporary_name

if typing.TYPE_CHECKING:
    from .sink import ChunkSink

__all__ = ["collect_inputs", "input_size", "InputReader", "InputRun", "fill_step", "read_and_write",
           "TRACE_SUFFIXES"]

PEEK_SIZE = 64 << 10
TRACE_SUFFIXES = (".pfw", ".pfw.gz")


def _natural_key(path: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def path_list(paths: Sequence[str | os.PathLike[str]], function: str, what: str = "inputs") -> list[str]:
    """``paths`` as a list of str, or TypeError (in pwriter's words) for a
    single path where a list of them is expected: a str is not iterated
    character by character."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"{function}() takes a list of paths as {what}, not a single "
                        f"{type(paths).__name__} ({[paths]!r} for one)")
    if isinstance(paths, list) and all(type(path) is str for path in paths):
        return list(paths)  # (the usual case, in one C loop: a merge may have many thousand inputs)
    listed = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            raise TypeError(f"{function}(): {what} must be str paths, not {type(path).__name__} ({path!r})")
        listed.append(os.fspath(path))
    return listed


def _entry_of(path: str) -> tuple[int, int, str] | None:
    """The directory entry ``path`` names: (device, inode of its directory,
    its name), or None when that directory cannot be examined."""
    directory, name = os.path.split(path)
    try:
        where = os.stat(directory or ".")
    except OSError:
        return None
    return (where.st_dev, where.st_ino, name)


def collect_inputs(paths: Sequence[str], directories: Sequence[str] | None = (), *,
                   exclude: Sequence[str] = (), recursive: bool = False) -> list[str]:
    """The input files, checked before any data is read.

    ``paths`` are taken as given; each of ``directories`` adds every
    ``*.pfw`` and ``*.pfw.gz`` file in it (not hidden, not pwriter
    temporaries, and not one of ``exclude``, which names the output's files
    so that a merge into the directory it reads can be repeated), in natural
    order of their names.  With ``recursive``, every such file below each
    directory, at any depth, in natural order of their paths relative to it;
    hidden directories are skipped, and a symlink to a directory is not
    followed (a symlink to a file is an input, as without ``recursive``).
    Only the directory entry that is an excluded name is skipped: another
    name for the same file (a hard link, a symlink) is an input, which the
    writer then refuses as the output.  The same file given twice is read
    once.  Raises :class:`UsageError` (exit 2) for a missing, unreadable or
    non-regular input, for a directory that cannot be read or has no
    traces, and for no inputs at all; TypeError for a single path (a str)
    where a list is expected.
    """
    paths = path_list(paths, "collect_inputs", "paths")
    directories = path_list(directories or (), "collect_inputs", "directories")
    found: list[str] = list(paths)
    excluded = {entry for entry in map(_entry_of, exclude) if entry is not None}
    for directory in directories:
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: not a directory")
        listed = _traces_in(directory, excluded, recursive=recursive)
        if not listed:
            where = "below" if recursive else "in"
            raise UsageError(f"{directory}: no *.pfw or *.pfw.gz traces {where} this directory")
        found.extend(listed)
    if not found:
        raise UsageError("no inputs: give trace files or -d DIR")
    inputs: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in found:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"{path}: input does not exist") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the input: {exc.strerror}") from None
        if stat_module.S_ISDIR(stat.st_mode):
            raise UsageError(f"{path}: input is a directory (use -d DIR to merge the traces in it)")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{path}: cannot read the input: permission denied")
        key = (stat.st_dev, stat.st_ino)
        if key not in seen:
            seen.add(key)
            inputs.append(path)
    return inputs


def _traces_in(directory: str, excluded: set[tuple[int, int, str]], *, recursive: bool) -> list[str]:
    """The traces of ``directory`` (with ``recursive``, below it) for
    :func:`collect_inputs`, in natural order of their paths relative to it."""
    found: list[tuple[list[object], str]] = []
    pending = [""]  # directories to list, relative to ``directory``
    while pending:
        relative = pending.pop()
        path = os.path.join(directory, relative) if relative else directory
        try:
            where = os.stat(path)
            with os.scandir(path) as entries:
                listed = list(entries)
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the directory: {exc.strerror}") from None
        for entry in listed:
            if entry.name.startswith(".") or is_temporary_name(entry.name):
                continue
            if recursive and entry.is_dir(follow_symlinks=False):
                pending.append(os.path.join(relative, entry.name))
                continue
            if not entry.name.endswith(TRACE_SUFFIXES) or not entry.is_file():
                continue
            if (where.st_dev, where.st_ino, entry.name) in excluded:
                continue
            found.append((_natural_key(os.path.join(relative, entry.name) if relative else entry.name), entry.path))
    return [path for _, path in sorted(found)]


def _gzip_file(raw: io.BufferedReader[typing.Any]) -> gzip.GzipFile:
    """A gzip reader over ``raw``: python-isal's where installed.

    python-isal was the fastest reader of the three ``bench/gzip_readers.py``
    compares (stdlib gzip, zlib-ng, python-isal; figures in
    ``docs/performance.md``), and it releases the GIL.  Multi-member files
    work with all three.
    """
    try:
        from isal import igzip
    except ImportError:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return igzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]


def _gzip_errors() -> tuple[type[Exception], ...]:
    """The decompressors' own error classes (evaluated only on an error)."""
    try:
        from isal.igzip_lib import IsalError
    except ImportError:
        return (zlib.error,)
    return (zlib.error, typing.cast(type[Exception], IsalError))


def _readable_gzip_text(fd: int, limit: int, *, skip: int) -> bytes:
    """--salvage: the text a truncated gzip file still gives, after the first
    ``skip`` bytes (already read).  Reads the file again through ``fd`` (the
    file as it was opened, even if its name now means another), its first
    ``limit`` bytes; decompresses member by member and keeps the output of
    the cut member up to where its data stops."""
    rest = bytearray()
    inflater = zlib.decompressobj(wbits=31)

    def keep(piece: bytes) -> None:
        nonlocal skip
        cut = min(skip, len(piece))
        skip -= cut
        rest.extend(piece[cut:])

    offset = 0
    while offset < limit and (chunk := os.pread(fd, min(1 << 20, limit - offset), offset)):
        offset += len(chunk)
        while chunk:
            try:
                keep(inflater.decompress(chunk))
            except zlib.error:
                return bytes(rest)
            if not inflater.eof:
                break
            chunk = inflater.unused_data
            inflater = zlib.decompressobj(wbits=31)
    return bytes(rest)


class _RawInput(io.RawIOBase):
    """A raw reader of ``fd`` (owned: closed with the reader), which counts
    the bytes read so far (:meth:`tell`)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _FileUpTo(_RawInput):
    """The first ``limit`` bytes of a regular file, read through ``fd``
    (owned) with ``preadv``: a file that grows while it is read is read as
    it was when opened."""

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__(fd)
        self._limit = limit

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._limit}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: typing.Any) -> int:
        left = self._limit - self._position
        if left <= 0:
            return 0
        with memoryview(buffer) as view, view.cast("B") as target:
            got = os.preadv(self._fd, [target[:left]], self._position)
        self._position += got
        return got


class _WaitingFile(_RawInput):
    """A pipe, FIFO or device read through ``fd`` (owned, non-blocking):
    each read first waits until the descriptor is readable, in trio when
    called from a thread trio started, so that a cancellation (Ctrl-C,
    SIGTERM) ends the wait at once, even for a FIFO that no writer ever
    opens or that stays silent.  Elsewhere (``pwriter verify``) it waits in
    ``poll``."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._in_trio: bool | None = None

    def readinto(self, buffer: typing.Any) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            while True:
                # Wait first: a FIFO that no writer has opened yet reads as
                # empty (0 bytes) at once, but is not readable until a writer
                # writes or hangs up.
                self._wait_readable()
                try:
                    got = os.readv(self._fd, [target])
                except BlockingIOError:
                    continue
                self._position += got
                return got

    def _wait_readable(self) -> None:
        if self._in_trio is None:
            try:
                trio.from_thread.check_cancelled()
                self._in_trio = True
            except RuntimeError:  # not a thread that trio started
                self._in_trio = False
        if self._in_trio:
            trio.from_thread.run(trio.lowlevel.wait_readable, self._fd)
        else:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.poll()


def starts_array(path: str) -> bool | None:
    """Whether the text of an input begins, after a byte-order mark and
    whitespace, with ``[`` (array style; see :mod:`pwriter.plan.traceformat`);
    None for a pipe, FIFO or device, which cannot be looked at before it is
    read.  Reads only up to the first byte that is not whitespace (a few
    bytes of a gzip file's first member).  An input that cannot be read, or
    a damaged gzip file, says False here: its reader reports the problem."""
    try:
        if not stat_module.S_ISREG(os.stat(path).st_mode):
            return None  # (not even opened: a FIFO's writer would see its reader come and go)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):  # (replaced since)
            return None
        inflater = zlib.decompressobj(wbits=31) if is_gzip_magic(os.pread(fd, 2, 0)) else None
        offset, first = 0, True
        while True:
            data = os.pread(fd, 4096, offset)
            if not data:
                return False
            offset += len(data)
            while inflater is not None and data:  # a few bytes of text at a time, member after member
                text = inflater.decompress(data, 64)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    data, inflater = inflater.unused_data + data, zlib.decompressobj(wbits=31)
                if (found := _first_byte(text, first)) is not None:
                    return found == b"["
                first = first and not text
            if inflater is None:
                if (found := _first_byte(data, first)) is not None:
                    return found == b"["
                first = False
    except (OSError, zlib.error):
        return False
    finally:
        os.close(fd)


def _first_byte(text: bytes, at_start: bool) -> bytes | None:
    """The first byte of ``text`` that is not whitespace (a byte-order mark
    skipped ``at_start``), or None."""
    if at_start and text.startswith(BOM):
        text = text[len(BOM) :]
    stripped = text.lstrip()
    return stripped[:1] or None


def input_size(path: str) -> int:
    """The size of an input now; :class:`DataError` if it has vanished since it was collected."""
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"{path}: the input vanished before it was read: {exc.strerror}") from None


_Read = typing.TypeVar("_Read")


def _read_regular(read: typing.Callable[..., _Read], fd: int, *args: typing.Any) -> _Read:
    """``read(fd, *args)`` of a regular file left ``O_NONBLOCK`` (inputs are
    opened so, lest a FIFO block the open; reads of a regular file ignore it,
    and one system call a file is saved), made blocking and read again where
    its filesystem honours the flag and the read would block."""
    try:
        return read(fd, *args)
    except BlockingIOError:
        os.set_blocking(fd, True)
        return read(fd, *args)


class _InputFile:
    """One input, opened as it is now, and its text (plain or gzip, told
    apart by its magic number).  Blocking: meant to run in a thread.

    A plain regular file is read with ``os.readv`` straight into the
    caller's buffer, up to its size when opened: no buffered reader, a few
    system calls for a small file (open, fstat, pread of the magic, read,
    then a stat of its name to check it did not change, close).  gzip files and
    pipes (which cannot pread: FIFOs are inputs too) go through a buffered
    reader that can peek; pipes, FIFOs and devices have no size to check,
    and are opened and read without blocking a cancellation
    (:class:`_WaitingFile`).

    An input is read as it was when opened: at its end (:meth:`check_whole`),
    its size, modification and change times (of the open descriptor) and
    the file its name means are checked again.  A change raises
    :class:`DataError` naming it.  With ``salvage``, an input that grew (a
    rank still writing it) or whose name now means another file (or none)
    keeps the text it had when opened, and a truncated gzip the text that
    decompresses; each is added to ``notes``.  One rewritten in place is an
    error still (its lines may mix the old text and the new).
    """

    def __init__(self, path: str, *, salvage: bool, size: int, notes: list[str]) -> None:
        self.path = path
        self.salvage = salvage
        self.size = size  # bytes when the merge began: reading fewer means it shrank
        self.text_read = 0
        """Bytes of text read so far."""
        self._notes = notes  # (its reader's list: a callback into the reader would make a cycle, which
        # keeps a gzip reader's buffers alive until the garbage collector runs)
        self._recovered: bytes | None = None  # the readable rest of a truncated gzip
        self._checked = False  # whether the input was checked for a change since it was opened
        self._fd: int | None = None
        self._raw: io.BufferedReader[typing.Any] | None = None
        try:
            # Without blocking: opening a FIFO for reading would wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise DataError(f"{path}: cannot open the input: {exc.strerror}") from None
        self._descriptor = fd  # (owned by self._fd or self._raw)
        try:
            opened = os.fstat(fd)
            self._opened = opened if stat_module.S_ISREG(opened.st_mode) else None
            if self._opened is not None:
                head = _read_regular(os.pread, fd, 2, 0)
                if is_gzip_magic(head):
                    os.set_blocking(fd, True)
                    self._raw = io.BufferedReader(_FileUpTo(fd, opened.st_size), buffer_size=PEEK_SIZE)
                else:
                    self._fd = fd
            else:
                self._raw = io.BufferedReader(_WaitingFile(fd), buffer_size=PEEK_SIZE)
                head = self._raw.peek(2)[:2]
        except BaseException as exc:
            if self._raw is not None:
                self._raw.close()
            else:
                os.close(fd)
            if isinstance(exc, OSError):
                raise DataError(f"{path}: cannot read the input: {exc.strerror}") from None
            raise
        self.compressed = is_gzip_magic(head)
        self._gzip = _gzip_file(self._raw) if self.compressed and self._raw is not None else None

    @property
    def raw_offset(self) -> int:
        """Bytes of the file (compressed, for gzip) consumed so far."""
        if self._raw is None:
            return self.text_read  # plain: the text is the file
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def check_whole(self) -> None:
        """At the end of the input: it must not have shrunk since the merge
        began, nor changed since it was opened (see the class docstring)."""
        consumed = self.raw_offset
        least = max(self.size, self._opened.st_size if self._opened is not None else 0)
        self._check_unchanged()
        if consumed < least:
            raise DataError(f"{self.path}: the input shrank while it was read ({least} bytes when the "
                            f"merge began, {consumed} at the end)")

    def _check_unchanged(self) -> None:
        """Raise :class:`DataError` if the input changed since it was opened;
        with ``salvage``, note a change that leaves its bytes of then whole."""
        if self._opened is None or self._checked:
            return  # (a pipe or a device: no size, no times to compare)
        self._checked = True
        change = self._change(self._opened)
        if change is None:
            return
        what, whole = change
        if self.salvage and whole:
            self._notes.append(f"{what}: kept the {self._opened.st_size} bytes it had when opened")
            return
        hint = "--salvage keeps the lines it had when opened" if whole else "its lines may mix the old text and the new"
        raise DataError(f"{self.path}: the input changed while it was read: {what} ({hint})")

    def _change(self, opened: os.stat_result) -> tuple[str, bool] | None:
        """How a regular input changed since it was opened (None: not at
        all), and whether the bytes it had then are still there unchanged."""
        try:
            named = os.stat(self.path)
        except OSError:
            named = None
        same_file = named is not None and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
        try:
            now = named if named is not None and same_file else os.fstat(self._descriptor)  # (one inode: one call)
        except OSError as exc:
            raise DataError(f"{self.path}: read failed: {exc.strerror}") from None
        if now.st_size > opened.st_size:
            return f"it grew from {opened.st_size} to {now.st_size} bytes (still being written?)", True
        if now.st_size < opened.st_size:
            return f"it shrank from {opened.st_size} to {now.st_size} bytes", False
        # (Removing or renaming a file moves its change time too: compared only while the name means it.)
        if now.st_mtime_ns != opened.st_mtime_ns or (same_file and now.st_ctime_ns != opened.st_ctime_ns):
            return "it was rewritten in place (its modification or change time moved)", False
        if not same_file:
            return ("it was replaced: its name now means another file" if named is not None
                    else "it was removed"), True
        return None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of text, b"" at the end (for the rare line longer than a buffer)."""
        data = bytearray(size)
        with memoryview(data) as view:
            got = self.read_into(view, 0, size)
        del data[got:]
        return bytes(data)

    def read_into(self, buffer: memoryview, start: int, stop: int) -> int:
        """Read text into ``buffer[start:stop]``; returns the bytes read, 0 at the end.

        gzip is decompressed straight into the buffer (``readinto``: no
        intermediate bytes object and no copy).
        """
        if self._recovered is not None:
            data, self._recovered = self._recovered[: stop - start], self._recovered[stop - start :]
            buffer[start : start + len(data)] = data
            self.text_read += len(data)
            return len(data)
        try:
            if self._fd is not None:  # plain and regular: no further than its size when opened
                assert self._opened is not None
                stop = min(stop, start + self._opened.st_size - self.text_read)
                if stop <= start:
                    return 0
                with buffer[start:stop] as target:
                    got = _read_regular(os.readv, self._fd, [target])
            else:
                assert self._raw is not None
                with buffer[start:stop] as target:
                    got = (self._gzip or self._raw).readinto(target)
        except EOFError:
            self._check_unchanged()  # (a file cut where it was still being written, or rewritten)
            if not self.salvage or self._opened is None:
                raise self._truncated() from None
            self._recovered = _readable_gzip_text(self._descriptor, self._opened.st_size, skip=self.text_read)
            self._notes.append("truncated gzip: kept what decompresses")
            return self.read_into(buffer, start, stop)
        except (gzip.BadGzipFile, *_gzip_errors()) as exc:  # type: ignore[misc]
            self._check_unchanged()  # (corrupt because it was rewritten while read?)
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise DataError(f"{self.path}: read failed: {exc.strerror or exc}") from None
        self.text_read += got
        return got

    def _text_reached(self) -> int:
        """Bytes of text a gzip input gave, up to where reading stopped."""
        try:
            return int(self._gzip.tell()) if self._gzip is not None else self.text_read
        except (OSError, ValueError):
            return self.text_read

    def _truncated(self) -> InputError:
        end = self.raw_offset
        salvage = ("--salvage keeps the events before the cut" if self._opened is not None
                   else "a pipe cannot be read again to salvage it")
        return InputError(self.path, f"truncated gzip: the file ends inside a compressed member, at byte {end} "
                                     f"(after {self._text_reached()} bytes of text; {salvage})")

    def _corrupt(self, exc: Exception) -> InputError:
        return InputError(self.path, f"corrupt gzip: {exc}", self._text_reached())

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        if self._raw is not None:
            self._raw.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class InputReader:
    """Reads one input (:class:`_InputFile`: plain or gzip, as it was when
    opened) and cleans its text straight into the caller's stripe buffers.
    Blocking: meant to run in a thread.

    The caller keeps a buffer in two parts: ``buffer[:done]`` holds cleaned
    event lines, ``buffer[done:end]`` text read but not yet cleaned (the
    start of a line whose newline has not been read).  :meth:`fill` reads
    more, cleans every complete line in place and returns the new
    ``(done, end, finished)``.

    A change of the input while it is read raises :class:`DataError`
    naming it, or with ``salvage`` keeps the lines it had when opened where
    they are whole (see :class:`_InputFile`); what ``salvage`` kept or
    dropped is reported in ``damage``.  A last line without its newline is
    kept only if it is valid JSON (or a wrapper line): else it was cut
    short, an :class:`InputError` that suggests ``--salvage``, or with
    ``salvage`` dropped and reported.
    """

    def __init__(self, path: str, *, salvage: bool = False, validate: bool = False, size: int = 0) -> None:
        self.path = path
        self.salvage = salvage
        self._notes: list[str] = []  # what --salvage kept or dropped
        self.dropped_lines = 0
        self._file = _InputFile(path, salvage=salvage, size=size, notes=self._notes)
        self.compressed = self._file.compressed
        self._cleaner = BlockCleaner(path, validate=validate, drop_invalid=salvage)

    @property
    def events(self) -> int:
        return self._cleaner.events

    def end(self) -> InputEnd:
        """How the input ends (for :mod:`pwriter.plan.completeness`), once it is read whole."""
        cleaner = self._cleaner
        return input_end(self.path, events=cleaner.events, ids=cleaner.ids, last_event=cleaner.last_event,
                         damage=self.damage)

    @property
    def raw_offset(self) -> int:
        """Bytes of the file (compressed, for gzip) consumed so far."""
        return self._file.raw_offset

    def fill(self, buffer: memoryview, done: int, end: int, capacity: int) -> tuple[int, int, bool]:
        """Read into ``buffer[end:capacity]`` and clean the complete lines.

        ``finished`` is true once the input is exhausted and all its lines
        are cleaned (a last line without a newline gets one, if it is
        whole).  When the buffer is full and no progress is possible,
        returns its arguments unchanged: the caller must make room.
        """
        start, at_end = end, False
        while end < capacity:  # fill the buffer or read to the end: one thread hop for a small file
            got = self._file.read_into(buffer, end, capacity)
            if got == 0:
                at_end = True
                break
            end += got
        if at_end:  # (so end < capacity: there is room for a newline)
            self._file.check_whole()
            if end > done and buffer[end - 1] != 10:  # the last line has no newline
                line_start = rfind_newline(buffer, done, end) + 1 or done
                line = bytes(buffer[line_start:end])
                done = end = self._cleaner.clean_in_place(buffer, done, line_start)  # (an error before it comes first)
                if self._keeps_last_line(line, self._file.text_read - len(line)):
                    buffer[done : done + len(line)] = line
                    buffer[done + len(line)] = 10
                    end = done + len(line) + 1
            done = self._cleaner.clean_in_place(buffer, done, end)
            if self._cleaner.invalid:
                self._note_invalid_lines()
            return done, done, True
        if end == start:
            return done, end, False  # full: the caller must make room
        last = rfind_newline(buffer, done, end)
        if last < 0:
            return done, end, False
        cleaned = self._cleaner.clean_in_place(buffer, done, last + 1)
        tail = end - (last + 1)
        if tail and cleaned != last + 1:
            buffer[cleaned : cleaned + tail] = buffer[last + 1 : end]
        return cleaned, cleaned + tail, False

    def read_long_line(self, start: bytes, size: int) -> tuple[bytes, bytes]:
        """Finish a line longer than a buffer that begins with ``start``.

        Returns the cleaned line (with its newline; empty for a wrapper line
        or a cut last line that ``salvage`` drops) and the text read past
        its end (shorter than ``size``).
        """
        parts = [start]
        while True:
            data = self._file.read(size)
            newline = data.find(b"\n")
            if newline >= 0:
                parts.append(data[: newline + 1])
                rest = data[newline + 1 :]
                break
            parts.append(data)
            if not data:
                line = b"".join(parts)
                if not self._keeps_last_line(line, self._file.text_read - len(line)):
                    return b"", b""
                parts.append(b"\n")
                rest = b""
                break
        return self._cleaner.feed(b"".join(parts)), rest

    @property
    def damage(self) -> str | None:
        """What ``salvage`` kept or dropped of this input (None: nothing)."""
        return "; ".join(self._notes) if self._notes else None

    def _note(self, what: str) -> None:
        self._notes.append(what)

    def _note_invalid_lines(self) -> None:
        """--salvage --validate: count and describe the invalid lines dropped (there are some)."""
        cleaner = self._cleaner
        self.dropped_lines += cleaner.invalid
        shown = ", ".join(cleaner.invalid_examples) + (", ..." if cleaner.invalid > 3 else "")
        self._note(f"dropped {cleaner.invalid} lines that are not valid JSON: {shown}")

    def _keeps_last_line(self, line: bytes, offset: int) -> bool:
        """Whether the last line of the input, which has no newline, is
        whole.  A line cut short (a crash, or a rank still writing) is not
        valid JSON: an :class:`InputError`, or with ``salvage`` dropped and
        noted (returns False).  ``offset``: where the line starts in the text."""
        stripped = line.strip()
        if offset == 0 and stripped.startswith(BOM):
            stripped = stripped[len(BOM) :].strip()
        if stripped in (b"", b"[", b"]") or is_valid_json(stripped):
            return True  # a wrapper line, or a whole value (the cleaner checks that it is an event)
        if not stripped.startswith(b"{") and b"\x00" not in stripped:
            return True  # not the start of an event: the cleaner says what it is
        if not self.salvage:
            raise InputError(self.path, "its last line has no newline and is not whole JSON: cut short by a crash, "
                                        f"or still being written? (--salvage drops it): {preview(stripped)}", offset)
        self.dropped_lines += 1
        self._note(f"dropped a cut last line of {len(line)} bytes")
        return False

    def close(self) -> None:
        self._file.close()


class InputRun:
    """The inputs of one reader, read one after another into its buffers.

    :meth:`fill` goes on from input to input until the buffer is full or the
    run is over, so that many small inputs cost one thread hop, not one each.
    Counters are the run's own (written by one thread at a time, read by the
    progress display).
    """

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], *, salvage: bool = False,
                 validate: bool = False) -> None:
        self.paths = paths
        self._sizes = sizes
        self._salvage = salvage
        self._validate = validate
        self.salvaged: list[tuple[str, str, int]] = []  # (input, what was dropped, lines dropped)
        self.ends: list[InputEnd] = []  # how each input read whole ends, in order
        self._next = 0
        self.reader: InputReader | None = None
        self.files_done = 0
        self.events = 0
        self.bytes_done = 0
        self.text_bytes = 0  # cleaned event text handed on so far

    def fill(self, buffer: memoryview, done: int, end: int, capacity: int) -> tuple[int, int, bool]:
        """Like :meth:`InputReader.fill`, across the run's inputs: returns
        ``(done, end, finished)``; not finished means the buffer is full."""
        result = self._fill(buffer, done, end, capacity)
        self.text_bytes += result[0] - done
        return result

    def _fill(self, buffer: memoryview, done: int, end: int, capacity: int) -> tuple[int, int, bool]:
        while True:
            if self.reader is None:
                if self._next == len(self.paths):
                    return done, end, True
                self.reader = InputReader(self.paths[self._next], salvage=self._salvage,
                                          validate=self._validate, size=self._sizes[self._next])
            done, end, finished = self.reader.fill(buffer, done, end, capacity)
            if finished:
                self.events += self.reader.events
                ended = self.reader.end()
                self.ends.append(ended)
                if ended.damage:
                    self.salvaged.append((ended.path, ended.damage, self.reader.dropped_lines))
                self.close()
                self.files_done += 1
                self.bytes_done += self._sizes[self._next]
                self._next += 1
            elif end == capacity:
                return done, end, False

    def read_long_line(self, start: bytes, size: int) -> tuple[bytes, bytes]:
        """See :meth:`InputReader.read_long_line` (for the current input)."""
        assert self.reader is not None
        line, rest = self.reader.read_long_line(start, size)
        self.text_bytes += len(line)
        return line, rest

    def input_bytes(self) -> int:
        reader = self.reader
        return self.bytes_done + (reader.raw_offset if reader is not None else 0)

    def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.close()


class LineSource(typing.Protocol):
    """What :func:`fill_step` reads from: an :class:`InputReader` or an :class:`InputRun`."""

    def fill(self, buffer: memoryview, done: int, end: int, capacity: int) -> tuple[int, int, bool]: ...

    def read_long_line(self, start: bytes, size: int) -> tuple[bytes, bytes]: ...


def fill_step(source: LineSource, buffer: memoryview, done: int, end: int,
              capacity: int) -> tuple[int, int, bool, bytes | None]:
    """One step of reading ``source`` into ``buffer[:capacity]``.

    ``buffer[:done]`` holds cleaned event lines, ``buffer[done:end]`` the
    start of a line not yet complete.  Returns ``(done, end, finished,
    long_line)``: normally the buffer is full of whole lines (``done``) or
    the source is ``finished``; when one line is longer than the buffer, it
    is returned whole in ``long_line`` (cleaned, possibly empty for a
    wrapper line) and the buffer holds only what followed it.
    """
    done, end, finished = source.fill(buffer, done, end, capacity)
    if finished or done:
        return done, end, finished, None
    line, rest = source.read_long_line(bytes(buffer[:end]), capacity)
    buffer[: len(rest)] = rest
    return 0, len(rest), False, line


def read_and_write(sink: ChunkSink, run: InputRun, lane: int, buffer: memoryview) -> None:
    """In a thread: read ``run`` into ``buffer`` and write every full
    buffer as a chunk of ``lane`` through the writer's chunk ``sink``, in this
    thread.  Checks for cancellation between chunks."""
    capacity = sink.chunk_capacity
    done = end = 0
    while True:
        trio.from_thread.check_cancelled()
        done, end, finished, long_line = fill_step(run, buffer, done, end, capacity)
        if long_line is not None:  # one line longer than a buffer: a chunk of its own
            if long_line:
                sink.write_lines(lane, long_line)
            continue
        if finished:
            break
        # Full: the complete lines go; the start of the next line is copied
        # out first (the write may put padding after the chunk).
        rest = bytes(buffer[done:end])
        sink.write_chunk(lane, buffer, done)
        buffer[: len(rest)] = rest
        done, end = 0, len(rest)
    sink.write_chunk(lane, buffer, done)
    sink.finish_lane(lane)
