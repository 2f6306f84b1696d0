"""Issue 22, point 2: which inputs are incomplete, from DFTracer 2.x ``end`` events.

An input is incomplete when it is empty, salvaged, cut before its ``end``
event (while another input of the merge has one), or when the ``end``
event's ``num_events`` differs from the events read that begin ``{"id":``.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from pwriter.plan import traceformat
from pwriter.plan.completeness import InputEnd, end_event_claim, incomplete_inputs, input_end
from pwriter.plan.traceformat import BlockCleaner, count_prefixed

from helpers import expect_failure, run_cli

# Lines copied from a trace that DFTracer 2.2.0 (PyPI) wrote for a small Python workload.
REAL_METADATA = (b'{"name":"HH","cat":"dftracer","type":1,"pid":13796,"tid":13796,"ph":4,"args":{"hhash":'
                 b'"6882804a826580cd","name":"vm","value":"6882804a826580cd"}}')
REAL_EVENT = (b'{"id":21,"name":"work","cat":"APP","type":6,"pid":13796,"tid":13796,"ts":1795973208111888,'
              b'"dur":374,"ph":1,"args":{"hhash":"6882804a826580cd"}}')
REAL_END = (b'{"id":46,"name":"end","cat":"dftracer","type":1,"pid":13796,"tid":13796,"ts":1795973208114881,'
            b'"dur":0,"ph":1,"args":{"hhash":"6882804a826580cd","app":{},"used":{"LIBC_IO":1,"PYTHON":1,'
            b'"python_function":1},"cfg":{"enable":1,"metadata":1,"core_affinity":0,"time_metric":"US","io":1,'
            b'"posix":1,"stdio":1,"compression":1,"trace_all_files":1,"tids":1,"bind_signals":0,'
            b'"write_buffer_size":16777216,"trace_interval_ms":1000,"libuv_thread_count":1,"variorum_power":1,'
            b'"aggregation_enable":0,"aggregation_type":"FULL","bind":1,"log_file":"/tmp/app-app.pfw.gz"},'
            b'"build":{"mpi":0,"hdf5":0,"hip":0,"cuda":0,"finstrument":0,"variorum":0},"num_events":45}}')

SCANNERS = ["python"] + (["native"] if traceformat._native is not None else [])


@pytest.fixture(params=SCANNERS)
def scanner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(traceformat, "_native", None)
    return str(request.param)


def trace_2x(events: int, *, pid: int = 7, end: int | None = None, metadata: int = 3) -> bytes:
    """An NDJSON trace as DFTracer 2.x writes it: metadata lines without
    ``id``, ``events`` events with ids 1..events, then (unless ``end`` is
    None) an ``end`` event claiming ``end`` events, with id events + 1."""
    lines = [REAL_METADATA.replace(b"13796", b"%d" % pid)] * metadata
    lines += [b'{"id":%d,"name":"read","cat":"POSIX","type":3,"pid":%d,"tid":%d,"ts":%d,"dur":3,"ph":1,'
              b'"args":{"hhash":"6882804a826580cd","ret":100}}' % (index, pid, pid, 1000 + index)
              for index in range(1, events + 1)]
    if end is not None:
        lines.append(b'{"id":%d,"name":"end","cat":"dftracer","type":1,"pid":%d,"tid":%d,"ts":9,"dur":0,"ph":1,'
                     b'"args":{"hhash":"6882804a826580cd","num_events":%d}}' % (events + 1, pid, pid, end))
    return b"".join(line + b"\n" for line in lines)


# --- the pure rules -----------------------------------------------------------------------------------------------

def test_the_end_event_of_a_real_trace_is_read() -> None:
    assert end_event_claim(REAL_END) == 45
    assert end_event_claim(REAL_EVENT) is None
    assert end_event_claim(None) is None
    # Only DFTracer's own end event: a user's function named "end" is an event like the others.
    assert end_event_claim(b'{"id":3,"name":"end","cat":"APP","args":{"num_events":2}}') is None
    assert end_event_claim(b'{"id":3,"name":"end","cat":"dftracer","args":{"num_events":"2"}}') is None
    assert end_event_claim(b'{"id":3,"name":"end","cat":"dftracer","args":{"num_events":-1}}') is None
    assert end_event_claim(b'{"id":3,"name":"end","cat":"dftracer","args":{"num_events":true}}') is None
    assert end_event_claim(b'{"name":"end","cat":"dftracer","args":{"num_events":0}}') == 0
    assert end_event_claim(b'{"name":"end","cat":"dftracer","args":{"num_events":1}') is None  # cut short


def test_input_end_leaves_out_the_end_events_own_id() -> None:
    assert input_end("a", events=49, ids=46, last_event=REAL_END) == InputEnd("a", 49, 45, 45, None)
    assert input_end("a", events=5, ids=5, last_event=REAL_EVENT) == InputEnd("a", 5, 5, None, None)
    assert input_end("a", events=0, ids=0, last_event=None, damage="x") == InputEnd("a", 0, 0, None, "x")


def test_the_rules_of_incompleteness() -> None:
    complete = InputEnd("complete", 10, 8, 8)
    cut = InputEnd("cut", 5, 4, None)
    empty = InputEnd("empty", 0, 0, None)
    short = InputEnd("short", 10, 7, 8)
    salvaged = InputEnd("salvaged", 3, 3, None, "dropped a cut last line of 9 bytes")
    found = incomplete_inputs([complete, cut, empty, short, salvaged])
    assert [entry.as_json() for entry in found] == [
        {"path": "cut", "why": "no end event", "events": 4, "claimed": None},
        {"path": "empty", "why": "no end event", "events": 0, "claimed": None},
        {"path": "short", "why": "num_events 8, read 7", "events": 7, "claimed": 8},
        {"path": "salvaged", "why": "salvaged: dropped a cut last line of 9 bytes", "events": 3, "claimed": None},
    ]
    # No input with an end event (DFTracer 1.x): a missing one is not flagged; empty and salvaged still are.
    assert [entry.path for entry in incomplete_inputs([cut, empty, salvaged])] == ["empty", "salvaged"]
    assert incomplete_inputs([complete]) == [] and incomplete_inputs([]) == []


# --- the counts the cleaner keeps ---------------------------------------------------------------------------------

def test_count_prefixed_lines() -> None:
    text = b'{"id":1}\n{"name":"x","id":2}\n{"id":\n{"i\n\n{"id":3,"args":{"id":4}}\n'
    assert count_prefixed(text, b'{"id":') == 3 and count_prefixed(b"", b'{"id":') == 0


def test_the_c_scanner_is_the_one_this_code_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled module of another interface version (a stale build) is
    not used: the pure-Python scan takes over."""
    import types

    import pwriter
    from pwriter._native_build import ABI_VERSION

    assert traceformat.NATIVE_ABI == ABI_VERSION
    stale = types.SimpleNamespace(ffi=None, lib=types.SimpleNamespace())
    monkeypatch.setattr(pwriter, "_native", stale, raising=False)
    monkeypatch.setitem(sys.modules, "pwriter._native", stale)
    assert traceformat._load_native() is None
    stale.lib.pw_abi_version = lambda: ABI_VERSION - 1
    assert traceformat._load_native() is None
    stale.lib.pw_abi_version = lambda: ABI_VERSION
    assert traceformat._load_native() == (None, stale.lib)


@pytest.mark.parametrize("wrapping", ["ndjson", "array", "few-odd", "crlf-indented"])
def test_the_cleaner_counts_ids_and_keeps_the_last_event(scanner: str, wrapping: str) -> None:
    text = trace_2x(300, end=300)
    if wrapping == "array":
        text = b"[\n" + text + b"]"
    elif wrapping == "few-odd":  # (lines the C scanner hands back one by one)
        lines = text.split(b"\n")
        text = b"\n".join([b" " + line + b"\t" for line in lines[:6]] + lines[6:])
    elif wrapping == "crlf-indented":
        text = b"[\r\n" + b"".join(b"  " + line + b"\r\n" for line in text.split(b"\n")[:-1]) + b"]\r\n"
    cleaner = BlockCleaner("t.pfw")
    # Fed in pieces cut anywhere, as the readers do.
    for start in range(0, len(text), 997):
        cleaner.feed(text[start : start + 997])
    cleaner.finish()
    assert (cleaner.events, cleaner.ids) == (304, 301)
    assert cleaner.last_event is not None and end_event_claim(cleaner.last_event) == 300


def test_the_cleaner_in_place_counts_too(scanner: str) -> None:
    text = b"[\n" + trace_2x(50, end=50) + b"  \n"
    buffer = bytearray(text)
    cleaner = BlockCleaner("t.pfw")
    with memoryview(buffer) as view:
        end = cleaner.clean_in_place(view, 0, len(buffer))
    assert bytes(buffer[:end]) == trace_2x(50, end=50)
    assert (cleaner.events, cleaner.ids, end_event_claim(cleaner.last_event)) == (54, 51, 50)


@pytest.mark.parametrize("capacity", [64, 300, 1000, 1 << 16])
def test_each_input_of_a_run_ends_as_its_own_text_does(tmp_path, scanner: str, capacity: int) -> None:
    """The ends an InputRun reads, through buffers of any size (64: every
    event a line longer than the buffer): an input's last event is its own
    (an input without events after one that ended claims nothing), and a
    closing ``]`` read in a fill of its own leaves the end event last."""
    from pwriter.data.inputs import InputRun, fill_step

    texts = {
        "a.pfw": b"[\n" + trace_2x(5, pid=1, end=5) + b"]\n",
        "b.pfw": b"[\n]\n",
        "c.pfw.gz": gzip.compress(b"[\r\n" + trace_2x(3, pid=3, end=4).replace(b"\n", b"\r\n") + b"]"),
        "d.pfw": trace_2x(4, pid=4).rstrip(b"\n"),
    }
    paths = []
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    run = InputRun(paths, [os.path.getsize(path) for path in paths])
    buffer = memoryview(bytearray(capacity))
    done = end = 0
    try:
        while True:
            done, end, finished, _ = fill_step(run, buffer, done, end, capacity)
            buffer[: end - done] = buffer[done:end]
            done, end = 0, end - done
            if finished:
                break
    finally:
        run.close()
    assert run.ends == [InputEnd(paths[0], 9, 5, 5), InputEnd(paths[1], 0, 0, None),
                        InputEnd(paths[2], 7, 3, 4), InputEnd(paths[3], 7, 4, None)]
    assert [item.why for item in incomplete_inputs(run.ends)] == [
        "no end event", "num_events 4, read 3", "no end event"]


# --- the merge's report ---------------------------------------------------------------------------------------------

def incomplete_corpus(tmp_path) -> dict[str, str]:
    """One input of each kind, NDJSON as DFTracer 2.x writes: complete (one
    with the real end line), cut before its end event, claiming more than it
    holds, empty, and a gzip file cut inside a member (salvaged)."""
    directory = tmp_path / "traces"
    directory.mkdir()
    real = trace_2x(45, pid=13796, end=None) + REAL_END + b"\n"
    cut_gzip = gzip.compress(trace_2x(400, pid=6, end=400), 1)
    files = {
        "a-complete.pfw": trace_2x(20, pid=1, end=20),
        "b-real.pfw.gz": gzip.compress(real),
        "c-cut.pfw": trace_2x(12, pid=3, end=None),
        "d-short.pfw": trace_2x(9, pid=4, end=11),
        "e-empty.pfw.gz": b"",
        "f-salvaged.pfw.gz": cut_gzip[: len(cut_gzip) // 2],
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {name.split("-")[1].split(".")[0]: str(directory / name) for name in files}


def test_json_lists_every_incomplete_input(tmp_path, backend_name: str) -> None:
    paths = incomplete_corpus(tmp_path)
    out = tmp_path / "m.pfw"
    done = run_cli("merge", "-d", os.path.dirname(paths["complete"]), "-o", str(out), "--salvage", "--json",
                   "--backend", backend_name, "--verify")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # What was salvaged is verified: the output holds exactly what was read.
    assert report["verification"]["verified"] and report["verification"]["input_events"] == report["events"]
    assert run_cli("verify", str(out), "-d", os.path.dirname(paths["complete"]), "--salvage").returncode == 0
    salvaged = report["incomplete"][-1]
    assert salvaged["path"] == paths["salvaged"] and salvaged["why"].startswith("salvaged: truncated gzip")
    assert salvaged["claimed"] is None and 0 < salvaged["events"] < 400
    assert report["incomplete"][:-1] == [
        {"path": paths["cut"], "why": "no end event", "events": 12, "claimed": None},
        {"path": paths["short"], "why": "num_events 11, read 9", "events": 9, "claimed": 11},
        {"path": paths["empty"], "why": "no end event", "events": 0, "claimed": None},
    ]
    assert report["wrap"] == "none"
    assert done.stderr.splitlines() == [
        f"pwriter: warning: {paths['cut']}: incomplete: no end event, 12 events read",
        f"pwriter: warning: {paths['short']}: incomplete: num_events 11, read 9",
        f"pwriter: warning: {paths['empty']}: incomplete: no end event, 0 events read",
        f"pwriter: warning: {paths['salvaged']}: {salvaged['why']}",
    ]


def test_require_complete_fails_and_publishes_nothing(tmp_path, backend_name: str) -> None:
    paths = incomplete_corpus(tmp_path)
    out = tmp_path / "out" / "m.pfw.gz"
    out.parent.mkdir()
    done = run_cli("merge", "-d", os.path.dirname(paths["complete"]), "-o", str(out), "--salvage",
                   "--require-complete", "--backend", backend_name)
    expect_failure(done, 1, "4 incomplete inputs (--require-complete)", f"{paths['cut']}: no end event",
                   f"{paths['short']}: num_events 11, read 9", f"{paths['empty']}: no end event",
                   f"{paths['salvaged']}: salvaged: ")
    assert os.listdir(out.parent) == []
    # Complete inputs alone pass, with the real end line among them.
    done = run_cli("merge", paths["complete"], paths["real"], "-o", str(out), "--require-complete", "--json",
                   "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["incomplete"], done.stderr) == ([], "")


def test_text_warnings_are_capped_with_a_count(tmp_path) -> None:
    directory = tmp_path / "traces"
    directory.mkdir()
    (directory / "rank_0.pfw").write_bytes(trace_2x(3, end=3))
    for rank in range(1, 14):
        (directory / f"rank_{rank}.pfw.gz").write_bytes(b"")
    done = run_cli("merge", "-d", str(directory), "-o", str(tmp_path / "m.pfw"))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:10] == [f"pwriter: warning: {directory}/rank_{rank}.pfw.gz: incomplete: no end event, "
                          "0 events read" for rank in range(1, 11)]
    assert lines[10:] == ["pwriter: warning: and 3 more incomplete inputs (13 in all; --json lists each)"]
    assert done.stdout.startswith("merged 14 inputs, 7 events")


def test_traces_without_end_events_are_not_flagged(tmp_path) -> None:
    """DFTracer 1.x traces (array style, no end event): nothing is reported,
    but an empty input is incomplete whatever the format."""
    directory = tmp_path / "traces"
    directory.mkdir()
    for rank in range(3):
        (directory / f"rank_{rank}.pfw").write_bytes(
            b"[\n" + b"".join(b'{"id":%d,"name":"read","pid":%d}\n' % (i, rank) for i in range(50)) + b"]\n")
    done = run_cli("merge", "-d", str(directory), "-o", str(tmp_path / "m.pfw"), "--json", "--require-complete")
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["incomplete"], done.stderr) == ([], "")
    (directory / "rank_3.pfw").write_bytes(b"[\n]\n")
    done = run_cli("merge", "-d", str(directory), "-o", str(tmp_path / "m2.pfw"), "--json")
    assert json.loads(done.stdout)["incomplete"] == [
        {"path": f"{directory}/rank_3.pfw", "why": "no end event", "events": 0, "claimed": None}]


async def test_the_library_merge_reports_and_refuses(tmp_path, settings_for) -> None:
    from pwriter.service.merge import IncompleteInputsError, merge

    paths = incomplete_corpus(tmp_path)
    result = await merge([paths["complete"], paths["cut"]], str(tmp_path / "m.pfw"), settings=settings_for())
    assert [(entry.path, entry.why) for entry in result.incomplete] == [(paths["cut"], "no end event")]
    assert [end.claimed for end in result.ends] == [20, None]
    with pytest.raises(IncompleteInputsError, match="1 incomplete input "):
        await merge([paths["complete"], paths["cut"]], str(tmp_path / "n.pfw"), settings=settings_for(),
                    require_complete=True)
    assert not os.path.exists(tmp_path / "n.pfw")


APP = """
import os, sys
from dftracer.python import dftracer, dft_fn
log = dftracer.initialize_log(logfile=None, data_dir=None, process_id=-1)
app = dft_fn("APP")

@app.log
def work(i):
    with open(os.path.join(sys.argv[1], f"data{i}.txt"), "w") as f:
        f.write("x" * 100)

for i in range(int(sys.argv[2])):
    work(i)
if sys.argv[3] == "crash":
    os._exit(0)
log.finalize()
"""


def test_real_dftracer_traces(tmp_path) -> None:
    """The id rule on traces the real tracer wrote: complete processes are
    not flagged (their num_events equals the lines that begin {"id":), a
    process that never finalizes is (its file empty, or cut inside a line)."""
    pytest.importorskip("dftracer.python")
    app = tmp_path / "app.py"
    app.write_text(APP)
    traces, data = tmp_path / "traces", tmp_path / "data"
    traces.mkdir()
    data.mkdir()
    runs = [("done", 5, {}), ("done", 40, {}), ("crash", 3, {}),
            ("crash", 60, {"DFTRACER_WRITE_BUFFER_SIZE": "2000"})]
    for index, (how, count, extra) in enumerate(runs):
        env = {**os.environ, "DFTRACER_ENABLE": "1", "DFTRACER_INC_METADATA": "1", "DFTRACER_DATA_DIR": "all",
               "DFTRACER_LOG_FILE": str(traces / f"app{index}"), **extra}
        subprocess.run([sys.executable, str(app), str(data), str(count), how], env=env, check=True, timeout=60,
                       cwd=tmp_path)  # (the tracer writes a dft.log where it runs)
    names = sorted(os.listdir(traces))
    assert len(names) == 4 and all(name.endswith(".pfw.gz") for name in names)
    done = run_cli("merge", "-d", str(traces), "-o", str(tmp_path / "m.pfw"), "--salvage", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    flagged = {os.path.basename(entry["path"]).split("-")[0]: entry for entry in report["incomplete"]}
    assert sorted(flagged) == ["app2", "app3"], report["incomplete"]
    assert flagged["app2"] == {"path": flagged["app2"]["path"], "why": "no end event", "events": 0, "claimed": None}
    assert flagged["app3"]["why"].startswith("salvaged: ") and flagged["app3"]["events"] > 0
    assert report["wrap"] == "none"
    text = (tmp_path / "m.pfw").read_bytes()
    assert text.startswith(b"{") and b"\n[\n" not in text and not text.endswith(b"]\n")


def test_ranks_report_and_refuse_as_one_process(tmp_path) -> None:
    """Over MPI ranks, rank 0 judges every input together (one rank may
    hold the only input with an end event) and --require-complete fails
    the job before anything is published."""
    mpi_merge = pytest.importorskip("test_mpi").mpi_merge
    paths = incomplete_corpus(tmp_path)
    directory = os.path.dirname(paths["complete"])
    single = run_cli("merge", "-d", directory, "-o", str(tmp_path / "one.pfw"), "--salvage", "--json")
    assert single.returncode == 0, single.stderr
    done = mpi_merge(3, "-d", directory, "-o", str(tmp_path / "m.pfw"), "--salvage", "--json", "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["incomplete"] == json.loads(single.stdout)["incomplete"]
    assert len(json.loads(done.stdout)["incomplete"]) == 4
    out = tmp_path / "out" / "m.pfw"
    out.parent.mkdir()
    done = mpi_merge(3, "-d", directory, "-o", str(out), "--salvage", "--require-complete", "--no-fsync")
    assert done.returncode == 1
    assert "4 incomplete inputs (--require-complete)" in done.stderr
    assert os.listdir(out.parent) == []
