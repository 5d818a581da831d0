"""ralphd's control socket: the daemon methods, and ``connect_loop``'s hand-over to a relay.

Every connection is an :class:`~ralph_uv.rpc.Endpoint` serving the daemon methods of the
service contract (``hello``, ``get_health``, ``get_agents``, ``start_loop``, ``list_loops``,
``stop_loop``, ``checkpoint_loop``, ``subscribe_events``, ``connect_loop``, ``connect_http``),
and the code-sync methods of remote loops (:mod:`~ralph_uv.daemon.sync`). Bad input (garbage,
oversized lines, wrong params) gets an error reply and the connection stays usable; a client
that stops reading is disconnected after ``slow_peer_timeout``.

``connect_loop`` changes what a connection is: once its reply has been written, the endpoint
lets go of the stream (it sees an end of input) and the stream is relayed byte for byte to the
loop's own socket, or, when the loop's runner is gone, served by the read-only archive service.
``connect_http`` does the same with the loop's opencode server port (for ``opencode attach``).

Invariants:
- Nothing the client sends after ``connect_loop`` reaches the daemon's endpoint; it all goes
  to the loop (the client waits for the reply before it speaks to the loop).
- Closing the daemon closes every connection and relay but never touches a runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ralph_uv import __version__
from ralph_uv.agents import detect_agents
from ralph_uv.config import Paths, load_config, paths
from ralph_uv.daemon.archive import serve_archive
from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.daemon.events import EVENTS_FILE, DaemonEvents, DaemonEventType, daemon_dir
from ralph_uv.daemon.install import ensure_agent
from ralph_uv.daemon.relay import HandOver, PrefixedStream, relay
from ralph_uv.daemon.supervisor import PROTOCOL_VERSION, LoopRequest, Supervisor
from ralph_uv.daemon.sync import (
    Transfers,
    discard_checkout,
    http_target,
    maintain,
    open_checkout,
)
from ralph_uv.daemon.sync import register as register_sync_methods
from ralph_uv.daemon.workspaces import Checkout, Workspaces
from ralph_uv.errors import (
    ErrorCode,
    RalphError,
    RemoteError,
    TransportError,
    UserError,
)
from ralph_uv.eventlog import JournalError
from ralph_uv.prd import PrdError, load_prd, validate_prd
from ralph_uv.protocol import Dispatcher, Notification, Request, Response
from ralph_uv.protocol.messages import ErrorResponse
from ralph_uv.registry import LOCAL, Registry, SessionRecord
from ralph_uv.rpc import Endpoint
from ralph_uv.runner.engine import StopWhen
from ralph_uv.runner.watch import check_protocol
from ralph_uv.tasks import resolve_task, validate_task_name
from ralph_uv.transports import Listener, listen
from ralph_uv.transports.base import AsyncioStream, Stream
from ralph_uv.transports.unix import UnixServer, open_unix, start_unix_server

__all__ = ["SERVER_NAME", "DaemonConnection", "DaemonServer"]

log = logging.getLogger("ralph_uv.daemon.server")

SERVER_NAME = "ralphd"
_MAX_CONNECTIONS = 4096
_MAX_CONCURRENT_REQUESTS = 16
_MAX_CLIENT_NAME = 100


class _Methods(Dispatcher["DaemonConnection"]):
    """The daemon's dispatcher: it arms the hand-over once ``connect_loop`` has succeeded."""

    async def dispatch(
        self,
        context: DaemonConnection,
        message: Request | Notification,
        *,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> Response | ErrorResponse | None:
        reply = await super().dispatch(context, message, logger=logger)
        if (
            isinstance(message, Request)
            and message.method in ("connect_loop", "connect_http")
            and isinstance(reply, Response)
            and context.target is not None
        ):
            context.stream.arm(message.id)
        return reply


# ------------------------------------------------------------------------- connections


class DaemonConnection:
    """One client of ralphd."""

    def __init__(self, server: DaemonServer, stream: Stream) -> None:
        self.server = server
        self.stream = HandOver(stream)
        self.client = ""
        credentials = stream.extra.get("peercred")
        self.pid: int | None = credentials[0] if credentials else None
        self.target: _Target | None = None
        self.events_task: asyncio.Task[None] | None = None
        self.endpoint = Endpoint(
            self.stream,
            _methods,
            context=self,
            max_message_size=server.settings.max_message_size,
            max_concurrent_requests=_MAX_CONCURRENT_REQUESTS,
            slow_peer_timeout=server.settings.slow_peer_timeout,
        )

    async def run(self) -> None:
        try:
            await self.endpoint.run()
        finally:
            if self.events_task is not None:
                self.events_task.cancel()
                await asyncio.gather(self.events_task, return_exceptions=True)
        if self.stream.switched and self.target is not None:
            await self._serve_loop(self.target)
        elif self.target is not None and self.target.stream is not None:
            self.target.stream.abort()

    async def _serve_loop(self, target: _Target) -> None:
        client: Stream = self.stream.stream
        if self.stream.held:
            client = PrefixedStream(client, bytes(self.stream.held))
        if target.stream is not None:
            sent, received = await relay(client, target.stream)
            log.debug("relay for loop %s ended (%d bytes up, %d down)", target.record.loop_id,
                      sent, received)
            return
        await serve_archive(
            client, target.record, self.server.dirs, self.server.registry,
            max_message_size=self.server.settings.max_message_size,
            slow_peer_timeout=self.server.settings.slow_peer_timeout,
        )


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a connection goes after ``connect_loop``: the runner's socket, or the archive."""

    record: SessionRecord
    stream: Stream | None


# ----------------------------------------------------------------------------- the server


class DaemonServer:
    """ralphd: the control socket, the supervisor and the daemon event log.

    ``await start()``, then serve until :meth:`close`. Runners are never stopped by closing.
    """

    def __init__(self, settings: DaemonConfig, dirs: Paths | None = None) -> None:
        self.settings = settings
        self.dirs = dirs or paths()
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._server: UnixServer | None = None
        self._connections: set[DaemonConnection] = set()
        self._registry: Registry | None = None
        self._events: DaemonEvents | None = None
        self._supervisor: Supervisor | None = None
        self.workspaces = Workspaces(self.dirs.workspaces, settings)
        self.transfers = Transfers(self.workspaces)
        self._maintenance: asyncio.Task[None] | None = None
        self._network: list[Listener] = []

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "the daemon has not started"
        return self._registry

    @property
    def events(self) -> DaemonEvents:
        assert self._events is not None, "the daemon has not started"
        return self._events

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "the daemon has not started"
        return self._supervisor

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_monotonic

    @property
    def listeners(self) -> list[str]:
        """The URLs this daemon answers on."""
        return [f"unix://{self.dirs.daemon_socket}", *(item.url for item in self._network)]

    async def start(self) -> None:
        """Open the registry and the event log, re-adopt runners, then listen."""
        self._registry = Registry.open(self.dirs.registry)
        try:
            self._events = DaemonEvents(daemon_dir(self.dirs) / EVENTS_FILE)
        except JournalError as exc:
            raise RalphError(
                "another ralphd is running with the same state folder; stop it first "
                f"(`ralphd stop`): {exc.message}",
                code=ErrorCode.BAD_STATE,
            ) from exc
        self._supervisor = Supervisor(self.dirs, self.registry, self.events, self.settings)
        await self.supervisor.recover()
        # Bundles in transit do not survive a restart; clear them before anyone can upload.
        await asyncio.to_thread(self.workspaces.clear_staging)
        self._maintenance = asyncio.create_task(maintain(self), name="workspace maintenance")
        self._server = await start_unix_server(
            self.dirs.daemon_socket, self._on_connect, own_folder=True
        )
        for configured in self.settings.listeners:
            # A listener that cannot start stops ralphd, with transports' reason (no token, no
            # TLS off loopback, a port in use): better than a daemon quietly not listening.
            network = await listen(configured.url, self._on_connect,
                                   options=configured.options())
            self._network.append(network)
            log.info("listening on %s", network.url)
        self.events.publish(DaemonEventType.DAEMON_STARTED,
                            {"pid": os.getpid(), "version": __version__})
        log.info("ralphd %s (pid %d) listening on %s", __version__, os.getpid(),
                 self.dirs.daemon_socket)

    async def close(self) -> None:
        """Stop listening and close every connection; runners keep running."""
        if self._server is not None:
            self._server.close()
            self._server = None
        network, self._network = self._network, []
        for listener in network:
            listener.close()
            listener.close_clients()
        connections = list(self._connections)
        await asyncio.gather(*(c.endpoint.close() for c in connections), return_exceptions=True)
        for conn in connections:
            conn.stream.stream.abort()
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        self.transfers.close()
        if self._supervisor is not None:
            await self._supervisor.close()
        if self._events is not None:
            self._events.publish(DaemonEventType.DAEMON_STOPPED, {"pid": os.getpid()})
            self._events.close()
        if self._registry is not None:
            self._registry.close()

    async def _on_connect(self, stream: Stream) -> None:
        if len(self._connections) >= _MAX_CONNECTIONS:
            log.warning("refused %s: %d connections open", stream.peer, len(self._connections))
            stream.abort()
            return
        conn = DaemonConnection(self, stream)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def health(self) -> dict[str, Any]:
        """The ``get_health`` reply."""
        active = len(self.registry.find(location=LOCAL, active_only=True))
        total = len(self.registry.find(location=LOCAL))
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(self.uptime, 3),
            "started_at": self.started_at,
            "host": socket.gethostname(),
            "loops_active": active,
            "loops_total": total,
            "load": list(os.getloadavg()),
            "memory": {"rss": _proc_kib("/proc/self/status", "VmRSS"),
                       "available": _proc_kib("/proc/meminfo", "MemAvailable")},
            "listeners": self.listeners,
            "events_next": self.events.next_seq,
        }

    async def prepare(self, params: _StartLoop) -> LoopRequest:
        """Check a ``start_loop`` request before anything runs; with ``project``, make the
        loop's checkout (removed again if a check fails)."""
        if params.project is None:
            return await self._prepare(params, params.task_dir, None, None)
        assert params.branch is not None
        assert params.task_path is not None
        loop_id, task_name, checkout = await open_checkout(
            self, project=params.project, branch=params.branch, task_path=params.task_path,
            task_name=params.task_name, sync=params.sync, push_every=params.push_every,
        )
        try:
            if not (checkout.task_dir / "prd.json").is_file():
                raise UserError(
                    f"{checkout.task_path}/prd.json is not on branch {params.branch!r} of "
                    f"project {params.project!r}; commit the task and sync the branch again"
                )
            return await self._prepare(params, str(checkout.task_dir), task_name, checkout,
                                       loop_id=loop_id)
        except BaseException:
            await discard_checkout(self, checkout)
            raise

    async def _prepare(self, params: _StartLoop, task_dir_text: str, task_name: str | None,
                       checkout: Checkout | None, *, loop_id: str | None = None) -> LoopRequest:
        task_dir = await asyncio.to_thread(_task_dir, task_dir_text)
        prd_file = task_dir / "prd.json"
        problems = await asyncio.to_thread(validate_prd, prd_file)
        if problems:
            error = PrdError(problems, f"{prd_file} is not a valid prd.json")
            # A RemoteError is how a handler sends an error reply that carries data.
            raise RemoteError(error.message, code=error.code,
                              data={"problems": [p.to_dict() for p in problems]})
        prd = await asyncio.to_thread(load_prd, prd_file)
        if task_name is not None or params.task_name is not None:
            task_name = validate_task_name(task_name or params.task_name or "")
        else:
            task_name = validate_task_name((await asyncio.to_thread(resolve_task, task_dir)).name)
        config = load_config(self.dirs.config_file)
        agent = params.agent or prd.agent or config.agent
        failover = _failover(params.failover)
        for name in (agent, *(failover or ())):
            await ensure_agent(name, config, install=params.install_agents)
        overrides = {
            key: value
            for key, value in {
                "max_iterations": params.max_iterations, "yolo": params.yolo,
                "pause": params.pause, "iteration_timeout": params.iteration_timeout,
                "max_runtime": params.max_runtime,
                "failover": list(failover) if failover is not None else None,
            }.items()
            if value is not None
        }
        return LoopRequest(
            task_dir=task_dir, task_name=task_name, agent=agent, model=params.model,
            base_branch=params.base_branch,
            max_iterations=params.max_iterations or config.max_iterations,
            overrides=overrides, loop_id=loop_id, first_run_setup=bool(params.first_run_setup),
            push_every=params.push_every, checkout=checkout, backend=params.backend,
        )


def _task_dir(text: str) -> Path:
    task_dir = Path(text).expanduser()
    if not task_dir.is_absolute():
        raise UserError(f"task_dir {text!r} must be an absolute path")
    if not task_dir.is_dir():
        raise UserError(f"task folder {task_dir} does not exist on this machine; "
                        "create it with `ralph-uv init` or pass an existing folder")
    if not (task_dir / "prd.json").is_file():
        raise UserError(f"{task_dir / 'prd.json'} does not exist; create it with "
                        "`ralph-uv init`")
    return task_dir.resolve()


def _proc_kib(path: str, key: str) -> int | None:
    """A ``Key: N kB`` line of a /proc file, in bytes."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _failover(value: list[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(p.strip() for p in parts if p.strip())


# ---------------------------------------------------------------------------------- methods

_methods = _Methods()


@dataclass(frozen=True, slots=True)
class _Hello:
    protocol: str
    client: str = ""
    token: str | None = None


@dataclass(frozen=True, slots=True)
class _StartLoop:
    task_dir: str = ""
    task_name: str | None = None
    agent: str | None = None
    model: str | None = None
    max_iterations: int | None = None
    base_branch: str | None = None
    yolo: bool | None = None
    pause: float | None = None
    iteration_timeout: float | None = None
    max_runtime: float | None = None
    failover: list[str] | str | None = None
    project: str | None = None
    branch: str | None = None
    task_path: str | None = None
    sync: Literal["bundle", "origin"] = "bundle"
    first_run_setup: bool | None = None
    push_every: int | None = None
    install_agents: bool = False
    backend: Literal["pty", "tmux"] = "pty"

    def __post_init__(self) -> None:
        if self.project is not None:
            if self.branch is None or self.task_path is None:
                raise ValueError("a loop in a workspace needs 'project', 'branch' and "
                                 "'task_path' (the task folder inside the repository)")
        elif not self.task_dir:
            raise ValueError("'task_dir' must name the task's folder (or pass 'project', "
                             "'branch' and 'task_path' for a loop in a synced workspace)")
        if self.push_every is not None and self.push_every < 1:
            raise ValueError("'push_every' must be at least 1")
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError("'max_iterations' must be at least 1")
        if self.pause is not None and self.pause < 0:
            raise ValueError("'pause' must be 0 or more seconds")
        for name in ("iteration_timeout", "max_runtime"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"'{name}' must be a positive number of seconds")
        if self.agent is not None and not self.agent.strip():
            raise ValueError("'agent' must not be empty")


@dataclass(frozen=True, slots=True)
class _ListLoops:
    all: bool = False


@dataclass(frozen=True, slots=True)
class _Loop:
    loop: str


@dataclass(frozen=True, slots=True)
class _StopLoop:
    loop: str
    when: StopWhen = StopWhen.AFTER_ITERATION


@dataclass(frozen=True, slots=True)
class _SubscribeEvents:
    since: int | None = None


@_methods.method("hello", allow_extra=True)
async def _hello(conn: DaemonConnection, params: _Hello) -> dict[str, Any]:
    check_protocol(params.protocol, "ralphd")
    conn.client = "".join(ch for ch in params.client if ch.isprintable())[:_MAX_CLIENT_NAME]
    return {
        "protocol": PROTOCOL_VERSION,
        "server": SERVER_NAME,
        "version": __version__,
        "host": socket.gethostname(),
        "capabilities": sorted(_methods.names),
        "pid": os.getpid(),
    }


@_methods.method("get_health")
async def _get_health(conn: DaemonConnection) -> dict[str, Any]:
    return conn.server.health()


@_methods.method("get_agents")
async def _get_agents(conn: DaemonConnection) -> list[dict[str, Any]]:
    config = load_config(conn.server.dirs.config_file)
    infos = await asyncio.to_thread(detect_agents, config)
    return [info.to_dict() for info in infos]


@_methods.method("start_loop")
async def _start_loop(conn: DaemonConnection, params: _StartLoop) -> dict[str, Any]:
    server = conn.server
    request = await server.prepare(params)
    log.info("%s asks for a loop on %s with %s", conn.client or conn.stream.peer,
             request.task_dir, request.agent)
    checkout = request.checkout
    try:
        record = await server.supervisor.start(request)
    except BaseException:
        if checkout is not None and server.registry.get(request.loop_id or "") is None:
            await discard_checkout(server, checkout)  # refused before anything ran in it
        raise
    finally:
        if checkout is not None:
            server.workspaces.reserved.discard(checkout.path)
    return record.to_dict()


@_methods.method("list_loops")
async def _list_loops(conn: DaemonConnection, params: _ListLoops) -> dict[str, Any]:
    supervisor = conn.server.supervisor
    await supervisor.sweep()
    records = conn.server.registry.find(location=LOCAL, active_only=not params.all)
    return {"loops": [record.to_dict() for record in records]}


@_methods.method("stop_loop")
async def _stop_loop(conn: DaemonConnection, params: _StopLoop) -> dict[str, Any]:
    supervisor = conn.server.supervisor
    record = supervisor.resolve(params.loop)
    if record.is_active:
        await supervisor.stop(record, params.when.value)
    return (conn.server.registry.get(record.loop_id) or record).to_dict()


@_methods.method("checkpoint_loop")
async def _checkpoint_loop(conn: DaemonConnection, params: _Loop) -> dict[str, Any]:
    supervisor = conn.server.supervisor
    record = supervisor.resolve(params.loop)
    if record.is_active:
        await supervisor.checkpoint(record)
    return (conn.server.registry.get(record.loop_id) or record).to_dict()


@_methods.method("subscribe_events")
async def _subscribe_events(conn: DaemonConnection, params: _SubscribeEvents) -> dict[str, Any]:
    events = conn.server.events
    next_seq = events.next_seq
    since = next_seq if params.since is None else params.since
    if not 0 <= since <= next_seq:
        raise UserError(
            f"since {since} is outside the daemon's events (0..{next_seq}); pass a seq you "
            "were given, 0 to replay, or null for new events only"
        )
    if conn.events_task is not None:
        conn.events_task.cancel()
    # Created now, first run after this reply is queued for writing: the reply comes first.
    conn.events_task = asyncio.create_task(_send_events(conn, since),
                                           name=f"daemon events {conn.stream.peer}")
    return {"events_next": next_seq, "since": since}


async def _send_events(conn: DaemonConnection, since: int) -> None:
    try:
        async for event in conn.server.events.follow(since):
            await conn.endpoint.notify("event", event.to_dict())
    except TransportError as exc:
        log.debug("event subscriber %s left: %s", conn.stream.peer, exc.message)


@_methods.method("connect_loop")
async def _connect_loop(conn: DaemonConnection, params: _Loop) -> dict[str, Any]:
    if conn.events_task is not None:
        raise RalphError(
            "connect_loop needs a connection of its own; this one is subscribed to events",
            code=ErrorCode.BAD_STATE,
        )
    record = conn.server.supervisor.resolve(params.loop)
    stream: Stream | None = None
    if record.socket_path:
        try:
            stream = await open_unix(Path(record.socket_path))
        except TransportError:
            stream = None
    if stream is None and not conn.server.dirs.loop_dir(record.loop_id).is_dir():
        raise UserError(
            f"loop {record.loop_id} is not running and its journal is gone",
            code=ErrorCode.LOOP_NOT_FOUND,
        )
    conn.target = _Target(record, stream)
    return {"loop_id": record.loop_id, "archived": stream is None}


@_methods.method("connect_http")
async def _connect_http(conn: DaemonConnection, params: _Loop) -> dict[str, Any]:
    if conn.events_task is not None:
        raise RalphError(
            "connect_http needs a connection of its own; this one is subscribed to events",
            code=ErrorCode.BAD_STATE,
        )
    record = conn.server.supervisor.resolve(params.loop)
    info = http_target(conn.server, record)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(info.host, info.port), timeout=10.0)
    except (OSError, TimeoutError) as exc:
        raise RalphError(
            f"loop {record.loop_id}: its agent server at {info.host}:{info.port} does not "
            f"answer ({exc}); it may be restarting, try again",
            code=ErrorCode.CONNECTION_LOST,
        ) from exc
    conn.target = _Target(record, AsyncioStream(reader, writer))
    return {"loop_id": record.loop_id}


register_sync_methods(_methods)
