"""Installing a missing agent with npm (start_loop's install_agents). The suite never installs
anything for real: a stand-in ``npm`` script first on PATH records how it was called and plays
success, failure or a hang."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import pytest

from ralph_uv.config import Config, CustomAgent
from ralph_uv.daemon.install import ensure_agent, install_agent, install_command
from ralph_uv.errors import AgentNotFoundError, ErrorCode


def stand_in_npm(folder: Path, body: str) -> Path:
    """An executable ``npm`` in ``folder`` that appends its arguments to npm-calls.jsonl,
    then runs ``body`` (shell)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "npm-calls.jsonl"
    script = folder / "npm"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$*\" >> '{log}'\n"
        f"{body}\n"
    )
    script.chmod(0o755)
    return log


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def _pinned(package: str) -> str:
    """``package@version`` as data/agent-packages.txt pins it (the list make agents uses)."""
    text = resources.files("ralph_uv.data").joinpath("agent-packages.txt").read_text()
    [spec] = [line for line in text.splitlines() if line.startswith(f"{package}@")]
    assert re.fullmatch(rf"{re.escape(package)}@\d+\.\d+\.\d+", spec)
    return spec


def test_the_install_commands() -> None:
    """claude (and claude-print) and opencode install their npm packages globally, at the
    versions pinned in data/agent-packages.txt; any other agent is refused with
    AGENT_NOT_FOUND saying to install it by hand."""
    assert install_command("claude") == [
        "npm", "install", "-g", "--no-fund", "--no-audit", _pinned("@anthropic-ai/claude-code")]
    assert install_command("claude-print")[-1] == _pinned("@anthropic-ai/claude-code")
    assert install_command("opencode")[-1] == _pinned("opencode-ai")
    with pytest.raises(AgentNotFoundError) as caught:
        install_command("aider")
    assert caught.value.code == ErrorCode.AGENT_NOT_FOUND
    assert "yourself" in caught.value.message


async def test_npm_runs_with_the_package(bin_dir: Path) -> None:
    """install_agent runs the npm found on PATH with `install -g ... opencode-ai`."""
    log = stand_in_npm(bin_dir, "echo 'added 1 package'")
    await install_agent("opencode")
    assert log.read_text().splitlines() == [
        f"install -g --no-fund --no-audit {_pinned('opencode-ai')}"]


async def test_npm_failure_carries_its_output(bin_dir: Path) -> None:
    """A failing npm gives AGENT_NOT_FOUND with its exit status and the end of its output."""
    stand_in_npm(bin_dir, "echo 'npm ERR! code E404' >&2; echo 'npm ERR! 404 Not Found'; exit 3")
    with pytest.raises(AgentNotFoundError) as caught:
        await install_agent("claude")
    message = caught.value.message
    assert "exit status 3" in message
    assert "npm ERR! code E404" in message
    assert "npm ERR! 404 Not Found" in message


async def test_npm_that_hangs_is_stopped(bin_dir: Path) -> None:
    """An npm that does not finish within the limit is killed, with a message about it."""
    stand_in_npm(bin_dir, "exec sleep 30")
    with pytest.raises(AgentNotFoundError, match=r"did not finish within 0\.5 s"):
        await install_agent("claude", limit=0.5)


async def test_no_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without npm on PATH the message says to install Node.js and npm, and the command."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AgentNotFoundError) as caught:
        await install_agent("opencode")
    assert "install Node.js and npm" in caught.value.message
    assert f"npm install -g --no-fund --no-audit {_pinned('opencode-ai')}" in caught.value.message


def _config(binary: str) -> Config:
    # A config entry named "claude" replaces the built-in one: its binary is the one checked.
    return Config(agents={"claude": CustomAgent("claude", (binary, "{prompt}"))})


async def test_ensure_agent_installs_then_finds_the_agent(bin_dir: Path) -> None:
    """A missing agent is refused without install (pointing at install_agents); with install,
    npm runs and the agent it put on PATH is found; an npm that succeeds without putting the
    agent on PATH is reported as such."""
    binary = "claude-stand-in-" + bin_dir.parent.name
    with pytest.raises(AgentNotFoundError, match="install_agents"):
        await ensure_agent("claude", _config(binary))
    stand_in_npm(bin_dir, "true")
    with pytest.raises(AgentNotFoundError, match="not on PATH"):
        await ensure_agent("claude", _config(binary), install=True)
    log = stand_in_npm(
        bin_dir, f"printf '#!/bin/sh\\n' > '{bin_dir / binary}'; chmod +x '{bin_dir / binary}'")
    await ensure_agent("claude", _config(binary), install=True)
    assert (bin_dir / binary).is_file()
    calls = log.read_text().splitlines()
    assert calls == [
        f"install -g --no-fund --no-audit {_pinned('@anthropic-ai/claude-code')}"] * 2
