"""Installing an agent CLI with npm when a client asks for it (``start_loop {install_agents}``).

Only the agents whose npm package ralph-uv knows can be installed this way: Claude Code
(``@anthropic-ai/claude-code``) and OpenCode (``opencode-ai``), at the versions ralph-uv is
tested with (``data/agent-packages.txt``, which ``make agents`` installs too). The install runs
``npm install -g <package>`` with a time limit; when it fails, the error carries the end of
npm's output so the person can see why (no network, no permission for the global prefix, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from importlib import resources

from ralph_uv.agents import agent_names, detect_agents
from ralph_uv.agents.detect import AgentInfo
from ralph_uv.config import Config
from ralph_uv.errors import AgentNotFoundError

__all__ = ["INSTALL_TIMEOUT", "NPM_PACKAGES", "ensure_agent", "install_agent", "install_command"]

log = logging.getLogger("ralph_uv.daemon.install")

INSTALL_TIMEOUT = 600.0
_PACKAGE_OF = {
    "claude": "@anthropic-ai/claude-code",
    "claude-print": "@anthropic-ai/claude-code",
    "opencode": "opencode-ai",
}


def _pinned_packages() -> dict[str, str]:
    """Each package name in data/agent-packages.txt with its pinned ``name@version``."""
    text = resources.files("ralph_uv.data").joinpath("agent-packages.txt").read_text("utf-8")
    found: dict[str, str] = {}
    for line in text.splitlines():
        spec = line.strip()
        if spec and not spec.startswith("#"):
            found[spec.rpartition("@")[0]] = spec
    return found


_PINNED = _pinned_packages()
NPM_PACKAGES = {agent: _PINNED.get(package, package) for agent, package in _PACKAGE_OF.items()}
"""The npm package (``name@version``, the version ralph-uv is tested with) of each agent that
can be installed for a client."""
_OUTPUT_TAIL = 2000


def install_command(agent: str, npm: str = "npm") -> list[str]:
    """The command installing ``agent``; :class:`AgentNotFoundError` for one npm cannot install."""
    package = NPM_PACKAGES.get(agent)
    if package is None:
        raise AgentNotFoundError(
            f"agent {agent!r} cannot be installed automatically (only "
            f"{', '.join(sorted(NPM_PACKAGES))} can); install it on this machine yourself"
        )
    return [npm, "install", "-g", "--no-fund", "--no-audit", package]


async def install_agent(agent: str, *, limit: float = INSTALL_TIMEOUT) -> None:
    """Run ``npm install -g`` for ``agent``; :class:`AgentNotFoundError` saying why it failed."""
    command = install_command(agent)
    shown = " ".join(command)
    npm = shutil.which("npm")
    if npm is None:
        raise AgentNotFoundError(
            f"cannot install {agent!r}: npm is not installed on this machine; install Node.js "
            f"and npm, or run `{shown}` there yourself"
        )
    command[0] = npm
    log.info("installing %s: %s", agent, shown)
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        raise AgentNotFoundError(f"cannot run `{shown}`: {exc}") from exc
    try:
        async with asyncio.timeout(limit):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise AgentNotFoundError(
            f"`{shown}` did not finish within {limit:g} s; check this machine's network "
            "and npm registry settings, or install the agent yourself"
        ) from None
    text = output.decode("utf-8", errors="replace").strip()
    if process.returncode != 0:
        raise AgentNotFoundError(
            f"`{shown}` failed (exit status {process.returncode}); install the agent yourself "
            f"or fix npm. npm said:\n{text[-_OUTPUT_TAIL:]}"
        )
    log.info("installed %s", agent)


async def ensure_agent(name: str, config: Config, *, install: bool = False) -> None:
    """Check that agent ``name`` can run here; with ``install``, install a missing claude or
    opencode with npm first. :class:`AgentNotFoundError` says what to do otherwise."""
    known = agent_names(config)
    if name not in known:
        raise AgentNotFoundError(
            f"unknown agent {name!r}; use one of {', '.join(known)}, or define "
            f"[agents.{name}] command = [...] in config.toml"
        )
    infos: list[AgentInfo] = await asyncio.to_thread(detect_agents, config, versions=False)
    program = name.removesuffix("-print") if name not in config.agents else name
    info = next((i for i in infos if i.name == program), None)
    if info is None or info.installed:
        return
    if not install:
        raise AgentNotFoundError(
            f"agent {name!r} is not installed on this machine: {info.install_hint}"
            + ("; or start the loop with install_agents" if program in NPM_PACKAGES else "")
        )
    await install_agent(program if name not in config.agents else name)
    infos = await asyncio.to_thread(detect_agents, config, versions=False)
    if not any(i.name == program and i.installed for i in infos):
        raise AgentNotFoundError(
            f"agent {name!r} was installed with npm but is not on PATH; add npm's global bin "
            "folder (`npm prefix -g`/bin) to PATH for ralphd"
        )
