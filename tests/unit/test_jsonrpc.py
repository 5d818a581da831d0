"""JSON-RPC 2.0 messages: parsing, id handling, batches and every error code.

The spec cases are the examples of the JSON-RPC 2.0 specification (section 7), run through the
framing decoder, the parser and a dispatcher, exactly as a server handles a line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralph_uv.errors import ErrorCode
from ralph_uv.protocol import (
    Batch,
    Decoded,
    Dispatcher,
    ErrorResponse,
    FrameDecoder,
    FrameTooLarge,
    InvalidFrame,
    InvalidMessage,
    Notification,
    Request,
    Response,
    encode,
    parse,
    parse_error,
    too_large_error,
)

methods: Dispatcher[list[str]] = Dispatcher()


@dataclass(frozen=True, slots=True)
class Subtract:
    minuend: int
    subtrahend: int


@methods.method("subtract")
async def subtract(log: list[str], params: Subtract) -> int:
    return params.minuend - params.subtrahend


@methods.method("sum")
async def sum_(log: list[str], params: list[int]) -> int:
    return sum(params)


@methods.method("update")
async def update(log: list[str], params: list[int]) -> None:
    log.append(f"update {params}")


@methods.method("notify_hello")
async def notify_hello(log: list[str], params: list[int]) -> None:
    log.append(f"hello {params}")


@methods.method("get_data")
async def get_data(log: list[str]) -> list[object]:
    return ["hello", 5]


@methods.method("crash")
async def crash(log: list[str]) -> None:
    raise RuntimeError("secret internals")


async def _serve_line(line: str, log: list[str] | None = None) -> Any:
    """What a server sends back for one line (None: nothing)."""
    decoder = FrameDecoder()
    decoder.receive_data(line.encode() + b"\n")
    (event,) = list(decoder)
    if isinstance(event, InvalidFrame):
        return json.loads(encode(parse_error(event.reason).to_json()))
    assert isinstance(event, Decoded)
    reply = await methods.answer(log if log is not None else [], parse(event.value))
    return None if reply is None else json.loads(encode(reply))


def _error(reply: Any) -> tuple[Any, int]:
    assert reply["jsonrpc"] == "2.0"
    assert "result" not in reply
    return reply["id"], reply["error"]["code"]


async def test_spec_positional_params() -> None:
    """subtract [42, 23] → 19 and [23, 42] → -19, echoing the id."""
    r1 = await _serve_line('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    r2 = await _serve_line('{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}')
    assert r1 == {"jsonrpc": "2.0", "result": 19, "id": 1}
    assert r2 == {"jsonrpc": "2.0", "result": -19, "id": 2}


async def test_spec_named_params() -> None:
    """Named params reach the same handler in any order."""
    reply = await _serve_line(
        '{"jsonrpc": "2.0", "method": "subtract", '
        '"params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
    )
    assert reply == {"jsonrpc": "2.0", "result": 19, "id": 3}


async def test_spec_notifications_get_no_reply() -> None:
    """A notification runs its handler and gets no reply; one for an unknown method neither."""
    log: list[str] = []
    assert (
        await _serve_line('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', log)
        is None
    )
    assert await _serve_line('{"jsonrpc": "2.0", "method": "foobar"}', log) is None
    assert log == ["update [1, 2, 3, 4, 5]"]


async def test_spec_method_not_found() -> None:
    """An unknown method is -32601 with the request's id."""
    reply = await _serve_line('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert _error(reply) == ("1", -32601)
    assert "foobar" in reply["error"]["message"]


async def test_spec_invalid_json() -> None:
    """A line that is not JSON is -32700 with id null."""
    reply = await _serve_line('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert _error(reply) == (None, -32700)


async def test_spec_invalid_request_object() -> None:
    """A non-string method and non-structured params are -32600 with id null."""
    reply = await _serve_line('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert _error(reply) == (None, -32600)


async def test_spec_batch_invalid_json() -> None:
    """A batch that is not JSON is a single -32700."""
    reply = await _serve_line(
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method"'
    )
    assert _error(reply) == (None, -32700)


async def test_spec_empty_batch() -> None:
    """An empty array is a single -32600, not an array."""
    reply = await _serve_line("[]")
    assert _error(reply) == (None, -32600)


@pytest.mark.parametrize("line", ["[1]", "[1,2,3]"])
async def test_spec_batch_of_invalid_items(line: str) -> None:
    """Each invalid item of a batch gets its own -32600 in the reply array."""
    reply = await _serve_line(line)
    assert isinstance(reply, list)
    assert [_error(r) for r in reply] == [(None, -32600)] * len(json.loads(line))


async def test_spec_mixed_batch() -> None:
    """A mixed batch gets an array with one reply per request or invalid item, none for the
    notifications."""
    log: list[str] = []
    reply = await _serve_line(
        "["
        '{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
        '{"foo": "boo"},'
        '{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
        '{"jsonrpc": "2.0", "method": "get_data", "id": "9"}'
        "]",
        log,
    )
    assert reply == [
        {"jsonrpc": "2.0", "result": 7, "id": "1"},
        {"jsonrpc": "2.0", "result": 19, "id": "2"},
        {
            "jsonrpc": "2.0",
            "error": {"code": -32600, "message": 'Invalid Request: "jsonrpc" must be "2.0"'},
            "id": None,
        },
        {
            "jsonrpc": "2.0",
            "error": {
                "code": -32601,
                "message": "Method not found: 'foo.get'",
                "data": {"method": "foo.get"},
            },
            "id": "5",
        },
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
    ]
    assert log == ["hello [7]"]


async def test_spec_batch_of_notifications_gets_no_reply() -> None:
    """A batch of only notifications is answered with nothing at all."""
    log: list[str] = []
    reply = await _serve_line(
        '[{"jsonrpc": "2.0", "method": "notify_hello", "params": [1]},'
        '{"jsonrpc": "2.0", "method": "update", "params": [2]}]',
        log,
    )
    assert reply is None
    assert log == ["hello [1]", "update [2]"]


async def test_invalid_params_and_internal_error_codes() -> None:
    """Wrong params are -32602 and a crashing handler is -32603 that reveals nothing inside."""
    bad = await _serve_line('{"jsonrpc": "2.0", "method": "subtract", "params": [1], "id": 7}')
    assert _error(bad) == (7, -32602)
    assert "subtrahend" in bad["error"]["message"]
    crashed = await _serve_line('{"jsonrpc": "2.0", "method": "crash", "id": 8}')
    assert _error(crashed) == (8, -32603)
    assert "secret" not in json.dumps(crashed)


def test_too_large_error_code() -> None:
    """The reply to an oversized line carries -32012, id null and the limit."""
    wire = too_large_error(1024).to_json()
    assert wire["id"] is None
    assert wire["error"]["code"] == -32012
    assert int(ErrorCode.MESSAGE_TOO_LARGE) == -32012
    assert wire["error"]["data"] == {"max_message_size": 1024}
    decoder = FrameDecoder(max_message_size=4)
    decoder.receive_data(b"123456\n")
    assert list(decoder) == [FrameTooLarge(4)]


@pytest.mark.parametrize("request_id", ["abc", 0, -5, 1.5, None])
def test_request_ids_of_every_kind(request_id: str | int | float | None) -> None:
    """Strings, numbers and null are valid ids; null still makes a request, not a notification."""
    message = parse({"jsonrpc": "2.0", "method": "m", "id": request_id})
    assert message == Request("m", None, request_id)


@pytest.mark.parametrize(
    ("value", "reply_id"),
    [
        ({"jsonrpc": "2.0", "method": "m", "id": True}, None),
        ({"jsonrpc": "2.0", "method": "m", "id": {"x": 1}}, None),
        ({"jsonrpc": "2.0", "method": "m", "id": [1]}, None),
        ({"jsonrpc": "1.0", "method": "m", "id": 4}, 4),
        ({"method": "m", "id": "k"}, "k"),
        ({"jsonrpc": "2.0", "method": "m", "params": None, "id": 5}, 5),
        ({"jsonrpc": "2.0", "method": "m", "params": 3, "id": 6}, 6),
        ({"jsonrpc": "2.0", "method": None, "id": 9}, 9),
        ({"jsonrpc": "2.0", "id": 10}, 10),
        ("just a string", None),
        (42, None),
    ],
)
def test_invalid_requests_echo_the_id_when_readable(value: object, reply_id: object) -> None:
    """An invalid request is answered with -32600 carrying its id when that id is valid, else
    null."""
    message = parse(value)
    assert isinstance(message, InvalidMessage)
    assert message.reply is not None
    assert message.reply.code == ErrorCode.INVALID_REQUEST
    assert message.reply.id == reply_id


def test_responses_are_parsed() -> None:
    """Results and errors (with or without data) become Response and ErrorResponse."""
    assert parse({"jsonrpc": "2.0", "id": 1, "result": None}) == Response(1, None)
    assert parse(
        {"jsonrpc": "2.0", "id": "a", "error": {"code": -32003, "message": "no loop"}}
    ) == ErrorResponse("a", -32003, "no loop")
    assert parse(
        {"jsonrpc": "2.0", "id": None, "error": {"code": 5, "message": "m", "data": [1]}}
    ) == ErrorResponse(None, 5, "m", [1])


@pytest.mark.parametrize(
    "value",
    [
        {"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1, "message": "m"}},
        {"jsonrpc": "2.0", "result": 1},
        {"id": 1, "result": 1},
        {"jsonrpc": "2.0", "id": 1, "error": "boom"},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": True, "message": "m"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": 1}},
    ],
)
def test_malformed_responses_are_never_answered(value: object) -> None:
    """A malformed response is reported for the log but gets no reply (no error ping-pong)."""
    message = parse(value)
    assert isinstance(message, InvalidMessage)
    assert message.reply is None
    assert "malformed response" in message.reason


def test_batch_items_are_parsed_one_by_one() -> None:
    """A batch keeps its items' order; a nested array is an invalid item, not a sub-batch."""
    batch = parse(
        [{"jsonrpc": "2.0", "method": "a"}, [1], {"jsonrpc": "2.0", "id": 2, "result": 3}]
    )
    assert isinstance(batch, Batch)
    first, second, third = batch.items
    assert first == Notification("a", None)
    assert isinstance(second, InvalidMessage)
    assert third == Response(2, 3)


ids = st.none() | st.text(max_size=10) | st.integers(min_value=-(2**53), max_value=2**53)
params = st.none() | st.lists(st.integers(), max_size=3) | st.dictionaries(
    st.text(max_size=5), st.integers(), max_size=3
)
messages = (
    st.builds(Request, st.text(max_size=10), params, ids)
    | st.builds(Notification, st.text(max_size=10), params)
    | st.builds(Response, ids, st.none() | st.integers() | st.text(max_size=5))
    | st.builds(
        ErrorResponse,
        ids,
        st.integers(min_value=-33000, max_value=0),
        st.text(max_size=10),
        st.none() | st.integers(),
    )
)


@settings(deadline=None)  # a loaded machine must not fail a correct example
@given(messages)
def test_messages_round_trip_through_the_wire(message: object) -> None:
    """Every message, encoded and decoded, parses back to itself."""
    wire = encode(message.to_json())  # type: ignore[attr-defined]
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    (event,) = list(decoder)
    assert isinstance(event, Decoded)
    assert parse(event.value) == message
