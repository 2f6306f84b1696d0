"""The field's own readers (dftracer-utils' C++ tools) read every event of
every layout's gzip output, padding included (issue 14): dftracer_split
(which stops at the first empty gzip member), dftracer_event_count and
dftracer_validate, on 16 ranks made by dftracer_gen_fake_trace."""

from __future__ import annotations

import gzip
import pathlib
import re
import subprocess

import pytest

from pwriter.data.output import read_shard_set
from pwriter.faces.testing import read_text

from helpers import dftracer_tool, fake_ranks, run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("ranks")
    fake_ranks(directory, ranks=16, epochs=1, steps=100)
    return directory


def event_count(directory: pathlib.Path) -> int:
    done = subprocess.run([dftracer_tool("dftracer_event_count"), "-d", str(directory), "--log-level", "off"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def split(directory: pathlib.Path, out: pathlib.Path) -> str:
    """dftracer_split -s 64 --verify (one chunk: all lines, merged back); returns its input hash."""
    out.mkdir()
    done = subprocess.run([dftracer_tool("dftracer_split"), "-d", str(directory), "-o", str(out), "-s", "64",
                           "--verify", "--log-level", "off"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "PASSED" in done.stdout, done.stdout + done.stderr
    hashes = re.findall(r"(Input|Output) hash:\s+(0x[0-9a-f]+)", done.stdout)
    assert len(hashes) == 2 and hashes[0][1] == hashes[1][1], done.stdout
    return hashes[0][1]


@pytest.fixture(scope="module")
def reference(ranks: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """What the tools say of the inputs themselves: the event count and split's hash of every event."""
    return event_count(ranks), split(ranks, tmp_path_factory.mktemp("ref") / "split")


def check_with_the_field_tools(directory: pathlib.Path, tmp_path: pathlib.Path, reference: tuple[int, str]) -> None:
    events, events_hash = reference
    assert event_count(directory) == events
    split_out = tmp_path / "split"
    assert split(directory, split_out) == events_hash  # split read every event of our file
    assert event_count(split_out) == events  # ... and wrote them all back
    files = sorted(str(path) for path in directory.iterdir() if path.name.endswith(".pfw.gz"))
    validate = subprocess.run([dftracer_tool("dftracer_validate"), "--files", *files, "--log-level", "off"],
                              capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0 and " 0 failed" in validate.stdout, validate.stdout + validate.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gzip_output_is_read_whole_by_the_field_tools(ranks: pathlib.Path, reference: tuple[int, str],
                                                      tmp_path: pathlib.Path, backend_name: str, layout: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = run_cli("merge", "-d", str(ranks), "-o", str(out / "merged.pfw.gz"), "--layout", layout,
                   "--stripe-size", "64KiB", "--lanes", "3", "--backend", backend_name)
    assert done.returncode == 0, done.stderr
    if layout == "padded-striped":  # the case the padding is about: many padding members
        assert gzip.decompress((out / "merged.pfw.gz").read_bytes()).count(b"\n\n") > 3
    for sidecar in out.glob("*.json"):  # the tools read *.pfw.gz only; keep the directory to traces
        sidecar.unlink()
    for manifest in out.glob("*.shards"):
        assert len(read_shard_set(str(manifest))) == 3
        manifest.unlink()
    check_with_the_field_tools(out, tmp_path, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_output_gzipped_is_read_whole_by_the_field_tools(ranks: pathlib.Path, reference: tuple[int, str],
                                                               tmp_path: pathlib.Path, layout: str) -> None:
    """The tools read gzip only: plain output (its padding is whitespace
    lines), gzipped as it is, in read order."""
    done = run_cli("merge", "-d", str(ranks), "-o", str(tmp_path / "merged.pfw"), "--layout", layout,
                   "--stripe-size", "64KiB", "--lanes", "3")
    assert done.returncode == 0, done.stderr
    whole = str(tmp_path / "merged.pfw") + (".shards" if layout == "sharded" else "")
    text = read_text(whole)
    if layout == "padded-striped":
        assert b"   \n" in text  # padding lines are there to be read through
    out = tmp_path / "gz"
    out.mkdir()
    (out / "merged.pfw.gz").write_bytes(gzip.compress(text, compresslevel=1))
    check_with_the_field_tools(out, tmp_path, reference)
