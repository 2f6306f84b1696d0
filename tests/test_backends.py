"""Backend contract tests, run against every backend through open_backend."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import trio

from pwriter.data.backends import MECHANISMS, open_backend
from pwriter.faces.testing import read_events
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.writer import open_writer

MiB = 1 << 20


async def write(backend, fd: int, buffers: list, offset: int) -> None:  # type: ignore[no-untyped-def]
    """The backend's one write, blocking, in a thread (as the chunk sink calls it)."""
    await trio.to_thread.run_sync(backend.write, fd, buffers, offset)


@pytest.fixture
def fsize_limit():
    """Lower RLIMIT_FSIZE for the test (SIGXFSZ ignored, so writes return short or EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


async def test_short_write_is_resubmitted_then_efbig_is_named(tmp_path, backend_name: str, fsize_limit) -> None:
    path = tmp_path / "limited"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        async with open_backend(backend_name, queue_depth=4) as backend:
            backend.register(fd, "limited.pfw")
            fsize_limit(MiB + MiB // 2)
            with pytest.raises(OSError) as caught:
                await write(backend, fd, [b"a" * MiB, b"b" * MiB], 0)
            stats = backend.statistics()
            backend.unregister(fd)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == "limited.pfw"
    assert stats.short_writes >= 1 and stats.writes >= 2
    assert os.path.getsize(path) == MiB + MiB // 2  # the first part landed, then the limit


async def test_errno_and_name_on_a_bad_descriptor(tmp_path, backend_name: str) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        async with open_backend(backend_name, queue_depth=2) as backend:
            backend.register(fd, "the-output.pfw")
            with pytest.raises(OSError) as caught:
                await write(backend, fd, [b"data"], 0)
            backend.unregister(fd)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EBADF
    assert caught.value.filename == "the-output.pfw"
    assert "the-output.pfw" in str(caught.value)


async def test_cancelled_writes_never_return_while_the_kernel_holds_the_buffer(tmp_path, backend_name: str) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    returned: list[tuple[int, bytearray]] = []
    try:
        async with open_backend(backend_name, queue_depth=4) as backend:
            backend.register(fd, "f")

            async def one(index: int) -> None:
                buffer = bytearray(bytes([65 + index % 26])) * MiB
                try:
                    await write(backend, fd, [buffer], index * MiB)
                finally:
                    # Whatever happened, the kernel is done with the buffer now:
                    # scribbling on it must not change the file.
                    returned.append((index, buffer))
                    buffer[:] = b"\0" * len(buffer)

            with trio.move_on_after(0.002):
                async with trio.open_nursery() as nursery:
                    for index in range(32):
                        nursery.start_soon(one, index)
            assert len(returned) == 32
            backend.unregister(fd)
    finally:
        os.close(fd)
    data = path.read_bytes()
    for index in range(32):
        block = data[index * MiB : (index + 1) * MiB]
        # Written in full with its letter, or not at all (a hole): a mix would
        # mean the kernel read the buffer after write() returned and we zeroed it.
        if block:
            assert block.count(block[:1]) == len(block) and block[:1] in (b"\0", bytes([65 + index % 26]))


async def test_more_writes_than_the_queue_depth(tmp_path, backend_name: str) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        async with open_backend(backend_name, queue_depth=2) as backend:
            backend.register(fd, "f")
            async with trio.open_nursery() as nursery:
                for index in range(64):
                    nursery.start_soon(write, backend, fd, [b"%05d\n" % index], index * 6)
            await backend.fsync(fd)
            stats = backend.statistics()
            backend.unregister(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(b"%05d\n" % index for index in range(64))
    assert stats.fsyncs == 1 and stats.bytes_written == 64 * 6
    assert 1 <= stats.most_in_flight <= 64


async def test_a_write_is_cut_into_calls_of_write_call_size(tmp_path, backend_name: str) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    first = bytes(range(256)) * 800  # 204,800 bytes
    second = b"tail\n" * 200  # 1,000 bytes
    try:
        async with open_backend(backend_name, queue_depth=4, write_call_size=64 << 10) as backend:
            backend.register(fd, "f")
            await write(backend, fd, [first, b"", second], 12_345)
            await write(backend, fd, [b"small\n"], 12_345 + len(first) + len(second))
            stats = backend.statistics()
            backend.unregister(fd)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:12_345] == bytes(12_345)
    assert data[12_345:] == first + second + b"small\n"
    # 205,800 bytes in calls of at most 65,536: 4 calls, then 1 for the small write.
    assert stats.writes == 5 and stats.short_writes == 0
    assert stats.bytes_written == len(first) + len(second) + 6


async def test_writer_with_a_ring_smaller_than_its_buffers(tmp_path, backend_name: str) -> None:
    settings = load_settings(backend=backend_name, fsync=True, stripe_size="64KiB", lanes=4,
                             buffers_per_lane=4, queue_depth=2, layout="striped", write_call_size="32KiB")
    target = str(tmp_path / "out.pfw")
    lines = [b'{"n":%d,"pad":"%s"}' % (n, b"p" * (n % 300)) for n in range(20_000)]
    async with open_writer(target, settings=settings, fs=FsInfo(FsKind.LOCAL, 0, "/")) as writer:
        async def produce(part: int) -> None:
            async with writer.producer() as producer:
                for line in lines[part::8]:
                    await producer.send_line(line)

        async with trio.open_nursery() as nursery:
            for part in range(8):
                nursery.start_soon(produce, part)
    assert sorted(read_events(target)) == sorted(lines)
    io = writer.statistics().io
    assert io.backend == backend_name
    # 64 KiB stripes written in calls of at most 32 KiB: more calls than chunks.
    assert io.writes >= io.bytes_written / (32 << 10) and io.writes > writer.statistics().chunks
    assert io.mechanism == MECHANISMS[backend_name]
    if backend_name == "io_uring":
        assert io.submissions >= io.enter_calls > 0  # (the fsync: writes are pwritev from the lanes' threads)


def test_uring_abi_matches_build_script() -> None:
    from pwriter import _uring_build
    from pwriter.data.backends import io_uring

    assert io_uring.PW_ABI == _uring_build.PW_ABI


def test_without_the_extension_auto_falls_back_and_io_uring_is_refused(tmp_path) -> None:
    """As on a machine without liburing: the module cannot be imported."""
    trace = tmp_path / "a.pfw"
    trace.write_bytes(b'{"a":1}\n')
    script = (
        "import sys; sys.modules['pwriter._uring'] = None\n"
        "from pwriter.faces.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)

    refused = run("merge", str(trace), "-o", str(tmp_path / "u.pfw"), "--backend", "io_uring")
    assert refused.returncode == 2
    assert "io_uring is unavailable" in refused.stderr and "liburing" in refused.stderr
    assert not (tmp_path / "u.pfw").exists()
    auto = run("merge", str(trace), "-o", str(tmp_path / "a-out.pfw"), "--json")
    assert auto.returncode == 0, auto.stderr
    assert '"backend": "threads"' in auto.stdout
    info = run("info", str(tmp_path))
    assert "io_uring: unavailable" in info.stdout


def test_outer_cancellation_with_writes_in_flight_ends(tmp_path, backend_name: str) -> None:
    """Cancelling a scope that holds the backend itself while writes and
    fsyncs are in flight: they finish, the backend closes, nothing hangs.  (The
    io_uring reaper once died with the scope and left its waiters hanging.)
    Run in a subprocess so that a regression fails by timeout, not by hanging."""
    script = f"""
import os, trio
from pwriter.data.backends import open_backend

async def main():
    fd = os.open({str(tmp_path / "f")!r}, os.O_WRONLY | os.O_CREAT)
    with trio.CancelScope() as outer:
        async with open_backend({backend_name!r}, queue_depth=8) as backend:
            backend.register(fd, "f")
            async with trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(trio.to_thread.run_sync, backend.write, fd, [bytes(8 << 20)], index * (8 << 20))
                    nursery.start_soon(backend.fsync, fd)
                await trio.sleep(0)
                await trio.sleep(0)
                outer.cancel()
            backend.unregister(fd)
    os.close(fd)
    print("closed")

trio.run(main)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "closed"
