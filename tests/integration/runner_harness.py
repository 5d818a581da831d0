"""Real runner processes for tests: a git repository with a task, a config.toml defining test
agents, a spec.json, ``python -m ralph_uv.runner`` started detached as ralphd starts it, and a
JSON-RPC client over the runner's real Unix socket."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import async_wait_until
from tests.integration.task_repo import new_task_repo, prd_document

from ralph_uv.config import paths
from ralph_uv.journal import LoopJournal
from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.runner.host import new_loop_id
from ralph_uv.runner.spec import write_spec
from ralph_uv.transports.unix import open_unix

FIXTURES = Path(__file__).parent.parent / "fixtures"
INTERACTIVE_AGENT = FIXTURES / "interactive_agent.py"
SCRIPTED_AGENT = FIXTURES / "scripted_agent.py"

# Test agents every runner here knows (written to config.toml, as a person would).
AGENTS: dict[str, list[str]] = {
    "cat": [sys.executable, str(INTERACTIVE_AGENT), "cat", "{prompt_file}"],
    "flood": [sys.executable, str(INTERACTIVE_AGENT), "flood:4000000", "{prompt_file}"],
    "bigflood": [sys.executable, str(INTERACTIVE_AGENT), "flood:48000000", "{prompt_file}"],
    "work": [sys.executable, str(SCRIPTED_AGENT), "work", "{prompt_file}"],
}

# Quick loops: no pause, no circuit breaker in the way, short grace.
BASE_OVERRIDES: dict[str, Any] = {
    "pause": 0,
    "terminate_grace": 1.0,
    "stall_iterations": 50,
    "max_iterations": 20,
}


def make_task(root: Path, stories: int = 2) -> Path:
    """A git repository under ``root`` with ``tasks/demo/prd.json``; returns the task folder."""
    return new_task_repo(root / "repo", "demo", prd_document("demo", stories, "runner test"))


def write_agents_config() -> None:
    """config.toml in this test's RALPH_HOME with the test agents."""
    lines = []
    for name, command in AGENTS.items():
        lines.append(f"[agents.{name}]")
        lines.append("command = [" + ", ".join(json.dumps(part) for part in command) + "]")
    config_file = paths().config_file
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("\n".join(lines) + "\n")


@dataclass
class RunnerProcess:
    """A runner started as ralphd starts it; :meth:`shutdown` makes sure it is gone."""

    loop_id: str
    process: subprocess.Popen[bytes]
    socket_path: Path
    loop_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        path = self.loop_dir / "runner.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def journal_output(self) -> bytes:
        journal = LoopJournal(self.loop_dir, read_only=True)
        try:
            chunks: list[bytes] = []
            position = 0
            while True:
                result = journal.read_output(position, 1 << 22)
                if not result.data:
                    return b"".join(chunks)
                chunks.append(result.data)
                position = result.next
        finally:
            journal.close()

    def events(self) -> list[dict[str, Any]]:
        journal = LoopJournal(self.loop_dir, read_only=True)
        try:
            return [e.to_dict() for e in journal.read_events(0, 100_000)]
        finally:
            journal.close()

    async def wait_exit(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        await async_wait_until(lambda: self.process.poll() is not None, timeout=timeout)
        return self.process.returncode

    def shutdown(self) -> None:
        """TERM twice (checkpoint, then stop now), then KILL if it is still there."""
        for sig, patience in ((signal.SIGTERM, 1), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=patience)


StartRunner = Callable[..., RunnerProcess]
"""What the ``runners`` fixture gives: ``start(agent="cat", **start_runner options)``."""


def start_runner(
    task_dir: Path,
    agent: str,
    *,
    overrides: dict[str, Any] | None = None,
    linger: float = 0.5,
    loop_id: str | None = None,
) -> RunnerProcess:
    """Write the spec and start ``python -m ralph_uv.runner`` detached, as ralphd does."""
    loop_id = loop_id or new_loop_id("demo")
    dirs = paths()
    loop_dir = dirs.loop_dir(loop_id)
    loop_dir.mkdir(parents=True, mode=0o700)
    spec = loop_dir / "spec.json"
    write_spec(
        spec,
        loop_id=loop_id,
        task_dir=task_dir,
        task_name="demo",
        agent=agent,
        config={**BASE_OVERRIDES, **(overrides or {})},
    )
    with open(loop_dir / "runner.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ralph_uv.runner", "--spec", str(spec), "--linger",
             str(linger)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=os.environ.copy(),
        )
    return RunnerProcess(loop_id, process, dirs.loop_socket(loop_id), loop_dir)


@dataclass
class Client:
    """A JSON-RPC client of one runner that keeps every event it is sent."""

    endpoint: Endpoint
    events: list[dict[str, Any]] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    next_offset: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    async def connect(cls, socket_path: Path, name: str = "test", hello: bool = True) -> Client:
        methods: Dispatcher[Client] = Dispatcher()
        client = cls(Endpoint(await open_unix(socket_path), methods))
        client.endpoint.context = client

        @methods.method("event")
        async def on_event(context: Client, params: Any) -> None:
            context.record(params)

        client.endpoint.start()
        if hello:
            await client.call("hello", {"protocol": "1.0", "client": name})
        return client

    def record(self, params: dict[str, Any]) -> None:
        self.events.append(params)
        if params["type"] == "output":
            if self.next_offset is not None and params["seq"] != self.next_offset:
                raise AssertionError(f"output at {params['seq']}, expected {self.next_offset}")
            data = base64.b64decode(params["data"]["data"])
            assert params["data"]["next"] == params["seq"] + len(data)
            self.output += data
            self.next_offset = params["data"]["next"]
        elif params["type"] == "gap":
            self.gaps.append((params["data"]["from"], params["data"]["to"]))
            self.next_offset = params["data"]["to"]

    def loop_events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def call(self, method: str, params: Any = None, timeout: float = 15) -> Any:  # noqa: ASYNC109
        return await self.endpoint.call(method, params, timeout=timeout)

    async def wait_output(self, needle: bytes, timeout: float = 20) -> None:  # noqa: ASYNC109
        await async_wait_until(lambda: needle in self.output, timeout=timeout)

    async def close(self) -> None:
        await self.endpoint.close()


async def connect_when_ready(runner: RunnerProcess, name: str = "test") -> Client:
    """Wait for the runner's socket, then connect and say hello."""

    async def ready() -> bool:
        if runner.process.poll() is not None:
            raise AssertionError(f"runner exited early:\n{runner.log()}")
        return runner.socket_path.exists()

    await async_wait_until(ready, timeout=20)
    return await Client.connect(runner.socket_path, name)


async def wait_status(client: Client, predicate: Any, timeout: float = 20) -> dict[str, Any]:  # noqa: ASYNC109
    """Poll get_status until ``predicate(status)`` holds; return that status."""
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.update(await client.call("get_status"))
        return bool(predicate(seen))

    await async_wait_until(check, timeout=timeout, interval=0.05)
    return dict(seen)


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().split()[2] != "Z"
    return False

