"""Starting and watching runners: one process per loop, which outlives ralphd.

A runner is started detached (its own session, stdin ``/dev/null``, output to its
``runner.log``) with ralphd's environment plus the ``<config>/env`` file's variables. ralphd then
watches its pid with a pidfd (or, where the kernel has none, by polling twice a second), whether
it started the runner itself or found it running when it started (adoption).

Invariants:
- A runner whose process ends while its registry row is not terminal has crashed: ralphd sets
  the row to ``crashed``, appends ``state_change`` and ``loop_finished`` to the loop's event log
  (the runner is gone, so the log's writer lock is free) and publishes ``loop_crashed``. A runner
  that ended after writing a terminal row just finished: ``loop_finished``.
- ralphd never kills, restarts or re-parents a runner it adopts; it only watches it.
- A registry row's pid is trusted only if that process started before the row was written
  (a pid the kernel reused for something else is not a runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralph_uv.config import Paths, load_env_file
from ralph_uv.daemon.config import DaemonConfig
from ralph_uv.daemon.events import DaemonEvents, DaemonEventType
from ralph_uv.daemon.workspaces import Checkout, write_checkout
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.eventlog import EventLog, JournalError
from ralph_uv.journal import EVENTS_FILE
from ralph_uv.registry import LOCAL, Registry, SessionRecord
from ralph_uv.rpc import Endpoint
from ralph_uv.runner.host import new_loop_id
from ralph_uv.runner.spec import write_spec
from ralph_uv.runner.watch import PROTOCOL_VERSION
from ralph_uv.status import LoopStatus
from ralph_uv.transports.unix import open_unix

__all__ = [
    "PROTOCOL_VERSION",
    "LoopRequest",
    "Supervisor",
    "process_alive",
    "runner_log_tail",
]

log = logging.getLogger("ralph_uv.daemon.supervisor")

RUNNER_LOG = "runner.log"
SPEC_FILE = "spec.json"
_POLL_INTERVAL = 0.5
_PING_TIMEOUT = 2.0
_CALL_TIMEOUT = 10.0
_START_SLACK = 5.0  # seconds a row may predate its process (ralphd writes it just before)
_TAIL_BYTES = 4096
_SETTLE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class LoopRequest:
    """A checked request to start a loop (what ``start_loop`` asks for)."""

    task_dir: Path
    task_name: str
    agent: str
    model: str | None = None
    base_branch: str | None = None
    max_iterations: int = 10
    overrides: dict[str, Any] = field(default_factory=dict)
    loop_id: str | None = None  # chosen in advance for a loop in a workspace checkout
    first_run_setup: bool = False
    push_every: int | None = None
    checkout: Checkout | None = None
    backend: str = "pty"  # where a terminal-based agent runs: "pty" or "tmux"


@dataclass(slots=True)
class _Watch:
    """A runner being watched (mutable: its state changes as the process lives and dies)."""

    loop_id: str
    pid: int
    child: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False  # it has answered on its socket
    time_limit: asyncio.TimerHandle | None = None


# --------------------------------------------------------------------------- process facts


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields follow the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, is not alive)."""
    fields = _stat_fields(pid)
    if fields is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return fields[0] not in ("Z", "X", "x")


def _boot_time() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _process_start(pid: int) -> float | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _is_runner_of(pid: int, record: SessionRecord) -> bool:
    if not process_alive(pid):
        return False
    started = _process_start(pid)
    return started is None or started <= record.started_at + _START_SLACK


def runner_log_tail(loop_dir: Path, limit: int = _TAIL_BYTES) -> str:
    """The end of a loop's runner.log, for error messages."""
    path = loop_dir / RUNNER_LOG
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - limit))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = text.splitlines()
    return "\n".join(lines[1:] if len(text) >= limit else lines).strip()


def _how_it_ended(watch: _Watch) -> str:
    code = watch.child.returncode if watch.child is not None else None
    if code is None:
        return f"the runner (pid {watch.pid}) ended unexpectedly"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the runner (pid {watch.pid}) was killed by {name}"
    return f"the runner (pid {watch.pid}) exited with status {code}"


# ------------------------------------------------------------------------------ supervisor


class Supervisor:
    """Starts, adopts and watches this machine's runners; records what becomes of them.

    ``use_pidfd=False`` watches by polling every 0.5 s, as on kernels without pidfds.
    """

    def __init__(
        self,
        dirs: Paths,
        registry: Registry,
        events: DaemonEvents,
        settings: DaemonConfig,
        *,
        use_pidfd: bool = True,
    ) -> None:
        self.dirs = dirs
        self.registry = registry
        self.events = events
        self.settings = settings
        self._watches: dict[str, _Watch] = {}
        self._adopting: set[str] = set()
        self._start_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._use_pidfd = use_pidfd and hasattr(os, "pidfd_open")

    # ---------------------------------------------------------------- queries

    def watching(self, loop_id: str) -> bool:
        """True while ralphd watches this loop's runner."""
        return loop_id in self._watches

    def active_loops(self) -> list[SessionRecord]:
        """This machine's loops that have not ended (they count against the limit)."""
        return self.registry.find(location=LOCAL, active_only=True)

    def resolve(self, loop: str) -> SessionRecord:
        """The loop called ``loop``: a loop id, or a task name (its most recent loop)."""
        record = self.registry.get(loop)
        if record is None or not record.is_local:
            record = self.registry.latest_for_task(loop, location=LOCAL)
        if record is None:
            raise UserError(
                f"no loop {loop!r} on this machine; `ralph-uv status --all` shows the loops",
                code=ErrorCode.LOOP_NOT_FOUND,
            )
        return record

    # ---------------------------------------------------------------- recovery

    async def recover(self) -> None:
        """At start: adopt every runner still alive and answering; the dead ones crashed."""
        for record in self.active_loops():
            await self._take_over(record, announce=True)

    async def sweep(self) -> None:
        """Adopt or settle active rows nobody watches (loops run in the foreground, a row
        whose runner died while no ralphd ran)."""
        for record in self.active_loops():
            if record.loop_id not in self._watches:
                await self._take_over(record, announce=False)

    async def _take_over(self, record: SessionRecord, *, announce: bool) -> None:
        if record.loop_id in self._watches or record.loop_id in self._adopting:
            return
        self._adopting.add(record.loop_id)
        try:
            await self._adopt(record, announce=announce)
        finally:
            self._adopting.discard(record.loop_id)

    async def _adopt(self, record: SessionRecord, *, announce: bool) -> None:
        if record.pid is None:
            # Written by a ralphd that died before it started the runner.
            if time.time() - record.updated_at > self.settings.start_timeout:
                self._crashed(record, "the runner never started")
            return
        if not _is_runner_of(record.pid, record):
            self._crashed(record, f"the runner (pid {record.pid}) is gone")
            return
        answers = await self.ping(record)
        watch = self._watch(record.loop_id, record.pid, started_at=record.started_at)
        watch.ready = answers
        if announce or answers:
            self.events.publish(
                DaemonEventType.LOOP_ADOPTED,
                {"loop_id": record.loop_id, "task_name": record.task_name, "pid": record.pid,
                 "answers": answers},
            )
        if not answers:
            log.warning("loop %s: runner pid %d is alive but does not answer on %s",
                        record.loop_id, record.pid, record.socket_path)

    # ---------------------------------------------------------------- starting

    async def start(self, request: LoopRequest) -> SessionRecord:
        """Start a runner for ``request`` and return its record once it answers.

        Raises ``TOO_MANY_LOOPS`` at the limit, and an error carrying the end of runner.log
        when the runner dies before it serves its socket.
        """
        async with self._start_lock:
            await self.sweep()
            active = len(self.active_loops())
            limit = self.settings.max_concurrent_loops
            if active >= limit:
                raise RalphError(
                    f"{active} loops are already running here (max_concurrent_loops = {limit}); "
                    "wait for one to finish, stop one, or raise the limit in daemon.toml",
                    code=ErrorCode.TOO_MANY_LOOPS,
                )
            env = dict(os.environ)
            # Agents' keys: only in the runner's environment, never logged or on a command line.
            env.update(load_env_file(self.dirs.env_file))
            loop_id = request.loop_id or new_loop_id(request.task_name)
            loop_dir = self.dirs.loop_dir(loop_id)
            if request.checkout is not None:
                write_checkout(loop_dir, request.checkout)
            write_spec(
                loop_dir / SPEC_FILE,
                loop_id=loop_id,
                task_dir=request.task_dir,
                task_name=request.task_name,
                agent=request.agent,
                model=request.model,
                base_branch=request.base_branch,
                config=request.overrides,
                first_run_setup=request.first_run_setup,
                push_every=request.push_every,
                backend=request.backend,
            )
            record = self.registry.upsert(
                SessionRecord(
                    loop_id=loop_id,
                    task_name=request.task_name,
                    task_dir=str(request.task_dir),
                    agent=request.agent,
                    status=LoopStatus.STARTING,
                    max_iterations=request.max_iterations,
                    location=LOCAL,
                    transport="unix",
                    socket_path=str(self.dirs.loop_socket(loop_id)),
                    branch=request.checkout.branch if request.checkout else None,
                )
            )
            try:
                child = self._spawn(loop_dir, env)
            except RalphError as exc:
                self.registry.update(loop_id, status=LoopStatus.FAILED.value, reason=exc.message)
                raise
            self.registry.update(loop_id, pid=child.pid)
            watch = self._watch(loop_id, child.pid, child=child, started_at=record.started_at)
        log.info("loop %s: started runner pid %d for %s with %s", loop_id, child.pid,
                 request.task_dir, request.agent)
        await self._wait_ready(watch, record)
        self.events.publish(
            DaemonEventType.LOOP_STARTED,
            {"loop_id": loop_id, "task_name": request.task_name,
             "task_dir": str(request.task_dir), "agent": request.agent, "pid": child.pid},
        )
        return self.registry.get(loop_id) or record

    def _spawn(self, loop_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "ralph_uv.runner", "--spec", str(loop_dir / SPEC_FILE)]
        try:
            fd = os.open(loop_dir / RUNNER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise RalphError(f"cannot create {loop_dir / RUNNER_LOG}: {exc.strerror}") from exc
        try:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                cwd=loop_dir, start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            raise RalphError(f"cannot start the runner: {exc}") from exc
        finally:
            os.close(fd)

    async def _wait_ready(self, watch: _Watch, record: SessionRecord) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        delay = 0.02
        while True:
            if watch.exited.is_set():
                if self._ran_to_an_end(record):
                    watch.ready = True
                    return
                raise self._start_failed(watch, record)
            if await self.ping(record, patience=1.0):
                watch.ready = True
                return
            if time.monotonic() > deadline:
                raise RalphError(
                    f"loop {record.loop_id}: the runner (pid {watch.pid}) did not answer within "
                    f"{self.settings.start_timeout:g} s; see "
                    f"{self.dirs.loop_dir(record.loop_id) / RUNNER_LOG}",
                    code=ErrorCode.TIMEOUT,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await watch.exited.wait()
            delay = min(delay * 2, 0.2)

    def _ran_to_an_end(self, record: SessionRecord) -> bool:
        """A quick loop may finish before its first ping: that is a start, not a failure."""
        row = self.registry.get(record.loop_id)
        return (
            row is not None
            and row.status.is_terminal
            and (row.status != LoopStatus.FAILED or row.iteration > 0)
        )

    def _start_failed(self, watch: _Watch, record: SessionRecord) -> RalphError:
        row = self.registry.get(record.loop_id)
        why = row.reason if row is not None and row.status.is_terminal and row.reason else ""
        tail = runner_log_tail(self.dirs.loop_dir(record.loop_id))
        message = f"loop {record.loop_id} did not start: {why or _how_it_ended(watch)}"
        if tail:
            message += f"\nlast lines of {RUNNER_LOG}:\n{tail}"
        return RalphError(message, code=ErrorCode.INTERNAL_ERROR if not why else
                          ErrorCode.INVALID_PARAMS)

    # ---------------------------------------------------------------- talking to runners

    @contextlib.asynccontextmanager
    async def _runner(self, record: SessionRecord, *, limit: float) -> AsyncIterator[Endpoint]:
        if not record.socket_path:
            raise RalphError(f"loop {record.loop_id} has no socket", code=ErrorCode.BAD_STATE)
        async with asyncio.timeout(limit):
            stream = await open_unix(Path(record.socket_path))
        endpoint = Endpoint(stream, eof_grace=0.5, close_timeout=0.5)
        async with endpoint:
            await endpoint.call(
                "hello", {"protocol": PROTOCOL_VERSION, "client": "ralphd"}, timeout=limit
            )
            yield endpoint

    async def ping(self, record: SessionRecord, *, patience: float = _PING_TIMEOUT) -> bool:
        """True when the loop's runner answers ``hello`` within ``patience`` seconds."""
        try:
            async with self._runner(record, limit=patience):
                return True
        except (RalphError, TimeoutError):
            return False

    async def call(self, record: SessionRecord, method: str, params: dict[str, Any]) -> Any:
        """Call a per-loop method on the loop's runner."""
        try:
            async with self._runner(record, limit=_CALL_TIMEOUT) as endpoint:
                return await endpoint.call(method, params, timeout=_CALL_TIMEOUT)
        except TimeoutError:
            raise RalphError(
                f"loop {record.loop_id}: the runner did not answer within {_CALL_TIMEOUT:g} s",
                code=ErrorCode.TIMEOUT,
            ) from None

    async def stop(self, record: SessionRecord, when: str) -> None:
        """Ask the loop to stop; a runner that does not answer gets SIGTERM when ``now``."""
        self.events.publish(DaemonEventType.LOOP_STOP_REQUESTED,
                            {"loop_id": record.loop_id, "when": when})
        try:
            await self.call(record, "stop", {"when": when})
        except RalphError:
            if when != "now" or record.pid is None or not _is_runner_of(record.pid, record):
                raise
            log.warning("loop %s: runner does not answer; sending SIGTERM", record.loop_id)
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)

    async def checkpoint(self, record: SessionRecord) -> None:
        """Ask the loop to finish its iteration and stop as ``checkpointed``."""
        self.events.publish(DaemonEventType.LOOP_CHECKPOINT_REQUESTED,
                            {"loop_id": record.loop_id})
        await self.call(record, "checkpoint", {})

    # ---------------------------------------------------------------- watching

    def _watch(
        self, loop_id: str, pid: int, *, child: subprocess.Popen[bytes] | None = None,
        started_at: float,
    ) -> _Watch:
        watch = _Watch(loop_id, pid, child)
        self._watches[loop_id] = watch
        if self._use_pidfd:
            try:
                watch.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                asyncio.get_running_loop().call_soon(self._ended, watch)
                return watch
            except OSError as exc:  # no pidfd on this kernel: poll everyone instead
                log.info("pidfd_open is not available (%s); polling runners", exc)
                self._use_pidfd = False
        if watch.pidfd >= 0:
            asyncio.get_running_loop().add_reader(watch.pidfd, self._ended, watch)
        elif self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="runner poller")
        limit = self.settings.loop_time_limit
        if limit is not None:
            delay = max(0.0, started_at + limit - time.time())
            watch.time_limit = asyncio.get_running_loop().call_later(
                delay, self._time_limit_reached, watch
            )
        return watch

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            for watch in list(self._watches.values()):
                if watch.pidfd < 0 and not self._child_alive(watch):
                    self._ended(watch)

    @staticmethod
    def _child_alive(watch: _Watch) -> bool:
        if watch.child is not None:
            return watch.child.poll() is None
        return process_alive(watch.pid)

    def _unwatch(self, watch: _Watch) -> None:
        self._watches.pop(watch.loop_id, None)
        if watch.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = -1
        if watch.time_limit is not None:
            watch.time_limit.cancel()

    def _ended(self, watch: _Watch) -> None:
        if self._watches.get(watch.loop_id) is not watch:
            return
        self._unwatch(watch)
        if watch.child is not None:
            watch.child.poll()  # reap it: it is our child
        watch.exited.set()
        self._settle(watch, attempt=1)

    def _settle(self, watch: _Watch, *, attempt: int) -> None:
        """Record how the runner's loop ended; a busy registry is tried again a little later."""
        try:
            self._record_end(watch)
        except RalphError as exc:
            if attempt >= _SETTLE_ATTEMPTS:
                log.error("loop %s: cannot record the end of its runner: %s", watch.loop_id,
                          exc.message)
                return
            log.warning("loop %s: recording the end of its runner failed (%s); retrying",
                        watch.loop_id, exc.message)
            asyncio.get_running_loop().call_later(
                attempt * 0.5, lambda: self._settle(watch, attempt=attempt + 1)
            )

    def _record_end(self, watch: _Watch) -> None:
        record = self.registry.get(watch.loop_id)
        if record is None:
            log.warning("loop %s: runner ended and its registry row is gone", watch.loop_id)
            return
        if record.status.is_terminal:
            log.info("loop %s finished: %s (%s)", record.loop_id, record.status.value,
                     record.reason)
            self.events.publish(
                DaemonEventType.LOOP_FINISHED,
                {"loop_id": record.loop_id, "task_name": record.task_name,
                 "status": record.status.value, "reason": record.reason},
            )
            return
        if record.status == LoopStatus.STARTING and not watch.ready:
            # It never served its loop: a start-up failure (bad setting, broken install).
            last = runner_log_tail(self.dirs.loop_dir(record.loop_id), 1024).splitlines()
            why = f"{_how_it_ended(watch)} before it started"
            self._runner_gone(record, f"{why}: {last[-1]}" if last else why, LoopStatus.FAILED)
            return
        self._crashed(record, _how_it_ended(watch))

    def _crashed(self, record: SessionRecord, why: str) -> None:
        """Record that ``record``'s runner is gone although its loop had not ended."""
        self._runner_gone(record, f"{why} while the loop was {record.status.value}",
                          LoopStatus.CRASHED)

    def _runner_gone(self, record: SessionRecord, reason: str, status: LoopStatus) -> None:
        try:
            record = self.registry.update(record.loop_id, status=status.value, reason=reason)
        except UserError as exc:  # it reached a terminal status just now: it ended by itself
            log.info("loop %s: %s", record.loop_id, exc.message)
            return
        log.warning("loop %s %s: %s", record.loop_id, status.value, reason)
        self._append_loop_events(record, reason, status)
        data = {"loop_id": record.loop_id, "task_name": record.task_name, "pid": record.pid,
                "reason": reason}
        if status == LoopStatus.CRASHED:
            self.events.publish(DaemonEventType.LOOP_CRASHED, data)
        else:
            self.events.publish(DaemonEventType.LOOP_FINISHED, {**data, "status": status.value})

    def _append_loop_events(self, record: SessionRecord, reason: str,
                            status: LoopStatus) -> None:
        path = self.dirs.loop_dir(record.loop_id) / EVENTS_FILE
        if not path.parent.is_dir():
            return
        try:
            with EventLog(path) as events:
                last = events.read(max(0, events.next_seq - 50), 50)
                previous = next(
                    (e.data.get("to") for e in reversed(last) if e.type == "state_change"),
                    LoopStatus.STARTING.value,
                )
                if last and last[-1].type == "loop_finished":
                    return  # the runner ended its journal itself
                events.append("state_change",
                              {"from": previous, "to": status.value, "reason": reason})
                events.append("loop_finished", {
                    "status": status.value, "reason": reason,
                    "iterations": record.iteration, "stories_done": record.stories_done,
                    "stories_total": record.stories_total,
                })
        except JournalError as exc:
            log.warning("loop %s: cannot record its end in %s: %s", record.loop_id, path,
                        exc.message)

    def _time_limit_reached(self, watch: _Watch) -> None:
        watch.time_limit = None
        record = self.registry.get(watch.loop_id)
        if record is None or record.status.is_terminal:
            return
        limit = self.settings.loop_time_limit
        log.info("loop %s ran past the time limit (%s s): checkpointing", watch.loop_id, limit)
        self.events.publish(DaemonEventType.LOOP_TIME_LIMIT,
                            {"loop_id": watch.loop_id, "limit": limit})
        task = asyncio.create_task(self._checkpoint_quietly(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _checkpoint_quietly(self, record: SessionRecord) -> None:
        try:
            await self.call(record, "checkpoint", {})
        except RalphError as exc:
            log.warning("loop %s: checkpoint after the time limit failed: %s",
                        record.loop_id, exc.message)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Stop watching (the runners keep running; the next ralphd adopts them)."""
        for watch in list(self._watches.values()):
            self._unwatch(watch)
        tasks = [*self._tasks, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
