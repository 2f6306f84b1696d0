"""Publishing all or nothing: the fault sweep, --force that keeps the old
output, targets that are not regular files, and standard output."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pwriter.data.output
import pwriter.service.writer
from pwriter.data.output import is_temporary_name, lock_path, names_of_output, read_shard_set
from pwriter.errors import OutputExistsError, UsageError, WriteError
from pwriter.faces.testing import FaultBackend, event_counter, read_events, write_corpus
from pwriter.plan.settings import load_settings
from pwriter.service.merge import collect_inputs, merge
from pwriter.service.verify import verify

from helpers import BIN, dftracer_tool, expect_failure, published, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]


def snapshot(directory: str) -> dict[str, bytes]:
    """Every file of ``directory`` by name, with its bytes (symlinks as their target)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.islink(path):
            files[name] = os.readlink(path).encode()
        else:
            with open(path, "rb") as handle:
                files[name] = handle.read()
    return files


class Sweep:
    """One counter over every operation of a merge that can fail: backend
    writes and fsyncs, and the links, renames, small-file writes and fsyncs
    of publishing.  Operation number ``fail_at`` raises EIO."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.count = 0
        self.failed_at: str | None = None

    def tick(self, what: str, name: object) -> None:
        self.count += 1
        if self.count == self.fail_at:
            self.failed_at = what
            raise OSError(errno.EIO, f"injected failure of {what}", str(name))


class SweepBackend(FaultBackend):
    def __init__(self, inner: Any, sweep: Sweep) -> None:
        super().__init__(inner)
        self.sweep = sweep

    async def _maybe_fail(self, kind: str, fd: int) -> None:
        self.sweep.tick(kind, self._names.get(fd, fd))


class SweepOs:
    """``os`` as pwriter.data.output sees it, with the publishing calls counted."""

    COUNTED = ("link", "replace", "rename", "write", "fsync")

    def __init__(self, sweep: Sweep) -> None:
        self._sweep = sweep

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.COUNTED:
            return real

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._sweep.tick(name, args[-1] if name in ("link", "replace", "rename") else args[0])
            return real(*args, **kwargs)

        return counted


def install_sweep(monkeypatch: pytest.MonkeyPatch, sweep: Sweep) -> None:
    real_open_backend = pwriter.service.writer.open_backend

    @contextlib.asynccontextmanager
    async def open_backend(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with real_open_backend(*args, **kwargs) as inner:
            yield SweepBackend(inner, sweep)

    monkeypatch.setattr(pwriter.service.writer, "open_backend", open_backend)
    monkeypatch.setattr(pwriter.data.output, "os", SweepOs(sweep))


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_fault_sweep(tmp_path, settings_for, monkeypatch: pytest.MonkeyPatch, layout: str, compressed: bool,
                           force: bool) -> None:
    """Fail each operation of a small merge in turn: the target is then the
    previous output byte for byte (or absent), never a mix, and no temporary
    is left; with no failure, the new output is complete."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=300, seed=1)
    old_inputs = write_corpus(str(tmp_path / "old"), files=2, events_per_file=50, seed=2)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = str(out_dir / ("m.pfw.gz" if compressed else "m.pfw"))
    settings = settings_for(layout=layout, lanes=2, stripe_size="64KiB", fsync=True)
    if force:  # an existing output, of another size and shard count, to be replaced
        await merge(old_inputs, target, settings=settings_for(layout=layout, lanes=3, stripe_size="64KiB"))
    before = snapshot(str(out_dir))

    counting = Sweep(None)
    install_sweep(monkeypatch, counting)
    await merge(inputs, target, settings=settings, force=True)
    total = counting.count
    assert total > 5
    print(f"{layout} {'gzip' if compressed else 'plain'} {'force' if force else 'new'}: {total} operations swept")
    expected = event_counter(inputs)
    assert event_counter([published(target, layout)]) == expected
    # Back to the previous output, for the sweep proper.
    for name in os.listdir(out_dir):
        os.unlink(out_dir / name)
    for name, content in before.items():
        (out_dir / name).write_bytes(content)

    for fail_at in range(1, total + 1):
        sweep = Sweep(fail_at)
        install_sweep(monkeypatch, sweep)
        with pytest.raises((WriteError, OSError)):
            await merge(inputs, target, settings=settings, force=force)
        assert sweep.failed_at is not None
        assert snapshot(str(out_dir)) == before, f"operation {fail_at} ({sweep.failed_at}) of {total}"
    sweep = Sweep(total + 1)
    install_sweep(monkeypatch, sweep)
    await merge(inputs, target, settings=settings, force=force)
    assert event_counter([published(target, layout)]) == expected
    assert not [name for name in os.listdir(out_dir) if is_temporary_name(name)]
    if layout == "sharded":  # only the new set, listed by its manifest, is left
        shards = {os.path.basename(name) for name in read_shard_set(published(target, layout))}
        assert {name for name in os.listdir(out_dir) if ".shard_" in name} == shards


def test_reproduction_force_onto_a_directory_sidecar_keeps_the_old_output(tmp_path) -> None:
    """Issue 13's reproduction: the member index name is a directory."""
    inputs = write_corpus(str(tmp_path / "in"), files=2, events_per_file=100, seed=3)
    out = str(tmp_path / "out.pfw.gz")
    assert run_cli("merge", inputs[0], "-o", out).returncode == 0
    old = pathlib.Path(out).read_bytes()
    os.unlink(out + ".members.json")
    os.mkdir(out + ".members.json")
    done = run_cli("merge", *inputs, "-o", out, "--force")
    expect_failure(done, 2, out + ".members.json", "directory")
    assert pathlib.Path(out).read_bytes() == old


async def test_failed_index_publish_puts_the_old_output_back(tmp_path, settings_for,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the data file was renamed (here: renaming the member
    index) puts the previous data file back, the same inode."""
    inputs = write_corpus(str(tmp_path / "in"), files=2, events_per_file=100, seed=4)
    (tmp_path / "out").mkdir()
    target = str(tmp_path / "out" / "m.pfw.gz")
    await merge(inputs[:1], target, settings=settings_for())
    before = snapshot(str(tmp_path / "out"))
    inode = os.stat(target).st_ino
    real_replace = os.replace

    def replace(source: str, destination: str, **dir_fds: Any) -> None:
        if destination.endswith(".members.json"):
            raise OSError(errno.ENOSPC, "No space left on device", destination)
        real_replace(source, destination, **dir_fds)

    monkeypatch.setattr(pwriter.data.output.os, "replace", replace)
    with pytest.raises(WriteError, match="No space left on device"):
        await merge(inputs, target, settings=settings_for(), force=True)
    monkeypatch.undo()
    assert snapshot(str(tmp_path / "out")) == before
    assert os.stat(target).st_ino == inode


def test_short_writes_of_small_files_are_resumed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(pwriter.data.output.os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    pwriter.data.output.write_fully(fd, b"0123456789" * 10)
    os.close(fd)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 10


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "symlink-to-device", "directory", "dangling-symlink",
                                  "socket"])
def test_targets_that_are_not_regular_files_are_refused_even_with_force(tmp_path, kind: str) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=1, events_per_file=10, seed=5)
    out = tmp_path / "out.pfw"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink-to-fifo":
        os.mkfifo(tmp_path / "fifo")
        out.symlink_to(tmp_path / "fifo")
    elif kind == "symlink-to-device":
        out.symlink_to("/dev/null")
    elif kind == "directory":
        out.mkdir()
    elif kind == "dangling-symlink":
        out.symlink_to(tmp_path / "nothing")
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
        sock.close()
    before = os.lstat(out)
    done = run_cli("merge", *inputs, "-o", str(out), "--force")
    expect_failure(done, 2, str(out), "refusing to replace it")
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not [name for name in os.listdir(tmp_path) if is_temporary_name(name)]


def test_check_lists_the_directory_once_and_examines_each_name_once(tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """OutputSet.check lists the output directory once (for the killed runs'
    leftovers and the shard generation both), and stats a name only to
    follow a symlink (its lstat says the rest)."""
    target = tmp_path / "merged.pfw"
    target.write_bytes(b"[\n]\n")
    (tmp_path / "index.json").write_bytes(b"{}")
    (tmp_path / "merged.pfw.members.json").symlink_to(tmp_path / "index.json")
    (tmp_path / "merged.shard_000.pfw").write_bytes(b"")  # (generation 0 is taken: the set gets 1)
    listed: list[object] = []
    stats: list[object] = []
    real_listdir, real_stat = os.listdir, os.stat

    def listdir(path: Any = ".") -> list[str]:
        listed.append(path)
        return real_listdir(path)

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(os.fspath(path) if not isinstance(path, int) else path)
        return real_stat(path, *args, **kwargs)

    files = pwriter.data.output.OutputSet(str(target), sharded=True, files=2, force=True)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "stat", stat)
    try:
        files.check()
    finally:
        monkeypatch.undo()
        files.discard()
    assert len(listed) == 1
    assert files.generation == 1
    assert stats.count(str(target)) == 0
    assert stats.count(str(tmp_path / "merged.pfw.members.json")) == 1


def test_check_removes_a_killed_runs_shards_before_it_picks_the_generation(tmp_path) -> None:
    """The shards that a killed run's manifest temporary lists go first; their
    generation is then free again (the one listing of the directory, less
    what was removed)."""
    target = tmp_path / "merged.pfw"
    (tmp_path / "merged.shard_000.pfw").write_bytes(b"kept")
    (tmp_path / "merged.pfw.shards").write_bytes(b"merged.shard_000.pfw\n")
    (tmp_path / "merged.g1.shard_000.pfw").write_bytes(b"orphan")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = pwriter.data.output._host()
    stale = tmp_path / f".merged.pfw.shards{pwriter.data.output.TEMP_MARKER}{host}-{int(gone.stdout)}-0123abcd.tmp"
    stale.write_bytes(b"merged.g1.shard_000.pfw\n")
    files = pwriter.data.output.OutputSet(str(target), sharded=True, files=2, force=True)
    files.check()
    try:
        assert files.generation == 1
        assert sorted(os.listdir(tmp_path)) == [".merged.pfw.pwriter-lock", "merged.pfw.shards",
                                                "merged.shard_000.pfw"]
    finally:
        files.discard()
    assert (tmp_path / "merged.shard_000.pfw").read_bytes() == b"kept"


async def test_library_refuses_dev_stdout_and_says_force_true(tmp_path, settings_for) -> None:
    before = os.lstat("/dev/stdout")
    with pytest.raises(UsageError, match="refusing to replace it"):
        async with pwriter.service.writer.open_writer("/dev/stdout", settings=settings_for(), force=True):
            pass
    after = os.lstat("/dev/stdout")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    (tmp_path / "exists.pfw").write_bytes(b"[\n]\n")
    with pytest.raises(OutputExistsError, match=r"use force=True to replace it") as raised:
        async with pwriter.service.writer.open_writer(str(tmp_path / "exists.pfw"), settings=settings_for()):
            pass
    assert "--force" not in str(raised.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_merge_to_standard_output_in_read_order(tmp_path, backend_name: str, compress: bool) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=5, events_per_file=400, seed=6)
    args = [os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-", "--backend", backend_name,
            "--stripe-size", "64KiB", "--lanes", "3", "--json"] + (["--compress"] if compress else [])
    done = subprocess.run(args, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = gzip.decompress(done.stdout) if compress else done.stdout
    assert text.startswith(b"[\n") and text.endswith(b"]\n")
    (tmp_path / "piped.pfw").write_bytes(text)
    assert event_counter([str(tmp_path / "piped.pfw")]) == event_counter(inputs)
    assert b'"outputs"' in done.stderr.splitlines()[-1]  # the report goes to stderr
    assert sorted(os.listdir(tmp_path)) == ["in", "piped.pfw"]


def test_merge_to_a_closed_pipe_is_an_error(tmp_path) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=3000, seed=7)
    merge_proc = subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert merge_proc.stdout is not None and merge_proc.stderr is not None
    merge_proc.stdout.read(10)
    merge_proc.stdout.close()
    error = merge_proc.stderr.read().decode()
    merge_proc.stderr.close()
    assert merge_proc.wait(timeout=60) == 1
    assert error.startswith("pwriter: error: <stdout>: ") and "Broken pipe" in error


async def test_library_stream_target(tmp_path, settings_for) -> None:
    with open(tmp_path / "stream.pfw", "wb") as stream:
        stream.write(b"")
        async with pwriter.service.writer.open_writer(stream, settings=settings_for(lanes=2, stripe_size="64KiB")) as w:
            async with w.producer(batch_bytes=100) as producer:
                for n in range(2000):
                    await producer.send_line(b'{"n":%d}' % n)
    assert read_events(str(tmp_path / "stream.pfw")) == [b'{"n":%d}' % n for n in range(2000)]


def test_verify_with_standard_output_is_refused(tmp_path) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=1, events_per_file=10, seed=8)
    done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-", "--verify"],
                          capture_output=True, text=True, timeout=60)
    expect_failure(done, 2, "--verify")


# -- issue 19: nothing lost at the edges ---------------------------------------------

class Crash(BaseException):
    """Stands for SIGKILL: nothing of pwriter's handles it."""


def dead_pid() -> int:
    """The pid of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


class CrashingOs:
    """``os`` as pwriter.data.output sees it: the ``at``-th call that changes a
    name (link, rename, replace, unlink) raises :class:`Crash` instead; and
    ``getpid`` is ``pid`` (that of a process that has ended, so that what the
    "killed" run leaves, its lock and temporaries, is a dead process's)."""

    CHANGES = ("link", "rename", "replace", "unlink")

    def __init__(self, at: int | None, pid: int) -> None:
        self.at = at
        self.count = 0
        self.pid = pid

    def __getattr__(self, name: str) -> Any:
        if name == "getpid":
            return lambda: self.pid
        real = getattr(os, name)
        if name not in self.CHANGES:
            return real

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count == self.at:
                raise Crash(f"killed before {name}{args}")
            return real(*args, **kwargs)

        return counted


def crash_publishing(monkeypatch: pytest.MonkeyPatch, at: int | None, pid: int) -> CrashingOs:
    """From now on pwriter.data.output, as process ``pid``, dies at its ``at``-th
    name change: a dead process's cleanup does not run (its descriptors
    still close)."""
    crashing = CrashingOs(at, pid)
    monkeypatch.setattr(pwriter.data.output, "os", crashing)
    real_discard = pwriter.data.output.OutputSet.discard

    def discard(self: pwriter.data.output.OutputSet) -> None:
        if at is not None and crashing.count >= at:
            self.close_files()
            if getattr(self, "_dir_fd", None) is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
            return
        real_discard(self)

    monkeypatch.setattr(pwriter.data.output.OutputSet, "discard", discard)
    return crashing


def reader_view(target: str) -> tuple[list[str], dict[str, Any] | None]:
    """What a reader sees under ``target``: the files of the set (a manifest
    wins over a data file of the same name) and the member index, if any."""
    manifest = target + ".shards"
    files = read_shard_set(manifest) if os.path.exists(manifest) else [target] if os.path.exists(target) else []
    index_path = target + ".members.json"
    index = json.loads(pathlib.Path(index_path).read_text()) if os.path.exists(index_path) else None
    return files, index


def check_index_describes(files: list[str], index: dict[str, Any]) -> None:
    """Every member the index lists is where it says, with the text and events it says."""
    assert index["files"] == [os.path.basename(name) for name in files]
    contents = [pathlib.Path(name).read_bytes() for name in files]
    for member in index["members"]:
        data = contents[member["file"]][member["offset"] : member["offset"] + member["length"]]
        text = gzip.decompress(data)
        assert len(text) == member["text_length"]
        assert len([line for line in text.split(b"\n") if line.startswith(b"{")]) == member["events"]


@pytest.mark.parametrize("old_layout,new_layout", [("sharded", "sharded"), ("striped", "sharded"),
                                                   ("sharded", "striped"), ("striped", "striped")])
async def test_a_kill_at_any_step_of_publishing_leaves_one_whole_set(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                       old_layout: str, new_layout: str) -> None:
    """Issue 19, cases 10, 11 and 16: a --force merge into the directory it
    reads (gzip, so with a member index) killed before each name change of
    its publish in turn.  A reader then sees the old set or the new one,
    whole, with a member index that describes it or none; the next
    `merge -d DIR --force` reads exactly the inputs (never a leftover shard,
    so never "the output is the input"), and leaves exactly its own set."""
    directory = tmp_path / "in"
    inputs = write_corpus(str(directory), files=3, events_per_file=200, seed=19)
    old_inputs = write_corpus(str(tmp_path / "old"), files=2, events_per_file=60, seed=20)
    target = str(directory / "m.pfw.gz")
    new_events, old_events = event_counter(inputs), event_counter(old_inputs)
    old_settings = load_settings(backend="threads", fsync=False, layout=old_layout, lanes=3, stripe_size="64KiB")
    settings = load_settings(backend="threads", fsync=False, layout=new_layout, lanes=2, stripe_size="64KiB")

    def collect() -> list[str]:
        return collect_inputs([], [str(directory)], exclude=names_of_output(target))

    await merge(old_inputs, target, settings=old_settings)
    old_state = snapshot(str(directory))
    gone = dead_pid()
    counting = crash_publishing(monkeypatch, None, gone)
    await merge(collect(), target, settings=settings, force=True)
    monkeypatch.undo()
    changes = counting.count
    assert changes >= 4
    print(f"{old_layout} -> {new_layout}: {changes} name changes")

    for at in range(1, changes + 1):
        for name in os.listdir(directory):
            os.unlink(directory / name)
        for name, content in old_state.items():
            (directory / name).write_bytes(content)
        crash_publishing(monkeypatch, at, gone)
        with pytest.raises(BaseException) as raised:
            await merge(collect(), target, settings=settings, force=True)
        monkeypatch.undo()
        assert raised.group_contains(Crash) if isinstance(raised.value, BaseExceptionGroup) else (
            isinstance(raised.value, Crash)), raised.value
        files, index = reader_view(target)
        seen = event_counter(files)
        assert seen in (old_events, new_events), f"killed at name change {at} of {changes}"
        if index is not None:
            check_index_describes(files, index)

        assert sorted(collect()) == sorted(inputs), f"killed at name change {at} of {changes}"
        await merge(collect(), target, settings=settings, force=True)
        files, index = reader_view(target)
        assert event_counter(files) == new_events
        assert index is not None
        check_index_describes(files, index)
        published_names = {os.path.basename(name) for name in files} | {"m.pfw.gz.members.json"}
        if new_layout == "sharded":
            published_names.add("m.pfw.gz.shards")
        assert set(os.listdir(directory)) == published_names | {os.path.basename(name) for name in inputs}, (
            f"killed at name change {at} of {changes}")


class HeldMerge:
    """A `pwriter merge` whose last input is a FIFO that the test feeds: until
    the test closes it, the merge is certainly running, past its output's lock."""

    def __init__(self, tmp_path: pathlib.Path, inputs: list[str], out: str, *args: str) -> None:
        self.fifo = tmp_path / "live.pfw"
        os.mkfifo(self.fifo)
        self.process = subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", *inputs, str(self.fifo), "-o", out,
                                         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.feed: int | None = None
        for _ in range(6000):  # ENXIO until the merge opens the FIFO to read it
            try:
                self.feed = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.01)
        if self.feed is None:
            self.process.kill()
            raise AssertionError(f"the merge never read the FIFO: {self.process.communicate()}")
        self.lines = [b'{"id":%d,"name":"live"}' % n for n in range(50)]
        os.write(self.feed, b"".join(line + b"\n" for line in self.lines))

    def finish(self) -> subprocess.CompletedProcess[str]:
        assert self.feed is not None
        os.close(self.feed)
        stdout, stderr = self.process.communicate(timeout=120)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)


@pytest.mark.parametrize("layout", ["sharded", "striped"])
def test_a_second_run_onto_an_output_being_written_is_refused(tmp_path, layout: str) -> None:
    """Issue 19, case 6: while one `--force` merge writes an output (held
    mid-merge here), a second onto the same name exits 2 naming the first's
    host and pid, and writes nothing; the first publishes exactly its lines."""
    first = write_corpus(str(tmp_path / "a"), files=3, events_per_file=300, seed=61)
    second = write_corpus(str(tmp_path / "b"), files=3, events_per_file=300, seed=62)
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / "m.pfw.gz")
    args = ["--force", "--layout", layout, "--lanes", "2", "--no-fsync"]
    held = HeldMerge(tmp_path, first, out, *args)
    try:
        done = run_cli("merge", *second, "-o", out, *args)
        held_lock = pathlib.Path(lock_path(out)).read_text() if os.path.exists(lock_path(out)) else None
    finally:
        finished = held.finish()
    expect_failure(done, 2, out, "another pwriter is writing this output",
                   f"host {os.uname().nodename}, pid {held.process.pid}")
    assert held_lock == f"{os.uname().nodename} {held.process.pid}\n"
    assert finished.returncode == 0, finished.stderr
    expected = event_counter(first)
    expected.update(held.lines)
    files, index = reader_view(out)
    assert event_counter(files) == expected
    assert index is not None
    check_index_describes(files, index)
    names = {os.path.basename(name) for name in files} | {"m.pfw.gz.members.json"}
    assert set(os.listdir(tmp_path / "out")) == names | ({"m.pfw.gz.shards"} if layout == "sharded" else set())


def test_two_force_merges_at_once_publish_one_whole_set(tmp_path) -> None:
    """Issue 19, case 6: two `--force` merges started at once onto one
    sharded gzip output: each publishes (one after the other) or is refused
    with exit 2 naming the other's host and pid; the set left is exactly one
    run's lines, with its own member index."""
    runs = [write_corpus(str(tmp_path / name), files=4, events_per_file=1500, seed=seed)
            for name, seed in (("a", 63), ("b", 64))]
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / "m.pfw.gz")
    args = ["-o", out, "--force", "--layout", "sharded", "--lanes", "2", "--no-fsync"]
    processes = [subprocess.Popen([os.path.join(BIN, "pwriter"), "merge", *inputs, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for inputs in runs]
    results = [process.communicate(timeout=120) for process in processes]
    codes = [process.returncode for process in processes]
    assert 0 in codes and set(codes) <= {0, 2}, results
    for process, (_, stderr), other in zip(processes, results, reversed(processes), strict=True):
        if process.returncode == 2:
            assert f"another pwriter is writing this output (host {os.uname().nodename}, pid {other.pid})" in stderr
    files, index = reader_view(out)
    assert event_counter(files) in [event_counter(inputs) for inputs in runs]
    assert index is not None
    check_index_describes(files, index)
    assert set(os.listdir(tmp_path / "out")) == {os.path.basename(name) for name in files} | {
        "m.pfw.gz.members.json", "m.pfw.gz.shards"}


async def test_a_stale_lock_is_taken_over_and_a_live_or_remote_one_refused(tmp_path) -> None:
    """Issue 19, case 6: the lock of a process of this host that is gone is
    taken over; a live process's, or another host's (which cannot be
    checked), is refused (exit 2) naming its host and pid, and kept."""
    inputs = write_corpus(str(tmp_path / "in"), files=2, events_per_file=50, seed=65)
    out = str(tmp_path / "m.pfw")
    settings = load_settings(backend="threads", fsync=False)
    lock = pathlib.Path(lock_path(out))
    host = os.uname().nodename
    lock.write_text(f"{host} {dead_pid()}\n")
    await merge(inputs, out, settings=settings)
    assert not lock.exists() and event_counter([out]) == event_counter(inputs)
    for holder, hint in ((f"{host} {os.getpid()}", ""), (f"{host}x 12345", "remove the lock")):
        lock.write_text(holder + "\n")
        with pytest.raises(UsageError) as raised:
            await merge(inputs[:1], out, settings=settings, force=True)
        name, pid = holder.split()
        assert raised.value.exit_code == 2
        assert f"another pwriter is writing this output (host {name}, pid {pid})" in str(raised.value)
        assert hint in str(raised.value)
        assert lock.read_text() == holder + "\n"
    assert event_counter([out]) == event_counter(inputs)


async def test_manifest_names_are_read_exactly(tmp_path) -> None:
    """Issue 19, case 7: `--force` into ' out.pfw' (a leading space) replaces
    its own shards, never those of `out.pfw` beside it."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=100, seed=7)
    others = write_corpus(str(tmp_path / "other"), files=2, events_per_file=80, seed=8)
    settings = load_settings(backend="threads", fsync=False, layout="sharded", lanes=2)
    (tmp_path / "out").mkdir()
    out, spaced = str(tmp_path / "out" / "out.pfw"), str(tmp_path / "out" / " out.pfw")
    await merge(others, out, settings=settings)
    other_files = snapshot(str(tmp_path / "out"))
    await merge(inputs[:1], spaced, settings=settings)
    await merge(inputs, spaced, settings=settings, force=True)
    assert os.path.basename(read_shard_set(spaced + ".shards")[0]) in (" out.shard_000.pfw", " out.g1.shard_000.pfw")
    assert event_counter([spaced + ".shards"]) == event_counter(inputs)
    assert {name: content for name, content in snapshot(str(tmp_path / "out")).items()
            if name in other_files} == other_files
    assert event_counter([out + ".shards"]) == event_counter(others)
    newline = str(tmp_path / "out" / "two\nlines.pfw")
    with pytest.raises(UsageError, match="cannot hold a newline"):  # (its manifest could not list its shards)
        await merge(inputs, newline, settings=settings)
    assert not [name for name in os.listdir(tmp_path / "out") if "\n" in name]
    await merge(inputs, newline, settings=load_settings(backend="threads", fsync=False, layout="striped"))
    assert event_counter([newline]) == event_counter(inputs)


def event_count_of_directory(directory: str) -> int:
    done = subprocess.run([dftracer_tool("dftracer_event_count"), "-d", directory, "--log-level", "off"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


async def test_force_replaces_the_whole_set_whatever_its_layout(tmp_path) -> None:
    """Issue 19, case 11: `--force` with another layout under the same name
    leaves only the new set: striped over sharded (no old manifest or shards:
    `dftracer_event_count -d` counts the new set alone), sharded over striped
    (no old data file: verify passes), plain over gzip (no old member index:
    `pwriter info` describes none)."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=200, seed=11)
    old = write_corpus(str(tmp_path / "old"), files=2, events_per_file=90, seed=12)

    def settings(layout: str = "striped", **more: Any) -> Any:
        return load_settings(backend="threads", fsync=False, lanes=2, layout=layout, **more)

    counts = {}  # what the field's tool counts in a directory of one gzip merge of each corpus
    for name, corpus in (("new", inputs), ("old", old)):
        (tmp_path / f"ref_{name}").mkdir()
        await merge(corpus, str(tmp_path / f"ref_{name}" / "ref.pfw.gz"), settings=settings())
        counts[name] = event_count_of_directory(str(tmp_path / f"ref_{name}"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "m.pfw.gz")
    await merge(old, out, settings=settings("sharded"))
    await merge(inputs, out, settings=settings("striped"), force=True)
    assert sorted(os.listdir(out_dir)) == ["m.pfw.gz", "m.pfw.gz.members.json"]
    assert event_count_of_directory(str(out_dir)) == counts["new"]

    await merge(old, out, settings=settings("sharded"), force=True)
    assert "m.pfw.gz" not in os.listdir(out_dir)
    assert verify(out, old).match
    assert event_count_of_directory(str(out_dir)) == counts["old"]

    plain = str(out_dir / "p.pfw")
    await merge(old, plain, settings=settings(compress=True))
    assert os.path.exists(plain + ".members.json")
    await merge(inputs, plain, settings=settings(), force=True)
    assert not os.path.exists(plain + ".members.json")
    info = run_cli("info", plain)
    assert info.returncode == 0 and "gzip members:" not in info.stdout, info.stdout
    assert event_counter([plain]) == event_counter(inputs)


class FailingCloseOs:
    """``os`` as pwriter.data.output sees it: closing a data file's descriptor
    (a temporary of the output or of a shard) closes it, then reports EIO,
    as NFS reports a write that failed after ``write`` returned."""

    def __init__(self, stem: str) -> None:
        self._data = re.compile(re.escape(f".{stem}") + r"(\.g[0-9]+)?(\.shard_[0-9]+)?\.pfw(\.gz)?\.pwriter-(?!lock)")
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return self._close if name == "close" else getattr(os, name)

    def _close(self, fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        os.close(fd)
        if self._data.match(os.path.basename(path)):
            self.failed.append(path)
            raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("layout", ["striped", "sharded"])
async def test_a_write_error_reported_at_close_fails_the_merge(tmp_path, settings_for, layout: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, case 12: with fsync off, a write error that the filesystem
    reports only when the file is closed (NFS does) is a WriteError naming
    the file (exit 1), and nothing is published: the previous output stays."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=200, seed=12)
    (tmp_path / "out").mkdir()
    target = str(tmp_path / "out" / "m.pfw")
    settings = settings_for(layout=layout, lanes=2, stripe_size="64KiB", fsync=False)
    await merge(inputs[:1], target, settings=settings)
    before = snapshot(str(tmp_path / "out"))
    failing = FailingCloseOs("m")
    monkeypatch.setattr(pwriter.data.output, "os", failing)
    with pytest.raises(WriteError) as raised:
        await merge(inputs, target, settings=settings, force=True)
    monkeypatch.undo()
    assert failing.failed
    message = str(raised.value)
    assert "Input/output error" in message and "closing the file failed" in message
    assert message.startswith(target if layout == "striped" else str(tmp_path / "out" / "m."))
    assert raised.value.exit_code == 1
    assert snapshot(str(tmp_path / "out")) == before


class NoLinksOs(SweepOs):
    """:class:`SweepOs` on a filesystem that refuses hard links (vfat, CIFS): ``link`` is EPERM."""

    def __getattr__(self, name: str) -> Any:
        if name == "link":
            def link(*args: Any, **kwargs: Any) -> None:
                raise OSError(errno.EPERM, "Operation not permitted", args[-1])

            return link
        return super().__getattr__(name)


@pytest.mark.parametrize("layout", ["striped", "sharded"])
async def test_force_where_hard_links_are_refused(tmp_path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Issue 19, case 17: where link() is refused, --force keeps the old
    output by renaming it away: the merge publishes; and a failure at any
    later operation puts the old output back byte for byte."""
    inputs = write_corpus(str(tmp_path / "in"), files=3, events_per_file=150, seed=17)
    old_inputs = write_corpus(str(tmp_path / "old"), files=2, events_per_file=50, seed=18)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = str(out_dir / "m.pfw.gz")
    settings = load_settings(backend="threads", fsync=True, layout=layout, lanes=2, stripe_size="64KiB")
    await merge(old_inputs, target, settings=load_settings(backend="threads", fsync=False, layout=layout,
                                                            lanes=3, stripe_size="64KiB"))
    before = snapshot(str(out_dir))
    counting = Sweep(None)
    monkeypatch.setattr(pwriter.data.output, "os", NoLinksOs(counting))
    await merge(inputs, target, settings=settings, force=True)
    monkeypatch.undo()
    files, index = reader_view(target)
    assert event_counter(files) == event_counter(inputs)
    assert index is not None
    check_index_describes(files, index)
    assert not [name for name in os.listdir(out_dir) if name.startswith(".")]

    for fail_at in range(1, counting.count + 1):
        for name in os.listdir(out_dir):
            os.unlink(out_dir / name)
        for name, content in before.items():
            (out_dir / name).write_bytes(content)
        sweep = Sweep(fail_at)
        monkeypatch.setattr(pwriter.data.output, "os", NoLinksOs(sweep))
        with pytest.raises((WriteError, OSError)):
            await merge(inputs, target, settings=settings, force=True)
        monkeypatch.undo()
        assert snapshot(str(out_dir)) == before, f"operation {fail_at} ({sweep.failed_at}) of {counting.count}"
