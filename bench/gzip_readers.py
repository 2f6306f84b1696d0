"""Which gzip reader for the merge: stdlib gzip, python-isal or zlib-ng.

    .venv/bin/python bench/gzip_readers.py [--mib 64]

Compresses ``--mib`` MiB of generated trace text (zlib level 6, as tracers
do), then reads it back 4 MiB at a time with each library's GzipFile: best of
three in one thread, and the speed-up of two threads reading two copies at
once (1.0 = the library holds the GIL).  Not run in CI; needs
``pip install zlib-ng`` for the zlib-ng row (isal is a dependency).
"""

from __future__ import annotations

import argparse
import gzip
import io

from thread_scaling import one_and_two_threads

from bench import event_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    text = event_text(args.mib)
    size = len(text)
    raw = gzip.compress(text, compresslevel=6)
    readers = {"gzip (stdlib)": gzip}
    try:
        from isal import igzip

        readers["python-isal"] = igzip
    except ImportError:
        pass
    try:
        from zlib_ng import gzip_ng

        readers["zlib-ng"] = gzip_ng
    except ImportError:
        pass
    print(f"{size / 2**20:.0f} MiB of text, {len(raw) / 2**20:.0f} MiB of gzip")
    print(f"{'reader':<16} {'GiB/s':>7} {'2 threads':>10}")
    for name, module in readers.items():
        def work(module=module) -> None:  # (bound now: each reader's own module)
            reader = module.GzipFile(fileobj=io.BytesIO(raw))
            while reader.read(4 << 20):
                pass

        one, speedup = one_and_two_threads(work)
        print(f"{name:<16} {size / one / 2**30:7.2f} {speedup:10.2f}")


if __name__ == "__main__":
    main()
