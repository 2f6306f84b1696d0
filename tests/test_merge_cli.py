"""``pwriter merge`` as a user runs it: a mixed corpus, every layout, every
backend, checked against the inputs and by the field's own C++ readers."""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
import pathlib
import re
import socket
import subprocess
import zlib

import pytest
import trio

from pwriter.data.backends import MECHANISMS
from pwriter.data.output import is_temporary_name
from pwriter.faces.corpus import write_corpus
from pwriter.faces.testing import event_counter, read_events, read_text

from helpers import BIN, dftracer_tool, expect_failure, fake_ranks, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]
JSON_FIELDS = {"outputs", "layout", "backend", "fs_kind", "stripe_size", "lanes", "inputs", "events",
               "bytes_written", "seconds"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 files of our own (gzip and plain, array and NDJSON, indented, no
    final newline) plus 6 ranks made by dftracer_gen_fake_trace."""
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(str(directory), files=200, events_per_file=120, seed=7)
    fake = directory / "fake"
    fake_ranks(fake, ranks=6, epochs=1, steps=20)
    for path in fake.glob("*.pfw.gz"):
        path.rename(directory / f"fake_{path.name}")
    return str(directory)


def inputs_of(corpus: str) -> list[str]:
    return [os.path.join(corpus, name) for name in os.listdir(corpus) if name.endswith((".pfw", ".pfw.gz"))]


def gzip_copy(text: bytes, directory, name: str = "merged.pfw.gz") -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(text, compresslevel=1))
    return path


def event_count(directory) -> int:
    done = subprocess.run([dftracer_tool("dftracer_event_count"), "-d", str(directory)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def inputs_event_count(corpus: str, tmp_path_factory: pytest.TempPathFactory) -> int:
    """dftracer_event_count over gzip copies of every input (it reads gzip only)."""
    directory = tmp_path_factory.mktemp("inputs-gz")
    for index, path in enumerate(inputs_of(corpus)):
        gzip_copy(read_text(path), directory, f"in_{index}.pfw.gz")
    return event_count(directory)


def no_leftovers(directory) -> bool:
    return not any(is_temporary_name(name) for name in os.listdir(directory))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_every_layout(corpus: str, inputs_event_count: int, tmp_path, backend_name: str, layout: str) -> None:
    out = tmp_path / "merged.pfw"
    done = run_cli("merge", "-d", corpus, "-o", str(out), "--layout", layout, "--backend", backend_name,
                   "--stripe-size", "64KiB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert JSON_FIELDS <= set(report)
    assert (report["layout"], report["backend"], report["inputs"]) == (layout, backend_name, 206)
    assert report["stripe_size"] == 65536 and report["fs_kind"] in ("local", "tmpfs")
    # How the writes went: pwritev from the readers' threads, whichever backend (io_uring: its fsyncs).
    assert report["io"]["mechanism"] == MECHANISMS[backend_name]
    assert report["io"]["mechanism"].startswith("pwritev from the maker threads")
    if backend_name == "io_uring":
        assert report["io"]["submissions"] >= report["io"]["enter_calls"] > 0

    whole = str(out) + ".shards" if layout == "sharded" else str(out)
    assert [os.path.abspath(p) for p in report["outputs"]] == (
        [os.path.join(tmp_path, os.path.basename(p)) for p in report["outputs"]])
    text = read_text(whole)
    assert text.startswith(b"[\n") and text.endswith(b"]\n")
    assert b"\x00" not in text
    # Lines are never split or glued: every line is a wrapper, padding, or an event.
    for line in text.split(b"\n")[:-1]:
        stripped = line.strip()
        assert stripped in (b"[", b"]", b"") or (line.startswith(b"{") and line.endswith(b"}")), line[:80]
    expected = event_counter(inputs_of(corpus))
    assert collections.Counter(read_events(whole)) == expected
    assert report["events"] == sum(expected.values())
    assert report["bytes_written"] == sum(os.path.getsize(os.path.join(tmp_path, os.path.basename(p)))
                                          for p in report["outputs"])
    assert no_leftovers(tmp_path)

    # The field's readers accept a gzipped copy and count the same events.
    copy = gzip_copy(text, tmp_path / "gz")
    validate = subprocess.run([dftracer_tool("dftracer_validate"), "--files", copy, "--log-level", "off"],
                              capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "0 failed" in validate.stdout
    assert event_count(tmp_path / "gz") == inputs_event_count


def test_merge_lines_of_one_input_stay_in_order(corpus: str, tmp_path) -> None:
    out = tmp_path / "merged.pfw"
    assert run_cli("merge", "-d", corpus, "-o", str(out), "--stripe-size", "64KiB").returncode == 0
    merged = read_events(out)
    for path in inputs_of(corpus)[:20]:
        mine = read_events(path)
        positions = {line: index for index, line in enumerate(merged)}
        if len(set(mine)) == len(mine):
            assert [positions[line] for line in mine] == sorted(positions[line] for line in mine)


def test_merge_explicit_files_and_human_summary(corpus: str, tmp_path) -> None:
    chosen = sorted(inputs_of(corpus))[:5]
    out = tmp_path / "five.pfw"
    done = run_cli("merge", *chosen, "-o", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged 5 inputs")
    assert collections.Counter(read_events(out)) == event_counter(chosen)


def test_merge_into_the_directory_it_reads_can_be_repeated(tmp_path) -> None:
    write_corpus(str(tmp_path), files=4, events_per_file=10)
    out = tmp_path / "all.pfw"
    assert run_cli("merge", "-d", str(tmp_path), "-o", str(out)).returncode == 0
    first = read_events(out)
    again = run_cli("merge", "-d", str(tmp_path), "-o", str(out), "--force")
    assert again.returncode == 0, again.stderr
    assert read_events(out) == first or collections.Counter(read_events(out)) == collections.Counter(first)
    assert len(first) == 40


def test_every_directory_given_with_d_counts(tmp_path) -> None:
    """Issue 19, case 1: argparse kept the last -d only (903 of 80,903 events), for merge and verify alike."""
    first, second = tmp_path / "A", tmp_path / "B"
    write_corpus(str(first), files=4, events_per_file=30, seed=1)
    write_corpus(str(second), files=2, events_per_file=7, seed=2)
    out = tmp_path / "out.pfw"
    done = run_cli("merge", "-d", str(first), "-d", str(second), "-o", str(out), "--verify", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["inputs"], report["events"]) == (6, 4 * 30 + 2 * 7)
    assert collections.Counter(read_events(out)) == event_counter(inputs_of(str(first)) + inputs_of(str(second)))
    checked = run_cli("verify", str(out), "-d", str(first), "-d", str(second), "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["input_events"] == 4 * 30 + 2 * 7
    partial = run_cli("verify", str(out), "-d", str(second))  # one directory is not all the inputs
    assert partial.returncode == 1


def test_gen_corpus_and_info(tmp_path) -> None:
    done = run_cli("gen-corpus", str(tmp_path / "c"), "--files", "3", "--events", "5")
    assert done.returncode == 0
    assert sorted(os.listdir(tmp_path / "c")) == ["rank_0.pfw", "rank_1.pfw.gz", "rank_2.pfw"]
    info = run_cli("info", str(tmp_path), "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["layout"] in ("striped", "padded-striped", "sharded")
    assert report["backends"]["threads"]["available"] is True
    assert report["backend"] == ("io_uring" if report["backends"]["io_uring"]["available"] else "threads")
    assert report["reasons"]
    assert 4096 <= report["write_call_size"] <= report["stripe_size"]
    assert report["backends"]["threads"]["mechanism"] == MECHANISMS["threads"]
    assert report["backends"]["io_uring"]["mechanism"] == MECHANISMS["io_uring"]
    text = run_cli("info", str(tmp_path))
    assert "filesystem:" in text.stdout and "threads: available" in text.stdout
    assert f"({MECHANISMS['io_uring']})" in text.stdout


def test_gen_corpus_never_overwrites_and_refuses_counts_below_one(tmp_path) -> None:
    """Issue 19, case 23: gen-corpus overwrote rank_N files already in DIR (the field's fake-trace tool uses the
    same names) and took negative counts."""
    directory = tmp_path / "c"
    directory.mkdir()
    theirs = directory / "rank_1.pfw.gz"
    theirs.write_bytes(b"a trace of a real run")
    done = run_cli("gen-corpus", str(directory), "--files", "3", "--events", "5")
    expect_failure(done, 2, "rank_1.pfw.gz", "already there", "--force")
    assert os.listdir(directory) == ["rank_1.pfw.gz"] and theirs.read_bytes() == b"a trace of a real run"
    forced = run_cli("gen-corpus", str(directory), "--files", "3", "--events", "5", "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(read_events(theirs)) == 5
    for option in (["--files", "-2"], ["--files", "0"], ["--events", "-1"], ["--events", "0"]):
        refused = run_cli("gen-corpus", str(tmp_path / "new"), *option)
        expect_failure(refused, 2, option[0], "at least 1")
        assert not (tmp_path / "new").exists()


# -- bad input: one line naming the file, the documented exit code, no output --


def good_trace(path) -> str:
    path.write_bytes(b'[\n{"id":1,"name":"read"}\n]\n')
    return str(path)


def bad_inputs(tmp_path) -> dict[str, tuple[bytes, str]]:
    good = gzip.compress(b"[\n" + b'{"id":1,"name":"read","pad":"' + b"x" * 5000 + b'"}\n' * 200 + b"]\n")
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\xff" * 64
    return {
        "binary.pfw": (bytes(range(256)) * 64, "not a trace"),
        "nul.pfw": (b'{"id":1}\n' + b"\x00" * 300 + b"\n", "NUL"),
        "truncated.pfw.gz": (good[: len(good) // 2], "truncated"),
        "corrupt.pfw.gz": (bytes(corrupt), "corrupt gzip"),
        "badmagic.pfw.gz": (b"\x1f\x8b\x09" + b"\x00" * 40, "corrupt gzip"),
    }


@pytest.mark.parametrize("name", ["binary.pfw", "nul.pfw", "truncated.pfw.gz", "corrupt.pfw.gz", "badmagic.pfw.gz"])
def test_damaged_input_exit_1_no_output(tmp_path, backend_name: str, name: str) -> None:
    data, needle = bad_inputs(tmp_path)[name]
    bad = tmp_path / name
    bad.write_bytes(data)
    good = good_trace(tmp_path / "good.pfw")
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    done = run_cli("merge", good, str(bad), "-o", str(out), "--backend", backend_name)
    expect_failure(done, 1, str(bad), needle)
    assert os.listdir(out.parent) == []


def test_missing_input(tmp_path) -> None:
    out = tmp_path / "merged.pfw"
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), str(tmp_path / "nope.pfw"), "-o", str(out))
    expect_failure(done, 2, "nope.pfw", "does not exist")
    assert not out.exists()


def test_directory_given_as_input(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    done = run_cli("merge", str(tmp_path / "sub"), "-o", str(tmp_path / "m.pfw"))
    expect_failure(done, 2, "sub", "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_unreadable_input(tmp_path) -> None:
    path = tmp_path / "secret.pfw"
    good_trace(path)
    path.chmod(0)
    done = run_cli("merge", str(path), "-o", str(tmp_path / "m.pfw"))
    expect_failure(done, 2, "secret.pfw", "permission denied")


def test_directory_without_traces(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    done = run_cli("merge", "-d", str(tmp_path / "empty"), "-o", str(tmp_path / "m.pfw"))
    expect_failure(done, 2, "empty", "no *.pfw")
    assert not (tmp_path / "m.pfw").exists()


def test_not_a_directory(tmp_path) -> None:
    done = run_cli("merge", "-d", good_trace(tmp_path / "a.pfw"), "-o", str(tmp_path / "m.pfw"))
    expect_failure(done, 2, "a.pfw", "not a directory")


def test_output_exists(tmp_path) -> None:
    out = tmp_path / "m.pfw"
    out.write_bytes(b"keep me")
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), "-o", str(out))
    expect_failure(done, 2, "m.pfw", "exists", "--force")
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_output_is_an_input(tmp_path, how: str) -> None:
    source = good_trace(tmp_path / "a.pfw")
    out = tmp_path / "out.pfw"
    if how == "same":
        out = tmp_path / "a.pfw"
    elif how == "symlink":
        out.symlink_to(source)
    else:
        os.link(source, out)
    before = (tmp_path / "a.pfw").read_bytes()
    done = run_cli("merge", source, "-o", str(out), "--force")
    expect_failure(done, 2, "is the input")
    assert (tmp_path / "a.pfw").read_bytes() == before


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_output_that_is_another_name_of_a_directory_input_is_refused(tmp_path, how: str) -> None:
    """Issue 19, case 2: -d skipped every entry with the output's inode as "the output itself", so a hard
    link or symlink to a trace made the merge drop that trace (exit 0, 2 inputs of 3, even with --verify).
    Only the entry that is the output's own name is skipped; another name of it is an input, refused."""
    traces = tmp_path / "traces"
    write_corpus(str(traces), files=3, events_per_file=5)
    out = traces / "out.pfw"
    if how == "symlink":
        out.symlink_to("rank_1.pfw.gz")
    else:
        os.link(traces / "rank_1.pfw.gz", out)
    before = (traces / "rank_1.pfw.gz").read_bytes()
    done = run_cli("merge", "-d", str(traces), "-o", str(out), "--force", "--verify")
    expect_failure(done, 2, "out.pfw", "the output is the input", "rank_1.pfw.gz")
    assert (traces / "rank_1.pfw.gz").read_bytes() == before
    assert os.path.samefile(out, traces / "rank_1.pfw.gz")  # the name is untouched


def test_missing_output_directory(tmp_path) -> None:
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), "-o", str(tmp_path / "no" / "m.pfw"))
    expect_failure(done, 2, "m.pfw", "does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--stripe-size", "4XB"], "stripe_size"),
        (["--lanes", "zero"], "lanes"),
        (["--layout", "diagonal"], "--layout"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_option(tmp_path, option: list[str], needle: str) -> None:
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), "-o", str(tmp_path / "m.pfw"), *option)
    expect_failure(done, 2, needle)
    assert not (tmp_path / "m.pfw").exists()


@pytest.mark.parametrize(("variable", "value", "field"), [
    ("PWRITER_STRIPE_SIZE", "huge", "stripe_size"),
    ("PWRITER_WRITE_CALL_SIZE", "500000", "write_call_size"),  # not a multiple of 4096
])
def test_bad_environment_setting(tmp_path, variable: str, value: str, field: str) -> None:
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), "-o", str(tmp_path / "m.pfw"), env={variable: value})
    expect_failure(done, 2, field)
    assert not (tmp_path / "m.pfw").exists()


def test_error_line_has_no_traceback(tmp_path) -> None:
    bad = tmp_path / "bin.pfw"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    done = run_cli("merge", str(bad), "-o", str(tmp_path / "m.pfw"))
    assert "Traceback" not in done.stderr
    assert re.match(r"pwriter: error: .*bin\.pfw: not a trace: line 1 ", done.stderr)


def test_control_characters_in_names_are_shown_escaped(tmp_path) -> None:
    """Issue 19, case 24: a name with a newline, CR or ESC reached the terminal raw (an error line broken in
    two, colours switched on).  Error lines, warnings and reports show such names escaped."""
    bad = tmp_path / "two\nlines\x1b[31m.pfw"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    done = run_cli("merge", str(bad), "-o", str(tmp_path / "m.pfw"))
    expect_failure(done, 1, "two\\nlines\\x1b[31m.pfw: not a trace")
    assert "\x1b" not in done.stderr and len(done.stderr.splitlines()) == 1
    cut = tmp_path / "cut\r.pfw"
    cut.write_bytes(b'{"a":1}\n{"a":2')
    out = tmp_path / "out\n.pfw"
    merged = run_cli("merge", str(cut), "-o", str(out), "--salvage")
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr.startswith(f"pwriter: warning: {tmp_path}/cut\\r.pfw: salvaged") and "\r" not in merged.stderr
    assert len(merged.stdout.splitlines()) == 1 and f"into {tmp_path}/out\\n.pfw [" in merged.stdout
    checked = run_cli("verify", str(out), str(cut), "--salvage")
    assert checked.returncode == 0 and checked.stdout.startswith(f"verified: {tmp_path}/out\\n.pfw holds")
    assert json.loads(run_cli("merge", str(cut), "-o", str(out), "--salvage", "--force", "--json").stdout)[
        "outputs"] == [str(out)]  # (JSON escapes on its own, and gives the name back exactly)


def test_each_line_on_stderr_is_one_write(tmp_path) -> None:
    """Issue 19, case 24: under mpiexec two ranks' error lines came out glued, each line being written in
    two calls (the text, then the newline).  stderr is a datagram socket here: one message per write."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    cut = tmp_path / "cut.pfw"
    cut.write_bytes(b'{"a":1}\n{"a":2')
    with ours, theirs:
        for command in (["merge", str(tmp_path / "nothing.pfw"), "-o", str(tmp_path / "m.pfw")],
                        ["merge", str(cut), str(cut.with_suffix(".gz")), "-o", str(tmp_path / "m.pfw")],
                        ["merge", str(cut), "-o", str(tmp_path / "s.pfw"), "--salvage"]):
            subprocess.run([os.path.join(BIN, "pwriter"), *command], stdout=subprocess.DEVNULL,
                           stderr=theirs.fileno(), timeout=60)
        ours.setblocking(False)
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(ours.recv(1 << 16))
    assert len(messages) == 3, messages
    assert all(message.startswith(b"pwriter: ") and message.count(b"\n") == 1 and message.endswith(b"\n")
               for message in messages), messages


def test_a_reader_of_stdout_that_goes_away_is_quiet(tmp_path) -> None:
    """Issue 19, case 24: ``pwriter info . | head`` printed BrokenPipeError tracebacks.  stdout's reader
    is gone before pwriter writes: nothing on stderr, exit 1 (Python's convention), but for a merge, whose
    output is published then: its exit code stays 0 (exit 1 would say that nothing was published)."""
    write_corpus(str(tmp_path / "in"), files=2, events_per_file=5)
    for code, command in ((1, ["info", str(tmp_path)]), (1, ["info", str(tmp_path), "--json"]),
                          (0, ["merge", "-d", str(tmp_path / "in"), "-o", str(tmp_path / "m.pfw"), "--json"])):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run([os.path.join(BIN, "pwriter"), *command], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (code, ""), command
    assert read_events(tmp_path / "m.pfw")


SIGNALS = [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]


def merge_of_a_fifo(tmp_path, backend_name: str) -> tuple[subprocess.Popen[str], pathlib.Path, pathlib.Path]:
    """A ``pwriter merge`` whose one input is a FIFO the test feeds (so the
    merge is certainly running when the test acts): the process, the FIFO
    and the output (alone in a directory of its own)."""
    import signal

    fifo = tmp_path / "live.pfw"
    os.mkfifo(fifo)
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    # A test run started in the background (``cmd &`` without job control)
    # inherits SIGINT ignored, and so would pwriter, as any program does:
    # give the child the default disposition, as a terminal would.
    process = subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", str(fifo), "-o", str(out),
                                "--backend", backend_name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, fifo, out


@pytest.mark.parametrize(("signame", "code", "said"), SIGNALS)
def test_interrupt_exits_130_and_publishes_nothing(tmp_path, backend_name: str, signame: str, code: int,
                                                   said: str) -> None:
    """Ctrl-C (or SIGTERM) in the middle of a merge: exit 130 (143), no
    output, no temporaries.

    The input is a FIFO that the test feeds, so the merge is certainly
    running (and has its temporary file) when the signal arrives.
    """
    import signal
    import time

    process, fifo, out = merge_of_a_fifo(tmp_path, backend_name)
    try:
        with open(fifo, "wb") as feed:
            feed.write(b'[\n' + b'{"id":1,"name":"read"}\n' * 1000)
            feed.flush()
            deadline = time.monotonic() + 30
            while not os.listdir(out.parent) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.listdir(out.parent), "the merge never started"
            process.send_signal(getattr(signal, signame))
            time.sleep(0.3)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stderr.strip() == f"pwriter: {said}"
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("feed", ["never-opened", "silent", "trickling"])
@pytest.mark.parametrize(("signame", "code", "said"), SIGNALS)
def test_a_signal_ends_a_merge_blocked_on_a_fifo(tmp_path, backend_name: str, feed: str, signame: str, code: int,
                                                 said: str) -> None:
    """Ctrl-C or SIGTERM while the reader waits on a FIFO that no writer
    ever opens, that a writer opened but stays silent, or that trickles a
    line now and then: the merge ends (130 / 143), and leaves nothing.

    The readers run in threads, which a cancellation cannot stop
    while they are blocked in ``open`` or ``read``: a FIFO is opened and
    read without blocking, waiting in trio.  (The bound below only says
    "did not hang": it once ran on for as long as the FIFO stayed quiet.)
    """
    import signal
    import threading
    import time

    process, fifo, out = merge_of_a_fifo(tmp_path, backend_name)
    stop = threading.Event()

    def write() -> None:  # the writer's side of the FIFO, until the test ends (or the reader goes)
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb", buffering=0) as pipe:
            while not stop.is_set():
                if feed == "trickling":
                    pipe.write(b'{"id":1,"name":"trickle"}\n')
                stop.wait(0.05)

    writer = threading.Thread(target=write, daemon=True)
    try:
        if feed != "never-opened":
            writer.start()
        deadline = time.monotonic() + 30
        while not os.listdir(out.parent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.listdir(out.parent), "the merge never started"
        time.sleep(0.1)  # (the reader is waiting on the FIFO by now, or soon: either way it must end)
        process.send_signal(getattr(signal, signame))
        try:
            stdout, stderr = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the merge still ran 5 s after {signame}") from None
    finally:
        process.kill()
        process.wait()
        stop.set()
        if writer.is_alive():
            writer.join(5)
    assert process.returncode == code, stderr
    assert stderr.strip() == f"pwriter: {said}"
    assert os.listdir(out.parent) == []


def test_sigterm_right_after_the_temporary_is_created_leaves_nothing(tmp_path) -> None:
    """SIGTERM arriving at the very moment the output's temporary exists
    (sent by the process to itself from inside the create, so the moment is
    exact): the receiver was already in place, the merge ends with 143 and
    the temporary is removed.  (Started with ``start_soon``, the receiver
    was not yet listening: the default action killed the process, and the
    temporary stayed.)"""
    import sys

    good = tmp_path / "a.pfw"
    good.write_bytes(b'{"id":1}\n' * 100)
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    script = (
        "import os, signal, sys\n"
        "import pwriter.data.output\n"
        "real = pwriter.data.output.OutputSet.create\n"
        "def create(self, *args, **kwargs):\n"
        "    fds = real(self, *args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return fds\n"
        "pwriter.data.output.OutputSet.create = create\n"
        "from pwriter.faces.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, "merge", str(good), "-o", str(out)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.strip() == "pwriter: terminated"
    assert os.listdir(out.parent) == []


SIGNAL_AT = """
import os, signal, sys
import pwriter.data.output, pwriter.service.verify
where, number = sys.argv[1], getattr(signal, sys.argv[2])
def signalling(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), number)
        return result
    return call
if where == "create":
    pwriter.data.output.OutputSet.create = signalling(pwriter.data.output.OutputSet.create)
elif where == "publish":
    pwriter.data.output.OutputSet.publish = signalling(pwriter.data.output.OutputSet.publish)
else:
    pwriter.service.verify.verify = signalling(pwriter.service.verify.verify)
from pwriter.faces.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("number", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["create", "publish", "verify"])
def test_a_signal_before_publishing_publishes_nothing_and_after_changes_nothing(tmp_path, where: str,
                                                                                number: str) -> None:
    """Exit 130 or 143 means that nothing was published.  A signal that lands
    while the output is being written ends the merge that way; one that
    lands once it is published (before the report, even as the merge returns:
    a KeyboardInterrupt once left exit 130 beside a published output) changes
    nothing: exit 0, the output whole; during ``--verify`` it ends the
    verification, which is an error of its own (exit 1, naming the output as
    published)."""
    import signal
    import sys

    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=200, seed=5)
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, number, "merge", *inputs, "-o", str(out),
                           "--no-fsync", *(["--verify"] if where == "verify" else [])],
                          capture_output=True, text=True, timeout=60)
    if where == "create":
        assert done.returncode == 128 + getattr(signal, number), done.stderr
        assert done.stderr.strip() == ("pwriter: interrupted" if number == "SIGINT" else "pwriter: terminated")
        assert os.listdir(out.parent) == []
        return
    assert event_counter([str(out)]) == event_counter(inputs)
    assert sorted(os.listdir(out.parent)) == ["merged.pfw"]
    if where == "publish":
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("merged 3 inputs")
    else:
        expect_failure(done, 1, f"{out}: published, but --verify was "
                       + ("interrupted" if number == "SIGINT" else "terminated"))


def test_main_called_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path) -> None:
    """A merge ignores SIGINT and SIGTERM once published, to its process's
    exit; ``pwriter.faces.cli.main(argv)`` called from Python (a test, a pipeline
    step) must not leave them ignored: every child process would inherit the
    ignored SIGINT (a program's Ctrl-C then did nothing)."""
    import signal

    from pwriter.faces.cli import main

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    inputs = write_corpus(str(tmp_path / "in"), files=2, events_per_file=50, seed=2)
    assert main(["merge", *inputs, "-o", str(tmp_path / "m.pfw"), "--no-fsync"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert event_counter([str(tmp_path / "m.pfw")]) == event_counter(inputs)


def test_input_from_a_pipe(tmp_path) -> None:
    fifo = tmp_path / "pipe.pfw"
    os.mkfifo(fifo)
    out = tmp_path / "m.pfw"
    from helpers import BIN

    process = subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", str(fifo), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb") as feed:
        feed.write(gzip.compress(b'[\n{"id":1}\n{"id":2}\n]\n'))
    process.communicate(timeout=60)
    assert process.returncode == 0
    assert read_events(out) == [b'{"id":1}', b'{"id":2}']


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_merge_lines_of_every_length_through_small_buffers(tmp_path, backend_name: str, layout: str) -> None:
    """Lines shorter and longer than a buffer, buffer-sized files, missing
    final newlines, gzip and plain: the in-place reader keeps every event."""
    import random

    from pwriter.plan.settings import load_settings
    from pwriter.service.merge import merge

    rng = random.Random(5)
    paths = []
    for index in range(12):
        lines = []
        for n in range(rng.randint(0, 60)):
            size = rng.choice([10, 200, 5000, 40_000, 70_000, 200_000]) if n % 7 == 0 else rng.randint(5, 400)
            lines.append(b'{"f":%d,"n":%d,"p":"%s"}' % (index, n, b"q" * size))
        text = b"\n".join(lines)
        if index % 3 == 0:
            text = b"[\n" + text + b"\n]"
        elif index % 3 == 1 and lines:
            text += b"\n"
        path = tmp_path / (f"in_{index}.pfw" + (".gz" if index % 2 else ""))
        path.write_bytes(gzip.compress(text) if index % 2 else text)
        paths.append(str(path))
    out = tmp_path / "out" / "merged.pfw"
    out.parent.mkdir()
    settings = load_settings(backend=backend_name, layout=layout, stripe_size="64KiB", fsync=False, lanes=2)
    result = await merge(paths, str(out), settings=settings, readers=3)
    whole = str(out) + ".shards" if layout == "sharded" else str(out)
    assert collections.Counter(read_events(whole)) == event_counter(paths)
    assert result.events == sum(event_counter(paths).values())
    # Each input's lines stay in order.
    merged = read_events(whole)
    for path in paths:
        mine = [line for line in merged if line.startswith(b'{"f":%d,' % paths.index(path))]
        assert mine == read_events(path)


async def test_more_readers_than_buffers_do_not_deadlock(tmp_path, backend_name: str) -> None:
    """Six readers sharing a pool of two buffers: a reader never waits for a
    buffer while it holds one (it once did, and the merge hung forever)."""
    from pwriter.plan.settings import load_settings
    from pwriter.service.merge import merge

    paths = write_corpus(str(tmp_path / "in"), files=12, events_per_file=1500)
    out = tmp_path / "merged.pfw"
    settings = load_settings(backend=backend_name, stripe_size="64KiB", lanes=1, buffers_per_lane=2,
                             fsync=False, layout="striped")
    with trio.fail_after(60):  # a hang guard, not a timing: the merge takes well under a second
        result = await merge(paths, str(out), settings=settings, readers=6)
    assert result.writer.chunks > 12  # many buffers' worth went through the two
    assert collections.Counter(read_events(out)) == event_counter(paths)



def test_direct_io_merge(corpus: str, tmp_path, backend_name: str) -> None:
    out = tmp_path / "direct.pfw"
    done = run_cli("merge", "-d", corpus, "-o", str(out), "--direct", "--backend", backend_name,
                   "--stripe-size", "64KiB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["layout"] == "padded-striped" and report["direct"] is True
    assert report["direct_writes"] > 0  # whole stripes went through O_DIRECT
    text = read_text(out)
    assert text.startswith(b"[\n") and text.endswith(b"]\n") and b"\x00" not in text
    assert collections.Counter(read_events(out)) == event_counter(inputs_of(corpus))


def test_direct_io_refuses_unaligned_layouts(tmp_path) -> None:
    done = run_cli("merge", good_trace(tmp_path / "a.pfw"), "-o", str(tmp_path / "m.pfw"), "--direct",
                   "--layout", "striped")
    expect_failure(done, 2, "layout", "padded-striped")


def crashed_rank_inputs(tmp_path) -> tuple[list[str], list[bytes]]:
    """A plain trace and a gzip trace cut short mid-line (a rank killed while
    writing), and a complete trace whose last event merely lacks its newline.
    Returns the paths and the complete events they still hold."""
    events = [b'{"id":%d,"pad":"%s"}' % (index, b"x" * 100) for index in range(20000)]
    text = b"[\n" + b"".join(event + b"\n" for event in events)
    cut_plain = text[: len(text) // 2 + 37]
    compressed = gzip.compress(text)
    cut_gzip = compressed[: len(compressed) * 2 // 3]
    (tmp_path / "cut.pfw").write_bytes(cut_plain)
    (tmp_path / "cut.pfw.gz").write_bytes(cut_gzip)
    (tmp_path / "ok.pfw").write_bytes(b'{"ok":1}')
    inflater = zlib.decompressobj(wbits=31)
    readable = inflater.decompress(cut_gzip)
    kept = [line for line in cut_plain.split(b"\n")[1:-1]] + [line for line in readable.split(b"\n")[1:-1]]
    return [str(tmp_path / "cut.pfw"), str(tmp_path / "cut.pfw.gz"), str(tmp_path / "ok.pfw")], kept + [b'{"ok":1}']


def test_crashed_rank_is_an_error_by_default(tmp_path) -> None:
    paths, _ = crashed_rank_inputs(tmp_path)
    out = tmp_path / "out" / "m.pfw"
    out.parent.mkdir()
    done = run_cli("merge", *paths, "-o", str(out))
    expect_failure(done, 1, "cut.pfw", "at byte")
    assert os.listdir(out.parent) == []


def test_salvage_keeps_every_complete_event(tmp_path, backend_name: str) -> None:
    paths, kept = crashed_rank_inputs(tmp_path)
    out = tmp_path / "m.pfw"
    done = run_cli("merge", *paths, "-o", str(out), "--salvage", "--json", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["salvaged_inputs"] == [paths[0], paths[1]] or sorted(report["salvaged_inputs"]) == sorted(paths[:2])
    assert report["dropped_lines"] == 2
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith("pwriter: warning: ") for line in warnings)
    assert any("cut.pfw.gz" in line and "truncated gzip" in line for line in warnings)
    assert collections.Counter(read_events(out)) == collections.Counter(kept)
    assert report["events"] == len(kept)


def test_salvage_with_verify_checks_what_was_salvaged(tmp_path) -> None:
    """Issue 19, case 18: ``merge --salvage --verify`` published, then exited 1 without its JSON (verify read
    the damaged inputs whole and failed on them).  Verify reads the inputs as the salvaging merge did."""
    paths, kept = crashed_rank_inputs(tmp_path)
    out = tmp_path / "m.pfw"
    done = run_cli("merge", *paths, "-o", str(out), "--salvage", "--verify", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verification"]["verified"] is True
    assert report["verification"]["input_events"] == report["events"] == len(kept)
    checked = run_cli("verify", str(out), *paths, "--salvage", "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["output_events"] == len(kept)
    expect_failure(run_cli("verify", str(out), *paths), 1, "cut.pfw")  # without --salvage: the damage is an error
    # Salvage drops only the damage: an output missing a complete event still fails.
    (tmp_path / "ok.pfw").write_bytes(b'{"ok":1}\n{"ok":2}\n')
    assert run_cli("verify", str(out), *paths, "--salvage").returncode == 1


def test_validate_salvage_with_verify(tmp_path) -> None:
    paths, good = invalid_json_inputs(tmp_path)
    out = tmp_path / "m.pfw"
    done = run_cli("merge", *paths, "-o", str(out), "--validate", "--salvage", "--verify", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verification"]["input_events"] == len(good)
    assert run_cli("verify", str(out), *paths, "--validate", "--salvage").returncode == 0


@pytest.mark.parametrize("salvage", [False, True], ids=["plain", "salvage"])
@pytest.mark.parametrize("cut", ["inner-brace", "mid-string", "long"])
@pytest.mark.parametrize("compressed", [False, True], ids=["pfw", "gz"])
def test_a_cut_last_line_is_refused_or_dropped(tmp_path, backend_name: str, cut: str, compressed: bool,
                                               salvage: bool) -> None:
    """A last line without its newline that a crash cut short, even where
    it ends in an inner ``}`` and so looks like an event: not valid JSON, so
    refused (exit 1, the file, the byte where the line starts, and
    ``--salvage`` named), or with --salvage dropped and reported.  Longer
    than a buffer, it takes another path through the reader: the same."""
    whole = [b'{"id":%d,"name":"read"}' % index for index in range(2000)]
    last = {"inner-brace": b'{"id":2,"args":{"a":2}', "mid-string": b'{"id":2,"name":"wri',
            "long": b'{"id":2,"args":{"blob":"' + b"b" * 200_000 + b'"}'}[cut]
    text = b"[\n" + b"".join(line + b"\n" for line in whole) + last
    path = tmp_path / ("cut.pfw.gz" if compressed else "cut.pfw")
    path.write_bytes(gzip.compress(text, 1) if compressed else text)
    out = tmp_path / "out" / "m.pfw"
    out.parent.mkdir()
    args = ["merge", str(path), "-o", str(out), "--backend", backend_name, "--stripe-size", "64KiB", "--json"]
    if not salvage:
        done = run_cli(*args, "--verify")
        expect_failure(done, 1, str(path), "last line has no newline", "--salvage", f"at byte {len(text) - len(last)}")
        assert os.listdir(out.parent) == []
        return
    done = run_cli(*args, "--salvage")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["events"], report["dropped_lines"], report["salvaged_inputs"]) == (2000, 1, [str(path)])
    (warning,) = done.stderr.strip().splitlines()
    assert warning == f"pwriter: warning: {path}: salvaged: dropped a cut last line of {len(last)} bytes"
    assert read_events(out) == whole


@pytest.mark.parametrize("salvage", [False, True], ids=["plain", "salvage"])
def test_a_whole_last_line_without_newline_is_kept(tmp_path, backend_name: str, salvage: bool) -> None:
    """A last line that is whole JSON but has no newline (older tracers, a
    ``]`` with none) is an event like the others, with or without --salvage."""
    path = tmp_path / "whole.pfw"
    path.write_bytes(b'\xef\xbb\xbf{"id":1}\n{"id":2,"args":{"a":2}}  ')
    bom_only = tmp_path / "one.pfw.gz"
    bom_only.write_bytes(gzip.compress(b'\xef\xbb\xbf {"id":3}'))
    out = tmp_path / "m.pfw"
    done = run_cli("merge", str(path), str(bom_only), "-o", str(out), "--backend", backend_name,
                   *(["--salvage"] if salvage else []))
    assert done.returncode == 0, done.stderr
    assert sorted(read_events(out)) == [b'{"id":1}', b'{"id":2,"args":{"a":2}}', b'{"id":3}']


@pytest.mark.parametrize("where", ["member-start", "mid-member"])
def test_truncated_gzip_says_where_the_file_ends(tmp_path, backend_name: str, where: str) -> None:
    """A truncated gzip input is reported at the compressed byte where the
    file ends and the text read up to there (it once said "at byte 0", or
    the start of the last 2 MiB read), and the message names --salvage."""
    text = b"".join(b'{"id":%d,"name":"read","pad":"%s"}\n' % (index, b"%x" % (index * 7919)) for index in range(60000))
    first = gzip.compress(text[:100_000], 1)
    rest = gzip.compress(text[100_000:], 1)
    data = first + rest[:10] if where == "member-start" else first + rest[: len(rest) // 2]
    path = tmp_path / "cut.pfw.gz"
    path.write_bytes(data)
    readable = zlib.decompressobj(wbits=31).decompress(data[len(first) :])
    out = tmp_path / "out" / "m.pfw"
    out.parent.mkdir()
    done = run_cli("merge", str(path), "-o", str(out), "--backend", backend_name)
    expect_failure(done, 1, str(path), "truncated gzip", f"ends inside a compressed member, at byte {len(data)}",
                   f"after {100_000 + len(readable)} bytes of text", "--salvage")
    assert os.listdir(out.parent) == []


def invalid_json_inputs(tmp_path) -> tuple[list[str], list[bytes]]:
    """Event-shaped lines that are not JSON, in a plain and a gzip input,
    between valid ones; returns the paths and the valid events."""
    good = [b'{"id":%d,"name":"read"}' % index for index in range(3000)]
    plain = good[:1500]
    plain_text = b"[\n" + b"\n".join(plain[:700] + [b'{"id":,"name":"cut"}'] + plain[700:]) + b"\n]\n"
    gz_text = b"\n".join(good[1500:] + [b'{"id":1,"name":"\xff\xfe"}', b'{"a":NaN}']) + b"\n"
    (tmp_path / "plain.pfw").write_bytes(plain_text)
    (tmp_path / "other.pfw.gz").write_bytes(gzip.compress(gz_text))
    return [str(tmp_path / "plain.pfw"), str(tmp_path / "other.pfw.gz")], good


def test_validate_refuses_lines_that_are_not_json(tmp_path, backend_name: str) -> None:
    paths, good = invalid_json_inputs(tmp_path)
    out = tmp_path / "out" / "m.pfw"
    out.parent.mkdir()
    # Without --validate only the shape is checked: the lines pass as they are.
    assert run_cli("merge", paths[0], "-o", str(out), "--backend", backend_name).returncode == 0
    assert len(read_events(out)) == 1501
    out.unlink()
    done = run_cli("merge", paths[0], "-o", str(out), "--validate", "--backend", backend_name)
    offset = 2 + sum(len(line) + 1 for line in good[:700])
    expect_failure(done, 1, paths[0], "line 702 is not valid JSON", f"at byte {offset}")
    assert os.listdir(out.parent) == []


def test_validate_with_salvage_drops_and_counts(tmp_path, backend_name: str) -> None:
    paths, good = invalid_json_inputs(tmp_path)
    out = tmp_path / "m.pfw"
    done = run_cli("merge", *paths, "-o", str(out), "--validate", "--salvage", "--json", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["validated"], report["dropped_lines"], report["events"]) == (True, 3, 3000)
    assert sorted(report["salvaged_inputs"]) == sorted(paths)
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 2 and all("not valid JSON" in line for line in warnings)
    assert collections.Counter(read_events(out)) == collections.Counter(good)


def test_old_option_and_variable_work_and_warn_once(tmp_path) -> None:
    """``--workers`` and ``PWRITER_WORKERS``, the old names of ``--lanes``
    and ``PWRITER_LANES``, still work and say so once on stderr; both names
    with different values is a usage error."""
    inputs = [good_trace(tmp_path / f"{n}.pfw") for n in range(3)]
    out = tmp_path / "m"
    done = run_cli("merge", *inputs, "-o", str(out), "--layout", "sharded", "--workers", "2", "--no-fsync", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["pwriter: warning: --workers is now --lanes"]
    assert json.loads(done.stdout)["lanes"] == 2
    done = run_cli("merge", *inputs, "-o", str(out), "--force", "--layout", "sharded", "--no-fsync", "--json",
                   env={"PWRITER_WORKERS": "3"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["pwriter: warning: PWRITER_WORKERS is now PWRITER_LANES"]
    assert json.loads(done.stdout)["lanes"] == 3
    done = run_cli("merge", *inputs, "-o", str(tmp_path / "n"), "--lanes", "2", "--workers", "3")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("pwriter: error: invalid setting lanes: --lanes 2 and --workers 3")
    assert not (tmp_path / "n").exists()
