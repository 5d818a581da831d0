"""Tokens and the first-message gate of network listeners, over in-memory stream pairs: who is
let through, what a refused peer reads, how the client stream adds its token, token files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ralph_uv.errors import UserError
from ralph_uv.transports.auth import (
    MAX_HELLO_SIZE,
    TokenStream,
    check_token,
    gate,
    generate_token,
    read_token_file,
    write_token_file,
)
from ralph_uv.transports.base import MemoryStream, memory_pair

TOKEN = generate_token()


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _hello(token: object = TOKEN, request_id: object = 1) -> bytes:
    params: dict[str, Any] = {"protocol": "1.0", "client": "t"}
    if token is not None:
        params["token"] = token
    return _line({"jsonrpc": "2.0", "id": request_id, "method": "hello", "params": params})


async def _read_all(stream: MemoryStream) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(stream.read(), 5):
        data += chunk
    return data


async def _gate_with(first: bytes, *, wait: float = 5.0) -> tuple[Any, bytes]:
    client, server = memory_pair()
    if first:
        client.write(first)
    result = await gate(server, TOKEN, timeout=wait)
    if result is None:
        return None, await _read_all(client)
    return result, b""


def test_check_token() -> None:
    """Only the identical string passes; other types and an empty expected token never do."""
    assert check_token(TOKEN, TOKEN)
    assert not check_token(TOKEN[:-1] + "x", TOKEN)
    assert not check_token(TOKEN + "x", TOKEN)
    assert not check_token(None, TOKEN)
    assert not check_token(b"bytes", "bytes")
    assert not check_token("", "")
    assert generate_token() != generate_token()
    assert len(generate_token()) >= 40


async def test_right_hello_passes_and_is_replayed() -> None:
    """A hello with the token is let through; the handler reads the same hello (and what
    followed it) from the returned stream, which is marked authenticated."""
    follow = _line({"jsonrpc": "2.0", "id": 2, "method": "echo"})
    stream, _ = await _gate_with(_hello() + follow)
    assert stream is not None
    assert stream.extra["authenticated"] is True
    assert await stream.read() == _hello() + follow


async def test_hello_split_across_chunks_passes() -> None:
    """The first line may arrive in pieces."""
    client, server = memory_pair()
    task = asyncio.create_task(gate(server, TOKEN, timeout=5))
    hello = _hello()
    for i in range(0, len(hello), 7):
        client.write(hello[i:i + 7])
        await asyncio.sleep(0)
    stream = await task
    assert stream is not None
    assert await stream.read() == hello


@pytest.mark.parametrize(
    ("first", "reason", "reply_id"),
    [
        (_hello(token="wrong-token-value-123"), "wrong token", 1),
        (_hello(token=None, request_id="a"), "hello carries no token", "a"),
        (_hello(token=12345), "wrong token", 1),
        (_line({"jsonrpc": "2.0", "id": 9, "method": "echo", "params": {"token": TOKEN}}),
         "must be a hello", 9),
        (_line({"jsonrpc": "2.0", "method": "hello", "params": {"token": TOKEN}}),
         "must be a hello request", None),
        (_line({"id": 1, "method": "hello", "params": {"token": TOKEN}}), "not a JSON-RPC", None),
        (b"\xff\xfe garbage\n", "not JSON", None),
        (b"[1, 2]\n", "not a JSON-RPC", None),
    ],
    # Fixed ids: the token is random, and parallel workers must collect the same names.
    ids=[
        "wrong-token", "no-token", "token-not-a-string", "not-hello", "hello-notification",
        "no-jsonrpc-member", "not-json", "json-array",
    ],
)
async def test_refusals(first: bytes, reason: str, reply_id: object) -> None:
    """Anything but a hello request with the right token gets one -32010 error line (with the
    request's id when it had one), then end of stream."""
    stream, sent = await _gate_with(first)
    assert stream is None
    [reply] = [json.loads(line) for line in sent.splitlines()]
    assert reply["id"] == reply_id
    assert reply["error"]["code"] == -32010
    assert reason in reply["error"]["message"]
    assert TOKEN not in sent.decode()


async def test_silence_and_oversized_first_line_are_refused() -> None:
    """No hello within the timeout, or a first line past MAX_HELLO_SIZE, is refused."""
    stream, sent = await _gate_with(b"", wait=0.2)
    assert stream is None
    assert b"no hello within" in sent
    stream, sent = await _gate_with(b"x" * (MAX_HELLO_SIZE + 10))
    assert stream is None
    assert b"longer than" in sent


async def test_peer_closing_before_hello_is_dropped_quietly() -> None:
    """A peer that goes away before its hello is simply dropped."""
    client, server = memory_pair()
    client.close()
    assert await gate(server, TOKEN, timeout=5) is None
    assert server.is_closing()


async def test_token_stream_adds_the_token_to_the_first_hello() -> None:
    """The client stream puts its token into the first hello, even when the hello is written
    in pieces, and passes everything after it unchanged."""
    client, server = memory_pair()
    stream = TokenStream(client, TOKEN)
    hello = _hello(token=None)
    stream.write(hello[:10])
    stream.write(hello[10:] + b'{"next": 1}\n')
    stream.write(_hello(token=None))
    await stream.drain()
    lines = (await asyncio.wait_for(server.read(), 5)).splitlines()
    assert json.loads(lines[0])["params"] == {"protocol": "1.0", "client": "t", "token": TOKEN}
    assert lines[1] == b'{"next": 1}'
    assert "token" not in json.loads(lines[2])["params"]
    assert TOKEN not in repr(stream)


async def test_token_stream_leaves_other_first_lines_alone() -> None:
    """A first hello that already has a token, or a first line that is not a hello, is sent
    as written; an unfinished first line is sent when the stream closes."""
    for first in (_hello(token="mine-mine-mine-mine"), _line({"jsonrpc": "2.0", "id": 1,
                                                              "method": "echo"}), b"not json\n"):
        client, server = memory_pair()
        stream = TokenStream(client, TOKEN)
        stream.write(first)
        assert await asyncio.wait_for(server.read(), 5) == first
    client, server = memory_pair()
    stream = TokenStream(client, TOKEN)
    stream.write(b"partial")
    stream.close()
    assert await _read_all(server) == b"partial"


def test_token_files(tmp_path: Path) -> None:
    """Token files are written 0600 and read back; a file others can read, a short token or a
    missing file is a UserError that says what to do."""
    path = tmp_path / "deep" / "token"
    token = write_token_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == token
    assert write_token_file(path, "given-token-of-enough-length") == "given-token-of-enough-length"
    assert read_token_file(path) == "given-token-of-enough-length"
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        read_token_file(path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(UserError, match="shorter than"):
        read_token_file(path)
    with pytest.raises(UserError, match="does not exist"):
        read_token_file(tmp_path / "missing")
