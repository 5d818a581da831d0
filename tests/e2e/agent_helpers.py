"""Helpers for end-to-end tests with real agent CLIs (fixtures are in ``conftest.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ralph_uv.prompt import PromptContext, build_prompt

DEMO_API_KEY = "sk-ant-demo-key-0123456789abcdefghijklmnop"


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo``; return its output (fails the test on a non-zero status)."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout


def ralph_prompt(repo: Path, story_id: str, agent: str, iteration: int = 1) -> str:
    """The prompt ralph-uv renders for one iteration over the sample task in ``repo``."""
    ctx = PromptContext(
        task_dir=repo,
        prd_file=repo / "prd.json",
        progress_file=repo / "progress.txt",
        branch_name="ralph/textkit",
        agent=agent,
        iteration=iteration,
        story_id=story_id,
        repo_root=repo,
    )
    return build_prompt(ctx)


def git_log(repo: Path) -> list[str]:
    return git(repo, "log", "--format=%s").splitlines()
