"""A local port for a loop's agent HTTP server, and ``opencode attach`` through it.

An opencode loop's agent is ``opencode serve`` on the loopback of the loop's machine, which may
be another machine. :class:`HttpRelay` listens on 127.0.0.1 here (a port the OS picks); every
TCP connection it accepts gets a fresh connection to ralphd over the same transport as every
other call (Unix socket, SSH, OpenZiti, TCP/TLS), asks ``connect_http {loop}`` on it and relays
bytes both ways, so HTTP clients here (``opencode attach``, curl) talk to the remote server as
if it were local. The listener is up before :meth:`HttpRelay.start` returns.

:func:`attach_opencode` runs the real ``opencode attach http://127.0.0.1:PORT`` in this
terminal through such a relay. The server's password, from ``get_http_auth``, reaches it only
through its environment (``OPENCODE_SERVER_PASSWORD``, which ``opencode attach`` reads when
``--password`` is not given): a command-line flag would show it to every user of the machine in
``ps``, while a process's environment is readable by its owner only. It is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ralph_uv.client.daemon import DaemonClient, HttpAuth
from ralph_uv.errors import RalphError, TransportError, UserError
from ralph_uv.transports.base import Stream
from ralph_uv.transports.pump import half_close, pump

__all__ = [
    "SESSION_WAIT",
    "HttpRelay",
    "attach_opencode",
    "latest_session",
    "opencode_attach_argv",
    "opencode_attach_env",
    "wait_for_session",
]

log = logging.getLogger("ralph_uv.client.http_proxy")

_READ_SIZE = 64 * 1024
_HALF_CLOSE_GRACE = 10.0  # after the local side stops sending, how long answers may still come
_INSTALL_HINT = "npm install -g opencode-ai"
# How long `attach` waits for a just-started loop's first opencode session before opening the
# TUI on its home screen instead.
SESSION_WAIT = 30.0

Connect = Callable[[], Awaitable[Stream]]


class HttpRelay:
    """A listener on ``127.0.0.1:0`` relaying each connection through a fresh ``connect()``
    stream (usually ``lambda: daemon.connect_http(loop)``). Use ``async with`` or
    :meth:`start` / :meth:`close`."""

    def __init__(self, connect: Connect, *, host: str = "127.0.0.1") -> None:
        self._connect = connect
        self._host = host
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.accepted = 0
        self.failed = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, once started."""
        return f"http://{self._host}:{self.port}"

    @property
    def active(self) -> int:
        """Connections being relayed now."""
        return len(self._tasks)

    async def start(self) -> HttpRelay:
        """Listen; the port is known (and accepting) when this returns."""
        try:
            self._server = await asyncio.start_server(self._accept, self._host, 0)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self._host}: {exc.strerror or exc}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("relaying %s to the loop's agent server", self.url)
        return self

    async def close(self) -> None:
        """Stop listening and end every relayed connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HttpRelay:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels these tasks, and asyncio's server reports a cancelled
            # connection task as an error: end quietly instead.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            remote = await self._connect()
        except RalphError as exc:
            self.failed += 1
            log.warning("cannot reach the loop's agent server: %s", exc.message)
            return
        up = asyncio.create_task(_to_remote(reader, remote))
        down = asyncio.create_task(_to_local(remote, writer))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            half_closed = up.done() and not up.cancelled() and up.exception() is None \
                and up.result()
            if half_closed and not down.done():
                # The client stopped sending and the server was told; answers may still come.
                await asyncio.wait({down}, timeout=_HALF_CLOSE_GRACE)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            remote.abort()


async def _to_remote(reader: asyncio.StreamReader, remote: Stream) -> bool:
    """Copy until the client stops sending; whether the end could be passed on (half-close)."""
    await pump(reader, remote, chunk=_READ_SIZE)
    return half_close(remote)


async def _to_local(remote: Stream, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(RalphError, OSError):
        await pump(remote, writer, chunk=_READ_SIZE)


# ------------------------------------------------------------------------- opencode attach


def opencode_attach_argv(binary: str | Path, url: str, session: str | None = None,
                         extra: Sequence[str] = ()) -> list[str]:
    """``opencode attach URL [--session ID]``: no password on it (see the module docstring)."""
    argv = [str(binary), "attach", url]
    if session:
        argv += ["--session", session]
    return [*argv, *extra]


def opencode_attach_env(auth: HttpAuth, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment) with the server's user name and password."""
    env = dict(os.environ if base is None else base)
    env["OPENCODE_SERVER_USERNAME"] = auth.username
    env["OPENCODE_SERVER_PASSWORD"] = auth.password
    return env


async def latest_session(url: str, auth: HttpAuth, *, limit: float = 15.0) -> str | None:
    """The id of the most recently updated session on the opencode server at ``url`` (the
    loop's current iteration), or ``None`` when it has none yet; ``limit`` bounds the request
    in seconds. A server that cannot be reached, refuses the password or answers something
    else raises :class:`RalphError`."""
    import aiohttp

    from ralph_uv.agents.opencode_server import basic_auth

    headers = {"Authorization": basic_auth(auth.password, auth.username)}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit),
                                         headers=headers) as http, \
                http.get(f"{url}/session") as response:
            if response.status == 401:
                raise RalphError(f"loop {auth.loop_id}'s opencode server refused its password "
                                 "(401); has the loop restarted its server? Try again")
            if response.status != 200:
                raise RalphError(f"loop {auth.loop_id}'s opencode server answered GET /session "
                                 f"with HTTP {response.status}")
            sessions: Any = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransportError(f"loop {auth.loop_id}'s opencode server cannot be reached: "
                             f"{exc or type(exc).__name__}") from exc
    except ValueError as exc:
        raise RalphError(f"loop {auth.loop_id}'s opencode server sent sessions that are not "
                         f"JSON: {exc}") from exc
    if not isinstance(sessions, list):
        raise RalphError(f"loop {auth.loop_id}'s opencode server sent sessions that are not a "
                         "list")

    def updated(item: Any) -> float:
        times = item.get("time") if isinstance(item, dict) else None
        value = times.get("updated", times.get("created", 0)) if isinstance(times, dict) else 0
        return float(value) if isinstance(value, int | float) else 0.0

    found = [s for s in sessions if isinstance(s, dict) and isinstance(s.get("id"), str)]
    return str(max(found, key=updated)["id"]) if found else None


async def wait_for_session(
    url: str,
    auth: HttpAuth,
    *,
    timeout: float = SESSION_WAIT,  # noqa: ASYNC109 - a polling deadline, not a cancellation
    interval: float = 0.25,
    on_wait: Callable[[], None] | None = None,
) -> str | None:
    """The loop's current session (see :func:`latest_session`), waiting up to ``timeout``
    seconds for the runner to create one: a loop that has just started has its opencode
    server up before its first iteration's session. ``on_wait`` is called once, when the
    first look finds none. ``None`` if none appeared in time; a server that fails (see
    :func:`latest_session`) raises at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    told = False
    while True:
        left = max(0.5, deadline - loop.time())
        found = await latest_session(url, auth, limit=min(15.0, left))
        if found is not None or loop.time() >= deadline:
            return found
        if not told and on_wait is not None:
            on_wait()
        told = True
        await asyncio.sleep(interval)


async def _run_in_terminal(argv: list[str], env: Mapping[str, str]) -> int:
    """Run ``argv`` on this terminal until it exits; its exit status. Ctrl-C belongs to it."""
    try:
        process = await asyncio.create_subprocess_exec(*argv, env=dict(env))
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    loop = asyncio.get_running_loop()

    def forward(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)

    loop.add_signal_handler(signal.SIGINT, lambda: None)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    try:
        return await process.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if process.returncode is None:
            process.kill()
            await process.wait()


async def attach_opencode(
    daemon: DaemonClient,
    loop: str,
    *,
    binary: str | Path | None = None,
    session: str | None = None,
    extra: Sequence[str] = (),
    on_notice: Callable[[str], None] | None = None,
) -> int:
    """Run ``opencode attach`` in this terminal on ``loop``'s opencode server (through
    ``daemon``, local or remote) until the person leaves it; its exit status.

    ``session`` picks the session shown first (default: the loop's current one).
    """
    if binary is None:
        from ralph_uv.agents.detect import find_binary

        found = find_binary("opencode")
        if found is None:
            raise UserError(
                f"opencode is not installed here; install it ({_INSTALL_HINT}) to attach to "
                f"opencode loops, or follow the loop with `ralph-uv logs -f {loop}`"
            )
        binary = found
    auth = await daemon.get_http_auth(loop)
    async with HttpRelay(lambda: daemon.connect_http(auth.loop_id)) as relay:
        if session is None:
            session = await wait_for_session(
                relay.url, auth,
                on_wait=None if on_notice is None else lambda: on_notice(
                    f"waiting for loop {auth.loop_id}'s opencode session to start…"))
        if on_notice is not None:
            on_notice(f"opencode attach to loop {auth.loop_id} through {relay.url}")
        argv = opencode_attach_argv(binary, relay.url, session, extra)
        return await _run_in_terminal(argv, opencode_attach_env(auth))
