"""Which JSON check for ``merge --validate``: stdlib json, orjson, or pwriter's C check.

    .venv/bin/python bench/validate_parsers.py [--mib 64]

Generates ``--mib`` MiB of realistic event lines and checks every line with
each parser: ``json.loads`` (stdlib), ``orjson.loads`` (when installed:
``pip install orjson``) and pwriter's own check (``pwriter._native``, the
one ``--validate`` uses; it only validates, it builds no objects).  Best of
three in one thread, then the speed-up of two threads checking two copies
at once (1.0 = the parser holds the GIL).  Not run in CI.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from thread_scaling import one_and_two_threads

from bench import event_text
from pwriter.plan.traceformat import BlockCleaner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    text = event_text(args.mib)
    size, line_count = len(text), text.count(b"\n")

    def stdlib() -> None:
        loads = json.loads
        for line in text.split(b"\n")[:-1]:
            loads(line)

    checks: dict[str, Callable[[], None]] = {"json (stdlib)": stdlib}
    try:
        import orjson

        def with_orjson() -> None:
            loads = orjson.loads
            for line in text.split(b"\n")[:-1]:
                loads(line)

        checks["orjson"] = with_orjson
    except ImportError:
        pass

    def native() -> None:
        buffer = bytearray(text)
        with memoryview(buffer) as view:
            end = BlockCleaner("bench", validate=True).clean_in_place(view, 0, len(buffer))
        assert end == len(buffer)

    from pwriter.plan.traceformat import _native

    if _native is not None:
        checks["pwriter C check"] = native
    print(f"{size / 2**20:.0f} MiB of text, {line_count} lines")
    print(f"{'parser':<18} {'GiB/s':>7} {'2 threads':>10}")
    for name, work in checks.items():
        one, speedup = one_and_two_threads(work)
        print(f"{name:<18} {size / one / 2**30:7.2f} {speedup:9.2f}x")


if __name__ == "__main__":
    main()
