"""Byte relays: how one ralphd connection reaches a loop's socket (``connect_loop``).

:func:`relay` copies bytes both ways between two streams until both directions are done. Each
direction reads up to 256 KiB at a time and waits for the other side to drain before reading
more, so a slow reader slows its writer down and never makes the relay buffer more than one
read plus the stream's write buffer. When one side ends its output, the relay passes that on
(half-close where the stream supports ``write_eof``) and lets the other direction finish for at
most ``grace`` seconds; when a side fails, both are closed.

:class:`HandOver` is how a daemon connection changes hands: its endpoint reads and writes
through it until the reply to ``connect_loop`` has been written, then lets go of the stream.
:class:`~ralph_uv.transports.pump.PrefixedStream` puts back bytes that were read ahead before a
connection changed hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from ralph_uv.errors import TransportError
from ralph_uv.transports.base import DEFAULT_READ_SIZE, Stream
from ralph_uv.transports.pump import PrefixedStream, half_close, pump

__all__ = ["RELAY_CHUNK", "HandOver", "PrefixedStream", "relay"]

log = logging.getLogger("ralph_uv.daemon.relay")

RELAY_CHUNK = DEFAULT_READ_SIZE
_CLOSE_TIMEOUT = 2.0


class HandOver:
    """The stream of a daemon connection, as its endpoint sees it, until ``connect_loop``.

    :meth:`arm` is called with the id of a successful ``connect_loop`` request before its reply
    is written. From then on the endpoint reads nothing more (bytes that arrive are kept for
    the relay), and once the reply line has gone out the endpoint sees the end of its input and
    lets go: closing is no longer its business.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.held = bytearray()
        self._armed: object = _UNARMED
        self._switched = asyncio.Event()

    @property
    def peer(self) -> str:
        return self.stream.peer

    @property
    def extra(self) -> Mapping[str, Any]:
        return self.stream.extra

    @property
    def switched(self) -> bool:
        return self._switched.is_set()

    def arm(self, request_id: object) -> None:
        self._armed = request_id

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        if self._armed is _UNARMED:
            data = await self.stream.read(max_bytes)
            if self._armed is _UNARMED:
                return data
            self.held += data  # arrived after connect_loop: it belongs to the loop
        await self._switched.wait()
        return b""

    def write(self, data: bytes) -> None:
        if self.switched:
            raise TransportError("this connection now belongs to a loop")
        self.stream.write(data)
        if self._armed is not _UNARMED and _is_result_for(data, self._armed):
            self._switched.set()

    async def drain(self) -> None:
        await self.stream.drain()

    def is_closing(self) -> bool:
        return self.stream.is_closing()

    def close(self) -> None:
        if not self.switched:
            self.stream.close()

    def abort(self) -> None:
        if not self.switched:
            self.stream.abort()

    async def wait_closed(self) -> None:
        if not self.switched:
            await self.stream.wait_closed()


_UNARMED = object()


def _is_result_for(line: bytes, request_id: object) -> bool:
    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and "result" in message and message.get("id") == request_id


async def _pump(source: Stream, target: Stream, counter: list[int]) -> None:
    """Copy ``source`` to ``target`` until ``source`` ends; errors end the copy quietly."""
    try:
        await pump(source, target, chunk=RELAY_CHUNK, counter=counter)
    except TransportError as exc:
        log.debug("relay %s -> %s ended: %s", source.peer, target.peer, exc.message)
        raise


async def _close(stream: Stream) -> None:
    stream.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await stream.wait_closed()
    except TimeoutError:
        stream.abort()
        with contextlib.suppress(TransportError):
            await stream.wait_closed()


async def relay(client: Stream, target: Stream, *, grace: float = 1.0) -> tuple[int, int]:
    """Relay ``client`` <-> ``target`` until both directions end; close both; return the
    bytes sent ``(client -> target, target -> client)``.

    When the client stops sending, the target gets an end-of-file (or, if it cannot be
    half-closed, ``grace`` seconds to answer what it was sent); when the target ends, whatever
    it sent is delivered and the client's connection is closed.
    """
    up_count, down_count = [0], [0]
    up = asyncio.create_task(_pump(client, target, up_count), name=f"relay up {client.peer}")
    down = asyncio.create_task(
        _pump(target, client, down_count), name=f"relay down {target.peer}"
    )
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        failed = any(task.exception() is not None for task in done if not task.cancelled())
        if not failed and up in done and not down.done():
            # The client has said everything; the target may still be answering it.
            half_closed = half_close(target)
            try:
                async with asyncio.timeout(None if half_closed else grace):
                    await asyncio.wait({down})
            except TimeoutError:
                log.debug("relay to %s: no end from the target after %g s", target.peer, grace)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        await asyncio.gather(_close(target), _close(client), return_exceptions=True)
    return up_count[0], down_count[0]
