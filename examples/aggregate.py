"""A trace-aggregation pipeline on pwriter.

Each rank's trace is read by a trio task of its own; every event is parsed,
tagged with the rank it came from (``args.rank``), dropped if its category is
unwanted, and sent through one pwriter writer.  A reporter task prints
progress on the trio clock.  From the command line::

    python examples/aggregate.py OUTPUT TRACE... [--drop-category APP] [--every 1.0] [--force]

``aggregate()`` takes any async sources of event lines and an open writer,
so that tests can feed it synthetic ranks and pwriter's test fixtures (see
``examples/test_aggregate.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Collection, Mapping, Sequence

import trio

import pwriter


@dataclasses.dataclass
class Progress:
    """How far the pipeline got (updated live by the rank tasks)."""

    ranks: int
    ranks_done: int = 0
    events_in: int = 0
    events_out: int = 0


Report = Callable[[float, Progress, "pwriter.WriterStatistics"], None]


def print_report(elapsed: float, progress: Progress, statistics: pwriter.WriterStatistics) -> None:
    print(f"{elapsed:6.1f} s: {progress.ranks_done}/{progress.ranks} ranks done, {progress.events_in} events in, "
          f"{progress.events_out} out, {statistics.bytes_written / 1e6:.1f} MB written", file=sys.stderr)


def tag(line: bytes, rank: str, drop_categories: Collection[str]) -> bytes | None:
    """The event ``line`` with ``args.rank`` set, or None when its category is dropped."""
    event = json.loads(line)
    if event.get("cat") in drop_categories:
        return None
    args = event.setdefault("args", {})
    args["rank"] = rank
    return json.dumps(event, separators=(",", ":")).encode()


async def file_lines(path: str, *, batch_bytes: int = 1 << 20) -> AsyncGenerator[bytes, None]:
    """The event lines of one trace file (plain or gzip), read in a thread a batch at a time."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    handle = gzip.open(path, "rb") if compressed else open(path, "rb")
    with handle:
        while batch := await trio.to_thread.run_sync(handle.readlines, batch_bytes):
            for line in batch:
                stripped = line.strip()
                if stripped not in (b"", b"[", b"]"):
                    yield stripped


async def aggregate(
    sources: Mapping[str, AsyncIterable[bytes]],
    writer: pwriter.Writer,
    *,
    drop_categories: Collection[str] = (),
    report_every: float = 1.0,
    report: Report = print_report,
) -> Progress:
    """Send the tagged events of every source (rank name -> its event lines)
    through ``writer``, one producer task per rank, reporting every
    ``report_every`` seconds of the trio clock and once at the end.  The
    lines of one rank keep their order in the output; across ranks there
    is none."""
    progress = Progress(ranks=len(sources))
    start = trio.current_time()

    async def pump(rank: str, source: AsyncIterable[bytes]) -> None:
        async with writer.producer() as producer:
            async for line in source:
                progress.events_in += 1
                tagged = tag(line, rank, drop_categories)
                if tagged is not None:
                    await producer.send_line(tagged)
                    progress.events_out += 1
        progress.ranks_done += 1

    async def reporter() -> None:
        while True:
            await trio.sleep(report_every)
            report(trio.current_time() - start, progress, writer.statistics())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        async with trio.open_nursery() as ranks:
            for rank, source in sources.items():
                ranks.start_soon(pump, rank, source)
        nursery.cancel_scope.cancel()
    report(trio.current_time() - start, progress, writer.statistics())
    return progress


def rank_name(path: str) -> str:
    """``traces/rank_3.pfw.gz`` -> ``rank_3``."""
    name = os.path.basename(path)
    for suffix in (".gz", ".pfw"):
        name = name.removesuffix(suffix)
    return name


async def run(output: str, inputs: Sequence[str], *, drop_categories: Collection[str], report_every: float,
              force: bool) -> Progress:
    async with contextlib.AsyncExitStack() as stack:
        sources = {rank_name(path): await stack.enter_async_context(contextlib.aclosing(file_lines(path)))
                   for path in inputs}
        async with pwriter.open_writer(output, producers=len(inputs), force=force) as writer:
            progress = await aggregate(sources, writer, drop_categories=drop_categories, report_every=report_every)
    return progress


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Aggregate per-rank traces into one, tagging each event with its rank.")
    parser.add_argument("output")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--drop-category", action="append", default=[], metavar="CAT")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between progress reports")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        progress = trio.run(lambda: run(args.output, args.inputs, drop_categories=args.drop_category,
                                        report_every=args.every, force=args.force))
    except pwriter.PwriterError as exc:
        print(f"aggregate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{progress.events_out} events from {progress.ranks} ranks in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
