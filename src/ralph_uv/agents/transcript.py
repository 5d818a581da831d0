"""Claude Code's ``stream-json`` output rendered as a readable transcript.

``claude --print --output-format stream-json --verbose`` writes one JSON event a line: ``system``
(``init``, ``api_retry``), ``assistant`` messages (text, tool calls), ``user`` messages (tool
results) and a final ``result``. :class:`TranscriptRenderer` turns them into what a person
watching the loop wants to read::

    ● Working on TEXT-001: I will write textkit/slug.py.
    ▶ Write: /repo/textkit/slug.py (19 lines)
      ⎿ File created successfully at: /repo/textkit/slug.py
    ✔ done · 1.0s · 3 turns · 6067 in / 461 out tokens · $0.0418

It is sans-IO: feed it bytes in any chunking, get rendered bytes back. Lines that are not JSON
pass through unchanged. It also keeps what the backend needs afterwards: the ``result`` event
(final answer, error status, usage) and whether the agent said anything at all.

:func:`read_session_transcript` reads the other transcript format, the JSONL session file the
interactive Claude Code writes, for its final answer and token usage.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.agents.base import Usage

__all__ = [
    "TranscriptRenderer",
    "TranscriptSummary",
    "read_session_transcript",
    "usage_from_result",
]

log = logging.getLogger("ralph_uv.agents.transcript")

_EOL = "\r\n"  # the journal is replayed into terminals in raw mode
_MAX_RESULT_LINES = 3
_MAX_LINE = 160
_MAX_PENDING = 16 * 1024 * 1024  # a single event larger than this is passed through as text

_RESET = "\x1b[0m"
_STYLES = {"tool": "\x1b[36m", "dim": "\x1b[2m", "error": "\x1b[31m", "ok": "\x1b[32m",
           "warn": "\x1b[33m"}


@dataclass(frozen=True, slots=True)
class TranscriptSummary:
    """What the stream said about the run as a whole."""

    result_text: str | None  # the ``result`` event's text (the final answer, or the error)
    is_error: bool
    api_error_status: int | None
    usage: Usage | None
    last_assistant_text: str  # fallback when the stream ends without a ``result``
    events: int  # JSON events seen
    assistant_messages: int
    retries: int  # ``api_retry`` events


def _shorten(text: str, limit: int = _MAX_LINE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    if not lines:
        return ""
    more = " …" if len(lines) > 1 else ""
    return _shorten(lines[0]) + more


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from_result(event: dict[str, Any]) -> Usage | None:
    """Token usage and cost from a ``result`` event (or any ``{"usage": …}`` object)."""
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    cost = event.get("total_cost_usd")
    return Usage(
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=_int(usage.get("cache_creation_input_tokens")),
        cost_usd=float(cost) if isinstance(cost, int | float) else None,
    )


def _tool_summary(name: str, args: dict[str, Any]) -> str:
    """One line saying what a tool call does: the command, the file, the pattern."""
    for key in ("command", "file_path", "filePath", "path", "pattern", "url", "query",
                "description", "prompt"):
        value = args.get(key)
        if isinstance(value, str) and value:
            text = _first_line(value)
            content = args.get("content")
            if key in ("file_path", "filePath") and isinstance(content, str):
                text += f" ({len(content.splitlines())} lines)"
            description = args.get("description")
            if key == "command" and isinstance(description, str) and description:
                text += f"  # {_first_line(description)}"
            return f"{name}: {text}"
    if not args:
        return name
    return f"{name}: {_shorten(json.dumps(args, ensure_ascii=False))}"


def _result_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(block.get("text", "")) if block.get("type") == "text" else f"[{block.get('type')}]"
            for block in content
            if isinstance(block, dict)
        )
    return ""


class TranscriptRenderer:
    """Turns stream-json bytes into transcript bytes; see the module docstring."""

    def __init__(self, *, color: bool = True) -> None:
        self._color = color
        self._pending = bytearray()
        self._result: dict[str, Any] | None = None
        self._last_text = ""
        self._events = 0
        self._assistant_messages = 0
        self._retries = 0

    def feed(self, data: bytes) -> bytes:
        """Render every complete line in ``data`` (plus what earlier calls left pending)."""
        self._pending.extend(data)
        out: list[str] = []
        while True:
            newline = self._pending.find(b"\n")
            if newline < 0:
                break
            line = bytes(self._pending[:newline])
            del self._pending[: newline + 1]
            out.append(self._render_line(line))
        if len(self._pending) > _MAX_PENDING:
            out.append(self._render_line(bytes(self._pending)))
            self._pending.clear()
        return "".join(out).encode()

    def finish(self) -> bytes:
        """Render whatever is left after the stream ended without a final newline."""
        if not self._pending:
            return b""
        line = bytes(self._pending)
        self._pending.clear()
        return self._render_line(line).encode()

    def summary(self) -> TranscriptSummary:
        result = self._result or {}
        status = result.get("api_error_status")
        text = result.get("result")
        return TranscriptSummary(
            result_text=text if isinstance(text, str) else None,
            is_error=bool(result.get("is_error")) or result.get("subtype") not in (None, "success"),
            api_error_status=status if isinstance(status, int) else None,
            usage=usage_from_result(result) if self._result else None,
            last_assistant_text=self._last_text,
            events=self._events,
            assistant_messages=self._assistant_messages,
            retries=self._retries,
        )

    # -- rendering --------------------------------------------------------------------------

    def _style(self, kind: str, text: str) -> str:
        return f"{_STYLES[kind]}{text}{_RESET}" if self._color else text

    def _render_line(self, raw: bytes) -> str:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        stripped = line.strip()
        if not stripped:
            return ""
        event: object = None
        if stripped.startswith("{"):
            try:
                event = json.loads(stripped)
            except json.JSONDecodeError:
                event = None
        if not isinstance(event, dict):
            return line + _EOL
        self._events += 1
        lines = self._render_event(event)
        return "".join(f"{text}{_EOL}" for text in lines)

    def _render_event(self, event: dict[str, Any]) -> list[str]:
        kind = event.get("type")
        if kind == "assistant":
            return self._assistant(event)
        if kind == "user":
            return self._tool_results(event)
        if kind == "result":
            self._result = event
            return [self._result_line(event)]
        if kind == "system":
            return self._system(event)
        return []  # stream_event deltas, rate-limit notices and other bookkeeping

    def _system(self, event: dict[str, Any]) -> list[str]:
        subtype = event.get("subtype")
        if subtype == "init":
            model = event.get("model", "?")
            return [self._style("dim", f"● claude session {event.get('session_id', '?')} · "
                                       f"model {model} · {event.get('cwd', '')}")]
        if subtype == "api_retry":
            self._retries += 1
            delay = float(event.get("retry_delay_ms") or 0) / 1000
            return [self._style("warn", (
                f"⚠ API error {event.get('error_status', '?')} ({event.get('error', 'unknown')}); "
                f"retry {event.get('attempt', '?')}/{event.get('max_retries', '?')} in {delay:.1f}s"
            ))]
        return []

    def _assistant(self, event: dict[str, Any]) -> list[str]:
        message = event.get("message")
        if not isinstance(message, dict):
            return []
        self._assistant_messages += 1
        out: list[str] = []
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                text = str(block.get("text", "")).strip()
                if text:
                    self._last_text = text
                    first, *rest = text.splitlines()
                    out.append(f"● {first}")
                    out.extend(f"  {line}" for line in rest)
            elif block.get("type") == "tool_use":
                args = block.get("input")
                summary = _tool_summary(str(block.get("name", "?")),
                                        args if isinstance(args, dict) else {})
                out.append(self._style("tool", f"▶ {summary}"))
            elif block.get("type") == "thinking":
                out.append(self._style("dim", "✻ thinking…"))
        return out

    def _tool_results(self, event: dict[str, Any]) -> list[str]:
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            return []
        out: list[str] = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            lines = _result_text(block.get("content")).strip().splitlines() or ["(no output)"]
            shown = [_shorten(line) for line in lines[:_MAX_RESULT_LINES]]
            if len(lines) > _MAX_RESULT_LINES:
                shown.append(f"… +{len(lines) - _MAX_RESULT_LINES} lines")
            style = "error" if block.get("is_error") else "dim"
            prefix = "✗ " if block.get("is_error") else ""
            out.append(self._style(style, f"  ⎿ {prefix}{shown[0]}"))
            out.extend(self._style(style, f"    {line}") for line in shown[1:])
        return out

    def _result_line(self, event: dict[str, Any]) -> str:
        parts: list[str] = []
        duration = event.get("duration_ms")
        if isinstance(duration, int | float):
            parts.append(f"{duration / 1000:.1f}s")
        turns = event.get("num_turns")
        if isinstance(turns, int):
            parts.append(f"{turns} turn{'s' if turns != 1 else ''}")
        usage = usage_from_result(event)
        if usage is not None:
            parts.append(f"{usage.input_tokens} in / {usage.output_tokens} out tokens")
            if usage.cost_usd is not None:
                parts.append(f"${usage.cost_usd:.4f}")
        stats = " · ".join(parts)
        if event.get("is_error") or event.get("subtype") not in (None, "success"):
            status = event.get("api_error_status")
            reason = _first_line(str(event.get("result") or event.get("subtype") or "error"))
            code = f" ({status})" if status else ""
            return self._style("error", f"✗ failed{code}: {reason}" + (f" · {stats}" if stats
                                                                         else ""))
        return self._style("ok", f"✔ done · {stats}" if stats else "✔ done")


def read_session_transcript(path: Path) -> tuple[str, Usage | None]:
    """The final assistant answer and the summed usage from the session transcript (JSONL)
    the interactive Claude Code writes; ``("", None)`` when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        log.warning("cannot read the Claude Code transcript %s: %s", path, exc)
        return "", None
    usage_by_id: dict[str, dict[str, Any]] = {}
    texts_by_id: dict[str, list[str]] = {}
    last_id = ""
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        message = entry.get("message") if isinstance(entry, dict) else None
        if entry.get("type") != "assistant" or not isinstance(message, dict):
            continue
        msg_id = str(message.get("id") or entry.get("uuid") or len(usage_by_id))
        if isinstance(message.get("usage"), dict):
            usage_by_id[msg_id] = message["usage"]
        for block in message.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                texts_by_id.setdefault(msg_id, []).append(str(block["text"]))
                last_id = msg_id
    total: dict[str, int] = {}
    for usage in usage_by_id.values():
        parsed = usage_from_result({"usage": usage})
        if parsed is None:
            continue
        for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            total[field] = total.get(field, 0) + getattr(parsed, field)
    final = "\n".join(texts_by_id.get(last_id, []))
    return final, (Usage(**total) if total else None)
