"""``opencode attach`` through ralphd, end to end: a real ralphd runs an opencode loop (the real
``opencode serve`` against the scripted model server, held mid-iteration by a slow model); the
runner publishes the server in a private http.json, get_http_auth hands out its password and
connect_http relays an authenticated HTTP request to it. When the loop ends the file is gone."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_opencode_agent import MODEL, _isolated_env, _provider
from tests.helpers import async_wait_until
from tests.integration.daemon_harness import Ralphd, kill_runners, make_task, write_config

from ralph_uv.agents.detect import find_binary
from ralph_uv.client.daemon import connect_daemon
from ralph_uv.config import paths
from ralph_uv.demo.demo_model import SlowModel
from ralph_uv.demo.model_server import ModelServer
from ralph_uv.errors import ErrorCode, RemoteError
from ralph_uv.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def ralphd_for_opencode(
    tmp_path: Path, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Ralphd]:
    if find_binary("opencode") is None:
        pytest.skip("the opencode CLI is not installed (make agents)")
    for key, value in _isolated_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OPENCODE_CONFIG_CONTENT", json.dumps(_provider(model_server)))
    write_config()
    daemon = Ralphd().start()
    yield daemon
    daemon.stop()
    kill_runners()


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: int,
                method: str, params: dict[str, Any]) -> dict[str, Any]:
    writer.write(json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                             "params": params}).encode() + b"\n")
    await writer.drain()
    reply: dict[str, Any] = json.loads(await reader.readline())
    return reply


async def test_opencode_server_is_reachable_through_ralphd(
    ralphd_for_opencode: Ralphd, model_server: ModelServer, tmp_path: Path
) -> None:
    """http.json (0600) appears while the loop runs; get_http_auth returns its password;
    connect_http relays GET /global/health with that password to opencode serve, which answers
    200; after the loop is stopped the file is removed and get_http_auth is BAD_STATE."""
    model_server.model = SlowModel(15.0)  # holds the iteration; the teardown waits for it
    task = make_task(tmp_path)
    http_file = None
    async with await connect_daemon(autostart=False, client="test") as daemon:
        record = await daemon.start_loop(task, agent="opencode", model=MODEL)
        http_file = paths().loop_dir(record.loop_id) / "http.json"
        await async_wait_until(http_file.exists, timeout=60)
        assert stat.S_IMODE(http_file.stat().st_mode) == 0o600
        auth = await daemon.endpoint.call("get_http_auth", {"loop": record.loop_id})
        assert auth["username"] == "opencode"
        assert auth["password"]
        token = base64.b64encode(f"opencode:{auth['password']}".encode()).decode()
        reader, writer = await asyncio.open_unix_connection(str(paths().daemon_socket))
        try:
            await _call(reader, writer, 1, "hello", {"protocol": "1.0", "client": "test"})
            reply = await _call(reader, writer, 2, "connect_http", {"loop": record.loop_id})
            assert reply["result"] == {"loop_id": record.loop_id}
            writer.write(f"GET /global/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Authorization: Basic {token}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        await daemon.stop_loop(record.loop_id, "now")

        def ended() -> bool:
            with Registry.open() as registry:
                row = registry.get(record.loop_id)
            return row is not None and row.status.is_terminal

        await async_wait_until(ended, timeout=60)
        await async_wait_until(lambda: not http_file.exists(), timeout=30)
        with pytest.raises(RemoteError) as caught:
            await daemon.endpoint.call("get_http_auth", {"loop": record.loop_id})
        assert caught.value.wire_code == ErrorCode.BAD_STATE
