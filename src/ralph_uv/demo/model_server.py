"""A scripted, Anthropic-compatible model server on loopback.

It answers what Claude Code and OpenCode call — ``POST /v1/messages`` (streamed as server-sent
events or as one JSON body) and ``POST /v1/messages/count_tokens`` — with replies decided by a
:class:`~ralph_uv.demo.demo_model.ScriptedModel`, so that the real agent CLIs run a real Ralph
iteration offline. It accepts any API key. Every request body is kept in
:attr:`ModelServer.requests` for assertions, and :meth:`ModelServer.inject_faults` makes the next
calls fail with the HTTP errors the real API sends (rate limit, overload, bad key).

Use it as an async context manager inside an event loop, as :class:`ThreadedModelServer` from
synchronous code, or standalone: ``python -m ralph_uv.demo.model_server --port 0`` prints the
base URL on its first line of output and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from ralph_uv.demo.demo_model import (
    DemoModel,
    EchoCompleteModel,
    ModelReply,
    NoProgressModel,
    ScriptedModel,
    SlowModel,
    TextBlock,
    ToolUseBlock,
)
from ralph_uv.errors import InternalError, UserError

__all__ = ["Fault", "ModelServer", "RequestRecord", "ThreadedModelServer", "main"]

log = logging.getLogger("ralph_uv.demo.model_server")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_DEFAULT_MESSAGES = {
    "authentication_error": "invalid x-api-key",
    "rate_limit_error": "Number of requests has exceeded your rate limit. Please try again later.",
    "overloaded_error": "Overloaded",
}
_CHUNK = 48  # characters per streamed delta: small enough that clients see several deltas


@dataclass(frozen=True, slots=True)
class Fault:
    """Answer the next ``count`` ``/v1/messages`` calls with HTTP ``status``.

    The body has Anthropic's error shape; ``error_type`` defaults from the status (429 →
    ``rate_limit_error``, 529 → ``overloaded_error``, 401 → ``authentication_error``, …) and
    ``retry_after`` (seconds) becomes a ``retry-after`` header.
    """

    status: int
    count: int = 1
    retry_after: float | None = None
    error_type: str | None = None
    message: str | None = None

    @property
    def resolved_type(self) -> str:
        return self.error_type or _ERROR_TYPES.get(self.status, "api_error")

    def body(self) -> dict[str, Any]:
        kind = self.resolved_type
        text = self.message or _DEFAULT_MESSAGES.get(kind, f"scripted {kind}")
        return {"type": "error", "error": {"type": kind, "message": text}}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request the server received (for finding what a client probes)."""

    method: str
    path: str
    status: int


class ModelServer:
    """The server; ``async with ModelServer(model=DemoModel(), port=0) as srv: srv.base_url``."""

    def __init__(
        self, model: ScriptedModel | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.model: ScriptedModel = model if model is not None else DemoModel()
        self.host = host
        self.port = port
        self.requests: list[dict[str, Any]] = []  # bodies of /v1/messages calls, in order
        self.log: list[RequestRecord] = []  # every request, any path
        self._faults: deque[Fault] = deque()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` — what ``ANTHROPIC_BASE_URL`` should be set to."""
        if self._runner is None:
            raise InternalError("the model server is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def message_requests(self) -> list[dict[str, Any]]:
        """Bodies of the ``/v1/messages`` calls that offered tools (the agent's own turns)."""
        return [body for body in self.requests if body.get("tools")]

    def inject_faults(self, faults: Sequence[Fault]) -> None:
        """Queue faults; each answers its ``count`` next ``/v1/messages`` calls, in order."""
        for fault in faults:
            self._faults.extend([Fault(fault.status, 1, fault.retry_after, fault.error_type,
                                       fault.message)] * fault.count)

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/", self._health)  # also answers HEAD, which Claude Code sends first
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        try:
            sock = socket.create_server((self.host, self.port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror}); choose another port"
            ) from exc
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("model server listening on %s (model %s)", self.base_url, self.model.name)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ModelServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- handlers ---------------------------------------------------------------------------

    def _record(self, request: web.Request, status: int) -> None:
        self.log.append(RequestRecord(request.method, request.path, status))

    async def _json_body(self, request: web.Request) -> dict[str, Any] | None:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        if body is None:
            self._record(request, 400)
            return _error(400, "invalid_request_error", "request body must be a JSON object")
        self.requests.append(body)
        if self._faults:
            fault = self._faults.popleft()
            self._record(request, fault.status)
            log.info("answering %s with injected %s", request.path, fault.status)
            headers = {}
            if fault.retry_after is not None:
                headers["retry-after"] = f"{fault.retry_after:g}"
            return web.json_response(fault.body(), status=fault.status, headers=headers)
        reply = await self.model.reply(body)
        self._record(request, 200)
        model = str(body.get("model") or "ralph-demo")
        usage = {"input_tokens": _estimate_tokens(body), "output_tokens": reply.output_tokens()}
        if body.get("stream"):
            return await self._stream(request, reply, model, usage)
        return web.json_response(_message_json(reply, model, usage))

    async def _stream(
        self, request: web.Request, reply: ModelReply, model: str, usage: dict[str, int]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        for event, data in _sse_events(reply, model, usage):
            payload = f"event: {event}\ndata: {json.dumps(data)}\n\n"
            try:
                await response.write(payload.encode())
            except (ConnectionResetError, ConnectionError):
                log.info("client went away during a streamed reply")
                return response
        await response.write_eof()
        return response

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        self._record(request, 200 if body is not None else 400)
        if body is None:
            return _error(400, "invalid_request_error", "request body must be a JSON object")
        return web.json_response({"input_tokens": _estimate_tokens(body)})

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request, 200)
        return web.json_response({"status": "ok", "model": self.model.name})

    async def _unknown(self, request: web.Request) -> web.Response:
        self._record(request, 404)
        log.info("unknown request %s %s", request.method, request.path)
        return _error(404, "not_found_error", f"no such endpoint: {request.method} {request.path}")


# -- wire format -----------------------------------------------------------------------------


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": message}}, status=status
    )


def _estimate_tokens(body: dict[str, Any]) -> int:
    # Four characters a token is the usual rule of thumb; only the order of magnitude matters.
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


def _block_json(block: TextBlock | ToolUseBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}


def _message_json(reply: ModelReply, model: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [_block_json(block) for block in reply.content],
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _CHUNK):
        yield text[start : start + _CHUNK]


def _sse_events(
    reply: ModelReply, model: str, usage: dict[str, int]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The event sequence of one streamed message, as the real API sends it."""
    start = _message_json(ModelReply((), reply.stop_reason), model, dict(usage, output_tokens=1))
    start["stop_reason"] = None
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    for index, block in enumerate(reply.content):
        if isinstance(block, TextBlock):
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": part} for part in _chunks(block.text)]
        else:
            opening = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [
                {"type": "input_json_delta", "partial_json": part}
                for part in _chunks(json.dumps(block.input))
            ]
        yield "content_block_start", {
            "type": "content_block_start",
            "index": index,
            "content_block": opening,
        }
        for delta in deltas:
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield "message_stop", {"type": "message_stop"}


# -- running it outside an event loop ---------------------------------------------------------


class ThreadedModelServer:
    """A :class:`ModelServer` on its own event loop in a daemon thread, for synchronous code.

    ``with ThreadedModelServer(DemoModel()) as srv: srv.base_url``.
    """

    def __init__(
        self, model: ScriptedModel | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.server = ModelServer(model, host=host, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="model-server")

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests

    def inject_faults(self, faults: Sequence[Fault]) -> None:
        """Queue faults; they apply from the next request on (this returns once queued)."""

        async def inject() -> None:
            self.server.inject_faults(list(faults))

        asyncio.run_coroutine_threadsafe(inject(), self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedModelServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_MODELS = {"demo", "echo-complete", "no-progress"}


def _model_from_args(name: str, delay: float) -> ScriptedModel:
    inner: ScriptedModel
    if name == "echo-complete":
        inner = EchoCompleteModel()
    elif name == "no-progress":
        inner = NoProgressModel()
    else:
        inner = DemoModel()
    return SlowModel(delay, inner) if delay > 0 else inner


async def _serve(host: str, port: int, model: ScriptedModel) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ModelServer(model, host=host, port=port) as server:
        sys.stdout.write(server.base_url + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ralph_uv.demo.model_server``: serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m ralph_uv.demo.model_server",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", choices=sorted(_MODELS), default="demo")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, _model_from_args(args.model, args.delay)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
