"""The loop commands as a person runs them: real ``ralph-uv`` processes, the real ralphd they
start on demand, real runners and agents in PTYs (tests/fixtures/echo_agent.py answers what is
typed at its terminal and, as the `auto` agent, does the work of a story and commits it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import wait_until
from tests.integration.daemon_harness import journal_bytes, kill_runners, make_task

from ralph_uv.client.loops import Loops
from ralph_uv.config import paths
from ralph_uv.daemon.lifecycle import running_pid, stop_daemon
from ralph_uv.journal import LoopJournal

pytestmark = pytest.mark.timeout(180)

FIXTURES = Path(__file__).parent.parent / "fixtures"
RALPH = [sys.executable, "-m", "ralph_uv.cli.__main__"]
ECHO = [sys.executable, str(FIXTURES / "echo_agent.py"), "{prompt_file}"]
SCRIPTED = [sys.executable, str(FIXTURES / "scripted_agent.py")]

AGENTS: dict[str, dict[str, Any]] = {
    "echo": {"command": ECHO},
    "auto": {"command": ECHO, "env": {"ECHO_AGENT_AUTOPASS": "0.5"}},
    "fail": {"command": [*SCRIPTED, "fail", "{prompt_file}"]},
}


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    """A git repository with tasks/demo (two stories), config.toml with the test agents; the
    ralphd the commands start and every runner are stopped afterwards."""
    task = make_task(tmp_path, "demo", stories=2)
    folder = paths().config
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["pause = 0", "terminate_grace = 1.0", "max_consecutive_failures = 2", ""]
    for name, spec in AGENTS.items():
        lines += [f"[agents.{name}]", f"command = {_toml_list(spec['command'])}"]
        for key, value in spec.get("env", {}).items():
            lines.append(f"env.{key} = {json.dumps(value)}")
        lines.append("")
    (folder / "config.toml").write_text("\n".join(lines))
    yield task.parent.parent
    with contextlib.suppress(Exception):
        stop_daemon()
    kill_runners()


def ralph(repo: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RALPH, *args],
        cwd=repo,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def loops_json(repo: Path, *extra: str) -> list[dict[str, Any]]:
    done = ralph(repo, "status", "--json", *extra)
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def status_of(repo: Path, loop_id: str) -> str | None:
    for loop in loops_json(repo, "--all"):
        if loop["loop_id"] == loop_id:
            return str(loop["status"])
    return None


def start_detached(repo: Path, agent: str, *extra: str) -> str:
    done = ralph(repo, "run", "demo", "--detach", "--agent", agent, *extra)
    assert done.returncode == 0, done.stderr
    running = [loop for loop in loops_json(repo, "--all") if loop["agent"] == agent]
    return str(running[0]["loop_id"])


def journal_text(loop_id: str) -> str:
    return journal_bytes(loop_id).decode("utf-8", errors="replace")


def test_run_detach_starts_ralphd_once_status_and_stop(repo: Path) -> None:
    """`run --detach` starts ralphd (saying so once), starts the loop and says how to attach;
    `status` lists it with its task, location, status, iteration, story and agent; a second
    command says nothing about ralphd; `stop --now` ends the loop as stopped."""
    done = ralph(repo, "run", "demo", "--detach", "--agent", "echo")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("started ralphd (pid") == 1
    assert "ralph-uv attach demo" in done.stderr
    assert running_pid() is not None

    table = ralph(repo, "status")
    assert table.returncode == 0
    assert "started ralphd" not in table.stderr
    row = next(line for line in table.stdout.splitlines() if "demo-" in line)
    for cell in ("demo", "local", "running", "1/10", "US-001", "echo"):
        assert cell in row
    [loop] = loops_json(repo)
    assert (loop["task_name"], loop["status"], loop["agent"]) == ("demo", "running", "echo")

    stopped = ralph(repo, "stop", "demo", "--now")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopping now" in stopped.stdout
    wait_until(lambda: status_of(repo, loop["loop_id"]) == "stopped", timeout=30)
    assert loops_json(repo) == []
    assert [lp["status"] for lp in loops_json(repo, "--all")] == ["stopped"]


def test_send_types_into_the_agent_and_refuses_when_someone_holds_it(repo: Path) -> None:
    """`send` types a line (and Enter) into the agent's terminal: the agent's echo appears in
    the journal. While another client holds interactive mode, `send` is refused naming it."""
    loop_id = start_detached(repo, "echo")
    wait_until(lambda: "echo agent ready: US-001" in journal_text(loop_id), timeout=30)
    sent = ralph(repo, "send", "demo", "hello there")
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: "echo: hello there" in journal_text(loop_id), timeout=15)

    async def hold_and_send() -> subprocess.CompletedProcess[str]:
        loops = await Loops.connect()
        loops.client = "alice-terminal"
        conn = await loops.open_loop(loop_id)
        try:
            enabled, _ = await conn.set_interactive(True)
            assert enabled
            return await asyncio.to_thread(ralph, repo, "send", "demo", "sneaky")
        finally:
            await conn.close()
            await loops.close()

    refused = asyncio.run(hold_and_send())
    assert refused.returncode == 2
    assert "alice-terminal" in refused.stderr
    assert "sneaky" not in journal_text(loop_id)


def test_inject_reads_stdin_and_checkpoint_ends_after_the_iteration(repo: Path) -> None:
    """`inject TASK TEXT` and `inject TASK -` (stdin) queue prompts for the next iteration;
    `checkpoint` lets the current iteration finish, then the loop is checkpointed."""
    loop_id = start_detached(repo, "echo")
    wait_until(lambda: "echo agent ready" in journal_text(loop_id), timeout=30)
    first = ralph(repo, "inject", "demo", "prefer small commits")
    assert first.returncode == 0, first.stderr
    assert "prompt queued" in first.stdout
    second = ralph(repo, "inject", loop_id, "-", stdin="from stdin\n")
    assert second.returncode == 0, second.stderr
    journal = LoopJournal(paths().loop_dir(loop_id), read_only=True)
    try:
        injected = [e.data for e in journal.read_events(0, 1000) if e.type == "prompt_injected"]
    finally:
        journal.close()
    assert [d["chars"] for d in injected] == [len("prefer small commits"), len("from stdin\n")]

    checkpoint = ralph(repo, "checkpoint", "demo")
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert status_of(repo, loop_id) == "running"  # the iteration goes on until it ends
    assert ralph(repo, "send", "demo", "quit").returncode == 0
    wait_until(lambda: status_of(repo, loop_id) == "checkpointed", timeout=30)


def test_logs_follow_then_after_the_end(repo: Path) -> None:
    """`logs -f` prints the output live and returns when the loop ends, saying how; after the
    runner is gone `logs` still prints the journal, `--raw` byte for byte, `--since` from an
    offset."""
    loop_id = start_detached(repo, "auto")
    followed = ralph(repo, "logs", "demo", "-f")
    assert followed.returncode == 0, followed.stderr
    assert "Implemented US-001" in followed.stdout
    assert "Implemented US-002" in followed.stdout
    assert "loop completed" in followed.stderr
    wait_until(lambda: not paths().loop_socket(loop_id).exists(), timeout=30)

    after = ralph(repo, "logs", loop_id)
    assert after.returncode == 0, after.stderr
    assert "Implemented US-001" in after.stdout
    assert "\x1b" not in after.stdout
    assert "\r" not in after.stdout
    raw = subprocess.run(
        [*RALPH, "logs", "demo", "--raw"], cwd=repo, capture_output=True, timeout=60, check=False
    )
    assert raw.stdout == journal_bytes(loop_id)
    offset = journal_bytes(loop_id).index(b"Implemented US-002")
    since = ralph(repo, "logs", "demo", "--since", str(offset))
    assert since.stdout.startswith("Implemented US-002")


def test_run_without_a_terminal_follows_the_loop_to_its_exit_status(
    repo: Path, tmp_path: Path
) -> None:
    """`run TASK` from a script (no terminal to attach) prints the loop's output and exits
    with the loop's status: 0 completed, 3 exhausted."""
    done = ralph(repo, "run", "demo", "--agent", "auto")
    assert done.returncode == 0, done.stderr
    assert "Implemented US-002" in done.stdout
    assert "loop completed" in done.stderr

    other = make_task(tmp_path, "short", stories=2).parent.parent
    exhausted = ralph(other, "run", "short", "--agent", "auto", "--max-iterations", "1")
    assert exhausted.returncode == 3, exhausted.stderr
    assert "Implemented US-001" in exhausted.stdout
    assert "loop exhausted" in exhausted.stderr


def test_clean_removes_finished_loops_never_running_ones(repo: Path, tmp_path: Path) -> None:
    """`clean` removes completed loops' rows and journals, `clean --all` failed ones too; a
    running loop and its journal are never touched."""
    finished = ralph(make_task(tmp_path, "done").parent.parent, "run", "done", "--agent", "auto")
    assert finished.returncode == 0, finished.stderr
    failed = ralph(make_task(tmp_path, "broken").parent.parent, "run", "broken", "--agent", "fail")
    assert failed.returncode == 1, failed.stderr
    running = start_detached(repo, "echo")
    by_status = {lp["status"]: lp["loop_id"] for lp in loops_json(repo, "--all")}
    assert set(by_status) == {"completed", "failed", "running"}
    assert all(paths().loop_dir(loop_id).is_dir() for loop_id in by_status.values())

    cleaned = ralph(repo, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed {by_status['completed']}" in cleaned.stdout
    assert not paths().loop_dir(by_status["completed"]).exists()
    assert {lp["status"] for lp in loops_json(repo, "--all")} == {"failed", "running"}

    cleaned_all = json.loads(ralph(repo, "clean", "--all", "--json").stdout)
    assert [lp["loop_id"] for lp in cleaned_all] == [by_status["failed"]]
    assert not paths().loop_dir(by_status["failed"]).exists()
    assert [lp["loop_id"] for lp in loops_json(repo, "--all")] == [running]
    assert paths().loop_dir(running).is_dir()


def test_errors_say_what_to_do(repo: Path) -> None:
    """Mistakes end with a message and no traceback: attach with nothing running, attach
    without a terminal, a loop that does not exist, --detach with --foreground."""
    nothing = ralph(repo, "attach")
    assert nothing.returncode == 2
    assert "no loop is running" in nothing.stderr
    loop_id = start_detached(repo, "echo")
    no_tty = ralph(repo, "attach", loop_id)
    assert no_tty.returncode == 2
    assert "logs -f" in no_tty.stderr
    unknown = ralph(repo, "stop", "no-such-task")
    assert unknown.returncode != 0
    assert "no-such-task" in unknown.stderr
    both = ralph(repo, "run", "demo", "--detach", "--foreground")
    assert both.returncode == 2
    for done in (nothing, no_tty, unknown, both):
        assert "Traceback" not in done.stderr


def test_shell_completion(repo: Path) -> None:
    """`completion bash|zsh|fish` prints click's scripts; TASK arguments complete to the
    repository's tasks and to loop ids from the registry."""
    markers = {"bash": "complete -o", "zsh": "compdef", "fish": "complete --no-files --command"}
    for shell, marker in markers.items():
        script = ralph(repo, "completion", shell)
        assert script.returncode == 0
        assert "_RALPH_UV_COMPLETE" in script.stdout
        assert marker in script.stdout
    loop_id = start_detached(repo, "echo")

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword),
               "_RALPH_UV_COMPLETE": "bash_complete"}
        done = subprocess.run(RALPH, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        return [line.split(",", 1)[1] for line in done.stdout.splitlines()]

    assert complete("ralph-uv run d", 2) == ["demo"]
    assert complete("ralph-uv attach ", 2) == ["demo", loop_id]
