"""The scripted model server speaks Anthropic's Messages API on loopback: streamed and plain
replies, token counting, injected errors, and a standalone mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from ralph_uv.demo.demo_model import ModelReply, ScriptedModel, TextBlock, ToolUseBlock
from ralph_uv.demo.model_server import Fault, ModelServer, ThreadedModelServer


class _FixedModel(ScriptedModel):
    """Always the same reply: a long text and a tool call, to exercise chunked deltas."""

    name = "fixed"

    def decide(self, body: Mapping[str, Any]) -> ModelReply:
        return ModelReply(
            (TextBlock("word " * 40),
             ToolUseBlock("toolu_1", "Bash", {"command": "echo " + "x" * 120})),
            "tool_use",
        )


BODY = {"model": "claude-test", "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello"}], "tools": [{"name": "Bash"}]}


def _parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_streamed_reply_has_the_api_event_sequence() -> None:
    """A ``stream: true`` request gets message_start, per-block start/deltas/stop, message_delta
    with the stop reason and usage, message_stop; the deltas reassemble the reply exactly."""
    async with ModelServer(_FixedModel()) as srv, aiohttp.ClientSession() as http:
        resp = await http.post(f"{srv.base_url}/v1/messages?beta=true",
                               json=dict(BODY, stream=True), headers={"x-api-key": "anything"})
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _parse_sse(await resp.text())
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events
                   if n == "content_block_delta" and d["index"] == 0)
    partial = "".join(d["delta"]["partial_json"] for n, d in events
                      if n == "content_block_delta" and d["index"] == 1)
    assert text == "word " * 40
    assert json.loads(partial) == {"command": "echo " + "x" * 120}
    assert names.count("content_block_delta") > 4  # really streamed in pieces
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] > 0
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    assert srv.requests == [dict(BODY, stream=True)]


async def test_plain_reply_and_token_count() -> None:
    """Without ``stream`` the reply is one message object; count_tokens gives a number."""
    async with ModelServer(_FixedModel()) as srv, aiohttp.ClientSession() as http:
        message = await (await http.post(f"{srv.base_url}/v1/messages", json=BODY)).json()
        count = await (await http.post(f"{srv.base_url}/v1/messages/count_tokens",
                                       json=BODY)).json()
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["stop_reason"] == "tool_use"
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][1]["input"] == {"command": "echo " + "x" * 120}
    assert count["input_tokens"] > 0


async def test_injected_faults_answer_the_next_calls_then_stop() -> None:
    """Each fault answers its count of calls with the API's error shape and a retry-after
    header; then normal replies resume."""
    async with ModelServer(_FixedModel()) as srv, aiohttp.ClientSession() as http:
        srv.inject_faults([Fault(status=429, count=2, retry_after=1), Fault(status=529),
                           Fault(status=401)])
        answers = []
        for _ in range(5):
            resp = await http.post(f"{srv.base_url}/v1/messages", json=BODY)
            answers.append((resp.status, resp.headers.get("retry-after"), await resp.json()))
        assert srv.pending_faults == 0
    assert [a[0] for a in answers] == [429, 429, 529, 401, 200]
    assert answers[0][1] == "1"
    assert answers[0][2]["type"] == "error"
    assert [a[2]["error"]["type"] for a in answers[:4]] == [
        "rate_limit_error", "rate_limit_error", "overloaded_error", "authentication_error"]
    assert all(a[2]["error"]["message"] for a in answers[:4])


async def test_unknown_paths_and_bad_bodies_get_json_errors() -> None:
    """Unknown endpoints get a 404 in the error shape, a non-JSON body a 400; both are logged;
    ``/`` answers as a health check."""
    async with ModelServer(_FixedModel()) as srv, aiohttp.ClientSession() as http:
        missing = await http.get(f"{srv.base_url}/v1/models")
        bad = await http.post(f"{srv.base_url}/v1/messages", data=b"not json")
        health = await http.head(f"{srv.base_url}/")
        assert missing.status == 404
        assert (await missing.json())["error"]["type"] == "not_found_error"
        assert bad.status == 400
        assert health.status == 200
        assert [(r.method, r.path, r.status) for r in srv.log] == [
            ("GET", "/v1/models", 404), ("POST", "/v1/messages", 400), ("HEAD", "/", 200)]


def test_threaded_server_serves_synchronous_code() -> None:
    """The threaded form runs the server on its own loop; plain blocking clients can call it,
    and faults injected from this thread apply to the very next call."""
    with ThreadedModelServer(_FixedModel()) as srv:
        request = urllib.request.Request(f"{srv.base_url}/v1/messages",
                                         data=json.dumps(BODY).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["stop_reason"] == "tool_use"
        srv.inject_faults([Fault(status=529)])
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=10)
        assert failed.value.code == 529
        failed.value.close()
        assert len(srv.requests) == 2


def test_standalone_server_prints_its_url_and_stops_on_sigterm() -> None:
    """``python -m ralph_uv.demo.model_server --port 0`` prints the URL first, serves the demo
    model there, and exits cleanly on SIGTERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "ralph_uv.demo.model_server", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(f"{url}/", timeout=10) as resp:
                assert json.load(resp) == {"status": "ok", "model": "demo"}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
