"""How fast a piece of work runs in one thread, and how it scales to two
(used by ``gzip_readers.py`` and ``validate_parsers.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def one_and_two_threads(work: Callable[[], None]) -> tuple[float, float]:
    """Seconds of ``work`` in one thread (best of three), and the speed-up of
    two threads each doing the whole work at once (2.0 = perfect, 1.0 = the
    work holds the GIL)."""
    one = min(_timed(work) for _ in range(3))
    threads = [threading.Thread(target=work) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return one, 2 * one / (time.perf_counter() - start)


def _timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
