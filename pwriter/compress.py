"""Gzip members for compressed output (blocking; run in worker threads).

Each chunk becomes one standalone gzip member, so that any member can be
decompressed alone (see the member index in :mod:`pwriter.writer`) and the
concatenation is an ordinary multi-member gzip file.  python-isal compresses
(it releases the GIL, so worker threads compress in parallel); its levels are
0 to 3, and a higher level is an error (:func:`check_level`).  Without isal, zlib does it (levels
1 to 9).
"""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING, Any

from .traceformat import count_newlines

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["gzip_member", "check_level", "MemberBuilder"]


def check_level(level: int) -> None:
    """Refuse (:class:`~pwriter.settings.ConfigError`) a level the codec does not have."""
    from .settings import ConfigError

    try:
        from isal import igzip  # noqa: F401
    except ImportError:
        lowest, highest, codec = 1, 9, "zlib"
    else:
        lowest, highest, codec = 0, 3, "python-isal"
    if not lowest <= level <= highest:
        raise ConfigError(f"invalid setting level={level}: {codec} compresses at levels {lowest} to {highest}")


def gzip_member(data: Buffer, level: int) -> bytes:
    """``data`` as one gzip member (mtime 0, so output is reproducible)."""
    try:
        from isal import igzip
    except ImportError:
        return gzip.compress(bytes(data), compresslevel=max(1, level), mtime=0)
    return igzip.compress(data, compresslevel=min(level, 3), mtime=0)


class MemberBuilder:
    """One gzip member built from many text chunks, until it fills a slot.

    For the padded-striped layout, where a member of one text chunk would
    leave most of its stripe to padding: :meth:`feed` streams text into the
    member and finishes it (returning ``(member, text bytes, lines)``) once
    the text fed, times the compression ratio seen so far, reaches
    ``target`` bytes.  The first member assumes a ratio of 1:2; later ones
    use the last member's ratio plus a tenth, so that a member rarely
    outgrows its slot (if it does, the planner gives it one more slot).
    Blocking; one builder is fed by one thread at a time.
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self.ratio = 0.5
        self._reset()

    def _reset(self) -> None:
        self._compressor: Any
        try:
            from isal import isal_zlib

            self._compressor = isal_zlib.compressobj(min(self.level, 3), isal_zlib.DEFLATED, 31)
        except ImportError:
            import zlib

            self._compressor = zlib.compressobj(max(1, self.level), zlib.DEFLATED, 31)
        self._parts: list[bytes] = []
        self.text = 0
        self.lines = 0

    def feed(self, data: memoryview, target: int) -> tuple[bytes, int, int] | None:
        self._parts.append(self._compressor.compress(data))
        self.text += data.nbytes
        self.lines += count_newlines(data)
        if self.text * self.ratio >= target:
            return self.finish()
        return None

    def finish(self) -> tuple[bytes, int, int] | None:
        """The member built so far (None if no text was fed)."""
        if not self.text:
            return None
        self._parts.append(self._compressor.flush())
        member, text, lines = b"".join(self._parts), self.text, self.lines
        self.ratio = len(member) / text * 1.1
        self._reset()
        return member, text, lines
