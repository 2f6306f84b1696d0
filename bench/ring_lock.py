"""How the merge's reader threads should write with io_uring: issue 12 asked
to measure a ring per thread against one shared ring with a submission lock.

Not run in CI.  ``.venv/bin/python bench/ring_lock.py [--inputs plain|gzip] [--rounds 5]``

In one process, on the bench corpus (``bench/bench.py``'s), shuffled rounds of
``merge()`` (striped, io_uring backend, no fsync) with three ways for a
reader thread to write the chunk it filled:

* ``pwritev``: what pwriter does (``IoUringBackend.write``);
* ``shared ring + lock``: the thread takes a lock, preps one SQE per write
  call (512 KiB) on the backend's own ring, submits, releases the lock and
  waits on a ``threading.Event`` that the backend's reaper (a trio task,
  woken by the ring's eventfd) sets when the last completion is reaped;
* (a ring of each thread's own, used synchronously, was measured earlier and
  removed: 1.18-1.19x the floor against 1.03-1.11x for ``pwritev``; see
  ``pwriter/data/backends/io_uring.py``).

This is a prototype for measuring, patched onto the backend here, not a
product path: it assumes the trio thread writes nothing while the readers
do (true of a merge: the header goes first, the footer last).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import build_corpus  # noqa: E402
from pwriter.data.backends import io_uring  # noqa: E402
from pwriter.plan.settings import load_settings  # noqa: E402
from pwriter.service.merge import merge  # noqa: E402

KiB = 1 << 10
THREAD_DATA = 1 << 60  # user_data of the threads' operations (the trio thread's count up from 1)


def prep_writev(self: io_uring.IoUringBackend, fd: int, views: list[memoryview], offset: int,
                user_data: int) -> tuple[int, object]:
    """One writev SQE on the backend's ring (what its write path once did)."""
    target, fixed_file = self._target(fd)
    handles = [self._ffi.from_buffer(view) for view in views]
    iovecs = self._ffi.new("struct iovec[]", len(views))
    for index, (handle, view) in enumerate(zip(handles, views, strict=True)):
        iovecs[index].iov_base = handle
        iovecs[index].iov_len = view.nbytes
    rc = self._lib.pw_prep_writev(self._ring, target, fixed_file, iovecs, len(views), offset, user_data)
    return rc, (iovecs, handles, list(views))


def shared_ring_write(self: io_uring.IoUringBackend, fd: int, buffers: Sequence[object], offset: int) -> None:
    views = [memoryview(buffer).cast("B") for buffer in buffers]  # type: ignore[arg-type]
    call = self.write_call_size or (1 << 62)
    if len(views) == 1:  # one SQE per write call, submitted together
        view = views[0]
        writes = [([view[start : start + call]], offset + start) for start in range(0, view.nbytes, call)]
    else:
        writes = [(views, offset)]
    done = threading.Event()
    state = self._thread_state  # type: ignore[attr-defined]
    with state["lock"]:
        waiting = {"left": len(writes), "done": done, "results": [], "keep": []}
        for parts, at in writes:
            user_data = state["next"]
            state["next"] += 1
            rc, keep = prep_writev(self, fd, parts, at, user_data)
            if rc < 0:
                raise OSError(-rc, "prep failed")
            waiting["keep"].append(keep)
            state["ops"][user_data] = waiting
        self._lib.io_uring_submit(self._ring)
    done.wait()
    expected = [sum(part.nbytes for part in parts) for parts, _ in writes]
    if sorted(waiting["results"]) != sorted(expected):  # (a short write would need resubmitting)
        raise OSError(f"short or failed write: {waiting['results']} for {expected}")


def shared_ring_drain(self: io_uring.IoUringBackend) -> None:
    state = self._thread_state  # type: ignore[attr-defined]
    while True:
        count = self._lib.pw_reap(self._ring, self._reap_user_data, self._reap_result, io_uring.REAP_BATCH)
        for index in range(count):
            user_data, result = self._reap_user_data[index], self._reap_result[index]
            if user_data >= THREAD_DATA:
                with state["lock"]:
                    waiting = state["ops"].pop(user_data)
                    waiting["results"].append(result)
                    waiting["left"] -= 1
                    if not waiting["left"]:
                        waiting["done"].set()
                continue
            operation = self._operations.pop(user_data)
            operation.result = result
            operation.keep = None
            operation.done.set()
        if count < io_uring.REAP_BATCH:
            break
    if self._queued and self._broken is None:
        self._submit()
    if not self._operations:
        self._idle.set()


def run_merge(paths: list[str], target: str, variant: str) -> float:
    backend = io_uring.IoUringBackend
    saved = (backend.write, backend.drain, backend.__init__)
    if variant == "shared ring + lock":
        original_init = backend.__init__

        def init(self: io_uring.IoUringBackend, **kwargs: object) -> None:
            original_init(self, **kwargs)  # type: ignore[arg-type]
            self._thread_state = {"lock": threading.Lock(), "next": THREAD_DATA, "ops": {}}  # type: ignore[attr-defined]

        backend.__init__ = init  # type: ignore[method-assign]
        backend.write = shared_ring_write  # type: ignore[method-assign,assignment]
        backend.drain = shared_ring_drain  # type: ignore[method-assign]
    settings = load_settings(backend="io_uring", layout="striped", fsync=False)
    try:
        start = time.perf_counter()
        trio.run(lambda: merge(paths, target, settings=settings, force=True))
        return time.perf_counter() - start
    finally:
        backend.write, backend.drain, backend.__init__ = saved  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/pwriter-bench")
    parser.add_argument("--inputs", choices=("plain", "gzip"), default="plain")
    args = parser.parse_args()
    plain, gz = build_corpus(args.dir, args.mib, compressed=args.inputs == "gzip")
    paths = gz if args.inputs == "gzip" else plain
    out = os.path.join(args.dir, "out")
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, "ring.pfw")
    variants = ["pwritev", "shared ring + lock"]
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    run_merge(paths, target, "pwritev")  # warm-up, and the size every variant's output must have
    size = os.path.getsize(target)
    os.unlink(target)
    for _ in range(args.rounds):
        random.shuffle(variants)
        for variant in variants:
            seconds[variant].append(run_merge(paths, target, variant))
            assert os.path.getsize(target) == size, (variant, os.path.getsize(target), size)
            os.unlink(target)
    print(f"merge() of the {args.inputs} corpus ({args.mib} MiB), io_uring backend, in process, "
          f"{args.rounds} shuffled rounds:")
    for variant, measured in seconds.items():
        print(f"  {variant:<22} median {statistics.median(measured):.3f} s   fastest {min(measured):.3f} s")


if __name__ == "__main__":
    main()
