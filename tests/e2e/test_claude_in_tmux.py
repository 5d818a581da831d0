"""Claude Code's TUI in a tmux pane (backend ``tmux``): the real ``claude`` CLI, run by the
interactive backend through :class:`~ralph_uv.runner.tmux.TmuxSession` against the scripted
model server, does a story as it does in a PTY, and the pane shows its screen."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pyte
import pytest
from tests.e2e.agent_helpers import git_log, ralph_prompt

from ralph_uv.agents.base import IterationRequest
from ralph_uv.agents.claude import ClaudeInteractiveBackend
from ralph_uv.runner.tmux import TmuxSession
from ralph_uv.runner.tmux_target import TmuxTarget

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
async def tmux_session(tmp_path: Path) -> AsyncIterator[TmuxSession]:
    socket = f"ralph-test-{uuid.uuid4().hex[:10]}"
    session = TmuxSession(TmuxTarget(socket, "ralph-claude"), tmp_path / "loop")
    yield session
    await session.aclose()
    await asyncio.to_thread(subprocess.run, ["tmux", "-L", socket, "kill-server"],
                            capture_output=True, check=False)


async def test_claude_tui_does_a_story_in_a_tmux_pane(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path,
    tmux_session: TmuxSession, tmp_path: Path,
) -> None:
    """With its terminal in tmux, Claude Code writes the story's file and commits, its turn
    ends by the Stop hook and /exit (exit status 0), its TUI reaches the journal's output, and
    the pane (kept after the exit) shows the same screen."""
    backend = ClaudeInteractiveBackend(claude_binary)
    backend.spawn_terminal = tmux_session.spawn
    output = bytearray()
    request = IterationRequest(prompt=ralph_prompt(sample_repo, "TEXT-001", backend.name),
                               cwd=sample_repo, loop_dir=tmp_path / "loop", iteration=1,
                               yolo=True, env=claude_env)
    session = await backend.start(request, output.extend)
    try:
        result = await asyncio.wait_for(session.wait(), 150)
    finally:
        await session.terminate(grace=2)
    assert result.ok, result.detail
    assert result.exit_code == 0
    assert git_log(sample_repo)[0] == "TEXT-001: Slugify titles"
    assert b"Claude Code" in output
    assert result.output_bytes == len(output)
    target = tmux_session.target
    captured = await asyncio.to_thread(
        subprocess.run, target.command("capture-pane", "-p", "-S", "-200", "-t",
                                       f"={target.session}:"),
        capture_output=True, text=True, check=True)
    # The pane (tmux's own rendering) ends like the journal's bytes rendered here: the same
    # last line (Claude Code's parting words name this session's id), whatever else it leaves
    # on the screen when it exits.
    screen = pyte.Screen(request.cols, request.rows)
    pyte.ByteStream(screen).feed(bytes(output))
    rendered = [line.rstrip() for line in screen.display if line.strip()]
    pane = [line.rstrip() for line in captured.stdout.splitlines()
            if line.strip() and not line.startswith("Pane is dead")]
    assert rendered[-1] == pane[-1], (rendered[-5:], pane[-5:])
    assert pane[-1].startswith("claude --resume ")
