"""Helpers for tests of code that writes through pwriter.

``read_text`` gives the whole text of an output (plain, gzip, or a sharded
set through its manifest, in read order); ``read_events`` the event lines of
any trace or output, wrapper and blank lines dropped; ``event_counter`` a
multiset of event lines, to compare the events of inputs and outputs.
"""

from __future__ import annotations

import collections
import gzip
import os
from collections.abc import Iterable

from .output import read_shard_set
from .traceformat import BlockCleaner, is_gzip_magic

__all__ = ["read_text", "read_events", "event_counter"]


def read_text(path: str | os.PathLike[str]) -> bytes:
    """The full text of ``path``: decompressed if gzip; a ``.shards``
    manifest gives its shards concatenated in read order."""
    name = os.fspath(path)
    if name.endswith(".shards"):
        return b"".join(read_text(shard) for shard in read_shard_set(name))
    with open(name, "rb") as handle:
        data = handle.read()
    return gzip.decompress(data) if is_gzip_magic(data) else data


def read_events(path: str | os.PathLike[str]) -> list[bytes]:
    """Event lines (trimmed, without newline) of a trace or output, in file order."""
    cleaner = BlockCleaner(os.fspath(path))
    text = cleaner.feed(read_text(path)) + cleaner.finish()
    return text.split(b"\n")[:-1] if text else []


def event_counter(paths: Iterable[str | os.PathLike[str]]) -> collections.Counter[bytes]:
    """The multiset of event lines of all ``paths``."""
    counter: collections.Counter[bytes] = collections.Counter()
    for path in paths:
        counter.update(read_events(path))
    return counter
