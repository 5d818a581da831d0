"""``opencode attach`` on an opencode loop, end to end: a real ralphd runs a loop with the real
``opencode serve`` (against the scripted model server, held mid-iteration by a slow model); the
local relay (client/http_proxy.py) reaches it through ralphd's connect_http; and
``ralph-uv attach`` in a real terminal runs the real ``opencode attach`` through that relay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.e2e.test_opencode_agent import MODEL, _isolated_env, _provider
from tests.helpers import async_wait_until
from tests.integration.daemon_harness import Ralphd, kill_runners, make_task, write_config

from ralph_uv.agents.detect import find_binary
from ralph_uv.agents.opencode_server import basic_auth
from ralph_uv.client.daemon import connect_daemon
from ralph_uv.client.http_proxy import HttpRelay, latest_session
from ralph_uv.client.tmux_attach import local_ralph_argv
from ralph_uv.config import paths
from ralph_uv.demo.demo_model import ModelReply, SlowModel
from ralph_uv.demo.model_server import ModelServer
from ralph_uv.registry import Registry, SessionRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def opencode_env(tmp_path: Path, model_server: ModelServer,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """ralphd (and so the runner and opencode) in a private home, the model server as the
    provider; the variables, for the terminal that attaches."""
    if find_binary("opencode") is None:
        pytest.skip("the opencode CLI is not installed (make agents)")
    env = {**_isolated_env(tmp_path),
           "OPENCODE_CONFIG_CONTENT": json.dumps(_provider(model_server))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_config()
    daemon = Ralphd().start()
    yield env
    daemon.stop()
    kill_runners()


class HeldModel(SlowModel):
    """Holds every reply until :meth:`release` (or 120 s): the loop stays mid-iteration for
    as long as the test needs, and nothing is left waiting when it ends."""

    def __init__(self) -> None:
        super().__init__(120.0)
        self.released = asyncio.Event()

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.released.wait(), self.delay)
        return await self.inner.reply(body)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def held(model_server: ModelServer) -> Iterator[HeldModel]:
    model = HeldModel()
    model_server.model = model
    yield model
    model.release()


async def _start(tmp_path: Path) -> SessionRecord:
    task = make_task(tmp_path)
    async with await connect_daemon(autostart=False, client="test") as daemon:
        record = await daemon.start_loop(task, agent="opencode", model=MODEL)
    await async_wait_until((paths().loop_dir(record.loop_id) / "http.json").exists, timeout=90)
    return record


async def _stop(record: SessionRecord) -> None:
    """Stop the loop now (its opencode server goes, and with it the slow model's request)."""
    async with await connect_daemon(autostart=False, client="test") as daemon:
        await daemon.stop_loop(record.loop_id, "now")

    def ended() -> bool:
        with Registry.open() as registry:
            row = registry.get(record.loop_id)
        return row is not None and row.status.is_terminal

    await async_wait_until(ended, timeout=60)


async def test_relay_reaches_the_real_opencode_server(
    opencode_env: dict[str, str], held: HeldModel, tmp_path: Path
) -> None:
    """Through the relay, GET /session with the password from get_http_auth lists the loop's
    session ("Ralph iteration 1"), which latest_session picks; without the password the
    server answers 401."""
    record = await _start(tmp_path)
    async with await connect_daemon(autostart=False, client="test") as daemon:
        auth = await daemon.get_http_auth(record.loop_id)
        async with HttpRelay(lambda: daemon.connect_http(record.loop_id)) as relay:
            headers = {"Authorization": basic_auth(auth.password, auth.username)}

            async def sessions() -> list[dict[str, Any]]:
                async with aiohttp.ClientSession(headers=headers) as http, \
                        http.get(f"{relay.url}/session") as response:
                    assert response.status == 200
                    found: list[dict[str, Any]] = await response.json()
                    return found

            await async_wait_until(sessions, timeout=60, interval=0.5)
            listed = await sessions()
            titles = {s["title"] for s in listed}
            assert "Ralph iteration 1" in titles
            chosen = await latest_session(relay.url, auth)
            assert chosen in {s["id"] for s in listed if s["title"] == "Ralph iteration 1"}
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{relay.url}/session") as response:
                assert response.status == 401
    await _stop(record)


def _password(loop_id: str) -> bytes:
    info = json.loads((paths().loop_dir(loop_id) / "http.json").read_text())
    return str(info["password"]).encode()


def _command_lines() -> list[bytes]:
    found = []
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            found.append((pid / "cmdline").read_bytes())
        except OSError:
            continue
    return found


class Terminal:
    """A person's terminal: a pane of a tmux server of the test's own."""

    def __init__(self) -> None:
        self.socket = f"ralph-oc-{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30, check=False)


async def test_ralph_uv_attach_runs_opencode_attach_through_the_relay(
    opencode_env: dict[str, str], held: HeldModel, tmp_path: Path
) -> None:
    """`ralph-uv attach demo` on an opencode loop runs the real `opencode attach` on a local
    127.0.0.1 port relayed to the loop's server: its TUI shows the loop's session, the
    password is on no command line, and leaving opencode (Ctrl-C twice) ends the command."""
    record = await _start(tmp_path)
    terminal = Terminal()
    env = {**opencode_env, "RALPH_HOME": os.environ["RALPH_HOME"], "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    line = f"env {exports} {shlex.join([*local_ralph_argv(), 'attach', 'demo'])}; " \
           "echo ATTACH-EXIT=$?; trap '' INT; sleep 600"
    try:
        terminal("new-session", "-d", "-s", "person", "-x", "120", "-y", "40", line)

        def screen() -> str:
            return terminal("capture-pane", "-p", "-t", "=person:")

        # The loop's prompt, as the TUI shows the session it loaded over the relay.
        try:
            await async_wait_until(lambda: "<promise>COMPLETE</promise>" in screen(), timeout=90,
                                   interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}; the terminal shows:\n{screen()}") from None
        assert "opencode attach to loop" not in screen()  # the notice went before the TUI
        password = _password(record.loop_id)
        assert not [c for c in _command_lines() if password in c]
        terminal("send-keys", "-t", "=person:", "C-c")
        try:
            await async_wait_until(lambda: "ATTACH-EXIT=" in screen(), timeout=10)
        except AssertionError:  # the first Ctrl-C only cleared something; the second leaves
            terminal("send-keys", "-t", "=person:", "C-c")
            await async_wait_until(lambda: "ATTACH-EXIT=" in screen(), timeout=20)
        assert "ATTACH-EXIT=0" in screen()
        await _stop(record)
    finally:
        terminal.kill()
