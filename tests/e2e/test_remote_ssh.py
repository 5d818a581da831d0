"""Remote loops over SSH end to end, as a person uses them: a real sshd on this machine stands in
for the remote one (its logins run this checkout's ralph-uv in a RALPH_HOME of their own, where
ralphd and the runners are real processes), and every client command is a real ``ralph-uv``.

- The whole flow with the real ``claude`` CLI (its TUI, against the scripted model server,
  reached through the remote's env file): ``remote add``, ``run --on`` (bundle), ``status``,
  ``attach`` in a tmux pane with keystrokes reaching the agent, ``stop``, ``pull``.
- Network faults while attached (the real attach client, recording what it renders): the SSH
  connection killed, ralphd restarted over there, and, where network namespaces can be made, the
  link of a veth pair taken down and up. The recording must equal the remote journal byte for
  byte: nothing lost, nothing shown twice.
- sshd with ``AllowStreamLocalForwarding no``: everything goes through ``ralph-uv bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_attach_tmux import COLS, ROWS, Tmux, tmux  # noqa: F401 - tmux: a fixture
from tests.fixtures.sshd import (  # noqa: F401 - fixtures, used by name
    SSHServer,
    ssh_home_fixture,
    sshd_fixture,
    sshd_no_streamlocal_fixture,
    start_sshd,
)
from tests.helpers import wait_until
from tests.integration.daemon_harness import make_task
from tests.integration.remote_harness import (  # noqa: F401 - box_fixture: used by name
    RALPH,
    add_box,
    box_fixture,
    cleanup,
    git,
    ok,
    ralph,
    remote_journal,
    remote_loop,
    remote_paths,
    status_rows,
    stop_remote_ralphd,
    task_repo,
    trust,
    write_remote_config,
)

from ralph_uv.agents.detect import find_binary
from ralph_uv.daemon.lifecycle import running_pid
from ralph_uv.demo.demo_model import DemoModel, ModelReply, SlowModel
from ralph_uv.demo.model_server import ThreadedModelServer
from ralph_uv.demo.offline import offline_agent_env
from ralph_uv.demo.run import make_sample_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RECORDER = Path(__file__).parent.parent / "fixtures" / "attach_recorder.py"


def _started(stderr: str) -> str:
    for line in stderr.splitlines():
        if " started on " in line:
            return line.split("loop ", 1)[1].split()[0]
    raise AssertionError(f"no start line in:\n{stderr}")


# --------------------------------------------------------------------------- recording attach


class Recording:
    """``attach_recorder.py``: the real attach client, recording what it renders."""

    def __init__(self, cwd: Path, remote: str, loop: str, out: Path,
                 prefix: tuple[str, ...] = ()) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, str(RECORDER), remote, loop, str(out)],
                cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            )

    def size(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError(f"the recorder ended: {self.log.read_text()[-3000:]}")
        return self.out.stat().st_size if self.out.exists() else 0

    def detach(self) -> dict[str, object]:
        """SIGTERM (the client detaches); its result."""
        self.process.send_signal(signal.SIGTERM)
        stdout, _ = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, self.log.read_text()[-3000:]
        result: dict[str, object] = json.loads(stdout.decode().strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _through_a_fault(cwd: Path, home: Path, loop_id: str, out: Path,
                     fault: Callable[[Recording], None], *, remote: str = "box",
                     prefix: tuple[str, ...] = ()) -> None:
    """Attach (recording), let ``fault`` happen while the loop goes on printing, wait until the
    client has caught up past the fault, detach, and compare the recording with the journal."""
    recording = Recording(cwd, remote, loop_id, out, prefix)
    try:
        wait_until(lambda: recording.size() > 100, timeout=60)
        before = len(remote_journal(home, loop_id))
        fault(recording)
        wait_until(lambda: len(remote_journal(home, loop_id)) > before + 150, timeout=60)
        target = len(remote_journal(home, loop_id))
        wait_until(lambda: recording.size() >= target, timeout=90)
        result = recording.detach()
    finally:
        recording.kill()
    assert result["detached"] is True
    recorded = out.read_bytes()
    journal = remote_journal(home, loop_id)
    assert len(recorded) >= target
    assert hashlib.sha256(recorded).hexdigest() == hashlib.sha256(
        journal[: len(recorded)]).hexdigest(), "lost or repeated bytes"
    assert recorded.startswith(b"long agent (tick) started")
    ticks = [line for line in recorded.split(b"\r\n") if line.startswith(b"tick ")]
    assert [int(t.split()[1]) for t in ticks[:-1]] == list(range(1, len(ticks)))


def _tick_loop(repo: Path, remote: str = "box", prefix: tuple[str, ...] = ()) -> str:
    done = subprocess.run([*prefix, *RALPH, "run", "demo", "--on", remote, "--agent", "tick",
                           "--detach", "--max-iterations", "1"], cwd=repo, capture_output=True,
                          text=True, timeout=120, check=False)
    ok(done)
    return _started(done.stderr)


def test_ssh_connection_killed_mid_attach(box: SSHServer, tmp_path: Path) -> None:
    """Every sshd session is killed while the client is attached to a remote loop that keeps
    printing: the client connects again (a new SSH login) and resumes with no byte lost or
    shown twice."""
    repo = task_repo(tmp_path)
    add_box(repo, box)
    loop_id = _tick_loop(repo)
    logins = box.accepted_logins()

    def kill(recording: Recording) -> None:
        assert box.kill_sessions() > 0

    _through_a_fault(repo, box.remote_home, loop_id, tmp_path / "rec.out", kill)
    assert box.accepted_logins() > logins + 1  # the recorder's own, then its reconnect
    ok(ralph(repo, "stop", "demo", "--now"))


def test_ralphd_restarted_mid_attach(box: SSHServer, tmp_path: Path) -> None:
    """ralphd on the remote is stopped while the client is attached (its runner goes on): the
    client's reconnect starts a new ralphd there and resumes with no byte lost or repeated."""
    repo = task_repo(tmp_path)
    add_box(repo, box)
    loop_id = _tick_loop(repo)
    first = running_pid(remote_paths(box.remote_home))
    assert first is not None

    def restart(recording: Recording) -> None:
        stop_remote_ralphd(box.remote_home)

    _through_a_fault(repo, box.remote_home, loop_id, tmp_path / "rec.out", restart)
    assert running_pid(remote_paths(box.remote_home)) not in (None, first)
    assert remote_loop(box.remote_home, loop_id).status.value == "running"
    ok(ralph(repo, "stop", "demo", "--now"))


def test_bridge_fallback_end_to_end(sshd_no_streamlocal: SSHServer, ssh_home: Path,
                                    tmp_path: Path) -> None:
    """With `AllowStreamLocalForwarding no`, the code travels, the loop starts, attach streams
    its output (exactly), status lists it and pull brings its commit back, all through
    `ralph-uv bridge` over exec channels."""
    server = sshd_no_streamlocal
    trust(server, ssh_home)
    write_remote_config(server.remote_home)
    with cleanup(server.remote_home):
        repo = task_repo(tmp_path)
        add_box(repo, server)
        loop_id = _tick_loop(repo)
        _through_a_fault(repo, server.remote_home, loop_id, tmp_path / "rec.out",
                         lambda recording: None)
        [row] = status_rows(repo, "--timeout", "20")
        assert (row["location"], row["status"]) == ("box", "running")
        ok(ralph(repo, "stop", "demo", "--now"))
        make_task(tmp_path, "more")  # a second task, on its own branch ralph/more
        shutil.copytree(tmp_path / "more-repo" / "tasks" / "more", repo / "tasks" / "more")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "another task")
        work = _started(ok_run(repo, "run", "more", "--on", "box", "--agent", "work",
                               "--detach", "--max-iterations", "1"))
        wait_until(lambda: remote_loop(server.remote_home, work).status.is_terminal,
                   timeout=60)
        assert ok(ralph(repo, "pull", "more")).startswith("pulled ralph/more")
        assert git(repo, "log", "-1", "--format=%s", "ralph/more") == "US-001: implemented"


def ok_run(cwd: Path, *args: str) -> str:
    done = ralph(cwd, *args)
    ok(done)
    return done.stderr


# ------------------------------------------------------------------------ network namespaces


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)


@pytest.fixture
def veth(tmp_path: Path, ssh_home: Path) -> Iterator[tuple[SSHServer, tuple[str, ...], str]]:
    """Two network namespaces joined by a veth pair on a private 10.x /30 that exists only in
    them; sshd listens in one on its 10.x address. Yields the server, the command prefix that
    runs a client in the other namespace, and the client's link name. Skipped where namespaces
    cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = secrets.token_hex(3)
    client_ns, server_ns = f"rc-{tag}", f"rs-{tag}"
    client_if, server_if = f"rvc{tag}", f"rvs{tag}"
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    made = _ip("netns", "add", client_ns)
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be created here: {made.stderr.strip()}")
    root = Path(f"/tmp/sshd-ns-{tag}")
    server: SSHServer | None = None
    try:
        steps = [
            ("netns", "add", server_ns),
            ("link", "add", client_if, "netns", client_ns, "type", "veth", "peer", "name",
             server_if, "netns", server_ns),
            ("-n", client_ns, "addr", "add", f"{net}.1/30", "dev", client_if),
            ("-n", server_ns, "addr", "add", f"{net}.2/30", "dev", server_if),
            ("-n", client_ns, "link", "set", "lo", "up"),
            ("-n", server_ns, "link", "set", "lo", "up"),
            ("-n", client_ns, "link", "set", client_if, "up"),
            ("-n", server_ns, "link", "set", server_if, "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed here: {done.stderr.strip()}")
        local = start_sshd(root)  # keys and config, on loopback first
        local.process.kill()
        local.process.wait(5)
        config = root / "sshd_config"
        config.write_text(config.read_text().replace("ListenAddress 127.0.0.1",
                                                     f"ListenAddress {net}.2"))
        local.log_path.write_text("")
        process = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, "/usr/sbin/sshd", "-D", "-f", str(config),
             "-E", str(local.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = SSHServer(root=root, port=local.port, identity=local.identity,
                           known_hosts=root / "known_hosts_ns",
                           host_public_key=local.host_public_key, remote_home=local.remote_home,
                           log_path=local.log_path, process=process, streamlocal=True,
                           host=f"{net}.2")
        wait_until(lambda: "Server listening" in local.log_path.read_text(), timeout=15)
        key_type, key_data = local.host_public_key.split()[:2]
        server.known_hosts.write_text(f"[{net}.2]:{local.port} {key_type} {key_data}\n")
        trust(server, ssh_home)
        write_remote_config(server.remote_home)
        with cleanup(server.remote_home):
            yield server, ("ip", "netns", "exec", client_ns), client_if
    finally:
        if server is not None:
            server.stop()
        _ip("netns", "delete", client_ns)
        _ip("netns", "delete", server_ns)
        shutil.rmtree(root, ignore_errors=True)


def test_link_down_and_up_mid_attach(veth: tuple[SSHServer, tuple[str, ...], str],
                                     tmp_path: Path) -> None:
    """Client and remote in separate network namespaces, joined by a veth pair: the client's
    link goes down while it is attached (the loop goes on printing over there) and comes back;
    the client resumes with no byte lost or repeated."""
    server, in_client_ns, link = veth
    repo = task_repo(tmp_path)
    ok(ralph(repo, "remote", "add", "box", server.url, "--identity", str(server.identity),
             "--no-check"))
    loop_id = _tick_loop(repo, prefix=in_client_ns)
    down: list[bool] = []

    def flap(recording: Recording) -> None:
        assert _ip("-n", in_client_ns[-1], "link", "set", link, "down").returncode == 0
        down.append(True)
        before = len(remote_journal(server.remote_home, loop_id))
        wait_until(lambda: len(remote_journal(server.remote_home, loop_id)) > before + 100,
                   timeout=30)
        assert recording.size() <= before  # nothing got through while the link was down
        assert _ip("-n", in_client_ns[-1], "link", "set", link, "up").returncode == 0

    _through_a_fault(repo, server.remote_home, loop_id, tmp_path / "rec.out", flap,
                     prefix=in_client_ns)
    assert down
    subprocess.run([*in_client_ns, *RALPH, "stop", "demo", "--now"], cwd=repo,
                   capture_output=True, timeout=120, check=True)


# --------------------------------------------------------------------- the whole flow, claude


class GatedModel(SlowModel):
    """The demo model, holding every reply until :meth:`open` (then ``delay`` seconds
    each): the loop's first iteration stays in progress while the test types into claude.
    Held replies give up waiting after 120 s, so nothing outlives the test."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay, DemoModel())
        self.gate = threading.Event()

    async def reply(self, body: Mapping[str, Any]) -> ModelReply:
        await asyncio.to_thread(self.gate.wait, 120)
        return await super().reply(body)

    def open(self) -> None:
        self.gate.set()


def test_claude_loop_on_a_remote_attach_stop_and_pull(
    box: SSHServer, tmux: Tmux, tmp_path: Path  # noqa: F811
) -> None:
    """The real claude CLI runs the sample task on the remote (its env file points claude at
    the scripted model server); `status` shows the loop with its location; `attach` in a tmux
    pane shows claude's screen from over there; in interactive mode typed text reaches
    claude's input box (it is in the remote journal); `stop` ends the loop after the
    iteration; `pull` brings the agent's commits into the local branch."""
    if find_binary("claude") is None:
        pytest.skip("the claude CLI is not installed (make agents)")
    gated = GatedModel(1.0)
    with ThreadedModelServer(gated) as model, contextlib.ExitStack() as leaving:
        leaving.callback(gated.open)  # held replies go before the server stops
        env = offline_agent_env(tmp_path / "agent", model.base_url, [])
        write_remote_config(box.remote_home, env=env)
        repo = make_sample_repo(tmp_path / "textkit")
        git(repo, "switch", "-q", "-c", "ralph/textkit")
        add_box(repo, box)
        started = ok_run(repo, "run", ".", "--on", "box", "--agent", "claude", "--yolo",
                         "--detach", "--max-iterations", "5")
        loop_id = _started(started)
        [row] = [r for r in status_rows(repo, "--timeout", "20") if r["remote_loop_id"] == loop_id]
        assert (row["location"], row["status"]) == ("box", "running")

        line = " ".join(shlex.quote(part) for part in (*RALPH, "attach", "textkit"))
        shell = (f"env RALPH_HOME={shlex.quote(os.environ['RALPH_HOME'])} "
                 f"HOME={shlex.quote(os.environ['HOME'])} {line}; echo ATTACH-EXIT=$?; "
                 "sleep 600")
        tmux("new-session", "-d", "-s", "remote", "-x", str(COLS), "-y", str(ROWS), "-c",
             str(repo), shell)
        wait_until(lambda: "textkit" in tmux.status_line("remote"), timeout=60)
        wait_until(lambda: "running" in tmux.status_line("remote"), timeout=60)
        # claude's own screen, drawn over there: busy with the loop's prompt (the model holds
        # its reply), past any first-run dialog.
        wait_until(lambda: "esc to interrupt" in tmux.text("remote"), timeout=90)
        tmux.keys("remote", "C-]", "i")
        wait_until(lambda: "interactive mode" in tmux.status_line("remote"), timeout=20)
        words = "typed-from-afar-42"
        tmux.type("remote", words)
        try:
            wait_until(lambda: words.encode() in remote_journal(box.remote_home, loop_id),
                       timeout=60)
        except AssertionError as error:
            raise AssertionError(f"{error}; the pane shows:\n{tmux.text('remote')}") from None
        wait_until(lambda: words in tmux.text("remote"), timeout=30)
        # Take the words back out of claude's input box: the loop ends its turn by typing
        # /exit there.
        tmux.keys("remote", *["BSpace"] * len(words))
        wait_until(lambda: words not in tmux.text("remote"), timeout=30)
        tmux.keys("remote", "C-]", "i")
        wait_until(lambda: "observe" in tmux.status_line("remote"), timeout=20)

        ok(ralph(repo, "stop", "textkit"))
        gated.open()  # the iteration goes on: the loop stops after it
        wait_until(lambda: remote_loop(box.remote_home, loop_id).status.is_terminal,
                   timeout=240)
        wait_until(lambda: "ATTACH-EXIT=" in tmux.text("remote"), timeout=60)
        assert "loop " + loop_id in tmux.text("remote")
        final = remote_loop(box.remote_home, loop_id)
        assert final.status.value in ("stopped", "completed"), final.reason
        assert final.stories_done >= 1
        [row] = [r for r in status_rows(repo, "--timeout", "20") if r["remote_loop_id"] == loop_id]
        assert row["status"] == final.status.value

        pulled = ok(ralph(repo, "pull", "textkit"))
        assert pulled.startswith("pulled ralph/textkit at ")
        subjects = git(repo, "log", "--format=%s", "ralph/textkit").splitlines()
        assert "TEXT-001: Slugify titles" in subjects
        assert (repo / "textkit" / "slug.py").is_file()  # fast-forwarded: checked out, clean
        assert git(repo, "status", "--porcelain") == ""
        assert model.requests



# ------------------------------------------------------------------- the whole flow, opencode


def test_opencode_loop_on_a_remote_attach_through_ssh(
    box: SSHServer, tmux: Tmux, tmp_path: Path  # noqa: F811
) -> None:
    """The real opencode runs the sample task on the remote (held mid-iteration by the model);
    `ralph-uv attach` here runs the real `opencode attach` on a local port relayed over SSH to
    the loop's opencode server over there: its TUI shows the loop's session (the prompt's
    COMPLETE instruction), the server's password is on no command line here, and leaving
    opencode (Ctrl-C) ends the command with status 0; then the loop is stopped."""
    if find_binary("opencode") is None:
        pytest.skip("the opencode CLI is not installed (make agents)")
    gated = GatedModel(0.5)
    with ThreadedModelServer(gated) as model, contextlib.ExitStack() as leaving:
        leaving.callback(gated.open)  # held replies go before the server stops
        env = offline_agent_env(tmp_path / "agent", model.base_url, [])
        write_remote_config(box.remote_home, env=env)
        repo = make_sample_repo(tmp_path / "textkit")
        git(repo, "switch", "-q", "-c", "ralph/textkit")
        add_box(repo, box)
        loop_id = _started(ok_run(repo, "run", ".", "--on", "box", "--agent", "opencode",
                                  "--yolo", "--detach", "--max-iterations", "2"))
        wait_until(lambda: model.requests, timeout=90)  # the first iteration has begun

        line = " ".join(shlex.quote(part) for part in (*RALPH, "attach", "textkit"))
        shell = (f"env RALPH_HOME={shlex.quote(os.environ['RALPH_HOME'])} "
                 f"HOME={shlex.quote(os.environ['HOME'])} TERM=xterm-256color {line}; "
                 "echo ATTACH-EXIT=$?; trap '' INT; sleep 600")
        tmux("new-session", "-d", "-s", "oc", "-x", str(COLS), "-y", str(ROWS), "-c",
             str(repo), shell)
        try:
            wait_until(lambda: "<promise>COMPLETE</promise>" in tmux.text("oc"), timeout=90)
        except AssertionError as error:
            raise AssertionError(f"{error}; the pane shows:\n{tmux.text('oc')}") from None
        info = json.loads((remote_paths(box.remote_home).loop_dir(loop_id) / "http.json")
                          .read_text())
        password = str(info["password"]).encode()
        own = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
        lines = []
        for pid in own:
            with contextlib.suppress(OSError):
                lines.append((pid / "cmdline").read_bytes())
        assert not [c for c in lines if password in c]
        tmux.keys("oc", "C-c")
        try:
            wait_until(lambda: "ATTACH-EXIT=" in tmux.text("oc"), timeout=10)
        except AssertionError:  # the first Ctrl-C only cleared something; the second leaves
            tmux.keys("oc", "C-c")
            wait_until(lambda: "ATTACH-EXIT=" in tmux.text("oc"), timeout=20)
        assert "ATTACH-EXIT=0" in tmux.text("oc")
        ok(ralph(repo, "stop", "textkit", "--now"))
        wait_until(lambda: remote_loop(box.remote_home, loop_id).status.is_terminal,
                   timeout=60)
