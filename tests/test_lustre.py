"""The Lustre layout set on create: policy, the fake ``lfs`` (tests/fake_lfs.py), liblustreapi, info, merge."""

from __future__ import annotations

import json
import os
import sys

import pytest

from pwriter.data import lustre
from pwriter.data.detect import StatfsResult
from pwriter.data.output import is_temporary_name
from pwriter.errors import WriteError
from pwriter.faces.cli import main as cli_main
from pwriter.faces.testing import read_events
from pwriter.plan.settings import ConfigError, load_settings
from pwriter.plan.sizing import AUTO_STRIPE_ALL_FROM, FsInfo, FsKind, plan_sizing, shard_offsets
from pwriter.service.merge import merge
from pwriter.service.writer import open_writer

from helpers import published

LUSTRE_MAGIC = 0x0BD00BD0
MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


class FakeLustre:
    def __init__(self, root: str, state: str) -> None:
        self.root = root
        self.state = state

    def calls(self) -> list[list[str]]:
        try:
            with open(os.path.join(self.state, "calls.jsonl")) as log:
                return [json.loads(line) for line in log]
        except FileNotFoundError:
            return []

    def setstripes(self) -> list[list[str]]:
        return [call for call in self.calls() if call[0] == "setstripe"]


@pytest.fixture
def fake_lustre(tmp_path, monkeypatch: pytest.MonkeyPatch) -> FakeLustre:
    """tmp_path/lustre is "on Lustre" (statfs says so), with a fake ``lfs`` first on PATH."""
    bin_dir, state, root = tmp_path / "bin", tmp_path / "lfs-state", tmp_path / "lustre"
    for directory in (bin_dir, state, root):
        directory.mkdir()
    lfs = bin_dir / "lfs"
    lfs.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {HERE!r})\n"
                   "from fake_lfs import main\nsys.exit(main(sys.argv[1:]))\n")
    lfs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LFS_STATE", str(state))
    monkeypatch.setattr(lustre, "_api", False)  # no liblustreapi here: lfs it is
    real_statfs = __import__("pwriter.data.detect", fromlist=["statfs"]).statfs

    def statfs(path: str) -> StatfsResult:
        if os.path.abspath(path).startswith(str(root)):
            return StatfsResult(LUSTRE_MAGIC, 4096)
        return real_statfs(path)

    monkeypatch.setattr("pwriter.data.detect.statfs", statfs)
    return FakeLustre(str(root), str(state))


def lines(count: int, tag: str = "x") -> list[bytes]:
    return [b'{"id":%d,"name":"%s","pad":"%s"}\n' % (n, tag.encode(), b"p" * (n % 50)) for n in range(count)]


# -- the policy (pure) -------------------------------------------------------

LUSTRE = FsInfo(FsKind.LUSTRE, LUSTRE_MAGIC, "/lustre", stripe_size=MiB, stripe_count=1, ost_count=16,
                layout_setter="lfs")


def sizing_for(fs: FsInfo = LUSTRE, expected: int | None = None, **settings: object):
    return plan_sizing(fs, load_settings(**settings), producers=None, available_memory=8 << 30, cpu_count=8,
                       expected_bytes=expected)


def test_auto_stripes_large_outputs_over_every_ost() -> None:
    sizing = sizing_for(expected=AUTO_STRIPE_ALL_FROM)
    assert sizing.striping is not None
    assert (sizing.striping.stripe_count, sizing.striping.stripe_size) == (-1, MiB)  # the directory's size kept
    assert sizing.lanes == 16  # capped by the 16 stripes, not by the directory's single stripe
    assert any("every OST" in reason for reason in sizing.reasons)


@pytest.mark.parametrize("expected", [None, AUTO_STRIPE_ALL_FROM - 1])
def test_auto_leaves_small_or_unsized_outputs_to_the_directory(expected: int | None) -> None:
    sizing = sizing_for(expected=expected)
    assert sizing.striping is None
    assert sizing.lanes == 1  # the directory's one stripe
    assert any("directory's default" in reason for reason in sizing.reasons)


def test_auto_gives_each_shard_one_stripe_on_spread_osts() -> None:
    sizing = sizing_for(layout="sharded", lanes=4)
    assert sizing.striping is not None
    assert sizing.striping.stripe_count == 1
    assert sizing.striping.offsets == (0, 4, 8, 12)
    assert shard_offsets(3, 2) == (0, 1, 0)  # more shards than OSTs: round robin
    assert shard_offsets(2, None) == (-1, -1)  # OSTs unknown: Lustre's choice


def test_explicit_count_and_size() -> None:
    sizing = sizing_for(stripe_count=4, stripe_size="4MiB")
    assert sizing.striping is not None
    assert (sizing.striping.stripe_count, sizing.striping.stripe_size) == (4, 4 * MiB)
    assert sizing.stripe_size == 4 * MiB and sizing.lanes == 4
    assert sizing_for(stripe_count=0, expected=1 << 40).striping is None  # 0: always the directory's default


@pytest.mark.parametrize(("settings", "needle"), [
    ({"stripe_count": 32}, "has 16 OSTs"),
    ({"stripe_count": 2, "stripe_size": "96KiB"}, "multiple of 65536"),
])
def test_layouts_that_cannot_be_set_are_refused(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        sizing_for(**settings)


def test_no_way_to_set_a_layout() -> None:
    fs = FsInfo(FsKind.LUSTRE, LUSTRE_MAGIC, "/lustre", stripe_size=MiB, stripe_count=1)
    assert sizing_for(fs, expected=1 << 40).striping is None  # auto: says why, sets nothing
    with pytest.raises(ConfigError, match="neither liblustreapi nor the lfs command"):
        sizing_for(fs, stripe_count=2)


def test_other_filesystems_get_no_layout() -> None:
    local = FsInfo(FsKind.LOCAL, 0xEF53, "/", ost_count=None, layout_setter="lfs")
    assert sizing_for(local, expected=1 << 40, stripe_count=4).striping is None


# -- on create, with the fake lfs -----------------------------------------------

async def test_library_sets_the_layout_on_create_and_sizes_by_it(fake_lustre, settings_for) -> None:
    target = os.path.join(fake_lustre.root, "merged.pfw")
    sent = lines(3000)
    async with open_writer(target, settings=settings_for(stripe_size="1MiB"),
                           expected_bytes=AUTO_STRIPE_ALL_FROM) as writer:
        async with writer.producer() as producer:
            await producer.send_lines(sent)
    stats = writer.statistics()
    (call,) = fake_lustre.setstripes()
    assert call[:5] == ["setstripe", "-c", "-1", "-S", str(MiB)]
    assert is_temporary_name(os.path.basename(call[-1])) and os.path.dirname(call[-1]) == fake_lustre.root
    assert stats.layout == "padded-striped" and stats.stripe_size == MiB
    assert stats.lanes == min(4, 2 * (os.cpu_count() or 1))  # the 4 OSTs of the -1 layout, or 2 x the CPUs
    assert sorted(read_events(target)) == sorted(line.rstrip(b"\n") for line in sent)
    assert [name for name in os.listdir(fake_lustre.root) if is_temporary_name(name)] == []


async def test_sizing_follows_the_layout_read_back(fake_lustre, settings_for, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_LFS_SIZE", str(4 * MiB))  # the filesystem gives 4 MiB stripes whatever was asked
    target = os.path.join(fake_lustre.root, "merged.pfw")
    sent = lines(2000)
    async with open_writer(target, settings=settings_for(stripe_count=2, stripe_size="1MiB")) as writer:
        async with writer.producer() as producer:
            await producer.send_lines(sent)
    assert writer.sizing.stripe_size == 4 * MiB
    assert any("read back" in reason and "sized again" in reason for reason in writer.sizing.reasons)
    assert sorted(read_events(target)) == sorted(line.rstrip(b"\n") for line in sent)


async def test_shards_get_one_stripe_each_on_spread_osts(fake_lustre, settings_for, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_LFS_OSTS", "8")
    target = os.path.join(fake_lustre.root, "merged.pfw")
    sent = lines(2000)
    async with open_writer(target, settings=settings_for(layout="sharded", lanes=4)) as writer:
        for lane in range(4):  # (handles go to the lanes in turn)
            async with writer.producer() as producer:
                await producer.send_block(b"".join(sent[lane::4]))
    calls = fake_lustre.setstripes()
    assert [call[1:7] for call in calls] == [["-c", "1", "-S", str(MiB), "-i", str(first)]  # the directory's size
                                             for first in (0, 2, 4, 6)]
    assert sorted(read_events(published(target, "sharded"))) == sorted(line.rstrip(b"\n") for line in sent)


async def test_a_layout_that_cannot_be_set_publishes_nothing(fake_lustre, settings_for, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_LFS_FAIL", "No space left on device")
    target = os.path.join(fake_lustre.root, "merged.pfw")
    with pytest.raises(WriteError, match="with its Lustre layout: lfs setstripe: .*No space left") as caught:
        async with open_writer(target, settings=settings_for(stripe_count=2)):
            raise AssertionError("the block must not run")  # pragma: no cover
    assert target in str(caught.value)
    assert os.listdir(fake_lustre.root) == []


def test_merge_cli_sets_the_layout_and_info_shows_it(fake_lustre, tmp_path, capsys) -> None:
    inputs = []
    for rank in range(3):
        path = tmp_path / f"rank{rank}.pfw"
        path.write_bytes(b"[\n" + b"".join(lines(500, f"r{rank}")) + b"]\n")
        inputs.append(str(path))
    target = os.path.join(fake_lustre.root, "merged.pfw")
    assert cli_main(["info", target, "--stripe-count", "3", "--stripe-size", "2MiB"]) == 0
    shown = capsys.readouterr().out
    assert "filesystem:   lustre" in shown and "OSTs:         4" in shown
    assert "set on create: stripe count 3, stripe size 2097152, first OST Lustre's choice (by lfs)" in shown
    assert cli_main(["info", target, "--json", "--size", "2GiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lustre_layout"] == {"stripe_count": -1, "stripe_size": MiB, "first_osts": [-1],
                                       "set_by": "lfs"}  # the directory's stripe size, over every OST
    assert fake_lustre.setstripes() == []  # info sets nothing

    assert cli_main(["merge", *inputs, "-o", target, "--stripe-count", "3", "--stripe-size", "2MiB",
                     "--no-fsync", "--no-progress"]) == 0
    (call,) = fake_lustre.setstripes()
    assert call[1:5] == ["-c", "3", "-S", str(2 * MiB)]
    assert sorted(read_events(target)) == sorted(
        line.rstrip(b"\n") for rank in range(3) for line in lines(500, f"r{rank}"))


def test_liblustreapi_is_used_when_present(tmp_path, monkeypatch) -> None:
    seen = []

    class FakeApi:
        def llapi_file_open(self, name: bytes, flags: int, mode: int, size: int, offset: int, count: int,
                            pattern: int) -> int:
            seen.append((os.fsdecode(name), size, offset, count, pattern))
            try:
                return os.open(name, flags, mode)
            except OSError as exc:
                return -exc.errno

    monkeypatch.setattr(lustre, "_api", FakeApi())
    assert lustre.layout_setter() == "liblustreapi"
    path = str(tmp_path / "f")
    fd = lustre.create_striped(path, stripe_count=8, stripe_size=4 * MiB, offset=3)
    os.close(fd)
    assert seen == [(path, 4 * MiB, 3, 8, lustre.LOV_PATTERN_RAID0)]
    with pytest.raises(FileExistsError):
        lustre.create_striped(path, stripe_count=8, stripe_size=4 * MiB)


def test_merge_api_passes_the_expected_size(fake_lustre, tmp_path, monkeypatch) -> None:
    # merge() knows its inputs' size: auto stripes over every OST from AUTO_STRIPE_ALL_FROM on.
    monkeypatch.setattr("pwriter.plan.sizing.AUTO_STRIPE_ALL_FROM", 1)
    source = tmp_path / "rank0.pfw"
    source.write_bytes(b"".join(lines(100)))
    import trio

    trio.run(lambda: merge([str(source)], os.path.join(fake_lustre.root, "m.pfw"),
                           settings=load_settings(fsync=False)))
    (call,) = fake_lustre.setstripes()
    assert call[1:3] == ["-c", "-1"]
