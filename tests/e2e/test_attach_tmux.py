"""``ralph-uv attach`` as a person uses it: the real client in a real terminal (a tmux pane on a
tmux server of the test's own), attached through the real ralphd to real runners whose agent
(tests/fixtures/echo_agent.py) answers what is typed at its terminal."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import wait_until
from tests.integration.daemon_harness import kill_runners, make_task

from ralph_uv.config import paths
from ralph_uv.daemon.lifecycle import running_pid, stop_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FIXTURES = Path(__file__).parent.parent / "fixtures"
RALPH = [sys.executable, "-m", "ralph_uv.cli.__main__"]
ECHO = [sys.executable, str(FIXTURES / "echo_agent.py"), "{prompt_file}"]
COLS, ROWS = 100, 24


class Tmux:
    """A tmux server on a socket of its own; killed by the fixture."""

    def __init__(self) -> None:
        self.socket = f"ralph-test-{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return done.stdout

    def open(self, name: str, cwd: Path, *command: str) -> str:
        """A detached session running ``command`` in ``cwd``; it stays after the command."""
        line = " ".join(shlex.quote(part) for part in command)
        shell = f"env RALPH_HOME={shlex.quote(os.environ['RALPH_HOME'])} {line}; " \
                f"echo ATTACH-EXIT=$?; sleep 600"
        self("new-session", "-d", "-s", name, "-x", str(COLS), "-y", str(ROWS), "-c", str(cwd),
             shell)
        return name

    def screen(self, target: str) -> list[str]:
        return self("capture-pane", "-p", "-t", target).splitlines()

    def text(self, target: str) -> str:
        return "\n".join(self.screen(target))

    def status_line(self, target: str) -> str:
        lines = self("capture-pane", "-p", "-t", target).split("\n")
        return lines[ROWS - 1] if len(lines) >= ROWS else ""

    def keys(self, target: str, *keys: str) -> None:
        self("send-keys", "-t", target, *keys)

    def type(self, target: str, text: str) -> None:
        self("send-keys", "-t", target, "-l", text)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30, check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    server.kill()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    task = make_task(tmp_path, "demo", stories=2)
    make_task(tmp_path, "later", stories=1)
    folder = paths().config
    folder.mkdir(parents=True, exist_ok=True)
    command = "[" + ", ".join(json.dumps(part) for part in ECHO) + "]"
    (folder / "config.toml").write_text(
        f"pause = 0\nterminate_grace = 1.0\n\n[agents.echo]\ncommand = {command}\n"
    )
    yield task.parent.parent
    with contextlib.suppress(Exception):
        stop_daemon()
    kill_runners()


def ralph(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RALPH, *args], cwd=cwd, capture_output=True, text=True, timeout=90,
                          check=False)


def loop_status(cwd: Path, task: str) -> str | None:
    done = ralph(cwd, "status", "--all", "--json")
    loops = [lp for lp in json.loads(done.stdout) if lp["task_name"] == task]
    return str(loops[0]["status"]) if loops else None


def test_attach_observe_interact_detach_reattach_and_loop_end(tmux: Tmux, repo: Path) -> None:
    """Attach shows the agent's output and a status bar (task, status, iteration, story,
    agent, mode); typed keys are not sent in observe mode; prefix + i then typing reaches the
    agent and its echo appears; prefix + d detaches while the loop goes on; attaching again
    shows the screen again; when the loop ends the client leaves with its final status and the
    terminal is back to normal."""
    assert ralph(repo, "run", "demo", "--detach", "--agent", "echo").returncode == 0
    pane = tmux.open("first", repo, *RALPH, "attach", "demo")
    wait_until(lambda: "echo agent ready: US-001" in tmux.text(pane), timeout=30)
    wait_until(lambda: "observe" in tmux.status_line(pane), timeout=10)
    status = tmux.status_line(pane)
    for part in ("demo", "running", "iter 1/10", "US-001", "echo", "Ctrl-] ? help"):
        assert part in status
    assert tmux("display", "-p", "-t", pane, "#{alternate_on}").strip() == "1"

    tmux.type(pane, "lost words")
    wait_until(lambda: "observe mode" in tmux.status_line(pane), timeout=10)
    tmux.keys(pane, "C-]", "i")
    wait_until(lambda: "interactive mode" in tmux.status_line(pane), timeout=10)
    tmux.type(pane, "hello tmux")
    tmux.keys(pane, "Enter")
    wait_until(lambda: "echo: hello tmux" in tmux.text(pane), timeout=15)
    assert "lost words" not in tmux.text(pane)

    tmux.keys(pane, "C-]", "d")
    wait_until(lambda: "ATTACH-EXIT=0" in tmux.text(pane), timeout=15)
    assert "detached from demo" in tmux.text(pane)
    assert tmux("display", "-p", "-t", pane, "#{alternate_on}").strip() == "0"
    assert loop_status(repo, "demo") == "running"

    again = tmux.open("second", repo, *RALPH, "attach", "demo")
    wait_until(lambda: "echo: hello tmux" in tmux.text(again), timeout=30)
    wait_until(lambda: "iter 1/10" in tmux.status_line(again), timeout=10)
    tmux.keys(again, "C-]", "i")
    wait_until(lambda: "interactive mode" in tmux.status_line(again), timeout=10)
    tmux.type(again, "pass")
    tmux.keys(again, "Enter")
    wait_until(lambda: "echo agent ready: US-002" in tmux.text(again), timeout=30)
    wait_until(lambda: "iter 2/10" in tmux.status_line(again), timeout=10)
    tmux.type(again, "pass")
    tmux.keys(again, "Enter")
    wait_until(lambda: "ATTACH-EXIT=0" in tmux.text(again), timeout=30)
    assert "completed: every story passes" in tmux.text(again)
    assert tmux("display", "-p", "-t", again, "#{alternate_on}").strip() == "0"
    assert loop_status(repo, "demo") == "completed"


def test_attach_survives_a_ralphd_restart(tmux: Tmux, repo: Path) -> None:
    """When ralphd goes away under an attached client, the client reconnects (starting a new
    ralphd), resumes where it was without showing anything twice, and takes interactive mode
    again: typing goes on reaching the agent."""
    assert ralph(repo, "run", "demo", "--detach", "--agent", "echo").returncode == 0
    pane = tmux.open("survivor", repo, *RALPH, "attach", "demo")
    wait_until(lambda: "echo agent ready: US-001" in tmux.text(pane), timeout=30)
    tmux.keys(pane, "C-]", "i")
    wait_until(lambda: "interactive mode" in tmux.status_line(pane), timeout=10)
    tmux.type(pane, "before restart")
    tmux.keys(pane, "Enter")
    wait_until(lambda: "echo: before restart" in tmux.text(pane), timeout=15)
    first_daemon = running_pid()

    assert stop_daemon() == first_daemon
    wait_until(lambda: running_pid() not in (None, first_daemon), timeout=30)
    wait_until(lambda: "reconnecting" not in tmux.status_line(pane), timeout=30)
    tmux.type(pane, "after restart")
    tmux.keys(pane, "Enter")
    wait_until(lambda: "echo: after restart" in tmux.text(pane), timeout=30)
    text = tmux.text(pane)
    assert text.count("echo: before restart") == 1
    assert text.count("echo agent ready: US-001") == 1
    assert "ATTACH-EXIT" not in text


def test_attach_without_task_picks_the_most_recent_running_loop(
    tmux: Tmux, repo: Path, tmp_path: Path
) -> None:
    """`ralph-uv attach` alone attaches to the loop started last."""
    assert ralph(repo, "run", "demo", "--detach", "--agent", "echo").returncode == 0
    later = tmp_path / "later-repo"
    assert ralph(later, "run", "later", "--detach", "--agent", "echo").returncode == 0
    pane = tmux.open("bare", repo, *RALPH, "attach")
    wait_until(lambda: "later" in tmux.status_line(pane), timeout=30)
    assert "echo agent ready: US-001" in tmux.text(pane)
    tmux.keys(pane, "C-]", "d")
    wait_until(lambda: "ATTACH-EXIT=0" in tmux.text(pane), timeout=15)
    assert "detached from later" in tmux.text(pane)
