"""Method dispatch: JSON-RPC method names to typed async handlers.

A handler takes the per-connection context and, optionally, its parameters typed as a frozen
dataclass; the dispatcher checks the wire params against the dataclass before the handler runs::

    methods: Dispatcher[LoopConnection] = Dispatcher()

    @dataclass(frozen=True, slots=True)
    class GetOutput:
        since: int = 0
        limit: int | None = None

    @methods.method("get_output")
    async def get_output(conn: LoopConnection, params: GetOutput) -> dict[str, object]: ...

    @methods.method("get_status")
    async def get_status(conn: LoopConnection) -> Status: ...   # takes no params

Params may come by name (an object) or by position (an array, in field order). Supported field
types: ``str``, ``int``, ``float`` (ints accepted), ``bool``, ``None``, ``Any``/``object``,
unions (``X | None``), ``Literal[...]``, enums (by value), ``list[T]``, ``tuple[T, ...]``,
``dict[str, T]`` and nested dataclasses. A handler whose second parameter is not annotated, or is
``Any``/``object``, receives the raw params (``None`` when omitted).

Errors become replies: unknown method -32601; wrong, missing or unknown params -32602 naming the
parameter (a ``ValueError`` from the dataclass's ``__post_init__`` counts as wrong params); a
:class:`~ralph_uv.errors.RalphError` raised by the handler is sent with its code and message; any
other exception is logged with its traceback and sent as -32603 without internals.

Notifications run the same handlers, but nothing is ever sent back, not even an error.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ralph_uv.errors import ErrorCode, RalphError, RemoteError, UserError
from ralph_uv.protocol.messages import (
    Batch,
    ErrorResponse,
    Incoming,
    InvalidMessage,
    Notification,
    Params,
    Request,
    Response,
    batch_reply,
)

__all__ = ["Dispatcher", "InvalidParams", "from_json"]

log = logging.getLogger("ralph_uv.protocol.dispatch")

C = TypeVar("C")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_Log = logging.Logger | logging.LoggerAdapter[logging.Logger]
_Convert = Callable[[Any, str], Any]


class InvalidParams(UserError):
    """The params do not fit the method; ``param`` names the offending one when known.

    Handlers may raise it too, for checks a type cannot express ("'limit' must be positive").
    """

    code = ErrorCode.INVALID_PARAMS

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _WrongKind(InvalidParams):
    """The value is not even of the expected kind; in a union, another arm may still fit."""


def _wrong(path: str, expected: str, value: object) -> InvalidParams:
    return _WrongKind(f"'{path}' must be {expected}, not {_json_kind(value)}", param=path)


def _scalar(kind: type, expected: str) -> _Convert:
    def convert(value: Any, path: str) -> Any:
        if type(value) is kind:
            return value
        raise _wrong(path, expected, value)

    return convert


def _float(value: Any, path: str) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _wrong(path, "a number", value)


def _none(value: Any, path: str) -> Any:
    if value is None:
        return None
    raise _wrong(path, "null", value)


def _anything(value: Any, path: str) -> Any:
    return value


_SCALARS: dict[object, tuple[_Convert, str]] = {
    str: (_scalar(str, "a string"), "a string"),
    int: (_scalar(int, "an integer"), "an integer"),
    bool: (_scalar(bool, "a boolean"), "a boolean"),
    float: (_float, "a number"),
    type(None): (_none, "null"),
    None: (_none, "null"),
    Any: (_anything, "any value"),
    object: (_anything, "any value"),
}


def _converter(tp: Any, owner: str) -> tuple[_Convert, str]:
    """A function checking (and converting) a JSON value against ``tp``, and ``tp`` in words.

    Built once per method at registration, so an unsupported type fails at import time.
    """
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _union([_converter(arg, owner) for arg in args])
    if origin is typing.Literal:
        return _literal(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _literal(tuple(member.value for member in tp), tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass(tp, allow_extra=False, positional=False), "an object"
    if tp in (list, tuple) or origin in (list, tuple, Sequence):
        return _array(tp, origin, args, owner), "an array"
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if args and args[0] is not str:
            raise TypeError(f"{owner}: object keys are strings; use dict[str, ...]")
        item = _converter(args[1], owner)[0] if args else _anything
        return _object(item), "an object"
    raise TypeError(f"{owner}: parameter type {tp!r} is not supported")


def _union(arms: list[tuple[_Convert, str]]) -> tuple[_Convert, str]:
    expected = " or ".join(words for _, words in arms)

    def convert(value: Any, path: str) -> Any:
        for arm, _ in arms:
            try:
                return arm(value, path)
            except _WrongKind as exc:
                # Not this arm's kind: try the next. An error deeper inside means the value has
                # this arm's kind but is wrong within, which is what the caller needs to hear.
                if exc.param != path:
                    raise
        raise _wrong(path, expected, value)

    return convert, expected


def _literal(values: tuple[Any, ...], enum_type: type[enum.Enum] | None = None) -> tuple[
    _Convert, str
]:
    expected = "one of " + ", ".join(repr(v) for v in values)
    allowed = {(type(v), v) for v in values}

    def convert(value: Any, path: str) -> Any:
        try:
            known = (type(value), value) in allowed
        except TypeError:  # an array or object: unhashable, and never a literal
            known = False
        if not known:
            raise _WrongKind(f"'{path}' must be {expected}, not {value!r}", param=path)
        return enum_type(value) if enum_type is not None else value

    return convert, expected


def _array(tp: Any, origin: Any, args: tuple[Any, ...], owner: str) -> _Convert:
    is_tuple = tuple in (tp, origin)
    fixed: list[_Convert] | None = None
    item: _Convert = _anything
    if is_tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        fixed = [_converter(arg, owner)[0] for arg in args]
    elif args:
        item = _converter(args[0], owner)[0]

    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise _wrong(path, "an array", value)
        if fixed is not None:
            if len(value) != len(fixed):
                raise InvalidParams(
                    f"'{path}' must be an array of {len(fixed)} items, not {len(value)}",
                    param=path,
                )
            pairs = enumerate(zip(fixed, value, strict=True))
            items = [conv(v, f"{path}[{i}]") for i, (conv, v) in pairs]
        else:
            items = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if is_tuple else items

    return convert


def _object(item: _Convert) -> _Convert:
    def convert(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _wrong(path, "an object", value)
        if item is _anything:
            return value
        return {k: item(v, f"{path}.{k}") for k, v in value.items()}

    return convert


def _dataclass(cls: type, *, allow_extra: bool, positional: bool) -> _Convert:
    """Check an object (or, for top-level params, an array) against a dataclass's fields."""
    owner = cls.__qualname__
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"{owner}: cannot resolve a field's type ({exc})") from exc
    fields = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        fields.append((field.name, _converter(hints[field.name], owner)[0], required))
    names = frozenset(name for name, _, _ in fields)

    def convert(value: Any, path: str) -> Any:
        prefix = f"{path}." if path else ""
        if positional and isinstance(value, list):
            if len(value) > len(fields):
                raise InvalidParams(
                    f"too many parameters: expected at most {len(fields)}, got {len(value)}"
                )
            value = {name: v for (name, _, _), v in zip(fields, value, strict=False)}
        elif not isinstance(value, dict):
            raise _wrong(path or "params", "an object", value)
        if not allow_extra:
            for key in value:
                if key not in names:
                    raise InvalidParams(f"unknown parameter '{prefix}{key}'", param=prefix + key)
        kwargs = {}
        for name, conv, required in fields:
            if name in value:
                kwargs[name] = conv(value[name], prefix + name)
            elif required:
                raise InvalidParams(
                    f"missing required parameter '{prefix}{name}'", param=prefix + name
                )
        try:
            return cls(**kwargs)
        except ValueError as exc:  # checks in __post_init__
            raise InvalidParams(str(exc)) from exc

    return convert


@functools.lru_cache(maxsize=256)
def _cached_converter(tp: Any) -> _Convert:
    return _converter(tp, getattr(tp, "__qualname__", repr(tp)))[0]


def from_json(tp: type[T], value: Any) -> T:
    """Check a decoded JSON value against ``tp`` (a dataclass, ``list[X]``, ...) and build it.

    The same rules as for params; for clients that want a typed result. Raises
    :class:`InvalidParams` naming the offending field.
    """
    key: Any = tp
    result: T = _cached_converter(key)(value, "")
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class _Method:
    handler: Callable[..., Awaitable[Any]]
    args: Callable[[Params], tuple[Any, ...]]
    inline: bool


def _no_params(method: str) -> Callable[[Params], tuple[Any, ...]]:
    def args(params: Params) -> tuple[Any, ...]:
        if params:
            raise InvalidParams(f"'{method}' takes no parameters")
        return ()

    return args


def _params_args(method: str, handler: Callable[..., Any], allow_extra: bool) -> Callable[
    [Params], tuple[Any, ...]
]:
    signature = inspect.signature(handler)
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) == 1:
        return _no_params(method)
    if len(positional) != 2:
        raise TypeError(f"handler for '{method}' must take (context) or (context, params)")
    try:
        tp = typing.get_type_hints(handler).get(positional[1].name, Any)
    except NameError as exc:
        raise TypeError(f"handler for '{method}': cannot resolve its params type ({exc})") from exc
    if tp in (Any, object):
        return lambda params: (params,)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        convert = _dataclass(tp, allow_extra=allow_extra, positional=True)
        return lambda params: (convert({} if params is None else params, ""),)
    item_convert, _ = _converter(tp, method)
    # A handler typed dict[...] or list[...] receives the whole params value.
    return lambda params: (item_convert(params, "params"),)


class Dispatcher(Generic[C]):
    """A table of methods; ``C`` is the per-connection context every handler receives."""

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    def method(
        self, name: str, *, allow_extra: bool = False, inline: bool = False
    ) -> Callable[[F], F]:
        """Decorator registering an ``async def handler(context[, params])`` under ``name``.

        Unknown parameters are refused unless ``allow_extra`` is true. ``inline`` marks a
        handler that answers at once and never waits on the peer (``get_status``,
        ``write_pty``, ``resize``): the endpoint runs it in the connection's reading task,
        without a task of its own, which is faster and keeps it in order with the messages
        after it. An inline handler must not call the same peer: nothing more is read from the
        connection until it returns.
        """

        def register(handler: F) -> F:
            self.add(name, handler, allow_extra=allow_extra, inline=inline)
            return handler

        return register

    def add(
        self,
        name: str,
        handler: Callable[..., Awaitable[Any]],
        *,
        allow_extra: bool = False,
        inline: bool = False,
    ) -> None:
        """Register ``handler`` for ``name``; its params type is read from its annotations."""
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for '{name}' must be an async function")
        if name in self._methods:
            raise ValueError(f"method '{name}' is already registered")
        self._methods[name] = _Method(handler, _params_args(name, handler, allow_extra), inline)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def is_inline(self, name: str) -> bool:
        """Whether ``name`` is registered with ``inline=True``."""
        method = self._methods.get(name)
        return method is not None and method.inline

    @property
    def names(self) -> frozenset[str]:
        """Every registered method name."""
        return frozenset(self._methods)

    async def dispatch(
        self, context: C, message: Request | Notification, *, logger: _Log = log
    ) -> Response | ErrorResponse | None:
        """Run the handler for ``message``; the reply for a request, ``None`` for a notification."""
        is_request = isinstance(message, Request)
        request_id = message.id if isinstance(message, Request) else None
        method = self._methods.get(message.method)
        if method is None:
            if not is_request:
                logger.debug("notification for unknown method %r ignored", message.method)
                return None
            return ErrorResponse(
                request_id,
                ErrorCode.METHOD_NOT_FOUND,
                f"Method not found: '{message.method}'",
                {"method": message.method},
            )
        try:
            result = await method.handler(context, *method.args(message.params))
        except RalphError as exc:
            if not is_request:
                logger.warning("notification %r failed: %s", message.method, exc.message)
                return None
            return _error_reply(request_id, exc)
        except Exception:
            logger.exception("handler for %r failed", message.method)
            if not is_request:
                return None
            return ErrorResponse(
                request_id,
                ErrorCode.INTERNAL_ERROR,
                f"Internal error while handling '{message.method}'; the server's log has details",
            )
        return Response(request_id, result) if is_request else None

    async def answer(
        self,
        context: C,
        incoming: Incoming | Batch,
        *,
        on_response: Callable[[Response | ErrorResponse], None] | None = None,
        logger: _Log = log,
    ) -> dict[str, Any] | list[dict[str, Any]] | None:
        """Everything a server does with one parsed line: the JSON to send back, or ``None``.

        Batch items run one after another. Replies received (responses to this side's own
        calls) go to ``on_response``.
        """
        if isinstance(incoming, Batch):
            replies = [
                await self._answer_one(context, item, on_response, logger)
                for item in incoming.items
            ]
            return batch_reply(replies)
        reply = await self._answer_one(context, incoming, on_response, logger)
        return None if reply is None else reply.to_json()

    async def _answer_one(
        self,
        context: C,
        item: Incoming,
        on_response: Callable[[Response | ErrorResponse], None] | None,
        logger: _Log,
    ) -> Response | ErrorResponse | None:
        if isinstance(item, Request | Notification):
            return await self.dispatch(context, item, logger=logger)
        if isinstance(item, InvalidMessage):
            if item.reply is None:
                logger.warning("ignored %s", item.reason)
            return item.reply
        if on_response is not None:
            on_response(item)
        else:
            logger.debug("ignored a reply (id %r) nobody waits for", item.id)
        return None


def _error_reply(request_id: Any, exc: RalphError) -> ErrorResponse:
    code = exc.wire_code if isinstance(exc, RemoteError) else int(exc.code)
    data: Any = exc.data if isinstance(exc, RemoteError) else None
    if isinstance(exc, InvalidParams) and exc.param is not None:
        data = {"param": exc.param}
    return ErrorResponse(request_id, code, exc.message, data)
