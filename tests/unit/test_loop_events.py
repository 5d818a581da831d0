"""apply_event: how clients keep a loop's status current from its events."""

from __future__ import annotations

from ralph_uv.client.loops import LoopEvent, LoopState, apply_event
from ralph_uv.status import LoopStatus

BASE = LoopState(
    loop_id="l", task_name="t", task_dir="/t", status=LoopStatus.RUNNING, iteration=1,
    max_iterations=5, story="S-1", stories_done=0, stories_total=2, agent="claude",
)


def _event(kind: str, **data: object) -> LoopEvent:
    return LoopEvent(type=kind, seq=0, timestamp=0.0, data=data)


def test_each_event_updates_its_fields() -> None:
    """Status changes, iteration starts, passed stories, failovers and the end each change the
    fields they describe and nothing else."""
    state = apply_event(BASE, _event("iteration_started", iteration=2, story="S-2", agent="x"))
    assert (state.iteration, state.story, state.agent) == (2, "S-2", "x")
    state = apply_event(state, _event("story_passed", story="S-1"))
    assert state.stories_done == 1
    state = apply_event(state, _event("agent_failover", to="opencode"))
    assert state.agent == "opencode"
    state = apply_event(state, _event("state_change", to="stalled", reason="no progress"))
    assert (state.status, state.reason) == (LoopStatus.STALLED, "no progress")
    state = apply_event(state, _event("loop_finished", status="completed", stories_done=2))
    assert (state.status, state.stories_done) == (LoopStatus.COMPLETED, 2)
    assert state.max_iterations == BASE.max_iterations


def test_passed_stories_never_exceed_the_total() -> None:
    """A story_passed replayed after a reconnect cannot count a story twice past the total."""
    state = BASE
    for _ in range(4):
        state = apply_event(state, _event("story_passed"))
    assert state.stories_done == 2


def test_unknown_status_and_other_events_leave_the_state_alone() -> None:
    """A status this client does not know (a newer runner) and events that change nothing
    return the state unchanged."""
    assert apply_event(BASE, _event("state_change", to="hibernating")) == BASE
    assert apply_event(BASE, _event("rate_limit_wait", seconds=30)) == BASE
