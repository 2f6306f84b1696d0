"""Which buffer (stripe) size and which write call size for local disks: the
measurements behind the 2 MiB stripe and 512 KiB write call defaults.

    .venv/bin/python bench/buffer_sizes.py [--mib 1024] [--rounds 4]

Uses (and builds, if missing) the plain corpus of ``bench.py`` in ``--dir``.
Three parts, each in shuffled rounds, printing every run sorted and the
median (this VM's kernel time swings from run to run, so the spread matters
more than a mean):

1. a plain copy of the corpus into one file, ``readv`` into one buffer of
   128 KiB to 4 MiB + ``pwrite`` of it whole or in calls of 512 KiB, and
   ``copy_file_range`` (no user buffer): wall and system seconds;
2. ``pwriter merge --no-fsync`` of the corpus with ``--stripe-size`` 512 KiB
   to 4 MiB and the default write calls (``--layout``, ``--backend`` and
   ``--inputs gzip`` choose the case): wall, user and system seconds;
3. the same merge with 2 MiB stripes and ``PWRITER_WRITE_CALL_SIZE`` from
   128 KiB to 2 MiB (one call per chunk).

Not run in CI.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import time

from bench import PWRITER, build_corpus

KiB, MiB = 1 << 10, 1 << 20


def copy_through_buffer(paths: list[str], out: int, size: int, call: int) -> None:
    buffer = mmap.mmap(-1, size)
    view = memoryview(buffer)
    offset = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        while got := os.readv(fd, [view]):
            for start in range(0, got, call):
                with view[start : min(got, start + call)] as part:
                    offset += os.pwrite(out, part, offset)
        os.close(fd)
    view.release()
    buffer.close()


def copy_in_kernel(paths: list[str], out: int, _: int, __: int) -> None:
    offset = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        size, done = os.fstat(fd).st_size, 0
        while done < size:
            done += os.copy_file_range(fd, out, size - done, done, offset + done)
        offset += size
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    parser.add_argument("--layout", default="striped")
    parser.add_argument("--backend", default="threads")
    parser.add_argument("--inputs", choices=("plain", "gzip"), default="plain")
    parser.add_argument("--part", type=int, action="append", choices=(1, 2, 3), help="run only these parts")
    args = parser.parse_args()
    parts = set(args.part or (1, 2, 3))
    plain, gz = build_corpus(args.dir, args.mib, compressed=args.inputs == "gzip")
    inputs = gz if args.inputs == "gzip" else plain
    out_dir = os.path.join(args.dir, "out")

    copies = [(f"read/write {size // KiB} KiB", copy_through_buffer, size, size)
              for size in (128 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB)]
    copies += [(f"read {size // KiB} KiB, write 512 KiB", copy_through_buffer, size, 512 * KiB)
               for size in (2 * MiB, 4 * MiB)]
    copies.append(("copy_file_range", copy_in_kernel, 0, 0))
    seen: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds if 1 in parts else 0):
        random.shuffle(copies)
        for name, copy, size, call in copies:
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir)
            out = os.open(os.path.join(out_dir, "copy"), os.O_WRONLY | os.O_CREAT, 0o644)
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            copy(plain, out, size, call)
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            os.close(out)
            seen.setdefault(name, []).append((wall, after.ru_stime - before.ru_stime))
    if 1 in parts:
        print(f"1. copy of the plain corpus ({args.mib} MiB), {args.rounds} rounds: wall s / system s")
    for name, runs in sorted(seen.items()):
        runs.sort()
        print(f"  {name:<32} median {statistics.median(w for w, _ in runs):.2f}:"
              f" {' '.join(f'{w:.2f}/{s:.2f}' for w, s in runs)}")

    def merges(title: str, cases: dict[str, tuple[str, str]]) -> None:
        """Merge the corpus once per case and round; a case is (stripe size, write call size or "auto")."""
        merged: dict[str, list[tuple[float, float, float]]] = {}
        names = list(cases)
        for _ in range(args.rounds):
            random.shuffle(names)
            for name in names:
                stripe, call = cases[name]
                shutil.rmtree(out_dir, ignore_errors=True)
                os.makedirs(out_dir)
                start = time.perf_counter()
                process = subprocess.Popen([PWRITER, "merge", *inputs, "-o", os.path.join(out_dir, "m.pfw"),
                                            "--no-fsync", "--layout", args.layout, "--backend", args.backend,
                                            "--stripe-size", stripe], stdout=subprocess.DEVNULL,
                                           env={**os.environ, "PWRITER_WRITE_CALL_SIZE": call})
                _, status, usage = os.wait4(process.pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"pwriter merge failed with --stripe-size {stripe}, write calls of {call}")
                merged.setdefault(name, []).append((time.perf_counter() - start, usage.ru_utime, usage.ru_stime))
        print(f"{title} of the {args.inputs} corpus, {args.layout}, {args.backend}: wall s / user s / system s")
        for name in cases:
            runs = sorted(merged[name])
            print(f"  {name:<22} median {statistics.median(w for w, _, _ in runs):.2f}:"
                  f" {' '.join(f'{w:.2f}/{u:.2f}/{s:.2f}' for w, u, s in runs)}")

    if 2 in parts:
        merges("2. pwriter merge, stripe size (default write calls: at most 512 KiB)",
               {f"stripe {stripe}": (stripe, "auto") for stripe in ("512KiB", "1MiB", "2MiB", "4MiB")})
    if 3 in parts:
        merges("3. pwriter merge, 2 MiB stripes, write call size",
               {f"calls of {call}": ("2MiB", call) for call in ("128KiB", "256KiB", "512KiB", "1MiB", "2MiB")})
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
