"""Configuration layering and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralph_uv.config import Config, load_config, load_env_file, paths
from ralph_uv.errors import UserError


def test_ralph_home_puts_every_folder_under_it(tmp_path: Path) -> None:
    """RALPH_HOME=<dir> places data, state, config and runtime folders inside <dir>."""
    dirs = paths({"RALPH_HOME": str(tmp_path)})
    for folder in (dirs.data, dirs.state, dirs.config, dirs.runtime):
        assert folder.is_relative_to(tmp_path)
    assert dirs.registry == tmp_path / "data" / "sessions.db"
    assert dirs.loop_socket("abc") == tmp_path / "run" / "loops" / "abc.sock"


def test_without_xdg_runtime_sockets_go_to_a_short_tmp_folder() -> None:
    """With no usable XDG_RUNTIME_DIR the runtime folder is /tmp/ralph-<uid>."""
    dirs = paths({"XDG_RUNTIME_DIR": "/nonexistent/run"})
    assert str(dirs.runtime).startswith("/tmp/ralph-")


def test_layers_defaults_then_toml_then_environment(tmp_path: Path) -> None:
    """config.toml overrides defaults and RALPH_* variables override config.toml."""
    file = tmp_path / "config.toml"
    file.write_text('max_iterations = 7\npause = 0.5\nfailover = ["claude", "opencode"]\n')
    config = load_config(file, {"RALPH_PAUSE": "1.5", "RALPH_YOLO": "yes"})
    assert config.max_iterations == 7
    assert config.pause == 1.5
    assert config.yolo is True
    assert config.failover == ("claude", "opencode")
    assert config.stall_iterations == Config().stall_iterations


def test_flags_override_everything_and_unset_flags_are_ignored() -> None:
    """with_overrides replaces given settings and skips None (a flag not passed)."""
    config = Config(max_iterations=7).with_overrides(max_iterations=3, pause=None)
    assert config.max_iterations == 3
    assert config.pause == Config().pause


def test_custom_agents_are_read_from_toml(tmp_path: Path) -> None:
    """[agents.NAME] tables become custom agents with their command and environment."""
    file = tmp_path / "config.toml"
    file.write_text('[agents.codex]\ncommand = ["codex", "exec", "{prompt}"]\nenv = {A = "1"}\n')
    agent = load_config(file, {}).agents["codex"]
    assert agent.command == ("codex", "exec", "{prompt}")
    assert agent.env == {"A": "1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_iterations = 'many'", "max_iterations = 'many' is not a valid"),
        ("colour = 'blue'", "unknown setting 'colour'"),
        ("[agents.x]\ncommand = 'codex'", r"\[agents.x\] needs command"),
        ("max_iterations = ", "cannot read the configuration"),
    ],
)
def test_bad_config_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    """A broken config.toml is reported with the file and the setting, not a traceback."""
    file = tmp_path / "config.toml"
    file.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(file, {})


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """A RALPH_* variable with a value of the wrong type names the variable."""
    with pytest.raises(UserError, match="RALPH_MAX_ITERATIONS"):
        load_config(tmp_path / "none.toml", {"RALPH_MAX_ITERATIONS": "ten"})


def test_env_file_reads_key_value_lines(tmp_path: Path) -> None:
    """The env file takes KEY=value lines, comments, export prefixes and quotes."""
    file = tmp_path / "env"
    file.write_text("# keys\nexport ANTHROPIC_API_KEY='sk-1'\nOTHER=\"two words\"\n\n")
    assert load_env_file(file) == {"ANTHROPIC_API_KEY": "sk-1", "OTHER": "two words"}


def test_env_file_error_names_the_line_without_the_value(tmp_path: Path) -> None:
    """A malformed env file line is reported by number, without echoing its (secret) text."""
    file = tmp_path / "env"
    file.write_text("GOOD=1\nsk-secret-without-key\n")
    with pytest.raises(UserError) as info:
        load_env_file(file)
    assert ":2:" in info.value.message
    assert "sk-secret" not in info.value.message
