"""One loop, live: a connection to its service with a subscription from since-cursors.

A :class:`LoopFeed` keeps the loop's state (``get_status``, then every loop event applied in
order), the time of its last output, its recent events, and hands its output to whoever
watches it (the terminal widget). It reaches the loop through an opener (ralphd's
``connect_loop``, on any transport), so local and remote loops are fed the same way.

Invariants:
- Every output byte reaches the output sinks once, in order: each chunk is checked against the
  offset of the next byte expected, and a reconnect subscribes from exactly that offset.
- Loop events are applied and handed to the event sinks once each, in seq order, across
  reconnects; events older than the first ``get_status`` are history (kept, not applied).
- Keystrokes are written in the order they were typed, only while this feed holds interactive
  mode; a reconnect takes interactive mode again if it was held.
- Memory is bounded: the recent events are a bounded deque, typed keys wait in one buffer, and
  output is handed on, never kept.
- After ``loop_finished`` has been received (with every byte before it), a dropped connection
  is not reconnected: the loop is over and its journal complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from ralph_uv.client.loops import (
    MAX_OUTPUT_READ,
    LoopConnection,
    LoopEvent,
    LoopState,
    OutputChunk,
    apply_event,
)
from ralph_uv.client.terminal import replay_start
from ralph_uv.errors import ErrorCode, RalphError, RemoteError
from ralph_uv.transports.base import Stream

__all__ = [
    "GAP_NOTICE",
    "EventSink",
    "FeedState",
    "LoopFeed",
    "OutputSink",
    "StreamOpener",
]

log = logging.getLogger("ralph_uv.tui.feed")

StreamOpener = Callable[[str], Awaitable[Stream]]
"""Opens a fresh byte stream to the loop with this id (ralphd relays it to the runner)."""
OutputSink = Callable[[bytes], None]
EventSink = Callable[[LoopEvent], None]
ChangeListener = Callable[["LoopFeed"], None]
NoticeListener = Callable[[str], None]

GAP_NOTICE = (
    b"\r\n\x1b[7m[ralph-uv: older output was dropped by the journal's retention]\x1b[0m\r\n"
)
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
EVENT_HISTORY = 500


class FeedState(StrEnum):
    """Where the feed's connection is."""

    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ENDED = "ended"  # loop_finished received; nothing more will come
    CLOSED = "closed"  # closed by its owner


class LoopFeed:
    """The live state and output of one loop. :meth:`start` it, :meth:`close` it."""

    def __init__(
        self,
        loop_id: str,
        opener: StreamOpener,
        *,
        client: str,
        on_change: ChangeListener | None = None,
        on_notice: NoticeListener | None = None,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY,
    ) -> None:
        self.loop_id = loop_id
        self._opener = opener
        self._client = client
        self._on_change = on_change
        self._on_notice = on_notice
        self._reconnect_max_delay = reconnect_max_delay
        self.state: LoopState | None = None
        self.status = FeedState.CONNECTING
        self.error: str | None = None
        self.output_next: int | None = None
        self.events_next: int | None = None
        self._applied_from: int | None = None  # events before this seq are history
        self.last_output_at: float | None = None
        self.events: deque[LoopEvent] = deque(maxlen=EVENT_HISTORY)
        self.holder: str | None = None
        self.me: str | None = None  # the name the loop gives this client as holder
        self.interactive = False
        self._want_interactive = False
        self.reconnects = 0
        self.watchers = 0  # screens showing this loop (the source's reference count)
        self._output_sinks: list[OutputSink] = []
        self._event_sinks: list[EventSink] = []
        self._conn: LoopConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._typed = bytearray()
        self._typed_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------- lifecycle

    @property
    def finished(self) -> bool:
        return self.status in (FeedState.ENDED, FeedState.CLOSED)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def holder_is_me(self) -> bool:
        """Whether this feed's connection holds interactive mode."""
        return self.interactive and self.holder is not None and self.holder == self.me

    def start(self) -> None:
        """Connect in the background and keep the feed connected until the loop ends."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"feed {self.loop_id}")
            self._sender = asyncio.create_task(self._send_keys(), name=f"keys {self.loop_id}")

    async def wait_connected(self, timeout: float = 30.0) -> LoopState:  # noqa: ASYNC109
        """Wait for the first connection attempt; the loop's state, or its error raised."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._first_attempt.wait()
        if self.state is None:
            raise RalphError(
                self.error or f"loop {self.loop_id} did not answer within {timeout:g} s",
                code=ErrorCode.CONNECTION_LOST,
            )
        return self.state

    def kick(self) -> None:
        """Retry a pending reconnect now (the location is reachable again)."""
        self._kick.set()

    async def close(self) -> None:
        """Stop following the loop and close the connection (interactive mode is released)."""
        self.status = FeedState.CLOSED
        tasks = [t for t in (self._task, self._sender) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            if self.interactive:
                with contextlib.suppress(RalphError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await conn.set_interactive(False)
            await conn.close()
        self._first_attempt.set()

    # ------------------------------------------------------------------------- watching

    def add_output_sink(self, sink: OutputSink) -> Callable[[], None]:
        """Hand every new output chunk to ``sink``; returns the function that stops it."""
        self._output_sinks.append(sink)
        return lambda: self._remove(self._output_sinks, sink)

    def add_event_sink(self, sink: EventSink) -> Callable[[], None]:
        """Hand every new loop event to ``sink``; returns the function that stops it."""
        self._event_sinks.append(sink)
        return lambda: self._remove(self._event_sinks, sink)

    @staticmethod
    def _remove(items: list[Any], item: object) -> None:
        with contextlib.suppress(ValueError):
            items.remove(item)

    async def watch_output(self, sink: OutputSink, replay_bytes: int) -> Callable[[], None]:
        """Give ``sink`` the output of about the last ``replay_bytes`` before now (from the
        journal, starting at a line start or the last full-screen clear), then every new
        chunk, with neither gap nor repeat where the two meet."""
        await self.wait_connected()
        held: list[bytes] = []
        stop_holding = self.add_output_sink(held.append)
        try:
            end = self.output_next if self.output_next is not None else 0
            start = position = max(0, end - replay_bytes)
            replay = bytearray()
            gap = False
            while position < end:
                chunk = await self._connection().get_output(
                    position, min(MAX_OUTPUT_READ, end - position)
                )
                gap = gap or chunk.gap is not None
                if chunk.gap is not None:
                    start = chunk.start
                    replay.clear()
                replay += chunk.data[: max(0, end - chunk.start)]
                if chunk.next <= position:
                    break
                position = chunk.next
        finally:
            stop_holding()
        data = bytes(replay)
        if gap:
            sink(GAP_NOTICE)
        sink(data[replay_start(data, start) :])
        for piece in held:
            sink(piece)
        return self.add_output_sink(sink)

    # ------------------------------------------------------------------------- actions

    def _connection(self) -> LoopConnection:
        if self._conn is None or self._conn.closed:
            raise RalphError(
                f"not connected to loop {self.loop_id}"
                + (f" ({self.error})" if self.error else "")
                + "; it reconnects by itself, try again in a moment",
                code=ErrorCode.CONNECTION_LOST,
            )
        return self._conn

    async def read_output(self, since: int, limit: int = MAX_OUTPUT_READ) -> OutputChunk:
        """Output bytes from the journal, from offset ``since`` (``get_output``)."""
        return await self._connection().get_output(since, limit)

    async def inject(self, text: str) -> None:
        """Queue ``text`` for the loop's next prompt."""
        await self._connection().inject(text)

    async def resume(self) -> None:
        """Resume a stalled loop."""
        await self._connection().endpoint.call("resume")

    async def set_interactive(self, enabled: bool, *, force: bool = False) -> str | None:
        """Take (or give back) interactive mode; the holder afterwards."""
        conn = self._connection()
        if enabled and self.state is not None and not self.state.interactive:
            raise RalphError(
                f"the agent of loop {self.loop_id} ({self.state.agent}) has no terminal; "
                "inject a prompt instead",
                code=ErrorCode.NOT_INTERACTIVE,
            )
        if not enabled:
            self._want_interactive = self.interactive = False
        got, holder = await conn.set_interactive(enabled, force=force)
        self.interactive = self._want_interactive = got
        self.holder = holder
        if got:
            self.me = holder
        self._changed()
        return holder

    def send_keys(self, data: bytes) -> None:
        """Queue typed bytes for the agent's terminal (sent in order, coalesced)."""
        if not data:
            return
        self._typed += data
        self._typed_ready.set()

    async def resize(self, cols: int, rows: int) -> None:
        """Ask for the agent's terminal size (applied while nobody else holds it)."""
        await self._connection().resize(cols, rows)

    async def _send_keys(self) -> None:
        while True:
            await self._typed_ready.wait()
            self._typed_ready.clear()
            if not self._typed:
                continue
            data, self._typed = bytes(self._typed), bytearray()
            if not self.interactive:
                self._notice("keys not sent: interactive mode is not held")
                continue
            try:
                await self._connection().write_pty(data)
            except RemoteError as exc:
                if exc.code == ErrorCode.NOT_INTERACTIVE:
                    self.interactive = self._want_interactive = False
                    self._changed()
                self._notice(exc.message)
            except RalphError as exc:
                self._notice(exc.message)

    # ------------------------------------------------------------------------- connection

    async def _run(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        while self.status is not FeedState.CLOSED:
            try:
                conn = await self._open()
            except RemoteError as exc:
                if exc.code == ErrorCode.LOOP_NOT_FOUND:
                    self._end(exc.message)
                    return
                self._lost(exc.message)
            except RalphError as exc:
                self._lost(exc.message)
            else:
                opened = time.monotonic()
                await conn.wait_closed()
                if self._conn is conn:
                    self._conn = None
                if self.status in (FeedState.CLOSED, FeedState.ENDED):
                    return
                self._lost(conn.endpoint.close_reason or "the connection closed")
                if time.monotonic() - opened > 1.0:
                    delay = RECONNECT_FIRST_DELAY
                    continue  # a drop after a while: reconnect at once
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            delay = min(delay * 2, self._reconnect_max_delay)

    async def _open(self) -> LoopConnection:
        stream = await self._opener(self.loop_id)
        conn = await LoopConnection.open(stream, client=self._client, on_event=self._on_event)
        try:
            state = await conn.status()
            if self.state is None:
                self.events_next = 0  # the whole event history, for the events view
                self._applied_from = state.events_next
                self.output_next = state.output_end
            else:
                self.reconnects += 1
            self.state = state
            self.holder = state.interactive_holder
            self._conn = conn
            if self._want_interactive and not state.status.is_terminal:
                try:
                    got, holder = await conn.set_interactive(True)
                except RemoteError as exc:
                    got, holder = False, None
                    self._notice(f"interactive mode not taken back: {exc.message}")
                self.interactive = self._want_interactive = got
                self.holder = holder if got else self.holder
            await conn.subscribe(output=self.output_next, events=self.events_next)
        except BaseException:
            self._conn = None
            await conn.close()
            raise
        self.status = FeedState.LIVE
        self.error = None
        self._first_attempt.set()
        self._changed()
        return conn

    def _lost(self, reason: str) -> None:
        log.info("loop %s: %s", self.loop_id, reason)
        self.error = reason
        self.interactive = False
        if self.status is not FeedState.CLOSED:
            self.status = FeedState.RECONNECTING if self.state else FeedState.CONNECTING
        self._first_attempt.set()
        self._changed()

    def _end(self, reason: str | None) -> None:
        if reason:
            self.error = reason
        self.status = FeedState.ENDED
        self.interactive = self._want_interactive = False
        self._first_attempt.set()
        self._changed()

    # ------------------------------------------------------------------------- events

    async def _on_event(self, event: LoopEvent) -> None:
        if event.type == "output":
            self._on_output(event)
            return
        if event.type == "gap":
            to = event.data.get("to")
            if isinstance(to, int):
                self.output_next = max(self.output_next or 0, to)
            self._deliver(GAP_NOTICE)
            return
        if self.events_next is not None and event.seq < self.events_next:
            return
        self.events_next = event.seq + 1
        self.events.append(event)
        if self._applied_from is None or event.seq >= self._applied_from:
            self._apply(event)
        for sink in tuple(self._event_sinks):
            sink(event)
        if event.type == "loop_finished":
            self._end(None)
            return
        self._changed()

    def _on_output(self, event: LoopEvent) -> None:
        data = event.output
        if self.output_next is not None:
            if event.output_next <= self.output_next:
                return  # already delivered
            data = data[max(self.output_next - event.seq, 0) :]
        self.output_next = event.output_next
        self.last_output_at = event.timestamp or time.time()
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        for sink in tuple(self._output_sinks):
            try:
                sink(data)
            except Exception:
                log.exception("an output sink of loop %s failed", self.loop_id)

    def _apply(self, event: LoopEvent) -> None:
        if self.state is None:
            return
        self.state = apply_event(self.state, event)
        if event.type == "interactive_mode":
            self.holder = event.data.get("holder")
            if self.interactive and self.holder != self.me:
                self.interactive = self._want_interactive = False
                self._notice(f"{self.holder or 'someone'} took interactive mode")

    # ------------------------------------------------------------------------- listeners

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    def _notice(self, message: str) -> None:
        if self._on_notice is not None:
            self._on_notice(f"{self.loop_id}: {message}")
        else:
            log.info("loop %s: %s", self.loop_id, message)
