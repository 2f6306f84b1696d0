"""Gzip members for compressed output (blocking; run in worker threads).

Each chunk becomes one standalone gzip member, so that any member can be
decompressed alone (see the member index in :mod:`pwriter.writer`) and the
concatenation is an ordinary multi-member gzip file.  python-isal compresses
(it releases the GIL, so worker threads compress in parallel); its levels are
0 to 3, and higher levels are read as 3.  Without isal, zlib does it (levels
1 to 9).
"""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["gzip_member", "count_lines"]


def gzip_member(data: Buffer, level: int) -> bytes:
    """``data`` as one gzip member (mtime 0, so output is reproducible)."""
    try:
        from isal import igzip
    except ImportError:
        return gzip.compress(bytes(data), compresslevel=max(1, level), mtime=0)
    return igzip.compress(data, compresslevel=min(level, 3), mtime=0)


def count_lines(data: memoryview) -> int:
    """Newlines in ``data``."""
    from .traceformat import count_newlines

    return count_newlines(data)
