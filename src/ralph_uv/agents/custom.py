"""The custom agent: any command from config, run in a PTY (Codex, Gemini, Aider, a script).

``[agents.NAME] command = [...]`` must carry the prompt in one of its arguments:

- ``{prompt}`` is replaced by the prompt text itself;
- ``{prompt_file}`` is replaced by the path of a file (mode 0600, in the loop's state folder)
  holding the prompt — for prompts too long for a command line or agents that read files.

The PTY's input is the agent's terminal (for a person who attaches), so the prompt cannot be
piped in: a command without either placeholder is refused when the backend is created.

The iteration's result is the command's exit status, classified by
:func:`ralph_uv.agents.failures.classify`; its final answer is the last 4 KiB of output without
escape sequences, so an agent whose last words are ``<promise>COMPLETE</promise>`` claims
completion.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    IterationRequest,
    OutputSink,
)
from ralph_uv.agents.detect import KNOWN_AGENTS, find_binary
from ralph_uv.agents.failures import TAIL_CHARS, classify, strip_ansi
from ralph_uv.config import CustomAgent
from ralph_uv.errors import AgentNotFoundError, UserError
from ralph_uv.runner.terminal import AgentTerminal, TerminalSpawner, spawn_pty

__all__ = ["PROMPT_FILE_NAME", "CustomBackend", "CustomSession"]

log = logging.getLogger("ralph_uv.agents.custom")

PROMPT_FILE_NAME = "agent-prompt.md"
_FINAL_CHARS = 4096
_TAIL_BYTES = 4 * TAIL_CHARS  # raw bytes kept: escape sequences take room before stripping
_PLACEHOLDER = re.compile(r"\{prompt(_file)?\}")


class CustomSession(AgentSession):
    """One iteration of a custom command in a PTY."""

    def __init__(self, process: AgentTerminal, tail: bytearray, name: str) -> None:
        self._process = process
        self._tail = tail
        self._name = name
        self._result: AgentResult | None = None

    @property
    def interactive(self) -> bool:
        return True

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> AgentResult:
        """Wait for the command to exit (and its output to drain) and classify the result."""
        if self._result is None:
            code = await self._process.wait()
            if self._result is None:
                self._result = self._make_result(code)
        return self._result

    def _make_result(self, code: int) -> AgentResult:
        text = self._tail.decode("utf-8", errors="replace")
        verdict = classify(code, text)
        final = strip_ansi(text)[-_FINAL_CHARS:]
        log.info("%s exited with %s (%s)", self._name, code, verdict.kind or "ok")
        return AgentResult(
            exit_code=code,
            final_text=final,
            failure=verdict.kind,
            detail=verdict.detail,
            retry_after=verdict.retry_after,
            output_bytes=self._process.bytes_read,
        )

    async def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM to the command's process group, SIGKILL after ``grace`` seconds."""
        await self._process.terminate(grace)

    async def write(self, data: bytes) -> None:
        await self._process.write(data)

    def resize(self, cols: int, rows: int) -> None:
        self._process.resize(cols, rows)


class CustomBackend(AgentBackend):
    """Runs a :class:`~ralph_uv.config.CustomAgent`'s command once per iteration."""

    def __init__(self, agent: CustomAgent) -> None:
        if not agent.command:
            raise UserError(f"[agents.{agent.name}] has an empty command")
        if not any(_PLACEHOLDER.search(part) for part in agent.command):
            raise UserError(
                f"[agents.{agent.name}].command must pass the prompt with {{prompt}} (the text) "
                "or {prompt_file} (a file holding it), for example "
                'command = ["codex", "exec", "{prompt}"]'
            )
        self.agent = agent
        self.name = agent.name
        # The runner swaps this to run the agent elsewhere (a tmux pane) instead of a PTY.
        self.spawn_terminal: TerminalSpawner = spawn_pty

    def _program(self, cwd: Path) -> str:
        program = self.agent.command[0]
        found = find_binary(program, cwd=cwd)
        if found is None:
            known = KNOWN_AGENTS.get(Path(program).name)
            hint = known.install_hint if known else f"install {program!r}"
            raise AgentNotFoundError(
                f"agent {self.name!r}: {program!r} is not installed or not on PATH; "
                f"{hint}, or fix [agents.{self.name}].command in config.toml"
            )
        return str(found)

    def argv(self, request: IterationRequest) -> list[str]:
        """The command line for ``request``, placeholders replaced (writes the prompt file
        when ``{prompt_file}`` is used)."""
        prompt_file: Path | None = None

        def substitute(match: re.Match[str]) -> str:
            nonlocal prompt_file
            if match.group(1) is None:
                return request.prompt
            if prompt_file is None:
                prompt_file = _write_prompt_file(request.loop_dir, request.prompt)
            return str(prompt_file)

        # One pass, so a prompt that itself contains "{prompt_file}" is left as it is.
        parts = [_PLACEHOLDER.sub(substitute, part) for part in self.agent.command]
        return [self._program(request.cwd), *parts[1:]]

    async def start(self, request: IterationRequest, on_output: OutputSink) -> AgentSession:
        argv = self.argv(request)
        env = {**os.environ, **self.agent.env, **request.env}
        env.setdefault("TERM", "xterm-256color")
        tail = bytearray()

        def collect(data: bytes) -> None:
            tail.extend(data)
            if len(tail) > 2 * _TAIL_BYTES:
                del tail[:-_TAIL_BYTES]
            on_output(data)

        log.info("starting %s in %s (iteration %d)", self.name, request.cwd, request.iteration)
        process = await self.spawn_terminal(
            argv, cwd=request.cwd, env=env, on_output=collect, cols=request.cols, rows=request.rows
        )
        return CustomSession(process, tail, self.name)


def _write_prompt_file(folder: Path, prompt: str) -> Path:
    """Write the prompt to ``folder``/agent-prompt.md, readable by this user only."""
    path = folder / PROMPT_FILE_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # an older file may have had a wider mode
            file.write(prompt.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write the prompt file {path}: {exc.strerror or exc}") from exc
    return path
