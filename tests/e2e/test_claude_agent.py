"""The real ``claude`` CLI, in both backends, runs Ralph iterations against the scripted model
server: files are written, the PRD is updated and a commit is made by the agent's own tools."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from tests.e2e.agent_helpers import git_log, ralph_prompt

from ralph_uv.agents.base import AgentBackend, AgentResult, FailureKind, IterationRequest
from ralph_uv.agents.claude import (
    PROMPT_ARG_LIMIT,
    ClaudeInteractiveBackend,
    ClaudePrintBackend,
)
from ralph_uv.demo.model_server import Fault, ModelServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def _run(
    backend: AgentBackend, repo: Path, loop_dir: Path, env: dict[str, str], story: str,
    limit: float = 120.0, padding: str = "",
) -> tuple[AgentResult, bytes, float]:
    output = bytearray()
    request = IterationRequest(
        prompt=ralph_prompt(repo, story, backend.name) + padding,
        cwd=repo,
        loop_dir=loop_dir,
        iteration=1,
        yolo=True,
        env=env,
    )
    started = time.monotonic()
    session = await backend.start(request, output.extend)
    try:
        result = await asyncio.wait_for(session.wait(), limit)
    finally:
        await session.terminate(grace=2)
    return result, bytes(output), time.monotonic() - started


def _story_passes(repo: Path, story: str) -> bool:
    prd = json.loads((repo / "prd.json").read_text())
    return next(s for s in prd["userStories"] if s["id"] == story)["passes"] is True


@pytest.mark.parametrize("backend_cls", [ClaudePrintBackend, ClaudeInteractiveBackend])
async def test_one_iteration_completes_a_story(
    backend_cls: type[AgentBackend],
    claude_binary: Path,
    claude_env: dict[str, str],
    sample_repo: Path,
    model_server: ModelServer,
    tmp_path: Path,
) -> None:
    """One iteration writes the story's file, marks it passing, commits, and reports the final
    answer (without the completion marker: two stories remain)."""
    backend = backend_cls(claude_binary)  # type: ignore[call-arg]
    result, output, seconds = await _run(backend, sample_repo, tmp_path / "loop", claude_env,
                                         "TEXT-001")

    assert result.ok, result.detail
    assert (sample_repo / "textkit" / "slug.py").is_file()
    assert _story_passes(sample_repo, "TEXT-001")
    assert not _story_passes(sample_repo, "TEXT-002")
    assert git_log(sample_repo)[0] == "TEXT-001: Slugify titles"
    assert "TEXT-001" in (sample_repo / "progress.txt").read_text()
    assert "2 stories still to do" in result.final_text
    assert not result.completion_claimed
    assert result.usage is not None
    assert result.usage.input_tokens > 0
    assert result.output_bytes == len(output)
    assert any(body.get("tools") for body in model_server.requests)
    print(f"{backend.name}: one iteration took {seconds:.1f}s")


async def test_print_transcript_is_readable(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """The headless backend's output is the rendered transcript, not raw JSON: the tool calls,
    an abbreviated tool result and the final result line with usage and cost."""
    result, output, _ = await _run(ClaudePrintBackend(claude_binary), sample_repo,
                                   tmp_path / "loop", claude_env, "TEXT-001")
    text = output.decode()
    assert result.ok, result.detail
    assert "▶ Write: " in text
    assert "▶ Bash" in text
    assert "Stories still failing: 2" in text
    assert "✔ done" in text
    assert result.usage is not None
    assert result.usage.cost_usd is not None
    assert '{"type":' not in text


async def test_interactive_shows_the_tui_and_exits(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """The interactive backend's output is Claude Code's own terminal UI, and after the Stop
    hook fires claude is ended by ``/exit`` (exit status 0, no signal)."""
    loop_dir = tmp_path / "loop"
    result, output, _ = await _run(ClaudeInteractiveBackend(claude_binary), sample_repo,
                                   loop_dir, claude_env, "TEXT-002")
    assert result.ok, result.detail
    assert result.exit_code == 0
    assert b"\x1b[" in output  # terminal escape sequences: a real TUI
    assert b"Claude Code" in output
    words = re.sub(rb"\s+", b" ", re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b" ", output))
    assert b"bypass permissions on" in words  # the TUI's status line
    assert (loop_dir / "claude-stop-1.json").is_file()
    settings = json.loads((loop_dir / "claude-settings.json").read_text())
    assert "Stop" in settings["hooks"]
    assert (sample_repo / "textkit" / "counts.py").is_file()


async def test_interactive_hands_a_long_prompt_over_as_a_file(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, model_server: ModelServer,
    tmp_path: Path,
) -> None:
    """A prompt over the command-line limit is written to the loop folder and the agent is asked
    to read it; the agent reads it with its own tool and does the story."""
    loop_dir = tmp_path / "loop"
    padding = "".join(f"\nBackground note {i}: nothing to do here." for i in range(3000))
    assert len(padding) > PROMPT_ARG_LIMIT
    result, _, _ = await _run(ClaudeInteractiveBackend(claude_binary), sample_repo, loop_dir,
                              claude_env, "TEXT-001", padding=padding)
    assert result.ok, result.detail
    prompt_file = loop_dir / "prompt-1.md"
    assert prompt_file.read_text().endswith(padding)
    first_turn = model_server.message_requests[0]["messages"][0]
    assert str(prompt_file) in json.dumps(first_turn)
    assert "Background note" not in json.dumps(first_turn)
    assert _story_passes(sample_repo, "TEXT-001")


async def test_interactive_answers_first_run_dialogs(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """With a config that has only finished onboarding, the trust, API-key and bypass dialogs
    appear; the backend answers each, says so in the output, and the iteration still works."""
    config = tmp_path / "bare-config"
    config.mkdir()
    (config / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True}))
    env = dict(claude_env, CLAUDE_CONFIG_DIR=str(config))
    result, output, _ = await _run(ClaudeInteractiveBackend(claude_binary), sample_repo,
                                   tmp_path / "loop", env, "TEXT-001")
    text = output.decode(errors="replace")
    assert "answered Claude Code's trust-folder dialog" in text
    assert "answered Claude Code's api-key dialog" in text
    assert "answered Claude Code's bypass-permissions dialog" in text
    assert result.ok, result.detail
    assert _story_passes(sample_repo, "TEXT-001")


async def test_interactive_without_credentials_fails_with_auth(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """Without an API key or a login, the TUI asks for /login: the iteration fails as AUTH with
    a message that says how to log in, and nothing is committed."""
    env = {k: v for k, v in claude_env.items() if k != "ANTHROPIC_API_KEY"}
    env["ANTHROPIC_API_KEY"] = ""
    result, _, _ = await _run(ClaudeInteractiveBackend(claude_binary), sample_repo,
                              tmp_path / "loop", env, "TEXT-001", limit=60)
    assert result.failure == FailureKind.AUTH
    assert "claude /login" in result.detail
    assert git_log(sample_repo) == ["sample task"]


@pytest.mark.parametrize("backend_cls", [ClaudePrintBackend, ClaudeInteractiveBackend])
async def test_rate_limit_is_reported(
    backend_cls: type[AgentBackend],
    claude_binary: Path,
    claude_env: dict[str, str],
    sample_repo: Path,
    model_server: ModelServer,
    tmp_path: Path,
) -> None:
    """When the API keeps answering 429, the iteration fails as RATE_LIMIT."""
    model_server.inject_faults([Fault(status=429, count=20, retry_after=0)])
    backend = backend_cls(claude_binary)  # type: ignore[call-arg]
    result, _, _ = await _run(backend, sample_repo, tmp_path / "loop", claude_env, "TEXT-001",
                              limit=60)
    assert result.failure == FailureKind.RATE_LIMIT, result.detail
    assert "429" in result.detail or "rate" in result.detail.lower()
    assert git_log(sample_repo) == ["sample task"]


async def test_unreachable_api_is_a_network_failure(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """When nothing listens at the API address, the headless iteration fails as NETWORK."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = dict(claude_env, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{closed}")
    result, _, _ = await _run(ClaudePrintBackend(claude_binary), sample_repo, tmp_path / "loop",
                              env, "TEXT-001", limit=60)
    assert result.failure == FailureKind.NETWORK, result.detail
    assert result.final_text == ""


async def test_three_iterations_finish_the_sample_task(
    claude_binary: Path, claude_env: dict[str, str], sample_repo: Path, tmp_path: Path
) -> None:
    """Three headless iterations do the three stories; only the last answer claims completion,
    and the sample's own unit tests pass on the result."""
    claims = []
    for iteration, story in enumerate(("TEXT-001", "TEXT-002", "TEXT-003"), 1):
        result, _, _ = await _run(ClaudePrintBackend(claude_binary), sample_repo,
                                  tmp_path / f"loop{iteration}", claude_env, story)
        assert result.ok, result.detail
        claims.append(result.completion_claimed)
    assert claims == [False, False, True]
    assert git_log(sample_repo)[:3] == [
        "TEXT-003: Test the helpers", "TEXT-002: Count words", "TEXT-001: Slugify titles"]
    tests = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "unittest", "discover", "-s", "tests", cwd=sample_repo,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, errors = await tests.communicate()
    assert tests.returncode == 0, errors.decode()
