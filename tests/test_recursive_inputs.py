"""``-r``/``--recursive`` with ``-d`` (issue 22, point 3): every trace below
the directory, hidden names skipped, symlinked directories not followed, in
a stable natural order; the output's own files below excluded."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from pwriter.data.inputs import collect_inputs
from pwriter.data.output import names_of_output
from pwriter.errors import UsageError
from pwriter.faces.testing import event_counter

from helpers import expect_failure, run_cli


def trace(path: pathlib.Path, name: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[\n{{"id":1,"name":"{name}","pid":1,"tid":1,"ts":1,"dur":1,"ph":"X","cat":"t"}}\n]\n')
    return str(path)


@pytest.fixture
def tree(tmp_path) -> tuple[pathlib.Path, list[str]]:
    """A tree of traces, nested and not; hidden ones and a symlinked directory
    that must not be read.  Returns its root and the traces below it, in the expected order."""
    root = tmp_path / "runs"
    expected = [
        trace(root / "app_2.pfw", "a2"),
        trace(root / "app_10.pfw", "a10"),
        trace(root / "job1" / "deep" / "x.pfw", "j1dx"),  # (natural order of the paths: "deep/" before "rank_")
        trace(root / "job1" / "rank_2.pfw", "j1r2"),
        trace(root / "job1" / "rank_10.pfw", "j1r10"),
        trace(root / "job2" / "rank_0.pfw", "j2r0"),
    ]
    trace(root / ".hidden" / "h.pfw", "hidden dir")
    trace(root / "job1" / ".h.pfw", "hidden file")
    (root / "job1" / "notes.txt").write_text("not a trace\n")
    outside = tmp_path / "elsewhere"
    trace(outside / "o.pfw", "outside")
    os.symlink(outside, root / "job2" / "linked")
    return root, expected


def test_collect_inputs_below_a_directory(tree) -> None:
    root, expected = tree
    assert collect_inputs([], [str(root)], recursive=True) == expected
    assert collect_inputs([], [str(root)]) == expected[:2]  # (not recursive: this level only)
    (root / "empty" / ".hidden").mkdir(parents=True)
    trace(root / "empty" / ".hidden" / "h.pfw", "hidden")
    with pytest.raises(UsageError, match="no \\*.pfw or \\*.pfw.gz traces below this directory"):
        collect_inputs([], [str(root / "empty")], recursive=True)


def test_the_order_is_stable_whatever_the_listing_order(tree, monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected = tree
    real = os.scandir

    class Reversed:
        def __init__(self, path: str) -> None:
            self._iterator = real(path)

        def __enter__(self):
            return reversed(list(self._iterator))

        def __exit__(self, *exc: object) -> None:
            self._iterator.close()

    monkeypatch.setattr(os, "scandir", Reversed)
    assert collect_inputs([], [str(root)], recursive=True) == expected


@pytest.mark.parametrize("output", ["job1/out.pfw", "job1/deep/out.pfw.gz"])
@pytest.mark.parametrize("layout", ["striped", "sharded"])
def test_merge_recursive_into_its_own_tree_twice(tree, output: str, layout: str) -> None:
    """The output's own files below the directory (any depth, any layout) are never inputs."""
    root, expected = tree
    target = str(root / output)
    for _ in range(2):
        done = run_cli("merge", "-d", str(root), "-r", "-o", target, "--layout", layout, "--force", "--json",
                       "--no-fsync", "--verify")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["inputs"] == len(expected)
    assert collect_inputs([], [str(root)], exclude=names_of_output(target), recursive=True) == expected
    done = run_cli("verify", target, "-d", str(root), "-r", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["input_events"] == len(expected)
    assert event_counter([target + ".shards" if layout == "sharded" else target]) == event_counter(expected)


def test_verify_without_recursive_misses_the_nested_traces(tree, tmp_path) -> None:
    root, _ = tree
    target = str(tmp_path / "all.pfw")
    assert run_cli("merge", "-d", str(root), "--recursive", "-o", target, "--no-fsync").returncode == 0
    assert run_cli("verify", target, "-d", str(root), "--recursive").returncode == 0
    assert run_cli("verify", target, "-d", str(root)).returncode == 1  # (the nested ones are not expected)


@pytest.mark.parametrize("command", ["merge", "verify"])
def test_recursive_without_a_directory_is_refused(tree, tmp_path, command: str) -> None:
    _, expected = tree
    args = [*expected, "-o", str(tmp_path / "m.pfw")] if command == "merge" else [expected[0], *expected]
    done = run_cli(command, *args, "-r")
    expect_failure(done, 2, "-r/--recursive", "-d DIR")
    assert not (tmp_path / "m.pfw").exists()


def test_an_unreadable_directory_below_is_a_usage_error(tree, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tree
    locked = root / "job2" / "locked"
    locked.mkdir()
    real = os.scandir

    def scandir(path: str):  # (as a user without the permission: the tests may run as root)
        if os.path.samefile(path, locked):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UsageError, match="locked: cannot read the directory: Permission denied"):
        collect_inputs([], [str(root)], recursive=True)
