"""pwriter's public names: many producers, or many trace files, into one output of line records.

Writing from trio tasks::

    async with pwriter.open_writer("merged.pfw") as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"name":"read","ts":1}')

From plain threads, asyncio (through ``asyncio.to_thread``) or dask::

    with pwriter.open_writer_sync("merged.pfw") as writer:
        with writer.producer() as producer:
            producer.send_line(b'{"name":"read","ts":1}')

Merging trace files: :func:`merge` (trio) and :func:`merge_sync`.

The names below are imported on first use, so that ``import pwriter`` (and
the command line) stays cheap; ``dir(pwriter)`` and ``help(pwriter)`` list
them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "open_writer",
    "Writer",
    "WriterStatistics",
    "Producer",
    "Settings",
    "load_settings",
    "ConfigError",
    "PwriterError",
    "UsageError",
    "DataError",
    "InputError",
    "WriteError",
    "ClosedError",
    "BusyError",
    "OutputExistsError",
    "merge",
    "merge_sync",
    "collect_inputs",
    "open_writer_sync",
    "SyncWriter",
    "SyncProducer",
]

_MODULES = {
    "service.writer": ("open_writer", "Writer", "WriterStatistics"),
    "service.handle": ("Producer",),
    "plan.settings": ("Settings", "load_settings", "ConfigError"),
    "errors": ("PwriterError", "UsageError", "DataError", "InputError", "WriteError", "ClosedError", "BusyError",
               "OutputExistsError"),
    "service.merge": ("merge", "collect_inputs"),
    "faces.sync": ("merge_sync", "open_writer_sync", "SyncWriter", "SyncProducer"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

if TYPE_CHECKING:
    from .errors import (
        BusyError,
        ClosedError,
        DataError,
        InputError,
        OutputExistsError,
        PwriterError,
        UsageError,
        WriteError,
    )
    from .faces.sync import SyncProducer, SyncWriter, merge_sync, open_writer_sync
    from .plan.settings import ConfigError, Settings, load_settings
    from .service.handle import Producer
    from .service.merge import collect_inputs, merge
    from .service.writer import Writer, WriterStatistics, open_writer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pwriter' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API (imported or not yet) and the module's own dunders."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
