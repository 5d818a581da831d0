"""The agent's terminal: what a terminal-based backend needs from wherever its agent runs.

A backend that runs its agent in a terminal (Claude Code's TUI, a custom command) starts it
through a :class:`TerminalSpawner` and then only talks to the :class:`AgentTerminal` it got
back: keystrokes in, size changes, wait for the exit, terminate. Two kinds exist:

- :class:`~ralph_uv.runner.pty.PtyProcess` — a pseudo-terminal owned by the runner (the default);
- :class:`~ralph_uv.runner.tmux.TmuxProcess` — a pane of a tmux session, so a person can also
  reach the agent with ``tmux attach`` (spec field ``backend: "tmux"``).

Backends hold their spawner in ``spawn_terminal`` (:data:`spawn_pty` unless the runner swaps it),
so the choice is made once, by the runner, and the backends stay unaware of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ralph_uv.runner.pty import PtyProcess

__all__ = ["TERMINAL_BACKENDS", "AgentTerminal", "TerminalSpawner", "spawn_pty"]

TERMINAL_BACKENDS = ("pty", "tmux")
"""The values of a loop's ``backend`` setting: where a terminal-based agent runs."""


class AgentTerminal(Protocol):
    """A running agent in a terminal (the contract :class:`PtyProcess` set)."""

    bytes_read: int
    """Output bytes seen so far."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """The exit status once the agent has exited (negative: killed by that signal)."""
        ...

    async def write(self, data: bytes) -> None:
        """Type ``data`` at the agent's terminal; :class:`~ralph_uv.errors.UserError` once it
        is closed."""
        ...

    def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self, drain_timeout: float = 2.0) -> int:
        """Wait for the exit and the output to drain; the exit status."""
        ...

    async def terminate(self, grace: float = 5.0) -> int:
        """TERM to the agent's process group, KILL after ``grace`` seconds; the exit status."""
        ...

    def close(self) -> None: ...


class TerminalSpawner(Protocol):
    """Starts ``argv`` in a new terminal of ``cols`` x ``rows``; raises
    :class:`~ralph_uv.errors.UserError` when the program cannot be started."""

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        cols: int = 120,
        rows: int = 40,
    ) -> AgentTerminal: ...


async def spawn_pty(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_output: Callable[[bytes], None],
    cols: int = 120,
    rows: int = 40,
) -> AgentTerminal:
    """The default spawner: a pseudo-terminal owned by this process."""
    return await PtyProcess.spawn(argv, cwd=cwd, env=env, on_output=on_output, cols=cols,
                                  rows=rows)
