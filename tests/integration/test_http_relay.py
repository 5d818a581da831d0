"""The local HTTP relay to a loop's agent server (client/http_proxy.py) through a real ralphd:
here over its Unix socket, and on a "remote" machine over a real sshd. The loop's agent server
is an aiohttp server on loopback standing in for ``opencode serve`` (the real one is exercised
in tests/e2e/test_opencode_attach.py); the loop publishes it in http.json as a runner does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_home_fixture,
    sshd_fixture,
)
from tests.helpers import async_wait_until
from tests.integration.daemon_harness import AGENTS, Ralphd, kill_runners, make_task, write_config

from ralph_uv.agents.opencode_server import basic_auth
from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.client.http_proxy import HttpRelay, latest_session
from ralph_uv.config import Paths, paths
from ralph_uv.daemon.supervisor import process_alive
from ralph_uv.errors import ErrorCode, RalphError, RemoteError
from ralph_uv.registry import Registry
from ralph_uv.runner.http_info import HttpInfo, remove_http_info, write_http_info
from ralph_uv.transports import close_connections, connect

pytestmark = pytest.mark.timeout(120)

PASSWORD = "relay-test-password"


class AgentServer:
    """An HTTP server with basic auth, like opencode's: echoes requests, streams events."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.peers: set[int] = set()

    async def start(self) -> AgentServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/session", self._sessions)
        app.router.add_get("/event", self._events)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _authorized(self, request: web.Request) -> bool:
        expected = basic_auth(PASSWORD)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(peer[1])
        return request.headers.get("Authorization") == expected

    async def _echo(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})

    async def _sessions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        return web.json_response([
            {"id": "ses_old", "title": "Ralph iteration 1", "time": {"created": 1, "updated": 5}},
            {"id": "ses_new", "title": "Ralph iteration 2", "time": {"created": 6, "updated": 9}},
        ])

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(3):
            await response.write(f"data: event {number}\n\n".encode())
            await asyncio.sleep(0.1)
        return response

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def agent_server() -> AsyncIterator[AgentServer]:
    server = await AgentServer().start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
async def _close_pool() -> AsyncIterator[None]:
    yield
    await close_connections()


@pytest.fixture
def local_ralphd(tmp_path: Path) -> Iterator[Ralphd]:
    write_config()
    daemon = Ralphd().start()
    yield daemon
    daemon.stop()
    kill_runners()


async def start_serving_loop(daemon: DaemonClient, task: Path, dirs: Paths,
                             server: AgentServer) -> str:
    """A running loop (an agent that sleeps) whose http.json names ``server``."""
    record = await daemon.start_loop(task, agent="sleep")

    def running() -> bool:
        with Registry.open(dirs.registry) as registry:
            row = registry.get(record.loop_id)
        return row is not None and row.status.value == "running"

    await async_wait_until(running, timeout=30)
    write_http_info(dirs.loop_dir(record.loop_id), HttpInfo(server.url, PASSWORD))
    return record.loop_id


async def exercise_relay(daemon: DaemonClient, loop_id: str, server: AgentServer) -> None:
    """What both transports must do: credentials, concurrent bodies intact, streaming, the
    session lookup, a clean close."""
    auth = await daemon.get_http_auth(loop_id)
    assert (auth.loop_id, auth.username, auth.password) == (loop_id, "opencode", PASSWORD)
    assert PASSWORD not in repr(auth)
    relay = await HttpRelay(lambda: daemon.connect_http(loop_id)).start()
    try:
        assert relay.port > 0
        # Ready when start() returns: a plain connection is accepted at once.
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.close()
        bodies = [os.urandom(1024 * 1024 + n) for n in range(4)]
        headers = {"Authorization": basic_auth(auth.password, auth.username)}
        connector = aiohttp.TCPConnector(limit=4, force_close=True)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as http:

            async def post(body: bytes) -> dict[str, object]:
                async with http.post(f"{relay.url}/echo?x=1", data=io.BytesIO(body)) as response:
                    assert response.status == 200
                    result: dict[str, object] = await response.json()
                    return result

            answers = await asyncio.gather(*(post(body) for body in bodies))
            for body, answer in zip(bodies, answers, strict=True):
                assert answer == {"method": "POST", "path": "/echo?x=1", "size": len(body),
                                  "sha256": hashlib.sha256(body).hexdigest()}
            async with http.get(f"{relay.url}/event") as response:
                events = (await response.read()).decode()
            assert events == "".join(f"data: event {n}\n\n" for n in range(3))
        async with aiohttp.ClientSession() as anonymous, \
                anonymous.get(f"{relay.url}/echo") as response:
            assert response.status == 401
        assert await latest_session(relay.url, auth) == "ses_new"
        assert relay.accepted >= 8
        assert len(server.peers) >= 4  # every client connection was its own upstream one
    finally:
        await relay.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", relay.port)


async def test_relay_through_local_ralphd(local_ralphd: Ralphd, agent_server: AgentServer,
                                          tmp_path: Path) -> None:
    """Through this machine's ralphd: get_http_auth gives the password (kept out of repr); the
    relay is listening when start() returns; concurrent 1 MiB POSTs arrive intact and in
    separate upstream connections; a streamed response arrives whole; requests without the
    password get the server's 401; latest_session picks the most recently updated session;
    after close() the port is closed."""
    async with await connect_daemon(autostart=False, client="test") as daemon:
        loop_id = await start_serving_loop(daemon, make_task(tmp_path), paths(), agent_server)
        await exercise_relay(daemon, loop_id, agent_server)


async def test_relay_when_the_loop_has_no_server(local_ralphd: Ralphd,
                                                 agent_server: AgentServer,
                                                 tmp_path: Path) -> None:
    """A loop without an agent server (http.json gone): get_http_auth is BAD_STATE, and a
    connection through the relay is closed at once without an answer, counted as failed."""
    async with await connect_daemon(autostart=False, client="test") as daemon:
        loop_id = await start_serving_loop(daemon, make_task(tmp_path), paths(), agent_server)
        remove_http_info(paths().loop_dir(loop_id))
        with pytest.raises(RemoteError) as caught:
            await daemon.get_http_auth(loop_id)
        assert caught.value.wire_code == ErrorCode.BAD_STATE
        async with HttpRelay(lambda: daemon.connect_http(loop_id)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 15) == b""
            writer.close()
            assert relay.failed == 1


@pytest.mark.slow
async def test_relay_to_a_remote_loop_over_ssh(sshd: SSHServer, agent_server: AgentServer,
                                               tmp_path: Path) -> None:
    """The same relay to a loop of the ralphd on the far side of a real sshd (started there
    on demand): every relayed connection is a fresh connect_http stream over the pooled SSH
    connection, and the HTTP traffic arrives intact."""
    remote = paths({"RALPH_HOME": str(sshd.remote_home)})
    remote.config.mkdir(parents=True, exist_ok=True)
    agents = "\n".join(f"[agents.{name}]\ncommand = {json.dumps(command)}"
                       for name, command in AGENTS.items())
    remote.config_file.write_text(f"pause = 0\nterminate_grace = 1.0\n{agents}\n")
    options = sshd.options()
    daemon = await DaemonClient.open(lambda: connect(sshd.url, options=options))
    try:
        loop_id = await start_serving_loop(daemon, make_task(tmp_path), remote, agent_server)
        await exercise_relay(daemon, loop_id, agent_server)
    finally:
        await daemon.close()
        with Registry.open(remote.registry) as registry:
            pids = [r.pid for r in registry.find() if r.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await async_wait_until(lambda: not any(process_alive(p) for p in pids), timeout=10)


async def test_wait_for_session_waits_for_the_first_iteration() -> None:
    """A loop whose opencode server is up before its first session: wait_for_session keeps
    asking GET /session (telling the caller once that it waits) and returns the session as
    soon as the server lists one. A refused password is an error at once, not a wait; a
    server that never lists a session gives None when the time is up."""
    from ralph_uv.client.daemon import HttpAuth
    from ralph_uv.client.http_proxy import wait_for_session

    asked = 0

    async def sessions(request: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        if request.headers.get("Authorization") != basic_auth(PASSWORD):
            return web.Response(status=401)
        listed = [] if asked < 4 else [{"id": "ses_first", "time": {"created": 1}}]
        return web.json_response(listed)

    async def no_sessions(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/session", sessions)
    app.router.add_get("/never/session", no_sessions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    auth = HttpAuth(loop_id="l1", username="opencode", password=PASSWORD)
    waits: list[str] = []
    try:
        found = await wait_for_session(url, auth, timeout=10, interval=0.05,
                                       on_wait=lambda: waits.append("waiting"))
        assert (found, asked, waits) == ("ses_first", 4, ["waiting"])
        wrong = HttpAuth(loop_id="l1", username="opencode", password="not-it")
        started = time.monotonic()
        with pytest.raises(RalphError, match="refused its password"):
            await wait_for_session(url, wrong, timeout=10, interval=0.05)
        assert time.monotonic() - started < 5
        assert await wait_for_session(f"{url}/never", auth, timeout=0.3,
                                      interval=0.05) is None
    finally:
        await runner.cleanup()
