"""Runners outlive ralphd: ``kill -9`` of ralphd while loops run, a restart that re-adopts
them untouched, and runners that die (while ralphd runs, or while none runs) marked crashed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import async_wait_until, wait_until
from tests.integration.daemon_harness import (
    Ralphd,
    journal_bytes,
    kill_runners,
    make_task,
    write_config,
)

from ralph_uv.client.daemon import DaemonClient, connect_daemon
from ralph_uv.config import paths
from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.daemon.events import DaemonEvents
from ralph_uv.daemon.supervisor import Supervisor, process_alive
from ralph_uv.eventlog import Event, EventLog
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.rpc import Endpoint
from ralph_uv.status import LoopStatus

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def daemons() -> Iterator[list[Ralphd]]:
    """ralphd processes a test starts; stopped, and every runner killed, at the end."""
    started: list[Ralphd] = []
    write_config()
    yield started
    for daemon in started:
        daemon.stop()
    kill_runners()


def _start(daemons: list[Ralphd]) -> Ralphd:
    daemons.append(Ralphd().start())
    return daemons[-1]


async def _client() -> DaemonClient:
    return await connect_daemon(autostart=False, client="test")


def _daemon_events() -> list[Event]:
    with EventLog(paths().state / "daemon" / "events.ndjson", read_only=True) as log:
        return log.read(0, 10_000)


def _row(loop_id: str) -> Any:
    with Registry.open() as registry:
        return registry.get(loop_id)


async def test_kill9_ralphd_then_restart_adopts_every_loop(
    daemons: list[Ralphd], tmp_path: Path
) -> None:
    """Three loops run; ralphd is killed with SIGKILL and started again. The new ralphd lists
    the same three loops with the same runner pids (none restarted or killed), each is
    attachable (connect_loop + get_status), their journals only grew, and each was announced
    with a loop_adopted event. An adopted runner that then dies is noticed as crashed."""
    first = _start(daemons)
    tasks = [make_task(tmp_path, name=f"t{i}") for i in range(3)]
    async with await _client() as daemon:
        records = [await daemon.start_loop(task, agent="tick") for task in tasks]
    pids = {r.loop_id: r.pid for r in records}
    for record in records:
        await async_wait_until(lambda r=record: b"tick 2" in journal_bytes(r.loop_id), timeout=20)
    before = {loop_id: journal_bytes(loop_id) for loop_id in pids}

    first.kill9()
    assert all(process_alive(pid or 0) for pid in pids.values())
    second = _start(daemons)
    assert second.pid != first.pid

    async with await _client() as daemon:
        listed = {r.loop_id: r for r in await daemon.list_loops()}
        assert set(listed) == set(pids)
        for loop_id, record in listed.items():
            assert record.pid == pids[loop_id]
            assert record.status.value == "running"
            endpoint = Endpoint(await daemon.connect_loop(loop_id))
            endpoint.start()
            hello = await endpoint.call("hello", {"protocol": "1.0", "client": "test"})
            assert hello["loop_id"] == loop_id
            assert "archived" not in hello
            status = await endpoint.call("get_status")
            assert status["pid"] == pids[loop_id]
            assert status["status"] == "running"
            await endpoint.close()
    for loop_id, old in before.items():
        await async_wait_until(lambda i=loop_id, o=old: len(journal_bytes(i)) > len(o),
                               timeout=10)
        assert journal_bytes(loop_id).startswith(old)
    adopted = [e.data["loop_id"] for e in _daemon_events() if e.type == "loop_adopted"]
    assert sorted(adopted) == sorted(pids)
    assert all(process_alive(pid or 0) for pid in pids.values())

    # A runner ralphd did not start (it was adopted) is watched all the same.
    victim = records[0]
    assert victim.pid is not None
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: _row(victim.loop_id).status.value == "crashed", timeout=5)
    assert time.monotonic() - killed_at < 2.0


async def test_kill9_runner_is_crashed_within_two_seconds(
    daemons: list[Ralphd], tmp_path: Path
) -> None:
    """A runner killed with SIGKILL is noticed within 2 s: its row becomes crashed with the
    reason, a loop_crashed daemon event reaches a subscriber, and the loop's own event log
    ends with loop_finished (status crashed)."""
    _start(daemons)
    task = make_task(tmp_path)
    seen: list[tuple[float, Event]] = []
    async with await _client() as daemon:
        await daemon.subscribe_events(None, lambda e: seen.append((time.monotonic(), e)))
        record = await daemon.start_loop(task, agent="sleep")
        assert record.pid is not None
        killed_at = time.monotonic()
        os.kill(record.pid, signal.SIGKILL)
        await async_wait_until(lambda: any(e.type == "loop_crashed" for _, e in seen),
                               timeout=5)
        arrived, event = next((t, e) for t, e in seen if e.type == "loop_crashed")
        assert arrived - killed_at < 2.0
        assert event.data["loop_id"] == record.loop_id
        assert "SIGKILL" in event.data["reason"]
        assert await daemon.list_loops() == []
    row = _row(record.loop_id)
    assert row.status.value == "crashed"
    assert "SIGKILL" in row.reason
    with EventLog(paths().loop_dir(record.loop_id) / "events.ndjson", read_only=True) as log:
        events = log.read(0, 1000)
    assert events[-1].type == "loop_finished"
    assert events[-1].data["status"] == "crashed"
    assert events[-2].type == "state_change"
    assert events[-2].data["to"] == "crashed"


async def test_runner_dead_while_no_ralphd_runs_is_crashed_at_start(
    daemons: list[Ralphd], tmp_path: Path
) -> None:
    """A runner that dies while no ralphd runs is found dead by the next ralphd: crashed (row
    and loop_crashed event), not adopted; the other, living loop is adopted."""
    first = _start(daemons)
    async with await _client() as daemon:
        dead = await daemon.start_loop(make_task(tmp_path, name="a"), agent="sleep")
        alive = await daemon.start_loop(make_task(tmp_path, name="b"), agent="sleep")
    first.kill9()
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(dead.pid or 0), timeout=10)
    _start(daemons)
    assert _row(dead.loop_id).status.value == "crashed"
    assert _row(alive.loop_id).status.value == "running"
    events = [(e.type, e.data.get("loop_id")) for e in _daemon_events()]
    assert ("loop_crashed", dead.loop_id) in events
    assert ("loop_adopted", alive.loop_id) in events
    assert ("loop_adopted", dead.loop_id) not in events


async def test_loop_that_ends_normally_is_not_crashed(
    daemons: list[Ralphd], tmp_path: Path
) -> None:
    """A loop whose agent completes every story ends as completed; when its runner exits,
    ralphd records loop_finished, not a crash."""
    _start(daemons)
    task = make_task(tmp_path, stories=2)
    async with await _client() as daemon:
        seen: list[Event] = []
        await daemon.subscribe_events(None, seen.append)
        record = await daemon.start_loop(task, agent="work")
        await async_wait_until(
            lambda: any(e.type == "loop_finished" for e in seen), timeout=60
        )
    finished = next(e for e in seen if e.type == "loop_finished")
    assert finished.data == {"loop_id": record.loop_id, "task_name": "demo",
                             "status": "completed", "reason": finished.data["reason"]}
    assert not any(e.type == "loop_crashed" for e in seen)
    assert _row(record.loop_id).status.value == "completed"


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "polling"])
async def test_supervisor_notices_a_foreign_process_dying(use_pidfd: bool) -> None:
    """A live loop row whose process ralphd did not start (a foreground run) is taken over by a
    sweep and watched, with a pidfd or by polling; when the process is killed, the row is
    crashed within 2 s and loop_crashed is published."""
    dirs = paths()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    registry = Registry.open()
    events = DaemonEvents(dirs.state / "daemon" / "events.ndjson")
    supervisor = Supervisor(dirs, registry, events, DaemonConfig(), use_pidfd=use_pidfd)
    try:
        registry.upsert(SessionRecord(
            loop_id="fg-000001", task_name="fg", task_dir="/tmp", agent="sleep",
            status=LoopStatus.RUNNING, pid=child.pid,
            socket_path=str(dirs.loop_socket("fg-000001")),
        ))
        await supervisor.sweep()
        assert supervisor.watching("fg-000001")

        def crashed() -> bool:
            row = registry.get("fg-000001")
            return row is not None and row.status == LoopStatus.CRASHED

        killed_at = time.monotonic()
        child.kill()
        await child.wait()
        await async_wait_until(crashed, timeout=5)
        assert time.monotonic() - killed_at < 2.0
        assert [e.type for e in events.read(0)][-1] == "loop_crashed"
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await supervisor.close()
        events.close()
        registry.close()
