"""A small Python workload traced by DFTracer 2.x: a launcher and a few
worker processes, each writing and reading small files inside traced
functions.

Run it under the tracer (``pip install dftracer``)::

    DFTRACER_ENABLE=1 DFTRACER_INC_METADATA=1 DFTRACER_DATA_DIR=all \\
    DFTRACER_LOG_FILE=traces/app python examples/traced_app.py --workers 3

Every process (the launcher and each worker) writes one trace,
``traces/app-<hash>-app.pfw.gz``: the events of its traced functions
(``cat`` ``APP``) and of its POSIX calls (``cat`` ``POSIX``), ending with
the tracer's ``end`` event once the process finalizes.

``--lost RANK`` makes that worker leave with ``os._exit(0)`` before it
finalizes, as a PyTorch data-loader worker, an ``exec`` or a killed
container does: its trace has no ``end`` event.  It is empty unless the
tracer flushed its buffer before the exit; with
``DFTRACER_WRITE_BUFFER_SIZE=200000`` it has flushed, and the file is cut
inside a gzip member and inside a line.

Without ``DFTRACER_ENABLE=1`` the workload runs untraced.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from dftracer.python import dft_fn, dftracer

app = dft_fn("APP")


@app.log
def write_block(path: str, step: int) -> None:
    with open(path, "wb") as handle:
        handle.write(os.urandom(4096))


@app.log
def read_block(path: str, step: int) -> int:
    with open(path, "rb") as handle:
        return len(handle.read())


def work(rank: int, steps: int, data: str) -> None:
    """``steps`` traced writes and reads of one small file per step."""
    for step in range(steps):
        path = os.path.join(data, f"rank{rank}-step{step}.bin")
        write_block(path, step)
        read_block(path, step)
        os.unlink(path)


@app.log
def launch(workers: int, steps: int, lost: int, data: str) -> None:
    """Start every worker at once and wait for all of them."""
    children = []
    for rank in range(workers):
        command = [sys.executable, os.path.abspath(__file__), "--rank", str(rank), "--steps", str(steps),
                   "--data", data]
        if rank == lost:
            command.append("--no-finalize")
        children.append(subprocess.Popen(command))
    failed = [child.args for child in children if child.wait() != 0]
    if failed:
        raise SystemExit(f"traced_app: workers failed: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="worker processes to start (default 3)")
    parser.add_argument("--steps", type=int, default=100, help="write/read steps per worker (default 100)")
    parser.add_argument("--lost", type=int, default=-1, metavar="RANK",
                        help="this worker exits with os._exit(0) before it finalizes")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-finalize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    tracer = dftracer.initialize_log(logfile=None, data_dir=None, process_id=-1)
    if args.rank is not None:  # a worker
        work(args.rank, args.steps, args.data)
        if args.no_finalize:
            sys.stdout.flush()
            os._exit(0)  # no finalize: the trace is left as the last flush left it
        tracer.finalize()
        return
    with tempfile.TemporaryDirectory(prefix="traced_app-") as data:
        launch(args.workers, args.steps, args.lost, data)
    tracer.finalize()


if __name__ == "__main__":
    main()
