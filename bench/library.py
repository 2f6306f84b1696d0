"""The library path: many producers sending small lines to one writer,
against the loop a user would write by hand.

    .venv/bin/python bench/library.py [--lines 4000000] [--producers 8] [--size 200] [--batch 10000]
        [--backend auto] [--rounds 5] [--modes loop,send_lines,send_line,sync_send_lines,sync_send_line]
        [--out /tmp/pwriter-bench/library.pfw]

Modes, each writing ``--lines`` lines of ``--size`` bytes (a newline
included) to a file, fsync off:

* ``loop``: one thread, no trio: ``f.write(b"".join(batch))`` per batch of
  ``--batch`` lines (the baseline issue 12 names);
* ``send_lines`` / ``send_line``: ``--producers`` trio tasks, one handle
  each, ``send_lines`` in batches of ``--batch`` lines, or one call per line;
* ``sync_send_lines`` / ``sync_send_line``: the same through
  ``open_writer_sync`` from ``--producers`` threads.

The lines are made before the clock starts (1,024 distinct lines per
producer, sent over and over).  Modes run interleaved, ``--rounds`` times;
the table gives the fastest and the median rate of each (this VM's noise
only adds time), and the ratios of the fastest rates.  ``--json`` prints
one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import trio

from pwriter.faces.sync import open_writer_sync
from pwriter.plan.settings import load_settings
from pwriter.service.writer import open_writer

MODES = ("loop", "send_lines", "send_line", "sync_send_lines", "sync_send_line")


def made_lines(args: argparse.Namespace) -> list[list[bytes]]:
    made = []
    for index in range(args.producers):
        lines = []
        for n in range(1024):
            head = b'{"p":%d,"n":%10d,"x":"' % (index, n)
            lines.append(head + b"x" * (args.size - len(head) - 3) + b'"}\n')  # --size bytes, newline included
        made.append(lines)
    return made


def batches(lines: list[bytes], count: int, size: int) -> list[list[bytes]]:
    """``count`` lines in batches of ``size``, cycling through ``lines`` (built before the clock)."""
    out, sent = [], 0
    while sent < count:
        take = min(size, count - sent)
        out.append([lines[(sent + k) & 1023] for k in range(take)])
        sent += take
    return out


def run_loop(args: argparse.Namespace, made: list[list[bytes]]) -> float:
    work = [batches(lines, args.lines // args.producers, args.batch) for lines in made]
    start = time.perf_counter()
    with open(args.out, "wb") as handle:
        for producer_batches in work:
            for batch in producer_batches:
                handle.write(b"".join(batch))
    return time.perf_counter() - start


def run_trio(args: argparse.Namespace, made: list[list[bytes]], per_line: bool) -> float:
    per_producer = args.lines // args.producers
    work = [batches(lines, per_producer, args.batch) for lines in made]
    settings = load_settings(backend=args.backend, layout="striped", fsync=False)

    async def main() -> float:
        start = time.perf_counter()
        async with open_writer(args.out, settings=settings, producers=args.producers, force=True) as writer:
            async def produce(index: int) -> None:
                async with writer.producer() as producer:
                    if per_line:
                        send = producer.send_line
                        lines = made[index]
                        for n in range(per_producer):
                            await send(lines[n & 1023])
                    else:
                        for batch in work[index]:
                            await producer.send_lines(batch)

            async with trio.open_nursery() as nursery:
                for index in range(args.producers):
                    nursery.start_soon(produce, index)
        return time.perf_counter() - start

    return trio.run(main)


def run_sync(args: argparse.Namespace, made: list[list[bytes]], per_line: bool) -> float:
    per_producer = args.lines // args.producers
    work = [batches(lines, per_producer, args.batch) for lines in made]
    settings = load_settings(backend=args.backend, layout="striped", fsync=False)
    start = time.perf_counter()
    with open_writer_sync(args.out, settings=settings, producers=args.producers, force=True) as writer:
        def produce(index: int) -> None:
            with writer.producer() as producer:
                if per_line:
                    send = producer.send_line
                    lines = made[index]
                    for n in range(per_producer):
                        send(lines[n & 1023])
                else:
                    for batch in work[index]:
                        producer.send_lines(batch)

        threads = [threading.Thread(target=produce, args=(index,)) for index in range(args.producers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return time.perf_counter() - start


def runner(mode: str) -> Callable[[argparse.Namespace, list[list[bytes]]], float]:
    return {
        "loop": run_loop,
        "send_lines": lambda args, made: run_trio(args, made, per_line=False),
        "send_line": lambda args, made: run_trio(args, made, per_line=True),
        "sync_send_lines": lambda args, made: run_sync(args, made, per_line=False),
        "sync_send_line": lambda args, made: run_sync(args, made, per_line=True),
    }[mode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="/tmp/pwriter-bench/library.pfw")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    modes = args.modes.split(",")
    made = made_lines(args)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:  # interleaved: drift hits every mode alike
            seconds[mode].append(runner(mode)(args, made))
            expected = (args.lines // args.producers) * args.producers * args.size + (0 if mode == "loop" else 4)
            # (the writer adds its "[\n" header and "]\n" footer)
            assert os.path.getsize(args.out) == expected, (mode, os.path.getsize(args.out), expected)
            os.unlink(args.out)
    lines = (args.lines // args.producers) * args.producers
    rates = {mode: {"fastest": lines / min(times), "median": lines / statistics.median(times)}
             for mode, times in seconds.items()}
    report = {"lines": lines, "producers": args.producers, "line_bytes": args.size, "batch": args.batch,
              "backend": args.backend, "rounds": args.rounds,
              "lines_per_second": {mode: {k: round(v) for k, v in rate.items()} for mode, rate in rates.items()}}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{lines:,} lines of {args.size} bytes, {args.producers} producers, batches of {args.batch:,}, "
          f"backend {args.backend}, fsync off; {args.rounds} interleaved rounds")
    print(f"  {'mode':<16} {'fastest M lines/s':>18} {'median':>8} {'vs loop':>8}")
    for mode, rate in rates.items():
        ratio = rate["fastest"] / rates["loop"]["fastest"] if "loop" in rates else float("nan")
        print(f"  {mode:<16} {rate['fastest'] / 1e6:>18.2f} {rate['median'] / 1e6:>8.2f} {ratio:>7.2f}x")
    for mode in ("send_lines", "send_line"):
        if mode in rates and "sync_" + mode in rates:
            print(f"  sync_{mode} / {mode}: {rates['sync_' + mode]['fastest'] / rates[mode]['fastest']:.2f}x")


if __name__ == "__main__":
    main()
