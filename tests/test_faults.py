"""Real faults, odd inputs, load and the safety of paths (not injected:
full disks, read-only directories, inputs that change under the merge,
descriptor limits, thousands of producers)."""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
import resource
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pwriter.data.output import is_temporary_name
from pwriter.errors import DataError
from pwriter.faces.corpus import write_corpus
from pwriter.faces.testing import event_counter, read_events

from helpers import BIN, expect_failure, published, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]


@contextlib.contextmanager
def mounted_tmpfs(path, options: str) -> Iterator[str]:
    """A tmpfs of our own at ``path`` (root only: the test is skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# -- inputs that are odd but valid -------------------------------------------------

QUIRKS: dict[str, tuple[bytes, list[bytes]]] = {
    # name: (file content before any compression, the event lines it holds)
    "crlf.pfw": (b'[\r\n{"id":1,"name":"crlf"}\r\n{"id":2,"name":"crlf"}\r\n]\r\n',
                 [b'{"id":1,"name":"crlf"}', b'{"id":2,"name":"crlf"}']),
    "bom.pfw": (b'\xef\xbb\xbf[\n{"id":3,"name":"bom"}\n]\n', [b'{"id":3,"name":"bom"}']),
    "bom-ndjson.pfw": (b'\xef\xbb\xbf{"id":4,"name":"bom-ndjson"}\n', [b'{"id":4,"name":"bom-ndjson"}']),
    "no-final-newline.pfw": (b'{"id":5,"name":"last"}\n{"id":6,"name":"last"}', [b'{"id":5,"name":"last"}',
                                                                                  b'{"id":6,"name":"last"}']),
    "empty.pfw": (b"", []),
    "empty.pfw.gz": (b"", []),
    "brackets-only.pfw": (b"[\n]\n", []),
    "brackets-one-line.pfw.gz": (b"[\n]", []),
    "blank-lines.pfw": (b'\n\n[\n\n  {"id":7,"name":"blank"}\n\n]\n\n', [b'{"id":7,"name":"blank"}']),
    "crlf-bom.pfw.gz": (b'\xef\xbb\xbf[\r\n  {"id":8,"name":"gz"}\r\n]', [b'{"id":8,"name":"gz"}']),
}


def write_quirks(directory) -> collections.Counter[bytes]:
    expected: collections.Counter[bytes] = collections.Counter()
    for name, (text, events) in QUIRKS.items():
        data = gzip.compress(text) if name.endswith(".gz") else text
        (directory / name).write_bytes(data)
        expected.update(events)
    # Several gzip members in one file (as `cat a.gz b.gz` makes).
    members = [b'[\n{"id":9,"name":"m1"}\n', b'{"id":10,"name":"m2"}\n', b"]\n"]
    (directory / "multi-member.pfw.gz").write_bytes(b"".join(gzip.compress(part) for part in members))
    expected.update([b'{"id":9,"name":"m1"}', b'{"id":10,"name":"m2"}'])
    return expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_but_valid_inputs(tmp_path, backend_name: str, layout: str) -> None:
    """CRLF, a UTF-8 BOM, no final newline, empty files, files of only `[`
    and `]`, blank lines and multi-member gzip: every event, nothing else."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected = write_quirks(inputs)
    out = tmp_path / "merged.pfw"
    done = run_cli("merge", "-d", str(inputs), "-o", str(out), "--layout", layout, "--backend", backend_name,
                   "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"] == sum(expected.values()) == 10
    assert collections.Counter(read_events(published(out, layout))) == expected


# -- real faults of the output side -------------------------------------------------


def test_full_disk_publishes_nothing(tmp_path, backend_name: str) -> None:
    """A tmpfs of 4 MiB, a merge of 12 MiB: exit 1 naming the output and
    ENOSPC's message; the directory holds only the file that was there."""
    inputs = tmp_path / "in"
    write_corpus(str(inputs), files=8, events_per_file=5000, seed=3)
    with mounted_tmpfs(tmp_path / "small", "size=4m") as small:
        keep = os.path.join(small, "keep.txt")
        with open(keep, "wb") as handle:
            handle.write(b"mine")
        out = os.path.join(small, "merged.pfw")
        done = run_cli("merge", "-d", str(inputs), "-o", out, "--backend", backend_name)
        expect_failure(done, 1, out, "No space left on device")
        assert os.listdir(small) == ["keep.txt"]
        with open(keep, "rb") as handle:
            assert handle.read() == b"mine"


def test_read_only_output_directory(tmp_path, backend_name: str) -> None:
    """An output directory that cannot be written: exit 1 naming the
    output, nothing created.  As root, a read-only mount (root ignores file
    modes); otherwise a directory of mode 0555."""
    source = tmp_path / "a.pfw"
    source.write_bytes(b'{"id":1}\n')
    if os.geteuid() == 0:
        context: contextlib.AbstractContextManager[str] = mounted_tmpfs(tmp_path / "ro", "ro,size=1m")
        needle = "Read-only file system"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        context, needle = contextlib.nullcontext(str(tmp_path / "ro")), "Permission denied"
    with context as directory:
        out = os.path.join(directory, "merged.pfw")
        done = run_cli("merge", str(source), "-o", out, "--backend", backend_name)
        expect_failure(done, 1, out, needle)
        assert os.listdir(directory) == []


def test_file_size_limit_publishes_nothing(tmp_path, backend_name: str) -> None:
    """RLIMIT_FSIZE below the output's size: the write fails with EFBIG
    (SIGXFSZ ignored, as a batch system's limit would be), exit 1, no output."""
    inputs = tmp_path / "in"
    write_corpus(str(inputs), files=4, events_per_file=5000, seed=4)
    out = tmp_path / "out"
    out.mkdir()

    def limit() -> None:
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", "-d", str(inputs), "-o", str(out / "m.pfw"),
                           "--backend", backend_name], capture_output=True, text=True, preexec_fn=limit,
                          timeout=300)
    expect_failure(done, 1, str(out / "m.pfw"), "File too large")
    assert os.listdir(out) == []


# -- inputs that change under the merge ---------------------------------------------


async def merge_in_process(inputs: list[str], output: str, backend_name: str) -> None:
    from pwriter.plan.settings import load_settings
    from pwriter.service.merge import merge

    await merge(inputs, output, settings=load_settings(backend=backend_name, fsync=False))


@pytest.mark.parametrize("change", ["shrinks", "vanishes-before-open", "vanishes-before-start"])
async def test_input_that_changes_under_the_merge(tmp_path, backend_name: str, change: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An input truncated after the merge measured it, or deleted before it
    is opened: a DataError (exit 1) naming it, and no output."""
    import pwriter.data.inputs

    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=2000, seed=5)
    victim = inputs[2]  # plain (rank_2.pfw)
    out = tmp_path / "out"
    out.mkdir()
    real_reader = pwriter.data.inputs.InputReader

    def reader(path: str, **kwargs: object) -> pwriter.data.inputs.InputReader:
        if path == victim and change == "shrinks":
            os.truncate(path, os.path.getsize(path) // 2)
        elif path == victim and change == "vanishes-before-open":
            os.unlink(path)
        return real_reader(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pwriter.data.inputs, "InputReader", reader)
    if change == "vanishes-before-start":
        os.unlink(victim)
    with pytest.raises(DataError) as raised:
        await merge_in_process(inputs, str(out / "m.pfw"), backend_name)
    message = str(raised.value)
    assert message.startswith(victim) and "\n" not in message
    assert {"shrinks": "shrank while it was read", "vanishes-before-open": "No such file",
            "vanishes-before-start": "vanished"}[change] in message
    assert os.listdir(out) == []


def events_text(first: int, count: int, tag: bytes) -> bytes:
    return b"".join(b'{"id":%d,"name":"%s","pad":"%s"}\n' % (index, tag, b"p" * 60) for index in range(first, count))


@pytest.mark.parametrize("salvage", [False, True], ids=["plain", "salvage"])
@pytest.mark.parametrize("change", ["grows", "rewritten-same-size", "rewritten-shorter", "replaced", "removed"])
@pytest.mark.parametrize("compressed", [False, True], ids=["pfw", "gz"])
async def test_input_that_changes_while_it_is_read(tmp_path, backend_name: str, change: str, salvage: bool,
                                                   compressed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An input changed after it was opened, while it is read: a rank
    still appending (its last line half written when the merge opened it),
    ``cp`` or ``rsync --inplace`` over it (the same size or shorter), a
    restarted rank's new file renamed over it, or its name removed.  Read
    as it was when opened, and checked at its end: an error naming it; with
    --salvage, the lines it had when opened (when they are still whole:
    grown, replaced or removed) with the change reported, and never a mix
    of old and new lines."""
    import pwriter.data.inputs
    from pwriter.plan.settings import load_settings
    from pwriter.service.merge import merge

    directory = tmp_path / "in"
    directory.mkdir()
    other = directory / "other.pfw"
    other.write_bytes(events_text(0, 500, b"other"))
    old = events_text(0, 3000, b"old")
    victim = directory / ("rank.pfw.gz" if compressed else "rank.pfw")
    half_line = b'{"id":3000,"name":"old","pa' if change == "grows" else b""
    victim.write_bytes(gzip.compress(old + half_line, 1) if compressed else old + half_line)
    new = events_text(0, 3000, b"new")  # as long as the old text, line for line
    out = tmp_path / "out"
    out.mkdir()
    real_reader = pwriter.data.inputs.InputReader

    def reader(path: str, **kwargs: object) -> pwriter.data.inputs.InputReader:
        opened = real_reader(path, **kwargs)  # type: ignore[arg-type]
        if path != str(victim):
            return opened
        real_fill = opened.fill
        calls = []

        def fill(*args: object) -> tuple[int, int, bool]:
            result = real_fill(*args)  # type: ignore[arg-type]
            calls.append(1)
            if len(calls) == 1:  # after the first buffer: change it under the reader
                change_victim()
            return result

        opened.fill = fill  # type: ignore[method-assign]
        return opened

    def change_victim() -> None:
        if change == "grows":  # the half line is finished, and more follow
            more = b'd":"x"}\n' + events_text(3001, 3500, b"old")
            with open(victim, "ab") as handle:
                handle.write(gzip.compress(more, 1) if compressed else more)
        elif change.startswith("rewritten"):  # in place, as cp and rsync --inplace write
            text = new if change == "rewritten-same-size" else new[: len(new) // 2]
            data = gzip.compress(text, 1) if compressed else text
            if change == "rewritten-same-size":
                data = data[: victim.stat().st_size].ljust(victim.stat().st_size, b"\n")
            with open(victim, "r+b") as handle:
                handle.write(data)
                handle.truncate()
        elif change == "replaced":  # a restarted rank's file, renamed over the old one
            fresh = directory / "fresh.tmp"
            fresh.write_bytes(gzip.compress(new, 1) if compressed else new)
            os.replace(fresh, victim)
        else:
            os.unlink(victim)

    monkeypatch.setattr(pwriter.data.inputs, "InputReader", reader)
    settings = load_settings(backend=backend_name, stripe_size="64KiB", fsync=False)
    inputs = [str(other), str(victim)]
    whole = change in ("grows", "replaced", "removed")
    if salvage and whole:
        result = await merge(inputs, str(out / "m.pfw"), settings=settings, salvage=True)
        kept = read_events(out / "m.pfw")
        assert collections.Counter(kept) == collections.Counter(old.splitlines() + events_text(0, 500, b"other")
                                                                .splitlines())
        ((path, what, dropped),) = result.salvaged
        assert path == str(victim)
        assert {"grows": "grew from", "replaced": "replaced", "removed": "removed"}[change] in what
        assert dropped == (1 if change == "grows" else 0)  # the half line it had when opened
        return
    with pytest.raises(DataError) as raised:
        await merge(inputs, str(out / "m.pfw"), settings=settings, salvage=salvage)
    message = str(raised.value)
    assert message.startswith(str(victim)) and "\n" not in message, message
    assert "changed while it was read" in message, message
    assert ("--salvage keeps the lines it had when opened" in message) == whole, message
    assert raised.value.exit_code == 1
    assert os.listdir(out) == []


# -- load ----------------------------------------------------------------------------


def test_running_out_of_descriptors_is_one_line_and_leaves_nothing(tmp_path, backend_name: str) -> None:
    """Issue 19, case 24: 246 shards under `ulimit -n 256` printed a 41-line traceback (the descriptors ran
    out where no error of ours was expected: importing a module).  Wherever they run out, a sweep of shard
    counts around the limit: one error line, exit 1 or 2, nothing left behind."""
    inputs = write_corpus(str(tmp_path / "in"), files=4, events_per_file=50)
    out = tmp_path / "out"
    out.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    for lanes in (245, 246, 248):
        done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", str(out / "m.pfw"),
                               "--layout", "sharded", "--lanes", str(lanes), "--stripe-size", "64KiB",
                               "--backend", backend_name], capture_output=True, text=True, preexec_fn=limit,
                              env={**os.environ, "PWRITER_MEMORY_BUDGET": "1GiB"}, timeout=60)
        if done.returncode == 0:  # (this many shards still fit)
            for name in os.listdir(out):
                os.unlink(out / name)
            continue
        expect_failure(done, 1, "many open files")
        assert "Traceback" not in done.stderr
        assert os.listdir(out) == [], lanes


def test_ten_thousand_inputs_with_256_descriptors(tmp_path, backend_name: str) -> None:
    """10,000 inputs under `ulimit -n 256`: inputs are opened a few at a time."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for rank in range(10_000):
        (inputs / f"rank_{rank}.pfw").write_bytes(b'{"rank":%d,"name":"a"}\n{"rank":%d,"name":"b"}\n' % (rank, rank))
    out = tmp_path / "merged.pfw"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", "-d", str(inputs), "-o", str(out), "--backend",
                           backend_name, "--json"], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inputs"] == 10_000
    events = read_events(out)
    assert len(events) == 20_000 and len(set(events)) == 20_000


PRODUCERS_SCRIPT = r"""
import collections, resource, sys, trio
from pwriter.plan.settings import load_settings
from pwriter.faces.testing import read_events
from pwriter.service.writer import open_writer

producers, lines_each, backend, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
pad = b"x" * 150

async def main():
    settings = load_settings(backend=backend, fsync=False, stripe_size="1MiB", buffers_per_lane=4)
    async with open_writer(target, settings=settings, producers=producers) as writer:
        async def produce(number):
            async with writer.producer() as producer:
                for line in range(lines_each):
                    await producer.send_line(b'{"p":%d,"l":%d,"pad":"%s"}' % (number, line, pad))
        async with trio.open_nursery() as nursery:
            for number in range(producers):
                nursery.start_soon(produce, number)
    return writer.sizing

sizing = trio.run(main)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
events = read_events(target) if len(sys.argv) > 5 else []
print(peak, len(events), len(set(events)), sizing.buffers, file=sys.stdout)
"""


def test_a_thousand_producers_with_a_fixed_pool(tmp_path, backend_name: str) -> None:
    """1,000 producer tasks through one writer with a fixed buffer pool:
    every line arrives once, and peak memory grows with the producers (a
    batch of at most 64 KiB each, plus its line objects) but not with the
    volume written (80 MB and 200 MB give the same peak)."""
    script = tmp_path / "producers.py"
    script.write_text(PRODUCERS_SCRIPT)

    def peak_rss(producers: int, lines_each: int, check: bool = False) -> int:
        done = subprocess.run([sys.executable, str(script), str(producers), str(lines_each), backend_name,
                               str(tmp_path / f"out_{producers}_{lines_each}.pfw"), *(["check"] if check else [])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        peak, events, distinct, _ = (int(field) for field in done.stdout.split())
        if check:
            assert events == distinct == producers * lines_each
        return peak

    few = peak_rss(10, 1000)
    lighter = peak_rss(1000, 400)
    heavier = peak_rss(1000, 1000, check=True)
    # Bounds in bytes, not timings.  Measured: 47, 130 and 140 MB.
    assert heavier - few < 1000 * (128 << 10), (few, heavier)
    assert heavier - lighter < 32 << 20, (lighter, heavier)


# -- safety of paths -----------------------------------------------------------------


def test_replaced_output_keeps_its_permissions(tmp_path, backend_name: str) -> None:
    """With --force, the new file has the mode of the file it replaces (the
    temporary is created with it, so it is never more open than the target)."""
    source = tmp_path / "a.pfw"
    source.write_bytes(b'{"id":1}\n')
    out = tmp_path / "m.pfw"
    out.write_bytes(b"old")
    out.chmod(0o640)
    done = run_cli("merge", str(source), "-o", str(out), "--force", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    assert read_events(out) == [b'{"id":1}']
    fresh = tmp_path / "fresh.pfw"
    umask = os.umask(0)
    os.umask(umask)
    assert run_cli("merge", str(source), "-o", str(fresh)).returncode == 0
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o666 & ~umask


async def test_a_symlink_planted_at_the_temporary_name_is_never_followed(tmp_path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who guesses the next temporary name and plants a symlink
    there: O_EXCL refuses it, another name is drawn, the victim is untouched."""
    import pwriter.data.output
    from pwriter.plan.settings import load_settings
    from pwriter.service.writer import open_writer

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    draws = iter(["guessed0", "guessed0"])
    real = pwriter.data.output.secrets.token_hex

    def token_hex(size: int) -> str:
        return next(draws, None) or real(size)

    monkeypatch.setattr(pwriter.data.output.secrets, "token_hex", token_hex)
    target = tmp_path / "m.pfw"
    planted = tmp_path / f".m.pfw.pwriter-{os.uname().nodename}-{os.getpid()}-guessed0.tmp"
    planted.symlink_to(victim)
    async with open_writer(str(target), settings=load_settings(backend="threads", fsync=False)) as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"id":1}')
    assert victim.read_bytes() == b"precious"
    assert read_events(target) == [b'{"id":1}']
    assert os.path.islink(planted)


def test_temporaries_of_dead_processes_are_removed_and_never_read(tmp_path) -> None:
    """What SIGKILL leaves: `.merged.pfw.pwriter-<host>-<pid>-<random>.tmp`.
    `merge -d` does not read it; the next merge to that name removes it when
    its process is gone; a live process's temporary and another host's stay."""
    inputs = tmp_path / "in"
    write_corpus(str(inputs), files=3, events_per_file=20)
    host = os.uname().nodename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = inputs / f".merged.pfw.pwriter-{host}-{dead}-0badc0de.tmp"
    live = inputs / f".merged.pfw.pwriter-{host}-{os.getpid()}-0badc0de.tmp"
    other_host = inputs / f".merged.pfw.pwriter-{host}x-{dead}-0badc0de.tmp"
    for path in (stale, live, other_host):
        path.write_bytes(b'{"half":')
    out = inputs / "merged.pfw"
    done = run_cli("merge", "-d", str(inputs), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert collections.Counter(read_events(out)) == event_counter(str(inputs / f"rank_{n}.pfw{'.gz' * (n % 2)}")
                                                                  for n in range(3))
    assert not stale.exists() and live.exists() and other_host.exists()
    assert sorted(name for name in os.listdir(inputs) if is_temporary_name(name)) == sorted(
        [live.name, other_host.name])


def test_what_a_killed_run_left_of_any_shard_count_or_layout_is_removed(tmp_path) -> None:
    """Issue 19, case 16: the temporaries of every file of an output's set
    (shards of any count or generation, the manifest, the member index) that
    a dead process of this host left are removed by the next merge to that
    name, whatever its layout; so are the shards a dead run's manifest
    temporary lists and the current manifest does not.  A trace merely named
    like a shard is an input like any other, and stays."""
    inputs = tmp_path / "in"
    corpus = write_corpus(str(inputs), files=3, events_per_file=40, seed=16)
    host = os.uname().nodename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [inputs / f".{name}.pwriter-{host}-{dead}-0badc0de.tmp"
             for name in ("merged.shard_0007.pfw", "merged.g3.shard_001.pfw", "merged.pfw.shards",
                          "merged.pfw.members.json", "merged.pfw")]
    for path in stale:
        path.write_bytes(b'{"half":')
    stale[2].write_bytes(b"merged.g3.shard_000.pfw\nmerged.g3.shard_001.pfw\nrank_0.pfw\n")
    leftover = inputs / "merged.g3.shard_000.pfw"  # renamed into place by the killed run, named by no manifest
    leftover.write_bytes(b'[\n{"id":1,"name":"the killed run\'s"}\n')
    lookalike = inputs / "merged.shard_005.pfw"  # the user's own trace
    lookalike.write_bytes(b'{"id":2,"name":"mine"}\n')
    others = [inputs / f".other.pfw.pwriter-{host}-{dead}-0badc0de.tmp",
              inputs / f".merged.shard_000.pfw.pwriter-{host}-{os.getpid()}-0badc0de.tmp"]  # a live process's
    for path in others:
        path.write_bytes(b'{"half":')
    out = inputs / "merged.pfw"
    done = run_cli("merge", "-d", str(inputs), "-o", str(out), "--layout", "striped", "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert collections.Counter(read_events(out)) == event_counter([*corpus, str(lookalike)])
    assert sorted(os.listdir(inputs)) == sorted([out.name, lookalike.name, *(os.path.basename(p) for p in corpus),
                                                 *(path.name for path in others)])
    # A shard that a dead run's manifest lists, given as an input: it stays, and is read.
    stale[2].write_bytes(b"merged.g3.shard_000.pfw\n")
    leftover.write_bytes(b'[\n{"id":1,"name":"the killed run\'s"}\n')
    done = run_cli("merge", str(leftover), "-o", str(out), "--force", "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert leftover.exists() and not stale[2].exists()
    assert read_events(out) == [b'{"id":1,"name":"the killed run\'s"}']
