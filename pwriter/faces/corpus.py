"""Realistic DFTracer-like events and corpora, for examples, tests and benchmarks.

The events imitate what DFTracer writes (see ``docs/dftracer.md``): metadata
lines (``HH`` host hashes, ``FH`` file hashes) first, then POSIX and
application events with ids, pids, tids, timestamps, durations and ``args``.
Deterministic for a given seed.
"""

from __future__ import annotations

import errno
import gzip
import os
import random
from collections.abc import Iterator

__all__ = ["events", "write_trace", "write_corpus"]

_POSIX = ("open64", "read", "write", "lseek64", "close", "pread64", "pwrite64", "fsync", "stat64")
_APP = ("train_step", "optimizer_step", "data_loader.fetch", "checkpoint.save", "forward", "backward")


def events(rank: int, count: int, *, seed: int = 0) -> Iterator[bytes]:
    """``count`` event lines (without newline) of one rank; the first lines are metadata."""
    rng = random.Random(seed * 1_000_003 + rank)
    host = f"{rng.getrandbits(64):016x}"
    files = [f"/data/train/shard_{index}.h5" for index in range(4)]
    file_hashes = [f"{rng.getrandbits(64):016x}" for _ in files]
    pid = 1000 + rank
    produced = 0
    if count > 0:
        yield (f'{{"name":"HH","ph":4,"type":1,"args":{{"hhash":"{host}","name":"node-{rank // 4}",'
               f'"value":"{host}"}}}}').encode()
        produced += 1
    for name, value in zip(files, file_hashes, strict=False):
        if produced >= count:
            return
        yield f'{{"name":"FH","ph":4,"type":1,"args":{{"hhash":"{host}","name":"{name}","value":"{value}"}}}}'.encode()
        produced += 1
    ts = 1_000_000_000 + rank * 17
    while produced < count:
        ts += rng.randint(5, 5000)
        dur = rng.randint(1, 20000)
        if rng.random() < 0.7:
            which = rng.randrange(len(files))
            size = rng.choice((4096, 65536, 1048576, 262144))
            yield (
                f'{{"id":{produced},"name":"{rng.choice(_POSIX)}","cat":"POSIX","pid":{pid},"tid":{pid * 10},'
                f'"ts":{ts},"dur":{dur},"ph":1,"type":0,"args":{{"hhash":"{host}","fhash":"{file_hashes[which]}",'
                f'"size":{size},"ret":{size},"level":1}}}}'
            ).encode()
        else:
            yield (
                f'{{"id":{produced},"name":"{rng.choice(_APP)}","cat":"APP","pid":{pid},"tid":{pid * 10},'
                f'"ts":{ts},"dur":{dur},"ph":1,"type":0,"args":{{"hhash":"{host}","level":0,'
                f'"epoch":{produced // 1000},"step":{produced % 1000}}}}}'
            ).encode()
        produced += 1


def write_trace(path: str, lines: list[bytes], *, array: bool, indent_first: bool = False,
                close_newline: bool = True) -> None:
    """Write one trace file: gzip when ``path`` ends in ``.gz``; ``array`` wraps it in ``[`` / ``]``."""
    parts: list[bytes] = []
    if array:
        parts.append(b"[\n")
    for index, line in enumerate(lines):
        parts.append((b"  " if index == 0 and indent_first else b"") + line + b"\n")
    if array:
        parts.append(b"]\n" if close_newline else b"]")
    data = b"".join(parts)
    if path.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1)
    with open(path, "wb") as handle:
        handle.write(data)


def write_corpus(directory: str, *, files: int = 200, events_per_file: int = 200, seed: int = 0,
                 force: bool = False) -> list[str]:
    """A mixed corpus in ``directory``: gzip and plain, array style and
    NDJSON, some array files indented or without a final newline.
    Returns the paths written.

    ``files`` and ``events_per_file`` are at least 1 (ValueError).  A file
    already at one of the names (``rank_N.pfw``, ``rank_N.pfw.gz``: the
    field's own tools use them too) is never overwritten unless ``force``:
    FileExistsError names it, and nothing is written."""
    for name, count in (("files", files), ("events_per_file", events_per_file)):
        if type(count) is not int or count < 1:
            raise ValueError(f"{name}={count!r}: at least 1")
    paths = [os.path.join(directory, f"rank_{rank}.pfw" + (".gz" if rank % 2 == 1 else "")) for rank in range(files)]
    if not force:
        for path in paths:
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "a file is already there (a trace of another run?); "
                                      "refusing to overwrite it", path)
    os.makedirs(directory, exist_ok=True)
    for rank, path in enumerate(paths):
        array = rank % 3 != 0
        write_trace(
            path,
            list(events(rank, events_per_file, seed=seed)),
            array=array,
            indent_first=array and rank % 5 == 1,
            close_newline=not (array and rank % 7 == 2),
        )
    return paths
