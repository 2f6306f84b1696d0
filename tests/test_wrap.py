"""Issue 22, point 1: ``--wrap auto|array|none`` (the ``wrap`` setting).

``array`` writes a ``[`` line before the events and a ``]`` line after them,
``none`` neither (NDJSON, as DFTracer 2.x writes), ``auto`` (the command
line's default) array only when an input is array style.  Every layout,
plain and gzip (with its member index), both backends; the output is read
back file by file and member by member.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import zlib

import pytest

from pwriter.data.inputs import starts_array
from pwriter.data.output import member_index_path
from pwriter.errors import UsageError
from pwriter.faces.testing import read_events
from pwriter.plan.settings import ConfigError
from pwriter.service.merge import merge, resolve_wrap
from pwriter.service.verify import verify
from pwriter.service.writer import open_writer

from helpers import run_cli

LAYOUTS = ["striped", "padded-striped", "sharded"]


def ndjson_inputs(directory, *, array_too: bool = False) -> tuple[list[str], list[bytes]]:
    """Five NDJSON inputs (plain and gzip) of DFTracer 2.x style lines, and
    with ``array_too`` a sixth in array style; returns the paths and every event."""
    directory.mkdir()
    paths, everything = [], []
    for rank in range(6 if array_too else 5):
        lines = [b'{"id":%d,"name":"read","cat":"POSIX","pid":%d,"ts":%d,"args":{"hhash":"%s"}}'
                 % (index, rank, index * 7, b"%x" % (index * 7919 + rank) * 9) for index in range(1, 700)]
        text = b"".join(line + b"\n" for line in lines)
        if rank == 5:
            text = b"[\n" + text + b"]\n"
        path = directory / (f"rank_{rank}.pfw.gz" if rank % 2 else f"rank_{rank}.pfw")
        path.write_bytes(gzip.compress(text, 1) if rank % 2 else text)
        paths.append(str(path))
        everything += lines
    return paths, everything


def members_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, text) of every gzip member; fails on a byte between members."""
    members, offset = [], 0
    while offset < len(data):
        assert data[offset : offset + 2] == b"\x1f\x8b", f"not a gzip member at byte {offset}"
        inflater = zlib.decompressobj(wbits=31)
        text = inflater.decompress(data[offset:]) + inflater.flush()
        assert inflater.eof
        length = len(data) - offset - len(inflater.unused_data)
        members.append((offset, length, text))
        offset += length
    return members


def check_output(files: list[str], events: list[bytes], wrapped: bool, compressed: bool, index: str = "") -> None:
    """Every file of the output read back: the wrapper lines exactly where
    ``wrapped`` puts them (a ``[`` first line, a ``]`` last line) and
    nowhere else, every other line an event or padding (whitespace), the
    events exactly ``events``; gzip: no empty member, and the member index
    says where each member's text lies."""
    texts = []
    for path in files:
        with open(path, "rb") as handle:
            data = handle.read()
        if compressed:
            members = members_of(data)
            assert all(text for _, _, text in members), "an empty member"
            texts.append(b"".join(text for _, _, text in members))
        else:
            texts.append(data)
    lines = [line for text in texts for line in text.split(b"\n")]
    assert all(text.endswith(b"\n") for text in texts)
    kept = [line for line in lines if line.strip()]
    if wrapped:
        assert texts[0].startswith(b"[\n") and texts[-1].endswith(b"]\n")
        assert kept[0] == b"[" and kept[-1] == b"]"
        kept = kept[1:-1]
    else:
        assert texts[0][:1] == b"{"
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in kept), "a wrapper line where none belongs"
    assert collections.Counter(kept) == collections.Counter(events)
    if compressed:
        with open(index, encoding="utf-8") as handle:
            members = json.load(handle)
        whole = b"".join(texts)
        for member in members["members"]:
            with open(os.path.join(os.path.dirname(files[0]), members["files"][member["file"]]), "rb") as handle:
                handle.seek(member["offset"])
                text = gzip.decompress(handle.read(member["length"]))
            assert whole[member["text_offset"] : member["text_offset"] + member["text_length"]] == text
        assert sum(member["events"] for member in members["members"]) == len(events)
        first = members["members"][0]
        assert (first["events"] == 0 and first["text_length"] == 2) if wrapped else first["events"] > 0


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wrap", ["array", "none", "auto-ndjson", "auto-array"])
async def test_wrap_in_every_layout(tmp_path, settings_for, layout: str, compressed: bool, wrap: str) -> None:
    paths, events = ndjson_inputs(tmp_path / "in", array_too=wrap == "auto-array")
    out = str(tmp_path / ("m.pfw.gz" if compressed else "m.pfw"))
    result = await merge(paths, out, settings=settings_for(layout=layout, stripe_size="64KiB", lanes=2,
                                                           wrap=wrap.split("-")[0]))
    wrapped = wrap in ("array", "auto-array")
    assert result.wrap == ("array" if wrapped else "none")
    assert result.events == len(events) and result.incomplete == ()
    check_output(list(result.writer.outputs), events, wrapped, compressed, index=member_index_path(out))
    assert verify(result.manifest or out, paths).match


def test_the_command_lines_default_follows_the_inputs(tmp_path) -> None:
    paths, events = ndjson_inputs(tmp_path / "in")
    out = tmp_path / "m.pfw"
    done = run_cli("merge", *paths, "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["wrap"] == "none"
    check_output([str(out)], events, False, False)
    # An array-style input among them: array.
    array = tmp_path / "old.pfw"
    array.write_bytes(b'\xef\xbb\xbf  \n[\n{"id":1}\n]')
    assert run_cli("merge", *paths, str(array), "-o", str(out), "--force").returncode == 0
    check_output([str(out)], events + [b'{"id":1}'], True, False)
    # --wrap and PWRITER_WRAP choose; --wrap wins.
    assert run_cli("merge", *paths, "-o", str(out), "--force", env={"PWRITER_WRAP": "array"}).returncode == 0
    check_output([str(out)], events, True, False)
    done = run_cli("merge", *paths, str(array), "-o", str(out), "--force", "--wrap", "none",
                   env={"PWRITER_WRAP": "array"})
    assert done.returncode == 0, done.stderr
    check_output([str(out)], events + [b'{"id":1}'], False, False)


def test_a_bad_wrap_is_refused(tmp_path) -> None:
    paths, _ = ndjson_inputs(tmp_path / "in")
    done = run_cli("merge", *paths, "-o", str(tmp_path / "m.pfw"), "--wrap", "json")
    assert done.returncode == 2 and "--wrap" in done.stderr and "invalid choice" in done.stderr
    done = run_cli("merge", *paths, "-o", str(tmp_path / "m.pfw"), env={"PWRITER_WRAP": "lines"})
    assert done.returncode == 2 and "wrap" in done.stderr and "PWRITER_WRAP" in done.stderr
    assert not os.path.exists(tmp_path / "m.pfw")


async def test_the_library_keeps_array_by_default(tmp_path, settings_for) -> None:
    paths, events = ndjson_inputs(tmp_path / "in")
    result = await merge(paths, str(tmp_path / "m.pfw"), settings=settings_for())
    assert result.wrap == "array"
    check_output([str(tmp_path / "m.pfw")], events, True, False)


async def test_open_writer_wraps_as_told(tmp_path, settings_for) -> None:
    for wrap, expected in [("array", b'[\n{"a":1}\n]\n'), ("none", b'{"a":1}\n')]:
        out = tmp_path / f"{wrap}.pfw"
        async with open_writer(str(out), settings=settings_for(), wrap=wrap) as writer:
            async with writer.producer() as producer:
                await producer.send_line(b'{"a":1}\n')
        assert out.read_bytes() == expected
    # The header and footer given wins over the setting.
    out = tmp_path / "own.pfw"
    async with open_writer(str(out), settings=settings_for(), wrap="none", header=b"#h\n", footer=b"") as writer:
        async with writer.producer() as producer:
            await producer.send_line(b'{"a":1}\n')
    assert out.read_bytes() == b'#h\n{"a":1}\n'
    # auto follows the inputs of a merge: a writer refuses it, before creating anything.
    with pytest.raises(ConfigError, match="wrap='auto'"):
        async with open_writer(str(tmp_path / "auto.pfw"), settings=settings_for(), wrap="auto"):
            pass
    assert not os.path.exists(tmp_path / "auto.pfw")
    assert issubclass(ConfigError, UsageError)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_no_event_and_no_wrapper_still_gives_a_readable_file(tmp_path, settings_for, layout: str,
                                                                  compressed: bool) -> None:
    """Only empty inputs, wrap none: each file holds one padding line (an
    empty .gz file is not one any reader takes)."""
    empty = tmp_path / "empty.pfw"
    empty.write_bytes(b"")
    out = str(tmp_path / ("m.pfw.gz" if compressed else "m.pfw"))
    result = await merge([str(empty)], out, settings=settings_for(layout=layout, lanes=2, wrap="auto"))
    assert result.wrap == "none" and [entry.why for entry in result.incomplete] == ["no end event"]
    for path in result.writer.outputs:
        with open(path, "rb") as handle:
            data = handle.read()
        assert (gzip.decompress(data) if compressed else data).strip() == b"" and data


def test_standard_output_without_wrapper(tmp_path) -> None:
    paths, events = ndjson_inputs(tmp_path / "in")
    done = run_cli("merge", *paths, "-o", "-")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{") and collections.Counter(done.stdout.encode().split(b"\n")[:-1]) == \
        collections.Counter(events)


def test_starts_array(tmp_path) -> None:
    cases = {
        "array.pfw": b"[\n{}\n]\n",
        "bom.pfw": b"\xef\xbb\xbf \r\n\t[\n",
        "ndjson.pfw": b'{"id":1}\n',
        "empty.pfw": b"",
        "blank.pfw": b" " * 10000 + b"\n",
        "array.pfw.gz": gzip.compress(b"\n" * 5000) + gzip.compress(b"  [\n{}\n"),
        "ndjson.pfw.gz": gzip.compress(b'{"id":1}\n' * 1000),
        "cut.pfw.gz": gzip.compress(b"[\n" + b"".join(b"%d\n" % i for i in range(9000)))[:2000],
        "empty.pfw.gz": b"",
        "garbage.pfw.gz": b"\x1f\x8bnot gzip at all",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    found = {name: starts_array(str(tmp_path / name)) for name in cases}
    assert found == {"array.pfw": True, "bom.pfw": True, "ndjson.pfw": False, "empty.pfw": False, "blank.pfw": False,
                     "array.pfw.gz": True, "ndjson.pfw.gz": False, "cut.pfw.gz": True, "empty.pfw.gz": False,
                     "garbage.pfw.gz": False}
    # A FIFO is not even opened (its writer would see a reader come and go): it counts as array.
    os.mkfifo(tmp_path / "fifo.pfw")
    assert starts_array(str(tmp_path / "fifo.pfw")) is None
    assert resolve_wrap([str(tmp_path / "ndjson.pfw"), str(tmp_path / "fifo.pfw")], "auto") == "array"
    assert resolve_wrap([str(tmp_path / "ndjson.pfw"), str(tmp_path / "ndjson.pfw.gz")], "auto") == "none"
    assert resolve_wrap([str(tmp_path / "array.pfw")], "none") == "none"


def test_verify_reads_an_unwrapped_output(tmp_path) -> None:
    paths, events = ndjson_inputs(tmp_path / "in")
    out = tmp_path / "m.pfw.gz"
    done = run_cli("merge", *paths, "-o", str(out), "--layout", "sharded", "--lanes", "3", "--verify")
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    assert run_cli("verify", f"{out}.shards", *paths).returncode == 0
    assert sorted(read_events(f"{out}.shards")) == sorted(events)


def mpi_merge(ranks: int, *args: str):  # type: ignore[no-untyped-def]
    """``mpiexec -n ranks pwriter merge args`` (tests/test_mpi.py's; skipped without MPI)."""
    return pytest.importorskip("test_mpi").mpi_merge(ranks, *args)


@pytest.mark.parametrize("layout", [*LAYOUTS, "striped-exscan"])
def test_ranks_follow_the_wrapping_rank_0_decides(tmp_path, layout: str) -> None:
    """Rank 0 looks at every input (auto): NDJSON inputs give an NDJSON
    output over MPI ranks too, gzip members and their index included (plain
    for exscan, which counts plain ranges)."""
    paths, events = ndjson_inputs(tmp_path / "in")
    compressed = layout != "striped-exscan"
    out = str(tmp_path / ("m.pfw.gz" if compressed else "m.pfw"))
    extra = ["--mpi-offsets", "exscan", "--layout", "striped"] if not compressed else ["--layout", layout]
    done = mpi_merge(2, *paths, "-o", out, "--no-fsync", "--stripe-size", "64KiB", "--json", *extra)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["wrap"] == "none" and report["incomplete"] == []
    files = [os.path.join(str(tmp_path), os.path.basename(name)) for name in report["outputs"]]
    check_output(files, events, False, compressed, index=member_index_path(out))
    done = mpi_merge(2, *paths, "-o", out, "--no-fsync", "--stripe-size", "64KiB", "--force", "--wrap", "array",
                     "--json", *extra)
    assert done.returncode == 0, done.stderr
    files = [os.path.join(str(tmp_path), os.path.basename(name)) for name in json.loads(done.stdout)["outputs"]]
    check_output(files, events, True, compressed, index=member_index_path(out))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_with_no_event_and_no_wrapper(tmp_path, layout: str) -> None:
    """Nothing to write and no wrapper: rank 0 ends the shared file with
    one padding line (no rank pads the shared file on its own: it would
    overwrite another rank's lines)."""
    empty = tmp_path / "empty.pfw"
    empty.write_bytes(b"")
    out = tmp_path / "m.pfw.gz"
    done = mpi_merge(2, str(empty), "-o", str(out), "--no-fsync", "--layout", layout, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in report["outputs"]:
        with open(tmp_path / os.path.basename(name), "rb") as handle:
            data = handle.read()
        assert data and gzip.decompress(data) == b"\n", name  # (an empty .gz file is not a trace any reader takes)
