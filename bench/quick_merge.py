"""A first, small side-by-side measurement: ``cat`` against ``pwriter merge``.

Not run in CI.  Builds (once) a corpus of plain NDJSON/array traces with
pwriter's own event generator, then runs, interleaved and repeated, ``cat
inputs > out`` and ``pwriter merge --no-fsync`` (each layout, each backend
that can run here) into the same directory, and prints median wall seconds,
GiB/s of output, CPU seconds per GiB (user + system of the command and its
threads, kernel io-wq workers included) and the ratio to ``cat`` measured in
the same run.  The full benchmark of the speed issue
(zcat, fio, dftracer_split, gzip inputs, fsync and O_DIRECT, RSS) is still
to come; this one only gives a starting figure.

    .venv/bin/python bench/quick_merge.py [--files 64] [--events 20000] [--repeat 3] [--dir /tmp/pwriter-bench]
"""

from __future__ import annotations

import argparse
import os
import resource
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


def timed(command: list[str] | str, *, shell: bool = False) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, shell=shell, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    from pwriter.backends import available_backends

    backends = [name for name, reason in available_backends().items() if reason is None]
    runs: dict[str, list[tuple[float, float]]] = {}
    configs = {
        "cat": (f"cat {quoted} > {out_dir}/cat.pfw", True),
        **{
            f"pwriter {layout} {backend}": (
                [pwriter, "merge", *paths, "-o", f"{out_dir}/m.pfw", "--force", "--no-fsync", "--layout", layout,
                 "--backend", backend],
                False,
            )
            for layout in ("striped", "padded-striped", "sharded")
            for backend in backends
        },
    }
    for _ in range(args.repeat):
        for name, (command, shell) in configs.items():
            runs.setdefault(name, []).append(timed(command, shell=shell))
    base = statistics.median(wall for wall, _ in runs["cat"])
    gib = size / 2**30
    print(f"corpus: {args.files} plain files, {size / 2**20:.0f} MiB, in {corpus}; {os.cpu_count()} CPUs; "
          f"median of {args.repeat} interleaved runs, page cache warm, no fsync, start-up included")
    print(f"{'command':<34} {'seconds':>8} {'GiB/s':>7} {'CPU s/GiB':>10} {'vs cat':>7}")
    for name, results in runs.items():
        wall = statistics.median(w for w, _ in results)
        cpu = statistics.median(c for _, c in results)
        print(f"{name:<34} {wall:8.3f} {gib / wall:7.2f} {cpu / gib:10.2f} {base / wall:7.2f}")


if __name__ == "__main__":
    main()
