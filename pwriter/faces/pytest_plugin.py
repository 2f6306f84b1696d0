"""pwriter's pytest plugin: fixtures for tests of code that writes through pwriter.

Registered through the ``pytest11`` entry point ``pwriter``.  The fixtures are plain ones that hand out
objects and factories, so they work under pytest-trio (``trio_mode`` or ``@pytest.mark.trio``) and with
``autojump_clock``: the writer's deadlines are on the trio clock.  Assert on *when* data is written through
``pwriter_memory_backend`` (plain output): real backends and gzip work in threads, which a virtual clock
does not wait for::

    async def test_events_arrive(pwriter_open_writer, pwriter_memory_backend, autojump_clock):
        async with pwriter_open_writer(backend=pwriter_memory_backend, max_delay=10) as writer:
            async with writer.producer() as producer:
                await producer.send_line(b'{"name":"read"}')
                await trio.sleep(30)  # no time passes for real
            assert pwriter_memory_backend.events() == [b'{"name":"read"}']
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:  # imported by the fixtures, so that pytest starts fast where they are not used
    from ..data.backends import Backend
    from ..plan.settings import Settings
    from ..plan.sizing import FsInfo, FsKind
    from ..service.writer import Writer
    from .testing import FaultBackend, MemoryBackend

__all__ = ["OpenWriter", "FakeFs"]


class OpenWriter(Protocol):
    """The type of the ``pwriter_open_writer`` fixture."""

    def __call__(
        self,
        name: str = "out.pfw",
        *,
        settings: Settings | None = None,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> contextlib.AbstractAsyncContextManager[Writer]: ...


class FakeFs(Protocol):
    """The type of the ``pwriter_fake_fs`` fixture."""

    def __call__(
        self,
        kind: FsKind | str,
        *,
        stripe_size: int | str | None = None,
        stripe_count: int | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> FsInfo: ...


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pwriter_fault(fail_at=None, error=errno.EIO or 'EIO', on='any'|'write'|'fsync', delay=0.0, "
        "inner='threads'): "
        "how the pwriter_fault_backend fixture misbehaves",
    )


@pytest.fixture
def pwriter_memory_backend() -> MemoryBackend:
    """A pwriter backend that keeps every write (file, offset, bytes, trio time) in memory."""
    from .testing import MemoryBackend

    return MemoryBackend()


@pytest.fixture
def pwriter_fault_backend(request: pytest.FixtureRequest) -> FaultBackend:
    """A pwriter backend that fails the Nth write or fsync with an errno, or delays every one.

    Configured by ``@pytest.mark.pwriter_fault(fail_at=2, error=errno.ENOSPC, on="write", delay=0.0,
    inner="threads")`` (or its attributes); ``inner``: ``"threads"`` (real files, the default) or ``"memory"``.
    """
    from ..data.backends.threads import ThreadBackend
    from .testing import FaultBackend, MemoryBackend

    marker = request.node.get_closest_marker("pwriter_fault")
    options = dict(marker.kwargs) if marker is not None else {}
    inner_name = options.pop("inner", "threads")
    if inner_name not in ("threads", "memory"):
        raise pytest.UsageError(f"pwriter_fault: inner must be 'threads' or 'memory', not {inner_name!r}")
    inner: Backend = MemoryBackend() if inner_name == "memory" else ThreadBackend(queue_depth=8)
    return FaultBackend(inner, **options)


@pytest.fixture
def pwriter_fake_fs(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> FakeFs:
    """Pretend that tmp_path (or a given path) is on Lustre, GPFS, BeeGFS, NFS or tmpfs, for sizing.

    ``pwriter_fake_fs("lustre", stripe_size="1MiB", stripe_count=8, path=...)`` returns the
    :class:`~pwriter.plan.sizing.FsInfo` that detection now reports under ``path`` (default ``tmp_path``).
    """
    from .testing import FakeFilesystems

    fakes = FakeFilesystems()
    monkeypatch.setattr("pwriter.data.detect.detect_filesystem", fakes.detect)

    def fake(kind: FsKind | str, *, stripe_size: int | str | None = None, stripe_count: int | None = None,
             path: str | os.PathLike[str] | None = None) -> FsInfo:
        return fakes.add(path if path is not None else tmp_path, kind, stripe_size=stripe_size,
                         stripe_count=stripe_count)

    return fake


@pytest.fixture
def pwriter_open_writer(tmp_path: os.PathLike[str]) -> OpenWriter:
    """Open a pwriter writer on a file in tmp_path: ``async with pwriter_open_writer("out.pfw") as writer``.

    The keywords are :func:`pwriter.open_writer`'s; ``backend`` is a name or a backend object.  Without
    ``settings`` the backend is ``"threads"`` and ``fsync`` is off unless given.
    """

    def open_test_writer(name: str = "out.pfw", *, settings: Settings | None = None,
                         backend: str | Backend | None = None,
                         **options: Any) -> contextlib.AbstractAsyncContextManager[Writer]:
        from ..service.writer import open_writer

        if settings is None:
            options.setdefault("fsync", False)
            if backend is None:
                backend = "threads"
        return open_writer(os.path.join(tmp_path, name), settings=settings, backend=backend, **options)

    return open_test_writer
