"""A first, small side-by-side measurement: ``cat`` against ``pwriter merge``.

Not run in CI.  Builds (once) a corpus of plain NDJSON/array traces with
pwriter's own event generator, then runs, interleaved and repeated, ``cat
inputs > out`` and ``pwriter merge --no-fsync`` (each layout) into the same
directory, and prints median wall seconds, GiB/s of output and the ratio to
``cat`` measured in the same run.  The full benchmark of the speed issue
(zcat, fio, dftracer_split, gzip inputs, fsync and O_DIRECT, RSS) is still
to come; this one only gives a starting figure.

    .venv/bin/python bench/quick_merge.py [--files 64] [--events 20000] [--repeat 3] [--dir /tmp/pwriter-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from pwriter.corpus import events, write_trace


def build_corpus(directory: str, files: int, per_file: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"rank_{rank}.pfw") for rank in range(files)]
    stamp = os.path.join(directory, f".built-{files}-{per_file}")
    if not os.path.exists(stamp):
        for rank, path in enumerate(paths):
            write_trace(path, list(events(rank, per_file)), array=rank % 2 == 0)
        open(stamp, "w").close()
    return paths


def timed(command: list[str] | str, *, shell: bool = False) -> float:
    start = time.perf_counter()
    subprocess.run(command, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--events", type=int, default=20000, help="events per file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    args = parser.parse_args()

    corpus = os.path.join(args.dir, "corpus")
    paths = build_corpus(corpus, args.files, args.events)
    out_dir = os.path.join(args.dir, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    size = sum(os.path.getsize(path) for path in paths)
    pwriter = os.path.join(os.path.dirname(sys.executable), "pwriter")
    quoted = " ".join(paths)
    runs: dict[str, list[float]] = {}
    configs = {
        "cat": (f"cat {quoted} > {out_dir}/cat.pfw", True),
        **{
            f"pwriter {layout}": (
                [pwriter, "merge", *paths, "-o", f"{out_dir}/m.pfw", "--force", "--no-fsync", "--layout", layout],
                False,
            )
            for layout in ("striped", "padded-striped", "sharded")
        },
    }
    for _ in range(args.repeat):
        for name, (command, shell) in configs.items():
            runs.setdefault(name, []).append(timed(command, shell=shell))
    base = statistics.median(runs["cat"])
    print(f"corpus: {args.files} plain files, {size / 2**20:.0f} MiB, in {corpus}; {os.cpu_count()} CPUs; "
          f"median of {args.repeat} interleaved runs, page cache warm, no fsync")
    print(f"{'command':<24} {'seconds':>8} {'GiB/s':>7} {'vs cat':>7}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"{name:<24} {median:8.3f} {size / median / 2**30:7.2f} {base / median:7.2f}")


if __name__ == "__main__":
    main()
