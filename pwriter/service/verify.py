"""``pwriter verify``: does an output hold exactly the event lines of its inputs?

Both sides are read the way the merge reads (plain or gzip, any wrapping,
wrapper and padding lines dropped, lines trimmed) and reduced to an
order-free fingerprint: the number of event lines and two sums of 64-bit
line hashes (mod 2^64).  Equal multisets give equal fingerprints; a missing,
extra or changed line changes them (two independent hashes make a false
match vanishingly unlikely).  The hashing runs in C where ``pwriter._native``
is built (GIL released, files in parallel threads).  Only when the
fingerprints differ does a second pass count lines per hash to report how
many are missing and extra, with a few examples.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..data.inputs import InputReader, fill_step
from ..data.output import manifest_path, read_shard_set
from ..errors import UsageError
from ..plan import traceformat

__all__ = ["VerifyResult", "verify", "output_files"]

BUFFER = 4 << 20
MASK = (1 << 64) - 1
EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The comparison of an output with its inputs."""

    output_events: int
    input_events: int
    match: bool
    missing: int = 0
    extra: int = 0
    missing_examples: tuple[bytes, ...] = ()
    extra_examples: tuple[bytes, ...] = ()


def output_files(output: str) -> list[str]:
    """The files of an output in read order: the shards its ``.shards``
    manifest lists (given directly or beside ``output``: a manifest wins over
    a file of the output's name, see :mod:`pwriter.data.output`), or the file itself."""
    if output.endswith(".shards") and os.path.isfile(output):
        return read_shard_set(output)
    if os.path.isfile(manifest_path(output)):
        return read_shard_set(manifest_path(output))
    if os.path.isfile(output):
        return [output]
    raise UsageError(f"{output}: no such output (nor a sharded set {manifest_path(output)})")


def _cleaned_buffers(path: str, salvage: bool = False, validate: bool = False) -> Iterator[memoryview]:
    """The cleaned event text of ``path``, one buffer-full at a time (whole
    lines), read with the merge's own step (:func:`~pwriter.data.inputs.fill_step`)
    and, for an input, with the merge's ``salvage`` and ``validate``."""
    buffer = memoryview(bytearray(BUFFER))
    reader = InputReader(path, salvage=salvage, validate=validate)
    try:
        done = end = 0
        while True:
            done, end, finished, long_line = fill_step(reader, buffer, done, end, BUFFER)
            if long_line is not None:
                yield memoryview(long_line)
                continue
            if done:
                yield buffer[:done]
            if finished:
                return
            buffer[: end - done] = buffer[done:end]
            end -= done
            done = 0
    finally:
        reader.close()


def _python_hashes(text: memoryview) -> list[tuple[int, int]]:
    lines = bytes(text).split(b"\n")[:-1]
    return [
        (int.from_bytes(hashlib.blake2b(line, digest_size=8, person=b"a").digest(), "little"),
         int.from_bytes(hashlib.blake2b(line, digest_size=8, person=b"b").digest(), "little"))
        for line in lines
    ]


def _fingerprint(path: str, salvage: bool = False, validate: bool = False) -> tuple[int, int, int]:
    count = first = second = 0
    native = traceformat._native
    for text in _cleaned_buffers(path, salvage, validate):
        if native is not None:
            ffi, lib = native
            sums = ffi.new("uint64_t[3]")
            with ffi.from_buffer(text) as view:
                lib.pw_hash_lines(view, text.nbytes, sums, ffi.NULL, 0)
            count, first, second = count + sums[0], (first + sums[1]) & MASK, (second + sums[2]) & MASK
        else:
            for a, b in _python_hashes(text):
                count, first, second = count + 1, (first + a) & MASK, (second + b) & MASK
    return count, first, second


def _line_hashes(path: str, salvage: bool = False, validate: bool = False) -> Iterator[tuple[int, bytes]]:
    """(hash, line) of every event line: the slow pass, for reporting."""
    native = traceformat._native
    for text in _cleaned_buffers(path, salvage, validate):
        lines = bytes(text).split(b"\n")[:-1]
        if native is None:
            yield from ((a, line) for (a, _), line in zip(_python_hashes(text), lines, strict=True))
            continue
        ffi, lib = native
        sums, hashes = ffi.new("uint64_t[3]"), ffi.new("uint64_t[]", len(lines))
        with ffi.from_buffer(text) as view:
            lib.pw_hash_lines(view, text.nbytes, sums, hashes, len(lines))
        yield from zip(hashes, lines, strict=True)


def _total(paths: Sequence[str], threads: int, salvage: bool = False, validate: bool = False
           ) -> tuple[int, int, int]:
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        parts = list(pool.map(functools.partial(_fingerprint, salvage=salvage, validate=validate), paths))
    return (
        sum(part[0] for part in parts),
        sum(part[1] for part in parts) & MASK,
        sum(part[2] for part in parts) & MASK,
    )


def verify(output: str, inputs: Sequence[str], *, threads: int | None = None, salvage: bool = False,
           validate: bool = False) -> VerifyResult:
    """Compare the event lines of ``output`` (plain, gzip, or a sharded set)
    with those of ``inputs``, as multisets.  Raises InputError / DataError
    when a file cannot be read as a trace.

    ``salvage`` and ``validate`` read the inputs as a merge with those
    options does (a damaged tail, or a line that is not valid JSON, is then
    left out of the inputs' side, as the merge left it out of the output);
    the output is always read whole, as it is."""
    threads = threads or os.cpu_count() or 1
    outputs = output_files(output)
    produced = _total(outputs, threads)
    expected = _total(list(inputs), threads, salvage, validate)
    if produced == expected:
        return VerifyResult(produced[0], expected[0], True)
    balance: collections.Counter[int] = collections.Counter()
    for path in inputs:
        balance.update(hash_ for hash_, _ in _line_hashes(path, salvage, validate))
    for path in outputs:
        balance.subtract(hash_ for hash_, _ in _line_hashes(path))
    missing = {hash_: n for hash_, n in balance.items() if n > 0}
    extra = {hash_: -n for hash_, n in balance.items() if n < 0}
    return VerifyResult(
        produced[0],
        expected[0],
        False,
        missing=sum(missing.values()),
        extra=sum(extra.values()),
        missing_examples=_examples(inputs, missing, salvage, validate),
        extra_examples=_examples(outputs, extra),
    )


def _examples(paths: Sequence[str], wanted: dict[int, int], salvage: bool = False, validate: bool = False
              ) -> tuple[bytes, ...]:
    found: list[bytes] = []
    for path in paths:
        for hash_, line in _line_hashes(path, salvage, validate):
            if hash_ in wanted and line not in found:
                found.append(line)
                if len(found) == EXAMPLES:
                    return tuple(found)
    return tuple(found)
