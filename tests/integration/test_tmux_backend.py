"""Loops with backend ``tmux``: real runner processes whose agent runs in a pane of a real tmux
server (on a socket of the test's own): output in the journal, keystrokes and sizes from the
loop service, the exit status, respawned panes, a private environment, and the session's end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import async_wait_until
from tests.integration.runner_harness import (
    INTERACTIVE_AGENT,
    RunnerProcess,
    connect_when_ready,
    make_task,
    process_alive,
    wait_status,
)

from ralph_uv.config import paths
from ralph_uv.runner.host import new_loop_id
from ralph_uv.runner.spec import write_spec
from ralph_uv.runner.tmux import FIFO_NAME, LAUNCH_NAME
from ralph_uv.runner.tmux_target import TMUX_SOCKET_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FIXTURES = Path(__file__).parent.parent / "fixtures"
AGENTS = {
    "echo": [sys.executable, str(FIXTURES / "echo_agent.py"), "{prompt_file}"],
    "cat": [sys.executable, str(INTERACTIVE_AGENT), "cat", "{prompt_file}"],
    "exit3": [sys.executable, "-c", "import sys; print('leaving'); sys.exit(3)",
              "{prompt_file}"],
}
SECRET = "tmux-secret-7f3a9c"


@pytest.fixture
def tmux_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"ralph-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(TMUX_SOCKET_ENV, name)
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    lines = ["pause = 0", "terminate_grace = 1.0", "stall_iterations = 50", ""]
    for name, command in AGENTS.items():
        lines += [f"[agents.{name}]", "command = " + json.dumps(command)]
    paths().config_file.parent.mkdir(parents=True, exist_ok=True)
    paths().config_file.write_text("\n".join(lines) + "\n")
    paths().env_file.write_text(f"AGENT_TEST_SECRET={SECRET}\n")
    return make_task(tmp_path, stories=2)


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for runner in started:
        runner.shutdown()


def start_tmux_runner(task: Path, agent: str, started: list[RunnerProcess],
                      max_iterations: int = 5) -> RunnerProcess:
    """A runner as ralphd starts it, with ``backend: "tmux"`` in its spec."""
    loop_id = new_loop_id("demo")
    loop_dir = paths().loop_dir(loop_id)
    loop_dir.mkdir(parents=True, mode=0o700)
    spec = loop_dir / "spec.json"
    write_spec(spec, loop_id=loop_id, task_dir=task, task_name="demo", agent=agent,
               config={"pause": 0, "terminate_grace": 1.0, "max_iterations": max_iterations},
               backend="tmux")
    with open(loop_dir / "runner.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ralph_uv.runner", "--spec", str(spec), "--linger", "0.5"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env=os.environ.copy(),
        )
    runner = RunnerProcess(loop_id, process, paths().loop_socket(loop_id), loop_dir)
    started.append(runner)
    return runner


def tmux(socket: str, *args: str, check: bool = True) -> str:
    done = subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True,
                          timeout=30, check=check)
    return done.stdout


async def test_tmux_loop_journal_keys_resize_respawn_and_end(
    task: Path, tmux_socket: str, runners: list[RunnerProcess]
) -> None:
    """The agent runs in the tmux session ralph-demo (get_status names it, backend "tmux");
    its output reaches the journal and the pane alike; keystrokes sent with write_pty reach
    it; resize sets the window size; the next iteration runs in the same session with its
    output captured exactly once; when the loop completes, the session is gone."""
    runner = start_tmux_runner(task, "echo", runners)
    client = await connect_when_ready(runner)
    try:
        status = await client.call("get_status")
        assert status["backend"] == "tmux"
        assert status["tmux"] == {"socket": tmux_socket, "session": "ralph-demo"}
        await client.call("subscribe", {"since": {"output": 0, "events": 0}})
        await client.wait_output(b"echo agent ready: US-001", timeout=30)
        pane = tmux(tmux_socket, "capture-pane", "-p", "-t", "=ralph-demo:")
        assert "echo agent ready: US-001" in pane

        await client.call("set_interactive_mode", {"enabled": True})
        await client.call("write_pty", {"data": _b64(b"hello; tmux \xc3\xa9\r")})
        await client.wait_output("echo: hello; tmux é".encode())

        await client.call("resize", {"cols": 101, "rows": 31})

        async def resized() -> bool:
            size = tmux(tmux_socket, "display-message", "-p", "-t", "=ralph-demo:",
                        "#{window_width}x#{window_height}")
            return size.strip() == "101x31"

        await async_wait_until(resized, timeout=10)

        await client.call("write_pty", {"data": _b64(b"pass\r")})
        await client.wait_output(b"echo agent ready: US-002", timeout=30)
        assert tmux(tmux_socket, "list-sessions", "-F", "#{session_name}").split() == \
            ["ralph-demo"]
        await client.call("write_pty", {"data": _b64(b"pass\r")})
        await wait_status(client, lambda s: s["status"] == "completed", timeout=30)
    finally:
        await client.close()
    assert await runner.wait_exit() == 0
    journal = runner.journal_output()
    assert journal.count(b"echo agent ready: US-001") == 1
    assert journal.count(b"echo agent ready: US-002") == 1
    assert journal.count("echo: hello; tmux é".encode()) == 1
    finished = [e for e in runner.events() if e["type"] == "iteration_finished"]
    assert [e["data"]["exit_code"] for e in finished] == [0, 0]
    assert "ralph-demo" not in tmux(tmux_socket, "list-sessions", "-F", "#{session_name}",
                                    check=False)
    assert not (runner.loop_dir / FIFO_NAME).exists()


async def test_tmux_agent_gets_its_environment_privately_and_its_exit_status_counts(
    task: Path, tmux_socket: str, runners: list[RunnerProcess]
) -> None:
    """The agent sees the env file's secret, which appears neither in the tmux server's
    environment nor on any tmux or agent command line; the launch file is gone once the
    agent runs; an agent's exit status 3 is the iteration's exit code."""
    runner = start_tmux_runner(task, "cat", runners)
    client = await connect_when_ready(runner)
    try:
        await client.call("subscribe", {"since": {"output": 0, "events": 0}})
        await client.wait_output(f"secret={SECRET}".encode(), timeout=30)
        assert not (runner.loop_dir / LAUNCH_NAME).exists()
        assert SECRET not in tmux(tmux_socket, "show-environment", "-g")
        server = int(tmux(tmux_socket, "display-message", "-p", "#{pid}").strip())
        for pid in [server, *_all_pids()]:
            cmdline = _cmdline(pid)
            assert SECRET.encode() not in cmdline, cmdline
        await client.call("stop", {"when": "now"})
        await wait_status(client, lambda s: s["status"] == "stopped", timeout=30)
    finally:
        await client.close()
    assert await runner.wait_exit() == 0

    failing = start_tmux_runner(task, "exit3", runners, max_iterations=1)
    assert await failing.wait_exit(timeout=60) == 0
    finished = [e for e in failing.events() if e["type"] == "iteration_finished"]
    assert [e["data"]["exit_code"] for e in finished] == [3]
    assert b"leaving" in failing.journal_output()
    assert not process_alive(failing.pid)


async def test_second_loop_of_a_task_gets_a_session_of_its_own(
    task: Path, tmux_socket: str, runners: list[RunnerProcess]
) -> None:
    """While ralph-demo is taken by a live loop, another loop of the same task runs in
    ralph-<its loop id>, and get_status says so."""
    first = start_tmux_runner(task, "cat", runners)
    one = await connect_when_ready(first)
    second = start_tmux_runner(task, "cat", runners)
    two = await connect_when_ready(second)
    try:
        await one.call("subscribe", {"since": {"output": 0, "events": 0}})
        await one.wait_output(b"agent ready", timeout=30)
        await two.call("subscribe", {"since": {"output": 0, "events": 0}})
        await two.wait_output(b"agent ready", timeout=30)
        names = {(await c.call("get_status"))["tmux"]["session"] for c in (one, two)}
        assert names == {"ralph-demo", f"ralph-{second.loop_id}"} or \
            names == {"ralph-demo", f"ralph-{first.loop_id}"}
        sessions = set(tmux(tmux_socket, "list-sessions", "-F", "#{session_name}").split())
        assert sessions == names
    finally:
        await one.close()
        await two.close()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_agent_is_hung_up_when_the_runner_dies(
    task: Path, tmux_socket: str, runners: list[RunnerProcess]
) -> None:
    """As with a PTY, an agent in tmux does not go on unrecorded: when its runner is killed
    outright, the agent gets SIGHUP and its pane ends."""
    runner = start_tmux_runner(task, "cat", runners)
    client = await connect_when_ready(runner)
    try:
        await client.call("subscribe", {"since": {"output": 0, "events": 0}})
        await client.wait_output(b"agent ready pid=", timeout=30)
    finally:
        await client.close()
    found = re.search(rb"agent ready pid=(\d+)", runner.journal_output())
    assert found is not None
    agent = int(found.group(1))
    assert process_alive(agent)
    runner.process.kill()
    await runner.wait_exit()
    await async_wait_until(lambda: not process_alive(agent), timeout=15)

    def pane_dead() -> bool:
        return tmux(tmux_socket, "list-panes", "-s", "-t", "=ralph-demo", "-F",
                    "#{pane_dead}", check=False).strip() in ("1", "")

    await async_wait_until(pane_dead, timeout=15)
