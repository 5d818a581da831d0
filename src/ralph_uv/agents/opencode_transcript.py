"""A readable transcript of an opencode session, rendered from its server-sent events.

What an attached person sees of an HTTP-driven agent: the assistant's text as it streams, each
tool call with its input and an abbreviated output, retries, errors, permission requests, and
the work of sub-agents (child sessions) indented under the call that started them. Events of
sessions outside our session's family are ignored. Output is terminal text with CRLF line ends,
like the PTY agents' output in the same journal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ralph_uv.agents.base import OutputSink

__all__ = ["Transcript"]

_CHILD_PREFIX = "  │ "
_MAX_OUTPUT_LINES = 8
_MAX_LINE = 200


def _short(text: str, limit: int = _MAX_LINE) -> str:
    text = text.strip()
    first, _, rest = text.partition("\n")
    if rest:
        first += " …"
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _describe_input(tool: str, args: Mapping[str, Any]) -> str:
    for key in ("command", "filePath", "pattern", "url", "description", "path", "name"):
        value = args.get(key)
        if isinstance(value, str) and value:
            if key == "pattern" and isinstance(args.get("path"), str):
                return _short(f"{value} in {args['path']}")
            return _short(value)
    if tool == "todowrite" and isinstance(args.get("todos"), list):
        return f"{len(args['todos'])} todos"
    return _short(json.dumps(args, ensure_ascii=False)) if args else ""


def _abbreviate(output: str) -> list[str]:
    lines = output.strip("\n").splitlines()
    shown = [_short(line) if line.strip() else "" for line in lines[:_MAX_OUTPUT_LINES]]
    if len(lines) > _MAX_OUTPUT_LINES:
        shown.append(f"… ({len(lines) - _MAX_OUTPUT_LINES} more lines)")
    return shown


class Transcript:
    """Renders events to ``sink``; set :attr:`our_session` once the session id is known."""

    def __init__(self, sink: OutputSink) -> None:
        self._sink = sink
        self.bytes_out = 0
        self._our = ""
        self._family: set[str] = set()
        self._roles: dict[str, str] = {}
        self._streamed: dict[str, str] = {}  # text part id -> text written so far
        self._finished_parts: set[str] = set()
        self._tool_state: dict[str, str] = {}  # tool part id -> last status rendered
        self._notes: set[str] = set()
        self._at_line_start = True

    @property
    def our_session(self) -> str:
        return self._our

    @our_session.setter
    def our_session(self, session_id: str) -> None:
        self._our = session_id
        self._family.add(session_id)

    # -- output ------------------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if not text:
            return
        data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace")
        self.bytes_out += len(data)
        self._at_line_start = text.endswith("\n")
        self._sink(data)

    def _line(self, text: str, session_id: str = "") -> None:
        if not self._at_line_start:
            self._emit("\n")
        prefix = _CHILD_PREFIX if session_id and session_id != self._our else ""
        self._emit("".join(f"{prefix}{line}\n" for line in text.split("\n")))

    def note(self, text: str, session_id: str = "") -> None:
        """A line from ralph-uv about the agent (not the agent's own words)."""
        self._line(f"[opencode] {text}", session_id)

    def finish(self) -> None:
        """End on a fresh line, so what follows in the journal starts cleanly."""
        if not self._at_line_start:
            self._emit("\n")

    # -- events ------------------------------------------------------------------------------

    def render(self, event: Mapping[str, Any]) -> None:
        """Render one event (the parsed JSON of one ``/event`` message)."""
        kind = event.get("type")
        props = event.get("properties")
        if not isinstance(kind, str) or not isinstance(props, Mapping):
            return
        if kind == "session.created":
            self._on_session_created(props)
        elif kind == "message.updated":
            info = props.get("info")
            if isinstance(info, Mapping) and isinstance(info.get("id"), str):
                self._roles[info["id"]] = str(info.get("role"))
        elif kind == "message.part.delta":
            self._on_delta(props)
        elif kind == "message.part.updated":
            part = props.get("part")
            if isinstance(part, Mapping) and part.get("sessionID") in self._family:
                self._on_part(part)
        elif props.get("sessionID") in self._family:
            self._on_session_event(kind, props, str(props["sessionID"]))

    def _on_session_created(self, props: Mapping[str, Any]) -> None:
        info = props.get("info")
        if not isinstance(info, Mapping) or info.get("parentID") not in self._family:
            return
        child = str(info.get("id"))
        self._family.add(child)
        self.note(f"sub-agent started: {info.get('title') or child}", child)

    def _on_session_event(self, kind: str, props: Mapping[str, Any], session_id: str) -> None:
        if kind == "session.status":
            status = props.get("status")
            if isinstance(status, Mapping) and status.get("type") == "retry":
                wait = ""
                if isinstance(status.get("next"), int | float):
                    wait = f" in {max(0.0, status['next'] / 1000 - time.time()):.0f}s"
                self.note(
                    f"retrying{wait} (attempt {status.get('attempt')}): "
                    f"{_short(str(status.get('message', '')))}",
                    session_id,
                )
        elif kind == "session.error":
            error = props.get("error")
            if isinstance(error, Mapping):
                data = error.get("data")
                message = data.get("message") if isinstance(data, Mapping) else None
                text = f"error: {error.get('name')}: {_short(str(message or ''))}"
                if text not in self._notes:  # opencode may report the same error twice
                    self._notes.add(text)
                    self.note(text, session_id)
        elif kind == "permission.asked":
            patterns = props.get("patterns")
            what = ", ".join(map(str, patterns)) if isinstance(patterns, list) else ""
            self.note(
                f"waiting for permission: {props.get('permission')} {what} "
                "(answer it with 'opencode attach')",
                session_id,
            )
        elif kind == "question.asked":
            self.note("waiting for an answer to a question (answer it with 'opencode attach')",
                      session_id)

    def _on_delta(self, props: Mapping[str, Any]) -> None:
        part_id = props.get("partID")
        delta = props.get("delta")
        if (
            props.get("sessionID") != self._our
            or props.get("field") != "text"
            or not isinstance(delta, str)
            or part_id not in self._streamed
            or part_id in self._finished_parts
        ):
            return
        self._streamed[part_id] += delta
        self._emit(delta)

    def _on_part(self, part: Mapping[str, Any]) -> None:
        part_id = str(part.get("id"))
        session_id = str(part.get("sessionID"))
        kind = part.get("type")
        if kind == "text":
            if self._roles.get(str(part.get("messageID"))) == "assistant" and not part.get(
                "synthetic"
            ):
                self._on_text(part_id, session_id, part)
        elif kind == "tool":
            self._on_tool(part_id, session_id, part)

    def _on_text(self, part_id: str, session_id: str, part: Mapping[str, Any]) -> None:
        if part_id in self._finished_parts:
            return
        text = str(part.get("text") or "")
        times = part.get("time")
        ended = isinstance(times, Mapping) and times.get("end") is not None
        if session_id != self._our:
            if ended and text.strip():
                self._finished_parts.add(part_id)
                self._line(text.strip(), session_id)
            return
        streamed = self._streamed.setdefault(part_id, "")
        if not ended:
            return
        self._finished_parts.add(part_id)
        # Deltas may have been missed (a reconnect); write what the stream did not show.
        rest = text[len(streamed) :] if text.startswith(streamed) else "\n" + text
        self._emit(rest)
        self.finish()

    def _on_tool(self, part_id: str, session_id: str, part: Mapping[str, Any]) -> None:
        state = part.get("state")
        if not isinstance(state, Mapping):
            return
        status = str(state.get("status"))
        previous = self._tool_state.get(part_id)
        if status == "pending" or previous in ("completed", "error"):
            return
        self._tool_state[part_id] = status
        tool = str(part.get("tool"))
        if previous is None:
            args = state.get("input")
            described = _describe_input(tool, args if isinstance(args, Mapping) else {})
            self._line(f"→ {tool} {described}".rstrip(), session_id)
        if status == "completed":
            output = state.get("output")
            lines = _abbreviate(output) if isinstance(output, str) else []
            if lines:
                self._line("\n".join(f"  {line}" for line in lines), session_id)
        elif status == "error":
            self._line(f"  ✗ {_short(str(state.get('error', 'failed')))}", session_id)
