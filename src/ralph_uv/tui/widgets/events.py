"""A loop's events, one line each: iterations, stories passed, failovers, rate-limit waits,
stalls, injected prompts, interactive mode, errors and the end."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

from ralph_uv.client.loops import LoopEvent

__all__ = ["EventsView", "describe_event"]

_MAX_LINES = 1000
_STYLE = {
    "iteration_started": "cyan",
    "iteration_finished": "",
    "story_passed": "bold green",
    "agent_failover": "yellow",
    "rate_limit_wait": "yellow",
    "stalled": "bold red",
    "error": "red",
    "loop_finished": "bold",
    "prompt_injected": "magenta",
    "interactive_mode": "blue",
    "state_change": "dim",
}


def describe_event(event: LoopEvent) -> str:
    """One line saying what the event means."""
    data = event.data
    kind = event.type
    if kind == "iteration_started":
        story, agent = data.get("story"), data.get("agent")
        return f"iteration {data.get('iteration')} started: {story} ({agent})"
    if kind == "iteration_finished":
        how = data.get("failure") or f"exit {data.get('exit_code')}"
        seconds = data.get("duration")
        took = f" in {float(seconds):.0f}s" if isinstance(seconds, int | float) else ""
        return f"iteration {data.get('iteration')} finished ({how}){took}"
    if kind == "story_passed":
        return f"story {data.get('story')} passes: {data.get('title', '')}".rstrip(": ")
    if kind == "agent_failover":
        return f"failover {data.get('from')} -> {data.get('to')}: {data.get('reason', '')}"
    if kind == "rate_limit_wait":
        seconds = float(data.get("seconds") or 0)
        return f"rate limited ({data.get('agent')}); waiting {seconds:.0f}s"
    if kind == "stalled":
        return f"stalled: {data.get('reason', 'no progress')}"
    if kind == "state_change":
        reason = f" ({data['reason']})" if data.get("reason") else ""
        return f"{data.get('from')} -> {data.get('to')}{reason}"
    if kind == "loop_finished":
        reason = f": {data['reason']}" if data.get("reason") else ""
        return f"loop {data.get('status')}{reason}"
    if kind == "prompt_injected":
        return f"prompt injected ({data.get('chars')} characters)"
    if kind == "interactive_mode":
        holder = data.get("holder")
        return f"interactive mode: {holder}" if holder else "interactive mode released"
    if kind == "error":
        return f"error: {data.get('message')}"
    return f"{kind} {dict(data)}"


class EventsView(RichLog):
    """The loop's events, newest at the bottom (bounded)."""

    DEFAULT_CSS = """
    EventsView {
        height: 9;
        border: round $panel-lighten-2;
        border-title-color: $text-accent;
        scrollbar-size: 1 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=_MAX_LINES, wrap=False, markup=False)
        self.border_title = "Events"
        self.count = 0

    def add(self, event: LoopEvent) -> None:
        """Append one event."""
        stamp = time.strftime("%H:%M:%S", time.localtime(event.timestamp or time.time()))
        line = Text(f"{stamp} ", style="dim")
        line.append(describe_event(event).replace("\n", " "), style=_STYLE.get(event.type, ""))
        self.write(line)
        self.count += 1
