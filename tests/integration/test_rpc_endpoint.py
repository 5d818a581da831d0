"""The asyncio JSON-RPC endpoint, over an in-memory pair and over a real Unix socket."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until

from ralph_uv.errors import ErrorCode, RalphError, RemoteError, TransportError
from ralph_uv.protocol import Decoded, Dispatcher, FrameDecoder, Notification, encode
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import AsyncioStream, MemoryStream, Stream, memory_pair

BUFFER = 64 * 1024


@dataclass
class Conn:
    """Per-connection state, as a server keeps it."""

    name: str
    endpoint: Endpoint | None = None
    events: list[int] = field(default_factory=list)
    waiting: int = 0
    cancelled: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class Echo:
    value: Any


@dataclass(frozen=True, slots=True)
class Event:
    seq: int


@dataclass(frozen=True, slots=True)
class Size:
    size: int


methods: Dispatcher[Conn] = Dispatcher()


@methods.method("whoami")
async def whoami(conn: Conn) -> str:
    return conn.name


@methods.method("echo")
async def echo(conn: Conn, params: Echo) -> Any:
    return params.value


@methods.method("wait_then_echo")
async def wait_then_echo(conn: Conn, params: Echo) -> Any:
    conn.waiting += 1
    try:
        await conn.release.wait()
    except asyncio.CancelledError:
        conn.cancelled += 1
        raise
    return params.value


@methods.method("ask_back")
async def ask_back(conn: Conn) -> Any:
    assert conn.endpoint is not None
    return {"you_are": await conn.endpoint.call("whoami")}


@methods.method("event")
async def event(conn: Conn, params: Event) -> None:
    if params.seq % 3 == 0:
        await asyncio.sleep(0)  # a handler that yields must still see events in order
    conn.events.append(params.seq)


@methods.method("record_inline", inline=True)
async def record_inline(conn: Conn, params: Event) -> int:
    for _ in range(params.seq % 4):
        await asyncio.sleep(0)  # as a task, a later call would overtake this one
    conn.events.append(params.seq)
    return len(conn.events)


@methods.method("fail")
async def fail(conn: Conn) -> None:
    raise RalphError("loop 42 not found; run 'ralph-uv list'", code=ErrorCode.LOOP_NOT_FOUND)


@methods.method("big_result")
async def big_result(conn: Conn, params: Size) -> str:
    return "x" * params.size


@methods.method("bye")
async def bye(conn: Conn) -> None:
    assert conn.endpoint is not None
    await conn.endpoint.close()


@pytest.fixture(autouse=True)
async def clean_loop() -> AsyncIterator[list[dict[str, Any]]]:
    """Fails a test that leaves tasks behind or makes the event loop report an error
    (a destroyed pending task, an unretrieved exception)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    me = asyncio.current_task()
    await async_wait_until(lambda: not [t for t in asyncio.all_tasks() if t is not me], 5)
    gc.collect()
    assert errors == []
    loop.set_exception_handler(None)


@pytest.fixture(params=["memory", "unix"])
async def streams(
    request: pytest.FixtureRequest, ralph_home: Path
) -> AsyncIterator[tuple[Stream, Stream]]:
    """A connected (client, server) pair of streams, in memory or over a Unix socket."""
    if request.param == "memory":
        client, server = memory_pair(BUFFER)
        yield client, server
        client.abort()
        server.abort()
        return
    accepted: asyncio.Future[AsyncioStream] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(AsyncioStream(reader, writer, write_buffer_limit=BUFFER))

    listener = await asyncio.start_unix_server(on_connect, ralph_home / "t.sock")
    reader, writer = await asyncio.open_unix_connection(ralph_home / "t.sock")
    client_stream = AsyncioStream(reader, writer, write_buffer_limit=BUFFER)
    server_stream = await accepted
    assert server_stream.peer.startswith("unix:")
    yield client_stream, server_stream
    for stream in (client_stream, server_stream):
        stream.abort()
        await stream.wait_closed()
    listener.close()
    await listener.wait_closed()


@asynccontextmanager
async def connected(
    streams: tuple[Stream, Stream], **server_options: Any
) -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    """A client and a server endpoint, each serving `methods` with its own Conn."""
    client_stream, server_stream = streams
    client = Endpoint(client_stream, methods, context=Conn("client"))
    server = Endpoint(server_stream, methods, context=Conn("server"), **server_options)
    client.context.endpoint, server.context.endpoint = client, server
    async with client, server:
        yield client, server


async def _read_replies(stream: Stream, count: int) -> list[Any]:
    decoder = FrameDecoder()
    replies: list[Any] = []
    while len(replies) < count:
        data = await asyncio.wait_for(stream.read(), 10)
        assert data, f"connection closed after {replies}"
        decoder.receive_data(data)
        for event in decoder:
            assert isinstance(event, Decoded)
            replies.append(event.value)
    return replies


async def test_concurrent_calls_in_both_directions(streams: tuple[Stream, Stream]) -> None:
    """Many calls in flight each way at once, including a handler that calls back the caller
    while its own call is pending, all get their own replies."""
    async with connected(streams) as (client, server):
        waiting = [
            asyncio.create_task(client.call("wait_then_echo", {"value": i})) for i in range(20)
        ]
        await async_wait_until(lambda: server.context.waiting == 20)
        # While 20 handlers are blocked, both sides still serve each other.
        assert await client.call("ask_back") == {"you_are": "client"}
        server_calls = await asyncio.gather(
            *(server.call("echo", {"value": [i]}) for i in range(10))
        )
        assert server_calls == [[i] for i in range(10)]
        server.context.release.set()
        assert await asyncio.gather(*waiting) == list(range(20))


async def test_concurrent_requests_are_bounded(streams: tuple[Stream, Stream]) -> None:
    """With max_concurrent_requests=2, a third request waits until a handler finishes; then
    every call completes."""
    async with connected(streams, max_concurrent_requests=2) as (client, server):
        calls = [
            asyncio.create_task(client.call("wait_then_echo", {"value": i})) for i in range(3)
        ]
        await async_wait_until(lambda: server.context.waiting == 2)
        done, _ = await asyncio.wait(calls, timeout=0.2)
        assert not done
        assert server.context.waiting == 2
        server.context.release.set()
        assert await asyncio.gather(*calls) == [0, 1, 2]
        assert server.context.waiting == 3


async def test_inline_handlers_run_in_arrival_order(streams: tuple[Stream, Stream]) -> None:
    """Pipelined calls to an inline handler run one after another in the order sent, even when
    the handler yields to the event loop."""
    async with connected(streams) as (client, server):
        replies = await asyncio.gather(
            *(client.call("record_inline", {"seq": seq}) for seq in range(50))
        )
        assert server.context.events == list(range(50))
        assert replies == list(range(1, 51))


async def test_call_timeout_leaves_the_connection_usable(
    streams: tuple[Stream, Stream],
) -> None:
    """A call with no reply in time raises TIMEOUT; its late reply is dropped and later calls
    work."""
    async with connected(streams) as (client, server):
        with pytest.raises(RalphError) as caught:
            await client.call("wait_then_echo", {"value": 1}, timeout=0.2)
        assert caught.value.code == ErrorCode.TIMEOUT
        assert "wait_then_echo" in caught.value.message
        assert await client.call("echo", {"value": "still here"}) == "still here"
        server.context.release.set()
        await async_wait_until(lambda: not server._tasks)
        assert await client.call("echo", {"value": 2}) == 2


async def test_notifications_arrive_in_order(streams: tuple[Stream, Stream]) -> None:
    """Notifications are handled one at a time in the order sent, in both directions, including
    lines encoded once and sent with send_line."""
    async with connected(streams) as (client, server):
        for seq in range(300):
            await client.notify("event", {"seq": seq})
        await server.notify("event", {"seq": -1})
        await server.send_line(encode(Notification("event", {"seq": -2}).to_json()))
        await async_wait_until(lambda: len(server.context.events) == 300)
        assert server.context.events == list(range(300))
        await async_wait_until(lambda: client.context.events == [-1, -2])


async def test_errors_reach_the_caller(streams: tuple[Stream, Stream]) -> None:
    """Handler errors, unknown methods and bad params arrive as RemoteError with their codes."""
    async with connected(streams) as (client, _server):
        with pytest.raises(RemoteError) as caught:
            await client.call("fail")
        assert caught.value.code == ErrorCode.LOOP_NOT_FOUND
        assert caught.value.message == "loop 42 not found; run 'ralph-uv list'"
        with pytest.raises(RemoteError) as caught:
            await client.call("missing")
        assert caught.value.wire_code == -32601
        with pytest.raises(RemoteError) as caught:
            await client.call("echo", {"valeu": 1})
        assert caught.value.wire_code == -32602
        assert caught.value.data == {"param": "valeu"}


async def test_peer_that_never_reads_costs_bounded_memory(
    streams: tuple[Stream, Stream],
) -> None:
    """Notifications to a peer that never reads make the sender wait once the stream buffer is
    full; the buffer stays within its limit plus one message, and other connections work."""
    _, server_stream = streams
    assert isinstance(server_stream, MemoryStream | AsyncioStream)
    payload = {"data": "y" * 8000}
    sent = 0
    server = Endpoint(server_stream, methods, context=Conn("server"), close_timeout=0.2)
    async with server:

        async def flood() -> None:
            nonlocal sent
            while True:
                await server.notify("output", payload)
                sent += 1

        flooding = asyncio.create_task(flood())
        await async_wait_until(lambda: server_stream.write_buffer_size > BUFFER)
        stalled_at = sent
        done, _ = await asyncio.wait({flooding}, timeout=0.3)
        assert not done
        assert sent == stalled_at
        assert server_stream.write_buffer_size <= BUFFER + 8100
        # Another connection to the same server code is not held up.
        async with connected(memory_pair()) as (other_client, _other_server):
            assert await other_client.call("echo", {"value": "ok"}) == "ok"
        flooding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flooding


async def test_slow_peer_policy_closes_the_connection(streams: tuple[Stream, Stream]) -> None:
    """With slow_peer_timeout, a peer that reads nothing for that long is disconnected and the
    blocked sender gets a TransportError."""
    _, server_stream = streams
    server = Endpoint(server_stream, methods, slow_peer_timeout=0.3, close_timeout=0.1)
    server.start()

    async def flood() -> None:
        while True:
            await server.notify("output", {"data": "z" * 8000})

    with pytest.raises(TransportError, match=r"read nothing for 0\.3 s"):
        await flood()
    await server.wait_closed()
    assert server.closed
    assert server.close_reason is not None
    with pytest.raises(TransportError):
        await server.call("whoami")


async def test_close_fails_pending_calls_and_cancels_handlers(
    streams: tuple[Stream, Stream],
) -> None:
    """Closing the client fails its pending call at once; the server sees the end of the
    stream, cancels the handler after its grace, and closes too. Later calls fail cleanly."""
    async with connected(streams, eof_grace=0.2) as (client, server):
        pending = asyncio.create_task(client.call("wait_then_echo", {"value": 1}))
        await async_wait_until(lambda: server.context.waiting == 1)
        await client.close()
        with pytest.raises(TransportError, match="closed"):
            await pending
        await asyncio.wait_for(server.wait_closed(), 5)
        assert server.context.cancelled == 1
        with pytest.raises(TransportError):
            await client.call("whoami")
        with pytest.raises(TransportError):
            await client.notify("event", {"seq": 1})


async def test_server_close_fails_the_clients_pending_call(
    streams: tuple[Stream, Stream],
) -> None:
    """When the server closes, the client's waiting call raises TransportError and the client
    endpoint closes itself."""
    async with connected(streams) as (client, server):
        pending = asyncio.create_task(client.call("wait_then_echo", {"value": 1}))
        await async_wait_until(lambda: server.context.waiting == 1)
        await server.close()
        with pytest.raises(TransportError):
            await pending
        await asyncio.wait_for(client.wait_closed(), 5)
        assert server.context.cancelled == 1


async def test_handler_may_close_its_own_connection(streams: tuple[Stream, Stream]) -> None:
    """A handler that closes its connection does not deadlock; the caller gets TransportError."""
    async with connected(streams, close_timeout=0.5) as (client, server):
        with pytest.raises(TransportError):
            await client.call("bye")
        await asyncio.wait_for(server.wait_closed(), 5)


async def test_garbage_gets_error_replies_and_the_connection_stays_usable(
    streams: tuple[Stream, Stream],
) -> None:
    """Non-UTF-8, non-JSON, invalid requests and empty batches each get the right error reply;
    a batch gets an array; a request after all that still works."""
    client_stream, server_stream = streams
    async with Endpoint(server_stream, methods, context=Conn("server")):
        client_stream.write(
            b"\xff\xfe\n"
            b"{nope\n"
            b'{"jsonrpc":"2.0","method":1,"id":3}\n'
            b"[]\n"
            b'[{"jsonrpc":"2.0","method":"echo","params":[1],"id":"a"},'
            b'{"jsonrpc":"2.0","method":"event","params":{"seq":9}},'
            b'{"jsonrpc":"2.0","method":"echo","params":[2],"id":"b"}]\n'
            b'{"jsonrpc":"2.0","method":"echo","params":{"value":"ok"},"id":4}\n'
        )
        replies = await _read_replies(client_stream, 6)
    assert [(r["id"], r["error"]["code"]) for r in replies[:4]] == [
        (None, -32700),
        (None, -32700),
        (3, -32600),
        (None, -32600),
    ]
    # The batch and the request after it run concurrently: either reply may come first.
    (batch,) = [r for r in replies[4:] if isinstance(r, list)]
    (single,) = [r for r in replies[4:] if isinstance(r, dict)]
    assert batch == [
        {"jsonrpc": "2.0", "id": "a", "result": 1},
        {"jsonrpc": "2.0", "id": "b", "result": 2},
    ]
    assert single == {"jsonrpc": "2.0", "id": 4, "result": "ok"}


async def test_ten_mib_line_gets_an_error_and_the_next_request_works(
    streams: tuple[Stream, Stream],
) -> None:
    """A 10 MiB line is answered with MESSAGE_TOO_LARGE (id null, the limit in data) and the
    request right after it is answered normally."""
    client_stream, server_stream = streams
    async with Endpoint(server_stream, methods, context=Conn("server")):
        chunk = b"a" * (1024 * 1024)
        for _ in range(10):
            client_stream.write(chunk)
            await client_stream.drain()
        client_stream.write(b'\n{"jsonrpc":"2.0","method":"whoami","id":1}\n')
        too_large, answer = await _read_replies(client_stream, 2)
    assert too_large["id"] is None
    assert too_large["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE
    assert too_large["error"]["data"] == {"max_message_size": 4 * 1024 * 1024}
    assert answer == {"jsonrpc": "2.0", "id": 1, "result": "server"}


async def test_outgoing_size_is_checked(streams: tuple[Stream, Stream]) -> None:
    """A call larger than the limit fails locally without being sent, and a reply larger than
    the server's limit becomes a MESSAGE_TOO_LARGE error for that call."""
    client_stream, server_stream = streams
    client = Endpoint(client_stream, methods, context=Conn("client"), max_message_size=1000)
    server = Endpoint(server_stream, methods, context=Conn("server"), max_message_size=1000)
    async with client, server:
        with pytest.raises(RalphError) as caught:
            await client.call("echo", {"value": "v" * 2000})
        assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
        with pytest.raises(RemoteError) as remote:
            await client.call("big_result", {"size": 5000})
        assert remote.value.wire_code == ErrorCode.MESSAGE_TOO_LARGE
        assert await client.call("big_result", {"size": 10}) == "x" * 10


async def test_half_closed_peer_still_gets_its_reply(ralph_home: Path) -> None:
    """A client that sends a request and shuts down its sending side (as `socat` does at the
    end of its input) still receives the reply before the server closes."""
    path = ralph_home / "h.sock"
    served: list[Endpoint] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint = Endpoint(AsyncioStream(reader, writer), methods, context=Conn("half"))
        served.append(endpoint)
        await endpoint.run()

    listener = await asyncio.start_unix_server(on_connect, path)
    async with listener:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"jsonrpc":"2.0","method":"whoami","id":7}\n')
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
        await writer.wait_closed()
        assert json.loads(data) == {"jsonrpc": "2.0", "id": 7, "result": "half"}
        await asyncio.wait_for(served[0].wait_closed(), 5)


async def test_reply_for_unknown_id_is_ignored(
    streams: tuple[Stream, Stream], caplog: pytest.LogCaptureFixture
) -> None:
    """Replies nobody waits for, and error reports with id null, are logged and do no harm."""
    client_stream, server_stream = streams
    async with Endpoint(server_stream, methods, context=Conn("server")) as server:
        with caplog.at_level(logging.DEBUG, logger="ralph_uv.rpc"):
            client_stream.write(
                b'{"jsonrpc":"2.0","id":999,"result":1}\n'
                b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}\n'
                b'{"jsonrpc":"2.0","method":"whoami","id":1}\n'
            )
            (answer,) = await _read_replies(client_stream, 1)
        assert answer["result"] == "server"
        assert not server.closed
    assert "peer reported an error: Parse error" in caplog.text
