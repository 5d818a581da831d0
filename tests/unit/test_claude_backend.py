"""The parts of the Claude Code backends that do not need the CLI: its environment, the hook
that reports the end of a turn, reading its transcript, the offline config and the verdicts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ralph_uv.agents.base import FailureKind, IterationRequest, Usage
from ralph_uv.agents.claude import (
    ClaudePrintBackend,
    _classify,
    _hook_settings,
    claude_env,
    prepare_offline_claude_config,
)
from ralph_uv.agents.transcript import read_session_transcript
from ralph_uv.errors import UserError


def _request(tmp_path: Path, **kwargs: object) -> IterationRequest:
    return IterationRequest(prompt="p", cwd=tmp_path, loop_dir=tmp_path / "loop", iteration=1,
                            **kwargs)  # type: ignore[arg-type]


def test_env_drops_claudecode_and_turns_off_nonessential_traffic(tmp_path: Path) -> None:
    """``CLAUDECODE`` (which blocks nested sessions) is removed, the request's variables win,
    and update checks and telemetry are off unless the user set them."""
    base = {"CLAUDECODE": "1", "PATH": "/bin", "DISABLE_TELEMETRY": "0"}
    env = claude_env(_request(tmp_path, env={"ANTHROPIC_API_KEY": "k", "PATH": "/x"}), base)
    assert "CLAUDECODE" not in env
    assert env["ANTHROPIC_API_KEY"] == "k"
    assert env["PATH"] == "/x"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["DISABLE_AUTOUPDATER"] == "1"
    assert env["DISABLE_TELEMETRY"] == "0"


def test_is_sandbox_only_for_root_with_yolo(tmp_path: Path) -> None:
    """``IS_SANDBOX=1`` is set exactly when running as root with permissions skipped."""
    assert "IS_SANDBOX" not in claude_env(_request(tmp_path, yolo=False), {})
    yolo = claude_env(_request(tmp_path, yolo=True), {})
    assert ("IS_SANDBOX" in yolo) is (os.geteuid() == 0)


def test_print_command_keeps_the_prompt_off_the_command_line(tmp_path: Path) -> None:
    """The headless command asks for stream-json and carries the model and yolo flags; the
    prompt is not in argv (it goes to stdin)."""
    argv = ClaudePrintBackend(Path("/opt/claude")).command(
        _request(tmp_path, model="sonnet", yolo=True))
    assert argv == ["/opt/claude", "--print", "--output-format", "stream-json", "--verbose",
                    "--model", "sonnet", "--dangerously-skip-permissions"]


def test_stop_hook_command_saves_its_input(tmp_path: Path) -> None:
    """The hook command, run by a shell as Claude Code runs it, stores its stdin JSON under the
    stop file's name, and both Stop and StopFailure use it."""
    stop = tmp_path / "with space" / "claude-stop-1.json"
    stop.parent.mkdir()
    settings = _hook_settings(stop)
    assert settings["hooks"]["Stop"] == settings["hooks"]["StopFailure"]
    command = settings["hooks"]["Stop"][0]["hooks"][0]["command"]
    payload = '{"hook_event_name": "Stop", "last_assistant_message": "done"}'
    subprocess.run(["sh", "-c", command], input=payload, text=True, check=True)
    assert json.loads(stop.read_text())["last_assistant_message"] == "done"
    assert not stop.with_suffix(".tmp").exists()


def test_transcript_gives_final_text_and_summed_usage(tmp_path: Path) -> None:
    """The last assistant message's text blocks make the final answer; usage is counted once
    per message even when a message is split over several lines."""
    lines = [
        {"type": "user", "message": {"role": "user", "content": "go"}},
        {"type": "assistant", "message": {"id": "m1", "usage": {"input_tokens": 10,
         "output_tokens": 2}, "content": [{"type": "text", "text": "first"}]}},
        {"type": "assistant", "message": {"id": "m1", "usage": {"input_tokens": 10,
         "output_tokens": 2}, "content": [{"type": "tool_use", "name": "Bash", "input": {}}]}},
        {"type": "assistant", "message": {"id": "m2", "usage": {"input_tokens": 30,
         "output_tokens": 5, "cache_read_input_tokens": 4},
         "content": [{"type": "text", "text": "All done."}]}},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    final, usage = read_session_transcript(path)
    assert final == "All done."
    assert usage == Usage(input_tokens=40, output_tokens=7, cache_read_tokens=4)
    assert read_session_transcript(tmp_path / "missing.jsonl") == ("", None)


def test_offline_config_approves_the_key_and_trusts_projects(tmp_path: Path) -> None:
    """The config marks onboarding and bypass mode done, approves the key by its last 20
    characters, trusts each project, and keeps keys that were already there."""
    config = tmp_path / "cfg"
    config.mkdir()
    (config / ".claude.json").write_text(json.dumps({"numStartups": 3}))
    key = "sk-ant-" + "x" * 10 + "0123456789abcdefghij"
    prepare_offline_claude_config(config, key, [tmp_path / "repo"])
    prepare_offline_claude_config(config, key, [tmp_path / "repo"])  # idempotent
    state = json.loads((config / ".claude.json").read_text())
    assert state["numStartups"] == 3
    assert state["hasCompletedOnboarding"] is True
    assert state["bypassPermissionsModeAccepted"] is True
    assert state["customApiKeyResponses"]["approved"] == ["0123456789abcdefghij"]
    assert state["projects"][str(tmp_path / "repo")]["hasTrustDialogAccepted"] is True
    settings = json.loads((config / "settings.json").read_text())
    assert settings["skipDangerousModePermissionPrompt"] is True


def test_offline_config_refuses_a_broken_file(tmp_path: Path) -> None:
    """A config file that is not JSON is reported, not overwritten."""
    (tmp_path / ".claude.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        prepare_offline_claude_config(tmp_path, "k", [])
    assert (tmp_path / ".claude.json").read_text() == "{broken"


@pytest.mark.parametrize(("status", "kind"), [
    (401, FailureKind.AUTH), (429, FailureKind.RATE_LIMIT), (529, FailureKind.RATE_LIMIT),
])
def test_api_status_decides_the_failure(status: int, kind: FailureKind) -> None:
    """The API status Claude Code reports decides the kind; auth failures say how to log in."""
    found, detail, _ = _classify(1, failed=True, api_status=status, error_text="API Error")
    assert found == kind
    assert str(status) in detail
    assert ("claude /login" in detail) is (kind == FailureKind.AUTH)


def test_success_needs_some_output() -> None:
    """Exit 0 with an answer is success; exit 0 without a word is EMPTY_OUTPUT; a non-zero exit
    without known words is CRASH."""
    assert _classify(0, failed=False)[0] is None
    assert _classify(0, failed=False, said_anything=False)[0] == FailureKind.EMPTY_OUTPUT
    assert _classify(3, failed=True, output_tail="segfault")[0] == FailureKind.CRASH
    assert _classify(1, failed=True, error_text="API Error: Connection error. fetch failed")[
        0] == FailureKind.NETWORK
