"""The client side of ralphd: connect (starting it on demand, as tmux starts its server) and
call the daemon methods with typed results.

:func:`connect_daemon` connects to this machine's ralphd; :class:`DaemonClient` works over any
stream opener, so a remote ralphd (over SSH, ...) is used the same way through
:meth:`DaemonClient.open`. :meth:`DaemonClient.connect_loop` gives a fresh stream on which ralphd
relays to the loop's runner, ready for a per-loop :class:`~ralph_uv.rpc.Endpoint`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ralph_uv.agents.detect import AgentInfo
from ralph_uv.config import paths
from ralph_uv.daemon.lifecycle import pid_file_path
from ralph_uv.daemon.relay import PrefixedStream
from ralph_uv.errors import RalphError, RemoteError, TransportError
from ralph_uv.eventlog import Event
from ralph_uv.protocol import Dispatcher, encode
from ralph_uv.registry import SessionRecord
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import open_unix

__all__ = [
    "PROTOCOL_VERSION",
    "DaemonClient",
    "Health",
    "HttpAuth",
    "StreamOpener",
    "connect_daemon",
    "open_loop_stream",
]

log = logging.getLogger("ralph_uv.client.daemon")

PROTOCOL_VERSION = "1.0"
StreamOpener = Callable[[], Awaitable[Stream]]
EventHandler = Callable[[Event], Awaitable[None] | None]
_START_TIMEOUT = 60.0
_CONNECT_RETRY = 5.0
_MAX_LINE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpAuth:
    """How to log in to a loop's agent HTTP server (HTTP basic auth). The password is kept out
    of ``repr``: it must not reach a log."""

    loop_id: str
    username: str
    password: str = field(repr=False)
    url: str = ""


@dataclass(frozen=True, slots=True)
class Health:
    """What ``get_health`` says about a ralphd and its machine (memory in bytes)."""

    version: str
    pid: int
    uptime: float
    host: str
    loops_active: int
    loops_total: int
    load: tuple[float, float, float]
    rss: int | None
    available: int | None
    listeners: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Health:
        """Read the reply; keys a newer ralphd adds are kept in ``raw``."""
        try:
            values = [float(x) for x in data.get("load", ())][:3]
            values += [0.0] * (3 - len(values))
            memory = data.get("memory") or {}
            return cls(
                version=str(data["version"]), pid=int(data["pid"]),
                uptime=float(data["uptime"]), host=str(data.get("host", "")),
                loops_active=int(data["loops_active"]), loops_total=int(data["loops_total"]),
                load=(values[0], values[1], values[2]),
                rss=memory.get("rss"), available=memory.get("available"),
                listeners=tuple(str(u) for u in data.get("listeners", ())), raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RalphError(f"ralphd sent a health report that cannot be read: {exc}") from exc


def _agent(data: Mapping[str, Any]) -> AgentInfo:
    path = data.get("path")
    return AgentInfo(
        name=str(data.get("name", "")), installed=bool(data.get("installed")),
        path=Path(path) if path else None, version=data.get("version"),
        install_hint=data.get("install_hint"), backend_kind=str(data.get("backend_kind", "")),
    )


def _record(value: Any) -> SessionRecord:
    if not isinstance(value, dict):
        raise RalphError(f"ralphd sent a loop record that is not an object: {value!r:.100}")
    return SessionRecord.from_dict(value)


class DaemonClient:
    """A connection to a ralphd, after ``hello``. Close it with :meth:`close` (or ``async
    with``)."""

    def __init__(self, endpoint: Endpoint, info: Mapping[str, Any], opener: StreamOpener,
                 client: str) -> None:
        self.endpoint = endpoint
        self.info = dict(info)
        self._opener = opener
        self._client = client
        self._on_event: EventHandler | None = None

    @classmethod
    async def open(cls, opener: StreamOpener, *, client: str = "ralph-uv") -> DaemonClient:
        """Connect with ``opener`` (any transport) and say hello."""
        methods: Dispatcher[DaemonClient] = Dispatcher()
        methods.add("event", _deliver_event, allow_extra=True)
        stream = await opener()
        endpoint = Endpoint(stream, methods)
        endpoint.start()
        try:
            info = await endpoint.call("hello", {"protocol": PROTOCOL_VERSION, "client": client})
        except BaseException:
            await endpoint.close()
            raise
        daemon = cls(endpoint, info if isinstance(info, dict) else {}, opener, client)
        endpoint.context = daemon
        return daemon

    async def close(self) -> None:
        await self.endpoint.close()

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        """The daemon's pid, as its hello said."""
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) else None

    # ----------------------------------------------------------------------------- methods

    async def start_loop(
        self,
        task_dir: str | Path | None = None,
        *,
        task_name: str | None = None,
        agent: str | None = None,
        model: str | None = None,
        max_iterations: int | None = None,
        base_branch: str | None = None,
        yolo: bool | None = None,
        pause: float | None = None,
        iteration_timeout: float | None = None,
        max_runtime: float | None = None,
        failover: list[str] | tuple[str, ...] | None = None,
        project: str | None = None,
        branch: str | None = None,
        task_path: str | None = None,
        sync: str | None = None,
        first_run_setup: bool | None = None,
        push_every: int | None = None,
        install_agents: bool | None = None,
        backend: str | None = None,
    ) -> SessionRecord:
        """Start a loop on the task in ``task_dir`` (an absolute path on ralphd's machine), or,
        with ``project``, ``branch`` and ``task_path`` (the task folder inside the repository),
        in a new checkout of that synced workspace (see :mod:`ralph_uv.client.sync`)."""
        params: dict[str, Any] = {} if task_dir is None else {"task_dir": str(task_dir)}
        for key, value in (
            ("project", project), ("branch", branch), ("task_path", task_path), ("sync", sync),
            ("first_run_setup", first_run_setup), ("push_every", push_every),
            ("install_agents", install_agents), ("backend", backend),
            ("task_name", task_name), ("agent", agent), ("model", model),
            ("max_iterations", max_iterations), ("base_branch", base_branch), ("yolo", yolo),
            ("pause", pause), ("iteration_timeout", iteration_timeout),
            ("max_runtime", max_runtime),
            ("failover", list(failover) if failover is not None else None),
        ):
            if value is not None:
                params[key] = value
        return _record(await self.endpoint.call("start_loop", params, timeout=120.0))

    async def list_loops(self, all: bool = False) -> list[SessionRecord]:
        """The loops on ralphd's machine that have not ended (every one with ``all``)."""
        reply = await self.endpoint.call("list_loops", {"all": all})
        loops = reply.get("loops") if isinstance(reply, dict) else None
        if not isinstance(loops, list):
            raise RalphError("ralphd sent a loop list that cannot be read")
        return [_record(item) for item in loops]

    async def stop_loop(self, loop: str, when: str = "after_iteration") -> SessionRecord:
        """Stop ``loop`` (a loop id or a task name) ``now`` or ``after_iteration``."""
        return _record(await self.endpoint.call("stop_loop", {"loop": loop, "when": str(when)}))

    async def checkpoint_loop(self, loop: str) -> SessionRecord:
        """Let ``loop``'s iteration finish, then stop it as ``checkpointed``."""
        return _record(await self.endpoint.call("checkpoint_loop", {"loop": loop}))

    async def get_health(self) -> Health:
        """ralphd's pid, uptime, loop counts, and the machine's load and memory."""
        reply = await self.endpoint.call("get_health")
        if not isinstance(reply, dict):
            raise RalphError("ralphd sent a health report that is not an object")
        return Health.from_dict(reply)

    async def get_agents(self) -> list[AgentInfo]:
        """The agents installed on ralphd's machine."""
        reply = await self.endpoint.call("get_agents", timeout=60.0)
        if not isinstance(reply, list):
            raise RalphError("ralphd sent an agent list that cannot be read")
        return [_agent(item) for item in reply if isinstance(item, dict)]

    async def subscribe_events(self, since: int | None, on_event: EventHandler) -> int:
        """Receive daemon events from seq ``since`` (``None``: new ones only) through
        ``on_event``, in order; returns the seq the next new event will get. One subscription
        per client: calling it again replaces the previous one."""
        self._on_event = on_event
        reply = await self.endpoint.call("subscribe_events", {"since": since})
        return int(reply.get("events_next", 0)) if isinstance(reply, dict) else 0

    async def connect_loop(self, loop: str) -> Stream:
        """A new connection on which ralphd relays to ``loop``'s runner (or serves its
        archive): start a per-loop :class:`~ralph_uv.rpc.Endpoint` on it with ``hello``."""
        stream = await self._opener()
        try:
            return await open_loop_stream(stream, loop, client=self._client)
        except BaseException:
            stream.abort()
            raise

    async def connect_http(self, loop: str) -> Stream:
        """A new connection on which ralphd relays raw bytes to ``loop``'s agent HTTP server
        (opencode's; for ``opencode attach``). The server wants the password
        :meth:`get_http_auth` gives."""
        stream = await self._opener()
        try:
            return await open_loop_stream(stream, loop, client=self._client,
                                          method="connect_http")
        except BaseException:
            stream.abort()
            raise

    async def get_http_auth(self, loop: str) -> HttpAuth:
        """The user name and password of ``loop``'s agent HTTP server."""
        reply = await self.endpoint.call("get_http_auth", {"loop": loop})
        if not isinstance(reply, dict) or not isinstance(reply.get("password"), str):
            raise RalphError("ralphd sent HTTP credentials that cannot be read")
        return HttpAuth(loop_id=str(reply.get("loop_id") or loop),
                        username=str(reply.get("username") or "opencode"),
                        password=reply["password"], url=str(reply.get("url") or ""))

    async def get_prd(self, loop: str) -> Any:
        """``loop``'s prd.json as ralphd reads it now (parsed JSON, not yet checked)."""
        return await self.endpoint.call("get_prd", {"loop": loop})

    async def get_progress(self, loop: str, limit: int | None = None) -> str:
        """The newest ``limit`` characters (default: as many as ralphd sends) of ``loop``'s
        progress log, archives first."""
        params: dict[str, Any] = {"loop": loop}
        if limit is not None:
            params["limit"] = limit
        reply = await self.endpoint.call("get_progress", params)
        if not isinstance(reply, dict) or not isinstance(reply.get("text"), str):
            raise RalphError("ralphd sent a progress log that cannot be read")
        return str(reply["text"])

    async def set_story_notes(self, loop: str, story: str, notes: str) -> None:
        """Write ``notes`` into story ``story`` of ``loop``'s prd.json (atomically, there)."""
        await self.endpoint.call("set_story_notes", {"loop": loop, "story": story,
                                                     "notes": notes})


async def _deliver_event(daemon: DaemonClient, params: Any) -> None:
    handler = daemon._on_event
    if handler is None or not isinstance(params, dict):
        return
    try:
        event = Event.from_dict(params)
    except ValueError:
        log.warning("ignored a daemon event that cannot be read: %r", params)
        return
    result = handler(event)
    if inspect.isawaitable(result):
        await result


# ---------------------------------------------------------------------- connect_loop by hand


async def _read_line(stream: Stream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        if len(buffer) > _MAX_LINE:
            raise TransportError(f"{stream.peer} sent a line longer than {_MAX_LINE} bytes")
        chunk = await stream.read()
        if not chunk:
            raise TransportError(f"{stream.peer} closed the connection")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def _request(stream: Stream, buffer: bytearray, request_id: int, method: str,
                   params: dict[str, Any]) -> Any:
    stream.write(encode({"jsonrpc": "2.0", "id": request_id, "method": method,
                         "params": params}))
    await stream.drain()
    while True:
        try:
            reply = json.loads(await _read_line(stream, buffer))
        except ValueError as exc:
            raise TransportError(f"{stream.peer} sent something that is not JSON") from exc
        if not isinstance(reply, dict) or "method" in reply:
            continue  # a notification: nothing is subscribed yet, so nothing to keep
        error = reply.get("error")
        if isinstance(error, dict):
            raise RemoteError(str(error.get("message", "error")),
                              code=int(error.get("code", -32603)), data=error.get("data"))
        if reply.get("id") == request_id:
            return reply.get("result")


async def open_loop_stream(stream: Stream, loop: str, *, client: str = "ralph-uv",
                           method: str = "connect_loop") -> Stream:
    """Say hello to ralphd on ``stream`` and ask it for ``loop`` (``method``: ``connect_loop``,
    or ``connect_http`` for its agent's HTTP server); the same stream, now relayed there (any
    bytes read ahead are kept)."""
    buffer = bytearray()
    async with asyncio.timeout(30.0):
        await _request(stream, buffer, 1, "hello",
                       {"protocol": PROTOCOL_VERSION, "client": client})
        await _request(stream, buffer, 2, method, {"loop": loop})
    return PrefixedStream(stream, bytes(buffer)) if buffer else stream


# ------------------------------------------------------------------------------ autostart


async def _start_ralphd() -> int | None:
    """Run ``ralphd start``; the new daemon's pid, or ``None`` if another one won the race."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ralph_uv.daemon", "start",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(_START_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TransportError(f"ralphd did not start within {_START_TIMEOUT:g} s") from None
    if process.returncode == 0:
        try:
            return int(pid_file_path().read_text().strip())
        except (OSError, ValueError):
            return None
    text = (err or out).decode("utf-8", errors="replace").strip()
    if "already running" in text:
        return None
    raise TransportError(f"could not start ralphd: {text or f'exit status {process.returncode}'}")


async def connect_daemon(
    *,
    autostart: bool = True,
    client: str = "ralph-uv",
    on_notice: Callable[[str], None] | None = None,
) -> DaemonClient:
    """Connect to this machine's ralphd (``paths().daemon_socket``) and say hello.

    When none answers and ``autostart`` is true, ``ralphd start`` runs in the background and
    ``on_notice`` hears ``started ralphd (pid N)`` once. Raises
    :class:`~ralph_uv.errors.TransportError` when no ralphd can be reached.
    """
    socket_path = paths().daemon_socket

    async def opener() -> Stream:
        return await open_unix(socket_path)

    try:
        return await DaemonClient.open(opener, client=client)
    except TransportError as exc:
        if not autostart:
            raise TransportError(
                f"ralphd is not running ({exc.message}); start it with `ralphd start`"
            ) from exc
    pid = await _start_ralphd()
    if pid is not None and on_notice is not None:
        on_notice(f"started ralphd (pid {pid})")
    deadline = asyncio.get_running_loop().time() + _CONNECT_RETRY
    while True:
        try:
            return await DaemonClient.open(opener, client=client)
        except TransportError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
