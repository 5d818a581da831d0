"""The typed Python API of the loop commands: what ``ralph-uv run/status/stop/...`` call.

Two levels:

- :class:`LoopConnection` speaks the per-loop protocol (``get_status``, ``subscribe``,
  ``get_output``, ``stop``, ``inject_prompt``, ``set_interactive_mode``, ``write_pty``, ...) over
  any stream, usually one that ralphd relays to the loop's runner (``connect_loop``).
- :class:`Loops` works through the local ralphd (started on demand): start, list, stop and
  checkpoint loops, open a loop, inject, send keystrokes, read the journal.

:func:`clean_loops` works on this machine's registry and state folders directly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import getpass
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RalphError, RemoteError, TransportError, UserError
from ralph_uv.protocol import Dispatcher
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.rpc import Endpoint
from ralph_uv.status import LoopStatus
from ralph_uv.tasks import TaskRef
from ralph_uv.transports.base import Stream

__all__ = [
    "MAX_OUTPUT_READ",
    "PROTOCOL_VERSION",
    "EventHandler",
    "LoopConnection",
    "LoopEvent",
    "LoopState",
    "Loops",
    "OutputChunk",
    "RunOptions",
    "apply_event",
    "clean_loops",
    "client_name",
]

log = logging.getLogger("ralph_uv.client.loops")

PROTOCOL_VERSION = "1.0"
MAX_OUTPUT_READ = 1024 * 1024  # the most get_output returns in one call
_ENTER_DELAY = 0.15  # between typed text and Enter, so a TUI does not take the Enter as pasted


def client_name(kind: str) -> str:
    """How this client introduces itself (and shows up as the interactive-mode holder)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{kind} {user}@{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------ messages


def _int(data: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RalphError(f"the loop service sent a bad '{name}' ({value!r})")
    return value


def _opt_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class LoopState:
    """A loop's ``get_status`` reply."""

    loop_id: str
    task_name: str
    task_dir: str
    status: LoopStatus
    reason: str | None = None
    iteration: int = 0
    max_iterations: int = 0
    story: str | None = None
    stories_done: int = 0
    stories_total: int = 0
    agent: str = ""
    backend: str = "pty"
    interactive: bool = False  # the agent has a terminal that takes keystrokes
    interactive_holder: str | None = None
    output_end: int = 0
    events_next: int = 0
    started_at: float | None = None
    pid: int | None = None

    @classmethod
    def from_dict(cls, data: object) -> LoopState:
        """Parse a ``get_status`` reply; unknown fields (from a newer runner) are ignored."""
        if not isinstance(data, dict):
            raise RalphError("the loop service answered get_status with something not an object")
        try:
            status = LoopStatus(str(data.get("status")))
        except ValueError:
            status_text = data.get("status")
            raise RalphError(f"the loop service sent an unknown status {status_text!r}") from None
        started = data.get("started_at")
        pid = data.get("pid")
        return cls(
            loop_id=str(data.get("loop_id", "")),
            task_name=str(data.get("task_name", "")),
            task_dir=str(data.get("task_dir", "")),
            status=status,
            reason=_opt_str(data, "reason"),
            iteration=_int(data, "iteration"),
            max_iterations=_int(data, "max_iterations"),
            story=_opt_str(data, "story"),
            stories_done=_int(data, "stories_done"),
            stories_total=_int(data, "stories_total"),
            agent=str(data.get("agent") or ""),
            backend=str(data.get("backend") or "pty"),
            interactive=bool(data.get("interactive")),
            interactive_holder=_opt_str(data, "interactive_holder"),
            output_end=_int(data, "output_end"),
            events_next=_int(data, "events_next"),
            started_at=float(started) if isinstance(started, int | float) else None,
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        )


@dataclass(frozen=True, slots=True)
class LoopEvent:
    """One ``event`` notification. For ``output`` events ``seq`` is the offset of the first
    byte and :attr:`output` the bytes; for ``gap`` events ``data`` is ``{from, to}``; loop
    events have their own seq."""

    type: str
    seq: int
    timestamp: float
    data: Mapping[str, Any] = field(default_factory=dict)
    output: bytes = b""

    @property
    def output_next(self) -> int:
        """For an output event, the offset after its last byte."""
        return self.seq + len(self.output)

    @classmethod
    def from_params(cls, params: object) -> LoopEvent:
        if not isinstance(params, dict):
            raise RalphError("an event notification without an object")
        kind, seq, data = params.get("type"), params.get("seq"), params.get("data") or {}
        stamp = params.get("timestamp", 0.0)
        if not isinstance(kind, str) or not isinstance(seq, int) or not isinstance(data, dict):
            raise RalphError(f"a malformed event notification ({params!r:.200})")
        output = b""
        if kind == "output":
            try:
                output = base64.b64decode(str(data.get("data", "")), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RalphError("an output event whose data is not base64") from exc
        return cls(kind, seq, float(stamp) if isinstance(stamp, int | float) else 0.0, data, output)


def apply_event(state: LoopState, event: LoopEvent) -> LoopState:
    """``state`` after a loop event: how every client (attach, the dashboard) keeps its copy of
    the loop's status current between ``get_status`` calls. Events that change no field leave
    ``state`` as it is."""
    data = event.data
    kind = event.type
    try:
        if kind == "state_change":
            return dataclasses.replace(
                state, status=LoopStatus(str(data.get("to"))), reason=data.get("reason")
            )
        if kind == "iteration_started":
            return dataclasses.replace(
                state,
                iteration=int(data.get("iteration") or state.iteration),
                story=data.get("story") or state.story,
                agent=str(data.get("agent") or state.agent),
            )
        if kind == "story_passed":
            cap = state.stories_total or state.stories_done + 1
            return dataclasses.replace(state, stories_done=min(state.stories_done + 1, cap))
        if kind == "agent_failover":
            return dataclasses.replace(state, agent=str(data.get("to") or state.agent))
        if kind == "loop_finished":
            return dataclasses.replace(
                state,
                status=LoopStatus(str(data.get("status"))),
                reason=data.get("reason"),
                stories_done=int(data.get("stories_done") or state.stories_done),
            )
    except ValueError:  # an unknown status from a newer runner: keep what we know
        return state
    return state


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A ``get_output`` reply: bytes ``[start, next)``; ``gap`` is a range retention dropped."""

    data: bytes
    start: int
    next: int
    end: int
    gap: tuple[int, int] | None = None


EventHandler = Callable[[LoopEvent], Awaitable[None]]


# ---------------------------------------------------------------------------- loop connection

class LoopConnection:
    """One connection to a loop's service. Open with :meth:`open`; close with :meth:`close`
    (or ``async with``). ``on_event`` receives the subscription's events in order."""

    def __init__(self, endpoint: Endpoint, on_event: EventHandler | None) -> None:
        self.endpoint = endpoint
        self.on_event = on_event
        self.hello: Mapping[str, Any] = {}

    @classmethod
    async def open(
        cls, stream: Stream, *, client: str, on_event: EventHandler | None = None
    ) -> LoopConnection:
        """Start the protocol on ``stream`` and say hello."""
        conn = cls(Endpoint(stream, _events), on_event)
        conn.endpoint.context = conn
        conn.endpoint.start()
        try:
            reply = await conn.endpoint.call(
                "hello", {"protocol": PROTOCOL_VERSION, "client": client}
            )
        except BaseException:
            await conn.endpoint.close()
            raise
        conn.hello = reply if isinstance(reply, dict) else {}
        return conn

    @property
    def peer(self) -> str:
        return self.endpoint.peer

    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    async def wait_closed(self) -> None:
        await self.endpoint.wait_closed()

    async def close(self) -> None:
        await self.endpoint.close()

    async def __aenter__(self) -> LoopConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def status(self) -> LoopState:
        return LoopState.from_dict(await self.endpoint.call("get_status"))

    async def subscribe(
        self, *, output: int | None, events: int | None, streams: tuple[str, ...] = ()
    ) -> Mapping[str, Any]:
        """Subscribe from these positions (``None``: from now)."""
        params: dict[str, Any] = {"since": {"output": output, "events": events}}
        if streams:
            params["streams"] = list(streams)
        reply = await self.endpoint.call("subscribe", params)
        return reply if isinstance(reply, dict) else {}

    async def get_output(self, since: int, limit: int = MAX_OUTPUT_READ) -> OutputChunk:
        reply = await self.endpoint.call("get_output", {"since": since, "limit": limit})
        if not isinstance(reply, dict):
            raise RalphError("the loop service answered get_output with something not an object")
        try:
            data = base64.b64decode(str(reply.get("data", "")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RalphError("get_output sent data that is not base64") from exc
        gap = reply.get("gap")
        gap_range = (_int(gap, "from"), _int(gap, "to")) if isinstance(gap, dict) else None
        start = _int(reply, "start", since)
        return OutputChunk(
            data, start, _int(reply, "next", start + len(data)), _int(reply, "end"), gap_range
        )

    async def stop(self, *, now: bool = False) -> None:
        await self.endpoint.call("stop", {"when": "now" if now else "after_iteration"})

    async def checkpoint(self) -> None:
        await self.endpoint.call("checkpoint")

    async def inject(self, text: str) -> Mapping[str, Any]:
        reply = await self.endpoint.call("inject_prompt", {"text": text})
        return reply if isinstance(reply, dict) else {}

    async def set_interactive(
        self, enabled: bool, *, force: bool = False
    ) -> tuple[bool, str | None]:
        """Take (or give back) interactive mode; ``(enabled for this client, holder)``."""
        params: dict[str, Any] = {"enabled": enabled}
        if force:
            params["force"] = True
        reply = await self.endpoint.call("set_interactive_mode", params)
        if not isinstance(reply, dict):
            return False, None
        return bool(reply.get("enabled")), _opt_str(reply, "holder")

    async def write_pty(self, data: bytes) -> None:
        await self.endpoint.call("write_pty", {"data": base64.b64encode(data).decode("ascii")})

    async def resize(self, cols: int, rows: int) -> None:
        await self.endpoint.call("resize", {"cols": cols, "rows": rows})


_events: Dispatcher[LoopConnection] = Dispatcher()


@_events.method("event", allow_extra=True)
async def _on_event(conn: LoopConnection, params: Any) -> None:
    if conn.on_event is None:
        return
    try:
        event = LoopEvent.from_params(params)
    except RalphError as exc:
        log.warning("%s: %s", conn.peer, exc.message)
        return
    await conn.on_event(event)



# ---------------------------------------------------------------------------------- via ralphd


@dataclass(frozen=True, slots=True)
class RunOptions:
    """``start_loop`` settings; ``None`` keeps ralphd's (config's) default."""

    agent: str | None = None
    model: str | None = None
    max_iterations: int | None = None
    base_branch: str | None = None
    yolo: bool | None = None
    pause: float | None = None
    iteration_timeout: float | None = None
    max_runtime: float | None = None
    failover: tuple[str, ...] | None = None
    backend: str | None = None  # "pty" or "tmux": where a terminal-based agent runs

    def params(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None:
                values[name] = list(value) if isinstance(value, tuple) else value
        return values


LogItem = bytes | LoopEvent


class Loops:
    """The loop commands over a connection to ralphd (see :meth:`connect`). ``reconnect``
    makes a new connection when this one is lost (default: this machine's ralphd, started if
    needed); a remote's loops pass one that dials the remote again."""

    def __init__(self, daemon: DaemonClient, *, client: str,
                 reconnect: Callable[[], Awaitable[DaemonClient]] | None = None) -> None:
        self.daemon = daemon
        self.client = client
        self._reconnect = reconnect

    @classmethod
    async def connect(
        cls, *, kind: str = "ralph-uv", on_notice: Callable[[str], None] | None = None
    ) -> Loops:
        """Connect to this machine's ralphd, starting it when it is not running."""
        name = client_name(kind)
        daemon = await connect_daemon(autostart=True, client=name, on_notice=on_notice)
        return cls(daemon, client=name)

    async def close(self) -> None:
        await self.daemon.close()

    async def start(self, task: TaskRef, options: RunOptions) -> SessionRecord:
        """Start a loop on ``task``; its record (``loop_id``, ``status``...)."""
        return await self.daemon.start_loop(task.dir, task_name=task.name, **options.params())

    async def list(self, *, include_finished: bool = False) -> list[SessionRecord]:
        """Loops ralphd knows, newest first; finished ones and the local registry's other rows
        (remote loops, loops from before) too with ``include_finished``."""
        found = {r.loop_id: r for r in await self.daemon.list_loops(all=include_finished)}
        if include_finished:
            with Registry.open() as registry:
                for record in registry.find():
                    found.setdefault(record.loop_id, record)
        return sorted(found.values(), key=lambda r: r.started_at, reverse=True)

    async def most_recent_running(self) -> SessionRecord:
        """The most recently started loop that is still running (for ``attach`` alone)."""
        running = [r for r in await self.list() if r.is_active and r.is_local]
        if not running:
            raise UserError(
                "no loop is running; start one with `ralph-uv run TASK`, or name a finished "
                "one's TASK to read its output with `ralph-uv logs TASK`",
                code=ErrorCode.LOOP_NOT_FOUND,
            )
        return running[0]

    async def stop(self, loop: str, *, now: bool = False) -> SessionRecord:
        """Ask ``loop`` to stop; its record as it is now."""
        return await self.daemon.stop_loop(loop, "now" if now else "after_iteration")

    async def checkpoint(self, loop: str) -> SessionRecord:
        """Ask ``loop`` to checkpoint; its record as it is now."""
        return await self.daemon.checkpoint_loop(loop)

    async def loop_stream(self, loop: str) -> Stream:
        """A byte stream relayed to ``loop`` (a loop id or a task name: its most recent loop).

        When ralphd has gone away since this connection was made (restarted, crashed), a new
        one is connected (and started if need be): the runners survive it."""
        try:
            return await self.daemon.connect_loop(loop)
        except TransportError:
            log.info("ralphd went away; connecting again")
            fresh = await (self._reconnect() if self._reconnect is not None
                           else connect_daemon(client=self.client))
            old, self.daemon = self.daemon, fresh
            await old.close()
            return await self.daemon.connect_loop(loop)

    async def open_loop(self, loop: str, *, on_event: EventHandler | None = None) -> LoopConnection:
        """A connection to ``loop`` (a loop id or a task name: its most recent loop)."""
        stream = await self.loop_stream(loop)
        return await LoopConnection.open(stream, client=self.client, on_event=on_event)

    async def inject(self, loop: str, text: str) -> Mapping[str, Any]:
        """Queue ``text`` for the loop's next prompt."""
        if not text.strip():
            raise UserError("the prompt to inject is empty; pass some text (or - to read stdin)")
        async with await self.open_loop(loop) as conn:
            return await conn.inject(text)

    async def send(self, loop: str, text: str, *, enter: bool = True) -> LoopState:
        """Type ``text`` (and Enter) into the agent's terminal, taking interactive mode for
        the moment; refused, naming the holder, when another client holds it."""
        async with await self.open_loop(loop) as conn:
            state = await conn.status()
            if state.status.is_terminal:
                raise UserError(
                    f"loop {state.loop_id} has ended ({state.status.value}); there is no agent "
                    "to type into"
                )
            if not state.interactive:
                raise UserError(
                    f"the agent of loop {state.loop_id} ({state.agent}) has no terminal; "
                    f"steer it with `ralph-uv inject {state.task_name} TEXT` instead"
                )
            try:
                await conn.set_interactive(True)
            except RemoteError as exc:
                if exc.code != ErrorCode.NOT_INTERACTIVE:
                    raise
                holder = (await conn.status()).interactive_holder or "another client"
                raise UserError(
                    f"cannot type into loop {state.loop_id}: interactive mode is held by "
                    f"{holder}; try again once it is given back (Ctrl-] i in an attach)",
                    code=ErrorCode.NOT_INTERACTIVE,
                ) from exc
            try:
                if text:
                    await conn.write_pty(text.encode())
                if enter:
                    if text:
                        await asyncio.sleep(_ENTER_DELAY)
                    await conn.write_pty(b"\r")
            finally:
                with contextlib.suppress(RalphError):
                    await conn.set_interactive(False)
            return state

    async def logs(
        self, loop: str, *, since: int = 0, follow: bool = False
    ) -> AsyncIterator[LogItem]:
        """The loop's output from offset ``since`` (bytes), then with ``follow`` its live
        output and events until the loop ends (the last item is then ``loop_finished``).
        A range dropped by retention comes as a ``gap`` :class:`LoopEvent`."""
        queue: asyncio.Queue[LoopEvent | None] = asyncio.Queue()
        conn = await self.open_loop(loop, on_event=queue.put)
        try:
            state = await conn.status()
            if since > state.output_end:
                raise UserError(
                    f"--since {since} is past the end of loop {state.loop_id}'s output "
                    f"({state.output_end} bytes)"
                )
            if not follow or state.status.is_terminal:
                async for item in _read_output(conn, since, state.output_end):
                    yield item
                if follow:  # it ended before we came: say how, as a live follow would
                    yield LoopEvent(
                        "loop_finished",
                        state.events_next,
                        0.0,
                        {"status": state.status.value, "reason": state.reason},
                    )
                return
            await conn.subscribe(output=since, events=state.events_next)
            closed = asyncio.ensure_future(conn.wait_closed())
            closed.add_done_callback(lambda _: queue.put_nowait(None))
            try:
                while (event := await queue.get()) is not None:
                    if event.type == "output":
                        yield event.output
                    else:
                        yield event
                    if event.type == "loop_finished":
                        return
            finally:
                closed.cancel()
        finally:
            await conn.close()


async def _read_output(conn: LoopConnection, since: int, end: int) -> AsyncIterator[LogItem]:
    position = since
    while position < end:
        chunk = await conn.get_output(position)
        if chunk.gap is not None:
            yield LoopEvent("gap", chunk.gap[0], 0.0, {"from": chunk.gap[0], "to": chunk.gap[1]})
        if chunk.data:
            yield chunk.data
        if chunk.next <= position:
            return
        position = chunk.next


# ------------------------------------------------------------------------------------- cleaning

_FINISHED = (
    LoopStatus.COMPLETED,
    LoopStatus.EXHAUSTED,
    LoopStatus.STOPPED,
    LoopStatus.CHECKPOINTED,
)
_BROKEN = (LoopStatus.FAILED, LoopStatus.CRASHED)


def clean_loops(*, include_failed: bool = False) -> list[SessionRecord]:
    """Remove this machine's finished loops (completed, exhausted, stopped, checkpointed; with
    ``include_failed`` also failed and crashed) from the registry, with their state folders.
    Running loops are never touched. Returns the removed records."""
    wanted = _FINISHED + (_BROKEN if include_failed else ())
    removed: list[SessionRecord] = []
    with Registry.open() as registry:
        for record in registry.find(status=wanted, location="local"):
            folder = paths().loop_dir(record.loop_id)
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise UserError(
                    f"cannot remove {folder}: {exc.strerror}; fix its permissions and run "
                    "`ralph-uv clean` again"
                ) from exc
            registry.delete(record.loop_id)
            removed.append(record)
    return removed
