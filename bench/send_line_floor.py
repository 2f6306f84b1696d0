"""What one ``await producer.send_line(line)`` costs, beside the trio and
Python steps any such call pays: the floor under the library's per-line path.

    .venv/bin/python bench/send_line_floor.py [--calls 1000000] [--rounds 5]

Each row is nanoseconds per call, the fastest of ``--rounds`` interleaved
rounds (the median beside it), all in one trio task:

* ``loop``: the bench loop alone (``lines[n & 1023]``);
* ``await async no-op``: calling and awaiting an ``async def`` that does
  nothing, which every ``await send_line(...)`` pays;
* ``checkpoint_if_cancelled``: trio's cancel check, which makes a call a
  cancel point (and nothing else while not cancelled);
* ``time.perf_counter``: one read of the clock that times a handle's
  schedule points;
* ``send_line``: a writer's handle, one producer, 200-byte lines to a file
  under /tmp, fsync off (the writer's own work included).

Run it with another tree first on ``PYTHONPATH`` (and ``python -P``) to
measure that tree's ``send_line`` beside the same steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

import pwriter

if os.path.isdir(os.path.join(os.path.dirname(pwriter.__file__), "plan")):
    from pwriter.plan.settings import load_settings
    from pwriter.service.writer import open_writer
else:  # a tree from before the subpackages (the results-final tree; an editable install's finder would
    # otherwise find this tree's subpackages)
    from pwriter.settings import load_settings  # type: ignore[no-redef]
    from pwriter.writer import open_writer  # type: ignore[no-redef]

LINES = [b'{"p":0,"n":%10d,"x":"' % n + b"x" * 170 + b'"}\n' for n in range(1024)]


async def nothing() -> None:
    pass


async def timed(calls: int, step: Callable[[bytes], Awaitable[None] | object], awaited: bool) -> float:
    lines = LINES
    start = time.perf_counter()
    if awaited:
        for n in range(calls):
            await step(lines[n & 1023])  # type: ignore[misc]
    else:
        for n in range(calls):
            step(lines[n & 1023])
    return (time.perf_counter() - start) / calls


async def one_round(calls: int, out: str) -> dict[str, float]:
    cancel_check = trio.lowlevel.checkpoint_if_cancelled
    clock = time.perf_counter
    rows = {
        "loop": await timed(calls, lambda line: None, awaited=False),
        "await async no-op": await timed(calls, lambda line: nothing(), awaited=True),
        "checkpoint_if_cancelled": await timed(calls, lambda line: cancel_check(), awaited=True),
        "time.perf_counter": await timed(calls, lambda line: clock(), awaited=False),
    }
    settings = load_settings(layout="striped", fsync=False)
    async with open_writer(out, settings=settings, producers=1, force=True) as writer:
        async with writer.producer() as producer:
            rows["send_line"] = await timed(calls, producer.send_line, awaited=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="/tmp/pwriter-bench/send_line_floor.pfw")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, seconds in trio.run(one_round, args.calls, args.out).items():
            results.setdefault(name, []).append(seconds)
    print(f"  {'step':28} {'fastest ns':>10} {'median':>8}")
    for name, values in results.items():
        print(f"  {name:28} {min(values) * 1e9:10.0f} {statistics.median(values) * 1e9:8.0f}")


if __name__ == "__main__":
    main()
