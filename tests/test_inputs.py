"""Unit tests of pwriter.data.inputs: InputReader, InputRun and fill_step, on small files.

The oracle is the event lines of the text written, picked out here with
plain Python (the lines that start with ``{``, without their line ends).
"""

from __future__ import annotations

import gzip
import os
import pathlib

import pytest

from pwriter.data.inputs import InputReader, InputRun, fill_step, path_list
from pwriter.errors import DataError, InputError

EVENTS = [b'{"id":%d,"name":"op","ts":%d,"args":{"k":"%s"}}' % (n, 1000 + n, b"v" * (n % 7)) for n in range(40)]


def events_of(text: bytes) -> list[bytes]:
    """The oracle: event lines of ``text`` (any line end, a BOM, wrapper lines and blank lines left out)."""
    text = text.removeprefix(b"\xef\xbb\xbf")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(b"{")]


def read_all(source, capacity: int) -> tuple[list[bytes], list[bytes]]:
    """Read ``source`` to its end through fill_step, as the merge's readers
    do: the event lines in order, and the long lines among them."""
    buffer = memoryview(bytearray(capacity))
    done = end = 0
    lines: list[bytes] = []
    long_lines: list[bytes] = []
    while True:
        done, end, finished, long_line = fill_step(source, buffer, done, end, capacity)
        if long_line is not None:
            long_lines.append(long_line)
            lines.extend(long_line.splitlines())
        assert done == 0 or buffer[done - 1] == 10  # whole lines only
        lines.extend(bytes(buffer[:done]).splitlines())
        buffer[: end - done] = buffer[done:end]
        done, end = 0, end - done
        if finished:
            assert end == 0
            return lines, long_lines


def read_file(path, capacity: int = 256, **options: object) -> tuple[list[bytes], InputReader]:
    reader = InputReader(str(path), size=os.path.getsize(path), **options)
    try:
        lines, _ = read_all(reader, capacity)
    finally:
        reader.close()
    return lines, reader


@pytest.mark.parametrize("wrap", ["ndjson", "array", "array-indented-no-final-newline", "crlf", "bom", "blank"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_reader_cleans_every_wrapping(tmp_path, wrap: str, compressed: bool) -> None:
    body = b"\n".join(EVENTS) + b"\n"
    text = {
        "ndjson": body,
        "array": b"[\n" + body + b"]\n",
        "array-indented-no-final-newline": b"[\n  " + body + b"]",
        "crlf": body.replace(b"\n", b"\r\n"),
        "bom": b"\xef\xbb\xbf" + body,
        "blank": b"\n\n" + body.replace(b"\n", b"\n  \n") + b"\n",
    }[wrap]
    path = tmp_path / ("trace.pfw.gz" if compressed else "trace.pfw")
    if compressed:  # two members, cut at a line end, as the tracer writes them
        cut = text.index(b"\n", len(text) // 2) + 1
        path.write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    else:
        path.write_bytes(text)
    lines, reader = read_file(path, capacity=200)
    assert lines == events_of(text) == EVENTS
    assert reader.events == len(EVENTS)
    assert reader.compressed is compressed
    assert reader.damage is None and reader.dropped_lines == 0


def test_whole_last_line_without_newline_is_kept(tmp_path) -> None:
    path = tmp_path / "trace.pfw"
    path.write_bytes(b"\n".join(EVENTS))  # no final newline: the last line is whole JSON
    lines, reader = read_file(path)
    assert lines == EVENTS
    assert reader.events == len(EVENTS)


def test_cut_last_line_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "crashed.pfw"
    path.write_bytes(b"\n".join(EVENTS[:5]) + b"\n" + EVENTS[5][:20])
    with pytest.raises(InputError) as raised:
        read_file(path)
    message = str(raised.value)
    assert str(path) in message and "--salvage" in message and "no newline" in message


def test_cut_last_line_is_dropped_with_salvage(tmp_path) -> None:
    path = tmp_path / "crashed.pfw"
    path.write_bytes(b"\n".join(EVENTS[:5]) + b"\n" + EVENTS[5][:20])
    lines, reader = read_file(path, salvage=True)
    assert lines == EVENTS[:5]
    assert reader.dropped_lines == 1
    assert reader.damage is not None and "cut last line of 20 bytes" in reader.damage


def test_truncated_gzip_refused_then_salvaged(tmp_path) -> None:
    whole = gzip.compress(b"\n".join(EVENTS[:20]) + b"\n")
    data = whole + gzip.compress(b"\n".join(EVENTS[20:]) + b"\n", compresslevel=0)
    path = tmp_path / "cut.pfw.gz"
    path.write_bytes(data[: len(whole) + 150])  # the second member cut short
    with pytest.raises(InputError) as raised:
        read_file(path)
    assert str(path) in str(raised.value) and "truncated gzip" in str(raised.value)
    lines, reader = read_file(path, salvage=True)
    assert lines[:20] == EVENTS[:20]
    assert lines == EVENTS[: len(lines)]  # what the cut member still gives, in order, no cut line
    assert reader.damage is not None and "truncated gzip" in reader.damage


def test_line_longer_than_the_buffer(tmp_path) -> None:
    """fill_step returns a line longer than the buffer whole, in its place."""
    long_event = b'{"id":99,"args":{"blob":"' + b"x" * 700 + b'"}}'
    text = b"\n".join([*EVENTS[:3], long_event, *EVENTS[3:6]]) + b"\n"
    path = tmp_path / "long.pfw"
    path.write_bytes(text)
    reader = InputReader(str(path), size=len(text))
    try:
        lines, long_lines = read_all(reader, capacity=128)
    finally:
        reader.close()
    assert long_lines == [long_event + b"\n"]
    assert lines == events_of(text)


def test_fill_step_contract(tmp_path) -> None:
    """A full buffer: whole lines up to ``done``, the start of the next line
    kept after them, not finished; then the rest; then finished."""
    text = b"\n".join(EVENTS[:10]) + b"\n"
    path = tmp_path / "trace.pfw"
    path.write_bytes(text)
    capacity = 100
    buffer = memoryview(bytearray(capacity))
    reader = InputReader(str(path), size=len(text))
    try:
        done, end, finished, long_line = fill_step(reader, buffer, 0, 0, capacity)
        assert (finished, long_line) == (False, None)
        assert end == capacity  # the buffer was filled
        assert 0 < done < end
        assert bytes(buffer[:done]) == text[:done] and text[done - 1 : done] == b"\n"
        assert bytes(buffer[done:end]) == text[done:end]  # the start of the next line, kept
        assert b"\n" not in bytes(buffer[done:end])
        # The caller hands the whole lines on and moves the rest to the front.
        first = bytes(buffer[:done])
        buffer[: end - done] = buffer[done:end]
        rest, _ = read_all_from(reader, buffer, end - done, capacity)
    finally:
        reader.close()
    assert first + rest == text


def read_all_from(reader: InputReader, buffer: memoryview, end: int, capacity: int) -> tuple[bytes, int]:
    """The rest of ``reader`` through fill_step, from a buffer that holds ``end`` bytes not yet cleaned."""
    done = 0
    out = b""
    steps = 0
    while True:
        done, end, finished, long_line = fill_step(reader, buffer, done, end, capacity)
        steps += 1
        assert long_line is None
        out += bytes(buffer[:done])
        buffer[: end - done] = buffer[done:end]
        done, end = 0, end - done
        if finished:
            return out, steps


def test_input_that_grows_while_read(tmp_path) -> None:
    """An input read as it was when opened: one that grew since is an error
    naming the change, or with salvage keeps the lines it had then."""
    text = b"\n".join(EVENTS[:10]) + b"\n"
    for salvage in (False, True):
        path = tmp_path / f"growing-{salvage}.pfw"
        path.write_bytes(text)
        reader = InputReader(str(path), size=len(text), salvage=salvage)
        try:
            with open(path, "ab") as growing:
                growing.write(b"\n".join(EVENTS[10:]) + b"\n")
            if not salvage:
                with pytest.raises(DataError) as raised:
                    read_all(reader, 256)
                assert str(path) in str(raised.value) and "grew" in str(raised.value)
                continue
            lines, _ = read_all(reader, 256)
        finally:
            reader.close()
        assert lines == EVENTS[:10]
        assert reader.damage is not None and "grew" in reader.damage


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("refusing", [("pread", "preadv", "readv"), ("readv",)], ids=["every-read", "past-the-cache"])
def test_a_filesystem_that_honours_nonblocking_reads_of_a_regular_file(tmp_path, monkeypatch, compressed,
                                                                      refusing) -> None:
    """Inputs are opened O_NONBLOCK (a FIFO must not block the open) and a
    plain regular file is left so: where its filesystem honours that, a read
    that would block raises BlockingIOError, and the reader makes the file
    blocking and reads on.  Simulated: the ``refusing`` reads of a
    non-blocking descriptor raise (``readv`` alone: the first bytes were cached)."""
    text = b"[\n" + b"\n".join(EVENTS) + b"\n]\n"
    path = tmp_path / ("honours.pfw.gz" if compressed else "honours.pfw")
    path.write_bytes(gzip.compress(text) if compressed else text)
    refused = []

    def honouring(read):
        def call(fd, *args):
            if not os.get_blocking(fd):
                refused.append(read.__name__)
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return read(fd, *args)
        return call

    for name in refusing:
        monkeypatch.setattr(os, name, honouring(getattr(os, name)))
    assert read_file(path)[0] == EVENTS
    # each refused once at most: blocking from then on (gzip inputs are made blocking once their magic is read)
    assert refused == [refusing[0]] if refusing[0] == "pread" or not compressed else refused == []


def test_input_that_shrank_since_the_merge_began(tmp_path) -> None:
    text = b"\n".join(EVENTS[:10]) + b"\n"
    path = tmp_path / "shrunk.pfw"
    path.write_bytes(text)
    with pytest.raises(DataError) as raised:
        _read_sized(path, len(text) + 100)
    assert "shrank" in str(raised.value) and str(path) in str(raised.value)


def _read_sized(path, size: int) -> list[bytes]:
    reader = InputReader(str(path), size=size)
    try:
        return read_all(reader, 256)[0]
    finally:
        reader.close()


def test_not_a_trace_is_refused_naming_file_and_line(tmp_path) -> None:
    path = tmp_path / "notes.pfw"
    path.write_bytes(EVENTS[0] + b"\nhello world\n")
    with pytest.raises(InputError) as raised:
        read_file(path)
    assert str(path) in str(raised.value) and "line 2" in str(raised.value)


def test_missing_input_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError) as raised:
        InputReader(str(tmp_path / "gone.pfw"))
    assert "gone.pfw" in str(raised.value)


def test_input_run_reads_many_inputs_in_one_fill(tmp_path) -> None:
    """InputRun: the inputs one after another, in order, several in one fill
    of the buffer (one thread hop), with the run's own counters."""
    paths, texts = [], []
    for number, (start, stop) in enumerate([(0, 4), (4, 9), (9, 10), (10, 16)]):
        compressed = number % 2 == 1
        text = (b"[\n" if number == 2 else b"") + b"\n".join(EVENTS[start:stop]) + b"\n"
        path = tmp_path / (f"rank{number}.pfw.gz" if compressed else f"rank{number}.pfw")
        path.write_bytes(gzip.compress(text) if compressed else text)
        paths.append(str(path))
        texts.append(text)
    sizes = [os.path.getsize(path) for path in paths]
    run = InputRun(paths, sizes)
    buffer = memoryview(bytearray(4096))
    try:
        done, end, finished = run.fill(buffer, 0, 0, 4096)
    finally:
        run.close()
    assert finished and done == end
    assert bytes(buffer[:done]).splitlines() == EVENTS[:16]
    assert run.files_done == 4 and run.events == 16
    assert run.bytes_done == sum(sizes)
    assert run.text_bytes == done
    assert len(run.ends) == 4 and run.salvaged == []


def test_an_input_read_whole_is_freed_at_once(tmp_path, monkeypatch) -> None:
    """An InputRun lets go of each input it has read, its gzip reader's
    buffers included, without waiting for the garbage collector: a cycle
    between a reader and its file held about 110 KiB per gzip input until a
    collection (a 64-input gzip merge peaked 18 MiB higher)."""
    import gc
    import weakref

    from pwriter.data import inputs

    made = []
    original = inputs._InputFile

    class Watched(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            made.append(weakref.ref(self))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(inputs, "_InputFile", Watched)
    paths = []
    for number in range(6):
        path = tmp_path / f"rank{number}.pfw.gz"
        path.write_bytes(gzip.compress(b"\n".join(EVENTS) + b"\n"))
        paths.append(str(path))
    run = InputRun(paths, [os.path.getsize(path) for path in paths])
    gc.disable()
    try:
        lines, _ = read_all(run, 512)
        run.close()
        assert lines == EVENTS * 6
        assert len(made) == 6 and [ref() for ref in made] == [None] * 6
    finally:
        gc.enable()


def test_input_run_reports_what_salvage_dropped(tmp_path) -> None:
    good = tmp_path / "a.pfw"
    good.write_bytes(b"\n".join(EVENTS[:3]) + b"\n")
    cut = tmp_path / "b.pfw"
    cut.write_bytes(b"\n".join(EVENTS[3:6]) + b"\n" + EVENTS[6][:10])
    paths = [str(good), str(cut)]
    run = InputRun(paths, [os.path.getsize(path) for path in paths], salvage=True)
    try:
        lines, _ = read_all(run, 64)
    finally:
        run.close()
    assert lines == EVENTS[:6]
    assert [(path, dropped) for path, _what, dropped in run.salvaged] == [(str(cut), 1)]


def test_path_list_gives_a_new_list_of_str_and_refuses_other_items() -> None:
    """The paths of a merge: a list of str is copied (the caller's list is
    not the one the merge keeps), a path object becomes its str, and an
    item that is not a str path (bytes included) is a TypeError naming it,
    among str paths too."""
    given = ["a.pfw", "b.pfw"]
    listed = path_list(given, "merge")
    assert listed == given and listed is not given
    given.append("c.pfw")
    assert listed == ["a.pfw", "b.pfw"]
    assert path_list(("a.pfw", pathlib.Path("d/b.pfw")), "merge") == ["a.pfw", "d/b.pfw"]
    assert path_list([], "merge") == []
    for items in ([b"a.pfw"], ["a.pfw", b"b.pfw"], ["a.pfw", 3], ["a.pfw", None]):
        with pytest.raises(TypeError, match=r"^merge\(\): inputs must be str paths, not (bytes|int|NoneType)"):
            path_list(items, "merge")  # type: ignore[arg-type]
