"""Traces written by the real tracer (PyPI ``dftracer`` 2.x, issue 22): a
launcher and three workers, one of which never finalizes (its trace is cut
inside a gzip member and inside a line), merged in every layout, plain and
gzip, on both backends, and read back with pwriter's own reader, ``pwriter
verify`` and the field's tools (``dftracer_event_count``, ``dftracer_split
--verify``).  The corpus is built once a session (the ``dftracer_run``
fixture, tests/dftracer_corpus.py); the expected events are computed there
without pwriter.  The options issue 22 added (``--wrap``, the incomplete report, ``-r``,
``--shard-size``) are tested on the same corpus, and the docs page's
commands (docs/dftracer.md) run as written.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
from test_field_readers import event_count, split

from pwriter.data.output import read_shard_set
from pwriter.faces.testing import read_events, read_text

from dftracer_corpus import EXAMPLE, TracedRun
from helpers import BIN, expect_failure, published, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]
DOCS_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "dftracer.md"




@pytest.fixture(scope="module")
def field_reference(dftracer_run: TracedRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """What the field's tools say of the traces themselves: the event count
    and dftracer_split's hash of every event (they read the lost worker's
    trace up to its cut, as a salvaging merge does)."""
    inputs = tmp_path_factory.mktemp("reference") / "inputs"  # the tools leave an index beside what they read
    inputs.mkdir()
    for path in dftracer_run.files:
        shutil.copy(path, inputs)
    counted = event_count(inputs)
    assert counted == dftracer_run.counted_events  # the tool counts what we expect of it, cut trace included
    return counted, split(inputs, inputs.parent / "split")


def merge(run: TracedRun, output: pathlib.Path, *options: str) -> subprocess.CompletedProcess[str]:
    return run_cli("merge", "-d", str(run.directory), "-o", str(output), *options)


def test_the_tracer_writes_ndjson_with_integer_phases(dftracer_run: TracedRun) -> None:
    """The facts the merge relies on, as the tracer writes them today."""
    lines = list(dftracer_run.events)
    assert not any(line in (b"[", b"]") for line in lines)
    phases = collections.Counter(json.loads(line)["ph"] for line in lines)
    assert set(phases) <= {1, 4} and phases[1] > 1000 and phases[4] > 4  # events and metadata, as integers
    assert 0 < dftracer_run.lost_events < sum(dftracer_run.events.values()) // 2


def test_the_lost_worker_is_refused_without_salvage(dftracer_run: TracedRun, tmp_path: pathlib.Path,
                                                     backend_name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = merge(dftracer_run, out / "app.pfw.gz", "--backend", backend_name)
    expect_failure(done, 1, dftracer_run.lost.name, "--salvage")
    assert os.listdir(out) == []


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_salvaged_merge_holds_every_readable_event(dftracer_run: TracedRun, field_reference: tuple[int, str],
                                                     tmp_path: pathlib.Path, backend_name: str, layout: str,
                                                     compress: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    output = out / ("app.pfw.gz" if compress else "app.pfw")
    done = merge(dftracer_run, output, "--salvage", "--layout", layout, "--stripe-size", "64KiB", "--lanes", "3",
                 "--backend", backend_name, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["events"] == sum(dftracer_run.events.values())
    assert report["salvaged_inputs"] == [str(dftracer_run.lost)]
    assert dftracer_run.lost.name in done.stderr  # the warning names the cut trace
    whole = published(output, layout)
    assert collections.Counter(read_events(whole)) == dftracer_run.events
    verified = run_cli("verify", "--salvage", whole, "-d", str(dftracer_run.directory))
    assert verified.returncode == 0 and "exactly" in verified.stdout, verified.stdout + verified.stderr

    # The field's tools read gzip files named *.pfw.gz: the gzip output as it
    # is (sidecars aside), a plain output gzipped whole in read order.
    readable = tmp_path / "readable"
    readable.mkdir()
    if compress:
        names = read_shard_set(whole) if layout == "sharded" else [str(output)]
        assert all(name.endswith(".pfw.gz") for name in names)
        for name in names:
            shutil.copy(name, readable)
    else:
        (readable / "app.pfw.gz").write_bytes(gzip.compress(read_text(whole), compresslevel=1))
    counted, events_hash = field_reference
    assert event_count(readable) == counted
    assert split(readable, tmp_path / "split") == events_hash


def test_ndjson_traces_merge_to_ndjson(dftracer_run: TracedRun, tmp_path: pathlib.Path) -> None:
    """``--wrap auto`` (the CLI's default) keeps the tracer's NDJSON; ``--wrap
    array`` wraps it for Perfetto."""
    done = merge(dftracer_run, tmp_path / "auto.pfw.gz", "--salvage")
    assert done.returncode == 0, done.stderr
    lines = read_text(tmp_path / "auto.pfw.gz").splitlines()
    assert b"[" not in lines and b"]" not in lines
    done = merge(dftracer_run, tmp_path / "array.pfw", "--salvage", "--wrap", "array")
    assert done.returncode == 0, done.stderr
    lines = read_text(tmp_path / "array.pfw").splitlines()
    assert lines[0] == b"[" and lines[-1] == b"]"
    for name in ("auto.pfw.gz", "array.pfw"):
        assert collections.Counter(read_events(tmp_path / name)) == dftracer_run.events


def test_the_incomplete_report_names_the_lost_worker(dftracer_run: TracedRun, tmp_path: pathlib.Path) -> None:
    """Only the worker that never finalized is incomplete: no end event, its
    readable events counted; ``--require-complete`` refuses the merge."""
    done = merge(dftracer_run, tmp_path / "app.pfw.gz", "--salvage", "--json")
    assert done.returncode == 0, done.stderr
    incomplete = json.loads(done.stdout)["incomplete"]
    assert [entry["path"] for entry in incomplete] == [str(dftracer_run.lost)]
    # the events read: its lines, as the merge counts events (or those that carry an id, as num_events does)
    assert incomplete[0]["events"] in (dftracer_run.lost_events, dftracer_run.lost_counted)
    assert incomplete[0]["claimed"] is None
    assert incomplete[0]["why"] == "no end event" or incomplete[0]["why"].startswith("salvaged: ")
    text = merge(dftracer_run, tmp_path / "text.pfw.gz", "--salvage")
    assert text.returncode == 0 and dftracer_run.lost.name in text.stderr
    assert not any(path.name in text.stderr for path in dftracer_run.files if path != dftracer_run.lost)
    out = tmp_path / "strict"
    out.mkdir()
    refused = merge(dftracer_run, out / "app.pfw.gz", "--salvage", "--require-complete")
    expect_failure(refused, 1, dftracer_run.lost.name)
    assert os.listdir(out) == []


def test_recursive_input_directories(dftracer_run: TracedRun, tmp_path: pathlib.Path) -> None:
    """``-r``: every trace below the directory once; hidden names skipped."""
    root = tmp_path / "job"
    for index, path in enumerate(dftracer_run.files):
        node = root / f"node-{index % 2}" / "traces"
        node.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, node)
    (root / ".old").mkdir()
    shutil.copy(dftracer_run.files[0], root / ".old")
    done = run_cli("merge", "-r", "-d", str(root), "-o", str(tmp_path / "app.pfw.gz"), "--salvage")
    assert done.returncode == 0, done.stderr
    assert collections.Counter(read_events(tmp_path / "app.pfw.gz")) == dftracer_run.events


def test_compaction_into_pieces(dftracer_run: TracedRun, field_reference: tuple[int, str],
                                tmp_path: pathlib.Path, backend_name: str) -> None:
    """``--shard-size``: many gzip pieces, each a trace the field's tools read,
    together every readable event once."""
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    done = merge(dftracer_run, pieces / "app.pfw.gz", "--salvage", "--layout", "sharded", "--lanes", "2",
                 "--shard-size", "32KiB", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    shards = read_shard_set(published(pieces / "app.pfw.gz", "sharded"))
    assert len(shards) > 10  # about 750 kB of event lines in pieces of 32 KiB
    longest = max(len(line) for line in dftracer_run.events) + 1
    for shard in shards:
        assert shard.endswith(".pfw.gz") and len(read_text(shard)) < 32 * 1024 + longest + 8
    assert collections.Counter(read_events(published(pieces / "app.pfw.gz", "sharded"))) == dftracer_run.events
    for sidecar in pieces.iterdir():
        if not sidecar.name.endswith(".pfw.gz"):
            sidecar.unlink()
    assert event_count(pieces) == field_reference[0]


def docs_commands() -> str:
    """The shell commands of the docs page: every ```sh block, in order,
    without its ``pip install`` lines (the test's environment has them)."""
    blocks = re.findall(r"```sh\n(.*?)```", DOCS_PAGE.read_text(encoding="utf-8"), re.DOTALL)
    return "".join(line for block in blocks for line in block.splitlines(keepends=True)
                   if not line.startswith("pip install"))


def test_the_docs_page_has_its_walkthrough() -> None:
    commands = docs_commands()
    for step in ("python examples/traced_app.py", "pwriter merge", "--require-complete", "--shard-size",
                 "dftracer_event_count", "dftracer_split", "pwriter verify"):
        assert step in commands, step


def test_the_docs_page_commands_run(dftracer_run: TracedRun, tmp_path: pathlib.Path) -> None:
    """The page's commands, run as written in an empty directory holding
    only ``examples/traced_app.py``; every command expected to fail says so
    with ``|| echo "exit $?"``."""
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples")
    commands = docs_commands()
    done = subprocess.run(["bash", "-c", "set -eu\n" + commands], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("exit 1\n") == commands.count('|| echo "exit $?"'), done.stdout + done.stderr
    assert (tmp_path / "merged" / "app.pfw.gz").is_file()
    assert len(read_shard_set(str(tmp_path / "pieces" / "app.pfw.gz.shards"))) > 1
