"""Reading trace inputs: finding them, opening them, and cleaning their text
straight into the caller's stripe buffers.

An :class:`InputReader` reads one input, plain or gzip (told apart by its
magic number; decompressed with python-isal, which releases the GIL), and
cleans its text in place (:mod:`pwriter.traceformat`, in C where built).
An :class:`InputRun` is the inputs of one reader, read one after another
into the same buffers, so that many small inputs cost one thread hop, not
one each.  :func:`fill_step` is the one step every reader takes (the merge's
readers and ``pwriter verify`` alike): fill the buffer with whole cleaned
lines, or finish a line longer than the buffer.  ``--salvage`` keeps what a
crashed rank's damaged input still holds.  Everything here blocks: it is
meant to run in worker threads.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import stat as stat_module
import typing
import zlib
from collections.abc import Sequence

from .errors import DataError, InputError, UsageError
from .output import is_temporary_name
from .traceformat import BlockCleaner, is_gzip_magic, rfind_newline

__all__ = ["collect_inputs", "input_size", "InputReader", "InputRun", "fill_step", "TRACE_SUFFIXES"]

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
                   exclude: Sequence[str] = ()) -> list[str]:
    """The input files, checked before any data is read.

    ``paths`` are taken as given; each of ``directories`` adds every
    ``*.pfw`` and ``*.pfw.gz`` file in it (not hidden, not pwriter
    temporaries, and not one of ``exclude``, which names the output's files
    so that a merge into the directory it reads can be repeated).  Only the
    directory entry that is an excluded name is skipped: another name for
    the same file (a hard link, a symlink) is an input, which the writer
    then refuses as the output.  The same file given twice is read once.
    Raises :class:`UsageError` (exit 2) for a missing, unreadable or
    non-regular input, for a directory with no traces, and for no inputs at
    all; TypeError for a single path (a str) where a list is expected.
    """
    paths = path_list(paths, "collect_inputs", "paths")
    directories = path_list(directories or (), "collect_inputs", "directories")
    found: list[str] = list(paths)
    excluded = {entry for entry in map(_entry_of, exclude) if entry is not None}
    for directory in directories:
        if not os.path.isdir(directory):
            raise UsageError(f"{directory}: not a directory")
        where = os.stat(directory)
        listed = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or is_temporary_name(entry.name):
                    continue
                if not entry.name.endswith(TRACE_SUFFIXES) or not entry.is_file():
                    continue
                if (where.st_dev, where.st_ino, entry.name) in excluded:
                    continue
                listed.append(entry.path)
        if not listed:
            raise UsageError(f"{directory}: no *.pfw or *.pfw.gz traces in this directory")
        found.extend(sorted(listed, key=_natural_key))
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


def _gzip_file(raw: io.BufferedReader[io.FileIO]) -> gzip.GzipFile:
    """A gzip reader over ``raw``: python-isal's where installed.

    Chosen by ``bench/gzip_readers.py --mib 64`` on this project's 2-CPU
    machine: stdlib gzip 0.47 GiB/s of text, zlib-ng 1.46, python-isal 2.25
    (each 1.7 to 1.9 times that with two threads).  Multi-member files work
    with all three.
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


def _readable_gzip_text(path: str, *, skip: int) -> bytes:
    """--salvage: the text a truncated gzip file still gives, after the first
    ``skip`` bytes (already read).  Decompresses member by member and keeps
    the output of the cut member up to where its data stops."""
    rest = bytearray()
    inflater = zlib.decompressobj(wbits=31)

    def keep(piece: bytes) -> None:
        nonlocal skip
        cut = min(skip, len(piece))
        skip -= cut
        rest.extend(piece[cut:])

    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
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


def input_size(path: str) -> int:
    """The size of an input now; :class:`DataError` if it has vanished since it was collected."""
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"{path}: the input vanished before it was read: {exc.strerror}") from None


class InputReader:
    """Reads one input (plain or gzip, told apart by its magic number) and
    cleans its text straight into the caller's stripe buffers.  Blocking:
    meant to run in a worker thread.

    The caller keeps a buffer in two parts: ``buffer[:done]`` holds cleaned
    event lines, ``buffer[done:end]`` text read but not yet cleaned (the
    start of a line whose newline has not been read).  :meth:`fill` reads
    more, cleans every complete line in place and returns the new
    ``(done, end, finished)``.
    """

    def __init__(self, path: str, *, salvage: bool = False, validate: bool = False, size: int = 0) -> None:
        self.path = path
        self.salvage = salvage
        self.size = size  # bytes when the merge began: reading fewer means it shrank
        self.damage: str | None = None  # what --salvage dropped, if anything
        self.dropped_lines = 0
        self._text_read = 0
        self._recovered: bytes | None = None  # the readable rest of a truncated gzip
        # A plain file is read with os.readv straight into the caller's
        # buffer: no buffered reader, four system calls for a small file
        # (open, pread of the magic, read, close).  gzip files and pipes
        # (which cannot pread: FIFOs are inputs too) go through a buffered
        # reader that can peek.
        self._fd: int | None = None
        self._raw: io.BufferedReader[io.FileIO] | None = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DataError(f"{path}: cannot open the input: {exc.strerror}") from None
        try:
            try:
                head: bytes | None = os.pread(fd, 2, 0)
            except OSError as exc:
                if exc.errno != errno.ESPIPE:
                    raise
                head = None
            if head is not None and not is_gzip_magic(head):
                self._fd = fd
            else:
                self._raw = io.BufferedReader(io.FileIO(fd, "rb"), buffer_size=PEEK_SIZE)
                head = self._raw.peek(2)[:2]
        except OSError as exc:
            if self._raw is None:
                os.close(fd)
            raise DataError(f"{path}: cannot read the input: {exc.strerror}") from None
        self.compressed = is_gzip_magic(head)
        self._gzip = _gzip_file(self._raw) if self.compressed and self._raw is not None else None
        self._cleaner = BlockCleaner(path, validate=validate, drop_invalid=salvage)

    @property
    def events(self) -> int:
        return self._cleaner.events

    @property
    def raw_offset(self) -> int:
        """Bytes of the file (compressed, for gzip) consumed so far."""
        if self._raw is None:
            return self._text_read  # plain: the text is the file
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def fill(self, buffer: memoryview, done: int, end: int, capacity: int) -> tuple[int, int, bool]:
        """Read into ``buffer[end:capacity]`` and clean the complete lines.

        ``finished`` is true once the input is exhausted and all its lines
        are cleaned (a last line without a newline gets one).  When the
        buffer is full and no progress is possible, returns its arguments
        unchanged: the caller must make room.
        """
        start, at_end = end, False
        while end < capacity:  # fill the buffer or read to the end: one thread hop for a small file
            got = self._read_into(buffer, end, capacity)
            if got == 0:
                at_end = True
                break
            end += got
        if at_end:  # (so end < capacity: there is room for a newline)
            consumed = self.raw_offset
            if consumed < self.size:
                raise DataError(f"{self.path}: the input shrank while it was read ({self.size} bytes when the "
                                f"merge began, {consumed} at the end)")
            if end > done and buffer[end - 1] != 10:
                if self.salvage:
                    end = self._drop_damaged_tail(buffer, done, end)
                if end > done and buffer[end - 1] != 10:
                    buffer[end] = 10  # the last line had no newline: a complete event is kept
                    end += 1
            done = self._cleaner.clean_in_place(buffer, done, end)
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

        Returns the cleaned line (with its newline; empty for a wrapper line)
        and the text read past its end (shorter than ``size``).
        """
        parts = [start]
        while True:
            data = self._read(size)
            newline = data.find(b"\n")
            if newline >= 0:
                parts.append(data[: newline + 1])
                rest = data[newline + 1 :]
                break
            parts.append(data)
            if not data:
                parts.append(b"\n")
                rest = b""
                break
        return self._cleaner.feed(b"".join(parts)), rest

    def _note_invalid_lines(self) -> None:
        """--salvage --validate: count and describe the invalid lines dropped."""
        cleaner = self._cleaner
        if cleaner.invalid:
            self.dropped_lines += cleaner.invalid
            shown = ", ".join(cleaner.invalid_examples) + (", ..." if cleaner.invalid > 3 else "")
            what = f"dropped {cleaner.invalid} lines that are not valid JSON: {shown}"
            self.damage = f"{self.damage}; {what}" if self.damage else what

    def _drop_damaged_tail(self, buffer: memoryview, done: int, end: int) -> int:
        """--salvage: a last line without its newline that is not a whole
        event was cut short by a crash; drop it (returns the new end)."""
        start = rfind_newline(buffer, done, end) + 1 or done
        line = bytes(buffer[start:end])
        stripped = line.strip()
        if stripped in (b"", b"[", b"]") or (stripped[:1] == b"{" and stripped[-1:] == b"}" and b"\x00" not in line):
            return end
        self.dropped_lines += 1
        self.damage = (self.damage + "; " if self.damage else "") + f"dropped a cut last line of {len(line)} bytes"
        return start

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of text, b"" at the end (for the rare line longer than a buffer)."""
        data = bytearray(size)
        with memoryview(data) as view:
            got = self._read_into(view, 0, size)
        del data[got:]
        return bytes(data)

    def _read_into(self, buffer: memoryview, start: int, stop: int) -> int:
        """Read text into ``buffer[start:stop]``; returns the bytes read, 0 at the end.

        gzip is decompressed straight into the buffer (no intermediate
        bytes object: 13% faster with python-isal, ``readinto`` against
        ``read`` and a copy, 2 MiB at a time).
        """
        if self._recovered is not None:
            data, self._recovered = self._recovered[: stop - start], self._recovered[stop - start :]
            buffer[start : start + len(data)] = data
            self._text_read += len(data)
            return len(data)
        try:
            with buffer[start:stop] as target:
                if self._fd is not None:
                    got = os.readv(self._fd, [target])
                else:
                    assert self._raw is not None
                    got = (self._gzip or self._raw).readinto(target)
        except EOFError:
            if not self.salvage:
                raise self._truncated() from None
            self._recovered = _readable_gzip_text(self.path, skip=self._text_read)
            self.damage = "truncated gzip: kept what decompresses"
            return self._read_into(buffer, start, stop)
        except (gzip.BadGzipFile, *_gzip_errors()) as exc:  # type: ignore[misc]
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise DataError(f"{self.path}: read failed: {exc.strerror or exc}") from None
        self._text_read += got
        return got

    def _truncated(self) -> InputError:
        # The offset is in the decompressed text: how far reading got.
        return InputError(self.path, "truncated gzip: the file ends inside a compressed member",
                          self._text_read)

    def _corrupt(self, exc: Exception) -> InputError:
        return InputError(self.path, f"corrupt gzip: {exc}", self._text_read)

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        if self._raw is not None:
            self._raw.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class InputRun:
    """The inputs of one reader, read one after another into its buffers.

    :meth:`fill` goes on from input to input until the buffer is full or the
    run is over, so that many small inputs cost one thread hop, not one each.
    Counters are the run's own (written by one thread at a time, read by the
    progress display).
    """

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], *, salvage: bool = False,
                 validate: bool = False) -> None:
        self._paths = paths
        self._sizes = sizes
        self._salvage = salvage
        self._validate = validate
        self.salvaged: list[tuple[str, str, int]] = []  # (input, what was dropped, lines dropped)
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
                if self._next == len(self._paths):
                    return done, end, True
                self.reader = InputReader(self._paths[self._next], salvage=self._salvage,
                                          validate=self._validate, size=self._sizes[self._next])
            done, end, finished = self.reader.fill(buffer, done, end, capacity)
            if finished:
                self.events += self.reader.events
                if self.reader.damage:
                    self.salvaged.append((self.reader.path, self.reader.damage, self.reader.dropped_lines))
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

