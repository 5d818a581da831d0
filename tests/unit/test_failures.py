"""Failure classification of agent iterations, reset-time parsing and retry back-off."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ralph_uv.agents.base import FailureKind
from ralph_uv.agents.failures import (
    TAIL_CHARS,
    backoff_delay,
    classify,
    parse_retry_after,
    strip_ansi,
)

# 2025-01-01 12:00 UTC is 13:00 in Paris and 07:00 in Bogota.
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

RATE = FailureKind.RATE_LIMIT
AUTH = FailureKind.AUTH
NET = FailureKind.NETWORK
CRASH = FailureKind.CRASH

# What Claude Code's TUI writes around a message: colours, cursor moves, line erases.
TUI_LIMIT = (
    "\x1b[?25l\x1b[2K\x1b[1A\x1b[2K\x1b[G\x1b[38;2;215;119;87m⎿ \x1b[39m"
    "You've\x1b[1Chit\x1b[1Cyour\x1b[1Climit · resets 3pm (Europe/Paris)\x1b[0m\r\n"
    "\x1b[2m? for shortcuts\x1b[22m\r\n"
)

FAILURES = [
    # (exit status, output, stderr, expected kind, expected retry_after)
    pytest.param(1, "You've hit your limit · resets 3pm (Europe/Paris)\n", "", RATE, 7200.0,
                 id="claude-hit-your-limit"),
    pytest.param(0, TUI_LIMIT, "", RATE, 7200.0, id="claude-tui-banner-with-ansi-exit-0"),
    pytest.param(1, "Claude AI usage limit reached|1735736400\n", "", RATE, 3600.0,
                 id="claude-usage-limit-epoch"),
    pytest.param(1, "Claude usage limit reached. Your limit will reset at 3pm (America/Bogota).",
                 "", RATE, 8 * 3600.0, id="claude-usage-limit-old-wording"),
    pytest.param(1, "5-hour limit reached ∙ resets 3pm (Europe/Paris)", "", RATE, 7200.0,
                 id="claude-5-hour-limit"),
    pytest.param(1, "You've hit your weekly limit · resets Jan 3, 12pm (UTC)", "", RATE,
                 2 * 86400.0, id="weekly-limit-with-date"),
    pytest.param(1, "", 'API Error: 529 {"type":"error","error":{"type":"overloaded_error",'
                 '"message":"Overloaded"}}', RATE, None, id="overloaded-529-on-stderr"),
    pytest.param(1, 'API Error: 429 {"type":"error","error":{"type":"rate_limit_error"}}', "",
                 RATE, None, id="api-error-429"),
    pytest.param(2, "Error: 429 Too Many Requests. Please try again in 30s.", "", RATE, 30.0,
                 id="too-many-requests-try-again"),
    pytest.param(1, "openai.RateLimitError: Rate limit reached for gpt-4o", "retry-after: 20",
                 RATE, 20.0, id="retry-after-header"),
    pytest.param(1, "Error: rate_limit exceeded, resets in 2h 5m", "", RATE, 7500.0,
                 id="resets-in-duration"),
    pytest.param(1, "ERROR: quota exceeded for this project", "", RATE, None,
                 id="quota-exceeded"),
    pytest.param(1, "Error: the model is overloaded, please retry", "", RATE, None,
                 id="overloaded-word"),
    pytest.param(1, "Invalid API key · Please run /login", "", AUTH, None, id="invalid-api-key"),
    pytest.param(0, "Not logged in · Please run /login\n", "", AUTH, None,
                 id="not-logged-in-exit-0"),
    pytest.param(1, 'API Error: 401 {"type":"error","error":{"type":"authentication_error",'
                 '"message":"invalid x-api-key"}}', "", AUTH, None, id="api-error-401"),
    pytest.param(1, "OAuth token has expired. Please obtain a new token or refresh your "
                 "existing token.", "", AUTH, None, id="oauth-expired"),
    pytest.param(1, "Error: Request failed with status code 403", "", AUTH, None,
                 id="http-403"),
    pytest.param(1, "API Error: Connection error.", "", NET, None, id="connection-error"),
    pytest.param(1, "TypeError: fetch failed\n  cause: Error: getaddrinfo ENOTFOUND "
                 "api.anthropic.com", "", NET, None, id="fetch-failed-enotfound"),
    pytest.param(1, "", "Error: connect ECONNREFUSED 127.0.0.1:8080", NET, None,
                 id="econnrefused-on-stderr"),
    pytest.param(1, "request to https://api.example.com failed, reason: connect ETIMEDOUT",
                 "", NET, None, id="etimedout"),
    pytest.param(1, "Network error: could not reach the server", "", NET, None,
                 id="network-error"),
    pytest.param(1, "Traceback (most recent call last):\nKeyError: 'story'", "", CRASH, None,
                 id="plain-crash"),
    pytest.param(-9, "working...", "", CRASH, None, id="killed-by-signal"),
]


@pytest.mark.parametrize(("code", "output", "stderr", "kind", "retry_after"), FAILURES)
def test_classify_recognises_failures(
    code: int, output: str, stderr: str, kind: FailureKind, retry_after: float | None
) -> None:
    """Real-looking agent failure messages map to the right kind and reset time."""
    verdict = classify(code, output, stderr, now=NOW)
    assert verdict.kind == kind, verdict
    assert verdict.retry_after == (pytest.approx(retry_after) if retry_after else None)
    assert verdict.detail


# Successful iterations whose text merely talks about limits, and other look-alikes.
NOT_RATE_LIMITED = [
    pytest.param(0, "Implemented rate limit handling: the API now answers HTTP 429 Too Many "
                 "Requests when overloaded.\n<promise>COMPLETE</promise>", "", None,
                 id="agent-writes-about-rate-limits"),
    pytest.param(0, "You've hit your limit · resets 3pm (Europe/Paris)\n"
                 + "".join(f"step {n} done\n" for n in range(30)), "", None,
                 id="banner-echoed-early-then-normal-work"),
    pytest.param(0, "Approaching usage limit · resets 3pm\nAll stories pass.", "", None,
                 id="approaching-limit-warning"),
    pytest.param(0, "You've used 90% of your weekly limit · resets Oct 9, 5pm\nDone.", "", None,
                 id="usage-percentage-warning"),
    pytest.param(0, "Fast limit reached and temporarily disabled · resets in 10m\nDone.", "",
                 None, id="fast-mode-limit-is-not-a-failure"),
    pytest.param(0, "Done.", "API Error (529 overloaded_error) · Retrying in 5 seconds… "
                 "(attempt 1/10)", None, id="retried-transient-error-on-stderr"),
    pytest.param(None, "The rate limiter is finished; 401 and 403 are mapped to AuthError.",
                 "", None, id="http-agent-without-exit-status"),
    pytest.param(1, "Context limit reached · /compact or /clear to continue", "", CRASH,
                 id="context-limit-is-a-crash"),
    pytest.param(1, "FAILED tests/test_api.py:429 - assert 1 == 2", "", CRASH,
                 id="line-number-429-is-not-http"),
    pytest.param(1, "notes: we must respect the rate limit of the API\n"
                 + "".join(f"  File \"app.py\", line {n}\n" for n in range(20))
                 + "ValueError: bad input", "", CRASH,
                 id="word-far-above-a-traceback"),
]


@pytest.mark.parametrize(("code", "output", "stderr", "kind"), NOT_RATE_LIMITED)
def test_classify_avoids_false_positives(
    code: int | None, output: str, stderr: str, kind: FailureKind | None
) -> None:
    """Mentions of limits in normal work, warnings and look-alike numbers are not failures
    (or are plain crashes when the exit status says the run failed)."""
    assert classify(code, output, stderr, now=NOW).kind == kind


def test_classify_reads_only_the_tail() -> None:
    """An error printed more than 8 KiB before the end is no longer evidence."""
    early = 'API Error: 429 {"type":"rate_limit_error"}\n'
    later = "".join(f"log line {n:05d} " + "x" * 60 + "\n" for n in range(TAIL_CHARS // 60 + 10))
    assert classify(1, early + later).kind == CRASH
    assert classify(1, later + early).kind == RATE


def test_classify_last_error_wins() -> None:
    """When an agent prints a network error and then a rate limit, the later one decides."""
    output = "Error: connect ECONNREFUSED 10.0.0.1:443\nretrying...\nAPI Error: 429 too many"
    assert classify(1, output).kind == RATE
    assert classify(1, "API Error: 429\nlater: Error: getaddrinfo EAI_AGAIN x").kind == NET


def test_timeout_and_empty_output() -> None:
    """A timed-out run is TIMEOUT unless its final words are a limit banner; a clean exit
    with no visible output is EMPTY_OUTPUT; a clean exit with output is success."""
    assert classify(None, "still thinking", timed_out=True).kind == FailureKind.TIMEOUT
    stuck = classify(-15, "You've hit your limit · resets 3pm (Europe/Paris)", timed_out=True,
                     now=NOW)
    assert (stuck.kind, stuck.retry_after) == (RATE, pytest.approx(7200.0))
    assert classify(0, "").kind == FailureKind.EMPTY_OUTPUT
    assert classify(0, "\x1b[?1049h\x1b[2J\x1b[H\r\n  \x1b[?1049l").kind == FailureKind.EMPTY_OUTPUT
    assert classify(0, "all done").ok


def test_crash_detail_names_status_and_last_line() -> None:
    """A crash says how the process ended and the last thing it printed."""
    detail = classify(3, "one\ntwo\nboom: disk full\n\n").detail
    assert detail == "exited with status 3: boom: disk full"
    assert classify(-9, "").detail == "killed by SIGKILL"


RESET_TIMES = [
    pytest.param("resets 3pm (Europe/Paris)", 7200.0, id="clock-with-zone"),
    pytest.param("resets 3:30pm (Europe/Paris)", 9000.0, id="clock-with-minutes"),
    pytest.param("resets 11am (Europe/Paris)", 22 * 3600.0, id="clock-passed-today-means-tomorrow"),
    pytest.param("Your limit will reset at 15:00", 3 * 3600.0, id="24h-clock-in-now-zone"),
    pytest.param("resets 1pm (UTC)", 3600.0, id="utc-zone"),
    pytest.param("resets 3pm (No/Such_Zone)", 3 * 3600.0, id="unknown-zone-uses-now-zone"),
    pytest.param("resets Jan 3, 12pm (UTC)", 2 * 86400.0, id="date-and-clock"),
    pytest.param("resets in 2h 5m", 7500.0, id="duration-h-m"),
    pytest.param("try again in 30s", 30.0, id="duration-s"),
    pytest.param("Please try again in 6.5 seconds", 6.5, id="duration-fraction"),
    pytest.param("try again in 5 minutes", 300.0, id="duration-words"),
    pytest.param("retry-after: 20", 20.0, id="retry-after-seconds"),
    pytest.param("Retry-After: Wed, 01 Jan 2025 12:01:00 GMT", 60.0, id="retry-after-http-date"),
    pytest.param('"retryDelay": "37s"', 37.0, id="gemini-retry-delay"),
    pytest.param("Claude AI usage limit reached|1735732700", 0.0, id="epoch-in-the-past"),
    pytest.param("resets 3 times a day", None, id="number-without-clock"),
    pytest.param("resets 25:00", None, id="impossible-clock"),
    pytest.param("no time here", None, id="nothing"),
]


@pytest.mark.parametrize(("text", "seconds"), RESET_TIMES)
def test_parse_retry_after(text: str, seconds: float | None) -> None:
    """Reset times in the forms agents print become seconds from ``now``."""
    found = parse_retry_after(text, now=NOW)
    assert found == (pytest.approx(seconds) if seconds is not None else None)


def test_strip_ansi_keeps_words_apart() -> None:
    """Escape sequences go; cursor moves become gaps so neighbouring words stay separate."""
    raw = "\x1b]0;claude\x07\x1b[1mhello\x1b[0m\x1b[2Cworld\x1b[3;1Hnext\rline\x07"
    assert strip_ansi(raw) == "hello world\nnext\nline"


def test_backoff_doubles_and_is_capped() -> None:
    """Without a reset time the wait doubles per attempt from ``initial`` up to ``cap``."""
    delays = [backoff_delay(n, 30.0, 900.0, None) for n in range(1, 8)]
    assert delays == [30.0, 60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    assert backoff_delay(10_000, 30.0, 900.0) == 900.0  # no overflow for huge attempt counts
    assert backoff_delay(0, 30.0, 900.0) == 30.0


def test_backoff_honours_retry_after_within_cap() -> None:
    """A printed reset time replaces the exponential wait, at least 1 s and at most ``cap``."""
    assert backoff_delay(5, 30.0, 900.0, 45.0) == 45.0
    assert backoff_delay(1, 30.0, 900.0, 7200.0) == 900.0
    assert backoff_delay(1, 30.0, 900.0, 0.0) == 1.0
    assert backoff_delay(3, 30.0, 900.0, 45.0) == backoff_delay(3, 30.0, 900.0, 45.0)
