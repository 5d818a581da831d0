"""The OpenZiti glue that does not need the SDK: socket hand-off to asyncio, blocking calls kept
off the event loop, the accept loop, error mapping, identity-file checks, and the message when
the SDK is missing.

Real ``socket.socketpair()`` ends stand in for the sockets the SDK returns (its sockets are
ordinary kernel sockets bridged by the SDK's C library); a blocking ``accept()`` callable
feeding them stands in for a bound service. The last test runs against a real overlay only
when RALPH_ZITI_IDENTITY and RALPH_ZITI_SERVICE point at one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until
from tests.integration.transport_helpers import HELLO, EchoService, hello_and_echo

from ralph_uv.errors import ErrorCode, RemoteError, TransportError, UserError
from ralph_uv.rpc import Endpoint
from ralph_uv.transports import ConnectOptions, ListenOptions, connect, generate_token, listen
from ralph_uv.transports.auth import TokenStream
from ralph_uv.transports.ziti import (
    INSTALL_HINT,
    ZitiListener,
    adopt_socket,
    check_identity_file,
    default_service_name,
    import_sdk,
    run_blocking,
    sdk_error,
)

# Read at import: the autouse RALPH_HOME fixture clears RALPH_* variables for each test.
ZITI_IDENTITY = os.environ.get("RALPH_ZITI_IDENTITY")
ZITI_SERVICE = os.environ.get("RALPH_ZITI_SERVICE")
TOKEN = generate_token()


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    path = tmp_path / "id.json"
    path.write_text(json.dumps({"ztAPI": "https://ctrl.example.invalid:1280",
                                "id": {"cert": "x", "key": "y", "ca": "z"}}))
    return path


class _FakeServer:
    """A queue of accepted sockets behind a blocking ``accept()``, as a bound service gives."""

    def __init__(self) -> None:
        self.pending: queue.Queue[socket.socket | None] = queue.Queue()
        self.closed = threading.Event()

    def accept(self) -> tuple[socket.socket, Any]:
        sock = self.pending.get()
        if sock is None:
            raise OSError(9, "Bad file descriptor")  # what accept on a closed socket raises
        return sock, ("ziti-peer", 0)

    def close(self) -> None:
        self.closed.set()
        self.pending.put(None)

    async def dial(self) -> TokenStream:
        """A client end whose other end is waiting in accept."""
        ours, theirs = socket.socketpair()
        self.pending.put(theirs)
        return TokenStream(await adopt_socket(ours, peer="test-client"), TOKEN)


@pytest.fixture
async def fake_listener() -> Any:
    server = _FakeServer()
    service = EchoService()
    listener = ZitiListener("ziti://test", server.accept, server.close, service.serve,
                            token=TOKEN, auth_timeout=5)
    listener.start()
    yield server, service, listener
    listener.close()
    listener.close_clients()
    await asyncio.wait_for(listener.wait_closed(), 10)


def test_missing_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                          identity: Path) -> None:
    """Without the openziti package, ziti:// is a UserError naming the extra to install."""
    monkeypatch.setitem(sys.modules, "openziti", None)  # makes `import openziti` fail
    with pytest.raises(UserError) as caught:
        import_sdk()
    assert INSTALL_HINT in caught.value.message


async def test_connect_without_sdk(monkeypatch: pytest.MonkeyPatch, identity: Path) -> None:
    """connect() on a ziti URL reports the missing SDK before touching the identity."""
    monkeypatch.setitem(sys.modules, "openziti", None)
    with pytest.raises(UserError, match=r"ralph-uv\[ziti\]"):
        await connect(f"ziti://svc?identity={identity}")


async def test_listener_needs_a_token(identity: Path) -> None:
    """A ziti listener without a token is refused before the SDK is used."""
    with pytest.raises(UserError, match="without a token"):
        await listen(f"ziti://svc?identity={identity}", EchoService().serve,
                     options=ListenOptions())


def test_identity_file_checks(tmp_path: Path, identity: Path) -> None:
    """A missing file, a binary file, non-JSON, or JSON that is not an identity is a UserError
    saying which; an enrolled-looking identity is accepted."""
    assert check_identity_file(identity) == identity
    with pytest.raises(UserError, match="does not exist"):
        check_identity_file(tmp_path / "nope.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not text"):
        check_identity_file(binary)
    jwt = tmp_path / "token.jwt"
    jwt.write_text("eyJhbGciOi.not-json")
    with pytest.raises(UserError, match="not JSON"):
        check_identity_file(jwt)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="ziti edge enroll"):
        check_identity_file(other)


def test_sdk_errors_are_translated() -> None:
    """The SDK's OSError, bare Exception(code, message) and ValueError become our errors with
    its words."""
    error = sdk_error(OSError(111, "Connection refused"), "dialing 'svc'")
    assert isinstance(error, TransportError)
    assert error.message == "OpenZiti: dialing 'svc' failed: Connection refused"
    error = sdk_error(Exception(-24, "service not found"), "dialing 'svc'")
    assert isinstance(error, TransportError)
    assert "service not found" in error.message
    assert "-24" not in error.message
    assert isinstance(sdk_error(ValueError("/x is not a valid path"), "loading"), UserError)


def test_default_service_name() -> None:
    """The default service is ralph-control-<short host name>."""
    assert default_service_name() == f"ralph-control-{socket.gethostname().split('.')[0]}"


async def test_adopted_socket_carries_bytes_both_ways() -> None:
    """A connected socket is detached from its owner and served by asyncio: bytes flow both
    ways and the original object no longer holds the descriptor."""
    ours, theirs = socket.socketpair()
    stream = await adopt_socket(ours, peer="ziti:test")
    assert ours.fileno() == -1
    assert stream.peer == "ziti:test"
    theirs.sendall(b"from the sdk side")
    assert await asyncio.wait_for(stream.read(), 5) == b"from the sdk side"
    stream.write(b"from asyncio")
    await stream.drain()
    assert await asyncio.to_thread(theirs.recv, 100) == b"from asyncio"
    stream.close()
    assert await asyncio.to_thread(theirs.recv, 100) == b""
    theirs.close()


async def test_run_blocking_keeps_the_loop_free() -> None:
    """A blocking call runs in a thread while the loop keeps working; its result comes back,
    and its exception is translated."""
    release = threading.Event()
    ticks = 0

    def blocking() -> str:
        release.wait(5)
        return "done"

    task = asyncio.create_task(run_blocking(blocking, timeout=5, what="test call"))
    while ticks < 5:
        await asyncio.sleep(0.01)
        ticks += 1
    assert not task.done()
    release.set()
    assert await task == "done"

    def failing() -> None:
        raise Exception(-17, "no such service")

    with pytest.raises(TransportError, match="test call failed: no such service"):
        await run_blocking(failing, timeout=5, what="test call")


async def test_late_result_is_discarded() -> None:
    """A call that outlives its timeout raises TransportError; the socket it returns later is
    closed, not leaked."""
    release = threading.Event()
    ours, theirs = socket.socketpair()

    def slow_dial() -> socket.socket:
        release.wait(5)
        return ours

    with pytest.raises(TransportError, match="did not finish within"):
        await run_blocking(slow_dial, timeout=0.1, what="dialing",
                           discard=lambda sock: sock.close())
    release.set()
    await async_wait_until(lambda: ours.fileno() == -1, timeout=5)
    theirs.close()


async def test_accept_loop_admits_token_holders(fake_listener: Any) -> None:
    """Accepted sockets are adopted and gated: a client with the token reaches the handler
    (marked authenticated), several at once."""
    server, service, _ = fake_listener
    streams = [await server.dial() for _ in range(3)]
    replies = await asyncio.gather(*(hello_and_echo(s, i) for i, s in enumerate(streams)))
    assert [echoed for _, echoed in replies] == [0, 1, 2]
    assert all(hello["authenticated"] for hello, _ in replies)
    assert len(service.connections) == 3
    assert service.connections[0].stream.peer == "ziti:ziti-peer"


async def test_accept_loop_refuses_wrong_token(fake_listener: Any) -> None:
    """A client with the wrong token gets -32010 and never reaches the handler."""
    server, service, _ = fake_listener
    ours, theirs = socket.socketpair()
    server.pending.put(theirs)
    stream = TokenStream(await adopt_socket(ours, peer="test-client"), generate_token())
    async with Endpoint(stream) as endpoint:
        with pytest.raises(RemoteError) as caught:
            await endpoint.call("hello", HELLO, timeout=10)
    assert caught.value.code == ErrorCode.UNAUTHORIZED
    assert service.connections == []


async def test_accept_errors_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    """An accept that fails (an SDK error) is logged and retried; the listener keeps serving;
    close() makes the accept thread end."""
    caplog.set_level(logging.WARNING)
    server = _FakeServer()
    failures = iter([Exception(-5, "controller unavailable")])

    def flaky_accept() -> tuple[socket.socket, Any]:
        for failure in failures:
            raise failure
        return server.accept()

    service = EchoService()
    listener = ZitiListener("ziti://flaky", flaky_accept, server.close, service.serve,
                            token=TOKEN)
    listener.start()
    try:
        _, echoed = await hello_and_echo(await server.dial(), "still here")
        assert echoed == "still here"
        assert "controller unavailable" in caplog.text
    finally:
        listener.close()
        await asyncio.wait_for(listener.wait_closed(), 10)
    assert server.closed.is_set()
    assert not listener._thread.is_alive()


@pytest.fixture
def real_overlay() -> tuple[str, str]:
    if not (ZITI_IDENTITY and ZITI_SERVICE):
        pytest.skip("needs a real OpenZiti overlay: set RALPH_ZITI_IDENTITY (an identity that "
                    "may bind and dial) and RALPH_ZITI_SERVICE")
    return ZITI_IDENTITY, ZITI_SERVICE


@pytest.mark.ziti
async def test_real_overlay_round_trip(real_overlay: tuple[str, str]) -> None:
    """Against a real overlay: bind the service, dial it, and exchange JSON-RPC with a token."""
    identity, service_name = real_overlay
    service = EchoService()
    url = f"ziti://{service_name}?identity={identity}"
    listener = await listen(url, service.serve, options=ListenOptions(token=TOKEN))
    try:
        stream = await connect(url, options=ConnectOptions(token=TOKEN, timeout=60))
        _, echoed = await hello_and_echo(stream, "over the overlay")
        assert echoed == "over the overlay"
    finally:
        listener.close()
        listener.close_clients()
        await listener.wait_closed()
