"""How far `pwriter merge` is from the least a Python program could do.

    .venv/bin/python bench/floor.py [--inputs plain|gzip|many] [--rounds 5] [--threads 2]

Uses (and builds, if missing) the corpus of ``bench.py`` in ``--dir``.  In
shuffled rounds, in this one process (so without Python start-up), it times:

* ``floor``: ``--threads`` plain threads, each taking every N-th input,
  reading it with pwriter's own :class:`~pwriter.service.merge.InputReader` (the
  same decompression and text cleaning into a 2 MiB buffer) and writing the
  cleaned text with ``os.pwrite`` in 512 KiB calls at offsets reserved under
  a lock.  No trio, no writer service, no header or footer: a lower bound
  for the data phase of a merge, not a usable merge;
* ``merge()``: :func:`pwriter.service.merge.merge` of the same inputs (striped,
  ``--backend``, no fsync), from the call to the published output.

and, as separate processes, the start-up of ``pwriter merge`` (one 19 KB
trace, the exec to exit time) and of ``python -c "import trio"``.  Prints
the medians, with user and system seconds.  Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import trio

from bench import PWRITER, build_corpus, build_plain
from pwriter.data.inputs import InputReader
from pwriter.plan.settings import load_settings
from pwriter.service.merge import merge

KiB, MiB = 1 << 10, 1 << 20


def floor(paths: list[str], target: str, threads: int) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lock = threading.Lock()
    next_offset = 0

    def work(mine: list[str]) -> None:
        nonlocal next_offset
        view = memoryview(bytearray(2 * MiB))
        for path in mine:
            reader, end = InputReader(path), 0
            while True:
                done, end, finished = reader.fill(view, 0, end, len(view))
                with lock:
                    offset, next_offset = next_offset, next_offset + done
                for start in range(0, done, 512 * KiB):
                    os.pwrite(out, view[start : min(done, start + 512 * KiB)], offset + start)
                if finished:
                    break
                view[: end - done] = view[done:end]
                end -= done
            reader.close()

    workers = [threading.Thread(target=work, args=(paths[index::threads],)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    os.close(out)


def merge_in_process(paths: list[str], target: str, backend: str) -> None:
    settings = load_settings(backend=backend, layout="striped", fsync=False)
    trio.run(lambda: merge(paths, target, settings=settings, force=True))


def timed(work: Callable[[], None]) -> tuple[float, float, float]:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def exec_to_exit(command: list[str]) -> tuple[float, float, float]:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {command}")
    return time.perf_counter() - start, usage.ru_utime, usage.ru_stime


def report(name: str, runs: list[tuple[float, float, float]]) -> None:
    wall, user, system = (statistics.median(run[index] for run in runs) for index in range(3))
    print(f"  {name:<34} {wall:7.3f} s   user {user:5.2f}   system {system:5.2f}   (fastest {min(runs)[0]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    parser.add_argument("--inputs", choices=("plain", "gzip", "many"), default="plain",
                        help="the corpus: plain or gzip (64 inputs, --mib MiB), or many (bench.py's 10,000 plain "
                             "inputs of 64 KiB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--startup-only", action="store_true", help="only the start-up part")
    args = parser.parse_args()
    small = build_plain(os.path.join(args.dir, "small"), 256, 1024)
    out_dir = os.path.join(args.dir, "out")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "floor.pfw")
    if not args.startup_only:
        data_phase(args, target)
    startup(args, [small[0]], target)


def data_phase(args: argparse.Namespace, target: str) -> None:
    if args.inputs == "many":
        inputs = build_plain(os.path.join(args.dir, "many"), 625, 10_000)
    else:
        plain, gz = build_corpus(args.dir, args.mib, compressed=args.inputs == "gzip")
        inputs = gz if args.inputs == "gzip" else plain

    cases = {
        f"floor ({args.threads} threads)": lambda: floor(inputs, target, args.threads),
        f"merge() ({args.backend})": lambda: merge_in_process(inputs, target, args.backend),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    names = list(cases)
    for _ in range(args.rounds):
        random.shuffle(names)
        for name in names:
            runs[name].append(timed(cases[name]))
            os.unlink(target)
    size = f"{len(inputs)} inputs" if args.inputs == "many" else f"{args.mib} MiB"
    print(f"data phase, {args.inputs} corpus ({size}), in one process, median of {args.rounds}:")
    for name in cases:
        report(name, runs[name])



def startup(args: argparse.Namespace, tiny: list[str], target: str) -> None:
    merge_command = [PWRITER, "merge", *tiny, "-o", target, "--force", "--no-fsync"]
    starts = {
        "pwriter merge of one 256 KiB trace": merge_command,
        'python -c "import trio, pydantic, psutil"': [sys.executable, "-c", "import trio, pydantic, psutil"],
        'python -c "import trio, pwriter.plan.settings"': [sys.executable, "-c", "import trio, pwriter.plan.settings"],
        'python -c "import trio"': [sys.executable, "-c", "import trio"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    started: dict[str, list[tuple[float, float, float]]] = {name: [] for name in starts}
    for _ in range(4 * args.rounds):
        for name, command in starts.items():
            started[name].append(exec_to_exit(command))
    print(f"start-up, exec to exit, median of {4 * args.rounds}:")
    for name in starts:
        report(name, started[name])
    os.unlink(target)
    importtime_breakdown([sys.executable, "-X", "importtime", "-c",
                          "import sys; from pwriter.faces.cli import main; sys.exit(main(sys.argv[1:]))",
                          *merge_command[1:]])
    os.unlink(target)


def importtime_breakdown(command: list[str], top: int = 10) -> None:
    """``python -X importtime`` of ``command``, summed by top-level package (self times)."""
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    by_package: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, name = _fields(line)
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + int(self_us)
    total = sum(by_package.values())
    print(f"imports of the one-file merge (python -X importtime, self times by package), {total / 1000:.0f} ms:")
    for package, micros in sorted(by_package.items(), key=lambda item: -item[1])[:top]:
        print(f"  {package:<28} {micros / 1000:6.1f} ms")


def _fields(line: str) -> tuple[str, str]:
    """(self microseconds, module) of one ``-X importtime`` line."""
    self_us, _cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
    return self_us, name


if __name__ == "__main__":
    main()
