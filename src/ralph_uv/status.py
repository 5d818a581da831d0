"""Loop status: the one state machine every loop goes through.

Invariants:
- A loop starts in ``STARTING`` and ends in exactly one terminal status.
- ``PAUSED`` and ``STALLED`` are the only resting states a running loop can leave and come back
  from (``STALLED`` resumes only when someone asks it to).
- ``CRASHED`` is set by whoever notices the runner is gone (ralphd), never by the runner itself.
- Terminal statuses never change again; a transition out of one is a bug and raises.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["STATUS_STYLE", "TERMINAL", "LoopStatus", "check_transition"]


class LoopStatus(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STALLED = "stalled"
    COMPLETED = "completed"
    EXHAUSTED = "exhausted"
    STOPPED = "stopped"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    CRASHED = "crashed"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_active(self) -> bool:
        """Counts against ``max_concurrent_loops``."""
        return not self.is_terminal


TERMINAL = frozenset(
    {
        LoopStatus.COMPLETED,
        LoopStatus.EXHAUSTED,
        LoopStatus.STOPPED,
        LoopStatus.CHECKPOINTED,
        LoopStatus.FAILED,
        LoopStatus.CRASHED,
    }
)

_ALLOWED: dict[LoopStatus, frozenset[LoopStatus]] = {
    LoopStatus.STARTING: frozenset({LoopStatus.RUNNING} | TERMINAL),
    LoopStatus.RUNNING: frozenset({LoopStatus.PAUSED, LoopStatus.STALLED} | TERMINAL),
    LoopStatus.PAUSED: frozenset({LoopStatus.RUNNING} | TERMINAL),
    LoopStatus.STALLED: frozenset({LoopStatus.RUNNING} | TERMINAL),
}


def check_transition(old: LoopStatus, new: LoopStatus) -> None:
    """Raise ``ValueError`` unless a loop may go from ``old`` to ``new``."""
    if old == new and not old.is_terminal:
        return
    if new not in _ALLOWED.get(old, frozenset()):
        raise ValueError(f"loop status cannot go from {old.value} to {new.value}")


# How each status is shown in the CLI's tables and the dashboard (rich/Textual style names).
STATUS_STYLE: dict[LoopStatus, str] = {
    LoopStatus.STARTING: "cyan",
    LoopStatus.RUNNING: "green",
    LoopStatus.PAUSED: "yellow",
    LoopStatus.STALLED: "bold yellow",
    LoopStatus.COMPLETED: "bold green",
    LoopStatus.EXHAUSTED: "magenta",
    LoopStatus.STOPPED: "dim",
    LoopStatus.CHECKPOINTED: "blue",
    LoopStatus.FAILED: "red",
    LoopStatus.CRASHED: "bold red",
}
