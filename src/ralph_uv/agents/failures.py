"""Why an agent's iteration failed, read from its exit status and the last of its output.

The verdict decides what the loop does next: wait for a rate limit to reset, fail over to another
agent, or count a plain failure. Getting it wrong either way is costly, so the rules are narrow:

1. ``timed_out`` → ``TIMEOUT``, unless the agent's final words are a usage-limit or login banner
   (an agent that sat on "You've hit your limit" until the iteration timed out was rate limited).
2. Only the tail of the output is read (the last 8 KiB), after ANSI escape sequences are removed
   (PTY output is full of them; cursor moves become spaces or line breaks so words stay apart).
3. Three kinds of evidence, from strongest to weakest:

   - *banners*: the agents' own unmistakable messages — "You've hit your limit · resets 3pm",
     "Claude AI usage limit reached|1735689600", "5-hour limit reached ∙ resets 3pm", "Invalid
     API key · Please run /login", "OAuth token has expired". They count for any exit status, but
     only in the final lines of the output (the last 15 non-empty lines), where an agent that
     stopped because of them leaves them.
   - *error codes*: "API Error: 429", "overloaded_error", "authentication_error", HTTP 401/403/
     429/529 in an error context, ``ECONNREFUSED``, ``ENOTFOUND``, ``ETIMEDOUT``, ``getaddrinfo``.
     They count only when the exit status is non-zero, anywhere in the output tail or stderr.
   - *words*: "rate limit", "too many requests", "quota exceeded", "overloaded", "usage limit",
     "not logged in", "network error", "connection error", "fetch failed". They count only when
     the exit status is non-zero, and only in the final lines of the output or in stderr.

   A successful exit (status 0, or no status at all for agents driven over HTTP) is never a
   failure because its text mentions rate limits: the agent's prompt, its answer or the code it
   writes may all say "rate limit". Transient errors the agent retried by itself ("API Error: 529
   … Retrying in 5 seconds") are not banners for the same reason.
4. When several match, the one printed last wins (stderr counts as printed after the output):
   the error that ended the run comes last.
5. Otherwise a non-zero status (or death by a signal) is ``CRASH``; status 0 with no visible
   output is ``EMPTY_OUTPUT``; anything else is success.

For a rate limit, a reset time printed near the message becomes ``retry_after`` (seconds from
``now``): "resets 3pm (Europe/Paris)", "reset at 15:00", "resets Oct 9, 5pm", "resets in 2h 5m",
"try again in 30s", "retry-after: 20", or the epoch in "usage limit reached|1735689600".
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from email.utils import parsedate_to_datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ralph_uv.agents.base import FailureKind

__all__ = [
    "TAIL_CHARS",
    "Classification",
    "backoff_delay",
    "classify",
    "parse_retry_after",
    "strip_ansi",
]

TAIL_CHARS = 8192
_FINAL_LINES = 15
_RETRY_AFTER_FLOOR = 1.0

# CSI sequences that move the cursor to another line or column: replaced by a line break so the
# text on either side does not run together.
_CSI = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
_OTHER_ESC = re.compile(r"\x1b[()*+][0-9A-Za-z]|\x1b[@-Z\\^_=>78]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_MOVES = frozenset("ABEFHfd")


def _replace_csi(match: re.Match[str]) -> str:
    final = match.group(2)
    if final in _LINE_MOVES:
        return "\n"
    if final in "CGX`":  # cursor right / to a column / erase characters: a gap between words
        return " "
    return ""


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences and control characters; ``\\r`` becomes a line break."""
    text = _OSC.sub("", text)
    text = _CSI.sub(_replace_csi, text)
    text = _OTHER_ESC.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one iteration: ``kind`` is None for success."""

    kind: FailureKind | None
    detail: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind is None


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: FailureKind
    label: str
    pattern: re.Pattern[str]


def _rx(source: str) -> re.Pattern[str]:
    """Compile case-insensitively; a space in ``source`` matches any run of whitespace."""
    return re.compile(source.replace(" ", r"\s+"), re.IGNORECASE)


_SEP = r"\s*[·∙•|-]?\s*"

_BANNERS: tuple[_Rule, ...] = (
    _Rule(FailureKind.RATE_LIMIT, "usage limit reached",
          _rx(r"claude (?:ai )?usage limit reached")),
    _Rule(FailureKind.RATE_LIMIT, "usage limit reached",
          _rx(r"you[\u2019']ve hit your (?!fast\b)(?:[\w'-]+ ){0,3}?limit\b")),
    _Rule(FailureKind.RATE_LIMIT, "usage limit reached",
          _rx(r"(?<![\w-])(?:usage|session|weekly|daily|monthly|opus|sonnet|\d+[- ]hours?)"
              r" limit reached")),
    _Rule(FailureKind.RATE_LIMIT, "usage limit reached",
          _rx(r"you[\u2019']ve reached your (?:[\w'-]+ ){0,3}?limit\b")),
    _Rule(FailureKind.AUTH, "not logged in", _rx(r"please run /login")),
    _Rule(FailureKind.AUTH, "invalid API key", _rx(r"invalid api key")),
    _Rule(FailureKind.AUTH, "login expired", _rx(r"oauth token has (?:expired|been revoked)")),
    _Rule(FailureKind.AUTH, "credit balance too low", _rx(r"credit balance is too low")),
)

_STATUS_CONTEXT = (
    r"(?:api error|error|status(?: code)?|http(?:/[\d.]+)?|response|code|statuscode)"
    r"[\s:=(\"']{0,4}"
)

_ERROR_CODES: tuple[_Rule, ...] = (
    _Rule(FailureKind.RATE_LIMIT, "rate limited (429)",
          _rx(rf"{_STATUS_CONTEXT}429\b|\b429 too many|\(429\)")),
    _Rule(FailureKind.RATE_LIMIT, "overloaded (529)",
          _rx(rf"{_STATUS_CONTEXT}529\b|\(529\)")),
    _Rule(FailureKind.RATE_LIMIT, "rate limited",
          _rx(r"\brate_limit_error\b|\bresource_exhausted\b")),
    _Rule(FailureKind.RATE_LIMIT, "overloaded", _rx(r"\boverloaded_error\b")),
    _Rule(FailureKind.AUTH, "unauthorized (401)",
          _rx(rf"{_STATUS_CONTEXT}401\b|\b401 unauthorized|\(401\)")),
    _Rule(FailureKind.AUTH, "forbidden (403)",
          _rx(rf"{_STATUS_CONTEXT}403\b|\b403 forbidden|\(403\)")),
    _Rule(FailureKind.AUTH, "authentication failed",
          _rx(r"\bauthentication_error\b|\bpermission_error\b|\binvalid x-api-key\b")),
    _Rule(FailureKind.NETWORK, "network unreachable",
          re.compile(r"\b(?:ECONNREFUSED|ECONNRESET|ENOTFOUND|ETIMEDOUT|EAI_AGAIN|ENETUNREACH|"
                     r"EHOSTUNREACH)\b")),
    _Rule(FailureKind.NETWORK, "network unreachable", _rx(r"\bgetaddrinfo\b")),
)

_WORDS: tuple[_Rule, ...] = (
    _Rule(FailureKind.RATE_LIMIT, "rate limited", _rx(r"\brate[ _-]?limit(?:ed|s)?\b")),
    _Rule(FailureKind.RATE_LIMIT, "rate limited", _rx(r"\btoo many requests\b")),
    _Rule(FailureKind.RATE_LIMIT, "quota exceeded",
          _rx(r"\bquota exceeded\b|\bexceeded (?:your )?(?:current )?quota\b")),
    _Rule(FailureKind.RATE_LIMIT, "usage limit reached", _rx(r"\busage limit\b")),
    _Rule(FailureKind.RATE_LIMIT, "overloaded", _rx(r"\boverloaded\b")),
    _Rule(FailureKind.AUTH, "not logged in", _rx(r"\bnot logged in\b")),
    _Rule(FailureKind.AUTH, "unauthorized", _rx(r"\bunauthorized\b")),
    _Rule(FailureKind.NETWORK, "network error",
          _rx(r"\bnetwork error\b|\bconnection error\b|\bfetch failed\b|\bconnection refused\b|"
              r"\bsocket hang up\b|\bname or service not known\b|"
              r"\btemporary failure in name resolution\b|\bunable to connect\b")),
)


@dataclass(frozen=True, slots=True)
class _Hit:
    rule: _Rule
    text: str
    source: int  # 0: output, 1: stderr (printed last wins, stderr after output)
    start: int
    end: int

    @property
    def order(self) -> tuple[int, int]:
        return (self.source, self.start)


def _final_start(text: str, count: int = _FINAL_LINES) -> int:
    """Offset where the last ``count`` non-empty lines of ``text`` begin."""
    position = len(text)
    seen = 0
    while position > 0:
        begin = text.rfind("\n", 0, position) + 1
        if text[begin:position].strip():
            seen += 1
            if seen == count:
                return begin
        position = begin - 1
    return 0


def _last_hit(
    text: str, rules: tuple[_Rule, ...], *, source: int = 0, since: int = 0
) -> _Hit | None:
    best: _Hit | None = None
    for rule in rules:
        for match in rule.pattern.finditer(text, since):
            if best is None or match.start() > best.start:
                best = _Hit(rule, text, source, match.start(), match.end())
    return best


def _latest(*hits: _Hit | None) -> _Hit | None:
    """The hit printed last."""
    found = [hit for hit in hits if hit is not None]
    return max(found, key=lambda hit: hit.order) if found else None


def _line_of(hit: _Hit, limit: int = 300) -> str:
    start = hit.text.rfind("\n", 0, hit.start) + 1
    end = hit.text.find("\n", hit.end)
    line = " ".join(hit.text[start : end if end != -1 else len(hit.text)].split())
    return line[:limit]


def _last_line(*texts: str) -> str:
    for text in reversed(texts):
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines:
            return " ".join(lines[-1].split())[:300]
    return ""


def _describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exited with status {exit_code}"


def classify(
    exit_code: int | None,
    output_tail: str,
    stderr: str = "",
    *,
    timed_out: bool = False,
    now: datetime | None = None,
) -> Classification:
    """Classify one iteration by the module's rules (see the module docstring).

    ``exit_code`` is None for agents without a process exit (driven over HTTP); ``now`` is the
    moment reset times are counted from (default: the current time).
    """
    output = strip_ansi(output_tail[-4 * TAIL_CHARS :])[-TAIL_CHARS:]
    errors = strip_ansi(stderr[-4 * TAIL_CHARS :])[-TAIL_CHARS:]
    final = _final_start(output)
    failed = exit_code not in (0, None)

    hit = _last_hit(output, _BANNERS, since=final)
    if failed and not timed_out:
        hit = _latest(
            hit,
            _last_hit(output, _ERROR_CODES),
            _last_hit(output, _WORDS, since=final),
            _last_hit(errors, _BANNERS + _ERROR_CODES + _WORDS, source=1),
        )
    if hit is not None:
        kind = hit.rule.kind
        line = _line_of(hit)
        detail = f"{hit.rule.label}: {line}" if line else hit.rule.label
        retry_after = None
        if kind == FailureKind.RATE_LIMIT:
            # The reset time is usually in the message itself, else elsewhere in the last
            # words (a Retry-After header logged on stderr).
            retry_after = parse_retry_after(hit.text[hit.start : hit.start + 400], now=now)
            if retry_after is None:
                retry_after = parse_retry_after(output[final:] + "\n" + errors, now=now)
        return Classification(kind, detail, retry_after)

    if timed_out:
        return Classification(FailureKind.TIMEOUT, "the agent did not finish in time")
    if failed:
        assert exit_code is not None
        last = _last_line(output, errors)
        detail = _describe_exit(exit_code) + (f": {last}" if last else "")
        return Classification(FailureKind.CRASH, detail)
    if not output.strip() and not errors.strip():
        return Classification(FailureKind.EMPTY_OUTPUT, "the agent ended without any output")
    return Classification(None)


# --- reset times -----------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = (
    r"(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|"
    r"d|days?)\b"
)
_DURATION = rf"(?:{_DURATION_PART}(?:\s*,?\s*(?:and\s+)?)?)+"
_IN_DURATION = _rx(
    rf"(?:resets? in|try again in|retry in|retrying in|retry after|wait) ({_DURATION})"
)
_RETRY_HEADER = _rx(r"retry[-_\s]?after\"?\s*[:=]\s*\"?(\d+(?:\.\d+)?)\b(?!\s*[:/])")
_RETRY_DELAY = _rx(rf"retry[-_]?delay\"?\s*[:=]\s*\"?({_DURATION})")
_RETRY_DATE = _rx(r"retry[-_\s]?after\s*:\s*(\w{3}, \d{1,2} \w{3} \d{4} [\d:]{8} GMT)")
_EPOCH = _rx(r"limit reached\|(\d{9,11})\b")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CLOCK = re.compile(
    r"resets?(?:\s+at|\s+on)?\s+"
    r"(?:(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+"
    r"(?P<day>\d{1,2})(?:st|nd|rd|th)?,?\s+(?:(?P<year>\d{4}),?\s+)?(?:at\s+)?)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>am|pm|a\.m\.|p\.m\.)?"
    r"(?:\s*\((?P<tz>[A-Za-z_]+(?:/[A-Za-z0-9_+-]+)*)\)|\s+(?P<utc>utc|gmt)\b)?",
    re.IGNORECASE,
)


def _duration_seconds(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(_DURATION_PART, text, re.IGNORECASE):
        key = unit.lower()
        key = "ms" if key.startswith("ms") or key.startswith("milli") else key[0]
        total += float(number) * _UNIT_SECONDS[key]
    return total


def _zone(name: str | None, utc: str | None, fallback: tzinfo | None) -> tzinfo | None:
    if utc:
        return ZoneInfo("UTC")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            return fallback
    return fallback


def _clock_seconds(match: re.Match[str], now: datetime) -> float | None:
    hour = int(match["hour"])
    minute = int(match["minute"] or 0)
    ampm = (match["ampm"] or "").replace(".", "").lower()
    if not ampm and match["minute"] is None:
        return None  # "resets 3" is not a time
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm == "pm" else 0)
    if hour > 23 or minute > 59:
        return None
    zone = _zone(match["tz"], match["utc"], now.tzinfo)
    local_now = now.astimezone(zone)
    if match["mon"]:
        month = _MONTHS.index(match["mon"][:3].lower()) + 1
        year = int(match["year"]) if match["year"] else local_now.year
        try:
            target = local_now.replace(
                year=year, month=month, day=int(match["day"]), hour=hour, minute=minute,
                second=0, microsecond=0,
            )
        except ValueError:
            return None
        if not match["year"] and target < local_now - timedelta(days=180):
            target = target.replace(year=year + 1)  # "resets Jan 2" seen in late December
    else:
        target = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if target <= local_now:
            target += timedelta(days=1)
    return max(0.0, (target - local_now).total_seconds())


def parse_retry_after(text: str, *, now: datetime | None = None) -> float | None:
    """Seconds until the reset time printed in ``text``, or None when it names none."""
    now = now or datetime.now().astimezone()
    if now.tzinfo is None:
        now = now.astimezone()
    if match := _EPOCH.search(text):
        return max(0.0, int(match[1]) - now.timestamp())
    if match := _RETRY_DATE.search(text):
        try:
            when = parsedate_to_datetime(match[1])
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, (when - now).total_seconds())
    for pattern in (_IN_DURATION, _RETRY_DELAY):
        if match := pattern.search(text):
            return _duration_seconds(match[1])
    if match := _RETRY_HEADER.search(text):
        return float(match[1])
    for match in _CLOCK.finditer(text):
        seconds = _clock_seconds(match, now)
        if seconds is not None:
            return seconds
    return None


def backoff_delay(
    attempt: int, initial: float, cap: float, retry_after: float | None = None
) -> float:
    """How long to wait before retry number ``attempt`` (1 for the first).

    A reset time the agent printed is honoured (at least one second, so a stale time cannot
    make the loop spin); otherwise the wait doubles from ``initial`` on each attempt. Either way
    it never exceeds ``cap``. Deterministic: the same arguments give the same delay.
    """
    if retry_after is not None:
        delay = max(retry_after, _RETRY_AFTER_FLOOR)
    else:
        delay = max(initial, 0.0) * 2.0 ** min(max(attempt, 1) - 1, 1000)
    return max(0.0, min(delay, cap))
