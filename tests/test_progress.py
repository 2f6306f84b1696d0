"""The progress line: cleared on every rewrite on a terminal, one plain line
every few seconds elsewhere; files done of all, events, text, rate, ETA."""

from __future__ import annotations

import io
import re
import sys

import pytest
import trio
import trio.testing

from pwriter.faces import cli

from helpers import run_cli


class FakeProgress:
    def __init__(self) -> None:
        self.total_input_bytes = 1000
        self.done = 0
        self.files = 10
        self.files_done = 0
        self.events = 0
        self.text_bytes = 0

    def input_bytes(self) -> int:
        return self.done


@pytest.mark.parametrize("tty", [True, False])
async def test_progress_reports(monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
                                tty: bool) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = FakeProgress()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: cli._show_progress(progress, tty=tty))
        for step in range(1, 21):  # 20 s: a long merge that slows down, so figures get shorter
            await trio.sleep(1)
            progress.done = 50 * step
            progress.files_done = step // 2
            progress.events = 123_456_789 if step < 10 else 7
            progress.text_bytes = (300 << 20) * step
        nursery.cancel_scope.cancel()
    written = stderr.getvalue()
    if tty:
        rewrites = written.split("\r")[1:]
        assert len(rewrites) >= 39  # every 0.5 s, and a last one
        assert all(rewrite.endswith("\x1b[K") for rewrite in rewrites[:-1])  # cleared: no stale characters
        assert rewrites[-1].endswith("\x1b[K\n")
        last = rewrites[-1]
    else:
        lines = written.splitlines()
        assert 4 <= len(lines) <= 5 and all(line.startswith("pwriter: ") for line in lines)  # every 5 s
        assert "\r" not in written and "\x1b" not in written
        last = lines[-1]
    assert "100.0%" in last and "10/10 files" in last and "7 events" in last and "6,000 MiB text" in last
    assert "done" in last
    middle = cli.progress_text(_at(progress, 250), 5.0)
    assert re.search(r"25\.0%.*ETA 0:15", middle), middle


def _at(progress: FakeProgress, done: int) -> FakeProgress:
    progress.done = done
    return progress


def test_progress_on_a_pipe_is_plain_lines(tmp_path) -> None:
    done = run_cli("gen-corpus", str(tmp_path / "in"), "--files", "3", "--events", "200")
    assert done.returncode == 0
    merged = run_cli("merge", "-d", str(tmp_path / "in"), "-o", str(tmp_path / "m.pfw"), "--progress")
    assert merged.returncode == 0, merged.stderr
    lines = merged.stderr.splitlines()
    assert lines and all(line.startswith("pwriter: ") for line in lines) and "3/3 files" in lines[-1]
    assert "\x1b" not in merged.stderr and "\r" not in merged.stderr
