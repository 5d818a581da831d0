"""``ralph-uv setup ssh``: the diff it shows, the backup, idempotence, dry runs, and the refusal
to change anything without a terminal to ask on (HOME is a temp folder in every test)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ralph_uv.cli import cli
from ralph_uv.cli.setup_ssh import CONFIG_ENV, MARK_BEGIN, render_block, update_text
from ralph_uv.errors import UserError

ORIGINAL = "User me\n\nHost old-box\n    Port 2200\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def config(home: Path) -> Path:
    folder = home / ".ssh"
    folder.mkdir(mode=0o700)
    path = folder / "config"
    path.write_text(ORIGINAL)
    path.chmod(0o644)
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["setup", "ssh", *args])
    return result.exit_code, result.output


def _backups(config: Path) -> list[Path]:
    return sorted(config.parent.glob("config.bak-*"))


def test_dry_run_shows_the_diff_and_changes_nothing(config: Path, home: Path) -> None:
    """--dry-run prints a unified diff adding the block at the top and writes nothing."""
    status, output = _run("build-box", "lan", "--dry-run")
    assert status == 0
    assert f"--- {config}" in output
    assert "+Host build-box lan\n" in output
    assert "+    ControlMaster auto\n" in output
    assert "+    ControlPath ~/.ssh/ralph-uv/cm-%C\n" in output
    assert "+    ControlPersist 10m\n" in output
    assert " Host old-box\n" in output
    assert "dry run" in output
    assert config.read_text() == ORIGINAL
    assert _backups(config) == []
    assert not (home / ".ssh" / "ralph-uv").exists()


def test_yes_applies_with_a_backup(config: Path, home: Path) -> None:
    """--yes writes the block before the old content (kept intact), keeps the file's mode,
    saves the old file as config.bak-<timestamp> and creates the socket folder 0700."""
    status, output = _run("build-box", "--yes")
    assert status == 0, output
    assert config.read_text() == render_block(("build-box",)) + "\n" + ORIGINAL
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    [backup] = _backups(config)
    assert backup.read_text() == ORIGINAL
    assert backup.name.startswith("config.bak-20")
    assert str(backup) in output
    sockets = home / ".ssh" / "ralph-uv"
    assert stat.S_IMODE(sockets.stat().st_mode) == 0o700


def test_running_again_is_idempotent_and_adds_hosts(config: Path) -> None:
    """The same hosts again change nothing (no new backup); new hosts join the one block."""
    assert _run("a", "b", "--yes")[0] == 0
    after_first = config.read_text()
    status, output = _run("b", "a", "--yes")
    assert status == 0
    assert "already shares connections for: a b" in output
    assert config.read_text() == after_first
    assert len(_backups(config)) == 1
    assert _run("c", "a", "--yes")[0] == 0
    text = config.read_text()
    assert text.count(MARK_BEGIN) == 1
    assert "Host a b c\n" in text
    assert text.endswith(ORIGINAL)


def test_block_moved_by_hand_is_replaced_in_place() -> None:
    """A block the user moved further down is updated where it is, not added again."""
    text = "Host x\n    User y\n\n" + render_block(("a",)) + "Host z\n"
    updated = update_text(text, ("b",))
    assert updated == "Host x\n    User y\n\n" + render_block(("a", "b")) + "Host z\n"


def test_refuses_without_a_terminal(config: Path) -> None:
    """Without --yes and with no terminal on stdin, the diff is shown, nothing is written,
    and the error says to use --yes or --dry-run."""
    status, output = _run("build-box")
    assert status == 2
    assert "+Host build-box\n" in output
    assert "no terminal" in output
    assert "--yes" in output
    assert "--dry-run" in output
    assert config.read_text() == ORIGINAL
    assert _backups(config) == []


def test_missing_config_is_created_private(home: Path) -> None:
    """With no ~/.ssh at all, the folder is made 0700 and the config 0600, with no backup."""
    status, _ = _run("build-box", "--yes")
    assert status == 0
    path = home / ".ssh" / "config"
    assert path.read_text() == render_block(("build-box",))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert _backups(path) == []


def test_config_path_from_option_and_environment(home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--config names the file to edit; so does $RALPH_SSH_CONFIG when --config is absent."""
    chosen = tmp_path / "chosen_config"
    assert _run("x", "--yes", "--config", str(chosen))[0] == 0
    assert "Host x\n" in chosen.read_text()
    from_env = tmp_path / "env_config"
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert _run("y", "--yes")[0] == 0
    assert "Host y\n" in from_env.read_text()
    assert not (home / ".ssh" / "config").exists()


def test_bad_input(config: Path) -> None:
    """No hosts, or a host with spaces or a comment sign, is refused with a message."""
    status, output = _run("--yes")
    assert status == 2
    assert "name the hosts" in output
    with pytest.raises(UserError, match="not a host name"):
        update_text("", ("two words",))
    with pytest.raises(UserError, match="not a host name"):
        update_text("", ("host#1",))
    assert update_text("", ("*.lan", "10.0.0.?", "[h]:22")).startswith(MARK_BEGIN)
