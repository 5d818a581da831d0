"""The agent backend interface (DESIGN §7).

A backend starts one iteration of an agent with a prompt in a working directory. While it runs,
every byte it produces goes to ``on_output`` (the loop's journal); PTY backends also accept
keystrokes and window sizes. When it ends, :meth:`AgentSession.wait` gives an
:class:`AgentResult`: exit status, final answer, failure kind and token usage.

A backend object lives as long as the loop (``opencode serve`` is started once per loop and
stopped in :meth:`AgentBackend.aclose`); a session lives for one iteration.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ralph_uv.errors import ErrorCode, RalphError

__all__ = [
    "AgentBackend",
    "AgentResult",
    "AgentSession",
    "FailureKind",
    "IterationRequest",
    "OutputSink",
    "Usage",
]

OutputSink = Callable[[bytes], None]


class FailureKind(StrEnum):
    """Why an iteration failed; decides whether the loop waits, retries or fails over."""

    RATE_LIMIT = "rate_limit"
    AUTH = "auth"
    NETWORK = "network"
    CRASH = "crash"
    EMPTY_OUTPUT = "empty_output"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class IterationRequest:
    """Everything a backend needs to run one iteration."""

    prompt: str
    cwd: Path
    loop_dir: Path  # the loop's state folder: hook files, server logs
    iteration: int
    model: str | None = None
    yolo: bool = False
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables (API keys)
    cols: int = 120
    rows: int = 40


@dataclass(frozen=True, slots=True)
class AgentResult:
    """How one iteration ended."""

    exit_code: int | None
    final_text: str = ""
    failure: FailureKind | None = None
    detail: str = ""
    retry_after: float | None = None  # seconds, when the agent printed a reset time
    usage: Usage | None = None
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def completion_claimed(self) -> bool:
        """``<promise>COMPLETE</promise>`` in the agent's final answer (not in an echo)."""
        return "<promise>COMPLETE</promise>" in self.final_text


class AgentSession(abc.ABC):
    """One running iteration."""

    @abc.abstractmethod
    async def wait(self) -> AgentResult:
        """Wait for the iteration to end and say how it ended."""

    @abc.abstractmethod
    async def terminate(self, grace: float = 5.0) -> None:
        """Stop the iteration now: TERM (or abort), then KILL after ``grace`` seconds."""

    @property
    def interactive(self) -> bool:
        """True when the agent runs in a terminal that accepts keystrokes."""
        return False

    async def write(self, data: bytes) -> None:
        """Send keystrokes to the agent's terminal."""
        raise RalphError(
            "this agent runs without a terminal (it is driven over HTTP); "
            "use inject_prompt to steer it instead",
            code=ErrorCode.NOT_INTERACTIVE,
        )

    def resize(self, cols: int, rows: int) -> None:  # noqa: B027 - optional for non-PTY agents
        """Change the agent's terminal size; agents without a terminal ignore it."""


class AgentBackend(abc.ABC):
    """A kind of agent (claude, opencode, a custom command)."""

    name: str

    @abc.abstractmethod
    async def start(self, request: IterationRequest, on_output: OutputSink) -> AgentSession:
        """Start one iteration; output flows to ``on_output`` until the session ends."""

    async def aclose(self) -> None:  # noqa: B027 - most backends hold nothing between iterations
        """Release what the backend holds between iterations (servers, temp files)."""
