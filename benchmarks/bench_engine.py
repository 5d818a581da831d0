"""Loop-engine overhead per iteration, the agent's own time excluded.

A real loop (git repository, prd.json with 40 stories, registry, journal, events, prompt
rendering, progress snapshots) runs with an in-process agent backend that marks its story as
passing and returns at once. The agent's time (measured inside the backend) is subtracted from
each iteration's wall time; what remains is what the engine itself costs. Target: < 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import cpu_model

from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    IterationRequest,
    OutputSink,
)
from ralph_uv.config import Config
from ralph_uv.prd import set_story_passes
from ralph_uv.runner.engine import LoopSpec
from ralph_uv.runner.host import LoopHost

STORIES = 40


class _DoneSession(AgentSession):
    def __init__(self, result: AgentResult) -> None:
        self._result = result

    async def wait(self) -> AgentResult:
        return self._result

    async def terminate(self, grace: float = 5.0) -> None:
        return None


class _InstantBackend(AgentBackend):
    """Marks the prompt's story as passing; records how long that took."""

    name = "instant"

    def __init__(self, prd_file: Path) -> None:
        self.prd_file = prd_file
        self.agent_time = 0.0

    async def start(self, request: IterationRequest, on_output: OutputSink) -> AgentSession:
        started = time.perf_counter()
        story = request.prompt.split("- Story: ", 1)[1].split("\n", 1)[0].strip()
        on_output(f"working on {story}\n".encode() * 20)
        set_story_passes(self.prd_file, story, True)
        self.agent_time += time.perf_counter() - started
        return _DoneSession(AgentResult(exit_code=0, final_text="done"))


def _repo(root: Path) -> Path:
    prd = {
        "schemaVersion": "2.5",
        "branchName": "ralph/bench",
        "userStories": [
            {"id": f"S-{i:03d}", "title": f"story {i}", "priority": i, "passes": False,
             "acceptanceCriteria": [{"description": "x", "passes": False}]}
            for i in range(STORIES)
        ],
    }
    root.mkdir(parents=True)
    (root / "prd.json").write_text(json.dumps(prd, indent=2))
    for args in (["init", "-q", "-b", "ralph/bench"], ["add", "-A"],
                 ["-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    return root


async def _measure(workdir: Path) -> dict[str, float]:
    repo = _repo(workdir / "repo")
    backend = _InstantBackend(repo / "prd.json")
    spec = LoopSpec(loop_id="bench-engine", task_dir=repo, agent="instant", task_name="bench")
    config = Config(pause=0, max_iterations=STORIES + 1)
    host = LoopHost(spec, config, backend_factory=lambda name, cfg: backend)
    started = time.perf_counter()
    outcome = await host.run()
    total = time.perf_counter() - started
    host.close()
    assert outcome.status.value == "completed", outcome.reason
    per_iteration = (total - backend.agent_time) / outcome.iterations
    return {"iterations": outcome.iterations, "total_s": total,
            "engine_ms_per_iteration": per_iteration * 1000}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        os.environ["RALPH_HOME"] = str(Path(tmp) / "home")
        runs = [asyncio.run(_measure(Path(tmp) / f"run{i}")) for i in range(3)]
    median = statistics.median(r["engine_ms_per_iteration"] for r in runs)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {sys.version.split()[0]}")
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"engine overhead per iteration (median of 3 loops of {STORIES}): {median:.1f} ms "
          f"(target < 50 ms)")
    print(json.dumps({"benchmark": "engine_overhead", "ms_per_iteration": round(median, 2),
                      "target_ms": 50, "runs": runs}))


if __name__ == "__main__":
    main()
