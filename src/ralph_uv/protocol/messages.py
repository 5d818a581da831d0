"""JSON-RPC 2.0 messages, and the parsing of a decoded JSON value into them.

:func:`parse` turns what :class:`~ralph_uv.protocol.framing.FrameDecoder` decoded into a
:class:`Request`, :class:`Notification`, :class:`Response`, :class:`ErrorResponse`, an
:class:`InvalidMessage` (with the error reply the spec requires), or a :class:`Batch` of those.

The spec's rules, as applied here:

- A request has an ``id`` member (a string, a number or null); a notification has none and is
  never answered, not even with an error.
- A value that is not a valid request is answered with -32600, whose ``id`` is the request's own
  when it can be read, else null; a line that is not JSON is answered with -32700, id null.
- An empty batch is answered with a single -32600; a batch whose items need no reply (only
  notifications) gets no reply at all; otherwise the reply is an array of the replies.
- A malformed *response* is reported but never answered, so that two peers cannot answer each
  other's errors forever.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ralph_uv.errors import ErrorCode

__all__ = [
    "Batch",
    "ErrorResponse",
    "Incoming",
    "InvalidMessage",
    "Message",
    "Notification",
    "Params",
    "Request",
    "RequestId",
    "Response",
    "batch_reply",
    "parse",
    "parse_error",
    "too_large_error",
]

JSONRPC = "2.0"

RequestId = str | int | float | None
"""A request's id: a string, a number or null (null is allowed but discouraged by the spec)."""

Params = dict[str, Any] | list[Any] | None
"""By name (an object), by position (an array), or omitted (``None``)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A call that expects a reply with the same ``id``."""

    method: str
    params: Params
    id: RequestId

    def to_json(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"jsonrpc": JSONRPC, "id": self.id, "method": self.method}
        if self.params is not None:
            wire["params"] = self.params
        return wire


@dataclass(frozen=True, slots=True)
class Notification:
    """A call without an ``id``: the receiver never replies."""

    method: str
    params: Params

    def to_json(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"jsonrpc": JSONRPC, "method": self.method}
        if self.params is not None:
            wire["params"] = self.params
        return wire


@dataclass(frozen=True, slots=True)
class Response:
    """A successful reply."""

    id: RequestId
    result: Any

    def to_json(self) -> dict[str, Any]:
        return {"jsonrpc": JSONRPC, "id": self.id, "result": self.result}


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A failed reply. ``data`` is optional structured detail (omitted from the wire if None)."""

    id: RequestId
    code: int
    message: str
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": JSONRPC, "id": self.id, "error": error}


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A received value that is not valid JSON-RPC.

    ``reply`` is the error to send back, or ``None`` when nothing must be sent (a malformed
    response); ``reason`` says what was wrong, for the log.
    """

    reason: str
    reply: ErrorResponse | None


Message = Request | Notification | Response | ErrorResponse
Incoming = Message | InvalidMessage


@dataclass(frozen=True, slots=True)
class Batch:
    """A JSON array of messages, each parsed on its own. Never empty."""

    items: tuple[Incoming, ...]


def _is_id(value: object) -> bool:
    # bool is a subclass of int in Python but not a number in JSON.
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _invalid_request(value: object, reason: str) -> InvalidMessage:
    request_id = value.get("id") if isinstance(value, dict) else None
    if not _is_id(request_id):
        request_id = None
    reply = ErrorResponse(request_id, ErrorCode.INVALID_REQUEST, f"Invalid Request: {reason}")
    return InvalidMessage(reason, reply)


def _parse_response(value: dict[str, Any]) -> Incoming:
    def malformed(reason: str) -> InvalidMessage:
        return InvalidMessage(f"malformed response: {reason}", None)

    if value.get("jsonrpc") != JSONRPC:
        return malformed('"jsonrpc" must be "2.0"')
    if "id" not in value or not _is_id(value["id"]):
        return malformed('"id" must be a string, a number or null')
    if "result" in value:
        if "error" in value:
            return malformed('a response has either "result" or "error", not both')
        return Response(value["id"], value["result"])
    error = value["error"]
    if not isinstance(error, dict):
        return malformed('"error" must be an object')
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool):
        return malformed('"error.code" must be an integer')
    if not isinstance(message, str):
        return malformed('"error.message" must be a string')
    return ErrorResponse(value["id"], code, message, error.get("data"))


def _parse_one(value: Any) -> Incoming:
    if not isinstance(value, dict):
        return _invalid_request(value, "expected a JSON object")
    if "method" not in value and ("result" in value or "error" in value):
        return _parse_response(value)
    if value.get("jsonrpc") != JSONRPC:
        return _invalid_request(value, '"jsonrpc" must be "2.0"')
    method = value.get("method")
    if not isinstance(method, str):
        return _invalid_request(value, '"method" must be a string')
    params = value.get("params")
    if "params" in value and not isinstance(params, dict | list):
        return _invalid_request(value, '"params" must be an object or an array')
    if "id" not in value:
        return Notification(method, params)
    if not _is_id(value["id"]):
        return _invalid_request(value, '"id" must be a string, a number or null')
    return Request(method, params, value["id"])


def parse(value: Any) -> Incoming | Batch:
    """Classify one decoded JSON value (one line). Never raises."""
    if isinstance(value, list):
        if not value:
            return _invalid_request(value, "empty batch")
        return Batch(tuple(_parse_one(item) for item in value))
    return _parse_one(value)


def parse_error(reason: str) -> ErrorResponse:
    """The reply to a line that is not UTF-8 JSON."""
    return ErrorResponse(None, ErrorCode.PARSE_ERROR, f"Parse error: {reason}")


def too_large_error(limit: int) -> ErrorResponse:
    """The reply to a line longer than the receiver's limit (its id cannot be known)."""
    return ErrorResponse(
        None,
        ErrorCode.MESSAGE_TOO_LARGE,
        f"Message too large: a message may be at most {limit} bytes; "
        "send less per call (for example a smaller 'limit')",
        {"max_message_size": limit},
    )


def batch_reply(replies: Iterable[Response | ErrorResponse | None]) -> list[dict[str, Any]] | None:
    """The reply to a batch: the array of its items' replies, or ``None`` if there are none."""
    wire = [reply.to_json() for reply in replies if reply is not None]
    return wire or None
