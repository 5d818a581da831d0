"""Task repositories for tests: ``git`` in a folder, a prd.json with open stories, and a new
git repository holding one task, committed on ``main``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def git(repo: Path, *args: str) -> str:
    """Run ``git -C repo args``; its stdout, stripped (a failure raises)."""
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def prd_document(project: str, stories: int, description: str) -> dict[str, Any]:
    """A prd.json for ``project`` on branch ``ralph/<project>`` with ``stories`` open stories
    ``US-001``, ``US-002``, ... of one criterion each."""
    return {
        "schemaVersion": "2.5",
        "project": project,
        "branchName": f"ralph/{project}",
        "description": description,
        "userStories": [
            {
                "id": f"US-{i:03d}",
                "title": f"Story {i}",
                "description": "do it",
                "acceptanceCriteria": [{"description": "done", "passes": False}],
                "priority": i,
                "passes": False,
            }
            for i in range(1, stories + 1)
        ],
    }


def new_task_repo(repo: Path, name: str, prd: dict[str, Any]) -> Path:
    """A new git repository ``repo`` whose one commit holds ``tasks/<name>/prd.json``; returns
    the task folder."""
    task = repo / "tasks" / name
    task.mkdir(parents=True)
    (task / "prd.json").write_text(json.dumps(prd, indent=2) + "\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    return task
