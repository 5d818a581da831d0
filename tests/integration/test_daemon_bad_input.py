"""ralphd against bad clients, over its real Unix socket: garbage, wrong requests, huge lines,
hundreds of idle connections, a client that never reads, and another user. Each gets an error
reply where one is due, and other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.daemon_harness import Ralphd, kill_runners, write_config

from ralph_uv.config import paths

pytestmark = pytest.mark.timeout(120)

SLOW_PEER_TIMEOUT = 2


@pytest.fixture
def ralphd() -> Iterator[Ralphd]:
    """A ralphd that disconnects clients that read nothing for 2 s."""
    write_config({"slow_peer_timeout": SLOW_PEER_TIMEOUT})
    daemon = Ralphd().start()
    yield daemon
    daemon.stop()
    kill_runners()


class Raw:
    """A client speaking bytes to ralphd's socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls) -> Raw:
        reader, writer = await asyncio.open_unix_connection(
            str(paths().daemon_socket), limit=16 * 1024 * 1024
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            line = await self.reader.readline()
        assert line, "ralphd closed the connection"
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    async def call(self, method: str, params: Any = None, request_id: int = 1) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(json.dumps(message).encode() + b"\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            self.writer.transport.abort()


async def _healthy() -> float:
    """Seconds a fresh client needs for hello + get_health."""
    started = time.monotonic()
    client = await Raw.open()
    assert "result" in await client.call("hello", {"protocol": "1.0", "client": "probe"})
    health = await client.call("get_health", request_id=2)
    assert health["result"]["pid"] > 0
    await client.close()
    return time.monotonic() - started


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_garbage_and_non_requests_get_errors_and_the_connection_lives(
    ralphd: Ralphd,
) -> None:
    """Invalid JSON gets -32700, JSON that is not a request -32600, and the same connection
    then answers hello normally."""
    client = await Raw.open()
    await client.send(b"{not json\n")
    assert (await client.reply())["error"]["code"] == -32700
    for value in (b"[]", b"42", b'{"foo": 1}', b'{"jsonrpc": "2.0", "method": 5, "id": 7}'):
        await client.send(value + b"\n")
        reply = await client.reply()
        assert reply["error"]["code"] == -32600, value
    hello = await client.call("hello", {"protocol": "1.0", "client": "test"})
    assert hello["result"]["server"] == "ralphd"
    await client.close()


async def test_wrong_params_name_the_parameter(ralphd: Ralphd) -> None:
    """Wrong parameter types and missing parameters get -32602 naming the parameter; an unknown
    method -32601, an unknown protocol -32015, an unknown loop -32003."""
    client = await Raw.open()
    cases: list[tuple[str, Any, int, str | None]] = [
        ("start_loop", {"task_dir": 5}, -32602, "task_dir"),
        ("start_loop", {"task_dir": "/x", "pause": "soon"}, -32602, "pause"),
        ("list_loops", {"all": "yes"}, -32602, "all"),
        ("stop_loop", {}, -32602, "loop"),
        ("stop_loop", {"loop": "x", "when": "later"}, -32602, "when"),
        ("subscribe_events", {"since": "0"}, -32602, "since"),
        ("subscribe_events", {"since": 10**6}, -32602, None),
        ("get_health", {"extra": 1}, -32602, None),
        ("launch_missiles", {}, -32601, None),
        ("hello", {"protocol": "2.0", "client": "future"}, -32015, None),
        ("connect_loop", {"loop": "no-such-loop"}, -32003, None),
    ]
    for number, (method, params, code, param) in enumerate(cases, start=1):
        reply = await client.call(method, params, request_id=number)
        assert reply["id"] == number
        assert reply["error"]["code"] == code, (method, params, reply)
        if param is not None:
            assert reply["error"]["data"]["param"] == param
    await client.close()


async def test_ten_mebibyte_line_is_refused_and_the_stream_resynchronises(
    ralphd: Ralphd,
) -> None:
    """A 10 MiB line (over the 4 MiB limit) gets -32012; the next request on the same
    connection is answered; another client is served while the line arrives."""
    client = await Raw.open()
    line = b'{"jsonrpc": "2.0", "id": 1, "method": "hello", "params": {"client": "'
    sending = asyncio.create_task(client.send(line + b"x" * (10 * 1024 * 1024) + b'"}}\n'))
    assert await _healthy() < 2.0
    await sending
    reply = await client.reply()
    assert reply["error"]["code"] == -32012
    assert reply["error"]["data"]["max_message_size"] == 4 * 1024 * 1024
    hello = await client.call("hello", {"protocol": "1.0", "client": "test"}, request_id=2)
    assert hello["id"] == 2
    assert "result" in hello
    await client.close()


async def test_random_binary_gets_parse_errors_only(ralphd: Ralphd) -> None:
    """Random bytes (with newlines among them) get only -32700 replies, ralphd keeps running
    and serves a fresh client."""
    rng = random.Random(7)
    client = await Raw.open()
    blob = bytes(rng.randrange(256) for _ in range(200_000))
    await client.send(blob + b"\n")
    client.writer.write_eof()
    codes = set()
    async with asyncio.timeout(20):
        while line := await client.reader.readline():
            codes.add(json.loads(line)["error"]["code"])
    assert codes <= {-32700, -32600, -32012}
    assert -32700 in codes
    await client.close()
    assert ralphd.process is not None
    assert ralphd.process.poll() is None
    assert await _healthy() < 2.0


async def test_500_idle_connections_do_not_block_others(ralphd: Ralphd) -> None:
    """500 connections that say nothing cost ralphd little memory and no service: a new client
    is answered at once."""
    before = _rss(ralphd.pid)
    idle = [await Raw.open() for _ in range(500)]
    assert await _healthy() < 1.0
    assert _rss(ralphd.pid) - before < 32 * 1024 * 1024
    await asyncio.gather(*(c.close() for c in idle))
    assert await _healthy() < 1.0


async def test_client_that_never_reads_costs_bounded_memory(ralphd: Ralphd) -> None:
    """A client sending 100 000 requests and reading no reply: ralphd stops reading from it
    once its replies back up, its memory stays bounded, others are served meanwhile, and it is
    disconnected after slow_peer_timeout (the client's blocked send then fails)."""
    before = _rss(ralphd.pid)
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(str(paths().daemon_socket))
    greedy.settimeout(60)
    request = b'{"jsonrpc":"2.0","id":1,"method":"get_health"}\n'

    def flood() -> OSError | None:
        try:
            greedy.sendall(request * 100_000)
        except OSError as exc:
            return exc
        return None

    started = time.monotonic()
    sending = asyncio.create_task(asyncio.to_thread(flood))
    peak = 0
    while not sending.done() and time.monotonic() - started < 30:
        assert await _healthy() < 2.0
        peak = max(peak, _rss(ralphd.pid))
        await asyncio.sleep(0.2)
    outcome = await sending
    greedy.close()
    assert isinstance(outcome, OSError), "ralphd read every request of a client that never reads"
    assert SLOW_PEER_TIMEOUT <= time.monotonic() - started < SLOW_PEER_TIMEOUT + 10
    assert peak - before < 16 * 1024 * 1024, f"ralphd grew by {(peak - before) >> 20} MiB"
    assert await _healthy() < 2.0


def test_another_uid_is_refused(ralphd: Ralphd) -> None:
    """A client running as nobody reaches the socket (the folders are opened up to it) and is
    refused by its peer credentials: one -32010 error line, then the connection closes."""
    home = Path(os.environ["RALPH_HOME"])
    for folder in (home, paths().runtime):
        folder.chmod(0o711)
    paths().daemon_socket.chmod(0o666)
    code = (
        "import json, os, socket, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get_health\"}\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        "print(json.dumps({'uid': os.getuid(), 'lines': data.decode().splitlines()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(paths().daemon_socket)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["uid"] == 65534
    assert len(result["lines"]) == 1
    error = json.loads(result["lines"][0])["error"]
    assert error["code"] == -32010
    assert "uid 65534" in error["message"]
