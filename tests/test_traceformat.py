from hypothesis import given
from hypothesis import strategies as st

import pytest

from pwriter.errors import InputError
from pwriter.traceformat import BlockCleaner

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
        text = b"[\n" + text + (b"\n" if text and not text.endswith(b"\n") else b"") + draw(st.sampled_from([b"]", b"]\n", b"]\r\n"]))
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


@given(traces(), st.lists(st.integers(0, 10**6), max_size=6))
def test_cleaning_keeps_exactly_the_events_wherever_the_text_is_cut(trace, cuts) -> None:
    text, events = trace
    cleaned, cleaner = clean(text, cuts)
    assert cleaned == b"".join(e + b"\n" for e in events)
    assert cleaner.events == len(events)


def test_fast_path_returns_the_block_itself() -> None:
    block = b'{"a":1}\n{"b":2}\n'
    cleaner = BlockCleaner("t")
    assert cleaner.feed(block) is block


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
def test_errors_name_file_line_and_offset(text: bytes, line: int, offset: int, needle: str) -> None:
    with pytest.raises(InputError) as caught:
        clean(text, [])
    message = str(caught.value)
    assert message.startswith("t.pfw: not a trace: ")
    assert f"line {line} " in message and needle in message
    assert caught.value.offset == offset


def test_error_position_counts_earlier_blocks() -> None:
    cleaner = BlockCleaner("t.pfw")
    cleaner.feed(b'{"a":1}\n' * 10)
    with pytest.raises(InputError) as caught:
        cleaner.feed(b'{"a":1}\nnot json\n')
    assert "line 12 " in str(caught.value) and caught.value.offset == 88
