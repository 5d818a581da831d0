"""The server-sent events parser: chunk boundaries, multi-line data, comments, ids and retry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ralph_uv.agents.sse import SseEvent, SseParser
from ralph_uv.errors import TransportError

STREAM = (
    b": a comment the parser skips\n"
    b"retry: 2500\n"
    b"\n"
    b"event: update\n"
    b"id: 7\n"
    b"data: first line\n"
    b"data:second line\n"
    b"data:  two spaces keep one\n"
    b"\n"
    b"data: {\"type\":\"session.idle\",\"text\":\"caf\xc3\xa9\"}\r\n"
    b"\r\n"
    b"data: cr only\r"
    b"\r"
    b"id\n"
    b"data\n"
    b"\n"
)
EXPECTED = [
    SseEvent("first line\nsecond line\n two spaces keep one", "update", "7"),
    SseEvent('{"type":"session.idle","text":"café"}', "message", "7"),
    SseEvent("cr only", "message", "7"),
    SseEvent("", "message", ""),
]


def _parse(chunks: list[bytes]) -> tuple[list[SseEvent], SseParser]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events, parser


def test_whole_stream() -> None:
    """Data lines join with newlines, one leading space is stripped, ids carry over, comments
    and a data-less block dispatch nothing, and a bare ``data`` line is an empty event."""
    events, parser = _parse([STREAM])
    assert events == EXPECTED
    assert parser.retry == 2500


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    """Splitting the stream anywhere — inside a CRLF, inside a UTF-8 sequence, inside a field
    name — yields exactly the events of the unsplit stream."""
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    events, parser = _parse(chunks)
    assert events == EXPECTED
    assert parser.retry == 2500


def test_byte_by_byte() -> None:
    """Feeding one byte at a time works too (the worst case for a CR at a chunk's end)."""
    events, _ = _parse([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert events == EXPECTED


def test_event_is_dispatched_only_at_a_blank_line() -> None:
    """An event appears when its terminating blank line arrives, not before."""
    parser = SseParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [SseEvent("a")]


def test_crlf_split_between_chunks_is_one_line_break() -> None:
    """A CR ending one chunk and an LF starting the next are one line end; taken as two, the
    LF would be a blank line and split the event in two."""
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == [SseEvent("a\nb")]


def test_invalid_retry_is_ignored() -> None:
    """A retry value that is not all ASCII digits leaves the previous delay in place."""
    parser = SseParser()
    parser.feed(b"retry: 100\n\nretry: 1.5\n\nretry: abc\n\nretry: \xd9\xa3\n\n")
    assert parser.retry == 100


def test_unknown_fields_and_id_with_nul_are_ignored() -> None:
    """Fields the standard does not know are skipped; an id containing NUL is not taken."""
    parser = SseParser()
    events = parser.feed(b"id: 1\n\nfoo: bar\nid: a\x00b\ndata: x\n\n")
    assert events == [SseEvent("x", "message", "1")]


def test_unfinished_event_at_end_of_stream_is_dropped() -> None:
    """An event cut off by the end of the stream (no blank line yet) is not delivered."""
    parser = SseParser()
    assert parser.feed(b"data: complete\n\ndata: cut off") == [SseEvent("complete")]
    assert parser.close() == []


def test_byte_order_mark_at_start_is_skipped() -> None:
    """A UTF-8 BOM before the first field does not become part of its name."""
    parser = SseParser()
    assert parser.feed(b"\xef\xbb\xbfdata: x\n\n") == [SseEvent("x")]


def test_oversized_event_is_refused() -> None:
    """An event growing past the size limit raises a TransportError instead of eating memory."""
    parser = SseParser(max_event_size=100)
    parser.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(TransportError, match="larger than 100 bytes"):
        parser.feed(b"data: " + b"y" * 60 + b"\n")
