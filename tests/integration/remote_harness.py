"""A "remote machine" for remote-loop tests: a real sshd on 127.0.0.1 (tests/fixtures/sshd.py)
whose logins run this checkout's ralph-uv in a RALPH_HOME of their own, with a config.toml
defining the test agents and an env file; the client side is the test's own RALPH_HOME and a
temporary HOME whose ~/.ssh/known_hosts trusts the server. Commands run as real ``ralph-uv``
processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from tests.fixtures.sshd import SSHServer
from tests.integration.daemon_harness import AGENTS, git, make_task

from ralph_uv.config import Paths, paths
from ralph_uv.daemon.lifecycle import stop_daemon
from ralph_uv.daemon.supervisor import process_alive
from ralph_uv.registry import Registry, SessionRecord

RALPH = [sys.executable, "-m", "ralph_uv.cli.__main__"]
RALPHD = [sys.executable, "-m", "ralph_uv.daemon"]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
                "GIT_COMMITTER_NAME": "Agent", "GIT_COMMITTER_EMAIL": "agent@example.com"}


def ralph(cwd: Path, *args: str, stdin: str | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``ralph-uv ARGS`` in ``cwd`` (this test's RALPH_HOME and HOME)."""
    return subprocess.run([*RALPH, *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          timeout=timeout, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """``done``'s stdout, after checking that it succeeded (its stderr in the failure)."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def remote_paths(home: Path) -> Paths:
    return paths({"RALPH_HOME": str(home)})


def write_remote_config(home: Path, env: Mapping[str, str] | None = None,
                        daemon_toml: str | None = None) -> None:
    """The remote's config.toml (test agents, no pause), env file and daemon.toml."""
    folder = remote_paths(home).config
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["pause = 0", "terminate_grace = 1.0", ""]
    for name, command in AGENTS.items():
        lines += [f"[agents.{name}]", f"command = {json.dumps(command)}"]
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    values = {**GIT_IDENTITY, **(env or {})}
    (folder / "env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    (folder / "env").chmod(0o600)
    if daemon_toml is not None:
        (folder / "daemon.toml").write_text(daemon_toml)


def trust(server: SSHServer, home: Path) -> None:
    """Put the server's host key into ``home``'s ~/.ssh/known_hosts."""
    folder = home / ".ssh"
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / "known_hosts", "a") as out:
        out.write(server.known_hosts.read_text())


def remote_loops(home: Path) -> list[SessionRecord]:
    """Every loop in the remote's own registry, newest first."""
    file = remote_paths(home).registry
    if not file.exists():
        return []
    with Registry.open(file) as registry:
        return registry.find()


def remote_loop(home: Path, loop_id: str) -> SessionRecord:
    with Registry.open(remote_paths(home).registry) as registry:
        record = registry.get(loop_id)
    assert record is not None, loop_id
    return record


def remote_journal(home: Path, loop_id: str) -> bytes:
    """Every byte of a remote loop's output journal, from its segment files."""
    folder = remote_paths(home).loop_dir(loop_id) / "output.journal"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.seg")))


def local_rows(**filters: str) -> list[SessionRecord]:
    """This machine's registry rows (mirrors of remote loops included)."""
    if not paths().registry.exists():
        return []
    with Registry.open() as registry:
        return [r for r in registry.find()
                if all(getattr(r, key) == value for key, value in filters.items())]


def kill_remote_runners(home: Path) -> None:
    """Kill the runners of the remote's loops that still run."""
    pids = [r.pid for r in remote_loops(home) if r.pid and process_alive(r.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_remote_ralphd(home: Path) -> None:
    subprocess.run([*RALPHD, "stop"], capture_output=True, timeout=60, check=False,
                   env={**os.environ, "RALPH_HOME": str(home)})


def status_rows(cwd: Path, *extra: str) -> list[dict[str, object]]:
    """``ralph-uv status --all --json``'s rows."""
    rows: list[dict[str, object]] = json.loads(ok(ralph(cwd, "status", "--all", "--json",
                                                        *extra)))
    return rows


def task_repo(root: Path, name: str = "demo", stories: int = 2) -> Path:
    """A git repository holding ``tasks/<name>``; its top folder."""
    return make_task(root, name, stories=stories).parent.parent


@contextlib.contextmanager
def cleanup(*homes: Path) -> Iterator[None]:
    """At the end: the remote runners killed, this machine's ralphd stopped."""
    try:
        yield
    finally:
        for home in homes:
            kill_remote_runners(home)
        with contextlib.suppress(Exception):
            stop_daemon()


@pytest.fixture(name="box")
def box_fixture(sshd: SSHServer, ssh_home: Path) -> Iterator[SSHServer]:
    """``sshd`` as the remote ``box`` (trusted, with the test agents), not yet added."""
    trust(sshd, ssh_home)
    write_remote_config(sshd.remote_home)
    with cleanup(sshd.remote_home):
        yield sshd


def add_box(cwd: Path, server: SSHServer, name: str = "box") -> None:
    ok(ralph(cwd, "remote", "add", name, server.url, "--identity", str(server.identity)))


__all__ = [
    "GIT_IDENTITY", "RALPH", "RALPHD", "add_box", "box_fixture", "cleanup", "git",
    "kill_remote_runners", "local_rows", "ok", "ralph", "remote_journal", "remote_loop",
    "remote_loops", "remote_paths", "status_rows", "stop_remote_ralphd", "task_repo", "trust",
    "write_remote_config",
]
