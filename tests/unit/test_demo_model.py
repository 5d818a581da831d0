"""The scripted demo model decides each step from the request alone, for Claude Code's and
OpenCode's request shapes, and the shell command it writes really does the bookkeeping."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from ralph_uv.demo.demo_model import (
    COMPLETE_MARKER,
    DemoModel,
    EchoCompleteModel,
    ModelReply,
    NoProgressModel,
    SlowModel,
    ToolUseBlock,
    find_ralph_prompt,
)
from ralph_uv.demo.sample_code import SAMPLE_STORIES


def _prompt(repo: Path, story: str = "TEXT-001", iteration: int = 3) -> str:
    return (
        f"# Ralph loop — iteration {iteration}\n"
        f"- Task directory: {repo}\n"
        f"- PRD file: {repo}/prd.json\n"
        f"- Progress file: {repo}/progress.txt\n"
        "- Branch: ralph/textkit\n"
        "- Agent: claude\n"
        f"- Story: {story}\n\n"
        "Work on the story. When every story passes, end with <promise>COMPLETE</promise>.\n"
    )


def _claude_body(repo: Path, prompt: str, turns: list[dict[str, Any]] | None = None) -> dict[
    str, Any
]:
    """A request shaped like Claude Code's: a system-reminder block before the prompt, a
    ``system`` role message, and its Write/Bash tools among others."""
    return {
        "model": "claude-test",
        "stream": True,
        "system": [{"type": "text", "text": f"Env:\n - Primary working directory: {repo}\n"}],
        "tools": [
            {"name": "Read", "input_schema": {"properties": {"file_path": {}}}},
            {"name": "Bash", "input_schema": {"properties": {
                "command": {}, "timeout": {}, "description": {}, "run_in_background": {}}}},
            {"name": "Write", "input_schema": {"properties": {"file_path": {}, "content": {}}}},
            {"name": "TodoWrite", "input_schema": {"properties": {"todos": {}}}},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\ncontext\n</system-reminder>\n"},
                {"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}},
            ]},
            {"role": "system", "content": "Available agent types: ..."},
            *(turns or []),
        ],
    }


def _opencode_body(repo: Path, prompt: str, turns: list[dict[str, Any]] | None = None) -> dict[
    str, Any
]:
    """A request shaped like OpenCode's: lower-case tools, ``filePath``, a string prompt."""
    return {
        "model": "claude-test",
        "system": [{"type": "text", "text": f"<env>\n  Working directory: {repo}\n</env>"}],
        "tools": [
            {"name": "bash", "input_schema": {"properties": {
                "command": {}, "timeout": {}, "workdir": {}, "description": {}}}},
            {"name": "write", "input_schema": {"properties": {"content": {}, "filePath": {}}}},
        ],
        "messages": [{"role": "user", "content": prompt}, *(turns or [])],
    }


def _turn(call: ToolUseBlock, result: str, is_error: bool = False) -> list[dict[str, Any]]:
    """The assistant's tool call and the client's tool result, as they come back next request."""
    return [
        {"role": "assistant", "content": [
            {"type": "text", "text": "..."},
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "is_error": is_error,
             "content": [{"type": "text", "text": result}]},
        ]},
    ]


def _only_call(reply: ModelReply) -> ToolUseBlock:
    assert reply.stop_reason == "tool_use"
    (call,) = reply.tool_calls
    return call


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    with resources.as_file(resources.files("ralph_uv.demo").joinpath("sample_task")) as src:
        shutil.copytree(src, repo)
    for args in (["init", "-q"], ["config", "user.email", "t@example.invalid"],
                 ["config", "user.name", "T"], ["add", "-A"], ["commit", "-qm", "start"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def test_prompt_fields_are_parsed_from_the_first_user_message(tmp_path: Path) -> None:
    """The header's ``- Key: value`` lines are read even after a system-reminder block."""
    body = _claude_body(tmp_path, _prompt(tmp_path, "TEXT-002", iteration=7))
    prompt = find_ralph_prompt(body["messages"])
    assert prompt is not None
    assert prompt.iteration == 7
    assert prompt.story_id == "TEXT-002"
    assert prompt.prd_file == f"{tmp_path}/prd.json"
    assert prompt.progress_file == f"{tmp_path}/progress.txt"
    assert prompt.fields["branch"] == "ralph/textkit"
    assert find_ralph_prompt([{"role": "user", "content": "hello"}]) is None


def test_first_step_writes_the_deliverable_with_claude_tools(tmp_path: Path) -> None:
    """With Claude Code's tools the first reply is a ``Write`` call with ``file_path`` (absolute,
    under the working directory) and the story's canned content."""
    call = _only_call(DemoModel().decide(_claude_body(tmp_path, _prompt(tmp_path))))
    assert call.name == "Write"
    assert call.input == {"file_path": f"{tmp_path}/textkit/slug.py",
                          "content": SAMPLE_STORIES["TEXT-001"].content}


def test_first_step_writes_the_deliverable_with_opencode_tools(tmp_path: Path) -> None:
    """With OpenCode's tools the same step uses ``write`` and ``filePath``."""
    call = _only_call(DemoModel().decide(_opencode_body(tmp_path, _prompt(tmp_path))))
    assert call.name == "write"
    assert set(call.input) == {"filePath", "content"}
    assert call.input["filePath"] == f"{tmp_path}/textkit/slug.py"


def test_argument_names_come_from_the_schema(tmp_path: Path) -> None:
    """A client whose write tool calls its path argument ``path`` gets ``path``."""
    body = _claude_body(tmp_path, _prompt(tmp_path))
    body["tools"] = [
        {"name": "WRITE", "input_schema": {"properties": {"path": {}, "content": {}}}},
        {"name": "BASH", "input_schema": {"properties": {"command": {}}}},
    ]
    call = _only_call(DemoModel().decide(body))
    assert call.name == "WRITE"
    assert set(call.input) == {"path", "content"}


def test_decisions_are_deterministic(tmp_path: Path) -> None:
    """The same request gives the same reply, tool ids included (nothing is remembered)."""
    body = _claude_body(tmp_path, _prompt(tmp_path))
    assert DemoModel().decide(body) == DemoModel().decide(body)


def test_second_step_command_marks_the_story_commits_and_counts(repo: Path) -> None:
    """After the write succeeded, the model runs one shell command; run for real in a git repo,
    it sets only that story's ``passes``, logs progress, commits with the story's title and
    prints how many stories still fail."""
    model = DemoModel()
    write = _only_call(model.decide(_claude_body(repo, _prompt(repo))))
    (repo / "textkit" / "slug.py").write_text(write.input["content"])
    bash = _only_call(model.decide(_claude_body(repo, _prompt(repo),
                                                _turn(write, "File created successfully"))))
    assert bash.name == "Bash"
    assert bash.input["description"]
    done = subprocess.run(["bash", "-c", bash.input["command"]], cwd=repo, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Stories still failing: 2"
    prd = json.loads((repo / "prd.json").read_text())
    first, second, _ = prd["userStories"]
    assert first["passes"] is True
    assert all(c["passes"] for c in first["acceptanceCriteria"])
    assert second["passes"] is False
    assert prd["branchName"] == "ralph/textkit"
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert log[0] == "TEXT-001: Slugify titles"
    assert "TEXT-001: Slugify titles" in (repo / "progress.txt").read_text()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout == ""


def test_a_refused_write_is_done_by_the_shell_command(repo: Path) -> None:
    """When the write tool reports an error, the shell command writes the file itself."""
    model = DemoModel()
    body = _opencode_body(repo, _prompt(repo, "TEXT-002"))
    write = _only_call(model.decide(body))
    body = _opencode_body(repo, _prompt(repo, "TEXT-002"),
                          _turn(write, "You must read the file first", is_error=True))
    bash = _only_call(model.decide(body))
    assert bash.name == "bash"
    subprocess.run(["bash", "-c", bash.input["command"]], cwd=repo, check=True,
                   capture_output=True)
    assert (repo / "textkit" / "counts.py").read_text() == SAMPLE_STORIES["TEXT-002"].content


def test_the_last_story_passes_the_sample_tests(repo: Path) -> None:
    """The third story's command runs the sample's unit tests against the two canned modules,
    so its commit only happens when they pass."""
    model = DemoModel()
    for story in ("TEXT-001", "TEXT-002", "TEXT-003"):
        body = _claude_body(repo, _prompt(repo, story))
        write = _only_call(model.decide(body))
        path = Path(write.input["file_path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(write.input["content"])
        bash = _only_call(model.decide(_claude_body(repo, _prompt(repo, story),
                                                    _turn(write, "ok"))))
        done = subprocess.run(["bash", "-c", bash.input["command"]], cwd=repo,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("Stories still failing: 0")


@pytest.mark.parametrize(("output", "claims"), [
    ("Stories still failing: 0", True),
    ("Stories still failing: 2", False),
])
def test_final_answer_claims_completion_only_when_nothing_fails(
    tmp_path: Path, output: str, claims: bool
) -> None:
    """The summary ends with the completion marker only when the command printed 0."""
    model = DemoModel()
    body = _claude_body(tmp_path, _prompt(tmp_path))
    write = _only_call(model.decide(body))
    turns = _turn(write, "ok")
    bash = _only_call(model.decide(_claude_body(tmp_path, _prompt(tmp_path), turns)))
    reply = model.decide(_claude_body(tmp_path, _prompt(tmp_path), turns + _turn(bash, output)))
    assert reply.stop_reason == "end_turn"
    assert not reply.tool_calls
    assert (COMPLETE_MARKER in reply.full_text) is claims
    assert reply.full_text.rstrip().endswith(COMPLETE_MARKER) is claims


def test_a_failed_command_is_reported_without_completion(tmp_path: Path) -> None:
    """When the shell command fails, the answer says so and claims nothing."""
    model = DemoModel()
    write = _only_call(model.decide(_claude_body(tmp_path, _prompt(tmp_path))))
    turns = _turn(write, "ok")
    bash = _only_call(model.decide(_claude_body(tmp_path, _prompt(tmp_path), turns)))
    reply = model.decide(_claude_body(
        tmp_path, _prompt(tmp_path),
        turns + _turn(bash, "fatal: not a git repository\nStories still failing: 0", True)))
    assert "failed" in reply.full_text
    assert COMPLETE_MARKER not in reply.full_text


def test_unknown_stories_get_a_note(tmp_path: Path) -> None:
    """A story the model has no implementation for gets ``notes/<story-id>.md``."""
    call = _only_call(DemoModel().decide(_claude_body(tmp_path, _prompt(tmp_path, "US-042"))))
    assert call.input["file_path"] == f"{tmp_path}/notes/US-042.md"
    assert "US-042" in call.input["content"]


def test_requests_without_tools_get_a_short_text(tmp_path: Path) -> None:
    """Title generation and other chores (no tools offered) get a short text answer."""
    body = _claude_body(tmp_path, _prompt(tmp_path))
    del body["tools"]
    reply = DemoModel().decide(body)
    assert not reply.tool_calls
    assert 0 < len(reply.full_text) < 40
    body["system"] = "You generate a short title for the conversation."
    assert DemoModel().decide(body).full_text == "Ralph demo iteration"


def test_json_output_requests_get_json_that_fits_the_schema(tmp_path: Path) -> None:
    """A tool-less request asking for JSON output (Claude Code's title request) gets a JSON
    object with every required property, of the declared type."""
    body = _claude_body(tmp_path, _prompt(tmp_path))
    del body["tools"]
    body["output_config"] = {"format": {"type": "json_schema", "schema": {
        "type": "object", "required": ["title", "isNew", "count"],
        "properties": {"title": {"type": "string"}, "isNew": {"type": "boolean"},
                       "count": {"type": "integer"}}}}}
    answer = json.loads(DemoModel().decide(body).full_text)
    assert answer == {"title": "Ralph demo iteration", "isNew": False, "count": 0}


def test_echo_model_quotes_the_marker_and_does_nothing(tmp_path: Path) -> None:
    """The echo scenario answers with the prompt itself, completion marker included."""
    reply = EchoCompleteModel().decide(_claude_body(tmp_path, _prompt(tmp_path)))
    assert not reply.tool_calls
    assert "end with <promise>COMPLETE</promise>." in reply.full_text
    assert "# Ralph loop — iteration 3" in reply.full_text


def test_no_progress_model_only_talks(tmp_path: Path) -> None:
    """The no-progress scenario never calls a tool and never claims completion."""
    reply = NoProgressModel().decide(_opencode_body(tmp_path, _prompt(tmp_path)))
    assert not reply.tool_calls
    assert COMPLETE_MARKER not in reply.full_text


async def test_slow_model_delays_the_inner_reply(tmp_path: Path) -> None:
    """The slow scenario answers as its inner model does, after the delay."""
    body = _claude_body(tmp_path, _prompt(tmp_path))
    started = time.monotonic()
    reply = await SlowModel(0.3).reply(body)
    assert time.monotonic() - started >= 0.3
    assert reply == DemoModel().decide(body)
    pending = asyncio.ensure_future(SlowModel(5).reply(body))
    await asyncio.sleep(0)
    assert not pending.done()
    pending.cancel()


def test_a_prompt_handed_over_as_a_file_is_read_first(tmp_path: Path) -> None:
    """When the first message only points at a prompt file, the model reads it (first lines)
    with the read tool, then finds the prompt in the numbered tool result and starts work."""
    prompt_file = tmp_path / "loop" / "prompt-1.md"
    body = _claude_body(tmp_path, f"Your instructions are in the file {prompt_file}. Read it.")
    body["tools"][0]["input_schema"]["properties"].update(limit={}, offset={})
    read = _only_call(DemoModel().decide(body))
    assert read.name == "Read"
    assert read.input == {"file_path": str(prompt_file), "limit": 100}
    numbered = "\n".join(f"{n:>6}\t{line}" for n, line in
                         enumerate(_prompt(tmp_path, "TEXT-002").splitlines(), 1))
    body["messages"] += _turn(read, numbered)
    write = _only_call(DemoModel().decide(body))
    assert write.name == "Write"
    assert write.input["file_path"] == f"{tmp_path}/textkit/counts.py"
