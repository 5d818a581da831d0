"""Agent backends: Claude Code, OpenCode and custom commands (DESIGN §7).

:func:`get_backend` turns an agent name into a backend: the built-in ``claude`` (interactive, in
a PTY), ``claude-print`` (headless ``--print`` mode), ``opencode`` (``opencode serve`` over HTTP),
or any ``[agents.NAME]`` command from config. A config entry with a built-in name replaces the
built-in agent, so a person can wrap an agent in their own command.
"""

from __future__ import annotations

from ralph_uv.agents.base import (
    AgentBackend,
    AgentResult,
    AgentSession,
    FailureKind,
    IterationRequest,
    OutputSink,
    Usage,
)
from ralph_uv.agents.custom import CustomBackend
from ralph_uv.agents.detect import AgentInfo, detect_agents, find_binary
from ralph_uv.agents.failures import Classification, backoff_delay, classify, strip_ansi
from ralph_uv.config import Config
from ralph_uv.errors import AgentNotFoundError

__all__ = [
    "BUILT_IN_AGENTS",
    "AgentBackend",
    "AgentInfo",
    "AgentResult",
    "AgentSession",
    "Classification",
    "CustomBackend",
    "FailureKind",
    "IterationRequest",
    "OutputSink",
    "Usage",
    "agent_names",
    "backoff_delay",
    "classify",
    "detect_agents",
    "find_binary",
    "get_backend",
    "strip_ansi",
]

BUILT_IN_AGENTS: tuple[str, ...] = ("claude", "claude-print", "opencode")


def agent_names(config: Config) -> list[str]:
    """Every agent name :func:`get_backend` accepts with this config."""
    return [*BUILT_IN_AGENTS, *(name for name in config.agents if name not in BUILT_IN_AGENTS)]


def get_backend(name: str, config: Config) -> AgentBackend:
    """A new backend for the agent called ``name``; :class:`AgentNotFoundError` for an unknown
    name."""
    custom = config.agents.get(name)
    if custom is not None:
        return CustomBackend(custom)
    # Imported here: each built-in backend pulls in its own dependencies (aiohttp, ...).
    if name == "claude":
        from ralph_uv.agents.claude import ClaudeInteractiveBackend

        return ClaudeInteractiveBackend()
    if name == "claude-print":
        from ralph_uv.agents.claude import ClaudePrintBackend

        return ClaudePrintBackend()
    if name == "opencode":
        from ralph_uv.agents.opencode import OpenCodeBackend

        return OpenCodeBackend(config)
    raise AgentNotFoundError(
        f"unknown agent {name!r}; use one of {', '.join(agent_names(config))}, "
        f'or define it in config.toml: [agents.{name}] command = ["program", "{{prompt}}"]'
    )
