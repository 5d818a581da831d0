"""Claude Code's stream-json events become a readable transcript, in any chunking."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ralph_uv.agents.base import Usage
from ralph_uv.agents.transcript import TranscriptRenderer


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "m", "cwd": "/repo"}
TEXT = {"type": "assistant", "message": {"id": "msg_1", "content": [
    {"type": "text", "text": "Working on TEXT-001.\nSecond line."}]}}
WRITE = {"type": "assistant", "message": {"id": "msg_1", "content": [
    {"type": "tool_use", "id": "t1", "name": "Write",
     "input": {"file_path": "/repo/a.py", "content": "a = 1\nb = 2\n"}}]}}
BASH = {"type": "assistant", "message": {"id": "msg_2", "content": [
    {"type": "tool_use", "id": "t2", "name": "Bash",
     "input": {"command": "git commit -m 'x'\necho done", "description": "Commit"}}]}}
RESULT_OK = {"type": "user", "message": {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "t2",
     "content": "\n".join(f"line {i}" for i in range(1, 8))}]}}
RESULT_ERR = {"type": "user", "message": {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
     "content": [{"type": "text", "text": "permission denied"}]}]}}
FINAL = {"type": "assistant", "message": {"id": "msg_3", "content": [
    {"type": "text", "text": "All done.\n\n<promise>COMPLETE</promise>"}]}}
DONE = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 2500,
        "num_turns": 3, "result": "All done.\n\n<promise>COMPLETE</promise>",
        "total_cost_usd": 0.0123,
        "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 5,
                  "cache_creation_input_tokens": 7}}
STREAM = b"".join(_line(e) for e in (INIT, TEXT, WRITE, RESULT_ERR, BASH, RESULT_OK, FINAL, DONE))


def _render(data: bytes, chunks: list[int] | None = None) -> tuple[str, TranscriptRenderer]:
    renderer = TranscriptRenderer(color=False)
    out = bytearray()
    pos = 0
    for size in chunks or [len(data)]:
        out += renderer.feed(data[pos : pos + size])
        pos += size
    out += renderer.feed(data[pos:])
    out += renderer.finish()
    return out.decode(), renderer


def test_events_are_rendered_as_transcript_lines() -> None:
    """Text, tool calls (with what they do), tool results and the result line all appear."""
    text, _ = _render(STREAM)
    lines = text.split("\r\n")
    assert "● Working on TEXT-001." in lines
    assert "  Second line." in lines
    assert "▶ Write: /repo/a.py (2 lines)" in lines
    assert "  ⎿ ✗ permission denied" in lines
    assert "▶ Bash: git commit -m 'x' …  # Commit" in lines
    assert "✔ done · 2.5s · 3 turns · 100 in / 20 out tokens · $0.0123" in lines
    assert '"type"' not in text


def test_long_tool_results_are_abbreviated() -> None:
    """Only the first lines of a tool result are shown, with a count of the rest."""
    text, _ = _render(STREAM)
    assert "  ⎿ line 1\r\n    line 2\r\n    line 3\r\n    … +4 lines\r\n" in text
    assert "line 4" not in text


def test_summary_carries_the_result_and_usage() -> None:
    """The renderer keeps the final answer and the usage of the ``result`` event."""
    _, renderer = _render(STREAM)
    summary = renderer.summary()
    assert summary.result_text == "All done.\n\n<promise>COMPLETE</promise>"
    assert not summary.is_error
    assert summary.usage == Usage(100, 20, 5, 7, 0.0123)
    assert summary.assistant_messages == 4  # one per assistant event
    assert summary.last_assistant_text.endswith("<promise>COMPLETE</promise>")


def test_error_results_and_retries_are_shown() -> None:
    """API retries get a warning line; an error result a failure line with the status."""
    retry = {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 2,
             "retry_delay_ms": 1500, "error_status": 429, "error": "rate_limit"}
    failed = {"type": "result", "subtype": "success", "is_error": True,
              "api_error_status": 429, "result": "API Error: Request rejected (429)"}
    text, renderer = _render(_line(retry) + _line(failed))
    assert "⚠ API error 429 (rate_limit); retry 1/2 in 1.5s" in text
    assert "✗ failed (429): API Error: Request rejected (429)" in text
    summary = renderer.summary()
    assert summary.is_error
    assert summary.api_error_status == 429
    assert summary.retries == 1


def test_non_json_lines_pass_through() -> None:
    """Lines that are not JSON events (warnings, a crash trace) are kept as they are."""
    text, renderer = _render(b"Warning: something odd\n{not json\n" + _line(INIT))
    assert text.startswith("Warning: something odd\r\n{not json\r\n")
    assert renderer.summary().events == 1


def test_a_final_line_without_newline_is_rendered_by_finish() -> None:
    """A last event cut off from its newline is still rendered when the stream ends."""
    renderer = TranscriptRenderer(color=False)
    assert renderer.feed(json.dumps(DONE).encode()) == b""
    assert renderer.finish().startswith("✔ done".encode())
    assert renderer.summary().result_text is not None


def test_color_marks_tool_calls() -> None:
    """With colour on, tool calls are wrapped in an escape sequence; off, they are plain."""
    colored = TranscriptRenderer(color=True).feed(_line(BASH))
    assert colored.startswith(b"\x1b[")
    assert b"\x1b[0m" in colored
    assert not TranscriptRenderer(color=False).feed(_line(BASH)).startswith(b"\x1b[")


@given(st.lists(st.integers(min_value=1, max_value=97), max_size=60))
def test_chunking_does_not_change_the_transcript(chunks: list[int]) -> None:
    """Whatever the read sizes, the rendered transcript is the same (multi-byte characters
    split across reads included)."""
    data = STREAM + _line({"type": "assistant", "message": {"content": [
        {"type": "text", "text": "naïve café — ✓"}]}})
    whole, _ = _render(data)
    chunked, _ = _render(data, chunks)
    assert chunked == whole
    assert "naïve café — ✓" in whole
