"""Publishing all or nothing: the fault sweep, --force that keeps the old
output, targets that are not regular files, and standard output."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import pathlib
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pwriter.output
import pwriter.writer
from pwriter.errors import OutputExistsError, UsageError, WriteError
from pwriter.merge import merge
from pwriter.output import is_temporary_name, read_shard_set
from pwriter.testing import FaultBackend, event_counter, read_events, write_corpus

from conftest import BIN, expect_failure, published, run_cli

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
    """``os`` as pwriter.output sees it, with the publishing calls counted."""

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
    real_open_backend = pwriter.writer.open_backend

    @contextlib.asynccontextmanager
    async def open_backend(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with real_open_backend(*args, **kwargs) as inner:
            yield SweepBackend(inner, sweep)

    monkeypatch.setattr(pwriter.writer, "open_backend", open_backend)
    monkeypatch.setattr(pwriter.output, "os", SweepOs(sweep))


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
    settings = settings_for(layout=layout, workers=2, stripe_size="64KiB", fsync=True)
    if force:  # an existing output, of another size and shard count, to be replaced
        await merge(old_inputs, target, settings=settings_for(layout=layout, workers=3, stripe_size="64KiB"))
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

    monkeypatch.setattr(pwriter.output.os, "replace", replace)
    with pytest.raises(WriteError, match="No space left on device"):
        await merge(inputs, target, settings=settings_for(), force=True)
    monkeypatch.undo()
    assert snapshot(str(tmp_path / "out")) == before
    assert os.stat(target).st_ino == inode


def test_short_writes_of_small_files_are_resumed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(pwriter.output.os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    pwriter.output.write_fully(fd, b"0123456789" * 10)
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


async def test_library_refuses_dev_stdout_and_says_force_true(tmp_path, settings_for) -> None:
    before = os.lstat("/dev/stdout")
    with pytest.raises(UsageError, match="refusing to replace it"):
        async with pwriter.writer.open_writer("/dev/stdout", settings=settings_for(), force=True):
            pass
    after = os.lstat("/dev/stdout")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    (tmp_path / "exists.pfw").write_bytes(b"[\n]\n")
    with pytest.raises(OutputExistsError, match=r"use force=True to replace it") as raised:
        async with pwriter.writer.open_writer(str(tmp_path / "exists.pfw"), settings=settings_for()):
            pass
    assert "--force" not in str(raised.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_merge_to_standard_output_in_read_order(tmp_path, backend_name: str, compress: bool) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=5, events_per_file=400, seed=6)
    args = [os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-", "--backend", backend_name,
            "--stripe-size", "64KiB", "--workers", "3", "--json"] + (["--compress"] if compress else [])
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
        async with pwriter.writer.open_writer(stream, settings=settings_for(workers=2, stripe_size="64KiB")) as w:
            async with w.producer(batch_bytes=100) as producer:
                for n in range(2000):
                    await producer.send_line(b'{"n":%d}' % n)
    assert read_events(str(tmp_path / "stream.pfw")) == [b'{"n":%d}' % n for n in range(2000)]


def test_verify_with_standard_output_is_refused(tmp_path) -> None:
    inputs = write_corpus(str(tmp_path / "in"), files=1, events_per_file=10, seed=8)
    done = subprocess.run([os.path.join(BIN, "pwriter"), "merge", *inputs, "-o", "-", "--verify"],
                          capture_output=True, text=True, timeout=60)
    expect_failure(done, 2, "--verify")
