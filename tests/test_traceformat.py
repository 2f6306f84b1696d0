import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pwriter.plan.traceformat as traceformat
from pwriter.errors import InputError
from pwriter.plan.traceformat import BlockCleaner

# The C scanner (pwriter._native) and the pure-Python scan must agree: every
# test of the cleaner runs both ways (the C one only where it is built).
SCANNERS = ["python"] + (["native"] if traceformat._native is not None else [])


@contextlib.contextmanager
def scanner(name: str):
    saved = traceformat._native
    traceformat._native = saved if name == "native" else None
    try:
        yield
    finally:
        traceformat._native = saved

event = st.builds(lambda n, pad: b'{"id":%d,"p":"%s"}' % (n, b"x" * pad), st.integers(0, 10**6), st.integers(0, 40))
decoration = st.sampled_from([b"", b"  ", b"\t", b" \r"])


@st.composite
def traces(draw):
    """A trace in any accepted wrapping, and its events."""
    events = draw(st.lists(event, max_size=30))
    array = draw(st.booleans())
    lines = [draw(decoration) + e + draw(decoration) for e in events]
    blanks = draw(st.lists(st.integers(0, len(lines)), max_size=3))
    for position in sorted(blanks, reverse=True):
        lines.insert(position, draw(st.sampled_from([b"", b"   ", b"\r"])))
    text = b"\n".join(lines) + (b"\n" if lines and draw(st.booleans()) else b"")
    if array:
        closing = draw(st.sampled_from([b"]", b"]\n", b"]\r\n"]))
        text = b"[\n" + text + (b"\n" if text and not text.endswith(b"\n") else b"") + closing
    if draw(st.booleans()):
        text = b"\xef\xbb\xbf" + text
    return text, events


def clean(text: bytes, cuts: list[int]) -> tuple[bytes, BlockCleaner]:
    cleaner = BlockCleaner("t.pfw")
    pieces, start = [], 0
    for cut in sorted(set(c % (len(text) + 1) for c in cuts)) + [len(text)]:
        pieces.append(cleaner.feed(text[start:cut]))
        start = cut
    pieces.append(cleaner.finish())
    return b"".join(pieces), cleaner


@given(traces(), st.lists(st.integers(0, 10**6), max_size=6), st.sampled_from(SCANNERS))
def test_cleaning_keeps_exactly_the_events_wherever_the_text_is_cut(trace, cuts, name) -> None:
    text, events = trace
    with scanner(name):
        cleaned, cleaner = clean(text, cuts)
    assert cleaned == b"".join(e + b"\n" for e in events)
    assert cleaner.events == len(events)
    assert cleaner.lines == text.count(b"\n") + (0 if not text or text.endswith(b"\n") else 1)


@pytest.mark.parametrize("name", SCANNERS)
def test_many_irregular_lines_in_one_block(name: str) -> None:
    text = b"".join(b'  {"id":%d}\r\n' % n for n in range(100)) + b"[\n" + b'{"x":1}\n' * 50 + b"]"
    with scanner(name):
        cleaned, cleaner = clean(text, [])
    assert cleaned == b"".join(b'{"id":%d}\n' % n for n in range(100)) + b'{"x":1}\n' * 50
    assert cleaner.events == 150 and cleaner.lines == 152


def test_last_line_without_newline_is_kept() -> None:
    cleaned, cleaner = clean(b'{"a":1}\n{"b":2}', [])
    assert cleaned == b'{"a":1}\n{"b":2}\n' and cleaner.events == 2


@pytest.mark.parametrize(
    ("text", "line", "offset", "needle"),
    [
        (b'{"a":1}\nhello\n', 2, 8, "not a JSON event line"),
        (b'[\n{"a":1}\n\x00\x00\x00\n]\n', 3, 10, "NUL"),
        (b'{"a":1}\n{"b":2},\n', 2, 8, "not a JSON event line"),
        (b"\x89PNG\r\n", 1, 0, "not a JSON event line"),
    ],
)
@pytest.mark.parametrize("name", SCANNERS)
def test_errors_name_file_line_and_offset(text: bytes, line: int, offset: int, needle: str, name: str) -> None:
    with pytest.raises(InputError) as caught, scanner(name):
        clean(text, [])
    message = str(caught.value)
    assert message.startswith("t.pfw: not a trace: ")
    assert f"line {line} " in message and needle in message
    assert caught.value.offset == offset


@pytest.mark.parametrize("name", SCANNERS)
def test_error_position_counts_earlier_blocks(name: str) -> None:
    cleaner = BlockCleaner("t.pfw")
    with scanner(name):
        cleaner.feed(b'{"a":1}\n' * 10)
        with pytest.raises(InputError) as caught:
            cleaner.feed(b'{"a":1}\n[\nnot json\n')
    assert "line 13 " in str(caught.value) and caught.value.offset == 90


@given(traces(), st.sampled_from(SCANNERS), st.integers(0, 64))
def test_cleaning_in_place_agrees_with_feed(trace, name, start) -> None:
    text, events = trace
    if text and not text.endswith(b"\n"):
        text += b"\n"
    buffer = memoryview(bytearray(b"#" * start + text + b"tail"))
    cleaner = BlockCleaner("t.pfw")
    with scanner(name):
        end = cleaner.clean_in_place(buffer, start, start + len(text))
    assert bytes(buffer[:start]) == b"#" * start
    assert bytes(buffer[start:end]) == b"".join(e + b"\n" for e in events)
    assert cleaner.events == len(events) and cleaner.lines == text.count(b"\n")
    assert cleaner.offset == len(text)


@pytest.mark.parametrize("name", SCANNERS)
def test_in_place_errors_name_line_and_offset(name: str) -> None:
    cleaner = BlockCleaner("t.pfw")
    text = b'{"a":1}\n' * 3 + b"[\n" + b"oops\n"
    buffer = memoryview(bytearray(b"xx" + text))
    with scanner(name), pytest.raises(InputError) as caught:
        cleaner.clean_in_place(buffer, 2, 2 + len(text))
    assert "line 5 " in str(caught.value) and caught.value.offset == 26


@pytest.mark.parametrize("name", SCANNERS)
def test_rfind_newline(name: str) -> None:
    buffer = memoryview(bytearray(b"ab\ncd\nef"))
    with scanner(name):
        assert traceformat.rfind_newline(buffer, 0, 8) == 5
        assert traceformat.rfind_newline(buffer, 6, 8) == -1
        assert traceformat.rfind_newline(buffer, 0, 3) == 2


@given(st.lists(st.integers(0, 10**7), max_size=50), st.integers(1, 12))
def test_partition_is_contiguous_complete_and_uses_every_reader(sizes, parts) -> None:
    from pwriter.service.merge import partition

    runs = partition(sizes, parts)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    assert all(len(run) > 0 for run in runs) or sizes == []
    assert len(runs) == max(1, min(parts, len(sizes)))


# -- --validate: every event parsed as JSON --------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def reference_valid(text: bytes) -> bool:
    """The standard library's verdict on the strictly decoded text (json.loads
    of bytes would let UTF-8-encoded surrogates through), NaN and Infinity refused."""
    import json

    def refuse(name: str) -> object:
        raise ValueError(name)

    try:
        json.loads(text.decode("utf-8"), parse_constant=refuse)
    except ValueError:
        return False
    return True


@st.composite
def json_texts(draw):
    """Valid JSON, and the same with a byte inserted, deleted or replaced."""
    import json

    text = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(text)))
        byte = bytes([draw(st.sampled_from(b'{}[]",:0-.eE+\\ \t\nu1fatrsl\x00\x1f\x80\xc3\xed\xf4\xff'))])
        how = draw(st.sampled_from(["insert", "delete", "replace"]))
        if how == "insert":
            text = text[:where] + byte + text[where:]
        elif how == "delete":
            text = text[:where] + text[where + 1 :]
        else:
            text = text[:where] + byte + text[where + 1 :]
    return text


@pytest.mark.skipif(traceformat._native is None, reason="the C scanner is not built")
@given(text=json_texts())
def test_json_check_agrees_with_the_standard_library(text: bytes) -> None:
    """The C check against the standard library.  (The Python fallback IS
    the standard library: it is held to the refusals below, not to itself.)"""
    with scanner("native"):
        assert traceformat.is_valid_json(text) == reference_valid(text), text


@pytest.mark.parametrize("name", SCANNERS)
@pytest.mark.parametrize("text", [b'{"a":01}', b'{"a":1,}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":"\xed\xa0\x80"}',
                                  b'{"a":"\xc0\xaf"}', b'{"a":"tab\there"}', b'{"a":"\\x"}', b'{"a" 1}', b"{}}",
                                  b"[" * 5000 + b"]" * 5000, b'{"a":.5}', b'{"a":1.}', b'{"a":-}', b"{'a':1}"])
def test_json_check_refuses(name: str, text: bytes) -> None:
    with scanner(name):
        assert not traceformat.is_valid_json(text)


@pytest.mark.parametrize("name", SCANNERS)
def test_validating_cleaner_names_the_invalid_line_or_drops_it(name: str) -> None:
    text = b'[\n{"id":1}\n  {"id":2,}\n{"id":3,"s":"\xff"}\n{"id":4}\n]\n'
    with scanner(name):
        assert BlockCleaner("t.pfw").feed(text).count(b"\n") == 4  # shape only: all four pass
        with pytest.raises(InputError) as raised:
            BlockCleaner("t.pfw", validate=True).feed(text)
        assert str(raised.value) == "t.pfw: not a trace: line 3 is not valid JSON (starts '{\"id\":2,}') at byte 11"
        cleaner = BlockCleaner("t.pfw", validate=True, drop_invalid=True)
        assert cleaner.feed(text) == b'{"id":1}\n{"id":4}\n'
        assert (cleaner.invalid, cleaner.events, len(cleaner.invalid_examples)) == (2, 2, 2)


@given(st.binary(max_size=64).map(lambda raw: bytes(10 if byte % 3 == 0 else 97 for byte in raw)))
def test_count_lines_c_and_python_agree(block: bytes) -> None:
    """count_lines (send_lines' check): newlines, and whether a line is empty.
    The oracle walks the block byte by byte, unlike either implementation."""
    newlines, empty, line_length = 0, False, 0
    for byte in block:
        if byte == 10:
            newlines += 1
            empty = empty or line_length == 0
            line_length = 0
        else:
            line_length += 1
    expected = (newlines, empty)
    for name in SCANNERS:
        with scanner(name):
            assert traceformat.count_lines(block) == expected


@given(traces(), st.lists(st.integers(0, 10**6), max_size=6), st.sampled_from(SCANNERS), st.integers(0, 3))
def test_the_last_event_wherever_the_text_is_cut_and_placed(trace, cuts, name, before) -> None:
    """``last_event`` (the completeness report reads the ``end`` event from
    it) is the last event line of the text, whether the text is fed in
    pieces (blocks that clean to nothing leave it as it was) or cleaned in
    place after other text, whose newlines it must not reach back to."""
    text, events = trace
    expected = events[-1] if events else None
    with scanner(name):
        cleaned, cleaner = clean(text, cuts)
        assert cleaner.last_event == expected
        if text and not text.endswith(b"\n"):
            text += b"\n"
        earlier = b'{"id":0,"before":1}\n' * before + b"#"  # (not a newline just before the text)
        buffer = memoryview(bytearray(earlier + text + b'{"after":1}\n'))
        cleaner = BlockCleaner("t.pfw")
        cleaner.clean_in_place(buffer, len(earlier), len(earlier) + len(text))
    assert cleaner.last_event == expected


@pytest.mark.parametrize("name", SCANNERS)
def test_the_last_event_is_the_last_one_kept(name: str) -> None:
    """An event line dropped as invalid (``--salvage --validate``) or a
    block of wrapper lines only is not the last event: the one kept before it is."""
    with scanner(name):
        cleaner = BlockCleaner("t.pfw", validate=True, drop_invalid=True)
        cleaner.feed(b'[\r\n  {"id":1}\r\n{"id":2,"x":}\n')
        assert cleaner.last_event == b'{"id":1}'
        cleaner.feed(b"]\r\n")
        assert cleaner.last_event == b'{"id":1}'
        # The block's only event at its start, text before it in the buffer (a newline, then not).
        for text in (b'{"z":0}\n#{"only":1}\n', b'{"z":0}\n#[\r\n {"only":1}\n]\n'):
            buffer = memoryview(bytearray(text))
            cleaner = BlockCleaner("t.pfw")
            assert cleaner.clean_in_place(buffer, 9, len(text)) == 20
            assert cleaner.last_event == b'{"only":1}'
            cleaner.clean_in_place(buffer, 9, 9)
            assert cleaner.last_event == b'{"only":1}'
