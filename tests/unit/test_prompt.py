"""Prompt assembly: template search order, agent blocks, variables and section order."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ralph_uv.config import Paths, paths
from ralph_uv.prompt import (
    PromptContext,
    build_prompt,
    builtin_template,
    find_template,
    render_header,
    render_template,
    select_agent_blocks,
    substitute,
    template_candidates,
)


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root.resolve()


def _ctx(task_dir: Path, **changes: object) -> PromptContext:
    values: dict[str, object] = {
        "task_dir": task_dir,
        "prd_file": task_dir / "prd.json",
        "progress_file": task_dir / "progress.txt",
        "branch_name": "ralph/login",
        "agent": "claude",
        "iteration": 3,
        "story_id": "US-002",
    }
    values.update(changes)
    return PromptContext(**values)  # type: ignore[arg-type]


def _dirs() -> Paths:
    return paths()  # under the test's own RALPH_HOME


# -- search order ------------------------------------------------------------------------------


def test_candidates_are_task_config_repo_data(tmp_path: Path) -> None:
    """The template is looked for in the task folder, the config folder, the repository root
    and the data folder, in that order."""
    dirs = _dirs()
    task, root = tmp_path / "repo" / "tasks" / "t", tmp_path / "repo"
    assert template_candidates(task, root, dirs) == [
        task / "prompt.md",
        dirs.config / "prompt.md",
        root / "prompt.md",
        dirs.data / "prompt.md",
    ]


def test_config_folder_is_named_ralph_without_ralph_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RALPH_HOME the config-folder template is ~/.config/ralph/prompt.md (XDG)."""
    monkeypatch.delenv("RALPH_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent/cfg")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent/run")
    [_, config_candidate, *_] = template_candidates(Path("/t"), Path("/r"))
    assert config_candidate == Path("/nonexistent/cfg/ralph/prompt.md")


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4])
def test_first_existing_template_wins(tmp_path: Path, level: int) -> None:
    """With templates at every level from `level` down, the one at `level` is used; with none,
    the built-in template is."""
    dirs = _dirs()
    root = _repo(tmp_path)
    task = root / "tasks" / "t"
    task.mkdir(parents=True)
    candidates = template_candidates(task, root, dirs)
    for i, file in enumerate(candidates):
        if i >= level:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(f"template {i}\n", encoding="utf-8")
    found = find_template(task, root, dirs)
    if level < len(candidates):
        assert found.text == f"template {level}\n"
        assert found.path == candidates[level]
    else:
        assert found.text == builtin_template()
        assert found.origin == "built-in"


def test_builtin_template_covers_the_loop_contract() -> None:
    """The shipped template names the story, the files and the completion marker."""
    text = builtin_template()
    for needle in ("{STORY_ID}", "{PRD_FILE}", "{PROGRESS_FILE}", "{BRANCH_NAME}",
                   "## Codebase Patterns", "<promise>COMPLETE</promise>", "passes"):  # fmt: skip
        assert needle in text


# -- agent blocks and variables ----------------------------------------------------------------


TEMPLATE = (
    "Start\n"
    "<!-- agent:claude -->\n"
    "Claude only\n"
    "<!-- /agent:claude -->\n"
    "  <!--agent:opencode-->\n"
    "OpenCode only\n"
    "<!-- /agent:opencode -->\n"
    "Inline: <!-- agent:claude -->[c]<!-- /agent:claude -->"
    "<!-- agent:opencode -->[o]<!-- /agent:opencode -->.\n"
    "End\n"
)


def test_blocks_of_the_running_agent_are_kept_without_markers() -> None:
    """The running agent's blocks stay (markers gone); other agents' blocks go whole."""
    assert select_agent_blocks(TEMPLATE, "claude") == "Start\nClaude only\nInline: [c].\nEnd\n"
    assert select_agent_blocks(TEMPLATE, "opencode") == "Start\nOpenCode only\nInline: [o].\nEnd\n"
    assert select_agent_blocks(TEMPLATE, "codex") == "Start\nInline: .\nEnd\n"


def test_agent_names_are_case_insensitive_and_blocks_nest() -> None:
    """Block names match the agent regardless of case; a block inside a kept block is judged
    on its own."""
    text = "<!-- agent:Claude -->a<!-- agent:codex -->b<!-- /agent:codex -->c<!-- /agent:Claude -->"
    assert select_agent_blocks(text, "claude") == "ac"
    assert select_agent_blocks(text, "codex") == ""


def test_known_variables_are_replaced_and_other_braces_left_alone() -> None:
    """Known {NAMES} are replaced; unknown names, JSON, format specs and doubled braces stay."""
    text = '{STORY_ID} {UNKNOWN} {story_id} {"passes": true} {{STORY_ID}} {0} {} {AGENT'
    out = substitute(text, {"STORY_ID": "US-1", "AGENT": "x"})
    assert out == 'US-1 {UNKNOWN} {story_id} {"passes": true} {US-1} {0} {} {AGENT'


def test_values_are_not_expanded_again() -> None:
    """A value that itself contains {NAME} is inserted literally (one pass)."""
    assert substitute(
        "{BRANCH_NAME}/{STORY_ID}", {"BRANCH_NAME": "{STORY_ID}", "STORY_ID": "S"}
    ) == ("{STORY_ID}/S")


def test_render_template_fills_every_variable(tmp_path: Path) -> None:
    """Every documented variable gets its value from the context."""
    ctx = _ctx(tmp_path)
    text = " ".join(f"{{{name}}}" for name in ctx.variables())
    assert render_template(text, "claude", ctx.variables()) == (
        f"{tmp_path} {tmp_path}/prd.json {tmp_path}/progress.txt ralph/login claude 3 US-002"
    )


# -- assembly ----------------------------------------------------------------------------------


def test_header_is_exactly_the_fixed_lines(tmp_path: Path) -> None:
    """The prompt starts with the fixed header other tools parse, line for line."""
    ctx = _ctx(tmp_path, repo_root=tmp_path, dirs=_dirs())
    expected = (
        "# Ralph loop — iteration 3\n"
        f"- Task directory: {tmp_path}\n"
        f"- PRD file: {tmp_path}/prd.json\n"
        f"- Progress file: {tmp_path}/progress.txt\n"
        "- Branch: ralph/login\n"
        "- Agent: claude\n"
        "- Story: US-002\n"
    )
    assert render_header(ctx) == expected
    assert build_prompt(ctx, injected="hello").startswith(expected)


def test_sections_come_in_order(tmp_path: Path) -> None:
    """Header, injected message, PRD notes, root AGENTS.md, task AGENTS.md, setup, template —
    with the repository root found through git."""
    root = _repo(tmp_path)
    task = root / "tasks" / "login"
    task.mkdir(parents=True)
    (root / "AGENTS.md").write_text("ROOT-AGENTS\n", encoding="utf-8")
    (task / "AGENTS.md").write_text("TASK-AGENTS\n", encoding="utf-8")
    (task / "prompt.md").write_text("TEMPLATE for {STORY_ID} {NOT_A_VAR}\n", encoding="utf-8")
    ctx = _ctx(task, notes="PRD-NOTES", first_run_setup=True, dirs=_dirs())
    prompt = build_prompt(ctx, injected="INJECTED-MESSAGE")
    marks = ["# Ralph loop", "INJECTED-MESSAGE", "PRD-NOTES", "ROOT-AGENTS", "TASK-AGENTS",
             "## First-run setup", "TEMPLATE for US-002 {NOT_A_VAR}"]  # fmt: skip
    positions = [prompt.index(mark) for mark in marks]
    assert positions == sorted(positions)
    assert str(root / "AGENTS.md") in prompt
    assert prompt.endswith("{NOT_A_VAR}\n")


def test_injected_prompt_appears_once_and_only_when_given(tmp_path: Path) -> None:
    """An injected message is in the prompt exactly once; without one there is no such section."""
    (tmp_path / "prompt.md").write_text("body\n", encoding="utf-8")
    ctx = _ctx(tmp_path, repo_root=tmp_path, dirs=_dirs())
    with_message = build_prompt(ctx, injected="please fix the login test")
    assert with_message.count("please fix the login test") == 1
    plain = build_prompt(ctx)
    assert "Message from the operator" not in plain
    assert "Message from the operator" in with_message


def test_optional_sections_are_left_out(tmp_path: Path) -> None:
    """Without notes, AGENTS.md files or first-run setup the prompt is header plus template."""
    (tmp_path / "prompt.md").write_text("only the template\n", encoding="utf-8")
    ctx = _ctx(tmp_path, repo_root=tmp_path, dirs=_dirs())
    assert build_prompt(ctx) == render_header(ctx) + "\nonly the template\n"


def test_agents_md_of_a_task_at_the_root_is_included_once(tmp_path: Path) -> None:
    """When the task folder is the repository root its AGENTS.md appears once, not twice."""
    (tmp_path / "AGENTS.md").write_text("SHARED-RULES\n", encoding="utf-8")
    ctx = _ctx(tmp_path, repo_root=tmp_path, dirs=_dirs())
    assert build_prompt(ctx).count("SHARED-RULES") == 1


def test_builtin_prompt_renders_for_each_agent(tmp_path: Path) -> None:
    """With no template anywhere, the built-in one is rendered: variables filled, agent blocks
    resolved, no markers left."""
    for agent in ("claude", "opencode"):
        prompt = build_prompt(_ctx(tmp_path, agent=agent, repo_root=tmp_path, dirs=_dirs()))
        assert "{STORY_ID}" not in prompt
        assert "<!-- agent:" not in prompt
        assert "<!-- /agent:" not in prompt
        assert "**US-002**" in prompt
        assert ("subagents" in prompt) == (agent == "claude")
