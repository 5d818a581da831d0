"""End-to-end fixtures: the scripted model server, a git repository holding the sample task, and
an environment in which the real agent CLIs talk only to that server.

- ``model_server``: a running :class:`ModelServer` with :class:`DemoModel`; assign
  ``model_server.model`` to play another scenario, use ``inject_faults`` for API errors.
- ``sample_repo``: a fresh git repository whose top folder is the sample task (prd.json, starter
  files), with one commit.
- ``claude_env``: ``HOME`` and ``CLAUDE_CONFIG_DIR`` in a temp folder, prepared so the TUI starts
  without dialogs, pointing ``ANTHROPIC_BASE_URL`` at the model server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest
from tests.e2e.agent_helpers import DEMO_API_KEY, git

from ralph_uv.agents.claude import prepare_offline_claude_config
from ralph_uv.agents.detect import find_binary
from ralph_uv.demo.demo_model import DemoModel
from ralph_uv.demo.model_server import ModelServer


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    async with ModelServer(DemoModel()) as server:
        yield server


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    source = resources.files("ralph_uv.demo").joinpath("sample_task")
    with resources.as_file(source) as folder:
        shutil.copytree(folder, repo)
    git(repo, "init", "-q", "-b", "ralph/textkit")
    git(repo, "config", "user.email", "tests@example.invalid")
    git(repo, "config", "user.name", "Tests")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "sample task")
    return repo


@pytest.fixture
def claude_binary() -> Path:
    found = find_binary("claude")
    if found is None:
        pytest.skip("the claude CLI is not installed (make agents)")
    return found


@pytest.fixture
def claude_env(tmp_path: Path, model_server: ModelServer, sample_repo: Path) -> dict[str, str]:
    home = tmp_path / "home"
    config = tmp_path / "claude-config"
    home.mkdir()
    prepare_offline_claude_config(config, DEMO_API_KEY, [sample_repo])
    return {
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(config),
        "ANTHROPIC_BASE_URL": model_server.base_url,
        "ANTHROPIC_API_KEY": DEMO_API_KEY,
        "CLAUDE_CODE_MAX_RETRIES": "1",  # injected API errors end the run quickly
    }
