"""What each layout costs in bytes: output size per layout, against striped.

    .venv/bin/python bench/padding.py [--ranks 8] [--epochs 4] [--steps 200] [--stripes 1MiB,4MiB]
        [--dir /tmp/pwriter-bench/padding] [--mpi 2] [--json]

Makes ``--ranks`` DFTracer ranks with ``dftracer_gen_fake_trace -p RANKS -H 2
-e EPOCHS -s STEPS`` (once, in ``--dir``), then merges them with ``pwriter
merge`` (fsync off) into plain and gzip output, in every layout, at every
stripe size of ``--stripes``, and prints each output's bytes, its size
against striped, and its number of files.  With ``--mpi N`` (N > 1, needs
mpiexec beside the interpreter) the padded-striped merge is also run over N
ranks.

Then the library path: 8 producers each sending one small event every
0.1 s for 8 s (trio clock, ``autojump``: it runs at once) with
``max_delay=0.25``, padded-striped, 1 MiB stripes, plain and gzip: the
bytes written against the bytes of text, and the deadline flushes.  And a
steady writer that fills a buffer in about 1.5 x ``max_delay``, so that
most buffers go at their deadline, half full: what a deadline flush costs.

Sizes are exact (no timing): one run each.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import trio
import trio.testing

BIN = os.path.dirname(sys.executable)
PWRITER = os.path.join(BIN, "pwriter")
LAYOUTS = ("striped", "padded-striped", "sharded")


def make_ranks(directory: str, ranks: int, epochs: int, steps: int) -> None:
    if os.path.isdir(directory) and len([n for n in os.listdir(directory) if n.endswith(".pfw.gz")]) == ranks:
        return
    shutil.rmtree(directory, ignore_errors=True)
    generator = shutil.which("dftracer_gen_fake_trace", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if generator is None:
        sys.exit("dftracer_gen_fake_trace not found (pip install dftracer-utils)")
    subprocess.run([generator, "-o", directory, "-p", str(ranks), "-H", "2", "-e", str(epochs), "-s", str(steps)],
                   check=True, capture_output=True)


def merge_size(inputs: str, out: str, layout: str, stripe: str, mpi: int = 0) -> tuple[int, int]:
    """(bytes, files) of one merge's output (data files only, no sidecars)."""
    argv = [PWRITER, "merge", "-d", inputs, "-o", out, "--layout", layout, "--stripe-size", stripe, "--no-fsync",
            "--no-progress", "--json"]
    if mpi > 1:
        argv = [os.path.join(BIN, "mpiexec"), "-n", str(mpi), *argv, "--mpi"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    directory = os.path.dirname(out)
    files = [os.path.join(directory, os.path.basename(path)) for path in report["outputs"]]
    return sum(os.path.getsize(path) for path in files), len(files)


def merges(args: argparse.Namespace, inputs: str, scratch: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for suffix in (".pfw", ".pfw.gz"):
        for stripe in args.stripes.split(","):
            base = 0
            runs = [(layout, 0) for layout in LAYOUTS] + ([("padded-striped", args.mpi)] if args.mpi > 1 else [])
            for layout, mpi in runs:
                out_dir = tempfile.mkdtemp(dir=scratch)
                size, files = merge_size(inputs, os.path.join(out_dir, "merged" + suffix), layout, stripe, mpi)
                shutil.rmtree(out_dir)
                base = base or size  # striped comes first
                rows.append({"output": "gzip" if suffix.endswith(".gz") else "plain", "stripe": stripe,
                             "layout": layout + (f" (mpiexec -n {mpi})" if mpi else ""), "bytes": size,
                             "x_striped": round(size / base, 3), "files": files})
    return rows


async def trickle(target: str, compress: bool, *, producers: int, every: float, seconds: float,
                  line_bytes: int) -> dict[str, object]:
    from pwriter.plan.settings import load_settings
    from pwriter.plan.sizing import FsInfo, FsKind
    from pwriter.service.writer import open_writer

    settings = load_settings(layout="padded-striped", stripe_size="1MiB", max_delay=0.25, lanes=4, fsync=False,
                             compress=compress)
    text = 0
    async with open_writer(target, settings=settings, fs=FsInfo(FsKind.LOCAL, 0xEF53, "/"), force=True) as writer:

        async def produce(index: int) -> None:
            nonlocal text
            async with writer.producer() as producer:
                for n in range(int(seconds / every)):
                    line = b'{"id":%d,"pid":%d,"pad":"%s"}' % (n, index, b"x" * max(0, line_bytes - 40))
                    await producer.send_line(line)
                    text += len(line) + 1
                    await trio.sleep(every)

        async with trio.open_nursery() as nursery:
            for index in range(producers):
                nursery.start_soon(produce, index)
    stats = writer.statistics()
    return {"output": "gzip" if compress else "plain", "text": text, "bytes": stats.bytes_written,
            "deadline_flushes": stats.deadline_flushes}


def library(scratch: str) -> list[dict[str, object]]:
    rows = []
    cases = {
        # the trickle: 8 producers, one event each every 0.1 s, for 8 s
        "trickle": {"producers": 8, "every": 0.1, "seconds": 8.0, "line_bytes": 60},
        # steady: 11 MB/s over 4 lanes, so a lane's 1 MiB buffer fills in
        # about 0.37 s = 1.5 x max_delay: most buffers go at their deadline
        "steady": {"producers": 8, "every": 0.00025, "seconds": 2.0, "line_bytes": 350},
    }
    for name, case in cases.items():
        for compress in (False, True):
            target = os.path.join(scratch, "library.pfw" + (".gz" if compress else ""))
            row = trio.run(functools.partial(trickle, target, compress, **case),  # type: ignore[arg-type]
                           clock=trio.testing.MockClock(autojump_threshold=0))
            rows.append({"case": name, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stripes", default="1MiB,4MiB")
    parser.add_argument("--dir", default="/tmp/pwriter-bench/padding")
    parser.add_argument("--mpi", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    inputs = os.path.join(args.dir, f"ranks-{args.ranks}-{args.epochs}-{args.steps}")
    make_ranks(inputs, args.ranks, args.epochs, args.steps)
    scratch = os.path.join(args.dir, "out")
    os.makedirs(scratch, exist_ok=True)
    merged = merges(args, inputs, scratch)
    lib = library(scratch)
    if args.json:
        print(json.dumps({"merges": merged, "library": lib}))
        return
    print(f"pwriter padding bench: dftracer_gen_fake_trace -p {args.ranks} -H 2 -e {args.epochs} -s {args.steps}"
          f" ({sum(os.path.getsize(os.path.join(inputs, n)) for n in os.listdir(inputs)):,} bytes of gzip input)")
    print()
    print("merge output size per layout (pwriter merge --no-fsync)")
    print(f"  {'output':6} {'stripe':6} {'layout':32} {'bytes':>12} {'x striped':>9} {'files':>5}")
    for row in merged:
        print(f"  {row['output']:6} {row['stripe']:6} {row['layout']:32} {row['bytes']:>12,} {row['x_striped']:>9.3f}"
              f" {row['files']:>5}")
    print()
    print("library writer, padded-striped, 1 MiB stripes, 4 lanes, max_delay 0.25 (trio clock)")
    print(f"  {'case':8} {'output':6} {'text':>12} {'bytes':>12} {'bytes-text':>12} {'deadline flushes':>16}")
    for row in lib:
        extra = int(row["bytes"]) - int(row["text"])  # type: ignore[call-overload]
        print(f"  {row['case']:8} {row['output']:6} {row['text']:>12,} {row['bytes']:>12,} {extra:>12,}"
              f" {row['deadline_flushes']:>16}")


if __name__ == "__main__":
    main()
