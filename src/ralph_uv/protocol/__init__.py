"""The wire protocol without I/O: NDJSON framing, JSON-RPC 2.0 messages and method dispatch.

Bytes go into a :class:`FrameDecoder` and come out as events; decoded values go through
:func:`parse` into messages; a :class:`Dispatcher` runs the typed handler for a request and gives
the reply; :func:`encode` turns a message's ``to_json()`` back into one line. Nothing here touches
a socket: :mod:`ralph_uv.rpc` drives it over a stream.
"""

from __future__ import annotations

from ralph_uv.protocol.dispatch import Dispatcher, InvalidParams, from_json
from ralph_uv.protocol.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Decoded,
    FrameDecoder,
    FrameEvent,
    FrameTooLarge,
    InvalidFrame,
    encode,
)
from ralph_uv.protocol.messages import (
    Batch,
    ErrorResponse,
    Incoming,
    InvalidMessage,
    Message,
    Notification,
    Params,
    Request,
    RequestId,
    Response,
    batch_reply,
    parse,
    parse_error,
    too_large_error,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Batch",
    "Decoded",
    "Dispatcher",
    "ErrorResponse",
    "FrameDecoder",
    "FrameEvent",
    "FrameTooLarge",
    "Incoming",
    "InvalidFrame",
    "InvalidMessage",
    "InvalidParams",
    "Message",
    "Notification",
    "Params",
    "Request",
    "RequestId",
    "Response",
    "batch_reply",
    "encode",
    "from_json",
    "parse",
    "parse_error",
    "too_large_error",
]
