"""The custom agent backend running real tiny children in a real PTY."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import async_wait_until

from ralph_uv.agents.base import FailureKind, IterationRequest
from ralph_uv.agents.custom import PROMPT_FILE_NAME, CustomBackend, CustomSession
from ralph_uv.config import CustomAgent
from ralph_uv.errors import AgentNotFoundError, UserError


class Output:
    """Collects what the agent writes, as the journal would."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _backend(code: str, *extra: str, env: dict[str, str] | None = None) -> CustomBackend:
    return CustomBackend(
        CustomAgent("scripted", (sys.executable, "-c", code, *extra), env or {})
    )


def _request(tmp_path: Path, prompt: str = "do story US-001", **env: str) -> IterationRequest:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return IterationRequest(
        prompt=prompt, cwd=work, loop_dir=tmp_path / "loop", iteration=1, env=env, cols=90, rows=30
    )


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_output_exit_code_and_completion(tmp_path: Path) -> None:
    """Output reaches the sink, exit 0 is success, and a final COMPLETE marker is claimed."""
    code = "print('working on it'); print('<promise>COMPLETE</promise>')"
    output = Output()
    session = await _backend(code, "{prompt}").start(_request(tmp_path), output)
    result = await session.wait()
    assert "working on it" in output.text
    assert result.exit_code == 0
    assert result.ok
    assert result.completion_claimed
    assert result.output_bytes == len(b"".join(output.chunks))
    assert session.interactive


async def test_prompt_placeholder_is_replaced_in_one_pass(tmp_path: Path) -> None:
    """{prompt} inside an argument becomes the prompt text; braces in the prompt stay as
    they are."""
    prompt = "fix {prompt_file} handling; keep {braces}"
    code = "import sys; print('ARG=[' + sys.argv[1] + ']')"
    output = Output()
    session = await _backend(code, "--task={prompt}").start(_request(tmp_path, prompt), output)
    await session.wait()
    assert f"ARG=[--task={prompt}]" in output.text
    assert not (tmp_path / "loop" / PROMPT_FILE_NAME).exists()


async def test_prompt_file_placeholder(tmp_path: Path) -> None:
    """{prompt_file} becomes a private file in the loop folder holding the prompt."""
    code = (
        "import os, stat, sys; path = sys.argv[1]\n"
        "print('MODE=' + oct(stat.S_IMODE(os.stat(path).st_mode)))\n"
        "print('TEXT=' + open(path, encoding='utf-8').read())"
    )
    output = Output()
    prompt = "implement story US-002 — naïve café"
    session = await _backend(code, "{prompt_file}").start(_request(tmp_path, prompt), output)
    result = await session.wait()
    assert result.exit_code == 0
    assert "MODE=0o600" in output.text
    assert f"TEXT={prompt}" in output.text
    path = tmp_path / "loop" / PROMPT_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_command_without_placeholder_is_refused() -> None:
    """A command that has no way to receive the prompt is a configuration error."""
    with pytest.raises(UserError, match=r"\{prompt\}"):
        CustomBackend(CustomAgent("bad", ("codex", "exec")))


async def test_missing_program_names_the_install_command(tmp_path: Path) -> None:
    """A known agent that is not installed is reported with how to install it."""
    backend = CustomBackend(CustomAgent("codex", ("codex-not-installed-x", "{prompt}")))
    with pytest.raises(AgentNotFoundError, match="codex-not-installed-x"):
        await backend.start(_request(tmp_path), Output())


async def test_environment_layers(tmp_path: Path) -> None:
    """The child sees the agent's env from config, overridden by the request's env."""
    code = "import os; print('A=' + os.environ['RALPH_T_A'] + ' B=' + os.environ['RALPH_T_B'])"
    backend = _backend(code, "{prompt}", env={"RALPH_T_A": "config", "RALPH_T_B": "config"})
    output = Output()
    session = await backend.start(_request(tmp_path, RALPH_T_B="request"), output)
    await session.wait()
    assert "A=config B=request" in output.text


async def test_nonzero_exit_is_classified(tmp_path: Path) -> None:
    """A crash and a usage-limit exit are told apart from the output tail."""
    crash = await _backend("import sys; print('boom'); sys.exit(3)", "{prompt}").start(
        _request(tmp_path), Output()
    )
    result = await crash.wait()
    assert (result.exit_code, result.failure) == (3, FailureKind.CRASH)
    assert "status 3" in result.detail

    code = "import sys; print(\"You've hit your limit · resets in 20m\"); sys.exit(1)"
    limited = await _backend(code, "{prompt}").start(_request(tmp_path), Output())
    result = await limited.wait()
    assert result.failure == FailureKind.RATE_LIMIT
    assert result.retry_after == pytest.approx(1200.0)


async def test_keystrokes_and_resize_reach_the_child(tmp_path: Path) -> None:
    """Keystrokes written to the session arrive on the child's terminal, and a resize
    changes the size the child sees."""
    code = (
        "import os; print('READY', flush=True); line = input()\n"
        "size = os.get_terminal_size(0); print(f'GOT={line} SIZE={size.columns}x{size.lines}')"
    )
    output = Output()
    session = await _backend(code, "{prompt}").start(_request(tmp_path), output)
    await async_wait_until(lambda: "READY" in output.text)
    session.resize(100, 33)
    await session.write(b"hello\r")
    result = await session.wait()
    assert result.exit_code == 0
    assert "GOT=hello SIZE=100x33" in output.text


async def test_terminate_kills_a_child_that_ignores_sigterm(
    tmp_path: Path, reap: list[int]
) -> None:
    """terminate() sends SIGTERM, then SIGKILL once the grace period is over."""
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('READY', flush=True)\nwhile True: time.sleep(0.1)"
    )
    output = Output()
    session = await _backend(code, "{prompt}").start(_request(tmp_path), output)
    assert isinstance(session, CustomSession)
    reap.append(session.pid)
    await async_wait_until(lambda: "READY" in output.text)
    started = time.monotonic()
    await session.terminate(grace=0.5)
    elapsed = time.monotonic() - started
    result = await session.wait()
    assert result.exit_code == -signal.SIGKILL
    assert 0.4 <= elapsed < 5.0
    assert result.failure == FailureKind.CRASH


async def test_grandchild_holding_the_pty_does_not_hang_wait(
    tmp_path: Path, reap: list[int]
) -> None:
    """When the command exits but a process it started (immune to the terminal's hangup)
    keeps the terminal open, wait() still returns shortly after the command's exit."""
    code = (
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: the hangup will not stop it\n"
        "hold = 'import time; print(\"HOLDING\", flush=True); time.sleep(60)'\n"
        "child = subprocess.Popen([sys.executable, '-c', hold])\n"
        "print(f'GRANDCHILD={child.pid}', flush=True)"
    )
    output = Output()
    session = await _backend(code, "{prompt}").start(_request(tmp_path), output)
    await async_wait_until(lambda: "GRANDCHILD=" in output.text and "HOLDING" in output.text)
    reap.append(int(output.text.split("GRANDCHILD=")[1].split()[0]))
    started = time.monotonic()
    result = await session.wait()
    assert result.exit_code == 0
    assert time.monotonic() - started < 10.0
    os.kill(reap[-1], 0)  # the grandchild really was still holding the terminal
