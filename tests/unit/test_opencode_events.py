"""opencode's events and errors as the backend reads them, on shapes recorded from a real
``opencode serve`` 1.18 (trimmed to the fields that matter): which event ends an iteration,
the transcript rendered from them, and how reported errors map to failure kinds."""

from __future__ import annotations

from typing import Any

import pytest

from ralph_uv.agents.base import FailureKind
from ralph_uv.agents.opencode import _classify_error, is_iteration_end
from ralph_uv.agents.opencode_transcript import Transcript

PARENT = "ses_e037f1189ffeJlVsMZQ0oHzhly"
CHILD = "ses_e037f0f28ffefef1zZST4VrMDi"
USER_MSG, ASSISTANT_MSG, FINAL_MSG = "msg_1fc80ef9", "msg_1fc80efd", "msg_1fc80f90"
CHILD_USER, CHILD_MSG, CHILD_FINAL = "msg_1fc80f0e", "msg_1fc80f14", "msg_1fc80f4e"
TASK_INPUT = {"description": "child work", "prompt": "write child.txt please",
              "subagent_type": "general"}
TASK_OUTPUT = (f'<task id="{CHILD}" state="completed">\n<task_result>\n'
               "All done. <promise>COMPLETE</promise>\n</task_result>\n</task>")


def _message(session: str, msg: str, role: str) -> dict[str, Any]:
    info = {"id": msg, "sessionID": session, "role": role}
    return {"type": "message.updated", "properties": {"sessionID": session, "info": info}}


def _part(session: str, part: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message.part.updated",
            "properties": {"sessionID": session, "part": {"sessionID": session, **part}}}


def _text(session: str, msg: str, part_id: str, text: str, ended: bool) -> dict[str, Any]:
    times = {"start": 1, "end": 2} if ended else {"start": 1}
    return _part(session, {"id": part_id, "messageID": msg, "type": "text", "text": text,
                           "time": times})


def _delta(session: str, msg: str, part_id: str, delta: str) -> dict[str, Any]:
    return {"type": "message.part.delta", "properties": {
        "sessionID": session, "messageID": msg, "partID": part_id, "field": "text",
        "delta": delta}}


def _tool(session: str, msg: str, part_id: str, tool: str, state: dict[str, Any]) -> dict[str, Any]:
    return _part(session, {"id": part_id, "messageID": msg, "type": "tool", "tool": tool,
                           "callID": f"call-{part_id}", "state": state})


def _status(session: str, kind: str) -> dict[str, Any]:
    return {"type": "session.status",
            "properties": {"sessionID": session, "status": {"type": kind}}}


def _idle(session: str) -> dict[str, Any]:
    return {"type": "session.idle", "properties": {"sessionID": session}}


# The main session delegates to a sub-agent with the ``task`` tool; the child session works,
# goes idle, and only then does the main session write its final answer and go idle.
RECORDED: list[dict[str, Any]] = [
    {"type": "server.connected", "properties": {}},
    {"type": "session.created",
     "properties": {"sessionID": PARENT, "info": {"id": PARENT, "title": "Ralph iteration 1"}}},
    _message(PARENT, USER_MSG, "user"),
    _text(PARENT, USER_MSG, "prt_u1", "SUBAGENT please", ended=False),
    _status(PARENT, "busy"),
    _message(PARENT, ASSISTANT_MSG, "assistant"),
    _tool(PARENT, ASSISTANT_MSG, "prt_task", "task", {"status": "pending", "input": {}}),
    {"type": "session.created", "properties": {"sessionID": CHILD, "info": {
        "id": CHILD, "parentID": PARENT, "title": "child work (@general subagent)"}}},
    _tool(PARENT, ASSISTANT_MSG, "prt_task", "task",
          {"status": "running", "input": TASK_INPUT, "title": "child work"}),
    _message(CHILD, CHILD_USER, "user"),
    _text(CHILD, CHILD_USER, "prt_cu", "write child.txt please", ended=False),
    _status(CHILD, "busy"),
    _message(CHILD, CHILD_MSG, "assistant"),
    _text(CHILD, CHILD_MSG, "prt_c1", "", ended=False),
    _delta(CHILD, CHILD_MSG, "prt_c1", "I will write a file."),
    _text(CHILD, CHILD_MSG, "prt_c1", "I will write a file.", ended=True),
    _tool(CHILD, CHILD_MSG, "prt_w", "write", {"status": "pending", "input": {}}),
    _tool(CHILD, CHILD_MSG, "prt_w", "write",
          {"status": "running", "input": {"filePath": "hello.txt", "content": "hi\n"}}),
    _tool(CHILD, CHILD_MSG, "prt_w", "write",
          {"status": "completed", "input": {"filePath": "hello.txt", "content": "hi\n"},
           "output": "Wrote file successfully.", "title": "hello.txt"}),
    _message(CHILD, CHILD_FINAL, "assistant"),
    _text(CHILD, CHILD_FINAL, "prt_c2", "", ended=False),
    _delta(CHILD, CHILD_FINAL, "prt_c2", "All done. <promise>COMPLETE</promise>"),
    _text(CHILD, CHILD_FINAL, "prt_c2", "All done. <promise>COMPLETE</promise>", ended=True),
    _status(CHILD, "busy"),
    _status(CHILD, "idle"),
    _idle(CHILD),
    _tool(PARENT, ASSISTANT_MSG, "prt_task", "task",
          {"status": "completed", "input": TASK_INPUT, "output": TASK_OUTPUT,
           "title": "child work"}),
    _status(PARENT, "busy"),
    _message(PARENT, FINAL_MSG, "assistant"),
    _text(PARENT, FINAL_MSG, "prt_p2", "", ended=False),
    _delta(PARENT, FINAL_MSG, "prt_p2", "All done. "),
    _delta(PARENT, FINAL_MSG, "prt_p2", "<promise>COMPLETE</promise>"),
    _text(PARENT, FINAL_MSG, "prt_p2", "All done. <promise>COMPLETE</promise>", ended=True),
    _status(PARENT, "busy"),
    _status(PARENT, "idle"),
    _idle(PARENT),
]


def _render(events: list[dict[str, Any]], our: str = PARENT) -> str:
    out = bytearray()
    transcript = Transcript(out.extend)
    transcript.our_session = our
    for event in events:
        transcript.render(event)
    transcript.finish()
    assert transcript.bytes_out == len(out)
    return out.decode()


def test_only_our_sessions_idle_ends_the_iteration() -> None:
    """In the recorded run the child's idle comes first and does not end the iteration; the
    first ending event is our own session's idle status, after our final answer."""
    ends = [i for i, event in enumerate(RECORDED) if is_iteration_end(event, PARENT)]
    assert ends == [len(RECORDED) - 2, len(RECORDED) - 1]
    child_ends = [i for i, event in enumerate(RECORDED) if is_iteration_end(event, CHILD)]
    assert child_ends
    assert child_ends[-1] < ends[0]


@pytest.mark.parametrize(
    "event",
    [
        _status(PARENT, "busy"),
        {"type": "session.status", "properties": {"sessionID": PARENT, "status": {
            "type": "retry", "attempt": 1, "message": "scripted 429", "next": 1}}},
        {"type": "session.idle", "properties": {}},
        {"type": "session.idle"},
        {"type": "session.idle", "properties": {"sessionID": PARENT.upper()}},
        {"type": "session.status", "properties": {"sessionID": PARENT, "status": "idle"}},
        {"type": "session.error", "properties": {"sessionID": PARENT, "error": {}}},
    ],
)
def test_events_that_do_not_end_the_iteration(event: dict[str, Any]) -> None:
    """Busy and retry states, errors, and idle events without our exact id are not the end."""
    assert not is_iteration_end(event, PARENT)


def test_transcript_of_the_recorded_run() -> None:
    """The transcript streams our text, shows each tool call with its input and abbreviated
    output, indents the sub-agent's work, skips the prompts, and ends lines with CRLF."""
    expected = (
        "  │ [opencode] sub-agent started: child work (@general subagent)\n"
        "→ task child work\n"
        "  │ I will write a file.\n"
        "  │ → write hello.txt\n"
        "  │   Wrote file successfully.\n"
        "  │ All done. <promise>COMPLETE</promise>\n"
        f'  <task id="{CHILD}" state="completed">\n'
        "  <task_result>\n"
        "  All done. <promise>COMPLETE</promise>\n"
        "  </task_result>\n"
        "  </task>\n"
        "All done. <promise>COMPLETE</promise>\n"
    ).replace("\n", "\r\n")
    assert _render(RECORDED) == expected


def test_text_whose_deltas_were_missed_is_written_when_it_ends() -> None:
    """After a reconnect the deltas of a part may be gone: the part's final text fills in
    exactly what the stream did not show."""
    events = [
        _message(PARENT, FINAL_MSG, "assistant"),
        _text(PARENT, FINAL_MSG, "prt_a", "", ended=False),
        _delta(PARENT, FINAL_MSG, "prt_a", "Hello "),
        _text(PARENT, FINAL_MSG, "prt_a", "Hello world\nsecond line", ended=True),
        _text(PARENT, FINAL_MSG, "prt_b", "never streamed", ended=True),
    ]
    assert _render(events) == "Hello world\r\nsecond line\r\nnever streamed\r\n"


def test_tool_errors_long_output_and_other_sessions() -> None:
    """A failed tool shows its error; long output is cut to a few lines; events of a session
    outside our family (another client's) are not shown."""
    long_output = "\n".join(f"line {i}" for i in range(20))
    events = [
        _message(PARENT, ASSISTANT_MSG, "assistant"),
        _tool(PARENT, ASSISTANT_MSG, "prt_1", "bash",
              {"status": "error", "input": {"command": "false\necho never"}, "error": "exit 1"}),
        _tool(PARENT, ASSISTANT_MSG, "prt_2", "bash",
              {"status": "completed", "input": {"command": "seq 20"}, "output": long_output}),
        _tool("ses_other", "msg_x", "prt_3", "bash",
              {"status": "completed", "input": {"command": "rm -rf /"}, "output": "x"}),
    ]
    text = _render(events)
    assert "→ bash false …\r\n  ✗ exit 1\r\n" in text
    assert "  line 7\r\n  … (12 more lines)\r\n" in text
    assert "line 8" not in text
    assert "rm -rf" not in text


def test_retries_errors_and_permission_requests_are_noted_once() -> None:
    """Retry states, errors (opencode may send the same error twice) and permission requests
    appear as [opencode] lines."""
    error = {"name": "UnknownError", "data": {"message": "Model not found: anthropic/nope."}}
    events = [
        {"type": "session.status", "properties": {"sessionID": PARENT, "status": {
            "type": "retry", "attempt": 2, "message": "Cannot connect to API", "next": 0}}},
        {"type": "session.error", "properties": {"sessionID": PARENT, "error": error}},
        {"type": "session.error", "properties": {"sessionID": PARENT, "error": error}},
        {"type": "permission.asked", "properties": {
            "id": "per_1", "sessionID": PARENT, "permission": "bash", "patterns": ["git push"]}},
    ]
    assert _render(events) == (
        "[opencode] retrying in 0s (attempt 2): Cannot connect to API\r\n"
        "[opencode] error: UnknownError: Model not found: anthropic/nope.\r\n"
        "[opencode] waiting for permission: bash git push (answer it with 'opencode attach')\r\n"
    )


# Errors as opencode reported them (the ``error`` of session.error / of the assistant message).
_API_401 = {"name": "APIError", "data": {
    "message": "invalid x-api-key", "statusCode": 401, "isRetryable": False,
    "responseHeaders": {"content-type": "application/json"},
    "responseBody": '{"type": "error", "error": {"type": "authentication_error"}}'}}
_API_429 = {"name": "APIError", "data": {
    "message": "Number of requests has exceeded your rate limit.", "statusCode": 429,
    "isRetryable": True, "responseHeaders": {"retry-after": "20"}}}
_API_529 = {"name": "APIError", "data": {"message": "Overloaded", "statusCode": 529,
                                         "isRetryable": True, "responseHeaders": {}}}
_REFUSED = {"name": "APIError", "data": {
    "message": "Cannot connect to API: Unable to connect. Is the computer able to access the url?",
    "isRetryable": True, "metadata": {"url": "http://127.0.0.1:18555/v1/messages"}}}
_NOT_FOUND = {"name": "UnknownError", "data": {"message": "Model not found: anthropic/nope-9."}}
_PROVIDER_AUTH = {"name": "ProviderAuthError",
                  "data": {"providerID": "anthropic", "message": "no credentials"}}
_OUTPUT_LENGTH = {"name": "MessageOutputLengthError", "data": {}}


@pytest.mark.parametrize(
    ("error", "kind", "retry_after", "detail"),
    [
        (_API_401, FailureKind.AUTH, None, "APIError: invalid x-api-key (HTTP 401)"),
        (_API_429, FailureKind.RATE_LIMIT, 20.0, "(HTTP 429)"),
        (_API_529, FailureKind.RATE_LIMIT, None, "Overloaded (HTTP 529)"),
        (_REFUSED, FailureKind.NETWORK, None, "Cannot connect to API"),
        (_NOT_FOUND, FailureKind.CRASH, None, "UnknownError: Model not found: anthropic/nope-9."),
        (_PROVIDER_AUTH, FailureKind.AUTH, None, "ProviderAuthError: no credentials"),
        (_OUTPUT_LENGTH, FailureKind.CRASH, None, "MessageOutputLengthError"),
    ],
)
def test_reported_errors_map_to_failure_kinds(
    error: dict[str, Any], kind: FailureKind, retry_after: float | None, detail: str
) -> None:
    """Auth, rate-limit, network and other errors from opencode get the right failure kind,
    a one-line detail and, for rate limits, the server's retry-after."""
    got_kind, got_detail, got_retry = _classify_error(error)
    assert got_kind == kind
    assert detail in got_detail
    assert "\n" not in got_detail
    assert got_retry == retry_after


def test_unknown_error_with_rate_limit_words_is_a_rate_limit() -> None:
    """Without a status code the words decide, as for any agent's output."""
    error = {"name": "UnknownError", "data": {"message": "429 Too Many Requests: rate limit"}}
    assert _classify_error(error)[0] == FailureKind.RATE_LIMIT
