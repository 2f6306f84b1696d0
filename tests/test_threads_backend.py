"""The thread-pool backend's write loop: short writes, EINTR, errors."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from pwriter.data.backends import BackendCounters, BackendUnavailable, available_backends, open_backend
from pwriter.data.backends.threads import ThreadBackend, pwritev_fully


def test_short_writes_are_resumed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    calls = []

    def stingy(fd, buffers, offset):
        calls.append(offset)
        # Write at most 3 bytes of the first buffer per call.
        first = memoryview(buffers[0])[:3]
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "pwritev", stingy)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    result = BackendCounters()
    try:
        pwritev_fully(fd, [b"hello", b"", b" world\n"], 10, "f", result)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[10:] == b"hello world\n"
    assert data[:10] == bytes(10)
    assert result.writes == len(calls) == 5 and result.short_writes == 4  # 3+2, 3+3+1 bytes
    assert result.bytes_written == 12


def test_calls_carry_at_most_write_call_size_even_after_short_writes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    sizes = []

    def stingy(fd, buffers, offset):
        wanted = sum(memoryview(buffer).nbytes for buffer in buffers)
        sizes.append(wanted)
        if len(sizes) % 3 == 0:  # every third call stops after 1,000 bytes
            return real(fd, [memoryview(buffers[0])[:1000]], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", stingy)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    parts = [bytes([65 + n]) * 10_000 for n in range(5)]
    counts = BackendCounters()
    try:
        pwritev_fully(fd, parts, 0, "f", counts, write_call_size=4096)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(parts)
    assert max(sizes) == 4096 and len(sizes) == counts.writes
    assert counts.short_writes == counts.writes // 3 and counts.bytes_written == 50_000


def test_eintr_is_retried(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    failures = [InterruptedError(errno.EINTR, "Interrupted")]

    def flaky(fd, buffers, offset):
        if failures:
            raise failures.pop()
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", flaky)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    counts = BackendCounters()
    try:
        pwritev_fully(fd, [b"abc"], 0, "f", counts)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"
    assert (counts.writes, counts.short_writes, counts.interrupted) == (2, 0, 1)


def test_zero_byte_write_is_an_error_not_a_loop(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError) as caught:
        pwritev_fully(3, [b"abc"], 0, "named.pfw", BackendCounters())
    assert caught.value.errno == errno.EIO and caught.value.filename == "named.pfw"


async def test_errors_carry_errno_and_name(tmp_path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    backend = ThreadBackend(queue_depth=2)
    backend.register(fd, "the-output.pfw")
    try:
        with pytest.raises(OSError) as caught:
            await trio.to_thread.run_sync(backend.write, fd, [b"data"], 0)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EBADF
    assert caught.value.filename == "the-output.pfw"


async def test_statistics_and_concurrency_bound(tmp_path) -> None:
    backend = ThreadBackend(queue_depth=3)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    backend.register(fd, "f")
    try:
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(trio.to_thread.run_sync, backend.write, fd, [b"%04d" % index], index * 4)
        await backend.fsync(fd)
    finally:
        os.close(fd)
    stats = backend.statistics()
    assert (stats.backend, stats.writes, stats.bytes_written, stats.fsyncs) == ("threads", 20, 80, 1)
    assert (tmp_path / "f").read_bytes() == b"".join(b"%04d" % i for i in range(20))


async def test_selection_in_one_place() -> None:
    reasons = available_backends()
    assert reasons["threads"] is None
    async with open_backend("auto", queue_depth=4) as backend:
        assert backend.name == ("io_uring" if reasons["io_uring"] is None else "threads")
    async with open_backend("threads", queue_depth=4) as backend:
        assert backend.name == "threads"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        async with open_backend("carrier-pigeon", queue_depth=4):
            pass
    if reasons["io_uring"] is not None:
        with pytest.raises(BackendUnavailable, match="io_uring") as caught:
            async with open_backend("io_uring", queue_depth=4):
                pass
        assert caught.value.exit_code == 2
