"""``ralph-uv setup ssh`` with the real tools: OpenSSH reads the written config as intended
(``ssh -G`` only parses it, no connection), and the command asks on a real terminal."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ralph_uv.cli import cli

ORIGINAL = "User me\n\nHost old-box\n    Port 2200\n"


def _ssh_settings(config: Path, host: str) -> dict[str, str]:
    out = subprocess.run(["ssh", "-G", "-F", str(config), host], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def test_ssh_reads_the_block_and_the_rest_as_before(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After setup, ssh shares connections for the named host only, and the settings that were
    global before (User) still apply to every host."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "config"
    config.write_text(ORIGINAL)
    result = CliRunner().invoke(cli, ["setup", "ssh", "build-box", "--yes", "--config",
                                      str(config)])
    assert result.exit_code == 0, result.output
    named = _ssh_settings(config, "build-box")
    assert named["controlmaster"] == "auto"
    assert "/.ssh/ralph-uv/cm-" in named["controlpath"]
    assert named["controlpersist"] == "600"
    assert named["user"] == "me"
    other = _ssh_settings(config, "old-box")
    assert other["controlmaster"] == "false"
    assert other["port"] == "2200"
    assert other["user"] == "me"


def _run_on_terminal(args: list[str], answer: bytes, env: dict[str, str]) -> tuple[int, str]:
    """Run ralph-uv with stdin/stdout on a new pseudo-terminal; answer its question."""
    leader, follower = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ralph_uv.cli", *args], stdin=follower,
                               stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = b""
    answered = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(leader, answer)
                answered = True
            if process.poll() is not None and not ready:
                break
        return process.wait(10), seen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


@pytest.mark.parametrize(("answer", "applied"), [(b"y\r", True), (b"n\r", False)])
def test_asks_on_a_terminal(tmp_path: Path, answer: bytes, applied: bool) -> None:
    """On a terminal, the command shows the diff, asks, and applies only after yes."""
    config = tmp_path / "config"
    config.write_text(ORIGINAL)
    env = {**os.environ, "HOME": str(tmp_path)}
    status, output = _run_on_terminal(["setup", "ssh", "build-box", "--config", str(config)],
                                      answer, env)
    assert status == 0, output
    assert "+Host build-box" in output
    assert f"Apply this change to {config}?" in output
    assert ("Host build-box" in config.read_text()) is applied
    assert ("nothing changed" in output) is not applied
