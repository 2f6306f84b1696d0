"""The DFTracer trace text format, block by block (pure: no I/O).

A trace is text with one JSON event per line.  It may be wrapped in array
style (a ``[`` line first, a ``]`` line last, sometimes two spaces before the
first event, sometimes no newline after the ``]``) or be plain NDJSON.  A
merge keeps every *event line* and drops *wrapper lines*: lines that, once
surrounding whitespace is trimmed, are empty, ``[`` or ``]``.  An event line
is a line that, trimmed, starts with ``{`` and ends with ``}`` and holds no
NUL byte; events are not parsed.  Anything else means the input is not a
trace.

Speed comes from looking at whole blocks: a block in which every line
already is a bare event (it starts with ``{``, every newline is followed by
``{`` and preceded by ``}``, and there is no NUL) passes through untouched
after three C-speed scans.  Only blocks with wrapper lines, blank lines,
indentation or CRLF take the slow path, which trims line by line.
"""

from __future__ import annotations

from .errors import InputError

__all__ = ["BlockCleaner", "is_gzip_magic"]

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
_WRAPPERS = (b"", b"[", b"]")


def is_gzip_magic(head: bytes) -> bool:
    """Whether the first bytes of a file are the gzip magic number."""
    return head[:2] == GZIP_MAGIC


class BlockCleaner:
    """Turns the text of one input, fed in pieces, into blocks of event lines.

    :meth:`feed` takes the next piece of text (cut anywhere) and returns the
    event lines completed by it, as one newline-terminated block (possibly
    empty); :meth:`finish` returns the last line when the text does not end
    with a newline.  ``events`` counts the event lines returned;
    ``offset`` is the number of text bytes consumed.  Raises
    :class:`~pwriter.errors.InputError` naming ``path``, the line and the
    byte offset of the first line that is not an event.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.events = 0
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
        lines = block.count(b"\n")
        if _all_bare_events(block, lines):
            kept, cleaned = lines, block
        else:
            # Wrapper lines sit at the start and end of a file: clean the first
            # and last line one by one and keep the fast path for the middle.
            first = block.index(b"\n") + 1
            last = block.rindex(b"\n", 0, len(block) - 1) + 1 if lines > 2 else len(block)
            middle = block[first:last]
            if lines > 2 and _all_bare_events(middle, lines - 2):
                head = self._clean_slowly(block[:first], self.offset, self.lines)
                tail = self._clean_slowly(block[last:], self.offset + last, self.lines + lines - 1)
                kept = head[0] + lines - 2 + tail[0]
                cleaned = b"".join((head[1], middle, tail[1]))
            else:
                kept, cleaned = self._clean_slowly(block, self.offset, self.lines)
        self.offset += len(block)
        self.lines += lines
        self.events += kept
        return cleaned

    def _clean_slowly(self, block: bytes, offset: int, lines_before: int) -> tuple[int, bytes]:
        """Trim and check line by line; ``offset`` and ``lines_before`` place
        ``block`` in the input, for error messages."""
        events: list[bytes] = []
        for index, line in enumerate(block.split(b"\n")[:-1]):
            stripped = line.strip()
            if offset == 0 and stripped.startswith(BOM):
                stripped = stripped[len(BOM) :].strip()
            if stripped in _WRAPPERS:
                pass
            elif stripped[:1] == b"{" and stripped[-1:] == b"}" and b"\x00" not in stripped:
                events.append(stripped)
            else:
                number = lines_before + index + 1
                if b"\x00" in line:
                    problem = f"not a trace: line {number} holds NUL bytes"
                else:
                    problem = f"not a trace: line {number} is not a JSON event line ({_preview(stripped)})"
                raise InputError(self.path, problem, offset)
            offset += len(line) + 1
        if not events:
            return 0, b""
        events.append(b"")
        return len(events) - 1, b"\n".join(events)


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


def _preview(line: bytes) -> str:
    shown = line[:32]
    text = repr(shown)[1:]
    return f"starts {text}{'...' if len(line) > 32 else ''}"
