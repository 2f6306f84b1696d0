"""Traces written by the real tracer (PyPI ``dftracer`` 2.x), for tests.

:func:`trace_run` runs ``examples/traced_app.py`` under the tracer: a
launcher and ``workers`` worker processes, each tracing its own file I/O and
traced functions into one ``app-<hash>-app.pfw.gz``.  Worker ``lost`` leaves
with ``os._exit(0)`` before it finalizes; with a small write buffer
(``DFTRACER_WRITE_BUFFER_SIZE``) the tracer has flushed part of its events,
so that trace is cut inside a gzip member and inside a line, with no ``end``
event.

The expectations are computed here, without pwriter: the text of every gzip
member that decompresses, whole lines only (the cut line of the lost worker
dropped), wrapper and blank lines left out.  :func:`trace_run` also checks
the shape of what the tracer wrote (one trace per process, an ``end`` event
whose ``num_events`` counts the id-bearing events before it in every trace
but the lost one), so that a change in the tracer shows here first.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import zlib

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "traced_app.py"


@dataclasses.dataclass(frozen=True)
class TracedRun:
    """One run of the traced workload."""

    directory: pathlib.Path
    files: tuple[pathlib.Path, ...]  # every trace, sorted
    lost: pathlib.Path  # the trace of the worker that never finalized
    events: collections.Counter[bytes]  # the event lines a salvaging merge keeps
    lost_events: int  # of them, how many come from the lost worker's trace
    lost_counted: int  # of those, how many carry an id (the count an end event would claim)
    counted_events: int  # of them, those dftracer_event_count counts (metadata lines are not)


def dftracer_missing() -> str | None:
    """Why the tracer cannot run here, or None when it can."""
    missing = "the tracer is not installed (pip install 'dftracer>=2.2')"
    try:
        if importlib.util.find_spec("dftracer") is None:  # dftracer-utils alone also provides this package
            return missing
        if importlib.util.find_spec("dftracer.python") is None or importlib.util.find_spec("dftracer.dftracer") is None:
            return missing
    except ImportError as error:
        return f"the tracer cannot be imported: {error}"
    return None


def tracer_environment(log_file: pathlib.Path, write_buffer_size: int | None) -> dict[str, str]:
    """The environment that traces a Python program into ``log_file``-<hash>-app.pfw.gz."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("DFTRACER_")}
    environment.update(DFTRACER_ENABLE="1", DFTRACER_INC_METADATA="1", DFTRACER_DATA_DIR="all",
                       DFTRACER_LOG_FILE=str(log_file))
    if write_buffer_size is not None:
        environment["DFTRACER_WRITE_BUFFER_SIZE"] = str(write_buffer_size)
    return environment


def readable_text(path: pathlib.Path) -> tuple[bytes, bool]:
    """The text of every gzip member of ``path`` that decompresses, and
    whether the file ended cleanly at the end of a member."""
    data = path.read_bytes()
    parts = []
    while data:
        member = zlib.decompressobj(wbits=31)
        try:
            parts.append(member.decompress(data))
        except zlib.error:
            return b"".join(parts), False
        if not member.eof:
            return b"".join(parts), False
        data = member.unused_data
    return b"".join(parts), True


def event_lines(text: bytes) -> list[bytes]:
    """The whole event lines of ``text``: a cut last line, blank lines and the
    ``[`` / ``]`` wrapper lines of older traces left out."""
    whole = text[: text.rfind(b"\n") + 1]
    lines = (line.strip() for line in whole.split(b"\n"))
    return [line for line in lines if line and line not in (b"[", b"]")]


def end_event(lines: list[bytes]) -> dict[str, object] | None:
    """The tracer's ``end`` event, when it is the last line."""
    if not lines:
        return None
    last = json.loads(lines[-1])
    return last if last.get("name") == "end" and last.get("cat") == "dftracer" else None


def trace_run(directory: pathlib.Path, *, workers: int = 3, steps: int = 100, lost: int = 2,
              write_buffer_size: int = 200_000) -> TracedRun:
    """Trace the workload into ``directory`` and describe what it wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", str(workers), "--steps", str(steps), "--lost", str(lost)],
        env=tracer_environment(directory / "app", write_buffer_size),
        cwd=directory.parent, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"the traced workload failed:\n{done.stdout}\n{done.stderr}"
    files = tuple(sorted(directory.glob("*.pfw.gz")))
    assert len(files) == workers + 1, f"expected one trace per process, found {[path.name for path in files]}"
    events: collections.Counter[bytes] = collections.Counter()
    lost_files = []
    lost_events = lost_counted = 0
    for path in files:
        text, complete = readable_text(path)
        lines = event_lines(text)
        events.update(lines)
        end = end_event(lines)
        if end is None:
            assert not complete and not text.endswith(b"\n"), f"{path.name}: no end event, yet not cut"
            lost_files.append(path)
            lost_events = len(lines)
            lost_counted = sum(1 for line in lines if b'"id":' in line)
            continue
        assert complete, f"{path.name}: an end event, yet the gzip stream is cut"
        with_id = sum(1 for line in lines[:-1] if b'"id":' in line)
        args = end["args"]
        assert isinstance(args, dict) and args["num_events"] == with_id == end["id"] - 1, (path.name, end, with_id)
    assert len(lost_files) == 1, f"expected one trace without an end event, found {lost_files}"
    assert lost_events > 0, f"{lost_files[0].name}: the tracer flushed nothing before the exit"
    counted = sum(n for line, n in events.items() if b'"id":' in line)
    return TracedRun(directory, files, lost_files[0], events, lost_events, lost_counted, counted)
