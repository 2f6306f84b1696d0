import os
import struct
import subprocess

import pytest

from pwriter.data.detect import StatfsResult, detect_filesystem, nearest_existing, parse_lov_xattr
from pwriter.plan.settings import ConfigError, load_settings
from pwriter.plan.sizing import DEFAULT_STRIPE_SIZE, FsInfo, FsKind, fs_kind_from_magic, plan_sizing

MiB = 1 << 20
GiB = 1 << 30


def lov(stripe_size: int, stripe_count: int, magic: int = 0x0BD10BD0) -> bytes:
    return struct.pack("<IIQQIHH", magic, 1, 0x1234, 0, stripe_size, stripe_count, 0)


def fake_statfs(magic: int, bsize: int = 4096):
    def statfs(path: str) -> StatfsResult:
        return StatfsResult(magic, bsize)

    return statfs


def no_xattr(path: str, name: str) -> bytes:
    raise OSError(61, "No data available")


@pytest.mark.parametrize(
    ("magic", "kind"),
    [
        (0x6969, FsKind.NFS),
        (0x0BD00BD0, FsKind.LUSTRE),
        (0x47504653, FsKind.GPFS),
        (0x19830326, FsKind.BEEGFS),
        (0x01021994, FsKind.TMPFS),
        (0x858458F6, FsKind.TMPFS),
        (0xEF53, FsKind.LOCAL),
        (0x9123683E, FsKind.LOCAL),
    ],
)
def test_kind_from_magic(magic: int, kind: FsKind) -> None:
    assert fs_kind_from_magic(magic) is kind


def test_detect_lustre_reads_lov_xattr(tmp_path) -> None:
    seen = []

    def getxattr(path: str, name: str) -> bytes:
        seen.append((path, name))
        return lov(4 * MiB, 8)

    target = tmp_path / "not" / "yet" / "there.pfw"
    info = detect_filesystem(str(target), statfs=fake_statfs(0x0BD00BD0), getxattr=getxattr)
    assert info.kind is FsKind.LUSTRE
    assert (info.stripe_size, info.stripe_count) == (4 * MiB, 8)
    assert seen == [(str(tmp_path), "lustre.lov")]  # the nearest existing parent


def test_detect_lustre_falls_back_to_lfs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pwriter.data.detect.shutil.which", lambda name: "/usr/bin/lfs")
    calls = []

    def run(args, **kwargs):
        calls.append(args)
        if args[1] == "osts":
            return subprocess.CompletedProcess(args, 0, stdout="OBDS:\n0: f-OST0000_UUID ACTIVE\n"
                                                               "1: f-OST0001_UUID ACTIVE\n", stderr="")
        out = "2097152\n" if "--stripe-size" in args else "4\n"
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr("pwriter.data.lustre._api", False)
    info = detect_filesystem(str(tmp_path), statfs=fake_statfs(0x0BD00BD0), getxattr=no_xattr, run=run)
    assert (info.stripe_size, info.stripe_count, info.ost_count) == (2 * MiB, 4, 2)
    assert info.layout_setter == "lfs"
    assert [call[:2] for call in calls] == [["lfs", "getstripe"]] * 2 + [["lfs", "osts"]]


def test_detect_lustre_unknown_geometry(tmp_path) -> None:
    info = detect_filesystem(str(tmp_path), statfs=fake_statfs(0x0BD00BD0), getxattr=no_xattr,
                             run=lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr=""))
    assert info.kind is FsKind.LUSTRE
    assert info.stripe_size is None


def test_detect_gpfs_uses_block_size(tmp_path) -> None:
    info = detect_filesystem(str(tmp_path), statfs=fake_statfs(0x47504653, 16 * MiB))
    assert (info.kind, info.stripe_size) == (FsKind.GPFS, 16 * MiB)


@pytest.mark.parametrize("magic", [0x6969, 0x19830326, 0x01021994, 0xEF53])
def test_detect_other_kinds_have_no_stripe(tmp_path, magic: int) -> None:
    info = detect_filesystem(str(tmp_path), statfs=fake_statfs(magic), getxattr=no_xattr)
    assert info.stripe_size is None
    assert info.mount_point == "/" or os.path.ismount(info.mount_point)


def test_detect_real_path(tmp_path) -> None:
    info = detect_filesystem(str(tmp_path / "missing" / "out.pfw"))
    assert info.magic != 0
    assert os.path.ismount(info.mount_point)
    assert nearest_existing(str(tmp_path / "missing" / "out.pfw")) == str(tmp_path)


def test_parse_lov_variants() -> None:
    assert parse_lov_xattr(lov(MiB, 4, magic=0x0BD30BD0)) == (MiB, 4)
    assert parse_lov_xattr(lov(MiB, 0xFFFF)) == (MiB, None)  # -1: all OSTs
    assert parse_lov_xattr(lov(MiB, 4, magic=0x0BD60BD0)) == (None, None)  # composite layout
    assert parse_lov_xattr(b"short") == (None, None)


def plan(fs: FsInfo, producers: int | None = 16, memory: int = 16 * GiB, cpus: int = 8, **settings):
    return plan_sizing(fs, load_settings(**settings), producers=producers, available_memory=memory, cpu_count=cpus)


def test_local_is_striped_with_default_stripe() -> None:
    sizing = plan(FsInfo(FsKind.LOCAL, 0xEF53, "/"))
    assert sizing.layout == "striped"
    assert sizing.stripe_size == DEFAULT_STRIPE_SIZE
    assert sizing.lanes == 4
    assert sizing.buffers == 16 and sizing.queue_depth == 16


def test_write_calls_are_cut_for_the_page_cache_not_for_o_direct() -> None:
    local = FsInfo(FsKind.LOCAL, 0xEF53, "/")
    assert plan(local).write_call_size == 512 << 10
    assert plan(local, stripe_size="256KiB").write_call_size == 256 << 10  # never more than a stripe
    assert plan(local, direct=True).write_call_size == DEFAULT_STRIPE_SIZE  # one call per stripe
    lustre = FsInfo(FsKind.LUSTRE, 0x0BD00BD0, "/lustre", stripe_size=4 << 20, stripe_count=4)
    assert plan(lustre).write_call_size == 512 << 10
    explicit = plan(local, write_call_size="1MiB")
    assert explicit.write_call_size == 1 << 20
    assert any("write calls" in reason and "set explicitly" in reason for reason in explicit.reasons)
    with pytest.raises(ConfigError, match="write_call_size=500000"):
        plan(local, direct=True, write_call_size=500_000)


def test_tmpfs_is_striped() -> None:
    assert plan(FsInfo(FsKind.TMPFS, 0x01021994, "/dev/shm")).layout == "striped"


def test_nfs_is_sharded() -> None:
    sizing = plan(FsInfo(FsKind.NFS, 0x6969, "/home"))
    assert sizing.layout == "sharded"
    assert sizing.lanes == 8


def test_lustre_with_stripes_is_padded_and_capped_by_stripe_count() -> None:
    sizing = plan(FsInfo(FsKind.LUSTRE, 0x0BD00BD0, "/lustre", stripe_size=MiB, stripe_count=3))
    assert sizing.layout == "padded-striped"
    assert sizing.stripe_size == MiB
    assert sizing.lanes == 3


def test_parallel_fs_without_stripe_size_is_sharded() -> None:
    for kind in (FsKind.LUSTRE, FsKind.BEEGFS):
        assert plan(FsInfo(kind, 0, "/p")).layout == "sharded"
    # ... unless the user says what the stripe size is.
    assert plan(FsInfo(FsKind.BEEGFS, 0, "/p"), stripe_size="1M").layout == "padded-striped"


def test_gpfs_block_size_gives_padded() -> None:
    sizing = plan(FsInfo(FsKind.GPFS, 0x47504653, "/gpfs", stripe_size=8 * MiB))
    assert (sizing.layout, sizing.stripe_size, sizing.lanes) == ("padded-striped", 8 * MiB, 8)


def test_lanes_follow_producers_and_cpus() -> None:
    assert plan(FsInfo(FsKind.LOCAL, 0, "/"), producers=1).lanes == 1
    assert plan(FsInfo(FsKind.LOCAL, 0, "/"), producers=None, cpus=1).lanes == 2
    assert plan(FsInfo(FsKind.NFS, 0, "/"), producers=100, cpus=2).lanes == 4


def test_explicit_settings_win() -> None:
    sizing = plan(FsInfo(FsKind.NFS, 0x6969, "/"), layout="striped", lanes=7, stripe_size="256KiB",
                  buffers_per_lane=3, queue_depth=5)
    assert (sizing.layout, sizing.lanes, sizing.stripe_size, sizing.buffers, sizing.queue_depth) == (
        "striped", 7, 256 << 10, 21, 5)
    assert any("set explicitly" in reason for reason in sizing.reasons)


def test_memory_budget_cuts_buffers_then_lanes() -> None:
    fs = FsInfo(FsKind.LOCAL, 0, "/")
    small = plan(fs, memory=64 * MiB, stripe_size="4MiB")  # budget: 16 MiB
    assert small.buffers * small.stripe_size <= small.memory_budget == 16 * MiB
    assert small.buffers >= 2 * small.lanes
    assert small.lanes == 2  # 4 lanes x 2 x 4 MiB would not fit
    big = plan(fs, memory=64 * GiB)
    assert big.memory_budget == 256 * MiB


def test_memory_budget_too_small_is_an_error() -> None:
    with pytest.raises(ConfigError, match="memory_budget"):
        plan(FsInfo(FsKind.LOCAL, 0, "/"), memory_budget="16MiB", stripe_size="16MiB")


def test_stripe_size_must_be_page_multiple() -> None:
    with pytest.raises(ConfigError, match="stripe_size"):
        plan(FsInfo(FsKind.LUSTRE, 0, "/", stripe_size=100_000))


def test_direct_io_means_padded_striped() -> None:
    sizing = plan(FsInfo(FsKind.LOCAL, 0xEF53, "/"), direct=True)
    assert sizing.layout == "padded-striped"
    assert any("O_DIRECT" in reason for reason in sizing.reasons)
    with pytest.raises(ConfigError, match="padded-striped"):
        plan(FsInfo(FsKind.LOCAL, 0xEF53, "/"), direct=True, layout="sharded")


def test_plan_refuses_a_share_of_no_process(tmp_path) -> None:
    from pwriter.plan.settings import load_settings
    from pwriter.service.writer import plan

    with pytest.raises(ValueError, match="processes_per_node=0: at least 1"):
        plan(str(tmp_path / "m.pfw"), load_settings(), processes_per_node=0)
