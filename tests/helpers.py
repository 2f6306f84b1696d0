"""Helpers shared by the test modules (imported as ``from helpers import ...``;
the fixtures are in conftest.py): running the command line as a user would,
checking a documented failure, naming a published output, finding the
field's tools, and a coalescer whose flushes are recorded in memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import trio

from pwriter.service.lanes import BufferPool, Coalescer

# The dftracer-utils binaries (and the venv's pwriter, mpiexec) live beside this interpreter.
BIN = os.path.dirname(sys.executable)


def dftracer_tool(name: str) -> str:
    path = shutil.which(name, path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install dftracer-utils)")
    return path


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pwriter`` command as a user would."""
    return subprocess.run(
        [os.path.join(BIN, "pwriter"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def expect_failure(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A command that failed as documented: exit ``code``, nothing on stdout,
    one ``pwriter: error:`` line on stderr holding every one of ``needles``
    (then, for other failures that happened alongside, ``pwriter: also:`` lines)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 1 and all(line.startswith("pwriter: also: ") for line in lines[1:]), done.stderr
    assert lines[0].startswith("pwriter: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert done.stdout == ""


def published(path: str | os.PathLike[str], layout: str) -> str:
    """The name to read a whole output from (a sharded set: its manifest)."""
    return f"{os.fspath(path)}.shards" if layout == "sharded" else os.fspath(path)


def fake_ranks(directory: str | os.PathLike[str], *, ranks: int, epochs: int, steps: int, hosts: int = 2) -> None:
    """Realistic per-rank ``rank_N.pfw.gz`` traces in ``directory``, made by
    the field's own generator (``dftracer_gen_fake_trace``)."""
    subprocess.run([dftracer_tool("dftracer_gen_fake_trace"), "-o", os.fspath(directory), "-p", str(ranks),
                    "-H", str(hosts), "-e", str(epochs), "-s", str(steps)], check=True, capture_output=True,
                   timeout=120)


class Recorder:
    """Plays the writer: records each flushed chunk and gives buffers back."""

    def __init__(self, pool: BufferPool, hold: bool = False) -> None:
        self.pool = pool
        self.chunks: list[bytes] = []
        self.oversized: list[bytes] = []
        self.flush_times: list[float] = []
        self.held: list[memoryview] = []
        self.hold = hold

    async def flush(self, lane: int, buffer: memoryview, filled: int, since: float) -> None:
        self.chunks.append(bytes(buffer[:filled]))
        self.flush_times.append(trio.current_time())
        if self.hold:
            self.held.append(buffer)
        else:
            self.pool.give_back(buffer)

    async def write_whole(self, lane: int, view: memoryview, since: float) -> None:
        self.oversized.append(bytes(view))
        self.chunks.append(bytes(view))

    def release(self) -> None:
        while self.held:
            self.pool.give_back(self.held.pop())


def recorded_coalescer(capacity: int = 100, buffers: int = 4, max_delay: float = 1.0, hold: bool = False,
                       channel: int = 8):
    """A coalescer of lane 0 over a pool and a :class:`Recorder`, and its
    channel's send end: (pool, send, recorder, coalescer)."""
    pool = BufferPool(buffers, max(capacity, 4096))
    send, receive = trio.open_memory_channel[bytes](channel)
    recorder = Recorder(pool, hold=hold)
    coalescer = Coalescer(0, receive, pool, capacity=capacity, max_delay=max_delay, flush=recorder.flush,
                          write_whole=recorder.write_whole)
    return pool, send, recorder, coalescer
