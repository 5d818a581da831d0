"""Whole loops with the real agent CLIs: the engine runs ``claude`` (its interactive TUI in a
PTY, and its print mode) and, separately, ``opencode serve`` against the scripted demo model until
every story of the three-story sample task passes. The files, prd.json updates and commits at the
end are the agents' own work through their real tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ralph_uv.agents.detect import find_binary
from ralph_uv.config import Config
from ralph_uv.demo.model_server import ModelServer
from ralph_uv.demo.offline import offline_agent_env
from ralph_uv.demo.run import make_sample_repo
from ralph_uv.journal import LoopJournal
from ralph_uv.registry import Registry
from ralph_uv.runner.engine import LoopSpec
from ralph_uv.runner.host import LoopHost, new_loop_id
from ralph_uv.status import LoopStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


async def _run_loop(tmp_path: Path, server: ModelServer, agent: str) -> tuple[Path, LoopHost]:
    binary = "opencode" if agent == "opencode" else "claude"
    if find_binary(binary) is None:
        pytest.skip(f"the {binary} CLI is not installed (make agents)")
    repo = make_sample_repo(tmp_path / "textkit")
    env = offline_agent_env(tmp_path / "agent-home", server.base_url, [repo])
    spec = LoopSpec(
        loop_id=new_loop_id("e2e"), task_dir=repo, agent=agent, task_name="textkit", env=env
    )
    config = Config(pause=0, yolo=True, max_iterations=6, iteration_timeout=120)
    host = LoopHost(spec, config)
    outcome = await host.run()
    host.close()
    assert outcome.status == LoopStatus.COMPLETED, outcome.reason
    assert outcome.iterations == 3
    return repo, host


def _assert_real_work(repo: Path, host: LoopHost) -> None:
    prd = json.loads((repo / "prd.json").read_text())
    assert [s["passes"] for s in prd["userStories"]] == [True, True, True]
    subjects = _git(repo, "log", "--format=%s").splitlines()
    assert subjects[:3] == [
        "TEXT-003: Test the helpers",
        "TEXT-002: Count words",
        "TEXT-001: Slugify titles",
    ]
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "ralph/textkit"
    for file in ("textkit/slug.py", "textkit/counts.py", "tests/test_textkit.py"):
        assert (repo / file).is_file(), file
    # The agent's own tests of its own code pass.
    subprocess.run(
        ["python3", "-m", "unittest", "discover", "-s", "tests"],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    journal = LoopJournal(host.loop_dir, read_only=True)
    try:
        types = [e.type for e in journal.read_events(0, 10_000)]
        assert types.count("story_passed") == 3
        assert types[-1] == "loop_finished"
        assert journal.output.end > 0
    finally:
        journal.close()
    row = Registry.open().get(host.engine.spec.loop_id)
    assert row is not None
    assert row.status == LoopStatus.COMPLETED


async def test_claude_tui_completes_the_three_story_task(tmp_path: Path) -> None:
    """The interactive Claude Code TUI, run in a PTY once per iteration, completes all three
    stories; its screen output is in the journal."""
    async with ModelServer() as server:
        repo, host = await _run_loop(tmp_path, server, "claude")
    _assert_real_work(repo, host)


async def test_claude_print_completes_the_three_story_task(tmp_path: Path) -> None:
    """Claude Code's print mode (stream-json rendered as a transcript) completes all three
    stories."""
    async with ModelServer() as server:
        repo, host = await _run_loop(tmp_path, server, "claude-print")
    _assert_real_work(repo, host)


async def test_opencode_completes_the_three_story_task(tmp_path: Path) -> None:
    """opencode serve, driven over HTTP with one session per iteration, completes all three
    stories, and its server is stopped at the end."""
    async with ModelServer() as server:
        repo, host = await _run_loop(tmp_path, server, "opencode")
    _assert_real_work(repo, host)
    log = (host.loop_dir / "opencode-server.log").read_text(errors="replace")
    assert "listening" in log
