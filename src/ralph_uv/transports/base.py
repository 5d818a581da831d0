"""The byte stream every transport hands to the layers above it.

A transport (unix, ssh, ziti, tcp) connects or accepts and gives back a :class:`Stream`; the
RPC endpoint and the relays work on that alone, so they behave the same on every transport.
:class:`AsyncioStream` adapts an asyncio ``(StreamReader, StreamWriter)`` pair; :func:`memory_pair`
gives two connected in-memory ends for tests of everything above the transports.

Contract of a stream:

- ``read`` returns up to ``max_bytes`` bytes, waiting for at least one; ``b""`` means the peer
  will send nothing more (or this end was closed).
- ``write`` never blocks: it queues the bytes. ``drain`` waits until the queue is back under the
  stream's write-buffer limit, which is how a writer feels a slow reader (backpressure). A
  writer that drains after each write never holds more than the limit plus one write.
- ``write`` and ``drain`` on a closed or broken stream, and ``read`` on a broken one, raise
  :class:`~ralph_uv.errors.TransportError`; no ``OSError`` leaks out.
- ``close`` starts an orderly close (bytes already written are still delivered) and is
  idempotent; ``abort`` closes at once, dropping unsent bytes; ``wait_closed`` waits until the
  connection is gone (after ``close``, that needs the peer to read what is left: callers bound
  the wait and ``abort`` if the peer does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Mapping
from typing import Any, Protocol

from ralph_uv.errors import TransportError

__all__ = [
    "DEFAULT_READ_SIZE",
    "DEFAULT_WRITE_BUFFER_LIMIT",
    "AsyncioStream",
    "MemoryStream",
    "Stream",
    "memory_pair",
]

DEFAULT_READ_SIZE = 256 * 1024
DEFAULT_WRITE_BUFFER_LIMIT = 256 * 1024


class Stream(Protocol):
    """A connected, ordered, reliable byte stream (see the module docstring for the contract)."""

    @property
    def peer(self) -> str:
        """Who is at the other end, for logs: ``unix:/run/x.sock``, ``tcp:host:port``."""
        ...

    @property
    def extra(self) -> Mapping[str, Any]:
        """Transport facts: ``peercred`` (pid, uid, gid) on Unix sockets, ``ssh_user``, ..."""
        ...

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    async def wait_closed(self) -> None: ...


def _describe(writer: asyncio.StreamWriter) -> tuple[str, dict[str, Any]]:
    sock = writer.get_extra_info("socket")
    extra: dict[str, Any] = {}
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        path = writer.get_extra_info("peername") or writer.get_extra_info("sockname") or ""
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            extra["peercred"] = struct.unpack("3i", creds)
        except (OSError, AttributeError):  # not Linux, or the socket is already gone
            pass
        return f"unix:{path if isinstance(path, str) else path.decode(errors='replace')}", extra
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = f"[{peername[0]}]" if ":" in str(peername[0]) else peername[0]
        return f"tcp:{host}:{peername[1]}", extra
    return repr(peername) if peername else "unknown", extra


class AsyncioStream:
    """A :class:`Stream` over an asyncio ``(StreamReader, StreamWriter)`` pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str | None = None,
        extra: Mapping[str, Any] | None = None,
        write_buffer_limit: int = DEFAULT_WRITE_BUFFER_LIMIT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        described, found = _describe(writer)
        self.peer = peer if peer is not None else described
        self.extra: Mapping[str, Any] = {**found, **(extra or {})}
        writer.transport.set_write_buffer_limits(high=write_buffer_limit)

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self._writer.transport.get_write_buffer_size()

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except OSError as exc:
            raise TransportError(f"connection to {self.peer} failed: {exc}") from exc

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise TransportError(f"connection to {self.peer} is closed")
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:  # ConnectionResetError and friends, when the peer went away
            raise TransportError(f"connection to {self.peer} lost: {exc}") from exc

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def wait_closed(self) -> None:
        # The error that closed the connection, if any, was already reported by read or drain.
        # Shielded: the writer hands out one shared future, and a caller giving up on the wait
        # (a timeout) must not cancel it for everyone else.
        with contextlib.suppress(OSError):
            await asyncio.shield(self._writer.wait_closed())


class _Pipe:
    """One direction of a memory pair: bytes written by one end, read by the other."""

    __slots__ = ("data", "limit", "readable", "reader_closed", "writable", "writer_closed")

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.reader_closed = False
        self.writer_closed = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()


class MemoryStream:
    """One end of :func:`memory_pair`."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, peer: str) -> None:
        self._inbound = inbound
        self._outbound = outbound
        self._closed = False
        self.peer = peer
        self.extra: Mapping[str, Any] = {}

    @property
    def write_buffer_size(self) -> int:
        """Bytes written by this end that the other end has not read yet."""
        return len(self._outbound.data)

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        pipe = self._inbound
        while not pipe.data:
            if pipe.writer_closed or pipe.reader_closed:
                return b""
            pipe.readable.clear()
            await pipe.readable.wait()
        chunk = bytes(pipe.data[:max_bytes])
        del pipe.data[:max_bytes]
        if len(pipe.data) <= pipe.limit:
            pipe.writable.set()
        return chunk

    def write(self, data: bytes) -> None:
        pipe = self._outbound
        if self._closed:
            raise TransportError(f"connection to {self.peer} is closed")
        if pipe.reader_closed:
            raise TransportError(f"connection to {self.peer} was closed by the peer")
        pipe.data += data
        pipe.readable.set()

    async def drain(self) -> None:
        pipe = self._outbound
        while True:
            if self._closed or pipe.reader_closed:
                raise TransportError(f"connection to {self.peer} is closed")
            if len(pipe.data) <= pipe.limit:
                return
            pipe.writable.clear()
            await pipe.writable.wait()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outbound.writer_closed = True
        self._outbound.readable.set()
        self._outbound.writable.set()
        self._inbound.reader_closed = True
        self._inbound.data.clear()
        self._inbound.readable.set()
        self._inbound.writable.set()

    def abort(self) -> None:
        self._outbound.data.clear()
        self.close()

    async def wait_closed(self) -> None:
        return None


def memory_pair(
    buffer_limit: int = DEFAULT_WRITE_BUFFER_LIMIT,
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected in-memory streams; each direction buffers ``buffer_limit`` bytes before
    ``drain`` makes the writer wait."""
    a_to_b, b_to_a = _Pipe(buffer_limit), _Pipe(buffer_limit)
    return MemoryStream(b_to_a, a_to_b, "memory:b"), MemoryStream(a_to_b, b_to_a, "memory:a")
