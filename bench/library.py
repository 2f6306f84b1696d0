"""The library path: many trio producer tasks sending small lines to one writer.

    .venv/bin/python bench/library.py [--lines 4000000] [--producers 8] [--size 200] [--backend auto]
        [--call line|lines] [--out /tmp/pwriter-bench/library.pfw]

Each producer sends ``--lines / --producers`` lines of ``--size`` bytes (a
newline included) through ``producer.send_line`` (or ``send_lines`` in
batches of 256) into a striped file, fsync off.  The lines are made before
the clock starts (a pipeline has its events' bytes already; formatting them
here would measure ``bytes %`` rather than pwriter): 1,024 distinct lines
per producer, sent over and over.  Prints one JSON object:
lines per second and MiB/s measured inside the process (trio clock, from
before ``open_writer`` to after publication), so Python start-up is not
counted here; ``bench/bench.py`` runs this script and times it whole too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio

from pwriter.settings import load_settings
from pwriter.writer import open_writer


async def run(args: argparse.Namespace) -> dict[str, object]:
    per_producer = args.lines // args.producers
    payload = b"x" * (args.size - 40)
    made = [[b'{"p":%d,"n":%10d,"x":"%s"}' % (index, n, payload) for n in range(1024)]
            for index in range(args.producers)]
    settings = load_settings(backend=args.backend, layout="striped", fsync=False)
    start = time.perf_counter()
    async with open_writer(args.out, settings=settings, producers=args.producers, force=True) as writer:

        async def produce(index: int) -> None:
            lines = made[index]
            async with writer.producer() as producer:
                if args.call == "line":
                    send = producer.send_line
                    for n in range(per_producer):
                        await send(lines[n & 1023])
                else:
                    for first in range(0, per_producer, 256):
                        await producer.send_lines(lines[first & 1023 : (first & 1023) + min(256, per_producer - first)])

        async with trio.open_nursery() as nursery:
            for index in range(args.producers):
                nursery.start_soon(produce, index)
    seconds = time.perf_counter() - start
    lines = per_producer * args.producers
    size = os.path.getsize(args.out)
    os.unlink(args.out)
    return {
        "call": args.call,
        "producers": args.producers,
        "lines": lines,
        "line_bytes": args.size,
        "backend": writer.statistics().backend,
        "seconds": round(seconds, 3),
        "lines_per_second": round(lines / seconds),
        "mib_per_second": round(size / seconds / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--call", choices=("line", "lines"), default="line")
    parser.add_argument("--out", default="/tmp/pwriter-bench/library.pfw")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
