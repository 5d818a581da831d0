"""NDJSON framing without I/O: bytes in, decoded JSON values out, and the reverse.

Every message on every transport is one JSON value on one line, UTF-8, terminated by ``\\n``.
:class:`FrameDecoder` is fed whatever chunks the transport delivers (:meth:`receive_data`) and
hands back one event per line (:meth:`FrameDecoder.next_event`, or iterate it):

- :class:`Decoded` — a line that held a JSON value;
- :class:`InvalidFrame` — a line that was not UTF-8 or not JSON (answered with -32700);
- :class:`FrameTooLarge` — a line longer than ``max_message_size`` (answered with -32012).

Invariants:

- The decoder never raises, whatever bytes it is fed.
- It never holds more than ``max_message_size`` bytes of an unfinished line: once a line is
  known to be too long, the decoder reports it at once and drops bytes up to the next newline,
  so the stream resynchronises on the following message.
- The events do not depend on how the input was split into chunks.
- Blank lines (only whitespace) are skipped; a trailing ``\\r`` is tolerated.

:func:`encode` produces one compact line (no embedded newline: JSON escapes them in strings).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ralph_uv.errors import InternalError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Decoded",
    "FrameDecoder",
    "FrameEvent",
    "FrameTooLarge",
    "InvalidFrame",
    "encode",
]

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
"""The default line limit in bytes, the same as ``Config.max_message_size``."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """A line that held a JSON value."""

    value: Any


@dataclass(frozen=True, slots=True)
class InvalidFrame:
    """A line that was not valid UTF-8 or not valid JSON; ``reason`` says what was wrong."""

    reason: str


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A line longer than ``limit`` bytes; it has been (or is being) discarded."""

    limit: int


FrameEvent = Decoded | InvalidFrame | FrameTooLarge


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode


def _decode_line(line: bytes) -> FrameEvent | None:
    """The event for one complete line, or ``None`` for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidFrame(f"invalid UTF-8 at byte {exc.start}")
    try:
        return Decoded(_decode_json(text))
    except json.JSONDecodeError as exc:
        if not text.strip():
            return None
        return InvalidFrame(f"invalid JSON: {exc.msg} at column {exc.colno}")
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        return InvalidFrame(f"invalid JSON: {exc}")
    except RecursionError:
        return InvalidFrame("invalid JSON: nested too deeply")


class FrameDecoder:
    """Incremental NDJSON decoder. Feed it bytes, take events out; it never raises."""

    __slots__ = ("_buffer", "_discarding", "_events", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 byte")
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._discarding = False
        self._events: deque[FrameEvent] = deque()

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held back (never more than ``max_message_size``)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the transport. Complete lines become events at once."""
        start = 0
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._discarding = False
            start = newline + 1
        find = data.find
        while True:
            newline = find(b"\n", start)
            if newline < 0:
                break
            buffer = self._buffer
            if len(buffer) + newline - start > self.max_message_size:
                # Checked before copying anything, so a huge line is never held in memory.
                buffer.clear()
                self._events.append(FrameTooLarge(self.max_message_size))
            elif buffer:
                buffer += data[start:newline]
                self._complete_line(bytes(buffer))
                buffer.clear()
            else:
                self._complete_line(data[start:newline])
            start = newline + 1
        if start < len(data):
            if len(self._buffer) + len(data) - start > self.max_message_size:
                self._buffer.clear()
                self._discarding = True
                self._events.append(FrameTooLarge(self.max_message_size))
            else:
                self._buffer += data[start:]

    def receive_eof(self) -> None:
        """The peer will send nothing more: an unterminated last line counts as a message."""
        if self._buffer:
            line = bytes(self._buffer)
            self._buffer.clear()
            self._complete_line(line)
        self._discarding = False

    def next_event(self) -> FrameEvent | None:
        """The next event, or ``None`` when more data is needed."""
        events = self._events
        return events.popleft() if events else None

    def __iter__(self) -> Iterator[FrameEvent]:
        """Every event available now (more may follow after the next :meth:`receive_data`)."""
        events = self._events
        while events:
            yield events.popleft()

    def _complete_line(self, line: bytes) -> None:
        event = _decode_line(line)
        if event is not None:
            self._events.append(event)


def _to_json(value: object) -> object:
    """Encode what json cannot on its own: dataclasses (as objects) and enums (their value)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encode_text = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_to_json
).encode
_encode_ascii = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=_to_json
).encode


def encode(value: object) -> bytes:
    """One NDJSON line (with its ``\\n``): compact JSON, UTF-8.

    Dataclass instances are written as objects and enums as their values. Raises
    :class:`~ralph_uv.errors.InternalError` for a value JSON cannot carry (a bug in the caller).
    """
    try:
        text = _encode_text(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InternalError(f"cannot encode a message as JSON: {exc}") from exc
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate (it can arrive through a JSON "\ud800" escape) has no UTF-8 form;
        # the ASCII encoder writes it back as the same escape.
        return _encode_ascii(value).encode("ascii") + b"\n"
