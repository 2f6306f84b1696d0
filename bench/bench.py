"""pwriter's benchmark: every configuration beside its baselines, in one run.

Not run in CI.  One command (from the repository, after ``bash scripts/setup.sh``)::

    .venv/bin/python bench/bench.py                # 1 GiB corpus, 3 rounds (about 10 minutes)
    .venv/bin/python bench/bench.py --mib 256 --rounds 1   # a quick look

It builds, once, in ``--dir`` (default /tmp/pwriter-bench):

* ``plain-<MiB>MiB/``: 64 plain traces (half array style, half NDJSON) of realistic
  events from pwriter's own generator, ``--mib`` MiB in all;
* ``gzip-<MiB>MiB/``: gzip copies of them (python-isal, level 3);
* ``small/``: 1,024 plain traces of 256 KiB;
* ``many/`` (group ``many``): 10,000 plain traces of 64 KiB, merged with ``-d``;

Then it runs each command ``--rounds`` times, the commands of one group
interleaved, page cache warm (one untimed warm-up round), Python start-up
included, and prints per command: median and fastest wall seconds, GiB/s of
output text (median),
CPU seconds (user + system of the process and its threads, kernel io-wq
workers included) per GiB, peak RSS, and the ratio of its throughput to the
group's baseline measured in the same run (medians).  Output files go to
``--out`` (default: beside the corpus) and are removed after each run.

On a virtual machine whose kernel hands free memory back to the host
(virtio-balloon free page reporting), writing fresh page cache sometimes
costs seconds of system time; where the kernel reports it, the bench prints
how much memory was handed back during the run, and the fastest column shows
what a run untouched by it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from pwriter.faces.corpus import events, write_trace

GiB = 1 << 30
MiB = 1 << 20
BIN = os.path.dirname(sys.executable)
PWRITER = os.path.join(BIN, "pwriter")
BEFORE: str | None = None  # --before: another pwriter command, each pwriter row run beside it


@dataclasses.dataclass
class Run:
    wall: float
    cpu: float
    rss_kib: int


def measure(command: list[str] | str, *, shell: bool = False, env: dict[str, str] | None = None) -> Run:
    """Wall time, CPU time and peak RSS of one command (os.wait4: this child only).

    The peak RSS comes from GNU time's ``%M`` where it is installed: Linux
    starts a forked child's peak RSS at its parent's, so wait4's figure for
    a command forked from this (large) Python process is never below this
    process's own RSS; GNU time is small, and forks the command itself.
    """
    argv = ["sh", "-c", command] if shell and isinstance(command, str) else list(command)
    rss_file = None
    if os.path.exists("/usr/bin/time"):
        rss_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f".pwriter-bench-rss-{os.getpid()}")
        argv = ["/usr/bin/time", "-f", "%M", "-o", rss_file, *argv]
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"benchmark command failed ({process.returncode}): {command}")
    rss_kib = usage.ru_maxrss
    if rss_file is not None:
        with open(rss_file) as handle:
            rss_kib = int(handle.read().split()[-1])
        os.unlink(rss_file)
    return Run(wall, usage.ru_utime + usage.ru_stime, rss_kib)


def build_plain(directory: str, total_mib: int, files: int) -> list[str]:
    stamp = os.path.join(directory, f".built-{total_mib}-{files}")
    paths = [os.path.join(directory, f"rank_{rank}.pfw") for rank in range(files)]
    if os.path.exists(stamp):
        return paths
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    per_file = total_mib * MiB // files
    events_per_file = max(1, per_file // 215)  # generator events average about 215 bytes
    for rank, path in enumerate(paths):
        write_trace(path, list(events(rank, events_per_file)), array=rank % 2 == 0)
    open(stamp, "w").close()
    return paths


def event_text(total_mib: int) -> bytes:
    """At least ``total_mib`` MiB of generated event lines, each ending in a newline, in memory."""
    lines, size, rank = [], 0, 0
    while size < total_mib * MiB:
        for line in events(rank, 10_000):
            lines.append(line + b"\n")
            size += len(line) + 1
        rank += 1
    return b"".join(lines)


def build_gzip(plain: list[str], directory: str) -> list[str]:
    from isal import igzip

    stamp = os.path.join(directory, f".built-{len(plain)}-{sum(os.path.getsize(p) for p in plain)}")
    paths = [os.path.join(directory, os.path.basename(p) + ".gz") for p in plain]
    if os.path.exists(stamp):
        return paths
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for source, target in zip(plain, paths, strict=True):
        with open(source, "rb") as handle:
            data = handle.read()
        with open(target, "wb") as handle:
            handle.write(igzip.compress(data, compresslevel=3))
    open(stamp, "w").close()
    return paths


def build_corpus(root: str, total_mib: int, *, compressed: bool = True) -> tuple[list[str], list[str]]:
    """The plain corpus of ``total_mib`` MiB (64 files) and, if asked, its gzip
    copies, each size in directories of its own under ``root`` (so that a
    quick run at another size does not rebuild the big corpus)."""
    plain = build_plain(os.path.join(root, f"plain-{total_mib}MiB"), total_mib, 64)
    gz = build_gzip(plain, os.path.join(root, f"gzip-{total_mib}MiB")) if compressed else []
    return plain, gz


def tool(name: str) -> str | None:
    return shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))


def text_bytes(paths: list[str]) -> int:
    from pwriter.faces.testing import read_text

    return sum(len(read_text(path)) for path in paths)


def pwriter_merge(inputs: list[str], output: str, *extra: str) -> list[str]:
    return [PWRITER, "merge", *inputs, "-o", output, "--force", "--no-progress", *extra]


def run_group(title: str, size: int, commands: dict[str, list[str] | str], rounds: int, out: str,
              results: list[dict[str, object]]) -> None:
    """Run the commands interleaved; the first one is the baseline.  ``out``
    (where they write) is emptied after each run.  With ``--before``, each
    pwriter command has a twin run with the other pwriter right after it."""
    if BEFORE:
        commands = dict(pair for name, command in commands.items() for pair in _with_before(name, command))
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for round_index in range(rounds + 1):
        for name, command in commands.items():
            run = measure(command, shell=isinstance(command, str))
            if round_index:  # round 0 warms the page cache
                runs[name].append(run)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
    base_name = next(iter(commands))
    base = statistics.median(r.wall for r in runs[base_name])
    print(f"\n{title} ({size / MiB:.0f} MiB of text; baseline: {base_name})")
    print(f"  {'command':<44} {'seconds':>8} {'fastest':>8} {'GiB/s':>7} {'CPU s/GiB':>10} {'RSS MiB':>8}"
          f" {'x base':>7}")
    for name, measured in runs.items():
        wall = statistics.median(r.wall for r in measured)
        fastest = min(r.wall for r in measured)
        cpu = statistics.median(r.cpu for r in measured)
        rss = max(r.rss_kib for r in measured) / 1024
        ratio = base / wall
        print(f"  {name:<44} {wall:8.3f} {fastest:8.3f} {size / GiB / wall:7.2f} {cpu / (size / GiB):10.2f}"
              f" {rss:8.0f} {ratio:7.2f}")
        results.append({"group": title, "command": name, "seconds": wall, "fastest_seconds": fastest,
                        "gib_per_s": size / GiB / wall, "cpu_s_per_gib": cpu / (size / GiB), "peak_rss_mib": rss,
                        "ratio_to_baseline": ratio})
    sys.stdout.flush()


def _with_before(name: str, command: list[str] | str) -> list[tuple[str, list[str] | str]]:
    if BEFORE is None or not name.startswith("pwriter"):
        return [(name, command)]
    if isinstance(command, str):
        return [(name, command), (name + " [before]", command.replace(PWRITER, BEFORE))]
    return [(name, command), (name + " [before]", [BEFORE if part == PWRITER else part for part in command])]


PAGE_REPORTING = "/sys/module/page_reporting/parameters/reported_kib"


def memory_handed_to_host_kib() -> int | None:
    """KiB of free memory this VM's kernel has reported to its host, where it says."""
    try:
        with open(PAGE_REPORTING) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


GROUPS = ("plain", "durable", "gzip", "small", "many", "fio", "split", "memory", "library")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="size of the plain corpus (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", metavar="GROUP", action="append", choices=GROUPS,
                        help=f"run only these groups (repeatable): {', '.join(GROUPS)}")
    parser.add_argument("--before", metavar="PWRITER",
                        help="another pwriter executable (say, an older tree's): each pwriter row runs beside it")
    args = parser.parse_args()
    wanted = set(args.only or GROUPS)
    global BEFORE
    BEFORE = args.before

    from pwriter.data.backends import available_backends

    backends = [name for name, reason in available_backends().items() if reason is None]
    out = os.path.join(args.dir, "out")
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    plain, gz = build_corpus(args.dir, args.mib, compressed=bool(wanted & {"gzip", "split"}))
    small = build_plain(os.path.join(args.dir, "small"), 256, 1024)
    size = text_bytes(plain)
    small_size = text_bytes(small)
    built = time.perf_counter() - started
    print(f"pwriter bench: {os.cpu_count()} CPUs, corpus {args.dir} built/checked in {built:.0f} s;"
          f" backends {', '.join(backends)}; median of {args.rounds} rounds after a warm-up round")
    merged = os.path.join(out, "merged.pfw")
    results: list[dict[str, object]] = []
    reported_before = memory_handed_to_host_kib()
    plain_list = " ".join(plain)

    if "plain" in wanted:
        run_group("plain to plain, no fsync", size, {
        "cat > out": f"cat {plain_list} > {out}/cat.pfw",
        **{f"pwriter {layout} {backend} --no-fsync": pwriter_merge(plain, merged, "--layout", layout, "--backend",
                                                                   backend, "--no-fsync")
           for layout in ("striped", "padded-striped", "sharded") for backend in backends},
    }, args.rounds, out, results)

    if "durable" in wanted:
        run_group("plain to plain, durable", size, {
        "cat > out && sync": f"cat {plain_list} > {out}/cat.pfw && sync",
        **{f"pwriter striped {backend} (fsync)": pwriter_merge(plain, merged, "--layout", "striped", "--backend",
                                                               backend) for backend in backends},
        **{f"pwriter --direct {backend} (fsync)": pwriter_merge(plain, merged, "--direct", "--backend", backend)
           for backend in backends},
    }, args.rounds, out, results)

    if "gzip" in wanted:
        run_group("gzip to plain, no fsync", size, {
        "zcat > out": f"zcat {' '.join(gz)} > {out}/zcat.pfw",
        **{f"pwriter striped {backend} --no-fsync": pwriter_merge(gz, merged, "--backend", backend, "--no-fsync")
           for backend in backends},
    }, args.rounds, out, results)

    if "small" in wanted:
        run_group("1,024 files of 256 KiB, no fsync", small_size, {
        "cat > out": f"cat {os.path.join(args.dir, 'small')}/*.pfw > {out}/cat.pfw",
        **{f"pwriter striped {backend} --no-fsync": pwriter_merge(small, merged, "--backend", backend, "--no-fsync")
           for backend in backends},
    }, args.rounds, out, results)

    if "many" in wanted:  # a 10,000-rank job's traces
        many_dir = os.path.join(args.dir, "many")
        many = build_plain(many_dir, 625, 10_000)
        run_group("10,000 files of 64 KiB, -d DIR, no fsync", text_bytes(many), {
        "cat DIR/* > out": f"cat {many_dir}/*.pfw > {out}/cat.pfw",
        **{f"pwriter -d DIR {backend} --no-fsync": [PWRITER, "merge", "-d", many_dir, "-o", merged, "--no-progress",
                                                   "--backend", backend, "--no-fsync"] for backend in backends},
        }, args.rounds, out, results)

    fio = tool("fio")
    if "fio" not in wanted:
        pass
    elif fio:
        fio_cmd = (f"{fio} --name=seq --rw=write --bs=1M --size={size // MiB}M --direct=1 --ioengine=psync "
                   f"--filename={out}/fio.dat --output-format=terse >/dev/null")
        fio_ring = (f"{fio} --name=seq --rw=write --bs=1M --size={size // MiB}M --direct=1 --ioengine=io_uring "
                    f"--iodepth=16 --filename={out}/fio.dat --output-format=terse >/dev/null")
        run_group("the disk itself (fio sequential write, O_DIRECT, 1 MiB)", size, {
            "fio direct write": fio_cmd,
            "fio direct write, io_uring, 16 in flight": fio_ring,
            **{f"pwriter --direct {backend} (fsync)": pwriter_merge(plain, merged, "--direct", "--backend", backend)
               for backend in backends},
        }, args.rounds, out, results)
    else:
        print("\nfio is not installed: the disk's own limit is not measured (apt-get install fio)")

    split = tool("dftracer_split")
    if "split" not in wanted:
        pass
    elif split:
        split_out = os.path.join(out, "split")
        merged_gz = os.path.join(out, "merged.pfw.gz")
        run_group("gzip to gzip: dftracer_split (C++) against pwriter", size, {
            "dftracer_split -s 100000": f"mkdir -p {split_out} && {split} -d {os.path.dirname(gz[0])} "
                                        f"-o {split_out} -s 100000 >/dev/null 2>&1",
            **{f"pwriter {layout} {backend} -o .pfw.gz --no-fsync": pwriter_merge(
                gz, merged_gz, "--layout", layout, "--backend", backend, "--no-fsync")
               for layout in ("striped", "sharded") for backend in backends},
        }, args.rounds, out, results)
    else:
        print("\ndftracer_split is not installed (pip install dftracer-utils): no C++ baseline")

    if "memory" in wanted:
        # Memory against corpus size: a quarter of the corpus, the corpus, and the corpus twice (copies).
        twice = os.path.dirname(plain[0]) + "-copy"
        if not os.path.exists(os.path.join(twice, ".built")):
            shutil.rmtree(twice, ignore_errors=True)
            shutil.copytree(os.path.dirname(plain[0]), twice)
            open(os.path.join(twice, ".built"), "w").close()
        copies = [os.path.join(twice, os.path.basename(path)) for path in plain]
        print("\npeak RSS against corpus size (pwriter striped, auto backend, no fsync)")
        print(f"  {'corpus':<10} {'MiB':>8} {'seconds':>8} {'RSS MiB':>8}")
        for label, paths in (("quarter", plain[: len(plain) // 4]), ("whole", plain), ("twice", plain + copies)):
            run = measure(pwriter_merge(paths, merged, "--no-fsync"))
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            mib = sum(os.path.getsize(path) for path in paths) / MiB
            print(f"  {label:<10} {mib:8.0f} {run.wall:8.3f} {run.rss_kib / 1024:8.0f}")
            results.append({"group": "memory", "corpus_mib": mib, "seconds": run.wall,
                            "peak_rss_mib": run.rss_kib / 1024})

    if "library" in wanted:
        print("\nlibrary path: 8 producers, 200-byte lines, batches of 10,000, striped file, no fsync "
              "(bench/library.py: interleaved rounds against a one-thread join + write loop)")
        for backend in backends:
            done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "library.py"),
                                   "--backend", backend, "--rounds", str(args.rounds), "--json",
                                   "--out", os.path.join(out, "lib.pfw")],
                                  capture_output=True, text=True, check=True)
            report = json.loads(done.stdout)
            rates = report["lines_per_second"]
            loop = rates["loop"]["fastest"]
            print(f"  backend {backend}: {'mode':<16} {'fastest M lines/s':>18} {'median':>8} {'vs loop':>8}")
            for mode, rate in rates.items():
                print(f"  {'':<{len(backend) + 10}}{mode:<16} {rate['fastest'] / 1e6:>18.2f} "
                      f"{rate['median'] / 1e6:>8.2f} {rate['fastest'] / loop:>7.2f}x")
            results.append({"group": "library", **report})

    reported_after = memory_handed_to_host_kib()
    if reported_before is not None and reported_after is not None:
        print(f"\nfree memory handed back to the VM's host during the run (free page reporting):"
              f" {(reported_after - reported_before) / (1 << 20):.1f} GiB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
