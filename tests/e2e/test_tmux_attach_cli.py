"""``ralph-uv attach --tmux`` as a person uses it, in a real terminal (a pane of an outer tmux
server of the test's own): locally on a loop run with backend tmux through the real ralphd,
and the ssh command line it builds for a remote, run against a real sshd, directly and through
``ralph-uv dial`` as ProxyCommand."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_home_fixture,
    sshd_fixture,
)
from tests.helpers import wait_until
from tests.integration.daemon_harness import Ralphd, kill_runners, make_task

from ralph_uv.client.tmux_attach import local_ralph_argv, tmux_attach_argv
from ralph_uv.config import paths
from ralph_uv.registry import Registry
from ralph_uv.runner.tmux_target import TMUX_SOCKET_ENV, TmuxTarget

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FIXTURES = Path(__file__).parent.parent / "fixtures"
ECHO = [sys.executable, str(FIXTURES / "echo_agent.py"), "{prompt_file}"]


class Tmux:
    """A tmux server on a socket of its own (the person's terminal, or the agents' one)."""

    def __init__(self, socket: str | None = None) -> None:
        self.socket = socket or f"ralph-outer-{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=check).stdout

    def open(self, name: str, argv: list[str], env: dict[str, str]) -> str:
        """A detached 100x30 session running ``argv``, then reporting its exit status."""
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
        line = f"env {exports} {shlex.join(argv)}; echo ATTACH-EXIT=$?; sleep 600"
        self("new-session", "-d", "-s", name, "-x", "100", "-y", "30", line)
        return name

    def text(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", f"={target}:")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=30, check=False)


@pytest.fixture
def outer() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    server.kill()


@pytest.fixture
def agents_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tmux]:
    server = Tmux(f"ralph-test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv(TMUX_SOCKET_ENV, server.socket)
    yield server
    server.kill()


def test_attach_tmux_shows_the_agents_pane_and_types_into_it(
    outer: Tmux, agents_socket: Tmux, tmp_path: Path
) -> None:
    """A loop started with `ralph-uv run demo --detach --backend tmux`; `ralph-uv attach --tmux
    demo` run in a terminal becomes tmux attached to the loop's session ralph-demo: the agent's
    screen shows, and what the person types reaches the agent, which finishes the story; the
    loop completes and the tmux client leaves."""
    task = make_task(tmp_path, "demo", stories=1)
    paths().config.mkdir(parents=True, exist_ok=True)
    paths().config_file.write_text(
        f"pause = 0\nterminate_grace = 1.0\n\n[agents.echo]\ncommand = {json.dumps(ECHO)}\n")
    daemon = Ralphd().start()
    try:
        started = subprocess.run(
            [*local_ralph_argv(), "run", "demo", "--detach", "--agent", "echo", "--backend",
             "tmux"], cwd=task.parent.parent, capture_output=True, text=True, timeout=90,
            check=False)
        assert started.returncode == 0, started.stderr
        with Registry.open() as registry:
            (record,) = registry.find(task_name="demo")

        def pane_ready() -> bool:
            return "echo agent ready: US-001" in agents_socket(
                "capture-pane", "-p", "-t", "=ralph-demo:", check=False)

        wait_until(pane_ready, timeout=30)
        env = {"RALPH_HOME": os.environ["RALPH_HOME"], TMUX_SOCKET_ENV: agents_socket.socket}
        pane = outer.open("person", [*local_ralph_argv(), "attach", "--tmux", "demo"], env)
        wait_until(lambda: "echo agent ready: US-001" in outer.text(pane), timeout=30)
        assert agents_socket("list-clients", "-F", "#{session_name}").split() == ["ralph-demo"]
        outer("send-keys", "-t", f"={pane}:", "-l", "pass")
        outer("send-keys", "-t", f"={pane}:", "Enter")

        def completed() -> bool:
            with Registry.open() as registry:
                row = registry.get(record.loop_id)
            return row is not None and row.status.value == "completed"

        wait_until(completed, timeout=30)
        wait_until(lambda: "ATTACH-EXIT=" in outer.text(pane), timeout=30)
        assert "echo: pass" in _journal(record.loop_id)
    finally:
        daemon.stop()
        kill_runners()


def _journal(loop_id: str) -> str:
    folder = paths().loop_dir(loop_id) / "output.journal"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.seg"))).decode(
        errors="replace")


def test_ssh_command_lines_reach_a_remote_tmux_session(
    outer: Tmux, agents_socket: Tmux, sshd: SSHServer
) -> None:
    """The command line built for a remote loop (ssh -t with the remote's key and known_hosts
    running tmux there) attaches a terminal to the session on the sshd's machine and carries
    keystrokes both ways; so does the OpenZiti form, with `ralph-uv dial tcp://HOST:PORT` as
    ProxyCommand standing in for a ziti:// service that fronts sshd."""
    agents_socket("new-session", "-d", "-s", "ralph-demo", "-x", "90", "-y", "20",
                  f"{shlex.quote(sys.executable)} -c \"print('remote agent here'); "
                  "print('got', input())\"; sleep 600")
    target = TmuxTarget(agents_socket.socket, "ralph-demo")
    env = {"HOME": os.environ["HOME"]}

    direct = tmux_attach_argv(target, sshd.url, options=sshd.options())
    assert direct[:2] == ["ssh", "-t"]
    pane = outer.open("direct", direct, env)
    wait_until(lambda: "remote agent here" in outer.text(pane), timeout=30)
    outer("send-keys", "-t", f"={pane}:", "-l", "over ssh")
    outer("send-keys", "-t", f"={pane}:", "Enter")
    wait_until(lambda: "got over ssh" in outer.text(pane), timeout=30)
    logins = sshd.accepted_logins()
    assert logins >= 1

    via = tmux_attach_argv(target, "ziti://ralphd-box", options=sshd.options(),
                           ssh_via=f"tcp://127.0.0.1:{sshd.port}", ssh_user=sshd.user)
    assert any(word.startswith("ProxyCommand=") and " dial tcp://127.0.0.1:" in word
               for word in via)
    proxied = outer.open("proxied", via, env)
    wait_until(lambda: "got over ssh" in outer.text(proxied), timeout=30)
    assert sshd.accepted_logins() == logins + 1
