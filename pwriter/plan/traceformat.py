"""The DFTracer trace text format, block by block (pure: no I/O).

A trace is text with one JSON event per line.  It may be wrapped in array
style (a ``[`` line first, a ``]`` line last, sometimes two spaces before the
first event, sometimes no newline after the ``]``) or be plain NDJSON.  A
merge keeps every *event line* and drops *wrapper lines*: lines that, once
surrounding whitespace is trimmed, are empty, ``[`` or ``]``.  An event line
is a line that, trimmed, starts with ``{`` and ends with ``}`` and holds no
NUL byte; events are not parsed unless asked (``validate``: each event line
must then be valid JSON, checked in C where built, else by ``json.loads``).
Anything else means the input is not a trace.

Speed comes from looking at whole blocks: a block in which every line
already is a bare event (``{`` first, ``}`` last, no NUL byte) passes through
untouched.  The check runs in C (``pwriter._native``, memchr speed, GIL
released) where that module is built, else as three ``bytes`` scans.  Only
lines that are not bare events (wrapper lines, blank lines, indentation,
CRLF) are trimmed one by one in Python.

For the completeness of an input (:mod:`pwriter.plan.completeness`) the cleaner
also keeps two facts, without parsing: how many event lines begin with
``{"id":`` (:data:`ID_PREFIX`; DFTracer 2.x writes ``id`` first in every
event its ``end`` event counts, and no ``id`` in metadata lines), counted
by the C scanner in the same pass, and the last event line.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InputError

__all__ = ["BlockCleaner", "is_gzip_magic", "is_valid_json", "rfind_newline", "line_end", "preview", "count_newlines",
           "count_prefixed", "ID_PREFIX"]

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
_WRAPPERS = (b"", b"[", b"]")
#: How an event line that DFTracer's ``end`` event counts begins (see the module docstring).
ID_PREFIX = b'{"id":'
#: The interface of ``pwriter._native`` this code calls (``ABI_VERSION`` in its build script).
NATIVE_ABI = 2


def is_gzip_magic(head: bytes) -> bool:
    """Whether the first bytes of a file are the gzip magic number."""
    return head[:2] == GZIP_MAGIC


class BlockCleaner:
    """Turns the text of one input, fed in pieces, into blocks of event lines.

    With ``validate``, an event line must also be valid JSON; with
    ``drop_invalid`` too, a line that is not is dropped and counted in
    ``invalid`` (its first few in ``invalid_examples``) instead of raising.

    :meth:`feed` takes the next piece of text (cut anywhere) and returns the
    event lines completed by it, as one newline-terminated block (possibly
    empty); :meth:`finish` returns the last line when the text does not end
    with a newline.  ``events`` counts the event lines returned, ``ids``
    those that begin with :data:`ID_PREFIX`, and ``last_event`` is the last
    of them (without its newline; None before the first);
    ``offset`` is the number of text bytes consumed.  Raises
    :class:`~pwriter.errors.InputError` naming ``path``, the line and the
    byte offset of the first line that is not an event.
    """

    def __init__(self, path: str, *, validate: bool = False, drop_invalid: bool = False) -> None:
        self.path = path
        self.validate = validate
        self.drop_invalid = drop_invalid
        self.invalid = 0
        self.invalid_examples: list[str] = []  # "line N (starts ...)", at most 3
        self.events = 0
        self.ids = 0
        self.last_event: bytes | None = None
        self.offset = 0
        self.lines = 0
        self._carry = b""

    def feed(self, text: bytes) -> bytes:
        if self._carry:
            text = self._carry + text
        cut = text.rfind(b"\n") + 1
        if cut < len(text):
            self._carry = text[cut:]
            text = text[:cut]
        else:
            self._carry = b""
        return self._clean(text) if text else b""

    def finish(self) -> bytes:
        carry, self._carry = self._carry, b""
        return self._clean(carry + b"\n") if carry else b""

    def _clean(self, block: bytes) -> bytes:
        """Event lines of ``block`` (whole lines, newline-terminated)."""
        if _native is None:
            return self._clean_python(block)
        text = bytearray(block)
        with memoryview(text) as view:
            end = self.clean_in_place(view, 0, len(text))
        del text[end:]
        return bytes(text)

    def clean_in_place(self, buffer: memoryview, start: int, stop: int) -> int:
        """Clean the text in ``buffer[start:stop]`` (whole lines, the last
        ending in a newline) where it lies: event lines are moved down over
        dropped wrapper lines, trimmed lines are written back shorter.
        Returns the end of the cleaned events (``<= stop``).  Counts and
        errors as :meth:`feed`; with the C scanner, runs of bare events are
        not even copied."""
        native = _native
        if stop <= start:
            return start
        if native is None:
            cleaned = self._clean_python(bytes(buffer[start:stop]))
            buffer[start : start + len(cleaned)] = cleaned
            return start + len(cleaned)
        ffi, lib = native
        with ffi.from_buffer(buffer) as view:  # released even when a line is refused
            return self._clean_in_place_native(buffer, start, stop, view, lib, ffi.new("size_t[2]"))

    def _clean_in_place_native(self, buffer: memoryview, start: int, stop: int, view: Any, lib: Any,
                               counted: Any) -> int:
        position, write, lines, kept, ids, irregular = start, start, 0, 0, 0, 0
        while position < stop:
            bare_end = lib.pw_scan_events(view, position, stop, counted, counted + 1, self.validate)
            if bare_end > position:
                if write != position:
                    buffer[write : write + bare_end - position] = buffer[position:bare_end]
                write += bare_end - position
                lines += counted[0]
                kept += counted[0]
                ids += counted[1]
            if bare_end == stop:
                break
            irregular += 1
            if irregular > 8:  # many odd lines (CRLF, indentation): clean the rest in bulk
                rest = bytes(buffer[bare_end:stop])
                more, cleaned = self._clean_slowly(rest, self.offset + bare_end - start, self.lines + lines)
                buffer[write : write + len(cleaned)] = cleaned
                write += len(cleaned)
                lines += rest.count(b"\n")
                kept += more
                ids += count_prefixed(cleaned, ID_PREFIX)
                break
            end = lib.pw_find_newline(view, bare_end, stop)
            line = bytes(buffer[bare_end:end])
            event = self._clean_line(line, self.offset + bare_end - start, self.lines + lines + 1)
            lines += 1
            if event:
                buffer[write : write + len(event)] = event
                buffer[write + len(event)] = 10  # newline
                write += len(event) + 1
                kept += 1
                ids += event.startswith(ID_PREFIX)
            position = end + 1
        self.offset += stop - start
        self.lines += lines
        self.events += kept
        self.ids += ids
        if write > start:  # (the scan's own view finds the newline before the last event)
            self._keep_last_event(buffer, start, write, lib.pw_rfind_newline(view, start, write - 1))
        return write

    def _keep_last_event(self, buffer: memoryview | bytes, start: int, stop: int, newline_before: int) -> None:
        """Keep the last of the cleaned events ``buffer[start:stop]`` (there
        is one), which follows the newline at ``newline_before`` (-1: none,
        it begins at ``start``)."""
        self.last_event = bytes(buffer[(newline_before + 1 or start) : stop - 1])

    def _clean_python(self, block: bytes) -> bytes:
        """:meth:`clean_in_place` without the C scanner, on a copy."""
        lines = block.count(b"\n")
        if self.validate:  # every line is parsed anyway
            kept, cleaned = self._clean_slowly(block, self.offset, self.lines)
        elif _all_bare_events(block, lines):
            kept, cleaned = lines, block
        else:
            # Wrapper lines sit at the start and end of a file: clean the first
            # and last line one by one and keep the fast check for the middle.
            first = block.index(b"\n") + 1
            last = block.rindex(b"\n", 0, len(block) - 1) + 1 if lines > 2 else len(block)
            middle = block[first:last]
            if lines > 2 and _all_bare_events(middle, lines - 2):
                head = self._clean_slowly(block[:first], self.offset, self.lines)
                tail = self._clean_slowly(block[last:], self.offset + last, self.lines + lines - 1)
                kept, cleaned = head[0] + lines - 2 + tail[0], b"".join((head[1], middle, tail[1]))
            else:
                kept, cleaned = self._clean_slowly(block, self.offset, self.lines)
        self.offset += len(block)
        self.lines += lines
        self.events += kept
        self.ids += count_prefixed(cleaned, ID_PREFIX)
        if cleaned:
            self._keep_last_event(cleaned, 0, len(cleaned), cleaned.rfind(b"\n", 0, len(cleaned) - 1))
        return cleaned

    def _clean_slowly(self, block: bytes, offset: int, lines_before: int) -> tuple[int, bytes]:
        """Trim and check line by line; ``offset`` and ``lines_before`` place
        ``block`` in the input, for error messages."""
        events: list[bytes] = []
        for index, line in enumerate(block.split(b"\n")[:-1]):
            event = self._clean_line(line, offset, lines_before + index + 1)
            if event:
                events.append(event)
            offset += len(line) + 1
        if not events:
            return 0, b""
        events.append(b"")
        return len(events) - 1, b"\n".join(events)

    def _clean_line(self, line: bytes, offset: int, number: int) -> bytes:
        """The event of one line (without its newline), or b"" for a wrapper
        line; raises InputError for anything else."""
        stripped = line.strip()
        if offset == 0 and stripped.startswith(BOM):
            stripped = stripped[len(BOM) :].strip()
        if stripped in _WRAPPERS:
            return b""
        if stripped[:1] == b"{" and stripped[-1:] == b"}" and b"\x00" not in stripped:
            if not self.validate or is_valid_json(stripped):
                return stripped
            if self.drop_invalid:
                self.invalid += 1
                if len(self.invalid_examples) < 3:
                    self.invalid_examples.append(f"line {number} ({preview(stripped)})")
                return b""
            problem = f"not a trace: line {number} is not valid JSON ({preview(stripped)})"
        elif b"\x00" in line:
            problem = f"not a trace: line {number} holds NUL bytes"
        else:
            problem = f"not a trace: line {number} is not a JSON event line ({preview(stripped)})"
        raise InputError(self.path, problem, offset)


def is_valid_json(text: bytes) -> bool:
    """Whether ``text`` is one JSON value (strict: UTF-8, no NaN or Infinity)."""
    native = _native
    if native is not None:
        return bool(native[1].pw_json_valid(text, len(text)))
    try:
        json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return False
    return True


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _all_bare_events(block: bytes, lines: int) -> bool:
    """Whether every one of the ``lines`` lines of ``block`` is ``{...}`` with
    nothing around it and no NUL byte.  Each ``}\n{`` holds one newline, so
    ``lines - 1`` of them means every newline but the last ends one event and
    starts the next."""
    return (
        block.startswith(b"{")
        and block.endswith(b"}\n")
        and block.count(b"}\n{") == lines - 1
        and b"\x00" not in block
    )


def count_newlines(buffer: memoryview) -> int:
    """Newlines in ``buffer``."""
    native = _native
    if native is not None:
        ffi, lib = native
        with ffi.from_buffer(buffer) as view:
            return int(lib.pw_count_newlines(view, buffer.nbytes))
    return bytes(buffer).count(b"\n")


def count_prefixed(text: bytes, prefix: bytes) -> int:
    """Lines of ``text`` that begin with ``prefix`` (which holds no newline)."""
    return text.count(b"\n" + prefix) + text.startswith(prefix)


def count_lines(block: bytes) -> tuple[int, bool]:
    """Newlines in ``block``, and whether one of its lines is empty (a
    newline at its start or right after another); one pass, in C where built."""
    native = _native
    if native is not None and hasattr(native[1], "pw_count_lines"):
        ffi, lib = native
        blank = ffi.new("int *")
        count = int(lib.pw_count_lines(block, len(block), blank))
        return count, bool(blank[0])
    return block.count(b"\n"), block[:1] == b"\n" or b"\n\n" in block


def rfind_newline(buffer: memoryview, start: int, stop: int) -> int:
    """Offset of the last newline in ``buffer[start:stop]``, or -1."""
    native = _native
    if native is not None:
        ffi, lib = native
        with ffi.from_buffer(buffer) as view:
            return int(lib.pw_rfind_newline(view, start, stop))
    found = bytes(buffer[start:stop]).rfind(b"\n")
    return start + found if found >= 0 else -1


def line_end(text: memoryview, start: int) -> int:
    """The end of the line that holds byte ``start`` of ``text``: the index
    after its newline (``text.nbytes`` if it has none)."""
    step = 4096
    while start < text.nbytes:
        found = bytes(text[start : start + step]).find(b"\n")
        if found >= 0:
            return start + found + 1
        start += step
        step *= 2
    return text.nbytes


def _load_native() -> tuple[Any, Any] | None:
    try:
        from .. import _native as module
    except ImportError:
        return None
    version = getattr(module.lib, "pw_abi_version", None)
    if version is None or version() != NATIVE_ABI:  # a stale build: the pure-Python scan instead
        return None
    return module.ffi, module.lib


_native = _load_native()


def preview(line: bytes) -> str:
    """``starts b'...'``: the first bytes of ``line``, for an error message."""
    text = repr(line[:32])[1:]
    return f"starts {text}{'...' if len(line) > 32 else ''}"
