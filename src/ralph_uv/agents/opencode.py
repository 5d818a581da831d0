"""OpenCode, driven over the HTTP API of ``opencode serve`` (DESIGN §7).

One server per loop (:mod:`ralph_uv.agents.opencode_server`), started by the first iteration in
the loop's working directory and stopped by :meth:`OpenCodeBackend.aclose`. Each iteration:

1. ``GET /event`` — subscribe to the server-sent events and wait for the first one
   (``server.connected``), so nothing of our session is missed;
2. ``POST /session`` — a fresh session, so each iteration starts with a fresh context;
3. ``POST /session/{id}/prompt_async`` — the prompt (``204``; the work runs in the background);
4. events of our session and of its sub-agents' child sessions become a readable transcript
   (:mod:`ralph_uv.agents.opencode_transcript`); the iteration ends when *our* session goes idle
   (``session.idle``, or ``session.status`` with ``idle``, carrying our id — a child session's
   idle does not count, :func:`is_iteration_end`). ``GET /session/status`` and
   ``GET /session/{id}/message`` are polled every few seconds in case the stream drops;
5. ``GET /session/{id}/message`` — final text (the last assistant message's text parts), token
   usage and cost (summed over our assistant messages), and the error opencode reported, if any.

:meth:`OpenCodeSession.terminate` sends ``POST /session/{id}/abort``. ``opencode attach`` reaches
the server with :attr:`OpenCodeBackend.server_url` and :attr:`OpenCodeBackend.password` (user
``opencode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    FailureKind,
    IterationRequest,
    OutputSink,
    Usage,
)
from ralph_uv.agents.detect import find_binary
from ralph_uv.agents.failures import classify, parse_retry_after
from ralph_uv.agents.opencode_server import USERNAME, OpenCodeServer, OpenCodeServerError
from ralph_uv.agents.opencode_transcript import Transcript
from ralph_uv.agents.sse import iter_sse
from ralph_uv.config import Config
from ralph_uv.errors import AgentNotFoundError, RalphError

__all__ = [
    "DEFAULT_MODEL",
    "USERNAME",
    "OpenCodeBackend",
    "OpenCodeServerError",
    "OpenCodeSession",
    "is_iteration_end",
]

log = logging.getLogger("ralph_uv.agents.opencode")

DEFAULT_MODEL = "anthropic/claude-sonnet-4-5"

# Everything allowed except asking a person a question: nobody answers in an unattended loop.
_YOLO_PERMISSION = {
    "*": "allow",
    "external_directory": "allow",
    "doom_loop": "allow",
    "question": "deny",
}
_SUBSCRIBE_TIMEOUT = 15.0
_SETTLE_TIMEOUT = 3.0  # opencode may finish writing the last message just after going idle


def is_iteration_end(event: Mapping[str, Any], session_id: str) -> bool:
    """True when ``event`` says that session ``session_id`` went idle.

    Idle events of other sessions — a sub-agent's child session, another client's session on
    the same server — do not end the iteration.
    """
    props = event.get("properties")
    if not isinstance(props, Mapping) or props.get("sessionID") != session_id:
        return False
    if event.get("type") == "session.idle":
        return True
    if event.get("type") == "session.status":
        status = props.get("status")
        return isinstance(status, Mapping) and status.get("type") == "idle"
    return False


def _split_model(name: str) -> dict[str, str]:
    provider, slash, model = name.partition("/")
    if not slash:  # a bare model name, as the claude agent takes it
        provider, model = "anthropic", name
    return {"providerID": provider, "modelID": model}


class OpenCodeBackend(AgentBackend):
    """The ``opencode`` agent: one ``opencode serve`` per loop, one session per iteration.

    ``command`` is the program that takes ``serve …`` (default: ``opencode`` from ``PATH`` or
    the usual install places). ``model`` (``provider/model``) applies when an iteration names
    none; without either, the ``model`` of the user's opencode config is used, else
    :data:`DEFAULT_MODEL`. A bare model name means ``anthropic/<name>``. ``provider_config`` is
    opencode configuration (``{"provider": {...}}``) handed to the server in
    ``OPENCODE_CONFIG_CONTENT`` over the user's own config; nothing is written to the project or
    the home folder. ``env`` adds variables for the server. The environment, ``yolo`` and the
    working directory of the first iteration hold for the server's lifetime.
    """

    name = "opencode"

    def __init__(
        self,
        config: Config | None = None,
        *,
        command: Sequence[str] | None = None,
        model: str | None = None,
        provider_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        poll_interval: float = 3.0,
    ) -> None:
        self.model = model
        self.provider_config = dict(provider_config) if provider_config is not None else None
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.grace = config.terminate_grace if config is not None else 5.0
        self._command = list(command) if command is not None else None
        self._env = dict(env or {})
        self._password = secrets.token_urlsafe(32)
        self._server: OpenCodeServer | None = None
        self._configured_model: str | None = None
        self._session: OpenCodeSession | None = None
        self._lock = asyncio.Lock()
        # Told (url, password) when the server answers and (None, password) when it stops: the
        # runner publishes the server for `opencode attach` through ralphd.
        self.on_server: Callable[[str | None, str], None] | None = None

    @property
    def server_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the running server (for ``opencode attach``), else None."""
        return self._server.url if self._server is not None and self._server.running else None

    @property
    def password(self) -> str:
        """The server's basic-auth password (user ``opencode``); the same for the loop's life."""
        return self._password

    @property
    def server(self) -> OpenCodeServer | None:
        """The server process (its ``pid``, ``log_path``), once started."""
        return self._server

    async def start_server(
        self,
        cwd: Path,
        loop_dir: Path,
        *,
        yolo: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> OpenCodeServer:
        """Start ``opencode serve`` unless it runs; return it once it answers health checks.

        Raises :class:`OpenCodeServerError` (naming the log file) when it exits early or does
        not answer within ``startup_timeout``; :class:`AgentNotFoundError` without opencode.
        """
        async with self._lock:
            if self._server is not None and self._server.running:
                return self._server
            if self._server is not None:
                await self._server.stop(grace=1.0)
            server = OpenCodeServer(
                await asyncio.to_thread(self._program, cwd),
                cwd=cwd,
                loop_dir=loop_dir,
                password=self._password,
                env=self._server_env(yolo, env or {}),
                startup_timeout=self.startup_timeout,
            )
            self._server = server
            await server.start()
            if self.on_server is not None:
                self.on_server(server.url, self._password)
            with contextlib.suppress(OpenCodeServerError):
                config = await server.call("GET", "/config", params={"directory": str(server.cwd)})
                if isinstance(config, dict) and isinstance(config.get("model"), str):
                    self._configured_model = config["model"]
            return server

    async def start(self, request: IterationRequest, on_output: OutputSink) -> OpenCodeSession:
        server = await self.start_server(
            request.cwd, request.loop_dir, yolo=request.yolo, env=request.env
        )
        session = OpenCodeSession(
            server, request, on_output, self._model_for(request.model), self.poll_interval
        )
        self._session = session
        await session.begin()
        return session

    async def aclose(self) -> None:
        """Abort a running iteration and stop the server's whole process group."""
        session, self._session = self._session, None
        server, self._server = self._server, None
        try:
            if session is not None:
                if not session.ended:
                    with contextlib.suppress(RalphError):
                        await session.terminate(grace=min(self.grace, 2.0))
                await session.close()
        finally:
            if server is not None:
                await server.stop(grace=self.grace)
                if self.on_server is not None:
                    self.on_server(None, self._password)

    def _program(self, cwd: Path) -> list[str]:
        if self._command is not None:
            return self._command
        found = find_binary("opencode", cwd=cwd)
        if found is None:
            raise AgentNotFoundError(
                "opencode is not installed (no 'opencode' on PATH); install it with "
                "'npm install -g opencode-ai' or choose another agent"
            )
        return [str(found)]

    def _server_env(self, yolo: bool, extra: Mapping[str, str]) -> dict[str, str]:
        env = {**extra, **self._env}
        if self.provider_config is not None:
            env["OPENCODE_CONFIG_CONTENT"] = json.dumps(self.provider_config)
        if yolo:
            env["OPENCODE_PERMISSION"] = json.dumps(_YOLO_PERMISSION)
        return env

    def _model_for(self, requested: str | None) -> dict[str, str] | None:
        name = requested or self.model
        if name:
            return _split_model(name)
        if self._configured_model:
            return None  # the user's opencode config names one; opencode applies it
        return _split_model(DEFAULT_MODEL)


class OpenCodeSession(AgentSession):
    """One iteration: an opencode session prompted once. Made by :meth:`OpenCodeBackend.start`."""

    def __init__(
        self,
        server: OpenCodeServer,
        request: IterationRequest,
        on_output: OutputSink,
        model: dict[str, str] | None,
        poll_interval: float,
    ) -> None:
        self.id = ""
        self._server = server
        self._params = {"directory": str(server.cwd)}
        self._request = request
        self._model = model
        self._poll_interval = poll_interval
        self._transcript = Transcript(on_output)
        self._subscribed = asyncio.Event()
        self._ended = asyncio.Event()
        self._end_reason = ""
        self._seen_busy = False
        self._aborted = False
        self._errors: list[Mapping[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._result: AgentResult | None = None
        self._result_lock = asyncio.Lock()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def begin(self) -> None:
        """Subscribe to events, create the session and send the prompt."""
        try:
            self._tasks.append(asyncio.create_task(self._stream()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), _SUBSCRIBE_TIMEOUT)
            if not self._subscribed.is_set():
                raise OpenCodeServerError(
                    f"opencode serve at {self._server.url} sent no event within "
                    f"{_SUBSCRIBE_TIMEOUT:g}s of subscribing to GET /event"
                )
            title = f"Ralph iteration {self._request.iteration}"
            info = await self._call("POST", "/session", {"title": title})
            if not isinstance(info, dict) or not isinstance(info.get("id"), str):
                raise OpenCodeServerError("opencode serve created a session without an id")
            self.id = info["id"]
            self._transcript.our_session = self.id
            self._transcript.note(f"session {self.id} on {self._server.url}")
            body: dict[str, Any] = {"parts": [{"type": "text", "text": self._request.prompt}]}
            if self._model is not None:
                body["model"] = self._model
            await self._call("POST", f"/session/{self.id}/prompt_async", body)
            self._tasks.append(asyncio.create_task(self._poll()))
        except BaseException:
            self._end("failed to start")
            await self._stop_tasks()
            raise

    async def wait(self) -> AgentResult:
        async with self._result_lock:
            if self._result is None:
                await self._ended.wait()
                await self._stop_tasks()
                self._result = await self._build_result()
            return self._result

    async def terminate(self, grace: float = 5.0) -> None:
        """Abort the session; if opencode does not confirm within ``grace``, stop the server
        (the next iteration starts a new one)."""
        if self._ended.is_set():
            return
        self._aborted = True
        try:
            await self._call("POST", f"/session/{self.id}/abort", limit=max(grace, 1.0))
            await asyncio.wait_for(self._ended.wait(), grace)
        except (OpenCodeServerError, TimeoutError):
            log.warning("opencode did not confirm the abort of %s; stopping the server", self.id)
            await self._server.stop(grace=1.0)
            self._end("terminated")

    # -- internals ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop following the session (its event stream and polling); the result stays."""
        self._end("closed")
        await self._stop_tasks()

    async def _call(
        self, method: str, path: str, body: object = None, limit: float | None = None
    ) -> Any:
        return await self._server.call(method, path, params=self._params, body=body, limit=limit)

    def _end(self, reason: str) -> None:
        if not self._ended.is_set():
            self._end_reason = reason
            self._ended.set()

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _stream(self) -> None:
        """Read ``GET /event``, reconnecting when it drops, until the iteration ends."""
        delay = 0.5
        while not self._ended.is_set():
            try:
                async with self._server.stream("/event", self._params) as resp:
                    async for sse in iter_sse(resp.content):
                        self._subscribed.set()
                        delay = 0.5
                        self._on_event(sse.data)
                        if self._ended.is_set():
                            return
            except (aiohttp.ClientError, TimeoutError, RalphError) as exc:
                log.info("event stream of %s dropped (%s); reconnecting", self.id or "?", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_event(self, data: str) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self._transcript.render(event)
        props = event.get("properties")
        if not self.id or not isinstance(props, dict) or props.get("sessionID") != self.id:
            return
        kind = event.get("type")
        if kind == "session.status" and isinstance(props.get("status"), dict):
            self._seen_busy |= props["status"].get("type") in ("busy", "retry")
        elif kind == "session.error" and isinstance(props.get("error"), dict):
            self._errors.append(props["error"])
        if is_iteration_end(event, self.id):
            self._end("idle")

    async def _poll(self) -> None:
        """A safety net under the event stream: the server's life, status and messages."""
        assert self._server.exited is not None
        while not self._ended.is_set():
            done, _ = await asyncio.wait({self._server.exited}, timeout=self._poll_interval)
            if done:
                self._end("server exited")
                return
            try:
                statuses = await self._call("GET", "/session/status")
                status = statuses.get(self.id) if isinstance(statuses, dict) else None
                if isinstance(status, dict) and status.get("type") in ("busy", "retry"):
                    self._seen_busy = True
                    continue
                messages = await self._call("GET", f"/session/{self.id}/message")
            except OpenCodeServerError as exc:
                log.info("polling %s failed: %s", self.id, exc)
                continue
            # Not busy: either not started yet or finished; a completed answer tells them apart.
            if self._seen_busy or _last_assistant_completed(messages):
                self._end("idle (polled)")

    async def _fetch_messages(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while True:
            messages = await self._call("GET", f"/session/{self.id}/message")
            if not isinstance(messages, list):
                messages = []
            if _last_assistant_completed(messages) or time.monotonic() > deadline:
                return [m for m in messages if isinstance(m, dict)]
            await asyncio.sleep(0.1)

    async def _build_result(self) -> AgentResult:
        transcript = self._transcript
        if self._end_reason == "server exited" and not self._aborted:
            transcript.note(self._server.describe_exit())
            return AgentResult(None, failure=FailureKind.CRASH,
                               detail=self._server.describe_exit(),
                               output_bytes=transcript.bytes_out)
        try:
            messages = await self._fetch_messages() if self.id else []
        except OpenCodeServerError as exc:
            transcript.finish()
            if self._aborted:
                return AgentResult(None, detail="stopped; opencode serve was stopped too",
                                   output_bytes=transcript.bytes_out)
            return AgentResult(None, failure=FailureKind.NETWORK, detail=exc.message,
                               output_bytes=transcript.bytes_out)
        self._catch_up(messages)
        transcript.finish()
        assistant = [m["info"] for m in messages if _role(m) == "assistant"]
        final_text = _final_text(messages)
        usage = _usage(assistant)
        errors = [info["error"] for info in assistant if isinstance(info.get("error"), dict)]
        error = errors[-1] if errors else (self._errors[0] if self._errors else None)
        out = transcript.bytes_out
        if self._aborted or (error is not None and error.get("name") == "MessageAbortedError"):
            return AgentResult(None, final_text, detail="stopped: the session was aborted",
                               usage=usage, output_bytes=out)
        if error is not None:
            kind, detail, retry_after = _classify_error(error)
            return AgentResult(1, final_text, kind, detail, retry_after, usage, out)
        if not assistant:
            return AgentResult(0, failure=FailureKind.EMPTY_OUTPUT,
                               detail="opencode ended the session without an answer",
                               output_bytes=out)
        return AgentResult(0, final_text, usage=usage, output_bytes=out)

    def _catch_up(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Render from the final messages what the event stream did not show (it may have
        dropped, or the end may have been found by polling); what was shown is skipped."""
        for message in messages:
            info, parts = message.get("info"), message.get("parts")
            if not isinstance(info, dict) or not isinstance(parts, list):
                continue
            self._transcript.render({"type": "message.updated",
                                     "properties": {"sessionID": self.id, "info": info}})
            for part in parts:
                if isinstance(part, dict):
                    self._transcript.render({"type": "message.part.updated",
                                             "properties": {"sessionID": self.id, "part": part}})


def _role(message: Mapping[str, Any]) -> str | None:
    info = message.get("info")
    return info.get("role") if isinstance(info, dict) else None


def _last_assistant_completed(messages: object) -> bool:
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    info = messages[-1].get("info")
    if not isinstance(info, dict) or info.get("role") != "assistant":
        return False
    times = info.get("time")
    return isinstance(times, dict) and times.get("completed") is not None


def _final_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if _role(message) != "assistant":
            continue
        parts = message.get("parts")
        texts = [
            str(p.get("text") or "")
            for p in (parts if isinstance(parts, list) else [])
            if isinstance(p, dict) and p.get("type") == "text" and not p.get("synthetic")
        ]
        return "\n".join(t for t in texts if t)
    return ""


def _usage(assistant: Sequence[Mapping[str, Any]]) -> Usage | None:
    if not assistant:
        return None
    counts = [0, 0, 0, 0]  # input, output (with reasoning), cache read, cache write
    cost = 0.0
    for info in assistant:
        tokens = info.get("tokens")
        if isinstance(tokens, dict):
            cache = tokens.get("cache") if isinstance(tokens.get("cache"), dict) else {}
            assert isinstance(cache, dict)
            for i, value in enumerate((
                tokens.get("input"),
                (tokens.get("output") or 0) + (tokens.get("reasoning") or 0),
                cache.get("read"),
                cache.get("write"),
            )):
                counts[i] += int(value or 0)
        if isinstance(info.get("cost"), int | float):
            cost += float(info["cost"])
    return Usage(counts[0], counts[1], counts[2], counts[3], cost)


def _classify_error(error: Mapping[str, Any]) -> tuple[FailureKind, str, float | None]:
    """Map an error opencode reported (``{"name", "data": {...}}``) to a failure kind, a
    one-line detail and, for rate limits, the seconds to wait."""
    name = str(error.get("name") or "Error")
    data = error.get("data")
    data = data if isinstance(data, dict) else {}
    message = (str(data.get("message") or name).strip().splitlines() or [name])[0][:400]
    status = data.get("statusCode") if isinstance(data.get("statusCode"), int) else None
    detail = f"{name}: {message}" + (f" (HTTP {status})" if status else "")
    headers = data.get("responseHeaders")
    retry_after = _retry_after(headers) if isinstance(headers, dict) else None
    if name == "ProviderAuthError" or status in (401, 403):
        return FailureKind.AUTH, detail, None
    if status in (429, 529):
        return FailureKind.RATE_LIMIT, detail, retry_after
    if status is not None and (status >= 500 or status == 408):
        return FailureKind.NETWORK, detail, retry_after
    if name == "APIError" and status is None:  # no answer at all: refused, reset, timed out
        return FailureKind.NETWORK, detail, None
    # No status to go by: read the words, as for any agent's failing output.
    verdict = classify(1, f"{message}\n{data.get('responseBody') or ''}")
    if verdict.kind in (FailureKind.RATE_LIMIT, FailureKind.AUTH, FailureKind.NETWORK):
        return verdict.kind, detail, verdict.retry_after or retry_after
    return FailureKind.CRASH, detail, None


def _retry_after(headers: Mapping[str, Any]) -> float | None:
    lowered = {str(k).lower(): str(v).strip() for k, v in headers.items()}
    if re.fullmatch(r"\d+(\.\d+)?", lowered.get("retry-after-ms", "")):
        return float(lowered["retry-after-ms"]) / 1000
    if "retry-after" in lowered:
        return parse_retry_after(f"retry-after: {lowered['retry-after']}")
    return None
