"""pwriter merge over MPI ranks, beside one process, on the bench corpus.

Not run in CI.  From the repository, after ``bash scripts/setup.sh`` (which
installs the MPI extra)::

    .venv/bin/python bench/mpi.py                 # 1 GiB corpus, 3 rounds
    .venv/bin/python bench/mpi.py --mib 256 --rounds 1

On one small machine the point is the cost of the coordination (the
agreements, the shared offset counter, the extra processes), not a
speed-up: the ranks share the same cores and disk.  Groups:

* plain to plain, ``--no-fsync``: one process, then ``mpiexec -n 1, 2, 4``
  with the shared counter (striped), ``-n 2`` with ``--mpi-offsets exscan``,
  and ``-n 2`` padded-striped and sharded;
* gzip to plain, ``--no-fsync``: one process, then ``-n 1, 2, 4``.

The baseline of each group is the single process; ``x base`` above 1 is
faster than it.  Medians and the fastest of interleaved rounds, as in
``bench/bench.py`` (whose corpus and helpers this uses).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import statistics  # noqa: E402

from bench import BIN, build_corpus, measure, pwriter_merge, run_group, text_bytes  # noqa: E402


def startup(mpiexec: str, rounds: int = 10) -> None:
    """What launching costs before pwriter reads a byte: mpiexec and MPI_Init against plain Python."""
    python = sys.executable
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import trio, pwriter.faces.cli'": [python, "-c", "import trio, pwriter.faces.cli"],
        "mpiexec -n 1 python -c 'from mpi4py import MPI'": [mpiexec, "-n", "1", python, "-c", "from mpi4py import MPI"],
        "mpiexec -n 2 python -c 'from mpi4py import MPI'": [mpiexec, "-n", "2", python, "-c", "from mpi4py import MPI"],
        "mpiexec -n 2 python -c 'import trio, pwriter.faces.mpi; World()'": [
            mpiexec, "-n", "2", python, "-c", "import trio; from pwriter.faces.mpi import World; World()"],
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            walls[name].append(measure(command).wall)
    print(f"\nstart-up, exec to exit (median and fastest of {rounds})")
    for name, measured in walls.items():
        print(f"  {name:<60} {statistics.median(measured):7.3f} {min(measured):7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    args = parser.parse_args()
    mpiexec = os.path.join(BIN, "mpiexec")
    if not os.path.exists(mpiexec):
        raise SystemExit("mpiexec is not installed: pip install 'pwriter[mpi]' (bash scripts/setup.sh does)")
    plain, gz = build_corpus(args.dir, args.mib)
    out = os.path.join(args.dir, "out")
    os.makedirs(out, exist_ok=True)
    merged = os.path.join(out, "merged.pfw")
    size = text_bytes(plain)
    print(f"pwriter MPI bench: {os.cpu_count()} CPUs, {len(plain)} inputs; median of {args.rounds} rounds "
          "after a warm-up round")

    def ranks(count: int, inputs: list[str], *extra: str) -> list[str]:
        return [mpiexec, "-n", str(count), *pwriter_merge(inputs, merged, "--mpi", "--no-fsync", *extra)]

    startup(mpiexec)
    results: list[dict[str, object]] = []
    run_group("plain to plain, no fsync, over MPI ranks", size, {
        "1 process, striped": pwriter_merge(plain, merged, "--no-fsync", "--layout", "striped"),
        "mpiexec -n 1, striped (counter)": ranks(1, plain, "--layout", "striped"),
        "mpiexec -n 2, striped (counter)": ranks(2, plain, "--layout", "striped"),
        "mpiexec -n 4, striped (counter)": ranks(4, plain, "--layout", "striped"),
        "mpiexec -n 2, striped (exscan)": ranks(2, plain, "--layout", "striped", "--mpi-offsets", "exscan"),
        "mpiexec -n 2, padded-striped": ranks(2, plain, "--layout", "padded-striped"),
        "mpiexec -n 2, sharded": ranks(2, plain, "--layout", "sharded"),
    }, args.rounds, out, results)
    run_group("gzip to plain, no fsync, over MPI ranks", size, {
        "1 process, striped": pwriter_merge(gz, merged, "--no-fsync", "--layout", "striped"),
        "mpiexec -n 1, striped (counter)": ranks(1, gz, "--layout", "striped"),
        "mpiexec -n 2, striped (counter)": ranks(2, gz, "--layout", "striped"),
        "mpiexec -n 4, striped (counter)": ranks(4, gz, "--layout", "striped"),
        "mpiexec -n 2, striped (exscan)": ranks(2, gz, "--layout", "striped", "--mpi-offsets", "exscan"),
    }, args.rounds, out, results)


if __name__ == "__main__":
    main()
