"""``ralph-uv demo``: a real Ralph loop with a real agent CLI and the offline demo model.

It builds a small git repository holding the sample task (three stories), starts the scripted
model server on loopback, and runs the loop to the end with the real ``claude`` (or
``opencode``) CLI, which edits files, updates prd.json and commits exactly as it would against
the real model. No API key is used and nothing leaves the machine.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ralph_uv.config import Config
from ralph_uv.demo.demo_model import DemoModel
from ralph_uv.demo.model_server import ModelServer
from ralph_uv.demo.offline import offline_agent_env
from ralph_uv.errors import UserError
from ralph_uv.runner.engine import LoopOutcome, LoopSpec
from ralph_uv.runner.host import LoopHost, new_loop_id

__all__ = ["DEMO_AGENTS", "make_sample_repo", "run_demo"]

DEMO_AGENTS = ("claude-print", "claude", "opencode")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


def make_sample_repo(repo: Path) -> Path:
    """Copy the sample task into a new git repository at ``repo`` (one commit on ``main``)."""
    if repo.exists() and any(repo.iterdir()):
        raise UserError(f"{repo} already exists and is not empty; choose another --dir")
    source = resources.files("ralph_uv.demo").joinpath("sample_task")
    with resources.as_file(source) as folder:
        shutil.copytree(folder, repo, dirs_exist_ok=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "demo@ralph-uv.invalid")
    _git(repo, "config", "user.name", "ralph-uv demo")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "Sample task for the ralph-uv demo")
    return repo


async def run_demo(
    workdir: Path,
    *,
    agent: str,
    config: Config,
    on_output: Callable[[bytes], None],
    on_note: Callable[[str], None],
) -> LoopOutcome:
    """Run the demo loop in ``workdir`` (created); return how the loop ended."""
    if agent not in DEMO_AGENTS:
        raise UserError(f"the demo runs one of {', '.join(DEMO_AGENTS)}, not {agent!r}")
    repo = make_sample_repo(workdir / "textkit")
    async with ModelServer(DemoModel()) as server:
        on_note(
            f"Using the OFFLINE DEMO MODEL: a scripted model server on {server.base_url}. "
            "No API key is used and nothing leaves this machine."
        )
        on_note(f"Sample repository: {repo} (task: prd.json with three stories)")
        env = offline_agent_env(workdir / "agent-home", server.base_url, [repo])
        spec = LoopSpec(
            loop_id=new_loop_id("demo"),
            task_dir=repo,
            agent=agent,
            task_name="textkit-demo",
            env=env,
        )
        host = LoopHost(spec, config, on_output=on_output)
        try:
            return await host.run()
        finally:
            host.close()
