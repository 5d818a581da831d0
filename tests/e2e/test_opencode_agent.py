"""The opencode backend end to end: the real ``opencode serve`` against the scripted model server.

Each test starts its own server with a home folder of its own, pointed at the model server
through ``OPENCODE_CONFIG_CONTENT``; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.e2e.agent_helpers import git_log, ralph_prompt
from tests.helpers import async_wait_until

from ralph_uv.agents.base import FailureKind, IterationRequest
from ralph_uv.agents.detect import find_binary
from ralph_uv.agents.opencode import OpenCodeBackend, OpenCodeSession
from ralph_uv.agents.opencode_server import SERVER_LOG, OpenCodeServer, OpenCodeServerError
from ralph_uv.demo.demo_model import ModelReply, ScriptedModel, SlowModel, ToolUseBlock
from ralph_uv.demo.model_server import Fault, ModelServer
from ralph_uv.demo.offline import private_home_env

pytestmark = pytest.mark.slow

MODEL = "anthropic/claude-sonnet-4-5"


def _isolated_env(root: Path) -> dict[str, str]:
    return private_home_env(root / "home")


def _provider(server: ModelServer) -> dict[str, Any]:
    return {"provider": {"anthropic": {"options": {"baseURL": f"{server.base_url}/v1",
                                                   "apiKey": "sk-ant-demo"}}}}


@pytest.fixture
def opencode_binary() -> Path:
    found = find_binary("opencode")
    if found is None:
        pytest.skip("the opencode CLI is not installed (make agents)")
    return found


@pytest.fixture
async def backend(
    tmp_path: Path, opencode_binary: Path, model_server: ModelServer
) -> AsyncIterator[OpenCodeBackend]:
    backend = OpenCodeBackend(
        command=[str(opencode_binary)],
        model=MODEL,
        env=_isolated_env(tmp_path),
        provider_config=_provider(model_server),
        poll_interval=0.5,
    )
    try:
        yield backend
    finally:
        await backend.aclose()


def _request(repo: Path, tmp_path: Path, prompt: str | None = None) -> IterationRequest:
    return IterationRequest(
        prompt=prompt if prompt is not None else ralph_prompt(repo, "TEXT-001", "opencode"),
        cwd=repo,
        loop_dir=tmp_path / "loop",
        iteration=1,
        yolo=True,
    )


def _first_user_text(body: Mapping[str, Any]) -> str:
    for message in body.get("messages") or []:
        if message.get("role") == "user":
            return json.dumps(message.get("content"))
    return ""


def _has_tool_result(body: Mapping[str, Any]) -> bool:
    return "tool_result" in json.dumps(body.get("messages") or [])


class _SubAgentModel(ScriptedModel):
    """The main agent hands the work to a sub-agent (opencode's ``task`` tool), waits for it,
    then answers slowly; the sub-agent answers at once."""

    name = "sub-agent"

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        first = _first_user_text(body)
        if not body.get("tools"):
            return ModelReply.text("Title")
        if "CHILD WORK" in first:
            return ModelReply.text("child finished")
        if not _has_tool_result(body):
            call = ToolUseBlock("toolu_task_1", "task", {
                "description": "delegate the work",
                "prompt": "CHILD WORK: say that you are finished",
                "subagent_type": "general",
            })
            return ModelReply((call,), "tool_use")
        return ModelReply.text("parent finished")

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        reply = self.decide(body)
        if reply.content and getattr(reply.content[0], "text", "") == "parent finished":
            await asyncio.sleep(2.0)  # the child has long been idle by now
        return reply


class _GatedModel(ScriptedModel):
    """Holds every reply until :attr:`gate` is set: a model that is still thinking."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        return ModelReply.text("released")

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        await self.gate.wait()
        return self.decide(body)


async def test_one_iteration_of_the_sample_task(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """One real iteration: opencode writes the story's file with its write tool, marks the
    story as passing and commits with its bash tool, and the result carries the model's final
    text and usage; the transcript shows the tool calls; the server log is in the loop folder."""
    out = bytearray()
    started = time.monotonic()
    session = await backend.start(_request(sample_repo, tmp_path), out.extend)
    result = await asyncio.wait_for(session.wait(), 120)
    elapsed = time.monotonic() - started

    assert result.ok, (result, out.decode(errors="replace"))
    assert result.exit_code == 0
    assert "Finished TEXT-001" in result.final_text
    assert not result.completion_claimed  # two stories are still to do
    assert "def slugify" in (sample_repo / "textkit" / "slug.py").read_text()
    prd = json.loads((sample_repo / "prd.json").read_text())
    assert [s["passes"] for s in prd["userStories"]] == [True, False, False]
    assert git_log(sample_repo)[0].startswith("TEXT-001")
    text = out.decode()
    assert "→ write" in text
    assert "→ bash" in text
    assert "Finished TEXT-001" in text
    assert result.output_bytes == len(out)
    assert result.usage is not None
    assert result.usage.input_tokens > 0
    assert result.usage.output_tokens > 0
    assert {body["model"] for body in model_server.message_requests} == {"claude-sonnet-4-5"}
    assert (tmp_path / "loop" / SERVER_LOG).is_file()
    assert elapsed < 90


async def test_idle_sub_agent_does_not_end_the_iteration(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """A sub-agent's child session goes idle while the main session still works: the
    iteration goes on until the main session's own answer, and the sub-agent's work appears
    indented in the transcript."""
    model_server.model = _SubAgentModel()
    out = bytearray()
    session = await backend.start(_request(sample_repo, tmp_path, "PARENT: delegate"), out.extend)
    result = await asyncio.wait_for(session.wait(), 120)
    assert result.ok, (result, out.decode(errors="replace"))
    assert result.final_text == "parent finished"
    text = out.decode()
    assert "sub-agent started" in text
    assert "  │ child finished" in text
    assert text.index("child finished") < text.rindex("parent finished")


async def test_authentication_error_is_an_auth_failure(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """A 401 from the provider ends the iteration as an AUTH failure with opencode's words."""
    model_server.inject_faults([Fault(401, count=5)])
    out = bytearray()
    session = await backend.start(_request(sample_repo, tmp_path), out.extend)
    result = await asyncio.wait_for(session.wait(), 120)
    assert result.failure == FailureKind.AUTH
    assert "HTTP 401" in result.detail
    assert "invalid x-api-key" in out.decode()


async def test_rate_limit_is_reported_with_its_reset_time(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """When the provider keeps answering 429, opencode retries (shown in the transcript) and
    gives up; the iteration is a RATE_LIMIT failure carrying the server's retry-after."""
    model_server.inject_faults([Fault(429, count=50, retry_after=0.5)])
    out = bytearray()
    session = await backend.start(_request(sample_repo, tmp_path), out.extend)
    result = await asyncio.wait_for(session.wait(), 120)
    assert result.failure == FailureKind.RATE_LIMIT, (result, out.decode(errors="replace"))
    assert result.retry_after == pytest.approx(0.5)
    assert "retrying" in out.decode()


async def test_terminate_aborts_the_session_and_the_server_stays(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """terminate() aborts a session whose model is still thinking: wait() returns promptly,
    as a stop rather than a failure, and the same server then runs the next iteration."""
    gated = model_server.model = _GatedModel()
    try:
        session = await backend.start(_request(sample_repo, tmp_path), lambda _data: None)
        await async_wait_until(lambda: model_server.message_requests, timeout=60)
        pid = backend.server.pid if backend.server else None
        started = time.monotonic()
        await session.terminate(grace=5.0)
        result = await asyncio.wait_for(session.wait(), 10)
    finally:
        gated.gate.set()
    assert time.monotonic() - started < 6
    assert result.failure is None
    assert "stopped" in result.detail

    model_server.model = _SubAgentModel()
    again = await backend.start(_request(sample_repo, tmp_path, "PARENT: go"), lambda _d: None)
    assert (await asyncio.wait_for(again.wait(), 120)).final_text == "parent finished"
    assert backend.server is not None
    assert backend.server.pid == pid


async def test_server_death_ends_the_iteration_as_a_crash(
    backend: OpenCodeBackend, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """If the server dies mid-iteration, the iteration ends as a CRASH naming the log file,
    and the next iteration starts a new server."""
    gated = model_server.model = _GatedModel()
    try:
        session = await backend.start(_request(sample_repo, tmp_path), lambda _data: None)
        await async_wait_until(lambda: model_server.message_requests, timeout=60)
        assert backend.server is not None
        first_pid = backend.server.pid
        assert first_pid is not None
        os.killpg(first_pid, signal.SIGKILL)
        result = await asyncio.wait_for(session.wait(), 30)
    finally:
        gated.gate.set()
    assert result.failure == FailureKind.CRASH
    assert str(tmp_path / "loop" / SERVER_LOG) in result.detail

    model_server.model = _SubAgentModel()
    again = await backend.start(_request(sample_repo, tmp_path, "PARENT: go"), lambda _d: None)
    assert (await asyncio.wait_for(again.wait(), 120)).final_text == "parent finished"
    assert backend.server is not None
    assert backend.server.pid != first_pid


class _DroppingStream(OpenCodeServer):
    """A real server whose event stream is cut shortly after it opens and never comes back."""

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, params: Mapping[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        if getattr(self, "dropped", False):
            raise OpenCodeServerError("event stream refused for this test")
        self.dropped = True
        async with super().stream(path, params) as resp:
            asyncio.get_running_loop().call_later(0.5, resp.close)
            yield resp


async def test_iteration_ends_by_polling_when_the_event_stream_is_lost(
    opencode_binary: Path, model_server: ModelServer, sample_repo: Path, tmp_path: Path
) -> None:
    """With the event stream gone for good, the iteration still ends — found by polling the
    session status — with the same result as with the stream."""
    model_server.model = SlowModel(1.5)
    backend = OpenCodeBackend(model=MODEL)
    server = _DroppingStream(
        [str(opencode_binary)],
        cwd=sample_repo,
        loop_dir=tmp_path / "loop",
        password=backend.password,
        env={**_isolated_env(tmp_path),
             "OPENCODE_CONFIG_CONTENT": json.dumps(_provider(model_server))},
    )
    await server.start()
    try:
        request = _request(sample_repo, tmp_path)
        out = bytearray()
        session = OpenCodeSession(server, request, out.extend,
                                  {"providerID": "anthropic", "modelID": "claude-sonnet-4-5"},
                                  poll_interval=0.5)
        await session.begin()
        result = await asyncio.wait_for(session.wait(), 120)
    finally:
        await server.stop()
    assert result.ok, result
    assert "Finished TEXT-001" in result.final_text
    assert json.loads((sample_repo / "prd.json").read_text())["userStories"][0]["passes"]
    # What the stream missed is rendered from the session's messages at the end.
    text = out.decode()
    assert "→ bash" in text
    assert text.count("Finished TEXT-001") == 1
    assert result.output_bytes == len(out)
