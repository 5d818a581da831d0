"""NDJSON framing: the sans-IO decoder and the encoder."""

from __future__ import annotations

import enum
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralph_uv.errors import InternalError
from ralph_uv.protocol.framing import (
    Decoded,
    FrameDecoder,
    FrameEvent,
    FrameTooLarge,
    InvalidFrame,
    encode,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _feed(decoder: FrameDecoder, chunks: list[bytes], *, eof: bool = False) -> list[FrameEvent]:
    events: list[FrameEvent] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        assert decoder.buffered <= decoder.max_message_size
        events.extend(decoder)
    if eof:
        decoder.receive_eof()
        events.extend(decoder)
    return events


@settings(deadline=None)  # a loaded machine must not fail a correct example
@given(st.lists(json_values, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_any_chunking_yields_the_same_messages(values: list[Any], cuts: list[int]) -> None:
    """However the stream of encoded messages is cut into chunks, the decoded values are the
    encoded ones, in order."""
    stream = b"".join(encode(v) for v in values)
    events = _feed(FrameDecoder(), _split(stream, cuts))
    assert events == [Decoded(v) for v in values]


_fragments = st.binary(max_size=64) | st.sampled_from(
    [b"\n", b"\r\n", b"{", b"}", b'"', b"\\", b"\xff", b"\xc3", b"[1]", b'{"jsonrpc":"2.0"}']
)


@settings(deadline=None)  # a loaded machine must not fail a correct example
@given(st.lists(_fragments, max_size=30), st.integers(min_value=1, max_value=40))
def test_random_bytes_never_raise(chunks: list[bytes], limit: int) -> None:
    """Arbitrary bytes, in arbitrary chunks, with any limit, never make the decoder raise and
    never make it hold more than the limit."""
    decoder = FrameDecoder(max_message_size=limit)
    events = _feed(decoder, chunks, eof=True)
    assert all(isinstance(e, Decoded | InvalidFrame | FrameTooLarge) for e in events)


@settings(deadline=None)  # a loaded machine must not fail a correct example
@given(json_values)
def test_encode_decode_round_trip(value: Any) -> None:
    """encode gives exactly one newline-terminated line that decodes back to the same value."""
    line = encode(value)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b"\r" not in line
    decoder = FrameDecoder()
    decoder.receive_data(line)
    assert list(decoder) == [Decoded(value)]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(min_value=1, max_value=300),
    st.lists(json_values, min_size=1, max_size=4),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_oversize_then_valid_message_still_decodes(
    excess: int, values: list[Any], cuts: list[int]
) -> None:
    """A line over the limit yields one too-large event, and the messages after it are decoded
    whatever the chunking."""
    valid = b"".join(encode(v) for v in values)
    limit = max(200, len(valid))
    oversized = b"x" * (limit + excess) + b"\n"
    events = _feed(FrameDecoder(max_message_size=limit), _split(oversized + valid, cuts))
    assert events == [FrameTooLarge(limit), *(Decoded(v) for v in values)]


def test_huge_line_is_never_buffered() -> None:
    """A 10 MiB line fed in 64 KiB chunks is reported once, early, while the decoder holds at
    most the limit; the next line decodes."""
    decoder = FrameDecoder(max_message_size=1024 * 1024)
    chunk = b"a" * 65536
    events: list[FrameEvent] = []
    for _ in range(160):
        decoder.receive_data(chunk)
        assert decoder.buffered <= 1024 * 1024
        events.extend(decoder)
    assert events == [FrameTooLarge(1024 * 1024)]
    decoder.receive_data(b'aaa\n{"ok":true}\n')
    assert list(decoder) == [Decoded({"ok": True})]


def test_limit_is_inclusive() -> None:
    """A line of exactly max_message_size bytes is accepted; one byte more is refused."""
    decoder = FrameDecoder(max_message_size=10)
    decoder.receive_data(b'"12345678"\n"123456789"\n')
    assert list(decoder) == [Decoded("12345678"), FrameTooLarge(10)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\xff\xfe{}", "invalid UTF-8 at byte 0"),
        (b'{"a": 1', "invalid JSON"),
        (b"NaN", "NaN is not valid JSON"),
        (b"[Infinity]", "Infinity is not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b"1" * 5000, "invalid JSON"),
        (b"\xef\xbb\xbf{}", "invalid JSON"),
    ],
)
def test_unreadable_lines_are_reported(line: bytes, reason: str) -> None:
    """Bad UTF-8, bad JSON, non-JSON constants, absurd nesting and oversized integers each give
    an InvalidFrame saying why, and the following line still decodes."""
    decoder = FrameDecoder(max_message_size=1 << 20)
    decoder.receive_data(line + b"\n[1]\n")
    first, second = list(decoder)
    assert isinstance(first, InvalidFrame)
    assert reason in first.reason
    assert second == Decoded([1])


def test_blank_lines_and_crlf_are_tolerated() -> None:
    """Empty and whitespace-only lines are skipped and a CRLF line ending is accepted."""
    decoder = FrameDecoder()
    decoder.receive_data(b'\n  \n{"a":1}\r\n\r\n2\n')
    assert list(decoder) == [Decoded({"a": 1}), Decoded(2)]


def test_eof_flushes_an_unterminated_last_line() -> None:
    """At end of stream a last line without newline still counts as a message."""
    decoder = FrameDecoder()
    decoder.receive_data(b'1\n{"last":')
    assert list(decoder) == [Decoded(1)]
    decoder.receive_data(b"true}")
    assert decoder.next_event() is None
    decoder.receive_eof()
    assert list(decoder) == [Decoded({"last": True})]


def test_encode_is_compact_utf8_without_embedded_newlines() -> None:
    """Strings with newlines and line separators stay on one line; non-ASCII text is UTF-8."""
    line = encode({"text": "a\nb\r\u2028é", "n": [1, 2]})
    assert line == '{"text":"a\\nb\\r\u2028é","n":[1,2]}\n'.encode()
    assert line.count(b"\n") == 1


def test_encode_lone_surrogate_round_trips() -> None:
    """A lone surrogate (possible after decoding a JSON escape) is written as an escape."""
    decoder = FrameDecoder()
    decoder.receive_data(b'"\\ud800"\n')
    (event,) = list(decoder)
    assert isinstance(event, Decoded)
    assert encode(event.value) == b'"\\ud800"\n'


class _Colour(enum.Enum):
    RED = "red"


@dataclass(frozen=True, slots=True)
class _Point:
    x: int
    colour: _Colour


def test_encode_dataclasses_and_enums() -> None:
    """Dataclasses are written as objects of their fields and enums as their values."""
    assert json.loads(encode({"p": _Point(1, _Colour.RED)})) == {"p": {"x": 1, "colour": "red"}}


@pytest.mark.parametrize("value", [object(), float("nan"), {1j: 2}])
def test_encode_refuses_what_json_cannot_carry(value: object) -> None:
    """Values with no JSON form raise InternalError (a caller bug), not a TypeError."""
    with pytest.raises(InternalError, match="cannot encode"):
        encode(value)


def test_max_message_size_must_be_positive() -> None:
    """A zero limit is a configuration mistake and is refused."""
    with pytest.raises(ValueError, match="at least 1"):
        FrameDecoder(max_message_size=0)
