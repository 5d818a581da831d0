"""The per-loop service: the JSON-RPC methods a runner serves on its loop's Unix socket.

Any number of clients may watch a loop (``subscribe``, ``get_output``, ``get_status``) and
steer it (``stop``, ``checkpoint``, ``resume``, ``inject_prompt``); one at a time holds
*interactive mode* and may type into the agent's terminal (``write_pty``). Output and events come
from the loop's journal through per-subscriber cursors (:mod:`ralph_uv.runner.subscription`);
the methods that only read it are shared with ralphd's archive of ended loops
(:mod:`ralph_uv.runner.watch`).

Invariants:
- At most one connection holds interactive mode; it is released when that connection closes.
  Every change is published as an ``interactive_mode`` event while the loop runs.
- Keystrokes reach the agent's terminal in the order they arrived, whatever the connection.
- A connection's failure (garbage, a peer that stops reading, a crash in a handler) ends that
  connection only; the agent and the other clients never wait for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.protocol import Dispatcher
from ralph_uv.runner.engine import LoopEngine, StopWhen
from ralph_uv.runner.host import LoopHost
from ralph_uv.runner.subscription import DEFAULT_CHUNK_SIZE, DEFAULT_COALESCE, ChunkCache
from ralph_uv.runner.watch import (
    MAX_OUTPUT_READ,
    PROTOCOL_VERSION,
    SERVER_NAME,
    Hello,
    Watcher,
    add_watch_methods,
    check_protocol,
    hello_reply,
    status_reply,
)
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import UnixServer, start_unix_server

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "MAX_OUTPUT_READ",
    "PROTOCOL_VERSION",
    "SERVER_NAME",
    "LoopConnection",
    "LoopService",
]

log = logging.getLogger("ralph_uv.runner.service")

DEFAULT_MAX_CLIENTS = 1000
DEFAULT_SLOW_PEER_TIMEOUT = 120.0
_MAX_CONCURRENT_REQUESTS = 16
_CLOSE_TIMEOUT = 2.0
_MAX_CLIENT_NAME = 100
_MAX_TERMINAL_SIDE = 10_000


class LoopConnection(Watcher):
    """One client connection: its endpoint, its name and its subscriptions."""

    def __init__(self, service: LoopService, stream: Stream, number: int) -> None:
        self.service = service
        self.number = number
        self.peer = stream.peer
        self.client = ""
        self._next_subscription = 1
        super().__init__(
            stream,
            _methods,
            service.host.journal,
            max_message_size=service.max_message_size,
            max_concurrent_requests=_MAX_CONCURRENT_REQUESTS,
            slow_peer_timeout=service.slow_peer_timeout,
            chunk_size=service.chunk_size,
            coalesce=service.coalesce,
            chunks=service.chunks,
        )

    @property
    def name(self) -> str:
        """How other clients see this one: the name it gave in ``hello``."""
        return self.client or f"client {self.number}"

    def new_subscription_id(self) -> str:
        """A subscription id unique in this runner: ``<connection>.<n>``."""
        sid = f"{self.number}.{self._next_subscription}"
        self._next_subscription += 1
        return sid


class LoopService:
    """Serves ``host``'s loop on ``socket_path`` (default: ``paths().loop_socket(loop_id)``)."""

    def __init__(
        self,
        host: LoopHost,
        *,
        socket_path: Path | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        coalesce: float = DEFAULT_COALESCE,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        slow_peer_timeout: float | None = DEFAULT_SLOW_PEER_TIMEOUT,
    ) -> None:
        self.host = host
        self.engine: LoopEngine = host.engine
        self.loop_id = host.engine.spec.loop_id
        self.socket_path = socket_path or host.dirs.loop_socket(self.loop_id)
        self.max_message_size = host.engine.config.max_message_size
        # An output event carries its chunk as base64 (4/3 larger) plus a little framing.
        self.chunk_size = max(1024, min(chunk_size, (self.max_message_size - 512) * 3 // 4))
        self.coalesce = coalesce
        self.chunks = ChunkCache()
        self.max_clients = max_clients
        self.slow_peer_timeout = slow_peer_timeout
        self.log = logging.LoggerAdapter(log, {"loop_id": self.loop_id})
        self._server: UnixServer | None = None
        self._connections: set[LoopConnection] = set()
        self._numbers = 0
        self._holder: LoopConnection | None = None
        self.keystrokes = asyncio.Lock()  # keeps keystrokes in arrival order
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen on the loop's socket (0600 in a 0700 folder, this user only)."""
        self._server = await start_unix_server(
            self.socket_path, self._on_connect, max_connections=self.max_clients, own_folder=True
        )
        self.log.info("serving on %s", self.socket_path)

    @property
    def connection_count(self) -> int:
        """Clients connected now."""
        return len(self._connections)

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bounded linger
        """Wait until no client is connected, at most ``timeout`` seconds; True if none is."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop listening (the socket file goes) and close every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        connections = list(self._connections)
        await asyncio.gather(
            *(conn.endpoint.close() for conn in connections), return_exceptions=True
        )
        await asyncio.gather(
            *(conn.end_subscriptions() for conn in connections), return_exceptions=True
        )
        await self.wait_idle(_CLOSE_TIMEOUT)  # each connection's clean-up has run

    async def _on_connect(self, stream: Stream) -> None:
        self._numbers += 1
        conn = LoopConnection(self, stream, self._numbers)
        self._connections.add(conn)
        self._idle.clear()
        self.log.debug("client %d connected from %s", conn.number, conn.peer)
        try:
            await conn.endpoint.run()
        finally:
            self._connections.discard(conn)
            if not self._connections:
                self._idle.set()
            await conn.end_subscriptions()
            if self._holder is conn:
                self.set_holder(None, released_by=conn)
            self.log.debug("client %d (%s) left: %s", conn.number, conn.name,
                           conn.endpoint.close_reason)

    # ------------------------------------------------------------------ state

    @property
    def holder(self) -> LoopConnection | None:
        """The connection holding interactive mode."""
        return self._holder

    @property
    def has_terminal(self) -> bool:
        """Whether the loop's agent runs in a terminal that takes keystrokes."""
        session = self.engine.session
        if session is not None:
            return session.interactive
        agent = self.engine.agent
        return agent in self.engine.config.agents or agent == "claude"

    def status(self) -> dict[str, Any]:
        """The ``get_status`` reply."""
        engine = self.engine
        spec = engine.spec
        return status_reply(
            self.host.journal,
            loop_id=spec.loop_id,
            task_name=spec.task_name or engine.task_dir.name,
            task_dir=str(engine.task_dir),
            status=engine.status,
            reason=engine.reason,
            iteration=engine.iteration,
            max_iterations=engine.config.max_iterations,
            story=engine.current_story,
            stories_done=engine.stories_done,
            stories_total=engine.stories_total,
            agent=engine.agent,
            backend="http"
            if engine.agent == "opencode" and engine.agent not in engine.config.agents
            else spec.backend,
            branch=engine.branch,
            interactive=self.has_terminal,
            interactive_holder=self._holder.name if self._holder else None,
            started_at=engine.started_at,
            # Where `tmux attach` reaches the agent (backend "tmux" only).
            tmux=self.host.tmux.target.to_dict() if self.host.tmux is not None else None,
            pid=os.getpid(),
        )

    def require_running(self, action: str) -> None:
        """Refuse ``action`` (``BAD_STATE``) once the loop has ended."""
        if self.engine.status.is_terminal:
            raise RalphError(
                f"cannot {action}: the loop has ended ({self.engine.status.value}); "
                "start a new loop to go on",
                code=ErrorCode.BAD_STATE,
            )

    def set_holder(
        self, conn: LoopConnection | None, *, released_by: LoopConnection | None = None
    ) -> None:
        """Give interactive mode to ``conn`` (``None``: nobody) and publish the change."""
        previous = self._holder
        self._holder = conn
        if previous is conn:
            return
        self.log.info(
            "interactive mode: %s -> %s",
            previous.name if previous else "nobody", conn.name if conn else "nobody",
        )
        # After loop_finished nothing is typed any more and that event stays the last one.
        if not self.engine.status.is_terminal:
            self.host.journal.append_event(
                "interactive_mode",
                {
                    "enabled": conn is not None,
                    "holder": conn.name if conn else None,
                    "previous": previous.name if previous else None,
                    "reason": "disconnected" if released_by is not None else None,
                },
            )


# ---------------------------------------------------------------------------------- the methods

_methods: Dispatcher[LoopConnection] = Dispatcher()
add_watch_methods(_methods)


@dataclass(frozen=True, slots=True)
class _Stop:
    when: StopWhen = StopWhen.AFTER_ITERATION


@dataclass(frozen=True, slots=True)
class _Inject:
    text: str


@dataclass(frozen=True, slots=True)
class _Interactive:
    enabled: bool
    force: bool = False


@dataclass(frozen=True, slots=True)
class _WritePty:
    data: str


@dataclass(frozen=True, slots=True)
class _Resize:
    cols: int
    rows: int

    def __post_init__(self) -> None:
        for name, value in (("cols", self.cols), ("rows", self.rows)):
            if not 1 <= value <= _MAX_TERMINAL_SIDE:
                raise ValueError(f"{name} must be between 1 and {_MAX_TERMINAL_SIDE}")


@_methods.method("hello", allow_extra=True)
async def _hello(conn: LoopConnection, params: Hello) -> dict[str, Any]:
    check_protocol(params.protocol, "this runner")
    name = "".join(ch for ch in params.client if ch.isprintable())[:_MAX_CLIENT_NAME]
    conn.client = name.strip()
    return hello_reply(conn.service.loop_id, _methods.names)


@_methods.method("get_status")
async def _get_status(conn: LoopConnection) -> dict[str, Any]:
    return conn.service.status()


@_methods.method("stop")
async def _stop(conn: LoopConnection, params: _Stop) -> dict[str, Any]:
    engine = conn.service.engine
    if not engine.status.is_terminal:
        conn.service.log.info("%s asked to stop (%s)", conn.name, params.when.value)
        engine.request_stop(params.when)
    return {"status": engine.status.value, "when": params.when.value}


@_methods.method("checkpoint")
async def _checkpoint(conn: LoopConnection) -> dict[str, Any]:
    engine = conn.service.engine
    if not engine.status.is_terminal:
        conn.service.log.info("%s asked for a checkpoint", conn.name)
        engine.request_checkpoint()
    return {"status": engine.status.value}


@_methods.method("resume")
async def _resume(conn: LoopConnection) -> dict[str, Any]:
    conn.service.require_running("resume")
    conn.service.engine.resume()
    return {"status": conn.service.engine.status.value}


@_methods.method("inject_prompt")
async def _inject_prompt(conn: LoopConnection, params: _Inject) -> dict[str, Any]:
    conn.service.require_running("inject a prompt")
    conn.service.engine.inject_prompt(params.text)
    conn.service.log.info("%s injected %d characters", conn.name, len(params.text))
    return {"injected": len(params.text), "iteration": conn.service.engine.iteration + 1}


@_methods.method("set_interactive_mode")
async def _set_interactive_mode(conn: LoopConnection, params: _Interactive) -> dict[str, Any]:
    service = conn.service
    holder = service.holder
    if params.enabled:
        service.require_running("take interactive mode")
        if holder is not None and holder is not conn and not params.force:
            raise RalphError(
                f"interactive mode is held by {holder.name}; wait until it lets go, "
                "or take it over with force",
                code=ErrorCode.NOT_INTERACTIVE,
            )
        service.set_holder(conn)
    elif holder is conn:
        service.set_holder(None)
    current = service.holder
    return {"enabled": current is conn, "holder": current.name if current else None}


@_methods.method("write_pty")
async def _write_pty(conn: LoopConnection, params: _WritePty) -> dict[str, Any]:
    service = conn.service
    # Checks and the lock request happen before the first suspension, so keystrokes from
    # consecutive requests keep their order.
    try:
        data = base64.b64decode(params.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError("write_pty: 'data' must be base64-encoded bytes") from exc
    holder = service.holder
    if holder is not conn:
        who = f"{holder.name} holds it" if holder else "nobody holds it"
        raise RalphError(
            f"keystrokes refused: this client is not in interactive mode ({who}); "
            "call set_interactive_mode {enabled: true} first",
            code=ErrorCode.NOT_INTERACTIVE,
        )
    if not service.has_terminal:
        raise RalphError(
            f"the agent {service.engine.agent!r} runs without a terminal; "
            "use inject_prompt to steer it instead",
            code=ErrorCode.NOT_INTERACTIVE,
        )
    async with service.keystrokes:
        session = service.engine.session
        if session is None:
            raise RalphError(
                "the agent is between iterations, so there is no terminal to type into; "
                "try again when the next iteration starts",
                code=ErrorCode.BAD_STATE,
            )
        try:
            await session.write(data)
        except UserError as exc:  # the terminal closed under us: the iteration just ended
            raise RalphError(
                f"the agent's terminal has closed ({exc.message}); the iteration ended",
                code=ErrorCode.BAD_STATE,
            ) from exc
    return {"written": len(data)}


@_methods.method("resize")
async def _resize(conn: LoopConnection, params: _Resize) -> dict[str, Any]:
    holder = conn.service.holder
    applied = holder is None or holder is conn
    # While someone types, the terminal follows their window, not an observer's.
    if applied:
        conn.service.engine.resize(params.cols, params.rows)
    return {"cols": params.cols, "rows": params.rows, "applied": applied}
