"""The loop status state machine."""

from __future__ import annotations

import pytest

from ralph_uv.status import TERMINAL, LoopStatus, check_transition


def test_a_loop_runs_pauses_stalls_and_resumes() -> None:
    """starting → running ⇄ paused / stalled are allowed transitions."""
    check_transition(LoopStatus.STARTING, LoopStatus.RUNNING)
    for resting in (LoopStatus.PAUSED, LoopStatus.STALLED):
        check_transition(LoopStatus.RUNNING, resting)
        check_transition(resting, LoopStatus.RUNNING)


@pytest.mark.parametrize("end", sorted(TERMINAL))
def test_every_live_status_can_end(end: LoopStatus) -> None:
    """Any non-terminal status may go to any terminal one (a stop can come at any time)."""
    for live in LoopStatus:
        if not live.is_terminal:
            check_transition(live, end)


@pytest.mark.parametrize("end", sorted(TERMINAL))
def test_terminal_statuses_never_change(end: LoopStatus) -> None:
    """A finished loop cannot be revived or re-finished with another status."""
    for other in LoopStatus:
        with pytest.raises(ValueError, match="cannot go from"):
            check_transition(end, other)


def test_a_running_loop_cannot_go_back_to_starting() -> None:
    """starting is only ever the first status."""
    with pytest.raises(ValueError, match="running to starting"):
        check_transition(LoopStatus.RUNNING, LoopStatus.STARTING)


def test_active_means_not_terminal() -> None:
    """Only non-terminal loops count against the concurrency limit."""
    assert {s for s in LoopStatus if s.is_active} == set(LoopStatus) - TERMINAL
