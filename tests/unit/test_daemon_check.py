"""``ralphd check`` and daemon.toml: each check's verdict and fix on a real, temporary setup
(RALPH_HOME, real git, a real custom agent), the command's output and exit status."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ralph_uv.cli.daemon import ralphd
from ralph_uv.config import Config, paths
from ralph_uv.daemon.check import Check, Level, is_ready, run_checks
from ralph_uv.daemon.config import load_daemon_config
from ralph_uv.errors import UserError


def _config(text: str = "") -> None:
    folder = paths().config
    folder.mkdir(parents=True, exist_ok=True)
    agent = json.dumps([sys.executable, "-c", "print('hi')", "{prompt}"])
    (folder / "config.toml").write_text(f'agent = "py"\n{text}\n[agents.py]\ncommand = {agent}\n')


def _daemon_toml(text: str) -> None:
    paths().config.mkdir(parents=True, exist_ok=True)
    paths().daemon_config_file.write_text(text)


def _by_name(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.name == name)


def test_a_ready_machine_reports_ok_and_exits_0() -> None:
    """With git, a working default agent and valid files every line is ok or warn, the
    command prints one line per check and `ready`, and exits 0."""
    _config()
    checks = run_checks()
    assert is_ready(checks)
    names = [c.name for c in checks]
    for expected in ("python", "git", "data folder", "runtime folder", "config.toml",
                     "daemon.toml", "env file", "listeners", "agent py"):
        assert expected in names
    assert _by_name(checks, "agent py").level == Level.OK
    result = CliRunner().invoke(ralphd, ["check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "ready"
    assert any(line.startswith("ok") and " git " in line for line in lines)


def test_a_broken_daemon_toml_is_a_problem_with_its_file_named() -> None:
    """A daemon.toml with a bad value is a problem naming the file and the setting; the
    command exits 1 and its JSON says not ready."""
    _config()
    _daemon_toml("max_concurrent_loops = -3\n")
    check = _by_name(run_checks(), "daemon.toml")
    assert check.level == Level.PROBLEM
    assert "max_concurrent_loops" in check.detail
    assert str(paths().daemon_config_file) in check.detail
    result = CliRunner().invoke(ralphd, ["check", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ready"] is False
    assert {"name": "daemon.toml", "level": "problem"}.items() <= next(
        c for c in report["checks"] if c["name"] == "daemon.toml"
    ).items()


def test_env_file_wider_than_0600_is_a_warning_and_values_never_shown() -> None:
    """An env file readable by others is a warning whose fix is chmod 600; its values never
    appear in the output; at 0600 it is ok."""
    _config()
    env_file = paths().env_file
    env_file.write_text("ANTHROPIC_API_KEY=sk-very-secret\n")
    env_file.chmod(0o644)
    check = _by_name(run_checks(), "env file")
    assert check.level == Level.WARN
    assert check.fix == f"chmod 600 {env_file}"
    output = CliRunner().invoke(ralphd, ["check"]).output
    assert "sk-very-secret" not in output
    assert "chmod 600" in output
    env_file.chmod(0o600)
    check = _by_name(run_checks(), "env file")
    assert check.level == Level.OK
    assert "1 variable(s)" in check.detail


def test_missing_git_is_a_problem_missing_tmux_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither git nor tmux on PATH, git is a problem (with how to install it) and tmux
    only a warning."""
    _config()
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    checks = run_checks()
    git, tmux = _by_name(checks, "git"), _by_name(checks, "tmux")
    assert git.level == Level.PROBLEM
    assert git.fix is not None
    assert "install git" in git.fix
    assert tmux.level == Level.WARN
    assert not is_ready(checks)


def test_default_agent_not_installed_is_a_problem() -> None:
    """The default agent missing is a problem with the fix; other missing agents are warnings."""
    folder = paths().config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(
        'agent = "ghost"\n[agents.ghost]\ncommand = ["/nonexistent/ghost", "{prompt}"]\n'
    )
    checks = run_checks()
    ghost = _by_name(checks, "agent ghost")
    assert ghost.level == Level.PROBLEM
    assert "default agent" in ghost.detail
    assert ghost.fix is not None
    assert "[agents.ghost]" in ghost.fix
    assert not is_ready(checks)


def test_listeners_are_reported_and_open_ones_need_tls() -> None:
    """A loopback TCP listener is ok, an open one without TLS is a problem (daemon.toml is
    refused), with ?tls=1 it is ok."""
    _config()
    _daemon_toml('listeners = ["tcp://127.0.0.1:7420"]\n')
    assert _by_name(run_checks(), "listener").detail == "tcp://127.0.0.1:7420 (loopback)"
    _daemon_toml('listeners = ["tcp://0.0.0.0:7420"]\n')
    check = _by_name(run_checks(), "daemon.toml")
    assert check.level == Level.PROBLEM
    assert "TLS" in check.detail
    _daemon_toml('listeners = ["tcp://0.0.0.0:7420?tls=1"]\n')
    assert _by_name(run_checks(), "listener").detail == "tcp://0.0.0.0:7420?tls=1 (TLS)"


def test_unusable_folders_and_long_socket_paths_are_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RALPH_HOME that is a file makes every folder a problem; one so deep that the socket
    path exceeds the Unix limit is a problem too."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RALPH_HOME", str(blocker))
    checks = run_checks()
    assert _by_name(checks, "data folder").level == Level.PROBLEM
    deep = tmp_path / ("d" * 100)
    monkeypatch.setenv("RALPH_HOME", str(deep))
    socket_check = _by_name(run_checks(), "socket path")
    assert socket_check.level == Level.PROBLEM
    assert socket_check.fix is not None


def test_daemon_toml_values_and_defaults(tmp_path: Path) -> None:
    """Without daemon.toml the limit comes from config.toml's value; daemon.toml's settings
    are read with their types; "off" disables the time limit; unknown keys and bad values are
    refused with the file named."""
    missing = tmp_path / "none.toml"
    assert load_daemon_config(missing, Config(max_concurrent_loops=7)).max_concurrent_loops == 7
    file = tmp_path / "daemon.toml"
    file.write_text(
        "max_concurrent_loops = 2\nloop_time_limit = 90\nstart_timeout = 5\n"
        '[log]\nlevel = "DEBUG"\nmax_bytes = 1000\nbackups = 0\n'
    )
    settings = load_daemon_config(file)
    assert settings.max_concurrent_loops == 2
    assert settings.loop_time_limit == 90.0
    assert settings.start_timeout == 5.0
    assert (settings.log_level, settings.log_max_bytes, settings.log_backups) == ("debug", 1000, 0)
    file.write_text('loop_time_limit = "off"\n')
    assert load_daemon_config(file).loop_time_limit is None
    for text, words in (
        ("max_loops = 3\n", "unknown setting"),
        ("start_timeout = true\n", "start_timeout"),
        ('[log]\nlevel = "loud"\n', "level"),
        ('listeners = ["http://x:1"]\n', "unknown scheme"),
        ('listeners = ["ziti://svc"]\n', "identity"),
        ("max_concurrent_loops = [\n", "cannot read"),
    ):
        file.write_text(text)
        with pytest.raises(UserError, match=words) as caught:
            load_daemon_config(file)
        assert str(file) in caught.value.message


def test_check_changes_nothing(tmp_path: Path) -> None:
    """Running the checks creates no folder: a fresh RALPH_HOME stays empty."""
    home = Path(os.environ["RALPH_HOME"])
    shutil.rmtree(home)
    home.mkdir()
    run_checks()
    assert list(home.iterdir()) == []
