"""Integration fixtures for tests of real runner processes (tests/integration/runner_harness.py):

- ``task``: a git repository holding ``tasks/demo`` with two open stories, and a config.toml
  defining the test agents.
- ``runners``: starts a runner on ``task`` (``runners(agent="cat", **start_runner options)``)
  and makes sure every runner it started is gone after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.runner_harness import (
    RunnerProcess,
    StartRunner,
    make_task,
    start_runner,
    write_agents_config,
)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    write_agents_config()
    return make_task(tmp_path)


@pytest.fixture
def runners(task: Path) -> Iterator[StartRunner]:
    started: list[RunnerProcess] = []

    def start(agent: str = "cat", **kwargs: Any) -> RunnerProcess:
        runner = start_runner(task, agent, **kwargs)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.shutdown()
