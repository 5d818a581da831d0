"""The asyncio JSON-RPC endpoint: the protocol core driven over any :class:`Stream`.

Both ends of every connection use an :class:`Endpoint` (runner service, daemon, CLI, attach
client, TUI): each side can call and notify the other at the same time.

- Incoming requests start in arrival order, each in its own task, at most
  ``max_concurrent_requests`` at once; past that the endpoint stops reading until one finishes.
  A handler that must stay in order with the next request (keystrokes) does its ordered work
  before its first ``await``. Handlers registered ``inline=True`` run in the reading task
  itself: no task is created, which is the fast path for quick methods such as ``get_status``.
- Incoming notifications run one at a time, in arrival order, in one task (so events are
  applied in sequence), fed through a bounded queue.
- Garbage lines are answered with -32700, oversized lines with -32012 (``MESSAGE_TOO_LARGE``,
  ``data.max_message_size``), and the connection stays usable.
- Outgoing messages go through one write lock; after each write the sender waits for the
  stream to drain below its buffer limit. The senders waiting on the lock are the write queue,
  each holding its own message, so a peer that never reads costs at most the stream's buffer
  limit plus one message while everyone else waits. ``slow_peer_timeout`` is the policy for
  such a peer: ``None`` (clients) waits for ever; a number of seconds (servers) closes the
  connection when a write has not drained for that long, failing every waiting sender.
- When the peer closes its side, calls still waiting fail at once, requests already received
  get ``eof_grace`` seconds to finish and reply (``printf '{...}\\n' | socat - UNIX:...`` works),
  then the endpoint closes. :meth:`Endpoint.close` is immediate: waiting calls fail with a
  :class:`~ralph_uv.errors.TransportError` and every task is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

from ralph_uv.errors import ErrorCode, InternalError, RalphError, RemoteError, TransportError
from ralph_uv.protocol.dispatch import Dispatcher
from ralph_uv.protocol.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Decoded,
    FrameDecoder,
    FrameTooLarge,
    encode,
)
from ralph_uv.protocol.messages import (
    Batch,
    ErrorResponse,
    Incoming,
    Notification,
    Params,
    Request,
    Response,
    parse,
    parse_error,
    too_large_error,
)
from ralph_uv.transports.base import Stream

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "Endpoint",
]

log = logging.getLogger("ralph_uv.rpc")

DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 64
_NOTIFICATION_QUEUE = 256


class _PeerLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.extra['peer'] if self.extra else '?'}] {msg}", kwargs


class Endpoint:
    """One JSON-RPC connection over ``stream``, serving ``dispatcher`` with ``context``.

    Use ``async with Endpoint(...) as ep:`` (or :meth:`start` and :meth:`close`); a server's
    connection handler typically just awaits :meth:`run`.

    - ``dispatcher`` — the methods this side serves (none: every request gets -32601);
      ``context`` is passed to each handler (the server's per-connection state).
    - ``max_message_size`` — the line limit for both directions (``Config.max_message_size``).
    - ``max_concurrent_requests`` — incoming requests running at once before reading pauses.
    - ``slow_peer_timeout`` — seconds a write may wait for the peer to read before the
      connection is closed; ``None`` waits for ever (see the module docstring).
    - ``eof_grace`` — seconds requests already received may still run after the peer's EOF.
    - ``close_timeout`` — seconds closing waits for unsent bytes to be read before dropping them.
    """

    def __init__(
        self,
        stream: Stream,
        dispatcher: Dispatcher[Any] | None = None,
        *,
        context: Any = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        slow_peer_timeout: float | None = None,
        eof_grace: float = 5.0,
        close_timeout: float = 2.0,
    ) -> None:
        self._stream = stream
        self._dispatcher: Dispatcher[Any] = dispatcher if dispatcher is not None else Dispatcher()
        self.context = context
        self.max_message_size = max_message_size
        self._slow_peer_timeout = slow_peer_timeout
        self._eof_grace = eof_grace
        self._close_timeout = close_timeout
        self._log = _PeerLog(log, {"peer": stream.peer})
        self._decoder = FrameDecoder(max_message_size)
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[Response | ErrorResponse | None]] = {}
        self._write_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._notifications: asyncio.Queue[Notification | None] = asyncio.Queue(
            _NOTIFICATION_QUEUE
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._lost: str | None = None  # why no reply can arrive any more
        self._close_reason: str | None = None

    @property
    def peer(self) -> str:
        """The stream's description of the other end."""
        return self._stream.peer

    @property
    def closed(self) -> bool:
        """True once closing has begun (after :meth:`close`, a lost connection or a slow peer)."""
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        """Why the endpoint closed, in words; ``None`` while open."""
        return self._close_reason

    def start(self) -> None:
        """Start reading. Idempotent; needs a running event loop."""
        if self._reader is None and self._close_reason is None:
            self._reader = asyncio.create_task(self._read_loop(), name=f"rpc-read {self.peer}")
            self._notifier = asyncio.create_task(
                self._notification_loop(), name=f"rpc-notify {self.peer}"
            )

    async def run(self) -> None:
        """Serve until the connection ends."""
        self.start()
        await self.wait_closed()

    async def __aenter__(self) -> Endpoint:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(
        self,
        method: str,
        params: Params = None,
        *,
        timeout: float | None = DEFAULT_CALL_TIMEOUT,  # noqa: ASYNC109 - its error names the method
    ) -> Any:
        """Call ``method`` on the peer and return its result.

        Raises :class:`~ralph_uv.errors.RemoteError` when the peer answers with an error,
        :class:`~ralph_uv.errors.TransportError` when the connection is or gets lost, and a
        :class:`~ralph_uv.errors.RalphError` with code ``TIMEOUT`` when no reply comes within
        ``timeout`` seconds (``None``: wait for ever).
        """
        if self._lost is not None:
            raise TransportError(f"cannot call '{method}': {self._lost}")
        request_id = next(self._ids)
        line = self._encode_outgoing(Request(method, params, request_id).to_json(), method)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response | ErrorResponse | None] = loop.create_future()
        self._pending[request_id] = future
        # The deadline is a plain timer that cancels this task, as asyncio.timeout() does, at a
        # fraction of its cost on this hot path.
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if task is not None:
                task.cancel()

        timer = loop.call_later(timeout, expire) if timeout is not None else None
        try:
            await self._write(line)
            reply = await future
        except asyncio.CancelledError:
            if expired and task is not None and task.uncancel() == 0:
                raise RalphError(
                    f"'{method}' got no reply from {self.peer} within {timeout:g} s",
                    code=ErrorCode.TIMEOUT,
                ) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(request_id, None)
        if reply is None:
            raise TransportError(f"'{method}' got no reply: {self._lost}")
        if type(reply) is Response:
            return reply.result
        assert isinstance(reply, ErrorResponse)
        raise RemoteError(reply.message, code=reply.code, data=reply.data)

    async def notify(self, method: str, params: Params = None) -> None:
        """Send a notification; returns once it is handed to the stream (after backpressure)."""
        await self._write(self._encode_outgoing(Notification(method, params).to_json(), method))

    async def send_line(self, line: bytes) -> None:
        """Send one NDJSON line already made by :func:`~ralph_uv.protocol.encode` (a
        notification encoded once for many subscribers), with the same queue and backpressure
        as every other message."""
        await self._write(line)

    async def close(self) -> None:
        """Close now: waiting calls fail, tasks are cancelled and awaited, the stream closed."""
        self._begin_close(f"the connection to {self.peer} was closed")
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the endpoint has closed, for whatever reason."""
        await self._closed.wait()

    # -- outgoing ------------------------------------------------------------------------------

    def _encode_outgoing(self, message: dict[str, Any], method: str) -> bytes:
        line = encode(message)
        if len(line) - 1 > self.max_message_size:
            raise RalphError(
                f"'{method}' is {len(line) - 1} bytes, more than the {self.max_message_size}-byte "
                "message limit; send less per call",
                code=ErrorCode.MESSAGE_TOO_LARGE,
            )
        return line

    async def _write(self, line: bytes) -> None:
        async with self._write_lock:
            if self._close_reason is not None:
                raise TransportError(self._close_reason)
            self._stream.write(line)
            if self._slow_peer_timeout is None:
                await self._stream.drain()
                return
            try:
                async with asyncio.timeout(self._slow_peer_timeout):
                    await self._stream.drain()
            except TimeoutError:
                reason = (
                    f"{self.peer} read nothing for {self._slow_peer_timeout:g} s; "
                    "closed the connection"
                )
                self._log.warning("slow peer: %s", reason)
                self._begin_close(reason, abort=True)
                raise TransportError(reason) from None

    async def _send_reply(self, reply: Response | ErrorResponse) -> None:
        try:
            line = encode(reply.to_json())
        except InternalError as exc:
            self._log.error("reply to request %r cannot be sent: %s", reply.id, exc.message)
            line = encode(
                ErrorResponse(reply.id, ErrorCode.INTERNAL_ERROR, "Internal error: bad result")
                .to_json()
            )
        if len(line) - 1 > self.max_message_size:
            self._log.warning("reply to request %r is too large (%d bytes)", reply.id, len(line))
            too_large = too_large_error(self.max_message_size)
            line = encode(
                ErrorResponse(
                    reply.id, too_large.code, "Message too large: the reply exceeds the limit; "
                    "ask for less (for example a smaller 'limit')", too_large.data
                ).to_json()
            )
        await self._write(line)

    # -- incoming ------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.read()
                if self._close_reason is not None:  # closed by a handler run from this task
                    return
                if not data:
                    self._decoder.receive_eof()
                    await self._handle_events()
                    break
                self._decoder.receive_data(data)
                await self._handle_events()
        except TransportError as exc:
            self._begin_close(exc.message, abort=True)
            return
        except Exception as exc:
            self._log.exception("reading failed")
            self._begin_close(f"internal error while reading from {self.peer}: {exc}", abort=True)
            return
        await self._after_eof()

    async def _handle_events(self) -> None:
        for event in self._decoder:
            if self._close_reason is not None:
                return
            if isinstance(event, Decoded):
                await self._handle(parse(event.value))
            elif isinstance(event, FrameTooLarge):
                self._log.warning("message larger than %d bytes discarded", event.limit)
                await self._send_reply(too_large_error(event.limit))
            else:
                self._log.info("unreadable line: %s", event.reason)
                await self._send_reply(parse_error(event.reason))

    async def _handle(self, incoming: Incoming | Batch) -> None:
        if isinstance(incoming, Response | ErrorResponse):
            self._on_reply(incoming)
        elif isinstance(incoming, Request) and self._dispatcher.is_inline(incoming.method):
            await self._serve(incoming)
        elif isinstance(incoming, Request | Batch):
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(incoming))
            self._tasks.add(task)
            task.add_done_callback(self._request_done)
        elif isinstance(incoming, Notification):
            await self._notifications.put(incoming)
        elif incoming.reply is None:
            self._log.warning("ignored %s", incoming.reason)
        else:
            self._log.info("invalid request: %s", incoming.reason)
            await self._send_reply(incoming.reply)

    def _on_reply(self, reply: Response | ErrorResponse) -> None:
        future = self._pending.pop(reply.id, None)
        if future is not None and not future.done():
            future.set_result(reply)
        elif isinstance(reply, ErrorResponse) and reply.id is None:
            self._log.warning("peer reported an error: %s (%d)", reply.message, reply.code)
        else:
            self._log.debug("reply to request %r arrived after its caller gave up", reply.id)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, incoming: Request | Batch) -> None:
        try:
            if type(incoming) is Request:
                reply = await self._dispatcher.dispatch(self.context, incoming, logger=self._log)
                if reply is not None:
                    await self._send_reply(reply)
                return
            wire = await self._dispatcher.answer(
                self.context, incoming, on_response=self._on_reply, logger=self._log
            )
            if wire is not None:
                line = encode(wire)
                if len(line) - 1 > self.max_message_size:
                    line = encode(too_large_error(self.max_message_size).to_json())
                await self._write(line)
        except TransportError as exc:
            self._log.debug("reply not sent: %s", exc.message)
        except Exception:
            self._log.exception("serving a request failed")

    async def _notification_loop(self) -> None:
        while True:
            notification = await self._notifications.get()
            if notification is None:
                return
            await self._dispatcher.dispatch(self.context, notification, logger=self._log)

    # -- closing -------------------------------------------------------------------------------

    def _fail_pending(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)  # the caller raises; no exception is left unretrieved
        self._pending.clear()

    async def _after_eof(self) -> None:
        reason = f"{self.peer} closed the connection"
        self._log.debug("end of stream")
        self._fail_pending(reason)
        busy = {*self._tasks, *([self._notifier] if self._notifier else [])}
        try:
            async with asyncio.timeout(self._eof_grace):
                await self._notifications.put(None)  # ends the notifier once it has caught up
                if busy:
                    await asyncio.wait(busy)
        except TimeoutError:
            self._log.warning("handlers still busy %g s after the peer left", self._eof_grace)
        self._begin_close(reason)

    def _begin_close(self, reason: str, *, abort: bool = False) -> None:
        """Start closing, synchronously; the first reason wins. The calling task is spared (it
        may be a handler closing its own connection)."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._fail_pending(reason)
        if abort:
            self._stream.abort()
        else:
            self._stream.close()
        current = asyncio.current_task()
        tasks = [t for t in (self._reader, self._notifier, *self._tasks) if t is not None]
        for task in tasks:
            if task is not current:
                task.cancel()
        self._finisher = asyncio.create_task(
            self._finish([t for t in tasks if t is not current]), name=f"rpc-close {self.peer}"
        )

    async def _finish(self, tasks: list[asyncio.Task[None]]) -> None:
        try:
            if tasks:
                await asyncio.wait(tasks)
            try:
                async with asyncio.timeout(self._close_timeout):
                    await self._stream.wait_closed()
            except TimeoutError:
                self._log.warning(
                    "unsent data dropped: the peer read nothing for %g s", self._close_timeout
                )
                self._stream.abort()
                await self._stream.wait_closed()
            self._log.debug("closed: %s", self._close_reason)
        finally:
            self._closed.set()
