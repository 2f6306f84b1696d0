"""The library path under random load (issue 12): random numbers of
producers, batch sizes, line sizes and pauses, producers cancelled at random
moments, and max_delay deadlines on a virtual clock.  Every line of a call
that returned appears exactly once, none of a call that was cancelled (issue
19), each handle's lines keep their order, and no line waits longer than
max_delay from its call to the write of its chunk."""

from __future__ import annotations

import collections
import os
import tempfile

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwriter.faces.testing import MemoryBackend
from pwriter.plan.settings import load_settings
from pwriter.plan.sizing import FsInfo, FsKind
from pwriter.service.writer import open_writer

LOCAL = FsInfo(FsKind.LOCAL, 0xEF53, "/")

producer_plans = st.lists(
    st.fixed_dictionaries({
        "lines": st.integers(0, 400),
        "batch_bytes": st.sampled_from([1, 200, 4096, 65536]),
        "size": st.integers(1, 3000),
        "send_lines_every": st.integers(0, 7),  # 0: send_line only; n: a send_lines batch of n at times
        "pause_every": st.integers(0, 50),
        "cancel_after": st.one_of(st.none(), st.integers(0, 400)),
    }),
    min_size=1, max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=producer_plans, layout=st.sampled_from(["striped", "padded-striped", "sharded"]),
       lanes=st.integers(1, 4), max_delay=st.sampled_from([0.01, 0.5, 5.0]))
def test_every_accepted_line_once_in_handle_order(plans: list[dict[str, int | None]], layout: str, lanes: int,
                                                  max_delay: float) -> None:
    memory = MemoryBackend()
    accepted: dict[int, list[bytes]] = collections.defaultdict(list)
    sent_at: dict[bytes, float] = {}

    def line(producer: int, n: int, size: int) -> bytes:
        head = b'{"p":%d,"n":%d,"x":"' % (producer, n)
        return head + b"x" * max(0, size - len(head) - 2) + b'"}'

    async def produce(writer: object, index: int, plan: dict[str, int | None]) -> None:
        cancel_after = plan["cancel_after"]
        with trio.CancelScope() as scope:
            async with writer.producer(batch_bytes=plan["batch_bytes"]) as producer:  # type: ignore[attr-defined]
                n = 0
                while n < plan["lines"]:
                    if cancel_after is not None and n >= cancel_after:
                        scope.cancel()  # the next send is cancelled, and takes nothing
                    every = plan["send_lines_every"]
                    batch = [line(index, k, plan["size"]) for k in range(n, min(n + every, plan["lines"]))]
                    if every and n % (3 * every) == 0 and batch:
                        now = trio.current_time()
                        await producer.send_lines(batch)
                        accepted[index].extend(batch)  # (only once the call returned)
                        sent_at.update((one, now) for one in batch)
                        n += len(batch)
                    else:
                        one = line(index, n, plan["size"])
                        sent_at[one] = trio.current_time()
                        await producer.send_line(one)
                        accepted[index].append(one)
                        n += 1
                    pause = plan["pause_every"]
                    if pause and n % pause == 0:
                        await trio.sleep(max_delay * 0.7)  # let deadlines pass now and then

    async def main() -> None:
        writer_settings = load_settings(layout=layout, lanes=lanes, stripe_size="64KiB", fsync=False,
                                        max_delay=max_delay)
        async with open_writer(os.path.join(directory, "out.pfw"), settings=writer_settings, fs=LOCAL,
                               backend=memory, producers=len(plans)) as writer:
            async with trio.open_nursery() as nursery:
                for index, plan in enumerate(plans):
                    nursery.start_soon(produce, writer, index, plan)

    with tempfile.TemporaryDirectory() as directory:  # (the memory backend writes nothing there)
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    events = memory.events()
    assert collections.Counter(events) == collections.Counter(
        line_ for lines in accepted.values() for line_ in lines)
    by_producer: dict[bytes, list[bytes]] = collections.defaultdict(list)
    for event in events:
        by_producer[event.split(b",", 1)[0]].append(event)
    for index, lines in accepted.items():
        assert by_producer[b'{"p":%d' % index] == lines  # a handle's lines keep their order
    for write in memory.writes:
        for written in write.data.split(b"\n"):
            if written in sent_at:
                assert write.time - sent_at[written] <= max_delay + 1e-9, (written[:20], write.time - sent_at[written])
