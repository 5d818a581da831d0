"""Agent detection, version probing and ``ralph-uv agents``, with real executables on a
temporary PATH (and the real claude/opencode CLIs where the project installed them)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ralph_uv.agents import CustomBackend, get_backend
from ralph_uv.agents.detect import agent_version, detect_agents, find_binary
from ralph_uv.cli import cli
from ralph_uv.config import Config, CustomAgent
from ralph_uv.errors import AgentNotFoundError

CHECKOUT_BIN = Path(__file__).resolve().parents[2] / ".tools" / "node" / "node_modules" / ".bin"


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary PATH (plus the system folders) and a temporary HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(home / ".claude"))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    return folder


def _config(**agents: tuple[str, ...]) -> Config:
    return Config(agents={name: CustomAgent(name, command) for name, command in agents.items()})


def test_path_comes_first_and_version_is_parsed(bin_dir: Path) -> None:
    """An agent on PATH is found there (before any fallback folder) with the version it
    prints."""
    fake = _script(bin_dir, "claude", 'echo "9.8.7 (Claude Code)"')
    infos = {info.name: info for info in detect_agents(Config())}
    assert infos["claude"].installed
    assert infos["claude"].path == fake
    assert infos["claude"].version == "9.8.7"
    assert infos["claude"].install_hint is None
    assert infos["claude"].backend_kind == "claude"


def test_missing_agent_shows_install_hint(bin_dir: Path) -> None:
    """A configured known agent that is nowhere to be found says how to install it."""
    infos = {i.name: i for i in detect_agents(_config(aider=("aider", "--message", "{prompt}")))}
    aider = infos["aider"]
    assert not aider.installed
    assert aider.path is None
    assert aider.version is None
    assert aider.install_hint == "pipx install aider-chat"
    assert aider.backend_kind == "custom"


def test_custom_agent_is_found_but_never_asked_for_a_version(bin_dir: Path) -> None:
    """An unknown custom command is listed as installed when it resolves, and is not run:
    it might start working instead of printing a version."""
    marker = bin_dir.parent / "ran"
    _script(bin_dir, "my-agent", f'touch "{marker}"; echo 1.0.0')
    infos = {i.name: i for i in detect_agents(_config(mine=("my-agent", "{prompt}")))}
    assert infos["mine"].installed
    assert infos["mine"].path == bin_dir / "my-agent"
    assert infos["mine"].version is None
    assert not marker.exists()


def test_known_custom_agent_gets_its_version(bin_dir: Path) -> None:
    """A config agent running a known CLI (codex) is asked for its version."""
    _script(bin_dir, "codex", 'echo "codex-cli 0.42.1"')
    infos = {i.name: i for i in detect_agents(_config(codex=("codex", "exec", "{prompt}")))}
    assert infos["codex"].version == "0.42.1"


def test_project_local_tools_and_home_local_bin(bin_dir: Path, tmp_path: Path) -> None:
    """Off PATH, a program is found in the current repository's .tools/node/node_modules/.bin,
    then in ~/.local/bin."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    local = _script(repo / ".tools" / "node" / "node_modules" / ".bin", "agent-x", "echo 1")
    nested = repo / "src" / "deep"
    nested.mkdir(parents=True)
    assert find_binary("agent-x", cwd=nested) == local
    assert find_binary("agent-x", cwd=tmp_path) is None
    home_bin = _script(Path.home() / ".local" / "bin", "agent-y", "echo 1")
    assert find_binary("agent-y", cwd=tmp_path) == home_bin
    assert find_binary("definitely-not-an-agent-zz") is None


def test_explicit_paths(bin_dir: Path, tmp_path: Path) -> None:
    """A name with a slash is taken as a path (relative to cwd) and must be executable."""
    script = _script(tmp_path / "tools", "run.sh", "echo 1")
    assert find_binary("./tools/run.sh", cwd=tmp_path) == script
    script.chmod(0o644)
    assert find_binary(str(script)) is None


def test_version_probe_times_out_and_is_cached(bin_dir: Path, tmp_path: Path) -> None:
    """A program that hangs on --version yields no version within the timeout; answers are
    asked once per program per process."""
    hang = _script(bin_dir, "hangs", "sleep 30")
    started = time.monotonic()
    assert agent_version(hang, timeout=0.5) is None
    assert time.monotonic() - started < 5.0

    counter = tmp_path / "count"
    counting = _script(bin_dir, "counting", f'echo x >> "{counter}"; echo "v2.3.4-beta.1"')
    assert agent_version(counting) == "2.3.4-beta.1"
    assert agent_version(counting) == "2.3.4-beta.1"
    assert counter.read_text().count("x") == 1


def test_failing_version_probe_gives_no_version(bin_dir: Path) -> None:
    """A program that fails on --version has an unknown version, not its error text."""
    broken = _script(bin_dir, "broken", 'echo "unknown option --version" >&2; exit 2')
    assert agent_version(broken) is None


def test_agents_json_command(bin_dir: Path, ralph_home: Path) -> None:
    """``ralph-uv agents --json`` lists built-in and configured agents for scripts, exit 0."""
    _script(bin_dir, "claude", 'echo "2.0.0 (Claude Code)"')
    _script(bin_dir, "opencode", "echo 1.2.3")
    config = ralph_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[agents.gemini]\ncommand = ["gemini", "-p", "{prompt}"]\n')
    result = CliRunner().invoke(cli, ["agents", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert list(rows) == ["claude", "opencode", "gemini"]
    assert rows["claude"] == {
        "name": "claude", "installed": True, "path": str(bin_dir / "claude"),
        "version": "2.0.0", "install_hint": None, "backend_kind": "claude",
    }
    assert rows["opencode"]["version"] == "1.2.3"
    assert rows["gemini"]["installed"] is False
    assert rows["gemini"]["install_hint"] == "npm install -g @google/gemini-cli"


def test_agents_table_shows_install_command(bin_dir: Path, ralph_home: Path) -> None:
    """The table marks missing agents and prints how to install them."""
    _script(bin_dir, "claude", 'echo "2.0.0 (Claude Code)"')
    config = ralph_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[agents.codex]\ncommand = ["codex", "exec", "{prompt}"]\n')
    result = CliRunner().invoke(cli, ["agents"])
    assert result.exit_code == 0, result.output
    assert "✓" in result.output
    assert "✗" in result.output
    assert "codex is not installed: npm install -g @openai/codex" in result.output


@pytest.mark.skipif(not (CHECKOUT_BIN / "claude").exists(), reason="run `make agents` first")
def test_real_clis_found_in_the_source_checkout(bin_dir: Path) -> None:
    """With nothing on PATH, the real claude and opencode installed by ``make agents`` are
    found in the source checkout's .tools folder and report real versions."""
    infos = {info.name: info for info in detect_agents(Config())}
    for name in ("claude", "opencode"):
        assert infos[name].path == CHECKOUT_BIN / name
        assert infos[name].version is not None
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", infos[name].version or "")


def test_get_backend_names() -> None:
    """Built-in names give their backends, config agents give custom ones (replacing a
    built-in of the same name), and an unknown name lists the valid ones."""
    config = _config(codex=("codex", "exec", "{prompt}"), claude=("my-claude", "{prompt}"))
    assert isinstance(get_backend("codex", config), CustomBackend)
    assert isinstance(get_backend("claude", config), CustomBackend)
    assert get_backend("claude-print", config).name == "claude-print"
    assert get_backend("opencode", config).name == "opencode"
    assert get_backend("claude", Config()).name == "claude"
    assert not isinstance(get_backend("claude", Config()), CustomBackend)
    with pytest.raises(AgentNotFoundError, match="claude, claude-print, opencode, codex"):
        get_backend("nope", config)
