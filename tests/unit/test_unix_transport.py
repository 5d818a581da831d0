"""The Unix socket transport, on real sockets in this test's RALPH_HOME: private folder and
socket modes, peer credentials, refusal of other uids, stale sockets, clean removal."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from tests.helpers import async_wait_until

from ralph_uv.errors import ErrorCode, TransportError
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import UnixServer, open_unix, peer_credentials, start_unix_server


async def _echo(stream: Stream) -> None:
    while data := await stream.read():
        stream.write(data.upper())
        await stream.drain()


async def _stop(server: UnixServer) -> None:
    server.close()
    server.close_clients()
    await asyncio.wait_for(server.wait_closed(), 5)


async def _read_line(stream: Stream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await asyncio.wait_for(stream.read(), 5)
        if not chunk:
            break
        data += chunk
    return data


async def test_server_makes_a_private_folder_and_socket(ralph_home: Path) -> None:
    """The server creates missing folders 0700 and its socket 0600, and bytes round-trip."""
    path = ralph_home / "run" / "loops" / "a.sock"
    server = await start_unix_server(path, _echo)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
        client = await open_unix(path)
        client.write(b"ping")
        await client.drain()
        assert await asyncio.wait_for(client.read(), 5) == b"PING"
        client.close()
    finally:
        await _stop(server)


async def test_existing_folder_is_tightened(ralph_home: Path) -> None:
    """ralph-uv's own socket folder, left group/world-accessible, is set back to 0700."""
    folder = ralph_home / "open"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    server = await start_unix_server(folder / "s.sock", _echo, own_folder=True)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        await _stop(server)


@pytest.mark.parametrize(("mode", "own"), [(0o1777, True), (0o755, False)])
async def test_a_shared_folder_is_never_changed(ralph_home: Path, mode: int, own: bool) -> None:
    """A socket in a shared folder (sticky like /tmp, or one given by the user) leaves the
    folder's mode alone; the socket itself is still 0600."""
    folder = ralph_home / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    server = await start_unix_server(folder / "s.sock", _echo, own_folder=own)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == mode
        assert stat.S_IMODE((folder / "s.sock").stat().st_mode) == 0o600
    finally:
        await _stop(server)


async def test_peer_credentials_name_the_connecting_process(ralph_home: Path) -> None:
    """SO_PEERCRED gives the client's pid and uid, on the server's side and in stream.extra."""
    seen: list[tuple[int, int, int]] = []

    async def record(stream: Stream) -> None:
        seen.append(stream.extra["peercred"])
        stream.write(b"ok")
        await stream.drain()

    path = ralph_home / "s.sock"
    server = await start_unix_server(path, record)
    try:
        client = await open_unix(path)
        assert await asyncio.wait_for(client.read(), 5) == b"ok"
        assert seen == [(os.getpid(), os.getuid(), os.getgid())]
        client.close()
        a, b = socket.socketpair(socket.AF_UNIX)
        with a, b:
            assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        await _stop(server)


async def test_a_uid_other_than_the_allowed_one_is_refused(ralph_home: Path) -> None:
    """A peer whose SO_PEERCRED uid is not the allowed one gets one -32010 error line naming
    its uid, then the connection closes; the handler never runs."""
    handled: list[Stream] = []

    async def handler(stream: Stream) -> None:
        handled.append(stream)

    path = ralph_home / "s.sock"
    other = os.getuid() + 1
    server = await start_unix_server(path, handler, allowed_uid=other)
    try:
        client = await open_unix(path)
        line = await _read_line(client)
        reply = json.loads(line)
        assert reply["id"] is None
        assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED == -32010
        assert f"uid {os.getuid()} may not use" in reply["error"]["message"]
        assert await asyncio.wait_for(client.read(), 5) == b""
        client.close()
        assert handled == []
    finally:
        await _stop(server)


async def test_stale_socket_is_replaced_and_live_one_is_not(ralph_home: Path) -> None:
    """A socket file nobody listens on (a dead server's) is replaced; one that answers makes
    the second server fail with a clear error instead of stealing the path."""
    path = ralph_home / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens
    server = await start_unix_server(path, _echo)
    try:
        with pytest.raises(TransportError, match="already listening"):
            await start_unix_server(path, _echo)
        client = await open_unix(path)
        client.write(b"x")
        assert await asyncio.wait_for(client.read(), 5) == b"X"
        client.close()
    finally:
        await _stop(server)


async def test_a_file_in_the_way_is_not_removed(ralph_home: Path) -> None:
    """A regular file at the socket path is left alone and reported."""
    path = ralph_home / "s.sock"
    path.write_text("precious")
    with pytest.raises(TransportError, match="not a socket"):
        await start_unix_server(path, _echo)
    assert path.read_text() == "precious"


async def test_close_removes_only_its_own_socket(ralph_home: Path) -> None:
    """Closing the server removes its socket file, but not a newer server's file at the same
    path."""
    path = ralph_home / "s.sock"
    first = await start_unix_server(path, _echo)
    await _stop(first)
    assert not path.exists()
    second = await start_unix_server(path, _echo)
    os.unlink(path)
    third = await start_unix_server(path, _echo)
    second.close()  # its file is gone; the third server's file must stay
    assert path.exists()
    await _stop(third)
    assert not path.exists()
    await _stop(second)


async def test_client_errors_say_what_is_wrong(ralph_home: Path) -> None:
    """Connecting to a missing socket, or to one nobody listens on, raises TransportError with
    a message saying which; a path too long for a Unix socket is refused up front."""
    with pytest.raises(TransportError, match="no socket at"):
        await open_unix(ralph_home / "missing.sock")
    path = ralph_home / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(TransportError, match="nothing listens"):
        await open_unix(path)
    with pytest.raises(TransportError, match="longer than"):
        await open_unix(ralph_home / ("x" * 120))
    with pytest.raises(TransportError, match="longer than"):
        await start_unix_server(ralph_home / ("x" * 120), _echo)


async def test_a_failing_handler_ends_only_its_connection(ralph_home: Path) -> None:
    """An exception in one connection's handler closes that connection; the server keeps
    accepting others."""
    calls = 0

    async def flaky(stream: Stream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        await _echo(stream)

    path = ralph_home / "s.sock"
    server = await start_unix_server(path, flaky)
    try:
        first = await open_unix(path)
        assert await asyncio.wait_for(first.read(), 5) == b""
        first.close()
        second = await open_unix(path)
        second.write(b"y")
        assert await asyncio.wait_for(second.read(), 5) == b"Y"
        second.close()
    finally:
        await _stop(server)


async def test_wait_closed_waits_for_handlers_and_close_clients_ends_them(
    ralph_home: Path,
) -> None:
    """wait_closed returns only once every connection handler has returned; close_clients
    ends the open connections so that it does; the connection count follows."""
    path = ralph_home / "s.sock"
    server = await start_unix_server(path, _echo)
    client = await open_unix(path)
    client.write(b"a")
    assert await asyncio.wait_for(client.read(), 5) == b"A"
    assert server.connection_count == 1
    server.close()
    waiting = asyncio.create_task(server.wait_closed())
    done, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not done  # the echo handler still serves its client
    server.close_clients()
    await asyncio.wait_for(waiting, 5)
    assert server.connection_count == 0
    assert await asyncio.wait_for(client.read(), 5) == b""
    client.close()


async def test_connections_past_the_maximum_are_refused(ralph_home: Path) -> None:
    """With max_connections reached, a new client reads an error line saying so and is
    disconnected; once a connection ends, new ones are served again."""
    path = ralph_home / "s.sock"
    server = await start_unix_server(path, _echo, max_connections=1)
    try:
        first = await open_unix(path)
        first.write(b"a")
        assert await asyncio.wait_for(first.read(), 5) == b"A"
        second = await open_unix(path)
        reply = json.loads(await _read_line(second))
        assert reply["error"]["code"] == ErrorCode.BAD_STATE
        assert "already serves 1 connections" in reply["error"]["message"]
        second.close()
        first.close()
        await async_wait_until(lambda: server.connection_count == 0, timeout=5)
        third = await open_unix(path)
        third.write(b"c")
        assert await asyncio.wait_for(third.read(), 5) == b"C"
        third.close()
    finally:
        await _stop(server)

