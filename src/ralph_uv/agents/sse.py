"""Server-sent events: a parser without I/O and a reader over an aiohttp response.

:class:`SseParser` takes bytes in chunks of any size and gives complete events, following the
WHATWG ``text/event-stream`` rules: lines end with CRLF, LF or CR (also when a CRLF is split
between two chunks); ``data`` lines of one event are joined with newlines; lines starting with
``:`` are comments; ``retry`` sets the reconnection delay (digits only, otherwise ignored);
``id`` sets the last event id, which later events keep until another ``id`` changes it; an event
is dispatched at a blank line, and only when it carried data.

:func:`iter_sse` feeds an aiohttp response body through a parser.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from ralph_uv.errors import TransportError

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "SseEvent", "SseParser", "iter_sse"]

DEFAULT_MAX_EVENT_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its type (``message`` when the stream named none), data and id."""

    data: str
    event: str = "message"
    id: str = ""


class SseParser:
    """Bytes in, events out. ``retry`` and ``last_event_id`` hold the stream's current state."""

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self.max_event_size = max_event_size
        self.retry: int | None = None  # reconnection delay in milliseconds, when the server set one
        self.last_event_id = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes from the stream; return the events they complete, in order."""
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buffer += text
        return self._drain(final=False)

    def close(self) -> list[SseEvent]:
        """The stream ended: dispatch what a held-back CR completes, drop the unfinished rest.

        An event that was not ended by a blank line is dropped, as the standard says.
        """
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain(final=True)
        self._buffer = ""
        self._data, self._data_size, self._event_type = [], 0, ""
        return events

    def _drain(self, final: bool) -> list[SseEvent]:
        events: list[SseEvent] = []
        buffer = self._buffer
        start = 0
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr + 1 == len(buffer) and not final:
                    break  # a CR at the end of a chunk may be the first half of a CRLF
                end, after = cr, cr + 2 if buffer.startswith("\n", cr + 1) else cr + 1
            else:
                end, after = lf, lf + 1
            events.extend(self._line(buffer[start:end]))
            start = after
        self._buffer = buffer[start:]
        if len(self._buffer) + self._data_size > self.max_event_size:
            raise TransportError(
                f"an event on the stream is larger than {self.max_event_size} bytes; "
                "the stream was closed"
            )
        return events

    def _line(self, line: str) -> list[SseEvent]:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return []
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == "event":
            self._event_type = value
        elif name == "id" and "\x00" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return []

    def _dispatch(self) -> list[SseEvent]:
        data, event_type = self._data, self._event_type
        self._data, self._data_size, self._event_type = [], 0, ""
        if not data:
            return []
        return [SseEvent("\n".join(data), event_type or "message", self.last_event_id)]


async def iter_sse(
    content: aiohttp.StreamReader, parser: SseParser | None = None
) -> AsyncIterator[SseEvent]:
    """The events of a response body, as they arrive; ends when the server closes the stream."""
    parser = parser if parser is not None else SseParser()
    async for chunk in content.iter_any():
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event
