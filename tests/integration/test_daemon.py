"""ralphd as a real process: starting, listing, stopping and relaying to real runners whose
agents are real processes in PTYs (tests/fixtures/long_agent.py), the client helper that starts
ralphd on demand, and the ``ralphd`` commands."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until
from tests.integration.daemon_harness import (
    Ralphd,
    journal_bytes,
    kill_runners,
    make_task,
    write_config,
)

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.config import paths
from ralph_uv.daemon.lifecycle import running_pid, stop_daemon
from ralph_uv.daemon.supervisor import process_alive
from ralph_uv.errors import ErrorCode, RemoteError, TransportError
from ralph_uv.eventlog import Event
from ralph_uv.protocol import Dispatcher
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.rpc import Endpoint

pytestmark = pytest.mark.timeout(120)

StartDaemon = Callable[..., Ralphd]


@pytest.fixture
def start_ralphd() -> Iterator[StartDaemon]:
    """Start ralphd (with optional daemon.toml settings); stopped, and its runners killed,
    at the end."""
    started: list[Ralphd] = []

    def start(**daemon: Any) -> Ralphd:
        write_config(daemon or None)
        started.append(Ralphd().start())
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()
    kill_runners()


async def _client() -> DaemonClient:
    return await connect_daemon(autostart=False, client="test")


async def _loop_endpoint(daemon: DaemonClient, loop: str,
                         on_event: Callable[[dict[str, Any]], None] | None = None) -> Endpoint:
    methods: Dispatcher[None] = Dispatcher()

    async def event(context: None, params: Any) -> None:
        if on_event is not None:
            on_event(params)

    methods.add("event", event, allow_extra=True)
    endpoint = Endpoint(await daemon.connect_loop(loop), methods)
    endpoint.start()
    await endpoint.call("hello", {"protocol": "1.0", "client": "test"})
    return endpoint


async def _status(daemon: DaemonClient, loop_id: str) -> str:
    loops = await daemon.list_loops(all=True)
    return next(r.status.value for r in loops if r.loop_id == loop_id)


async def test_start_list_stop(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """start_loop returns the running loop's record (a live runner pid, in its own session),
    list_loops shows it, stop_loop now ends it: the runner exits, the row says stopped, and a
    loop_finished daemon event is recorded."""
    start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        record = await daemon.start_loop(task, agent="sleep")
        assert record.status.value in ("starting", "running")
        assert record.pid is not None
        assert process_alive(record.pid)
        assert os.getsid(record.pid) == record.pid  # detached: its own session
        assert record.task_name == "demo"
        listed = await daemon.list_loops()
        assert [r.loop_id for r in listed] == [record.loop_id]
        stopped = await daemon.stop_loop(record.loop_id, "now")
        assert stopped.loop_id == record.loop_id
        await async_wait_until(lambda: not process_alive(record.pid or 0), timeout=20)
        assert await _status(daemon, record.loop_id) == "stopped"
        assert await daemon.list_loops() == []
        seen: list[Event] = []
        await daemon.subscribe_events(0, seen.append)
        await async_wait_until(lambda: any(e.type == "loop_finished" for e in seen), timeout=10)
    finished = next(e for e in seen if e.type == "loop_finished")
    assert finished.data["loop_id"] == record.loop_id
    assert finished.data["status"] == "stopped"
    assert [e.type for e in seen][:2] == ["daemon_started", "loop_started"]


async def test_a_loop_that_finishes_before_the_first_ping_is_a_successful_start(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """A loop so quick that its runner has exited before ralphd first reaches its socket is
    reported as started (its record says completed), not as a failed start."""
    start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        record = await daemon.start_loop(task, agent="work", pause=0)
        assert record.loop_id

        def finished() -> bool:
            row = Registry.open().get(record.loop_id)
            return row is not None and row.status.value == "completed"

        await async_wait_until(finished, timeout=20)


async def test_start_loop_checks_input_before_anything_runs(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """A missing folder, a relative path, a broken prd.json (with its problems as data), an
    unknown agent, an agent that is not installed and a bad task name are refused with their
    own error codes, and no loop is recorded or started."""
    start_ralphd()
    task = make_task(tmp_path)
    broken = make_task(tmp_path, name="broken")
    (broken / "prd.json").write_text('{"schemaVersion": "2.5", "userStories": [{"id": 3}]}')
    async with await _client() as daemon:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"task_dir": str(tmp_path / "nope")}, ErrorCode.INVALID_PARAMS, "does not exist"),
            ({"task_dir": "tasks/demo"}, ErrorCode.INVALID_PARAMS, "absolute"),
            ({"task_dir": str(broken)}, ErrorCode.INVALID_PRD, "not a valid prd.json"),
            ({"task_dir": str(task), "agent": "nosuch"}, ErrorCode.AGENT_NOT_FOUND, "unknown"),
            ({"task_dir": str(task), "agent": "missing"}, ErrorCode.AGENT_NOT_FOUND,
             "not installed"),
            ({"task_dir": str(task), "agent": "sleep", "task_name": "../x"},
             ErrorCode.INVALID_NAME, "invalid task name"),
            ({"task_dir": str(task), "agent": "sleep", "max_iterations": 0},
             ErrorCode.INVALID_PARAMS, "max_iterations"),
        ]
        for params, code, words in cases:
            with pytest.raises(RemoteError) as caught:
                await daemon.endpoint.call("start_loop", params)
            assert caught.value.wire_code == code, params
            assert words in caught.value.message, caught.value.message
            if code == ErrorCode.INVALID_PRD:
                problems = caught.value.data["problems"]
                assert problems
                assert all("fix" in p for p in problems)
        assert await daemon.list_loops(all=True) == []
    assert not paths().loops.exists() or not any(paths().loops.iterdir())


async def test_runner_that_dies_at_start_fails_the_request_with_its_log(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """A runner that exits before serving its socket (here: the env file gives it a setting it
    cannot read) makes start_loop fail with the end of runner.log; the loop is recorded as
    failed, not crashed."""
    env_file = paths().env_file
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("RALPH_MAX_ITERATIONS=zero\n")
    env_file.chmod(0o600)
    start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        seen: list[Event] = []
        await daemon.subscribe_events(None, seen.append)
        with pytest.raises(RemoteError) as caught:
            await daemon.start_loop(task, agent="sleep")
        assert "did not start" in caught.value.message
        assert "runner.log" in caught.value.message
        assert "'zero' is not a valid" in caught.value.message
        [record] = await daemon.list_loops(all=True)
        assert record.status.value == "failed"
        assert "exited with status 2 before it started" in (record.reason or "")
        await async_wait_until(lambda: any(e.type == "loop_finished" for e in seen), timeout=5)
    assert [e.type for e in seen] == ["loop_finished"]
    assert seen[0].data["status"] == "failed"


async def test_max_concurrent_loops(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """With max_concurrent_loops = 2 a third loop is refused with -32002; once one has
    finished, it no longer counts and a new loop starts."""
    start_ralphd(max_concurrent_loops=2)
    task = make_task(tmp_path)
    async with await _client() as daemon:
        first = await daemon.start_loop(task, agent="sleep")
        await daemon.start_loop(task, agent="sleep")
        with pytest.raises(RemoteError) as caught:
            await daemon.start_loop(task, agent="sleep")
        assert caught.value.wire_code == ErrorCode.TOO_MANY_LOOPS
        assert "max_concurrent_loops = 2" in caught.value.message
        await daemon.stop_loop(first.loop_id, "now")
        await async_wait_until(
            lambda: _is(daemon, first.loop_id, "stopped"), timeout=20
        )
        third = await daemon.start_loop(task, agent="sleep")
        assert len(await daemon.list_loops()) == 2
        assert third.loop_id in {r.loop_id for r in await daemon.list_loops()}


async def _is(daemon: DaemonClient, loop_id: str, status: str) -> bool:
    return await _status(daemon, loop_id) == status


async def test_connect_loop_relays_then_serves_the_archive(
    start_ralphd: StartDaemon, tmp_path: Path
) -> None:
    """connect_loop on a running loop reaches its runner (hello, get_status, live output);
    after the runner is gone the same call serves the journal read-only: the same bytes,
    a replay ending with loop_finished, and changes refused with BAD_STATE."""
    start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        record = await daemon.start_loop(task, agent="tick")
        events: list[dict[str, Any]] = []
        live = await _loop_endpoint(daemon, "demo", events.append)  # by task name
        status = await live.call("get_status")
        assert status["loop_id"] == record.loop_id
        assert status["pid"] == record.pid
        await live.call("subscribe", {"since": {"output": 0, "events": 0}})
        await async_wait_until(
            lambda: b"tick 3" in _output(events), timeout=20
        )
        await live.close()
        await daemon.stop_loop(record.loop_id, "now")
        await async_wait_until(lambda: not process_alive(record.pid or 0), timeout=20)

        replay: list[dict[str, Any]] = []
        archive = await _loop_endpoint(daemon, record.loop_id, replay.append)
        hello = await archive.call("hello", {"protocol": "1.0", "client": "test"})
        assert hello["archived"] is True
        status = await archive.call("get_status")
        assert status["status"] == "stopped"
        on_disk = journal_bytes(record.loop_id)
        assert status["output_end"] == len(on_disk)
        chunk = await archive.call("get_output", {"since": 0, "limit": 1 << 20})
        assert base64.b64decode(chunk["data"]) == on_disk
        await archive.call("subscribe", {"since": {"output": 0, "events": 0}})
        await async_wait_until(
            lambda: replay and replay[-1]["type"] == "loop_finished", timeout=10
        )
        assert _output(replay) == on_disk
        with pytest.raises(RemoteError) as caught:
            await archive.call("inject_prompt", {"text": "more"})
        assert caught.value.wire_code == ErrorCode.BAD_STATE
        await archive.close()


def _output(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        base64.b64decode(e["data"]["data"]) for e in events if e["type"] == "output"
    )


async def test_relay_carries_megabytes_exactly(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """3 MB of agent output reach a client through the relay byte for byte, in order, with
    offsets that chain (each chunk's next is the following chunk's seq)."""
    start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        record = await daemon.start_loop(task, agent="flood")
        await async_wait_until(lambda: len(journal_bytes(record.loop_id)) >= 3_000_000,
                               timeout=30)
        events: list[dict[str, Any]] = []
        endpoint = await _loop_endpoint(daemon, record.loop_id, events.append)
        await endpoint.call("subscribe", {"streams": ["output"], "since": {"output": 0}})
        expected = journal_bytes(record.loop_id)
        await async_wait_until(lambda: len(_output(events)) >= len(expected), timeout=30)
        await endpoint.close()
    chunks = [e for e in events if e["type"] == "output"]
    assert _output(events)[: len(expected)] == expected
    for before, after in itertools.pairwise(chunks):
        assert before["data"]["next"] == after["seq"]


async def test_time_limit_checkpoints_a_loop(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """A loop running past daemon.toml's loop_time_limit is checkpointed: its iteration ends
    (here by its own 3 s timeout), the loop ends as checkpointed, and a loop_time_limit daemon
    event says why."""
    start_ralphd(loop_time_limit=1)
    task = make_task(tmp_path)
    async with await _client() as daemon:
        seen: list[Event] = []
        await daemon.subscribe_events(None, seen.append)
        record = await daemon.start_loop(task, agent="tick", iteration_timeout=3)
        await async_wait_until(lambda: _is(daemon, record.loop_id, "checkpointed"), timeout=30)
        assert any(e.type == "loop_time_limit" and e.data["loop_id"] == record.loop_id
                   for e in seen)


def test_env_file_reaches_the_runner_only(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """The env file's variables are in the runner's environment, and nowhere else: not on its
    command line, not in spec.json, not in ralphd's log."""
    secret = "sk-test-0123456789abcdef"
    env_file = paths().env_file
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text(f"TEST_AGENT_KEY={secret}\n")
    env_file.chmod(0o600)
    daemon_process = start_ralphd()
    task = make_task(tmp_path)

    async def start() -> SessionRecord:
        async with await _client() as daemon:
            return await daemon.start_loop(task, agent="sleep")

    record = asyncio.run(start())
    assert record.pid is not None
    environ = Path(f"/proc/{record.pid}/environ").read_bytes().split(b"\0")
    assert f"TEST_AGENT_KEY={secret}".encode() in environ
    assert secret.encode() not in Path(f"/proc/{record.pid}/cmdline").read_bytes()
    assert secret not in (paths().loop_dir(record.loop_id) / "spec.json").read_text()
    assert secret not in (paths().state / "daemon" / "ralphd.log").read_text()
    assert secret.encode() not in daemon_process.log.read_bytes()


async def test_get_agents_and_health(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """get_agents lists the configured agents with whether they are installed; get_health
    gives ralphd's pid, counts, load and memory from /proc."""
    daemon_process = start_ralphd()
    task = make_task(tmp_path)
    async with await _client() as daemon:
        agents = {a.name: a for a in await daemon.get_agents()}
        assert agents["tick"].installed
        assert not agents["missing"].installed
        await daemon.start_loop(task, agent="sleep")
        health = await daemon.get_health()
    assert health.pid == daemon_process.pid
    assert health.loops_active == 1
    assert health.loops_total == 1
    assert health.rss is not None
    assert 1_000_000 < health.rss < 500_000_000
    assert health.available is not None
    assert health.available > 0
    assert len(health.load) == 3
    assert health.listeners == (f"unix://{paths().daemon_socket}",)


async def test_connect_daemon_starts_ralphd_once(tmp_path: Path) -> None:
    """With no ralphd running, connect_daemon starts one in the background, says so once with
    its pid, and later connections reach the same daemon without a word; the control socket is
    0600 in a 0700 folder."""
    write_config()
    notices: list[str] = []
    try:
        first = await connect_daemon(client="test", on_notice=notices.append)
        second = await connect_daemon(client="test", on_notice=notices.append)
        pid = running_pid()
        assert pid is not None
        assert notices == [f"started ralphd (pid {pid})"]
        assert first.pid == second.pid == pid
        # Detached: a session of its own, and not its leader (it can never get a terminal).
        assert os.getsid(pid) not in (os.getsid(0), pid)
        socket_path = paths().daemon_socket
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        await first.close()
        await second.close()
    finally:
        await asyncio.to_thread(stop_daemon)
        kill_runners()
    with pytest.raises(TransportError, match="not running"):
        await connect_daemon(autostart=False)


def _ralphd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ralph_uv.daemon", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_ralphd_commands_start_status_stop(tmp_path: Path) -> None:
    """`ralphd start` detaches and reports the pid; a second start is refused with a clear
    message; `status --json` reports it; `stop` ends ralphd but not its loops."""
    write_config()
    try:
        started = _ralphd("start")
        assert started.returncode == 0, started.stderr
        pid = running_pid()
        assert started.stdout.strip() == f"ralphd started (pid {pid})"
        again = _ralphd("start")
        assert again.returncode == 2
        assert f"already running (pid {pid})" in again.stderr
        task = make_task(tmp_path)

        async def start_loop() -> int:
            async with await _client() as daemon:
                return (await daemon.start_loop(task, agent="sleep")).pid or 0

        runner = asyncio.run(start_loop())
        status = _ralphd("status", "--json")
        assert status.returncode == 0
        assert '"running": true' in status.stdout
        assert f'"pid": {pid}' in status.stdout
        stopped = _ralphd("stop")
        assert stopped.returncode == 0
        assert f"(pid {pid})" in stopped.stdout
        assert running_pid() is None
        assert not process_alive(pid)
        assert process_alive(runner)  # loops outlive ralphd
        assert _ralphd("status").returncode == 1
    finally:
        stop_daemon()
        kill_runners()


def test_install_service_writes_the_unit() -> None:
    """install-service writes ralphd.service under the config folder (RALPH_HOME) running this
    Python in the foreground with KillMode=process, and prints how to enable it; --dry-run only
    prints the unit."""
    dry = _ralphd("install-service", "--dry-run")
    unit = paths().config / "systemd" / "user" / "ralphd.service"
    assert dry.returncode == 0
    assert not unit.exists()
    assert f'ExecStart="{sys.executable}" -m ralph_uv.daemon start --foreground' in dry.stdout
    done = _ralphd("install-service")
    assert done.returncode == 0, done.stderr
    text = unit.read_text()
    assert text == dry.stdout
    assert "KillMode=process" in text
    assert "WantedBy=default.target" in text
    assert f"RALPH_HOME={os.environ['RALPH_HOME']}" in text
    assert "systemctl --user enable --now ralphd" in done.stdout
    assert "loginctl enable-linger" in done.stdout


def test_registry_rows_are_local(start_ralphd: StartDaemon, tmp_path: Path) -> None:
    """A loop ralphd starts is recorded as local, over unix, with its socket under the
    runtime folder, so that clients and a restarted ralphd find it."""
    start_ralphd()
    task = make_task(tmp_path)

    async def start() -> str:
        async with await _client() as daemon:
            return (await daemon.start_loop(task, agent="sleep")).loop_id

    loop_id = asyncio.run(start())
    with Registry.open() as registry:
        row = registry.get(loop_id)
    assert row is not None
    assert row.location == "local"
    assert row.transport == "unix"
    assert row.socket_path == str(paths().loop_socket(loop_id))
    assert Path(row.socket_path).exists()
