"""pwriter: many trio producers, one stream of line records, written at the speed of the storage.

The public API is imported lazily so that ``import pwriter`` (and the
command line) stays cheap::

    async with pwriter.open_writer("merged.pfw") as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"name":"read","ts":1}')
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
    "merge",
    "collect_inputs",
]

_LAZY = {
    "open_writer": "writer",
    "Writer": "writer",
    "WriterStatistics": "writer",
    "Producer": "channels",
    "Settings": "settings",
    "load_settings": "settings",
    "ConfigError": "settings",
    "PwriterError": "errors",
    "UsageError": "errors",
    "DataError": "errors",
    "InputError": "errors",
    "WriteError": "errors",
    "merge": "merge",
    "collect_inputs": "merge",
}

if TYPE_CHECKING:
    from .channels import Producer
    from .errors import DataError, InputError, PwriterError, UsageError, WriteError
    from .merge import collect_inputs, merge
    from .settings import ConfigError, Settings, load_settings
    from .writer import Writer, WriterStatistics, open_writer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pwriter' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
