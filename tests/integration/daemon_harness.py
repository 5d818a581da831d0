"""Real ralphd processes for tests: a git repository with a task, a config.toml defining
long-running test agents, ``python -m ralph_uv.daemon start --foreground`` as a child process
(so a test can ``kill -9`` it), and clean-up of every runner it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import wait_until
from tests.integration.task_repo import git as git
from tests.integration.task_repo import new_task_repo, prd_document

from ralph_uv.config import paths
from ralph_uv.daemon.supervisor import process_alive
from ralph_uv.registry import Registry

FIXTURES = Path(__file__).parent.parent / "fixtures"
LONG_AGENT = FIXTURES / "long_agent.py"
SCRIPTED_AGENT = FIXTURES / "scripted_agent.py"

AGENTS: dict[str, list[str]] = {
    "sleep": [sys.executable, str(LONG_AGENT), "sleep", "{prompt_file}"],
    "tick": [sys.executable, str(LONG_AGENT), "tick", "{prompt_file}"],
    "flood": [sys.executable, str(LONG_AGENT), "flood:3000000", "{prompt_file}"],
    "work": [sys.executable, str(SCRIPTED_AGENT), "work", "{prompt_file}"],
    "missing": ["/nonexistent/agent-binary", "{prompt}"],
}


def make_task(root: Path, name: str = "demo", stories: int = 1) -> Path:
    """A git repository ``root/<name>-repo`` holding ``tasks/<name>/prd.json``; the task folder."""
    return new_task_repo(root / f"{name}-repo", name, prd_document(name, stories, "daemon test"))


def write_config(daemon: dict[str, Any] | None = None) -> None:
    """config.toml with the test agents (no pause between iterations), and daemon.toml."""
    folder = paths().config
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["pause = 0", "terminate_grace = 1.0", ""]
    for name, command in AGENTS.items():
        lines.append(f"[agents.{name}]")
        lines.append("command = [" + ", ".join(json.dumps(part) for part in command) + "]")
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    if daemon:
        text = "\n".join(f"{key} = {json.dumps(value)}" for key, value in daemon.items())
        (folder / "daemon.toml").write_text(text + "\n")


class Ralphd:
    """``ralphd start --foreground`` as a child process of the test."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log = paths().state / "daemon" / "test-ralphd.out"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Ralphd:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ralph_uv.daemon", "start", "--foreground"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )
        wait_until(self._ready, timeout=30)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"ralphd exited: {self.log.read_text()[-3000:]}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(paths().daemon_socket))
            except OSError:
                return False
        return True

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def runner_pids() -> list[int]:
    """Pids of every runner in this test's registry that still runs."""
    if not paths().registry.exists():
        return []
    with Registry.open() as registry:
        return [r.pid for r in registry.find() if r.pid and process_alive(r.pid)]


def kill_runners() -> None:
    """Kill the runners this test's ralphd started (their agents get SIGHUP from the PTY)."""
    pids = runner_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def journal_bytes(loop_id: str) -> bytes:
    """Every byte of a loop's output journal, read from its segment files."""
    folder = paths().loop_dir(loop_id) / "output.journal"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.seg")))
