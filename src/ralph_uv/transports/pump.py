"""Moving bytes from one stream to another: the copy loop of every relay, and a stream that
gives back the bytes read ahead before it changed hands.

:func:`pump` reads up to ``chunk`` bytes at a time and waits for the target to drain before
reading more, so a slow reader slows its writer down and the copy never holds more than one
read plus the target's write buffer.

:func:`half_close` passes the end of output on where a stream supports it.

:class:`PrefixedStream` is how a connection is handed on after someone has read from it (an
authentication gate, a ``connect_loop`` handshake): it first returns what was read, then reads
on, so the next reader misses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ralph_uv.errors import TransportError
from ralph_uv.transports.base import DEFAULT_READ_SIZE, Stream

__all__ = ["PrefixedStream", "Sink", "Source", "half_close", "pump"]


class Source(Protocol):
    """Anything bytes are read from: a :class:`Stream`, an :class:`asyncio.StreamReader`."""

    async def read(self, n: int, /) -> bytes: ...


class Sink(Protocol):
    """Anything bytes are written to with backpressure: a :class:`Stream`, a StreamWriter."""

    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...


async def pump(
    source: Source,
    target: Sink,
    *,
    chunk: int = DEFAULT_READ_SIZE,
    counter: list[int] | None = None,
) -> None:
    """Copy ``source`` to ``target`` until ``source`` ends; errors are the caller's.

    The bytes copied are added to ``counter[0]`` as they go, so the count holds even when the
    copy is cancelled halfway.
    """
    while data := await source.read(chunk):
        target.write(data)
        if counter is not None:
            counter[0] += len(data)
        await target.drain()


def half_close(stream: Stream) -> bool:
    """Pass the end of output on to ``stream`` (``write_eof``) if it can; False when it cannot."""
    method = getattr(stream, "write_eof", None)
    if not callable(method):
        return False
    try:
        method()
    except (OSError, RuntimeError, TransportError):
        return False
    return True


class PrefixedStream:
    """A :class:`Stream` that first returns ``prefix``, then reads from ``stream``; its
    ``extra`` is the wrapped stream's with ``extra`` added."""

    def __init__(
        self, stream: Stream, prefix: bytes, extra: Mapping[str, Any] | None = None
    ) -> None:
        self._stream = stream
        self._prefix = bytearray(prefix)
        self.extra: Mapping[str, Any] = {**stream.extra, **(extra or {})}

    @property
    def peer(self) -> str:
        return self._stream.peer

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        if self._prefix:
            chunk = bytes(self._prefix[:max_bytes])
            del self._prefix[:max_bytes]
            return chunk
        return await self._stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    async def drain(self) -> None:
        await self._stream.drain()

    def is_closing(self) -> bool:
        return self._stream.is_closing()

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()

    async def wait_closed(self) -> None:
        await self._stream.wait_closed()

    def write_eof(self) -> None:
        """Half-close the wrapped stream, where it can be."""
        half_close(self._stream)
