"""Loop-engine scenarios, each a real loop: a git repository, a prd.json, the registry, the
journal, and a real agent process in a PTY (tests/fixtures/scripted_agent.py, which reads the
rendered prompt, edits files and commits like a coding agent would)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from tests.helpers import async_wait_until
from tests.integration.task_repo import git as _git
from tests.integration.task_repo import new_task_repo, prd_document

from ralph_uv.config import Config, CustomAgent
from ralph_uv.errors import UserError
from ralph_uv.journal import LoopJournal
from ralph_uv.registry import Registry
from ralph_uv.runner.engine import LoopSpec, StopWhen
from ralph_uv.runner.host import LoopHost, new_loop_id
from ralph_uv.status import LoopStatus

pytestmark = pytest.mark.timeout(90)

AGENT_SCRIPT = Path(__file__).parent.parent / "fixtures" / "scripted_agent.py"
MODES = ["work", "ratelimit:2", "fail", "noop", "echo", "slow"]


def _prd(stories: int = 3) -> dict[str, object]:
    return prd_document("demo", stories, "engine test")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    new_task_repo(root, "demo", _prd())
    return root


def _config(**overrides: object) -> Config:
    agents = {
        mode.split(":")[0]: CustomAgent(
            mode.split(":")[0], (sys.executable, str(AGENT_SCRIPT), mode, "{prompt_file}")
        )
        for mode in MODES
    }
    base = Config(
        pause=0,
        rate_limit_initial_wait=0.05,
        rate_limit_max_wait=0.2,
        terminate_grace=1.0,
        agents=agents,
    )
    return base.with_overrides(**overrides)


def _host(repo: Path, agent: str, config: Config, **env: str) -> LoopHost:
    spec = LoopSpec(
        loop_id=new_loop_id("demo"),
        task_dir=repo / "tasks" / "demo",
        agent=agent,
        task_name="demo",
        env=dict(env),
    )
    return LoopHost(spec, config)


def _events(host: LoopHost) -> list[tuple[str, dict[str, object]]]:
    journal = LoopJournal(host.loop_dir, read_only=True)
    try:
        return [(e.type, dict(e.data)) for e in journal.read_events(0, 10_000)]
    finally:
        journal.close()


def _stories_passing(repo: Path) -> list[bool]:
    data = json.loads((repo / "tasks" / "demo" / "prd.json").read_text())
    return [bool(s["passes"]) for s in data["userStories"]]


async def test_happy_path_completes_story_by_story(repo: Path) -> None:
    """A working agent completes all three stories, one per iteration, on the task's branch,
    with a commit per story, events per story, a progress summary and a completed registry row."""
    host = _host(repo, "work", _config())
    outcome = await host.run()
    assert outcome.status == LoopStatus.COMPLETED
    assert outcome.iterations == 3
    assert _stories_passing(repo) == [True, True, True]
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "ralph/demo"
    log = _git(repo, "log", "--format=%s").splitlines()
    assert log[:3] == ["US-003: implemented", "US-002: implemented", "US-001: implemented"]
    types = [t for t, _ in _events(host)]
    assert types.count("story_passed") == 3
    assert types[-1] == "loop_finished"
    progress = (repo / "tasks" / "demo" / "progress.txt").read_text()
    assert "Iteration 3/10 | Stories 3/3 | work | completed" in progress
    row = Registry.open().get(host.engine.spec.loop_id)
    assert row is not None
    assert row.status == "completed"
    assert row.stories_done == 3
    assert b"scripted agent (work) starting" in host.journal.read_output(0, 1 << 20).data
    host.close()


async def test_rate_limit_waits_without_failover_or_burning_iterations(
    repo: Path, tmp_path: Path
) -> None:
    """Two 429 answers make the loop wait with backoff (two rate_limit_wait events), not fail
    over, and not count those attempts as iterations."""
    config = _config(failover=("work",), max_consecutive_failures=1)
    host = _host(repo, "ratelimit", config, SCRIPTED_AGENT_STATE=str(tmp_path / "count"))
    outcome = await host.run()
    assert outcome.status == LoopStatus.COMPLETED
    assert outcome.iterations == 3
    events = _events(host)
    assert [t for t, _ in events].count("rate_limit_wait") == 2
    assert "agent_failover" not in [t for t, _ in events]
    assert outcome.agent == "ratelimit"
    host.close()


async def test_three_failures_fail_over_to_the_next_agent(repo: Path) -> None:
    """After three consecutive failures the loop switches to the next configured agent, which
    then completes the task."""
    host = _host(repo, "fail", _config(failover=("work",)))
    outcome = await host.run()
    assert outcome.status == LoopStatus.COMPLETED
    assert outcome.agent == "work"
    failovers = [d for t, d in _events(host) if t == "agent_failover"]
    assert failovers == [{"from": "fail", "to": "work", "reason": failovers[0]["reason"]}]
    assert outcome.iterations == 6  # three failed, three working
    host.close()


async def test_all_agents_failing_ends_the_loop_as_failed(repo: Path) -> None:
    """When the last configured agent also fails three times in a row, the loop stops as
    failed and says why."""
    host = _host(repo, "fail", _config())
    outcome = await host.run()
    assert outcome.status == LoopStatus.FAILED
    assert "failed 3 times in a row" in outcome.reason
    assert outcome.iterations == 3
    host.close()


async def test_stop_now_kills_the_agent_and_keeps_work(repo: Path) -> None:
    """Stop-now terminates a running agent (even one ignoring SIGTERM) and ends the loop as
    stopped; an uncommitted file in the tree is left alone."""
    (repo / "scratch.txt").write_text("work in progress\n")
    _git(repo, "add", "scratch.txt")
    _git(repo, "commit", "-qm", "scratch")
    (repo / "scratch.txt").write_text("uncommitted edit\n")
    config = _config()
    host = _host(repo, "slow", config, SCRIPTED_AGENT_IGNORE_TERM="1")
    # The tree is dirty but the loop must first switch branch: commit the edit elsewhere instead.
    _git(repo, "checkout", "-qb", "ralph/demo")
    task = asyncio.create_task(host.run())
    await async_wait_until(lambda: host.engine.session is not None, timeout=15)
    await async_wait_until(
        lambda: b"starting" in host.journal.read_output(0, 1 << 16).data, timeout=15
    )
    host.engine.request_stop(StopWhen.NOW)
    outcome = await asyncio.wait_for(task, 15)
    assert outcome.status == LoopStatus.STOPPED
    assert (repo / "scratch.txt").read_text() == "uncommitted edit\n"
    assert _stories_passing(repo) == [False, False, False]
    host.close()


async def test_checkpoint_finishes_the_iteration_then_stops(repo: Path) -> None:
    """A checkpoint requested mid-iteration lets that iteration finish (its commit lands) and
    then ends the loop as checkpointed."""
    host = _host(repo, "work", _config())
    task = asyncio.create_task(host.run())
    await async_wait_until(lambda: host.engine.session is not None, timeout=15)
    host.engine.request_checkpoint()
    outcome = await asyncio.wait_for(task, 30)
    assert outcome.status == LoopStatus.CHECKPOINTED
    assert outcome.iterations == 1
    assert _stories_passing(repo) == [True, False, False]
    host.close()


async def test_no_progress_trips_the_circuit_breaker(repo: Path) -> None:
    """Three iterations in a row with no commit, no prd.json change and no changed file put the
    loop in stalled with the reason; a stop request then ends it."""
    host = _host(repo, "noop", _config(max_iterations=10))
    task = asyncio.create_task(host.run())
    await async_wait_until(lambda: host.engine.status == LoopStatus.STALLED, timeout=30)
    assert host.engine.iteration == 3
    assert "no progress in 3 iterations" in host.engine.reason
    assert Registry.open().get(host.engine.spec.loop_id).status == "stalled"  # type: ignore[union-attr]
    host.engine.request_stop()
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.status == LoopStatus.STOPPED
    host.close()


async def test_max_iterations_ends_as_exhausted(repo: Path) -> None:
    """With fewer iterations allowed than stories, the loop ends as exhausted."""
    host = _host(repo, "work", _config(max_iterations=2))
    outcome = await host.run()
    assert outcome.status == LoopStatus.EXHAUSTED
    assert _stories_passing(repo) == [True, True, False]
    host.close()


async def test_complete_marker_echoed_from_the_prompt_does_not_end_the_loop(repo: Path) -> None:
    """An agent that only echoes the prompt (which contains the COMPLETE marker) does not
    complete the loop: prd.json stays authoritative."""
    host = _host(repo, "echo", _config(max_iterations=2, stall_iterations=5))
    outcome = await host.run()
    assert outcome.status == LoopStatus.EXHAUSTED
    assert b"<promise>COMPLETE</promise>" in host.journal.read_output(0, 1 << 22).data
    host.close()


async def test_iteration_timeout_kills_the_agent(repo: Path) -> None:
    """An agent that runs past the per-iteration timeout is terminated and the iteration is
    recorded as a timeout failure."""
    host = _host(repo, "slow", _config(iteration_timeout=1.0, max_consecutive_failures=1))
    outcome = await asyncio.wait_for(host.run(), 30)
    assert outcome.status == LoopStatus.FAILED
    finished = [d for t, d in _events(host) if t == "iteration_finished"]
    assert finished[0]["failure"] == "timeout"
    host.close()


async def test_dirty_tree_on_the_wrong_branch_is_refused(repo: Path) -> None:
    """Starting on another branch with uncommitted changes is refused with a message that says
    what to do, and nothing is changed: no branch created, the edit still there."""
    (repo / "tasks" / "demo" / "prd.json").write_text(json.dumps(_prd(), indent=1))
    host = _host(repo, "work", _config())
    with pytest.raises(UserError, match="commit or stash"):
        await host.run()
    assert _git(repo, "branch", "--list", "ralph/demo") == ""
    assert _git(repo, "status", "--porcelain") == "M tasks/demo/prd.json"
    assert Registry.open().get(host.engine.spec.loop_id).status == "failed"  # type: ignore[union-attr]
    host.close()


async def test_completion_with_merge_target_pushes_and_opens_a_pull_request(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With mergeTarget and autoMerge set, a completed loop pushes its branch to origin, opens
    a pull request into the target and merges it. GitHub cannot be reached from the tests, so a
    stand-in ``gh`` script on PATH records what it is asked and answers like gh."""
    origin = tmp_path / "origin.git"
    _git(tmp_path, "init", "-q", "--bare", str(origin))
    _git(repo, "remote", "add", "origin", str(origin))
    prd_file = repo / "tasks" / "demo" / "prd.json"
    prd = json.loads(prd_file.read_text())
    prd.update(mergeTarget="main", autoMerge=True)
    prd_file.write_text(json.dumps(prd, indent=2) + "\n")
    _git(repo, "commit", "-qam", "merge target")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gh-calls"
    gh = bin_dir / "gh"
    gh.write_text(
        f"#!/bin/sh\necho \"$@\" >> {calls}\n"
        'if [ "$1 $2" = "pr create" ]; then echo https://github.com/o/r/pull/7; fi\n'
    )
    gh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    host = _host(repo, "work", _config())
    outcome = await host.run()
    assert outcome.status == LoopStatus.COMPLETED
    assert outcome.pull_request == "https://github.com/o/r/pull/7"
    pushed = _git(origin, "rev-parse", "ralph/demo")
    assert pushed == _git(repo, "rev-parse", "HEAD")
    asked = calls.read_text().splitlines()
    assert asked[0].startswith("pr create --head ralph/demo --base main")
    assert asked[1] == "pr merge https://github.com/o/r/pull/7 --merge"
    host.close()


async def test_the_registry_row_says_when_the_agent_last_printed(repo: Path) -> None:
    """The loop's registry row carries the time of the agent's latest output (for `status` and
    the dashboard), within the loop's run time."""
    host = _host(repo, "work", _config())
    outcome = await host.run()
    assert outcome.status == LoopStatus.COMPLETED
    row = Registry.open().get(host.engine.spec.loop_id)
    assert row is not None
    assert row.last_output_at is not None
    assert row.started_at is not None
    assert row.started_at <= row.last_output_at <= (row.finished_at or row.last_output_at)
    host.close()
