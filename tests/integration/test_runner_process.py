"""The runner process itself (``python -m ralph_uv.runner --spec ...``), started detached as
ralphd starts it: exit status, linger, signals, logs, the socket's life, start-up failures,
the env file, and refusal of other users by SO_PEERCRED."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until
from tests.integration.runner_harness import (
    Client,
    StartRunner,
    connect_when_ready,
    process_alive,
    wait_status,
)

from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode
from ralph_uv.registry import Registry

pytestmark = pytest.mark.timeout(120)


async def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, text=True, **kwargs)


async def _agent_pid(client: Client) -> int:
    await client.wait_output(b"agent ready")
    return int(bytes(client.output).split(b"pid=")[1].split()[0])


async def _type(client: Client, text: bytes) -> None:
    await client.call("write_pty", {"data": base64.b64encode(text).decode()})


async def test_a_completed_loop_ends_with_loop_finished_and_exit_0(runners: StartRunner) -> None:
    """A loop whose agent does the work: the subscriber gets loop_finished after the last
    output, the runner exits 0 as soon as the last client leaves (long before its linger),
    removes its socket, and leaves a completed registry row, the journal and a runner.log
    whose lines name the loop."""
    runner = runners("work", linger=60)
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=60)
    finished = client.loop_events("loop_finished")[0]
    assert finished["data"]["status"] == "completed"
    assert client.events[-1] is finished  # nothing after the loop's last event
    assert bytes(client.output) == runner.journal_output()
    assert runner.process.poll() is None  # still lingering for the connected client
    await client.close()
    started = time.monotonic()
    assert await runner.wait_exit(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert not runner.socket_path.exists()
    record = Registry.open().get(runner.loop_id)
    assert record is not None
    assert record.status == "completed"
    assert record.pid == runner.pid
    assert record.socket_path == str(runner.socket_path)
    assert runner.events()[-1]["type"] == "loop_finished"
    log = runner.log()
    assert f"[{runner.loop_id}] loop ended: completed" in log
    assert "runner exits with status 0" in log


async def test_linger_ends_even_with_a_client_connected(runners: StartRunner) -> None:
    """After the loop ends the runner serves for its linger only; a client that stays
    connected is disconnected and the runner exits 0."""
    runner = runners("work", linger=1.0)
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"streams": ["events"], "since": {"events": 0}})
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=60)
    assert await runner.wait_exit(timeout=15) == 0
    await async_wait_until(lambda: client.endpoint.closed, timeout=5)
    assert not runner.socket_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_checkpoints_the_loop(runners: StartRunner, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT lets the running iteration finish and ends the loop as checkpointed;
    the runner then exits 0 and removes its socket."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0, "events": 0}})
    agent = await _agent_pid(client)
    runner.process.send_signal(sig)
    await async_wait_until(lambda: "checkpointing" in runner.log(), timeout=10)
    assert process_alive(agent)
    await client.call("set_interactive_mode", {"enabled": True})
    await _type(client, b"done\r")
    await async_wait_until(lambda: client.loop_events("loop_finished"), timeout=20)
    assert client.loop_events("loop_finished")[0]["data"]["status"] == "checkpointed"
    await client.close()
    assert await runner.wait_exit() == 0
    assert not runner.socket_path.exists()


async def test_a_second_signal_stops_now_and_kills_the_agent(runners: StartRunner) -> None:
    """A second SIGTERM does not wait for the iteration: the agent is terminated, the loop
    ends as stopped, the runner exits 0 and no agent process is left behind."""
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0}})
    agent = await _agent_pid(client)
    runner.process.send_signal(signal.SIGTERM)
    await async_wait_until(lambda: "checkpointing" in runner.log(), timeout=10)
    runner.process.send_signal(signal.SIGTERM)
    assert await runner.wait_exit() == 0
    assert not process_alive(agent)
    assert runner.events()[-1]["data"]["status"] == "stopped"
    assert not runner.socket_path.exists()


async def test_an_unusable_spec_exits_2(tmp_path: Path) -> None:
    """A missing spec file, or one with a setting a loop cannot override, ends the runner at
    once with status 2 and a message that says what is wrong."""
    missing = await _run(
        [sys.executable, "-m", "ralph_uv.runner", "--spec", str(tmp_path / "none.json")],
        capture_output=True, timeout=60,
    )
    assert missing.returncode == 2
    assert "no loop spec at" in missing.stderr
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({
        "loop_id": "x-1", "task_dir": str(tmp_path), "task_name": "x", "agent": "cat",
        "config": {"colour": "red"},
    }))
    wrong = await _run(
        [sys.executable, "-m", "ralph_uv.runner", "--spec", str(bad)],
        capture_output=True, timeout=60,
    )
    assert wrong.returncode == 2
    assert "'colour' is not a setting" in wrong.stderr


async def test_a_task_that_cannot_start_fails_cleanly(task: Path, runners: StartRunner) -> None:
    """A broken prd.json makes the runner end the loop as failed with the reason in the
    registry and as the journal's last event, exit 1 and remove its socket."""
    (task / "prd.json").write_text("{ not json")
    await _run(["git", "-C", str(task), "commit", "-qam", "break"], check=True)
    runner = runners()
    assert await runner.wait_exit() == 1
    assert not runner.socket_path.exists()
    record = Registry.open().get(runner.loop_id)
    assert record is not None
    assert record.status == "failed"
    assert "prd.json" in (record.reason or "")
    last = runner.events()[-1]
    assert last["type"] == "loop_finished"
    assert last["data"]["status"] == "failed"


async def test_a_second_runner_for_the_same_loop_is_refused(
    task: Path, runners: StartRunner
) -> None:
    """Starting a loop id that a live runner already runs fails with status 1 and a message,
    and the first runner keeps serving."""
    first = runners()
    client = await connect_when_ready(first)
    second_spec = first.loop_dir / "spec.json"
    second = await _run(
        [sys.executable, "-m", "ralph_uv.runner", "--spec", str(second_spec)],
        capture_output=True, timeout=60,
    )
    assert second.returncode == 1
    assert "already being written by another runner" in first.log()
    assert (await client.call("get_status"))["pid"] == first.pid
    await client.close()


async def test_env_file_reaches_the_agent_but_no_log(runners: StartRunner) -> None:
    """KEY=value lines of the env file are in the agent's environment and nowhere in the
    runner's log or spec."""
    env_file = paths().env_file
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("# keys\nAGENT_TEST_SECRET=s3cr3t-value-42\n")
    runner = runners()
    client = await connect_when_ready(runner)
    await client.call("subscribe", {"since": {"output": 0}})
    await client.wait_output(b"secret=s3cr3t-value-42")
    await client.call("stop", {"when": "now"})
    await client.close()
    assert await runner.wait_exit() == 0
    assert "s3cr3t" not in runner.log()
    assert "s3cr3t" not in (runner.loop_dir / "spec.json").read_text()


_NOBODY_CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":"1.0","client":"x"}}\\n')
data = b""
while not data.endswith(b"\\n"):
    chunk = sock.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
print("closed" if sock.recv(4096) == b"" else "open")
"""


async def test_another_user_is_refused_by_peer_credentials(
    ralph_home: Path, runners: StartRunner
) -> None:
    """With the folders and the socket opened up so that the file permissions would let
    another user in, a client running as nobody is still refused with -32010 (checked with
    SO_PEERCRED) and disconnected, while the owner is served."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() != 0 or python is None:
        pytest.skip("needs root (to run a client as nobody) and /usr/bin/python3")
    runner = runners()
    owner = await connect_when_ready(runner)
    for folder in (ralph_home, ralph_home / "run", runner.socket_path.parent):
        os.chmod(folder, 0o711)
    os.chmod(runner.socket_path, 0o666)
    result = await _run(
        [python, "-c", _NOBODY_CLIENT, str(runner.socket_path)],
        user=65534, group=65534, capture_output=True, timeout=30, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    reply_line, state = result.stdout.splitlines()
    reply = json.loads(reply_line)
    assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED == -32010
    assert "uid 65534 may not use" in reply["error"]["message"]
    assert state == "closed"
    assert "refused pid" in runner.log()
    assert (await wait_status(owner, lambda s: s["status"] == "running"))["pid"] == runner.pid
    await owner.close()
