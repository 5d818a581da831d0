"""The dispatcher: typed params, error translation and the per-connection context."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from ralph_uv.errors import ErrorCode, RalphError, RemoteError, UserError
from ralph_uv.protocol import (
    Dispatcher,
    ErrorResponse,
    InvalidParams,
    Notification,
    Request,
    Response,
    from_json,
)


class Mode(enum.StrEnum):
    HEADLESS = "headless"
    INTERACTIVE = "interactive"


@dataclass(frozen=True, slots=True)
class Size:
    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class Everything:
    name: str
    count: int = 0
    ratio: float = 1.0
    flag: bool = False
    maybe: str | None = None
    kind: Literal["a", "b"] = "a"
    mode: Mode = Mode.HEADLESS
    size: Size | None = None
    keys: list[int] = field(default_factory=list)
    pair: tuple[str, int] | None = None
    rest: tuple[str, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)
    blob: Any = None


@dataclass(frozen=True, slots=True)
class Positive:
    value: int

    def __post_init__(self) -> None:
        if self.value <= 0:
            raise ValueError("'value' must be positive")


@dataclass
class Conn:
    """A per-connection context as a server would define it."""

    peer: str
    seen: list[object] = field(default_factory=list)


methods: Dispatcher[Conn] = Dispatcher()


@methods.method("everything")
async def everything(conn: Conn, params: Everything) -> Everything:
    conn.seen.append(params)
    return params


@methods.method("positive")
async def positive(conn: Conn, params: Positive) -> int:
    return params.value


@methods.method("status")
async def status(conn: Conn) -> dict[str, str]:
    return {"peer": conn.peer}


@methods.method("raw")
async def raw(conn: Conn, params: Any) -> Any:
    return params


@methods.method("lenient", allow_extra=True)
async def lenient(conn: Conn, params: Size) -> int:
    return params.cols * params.rows


@methods.method("fail")
async def fail(conn: Conn, params: dict[str, Any]) -> None:
    kind = params["kind"]
    if kind == "user":
        raise UserError("the task 'x' does not exist; run 'ralph-uv list' to see tasks")
    if kind == "loop":
        raise RalphError("loop 7 not found", code=ErrorCode.LOOP_NOT_FOUND)
    if kind == "remote":
        raise RemoteError("relayed", code=-32099, data={"from": "runner"})
    if kind == "params":
        raise InvalidParams("'limit' must be positive", param="limit")
    raise KeyError("password=hunter2")


async def _call(method: str, params: Any = None, conn: Conn | None = None) -> Any:
    reply = await methods.dispatch(conn or Conn("test"), Request(method, params, 1))
    assert reply is not None
    return reply


async def _error(method: str, params: Any = None) -> ErrorResponse:
    reply = await _call(method, params)
    assert isinstance(reply, ErrorResponse), reply
    assert reply.id == 1
    return reply


async def test_params_are_converted_to_the_dataclass() -> None:
    """Named params become the handler's dataclass with nested, enum, tuple and float values."""
    conn = Conn("p")
    reply = await _call(
        "everything",
        {
            "name": "n",
            "count": 2,
            "ratio": 3,
            "flag": True,
            "maybe": None,
            "kind": "b",
            "mode": "interactive",
            "size": {"cols": 80, "rows": 24},
            "keys": [1, 2],
            "pair": ["x", 1],
            "rest": ["a", "b"],
            "labels": {"k": 1},
            "blob": {"any": ["thing"]},
        },
        conn,
    )
    assert isinstance(reply, Response)
    (params,) = conn.seen
    assert params == Everything(
        "n", 2, 3.0, True, None, "b", Mode.INTERACTIVE, Size(80, 24), [1, 2], ("x", 1),
        ("a", "b"), {"k": 1}, {"any": ["thing"]},
    )
    assert isinstance(params.ratio, float)
    assert reply.result is params


async def test_positional_params_follow_field_order() -> None:
    """An array of params fills the dataclass's fields in order; defaults fill the rest."""
    conn = Conn("p")
    await _call("everything", ["n", 5], conn)
    assert conn.seen == [Everything("n", 5)]


@pytest.mark.parametrize(
    ("params", "message", "param"),
    [
        ({}, "missing required parameter 'name'", "name"),
        ({"name": 1}, "'name' must be a string, not a number", "name"),
        ({"name": "n", "count": "2"}, "'count' must be an integer, not a string", "count"),
        ({"name": "n", "count": True}, "'count' must be an integer, not a boolean", "count"),
        ({"name": "n", "count": 1.5}, "'count' must be an integer, not a number", "count"),
        ({"name": "n", "flag": 1}, "'flag' must be a boolean, not a number", "flag"),
        ({"name": "n", "maybe": 3}, "'maybe' must be a string or null, not a number", "maybe"),
        ({"name": "n", "kind": "c"}, "'kind' must be one of 'a', 'b', not 'c'", "kind"),
        ({"name": "n", "kind": ["a"]}, "'kind' must be one of 'a', 'b', not ['a']", "kind"),
        ({"name": "n", "mode": "x"}, "'mode' must be one of 'headless', 'interactive'", "mode"),
        ({"name": "n", "size": {"cols": 8}}, "missing required parameter 'size.rows'", "size.rows"),
        (
            {"name": "n", "size": {"cols": 80, "rows": "24"}},
            "'size.rows' must be an integer, not a string",
            "size.rows",
        ),
        ({"name": "n", "keys": [1, "2"]}, "'keys[1]' must be an integer, not a string", "keys[1]"),
        ({"name": "n", "keys": {}}, "'keys' must be an array, not an object", "keys"),
        ({"name": "n", "pair": ["x"]}, "'pair' must be an array of 2 items, not 1", "pair"),
        ({"name": "n", "labels": {"k": "v"}}, "'labels.k' must be an integer", "labels.k"),
        ({"name": "n", "typo": 1}, "unknown parameter 'typo'", "typo"),
        (
            {"name": "n", "size": {"cols": 1, "rows": 1, "x": 0}},
            "unknown parameter 'size.x'",
            "size.x",
        ),
    ],
)
async def test_wrong_params_name_the_parameter(
    params: dict[str, Any], message: str, param: str
) -> None:
    """Missing, mistyped and unknown params are -32602 whose message and data name the
    offending parameter; the handler does not run."""
    error = await _error("everything", params)
    assert error.code == ErrorCode.INVALID_PARAMS
    assert message in error.message
    assert error.data == {"param": param}


async def test_too_many_positional_params() -> None:
    """More positional params than fields is -32602."""
    error = await _error("positive", [1, 2])
    assert error.code == ErrorCode.INVALID_PARAMS
    assert "too many parameters" in error.message


async def test_post_init_value_error_is_invalid_params() -> None:
    """A ValueError from the params dataclass's own checks becomes -32602 with its message."""
    error = await _error("positive", {"value": -1})
    assert (error.code, error.message) == (ErrorCode.INVALID_PARAMS, "'value' must be positive")
    ok = await _call("positive", {"value": 3})
    assert ok == Response(1, 3)


@pytest.mark.parametrize("params", [None, {}, []])
async def test_method_without_params_accepts_none_given(params: Any) -> None:
    """A handler without a params argument accepts omitted, empty-object or empty-array params,
    and receives the connection's context."""
    assert await _call("status", params, Conn("unix:/x.sock")) == Response(
        1, {"peer": "unix:/x.sock"}
    )


async def test_method_without_params_refuses_params() -> None:
    """Non-empty params to a method that takes none are -32602."""
    error = await _error("status", {"x": 1})
    assert error.code == ErrorCode.INVALID_PARAMS
    assert "'status' takes no parameters" in error.message


async def test_raw_params_handler_gets_the_params_as_sent() -> None:
    """A handler typed Any receives params untouched, None when omitted."""
    assert await _call("raw", [1, {"a": None}]) == Response(1, [1, {"a": None}])
    assert await _call("raw") == Response(1, None)


async def test_allow_extra_ignores_unknown_params() -> None:
    """A method registered with allow_extra accepts and ignores unknown params."""
    assert await _call("lenient", {"cols": 2, "rows": 3, "future": True}) == Response(1, 6)


@pytest.mark.parametrize(
    ("kind", "code", "message", "data"),
    [
        ("user", -32602, "the task 'x' does not exist; run 'ralph-uv list' to see tasks", None),
        ("loop", -32003, "loop 7 not found", None),
        ("remote", -32099, "relayed", {"from": "runner"}),
        ("params", -32602, "'limit' must be positive", {"param": "limit"}),
    ],
)
async def test_ralph_errors_keep_their_code_and_message(
    kind: str, code: int, message: str, data: Any
) -> None:
    """A RalphError from a handler is sent with its own code, message and data."""
    error = await _error("fail", {"kind": kind})
    assert (error.code, error.message, error.data) == (code, message, data)


async def test_other_exceptions_are_internal_errors_without_internals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any other exception is -32603 with a message that reveals nothing, and is logged with
    its traceback."""
    with caplog.at_level(logging.ERROR, logger="ralph_uv.protocol.dispatch"):
        error = await _error("fail", {"kind": "bug"})
    assert error.code == ErrorCode.INTERNAL_ERROR
    assert "hunter2" not in error.message
    assert "KeyError" not in error.message
    assert "'fail'" in error.message
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError


async def test_unknown_method() -> None:
    """An unregistered method is -32601 naming it."""
    error = await _error("nope")
    assert (error.code, error.data) == (ErrorCode.METHOD_NOT_FOUND, {"method": "nope"})


async def test_notifications_never_reply(caplog: pytest.LogCaptureFixture) -> None:
    """Notifications run the handler but return nothing, even on bad params or failure; failures
    are logged."""
    conn = Conn("p")
    assert await methods.dispatch(conn, Notification("everything", {"name": "n"})) is None
    assert conn.seen == [Everything("n")]
    with caplog.at_level(logging.WARNING):
        assert await methods.dispatch(conn, Notification("everything", {"name": 1})) is None
        assert await methods.dispatch(conn, Notification("fail", {"kind": "bug"})) is None
        assert await methods.dispatch(conn, Notification("nope", None)) is None
    assert "'name' must be a string" in caplog.text
    assert "KeyError" in caplog.text


def test_registration_checks_handlers() -> None:
    """Sync handlers, odd signatures, unsupported param types and duplicate names are refused
    when registering, not when called."""
    table: Dispatcher[None] = Dispatcher()

    def sync(ctx: None) -> None: ...

    async def three(ctx: None, a: int, b: int) -> None: ...

    async def weird(ctx: None, params: set[int]) -> None: ...

    async def fine(ctx: None) -> None: ...

    with pytest.raises(TypeError, match="async"):
        table.add("sync", sync)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\(context\) or \(context, params\)"):
        table.add("three", three)
    with pytest.raises(TypeError, match="not supported"):
        table.add("weird", weird)
    table.add("fine", fine)
    with pytest.raises(ValueError, match="already registered"):
        table.add("fine", fine)
    assert "fine" in table
    assert table.names == {"fine"}


def test_from_json_builds_typed_results() -> None:
    """from_json turns a reply into a dataclass, or says which field is wrong."""
    assert from_json(Size, {"cols": 1, "rows": 2}) == Size(1, 2)
    assert from_json(list[Size], [{"cols": 1, "rows": 2}]) == [Size(1, 2)]
    with pytest.raises(InvalidParams, match="'rows' must be an integer"):
        from_json(Size, {"cols": 1, "rows": None})
