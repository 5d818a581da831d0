"""``ralph-uv attach``: a loop's agent terminal, full screen, with a status bar.

The client connects (through ralphd's ``connect_loop``), shows the recent screen at once (the
journal's last screenful, replayed), then streams the output live. Keys go through a prefix
(:mod:`ralph_uv.client.keys`); in observe mode (the default) nothing typed reaches the agent, in
interactive mode every key does. The last line is the status bar (:mod:`.terminal`).

Invariants:
- Every output byte is written once, in order: each chunk is checked against the offset of the
  next byte expected, and a reconnect subscribes from exactly that offset, so a dropped
  connection leaves neither a gap nor a repeat.
- Loop events are applied once each, in order, by their seq; the same holds across reconnects.
- Keystrokes are forwarded only while this client holds interactive mode, in the order typed.
- The terminal is restored on every way out: detach, the loop's end, an error, a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ralph_uv.client.keys import (
    DEFAULT_PREFIX,
    ESCAPE_TIMEOUT,
    Action,
    Cmd,
    Command,
    Forward,
    Inject,
    KeyReader,
    Prompt,
    PromptClosed,
    Unbound,
    key_name,
)
from ralph_uv.client.loops import (
    MAX_OUTPUT_READ,
    LoopConnection,
    LoopEvent,
    LoopState,
    apply_event,
)
from ralph_uv.client.terminal import (
    ScreenFilter,
    Terminal,
    fit_line,
    replay_start,
    status_bytes,
)
from ralph_uv.errors import ErrorCode, RalphError, RemoteError, TransportError, UserError
from ralph_uv.status import LoopStatus
from ralph_uv.transports.base import Stream

__all__ = [
    "REPLAY_BYTES",
    "AttachResult",
    "AttachSession",
    "Connector",
    "attach",
]

log = logging.getLogger("ralph_uv.client.attach")

REPLAY_BYTES = 256 * 1024  # how far back the first screen is rebuilt from
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
MESSAGE_SECONDS = 4.0

Connector = Callable[[str | None], Awaitable[Stream]]
"""Opens a fresh byte stream to the loop's service. Called with ``None`` the first time, then
(for every reconnect) with the loop id learned from the first connection, so that a reconnect
reaches the same loop even if a newer loop of the same task has started meanwhile."""


@dataclass(frozen=True, slots=True)
class AttachResult:
    """How an attach ended: ``detached`` (the loop goes on), or the loop's final status."""

    loop_id: str
    task_name: str
    detached: bool
    status: LoopStatus | None = None
    reason: str | None = None


class AttachSession:
    """One attach: connection(s), terminal, keys. :meth:`run` returns when it is over."""

    def __init__(
        self,
        connect: Connector,
        *,
        client: str,
        prefix: int = DEFAULT_PREFIX,
        in_fd: int = 0,
        out_fd: int = 1,
        replay_bytes: int = REPLAY_BYTES,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY,
    ) -> None:
        self._connect = connect
        self._client = client
        self._prefix_name = key_name(prefix)
        self._keys = KeyReader(prefix)
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._replay_bytes = replay_bytes
        self._reconnect_max_delay = reconnect_max_delay
        self._term: Terminal | None = None
        self._filter = ScreenFilter(24)
        self._conn: LoopConnection | None = None
        self.state: LoopState | None = None
        self._output_next: int | None = None
        self._events_next: int | None = None
        self._interactive = False  # this client holds interactive mode
        self._want_interactive = False  # ... and should take it again after a reconnect
        self._me: str | None = None  # the name the loop gives this client as holder
        self._holder: str | None = None
        self._prompt: Prompt | None = None
        self._message: str | None = None
        self._message_handle: asyncio.TimerHandle | None = None
        self._notice: str | None = None  # shown until cleared (reconnecting)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._typed = bytearray()
        self._typed_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._result: asyncio.Future[AttachResult] = asyncio.get_running_loop().create_future()

    # ---------------------------------------------------------------------------- lifecycle

    async def run(self) -> AttachResult:
        """Attach until the user detaches or the loop ends; the terminal is restored after."""
        terminal = Terminal(self._in_fd, self._out_fd)
        conn, state = await self._open()
        if state.status.is_terminal:
            await conn.close()
            raise UserError(
                f"loop {state.loop_id} ({state.task_name}) has ended: {state.status.value}"
                f"{': ' + state.reason if state.reason else ''}; read its output with "
                f"`ralph-uv logs {state.loop_id}`",
                code=ErrorCode.BAD_STATE,
            )
        loop = asyncio.get_running_loop()
        with terminal:
            self._term = terminal
            self._filter = ScreenFilter(terminal.rows)
            loop.add_reader(self._in_fd, self._on_stdin)
            loop.add_signal_handler(signal.SIGWINCH, self._on_resize)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                loop.add_signal_handler(sig, self._detach)
            sender = asyncio.create_task(self._send_keys(), name="attach keys")
            try:
                try:
                    await self._begin(conn, state, replay=True)
                except TransportError as exc:
                    log.info("connection lost while attaching: %s", exc.message)
                await self._supervise()
            finally:
                loop.remove_reader(self._in_fd)
                for sig in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                for handle in (self._flush_handle, self._message_handle):
                    if handle is not None:
                        handle.cancel()
                sender.cancel()
                for task in [sender, *self._tasks]:
                    task.cancel()
                await asyncio.gather(sender, *self._tasks, return_exceptions=True)
                if self._conn is not None:
                    await self._release(self._conn)
                    await self._conn.close()
        return self._result.result()

    async def _release(self, conn: LoopConnection) -> None:
        """Give interactive mode back before leaving: closing the connection releases it too,
        but a relay may take a while to pass the close on, and others should not wait."""
        if not self._interactive or conn.closed:
            return
        with contextlib.suppress(RalphError, TimeoutError):
            async with asyncio.timeout(1.0):
                await conn.set_interactive(False)

    async def _open(self) -> tuple[LoopConnection, LoopState]:
        stream = await self._connect(self.state.loop_id if self.state else None)
        conn = await LoopConnection.open(stream, client=self._client, on_event=self._on_event)
        try:
            return conn, await conn.status()
        except BaseException:
            await conn.close()
            raise

    async def _begin(self, conn: LoopConnection, state: LoopState, *, replay: bool) -> None:
        """Take over a fresh connection: size, screen, interactive mode, subscription."""
        self._conn = conn
        self.state = state
        self._holder = state.interactive_holder
        await self._send_size(conn)
        if replay:
            self._events_next = state.events_next
            await self._replay(conn, state)
        if self._want_interactive:
            await self._take_interactive(force=False)
        await conn.subscribe(output=self._output_next, events=self._events_next)
        self._draw_status()

    async def _replay(self, conn: LoopConnection, state: LoopState) -> None:
        start = max(0, state.output_end - self._replay_bytes)
        chunk = await conn.get_output(start, min(self._replay_bytes, MAX_OUTPUT_READ))
        self._render(chunk.data[replay_start(chunk.data, chunk.start) :])
        self._output_next = chunk.next

    async def _supervise(self) -> None:
        while not self._result.done():
            conn = self._conn
            assert conn is not None
            closed = asyncio.ensure_future(conn.wait_closed())
            waiters: set[asyncio.Future[Any]] = {closed, self._result}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if self._result.done():
                return
            log.info("connection lost: %s", conn.endpoint.close_reason)
            await self._reconnect()

    async def _reconnect(self) -> None:
        self._conn = None
        self._interactive = False
        delay = RECONNECT_FIRST_DELAY
        attempt = 0
        while not self._result.done():
            attempt += 1
            self._notice = (
                f"connection lost; reconnecting (attempt {attempt}) · {self._prefix_name} d leaves"
            )
            self._draw_status()
            try:
                conn, state = await self._open()
            except RemoteError as exc:
                if exc.code == ErrorCode.LOOP_NOT_FOUND:
                    self._end(detached=False, reason=exc.message)
                    return
                log.info("reconnect failed: %s", exc.message)
            except RalphError as exc:
                log.info("reconnect failed: %s", exc.message)
            else:
                try:
                    if state.status.is_terminal:
                        await self._catch_up(conn, state)
                        return
                    await self._begin(conn, state, replay=False)
                except RalphError as exc:
                    log.info("reconnect lost again: %s", exc.message)
                    await conn.close()
                else:
                    self._notice = None
                    self._draw_status()
                    return
            await asyncio.wait({self._result}, timeout=delay)
            delay = min(delay * 2, self._reconnect_max_delay)

    async def _catch_up(self, conn: LoopConnection, state: LoopState) -> None:
        """The loop ended while disconnected: show the output missed, then leave."""
        self._conn = conn
        position = self._output_next or 0
        while position < state.output_end:
            chunk = await conn.get_output(position)
            self._render(chunk.data)
            if chunk.next <= position:
                break
            position = self._output_next = chunk.next
        self.state = state
        self._end(detached=False, status=state.status, reason=state.reason)

    def _end(
        self, *, detached: bool, status: LoopStatus | None = None, reason: str | None = None
    ) -> None:
        if self._result.done():
            return
        state = self.state
        self._result.set_result(
            AttachResult(
                loop_id=state.loop_id if state else "",
                task_name=state.task_name if state else "",
                detached=detached,
                status=status,
                reason=reason,
            )
        )

    def _detach(self) -> None:
        self._end(detached=True)

    # ---------------------------------------------------------------------------- output

    def _render(self, data: bytes) -> None:
        if not data or self._term is None:
            return
        out, redraw = self._filter.feed(data)
        self._term.write(out)
        if redraw:
            self._draw_status()

    async def _on_event(self, event: LoopEvent) -> None:
        if event.type == "output":
            data = event.output
            if self._output_next is not None:
                if event.output_next <= self._output_next:
                    return  # already shown
                data = data[max(self._output_next - event.seq, 0) :]
            self._output_next = event.output_next
            self._render(data)
            return
        if event.type == "gap":
            to = event.data.get("to")
            if isinstance(to, int):
                self._output_next = max(self._output_next or 0, to)
            self._say("some older output was dropped by the journal's retention")
            return
        if event.type == "error" and "message" in event.data:
            self._say(str(event.data["message"]))
        if self._events_next is not None and event.seq < self._events_next:
            return
        self._events_next = event.seq + 1
        self._apply(event)

    def _apply(self, event: LoopEvent) -> None:
        if self.state is None:
            return
        state = self.state = apply_event(self.state, event)
        data = event.data
        kind = event.type
        if kind == "story_passed":
            self._say(f"{data.get('story', 'a story')} passes")
        elif kind == "agent_failover":
            self._say(f"switched agent: {data.get('from')} -> {data.get('to')}")
        elif kind == "rate_limit_wait":
            self._say(f"rate limited; waiting {float(data.get('seconds') or 0):.0f}s")
        elif kind == "stalled":
            self._say("the loop stalled: no progress; resume or stop it")
        elif kind == "prompt_injected":
            self._say("prompt injected; the next iteration gets it")
        elif kind == "interactive_mode":
            self._holder = data.get("holder")
            if self._interactive and self._holder != self._me:
                # Events replayed after a reconnect may be older than our own taking it back:
                # ask the loop who holds it now before giving up.
                self._spawn(self._check_holder())
        elif kind == "loop_finished":
            self._end(detached=False, status=state.status, reason=state.reason)
            return
        self._draw_status()

    # ---------------------------------------------------------------------------- status bar

    def status_text(self) -> tuple[str, bool]:
        """The status line's text, and whether it needs the user's attention."""
        width = self._term.cols if self._term else 80
        if self._prompt is not None:
            return fit_line(f" {self._prompt.label}: {self._prompt.text}\u2588", "", width), True
        state = self.state
        left = " ralph-uv"
        if state is not None:
            left = (
                f" {state.task_name} │ {state.status.value} │ "
                f"iter {state.iteration}/{state.max_iterations} │ {state.story or '-'} │ "
                f"{state.agent} "
            )
        if self._notice or self._message:
            return fit_line(left, f" {self._notice or self._message} ", width), True
        if self._interactive:
            mode = "INTERACTIVE"
        elif self._holder:
            mode = f"observe ({self._holder} is typing)"
        else:
            mode = "observe"
        return fit_line(left, f" {mode} │ {self._prefix_name} ? help ", width), False

    def _draw_status(self) -> None:
        if self._term is None:
            return
        text, attention = self.status_text()
        self._term.write(status_bytes(text, self._term.rows, self._term.cols, attention=attention))

    def _say(self, message: str) -> None:
        """Show ``message`` on the status bar for a few seconds."""
        self._message = message
        if self._message_handle is not None:
            self._message_handle.cancel()
        self._message_handle = asyncio.get_running_loop().call_later(
            MESSAGE_SECONDS, self._clear_message
        )
        self._draw_status()

    def _clear_message(self) -> None:
        self._message = None
        self._message_handle = None
        self._draw_status()

    # ---------------------------------------------------------------------------- input

    def _on_stdin(self) -> None:
        try:
            data = os.read(self._in_fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the terminal is gone
            self._detach()
            return
        self._handle(self._keys.feed(data))
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._keys.pending:
            self._flush_handle = asyncio.get_running_loop().call_later(
                ESCAPE_TIMEOUT, self._flush_keys
            )

    def _flush_keys(self) -> None:
        self._flush_handle = None
        self._handle(self._keys.flush())

    def _handle(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Forward):
                if self._interactive and self._conn is not None:
                    self._typed += action.data
                    self._typed_ready.set()
                elif self.state is not None and not self.state.interactive:
                    self._say(f"this agent has no terminal; {self._prefix_name} p injects a prompt")
                else:
                    self._say(
                        f"observe mode: keys are not sent; {self._prefix_name} i to type into "
                        "the agent"
                    )
            elif isinstance(action, Command):
                self._command(action.cmd)
            elif isinstance(action, Inject):
                self._spawn(self._inject(action.text))
            elif isinstance(action, Prompt):
                self._prompt = action
                self._draw_status()
            elif isinstance(action, PromptClosed):
                self._prompt = None
                self._draw_status()
            elif isinstance(action, Unbound):
                key = action.key.decode("utf-8", errors="replace").encode("unicode_escape")
                self._say(
                    f"{self._prefix_name} {key.decode()}: no such command; "
                    f"{self._prefix_name} ? lists them"
                )

    def _command(self, cmd: Cmd) -> None:
        if cmd is Cmd.DETACH:
            self._detach()
        elif cmd is Cmd.HELP:
            p = self._prefix_name
            self._say(
                f"{p} then: i interactive · I take over · s stop · c checkpoint · p prompt · "
                f"d detach · {p} sends {p}"
            )
        elif cmd is Cmd.INTERACTIVE:
            if self._interactive:
                self._spawn(self._leave_interactive())
            else:
                self._spawn(self._take_interactive(force=False))
        elif cmd is Cmd.TAKE_OVER:
            self._spawn(self._take_interactive(force=True))
        elif cmd is Cmd.STOP:
            self._spawn(self._call("stop requested: the loop stops after this iteration",
                                   lambda conn: conn.stop()))
        elif cmd is Cmd.CHECKPOINT:
            self._spawn(self._call("checkpoint requested: the loop stops after this iteration",
                                   lambda conn: conn.checkpoint()))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RalphError):
            self._say(exc.message)
        elif exc is not None:
            log.error("attach: a command failed", exc_info=exc)
            self._say(f"internal error: {exc}")

    def _connection(self) -> LoopConnection:
        if self._conn is None or self._conn.closed:
            raise RalphError("not connected to the loop; reconnecting")
        return self._conn

    async def _call(
        self, done: str, action: Callable[[LoopConnection], Awaitable[None]]
    ) -> None:
        await action(self._connection())
        self._say(done)

    async def _inject(self, text: str) -> None:
        await self._connection().inject(text)
        self._say("prompt queued for the next iteration")

    async def _take_interactive(self, *, force: bool) -> None:
        conn = self._connection()
        if self.state is not None and not self.state.interactive:
            self._say(f"this agent has no terminal; {self._prefix_name} p injects a prompt")
            return
        try:
            enabled, holder = await conn.set_interactive(True, force=force)
        except RemoteError as exc:
            if exc.code != ErrorCode.NOT_INTERACTIVE:
                raise
            self._want_interactive = False
            self._say(f"{exc.message.split(';')[0]}; {self._prefix_name} I takes it over")
            return
        self._interactive = self._want_interactive = enabled
        self._holder = self._me = holder
        self._say("interactive mode: your keys go to the agent" if enabled else "observe mode")

    async def _check_holder(self) -> None:
        state = await self._connection().status()
        self._holder = state.interactive_holder
        if self._interactive and self._holder != self._me:
            self._interactive = self._want_interactive = False
            self._say(f"{self._holder or 'someone'} took interactive mode; back to observe")
        else:
            self._draw_status()

    async def _leave_interactive(self) -> None:
        self._interactive = self._want_interactive = False
        await self._connection().set_interactive(False)
        self._holder = None
        self._say("observe mode: keys are not sent")

    async def _send_keys(self) -> None:
        """Forward typed bytes in order, coalescing what piles up during a round trip."""
        while True:
            await self._typed_ready.wait()
            self._typed_ready.clear()
            if not self._typed:
                continue
            data, self._typed = bytes(self._typed), bytearray()
            try:
                await self._connection().write_pty(data)
            except RemoteError as exc:
                if exc.code == ErrorCode.NOT_INTERACTIVE:
                    self._interactive = self._want_interactive = False
                self._say(exc.message)
            except RalphError as exc:
                self._say(exc.message)

    def _on_resize(self) -> None:
        if self._term is None:
            return
        self._term.update_size()
        self._filter.rows = self._term.rows
        self._draw_status()
        if self._conn is not None and not self._conn.closed:
            self._spawn(self._send_size(self._conn))

    async def _send_size(self, conn: LoopConnection) -> None:
        if self._term is None:
            return
        try:
            await conn.resize(self._term.cols, max(self._term.rows - 1, 1))
        except RemoteError as exc:
            log.info("resize refused: %s", exc.message)


async def attach(
    connect: Connector,
    *,
    client: str,
    prefix: int = DEFAULT_PREFIX,
    in_fd: int = 0,
    out_fd: int = 1,
    replay_bytes: int = REPLAY_BYTES,
) -> AttachResult:
    """Attach this terminal to the loop ``connect`` reaches (see :class:`AttachSession`)."""
    session = AttachSession(
        connect, client=client, prefix=prefix, in_fd=in_fd, out_fd=out_fd,
        replay_bytes=replay_bytes,
    )
    return await session.run()
