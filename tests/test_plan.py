"""The writer's plan (pwriter.service.writer.WriterPlan): built from plain values, no I/O, printable.

Every target lives in a directory that does not exist: a plan that touched
the filesystem would fail there.
"""

import gzip

import pytest

from pwriter.plan.layout import GZIP_MIN_PADDING
from pwriter.plan.settings import ConfigError, Settings
from pwriter.plan.sizing import FsInfo, FsKind, plan_sizing
from pwriter.service.writer import output_format, plan, writer_plan

MiB = 1 << 20
NOWHERE = "/nonexistent-pwriter-dir/out"
LOCAL = FsInfo(kind=FsKind.LOCAL, magic=0xEF53, mount_point="/")


def make_plan(target: str, **settings_given: object):
    settings = Settings(**settings_given)
    sizing = plan_sizing(LOCAL, settings, producers=4, available_memory=8 << 30, cpu_count=4)
    form = output_format(target, settings)
    return writer_plan(target, settings, form, LOCAL, sizing)


def test_plain_striped_plan() -> None:
    plan = make_plan(NOWHERE + ".pfw", layout="striped", stripe_size="1MiB")
    assert (plan.compress, plan.header, plan.footer) == (False, b"[\n", b"]\n")
    assert (plan.header_text, plan.footer_text, plan.header_length, plan.min_padding) == (2, 2, 2, 1)
    assert (plan.files, plan.sidecars, plan.sharded) == (1, (), False)
    planner = plan.planner()
    assert (planner.layout, planner.files, planner.chunk_capacity) == ("striped", 1, 1 * MiB)
    shown = repr(plan)  # printable: every decision in one line
    assert NOWHERE + ".pfw" in shown and "layout='striped'" in shown and "stripe_size=1048576" in shown


def test_gzip_plan_frames_header_and_footer_as_members() -> None:
    plan = make_plan(NOWHERE + ".pfw.gz", layout="padded-striped", stripe_size="1MiB", level=1)
    assert plan.compress and plan.min_padding == GZIP_MIN_PADDING
    assert gzip.decompress(plan.header) == b"[\n" and gzip.decompress(plan.footer) == b"]\n"
    assert (plan.header_text, plan.footer_text, plan.header_length) == (2, 2, len(plan.header))
    assert plan.sidecars == (NOWHERE + ".pfw.gz.members.json",)
    assert plan.planner().layout == "padded-striped"


def test_sharded_plan_files_and_a_growing_set() -> None:
    fixed = make_plan(NOWHERE + ".pfw", layout="sharded", lanes=3, wrap="none")
    assert (fixed.files, fixed.header, fixed.footer, fixed.planner().files) == (3, b"", b"", 3)
    growing = make_plan(NOWHERE + ".pfw", layout="sharded", lanes=3, shard_size="4MiB")
    assert growing.files == 0  # shards are made as lanes start them


def test_share_keeps_the_header_place_but_not_its_bytes() -> None:
    plan = make_plan(NOWHERE + ".pfw", layout="striped")
    share = plan.for_share(writes_header=False, writes_footer=True)
    assert (share.header, share.header_text, share.header_length) == (b"", 0, 2)
    assert (share.footer, share.footer_text) == (b"]\n", 2)
    assert plan.header == b"[\n"  # frozen: the plan itself is unchanged


def test_plan_refuses_what_cannot_be_honoured() -> None:
    with pytest.raises(ConfigError, match="shard_size"):
        make_plan(NOWHERE + ".pfw", layout="striped", shard_size="4MiB")
    with pytest.raises(ConfigError, match="compress=False"):
        make_plan(NOWHERE + ".pfw.gz", compress=False)
    with pytest.raises(ConfigError, match="wrap='auto'"):
        make_plan(NOWHERE + ".pfw", wrap="auto")


def test_combine_statistics_sums_counts_and_keeps_the_rest() -> None:
    from pwriter.data.backends import BackendStatistics
    from pwriter.service.writer import WriterStatistics, combine_statistics

    def stats(n: int) -> WriterStatistics:
        io = BackendStatistics(backend="threads", writes=n, bytes_written=10 * n, short_writes=n, interrupted=n,
                               fsyncs=n, most_in_flight=n * n, submissions=n, enter_calls=n,
                               mechanism="pwritev")
        return WriterStatistics(
            outputs=(f"out{n}",), layout="striped", backend="threads", fs_kind="local", stripe_size=MiB, lanes=2,
            chunks=n, writes=n, line_bytes=n, bytes_written=n, deadline_flushes=n, uncopied_chunks=n,
            oversized_chunks=n, buffer_waits=n, direct_writes=n, writeback_hints=n, compressed=False,
            seconds=float(n), published=False, io=io)

    combined = combine_statistics([stats(1), stats(3)])
    assert (combined.outputs, combined.stripe_size, combined.seconds, combined.lanes) == (("out1",), MiB, 1.0, 4)
    for name in ("chunks", "writes", "line_bytes", "bytes_written", "deadline_flushes", "uncopied_chunks",
                 "oversized_chunks", "buffer_waits", "direct_writes", "writeback_hints"):
        assert getattr(combined, name) == 4, name
    assert (combined.io.writes, combined.io.bytes_written, combined.io.fsyncs) == (4, 40, 4)
    assert (combined.io.most_in_flight, combined.io.backend) == (9, "threads")  # the largest, not the sum
    assert combined.io.mechanism == "pwritev"


def test_a_writer_plan_serves_as_the_framing_of_another(tmp_path) -> None:
    """A WriterPlan is an OutputFormat (it extends it): given as the framing
    of a new plan, only the framing's fields are taken (every field of the
    plan was, and clashed with the new plan's own: TypeError)."""
    settings = Settings()
    first_target, second_target = str(tmp_path / "a.pfw"), str(tmp_path / "b.pfw")
    fs, sizing = plan(first_target, settings)
    first = writer_plan(first_target, settings, output_format(first_target, settings), fs, sizing)
    second = writer_plan(second_target, settings, first, fs, sizing)
    assert second.target == second_target
    assert (second.header, second.footer, second.compress) == (first.header, first.footer, first.compress)
