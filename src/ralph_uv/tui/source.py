"""The TUI's data layer: every loop of every location, kept live by events.

A *location* is a ralphd: this machine's, or a remote's from the registry's ``remotes`` table.
Each is just a daemon connection (:class:`Location` carries the function that makes it), so a
remote loop is watched, steered and fed exactly like a local one; only the transport differs.

For each location a link keeps one daemon connection: ``subscribe_events`` (resumed from its
seq after a reconnect), ``list_loops`` when a loop starts or ends, and one
:class:`~ralph_uv.tui.feed.LoopFeed` per running loop (its status, iteration, story and last
output, live). A location that cannot be reached is shown as such, its loops with their last
known state (from this session, or from the local registry before the first answer).

Invariants:
- No polling: rows change on daemon events and loop events only; a link that is down retries
  with a capped backoff, and feeds retry at once when their location comes back.
- A loop is keyed by ``(location, loop_id)``; the same loop id on two machines is two loops.
- ``on_change`` is called (synchronously, often) after anything a row shows has changed; the
  caller coalesces redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.agents.detect import AgentInfo
from ralph_uv.client.daemon import DaemonClient
from ralph_uv.client.loops import LoopState, RunOptions
from ralph_uv.client.remote_run import RemotePlan, pull_remote_loop, start_remote_loop
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RalphError, TransportError, UserError
from ralph_uv.eventlog import Event
from ralph_uv.registry import LOCAL, Registry, SessionRecord
from ralph_uv.status import LoopStatus
from ralph_uv.transports.base import Stream
from ralph_uv.tui.feed import FeedState, LoopFeed
from ralph_uv.tui.locations import Location, LocationInfo, LocationState
from ralph_uv.tui.taskdata import TaskSnapshot, read_task, save_notes, task_from_documents

__all__ = ["LoopKey", "LoopRow", "LoopSource"]

log = logging.getLogger("ralph_uv.tui.source")

_LINK_FIRST_DELAY = 0.2
_LINK_MAX_DELAY = 5.0
_FIRST_ATTEMPT_WAIT = 10.0
_REREAD_DELAY = 0.5


# ------------------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True, order=True)
class LoopKey:
    """A loop wherever it runs: the same loop id on two machines is two loops."""

    location: str
    loop_id: str

    def __str__(self) -> str:
        return self.loop_id if self.location == LOCAL else f"{self.location}:{self.loop_id}"


@dataclass(frozen=True, slots=True)
class LoopRow:
    """One loop as the TUI shows it: its registry record, brought up to date by its feed.

    ``reachable`` is false when the location cannot be reached (the rest is then the last
    known state); ``connection`` is the feed's state (``live``, ``reconnecting``...) or ``""``
    for a loop nobody follows (it has ended).
    """

    key: LoopKey
    task_name: str
    task_dir: str
    status: LoopStatus
    reason: str | None
    iteration: int
    max_iterations: int
    story: str | None
    stories_done: int
    stories_total: int
    agent: str
    backend: str
    branch: str | None
    started_at: float
    finished_at: float | None
    last_output_at: float | None
    interactive: bool
    holder: str | None
    reachable: bool
    connection: str

    @property
    def location(self) -> str:
        return self.key.location

    @property
    def loop_id(self) -> str:
        return self.key.loop_id

    def run_time(self, now: float) -> float:
        """Seconds the loop has run (until it finished)."""
        end = self.finished_at if self.finished_at is not None else now
        return max(0.0, end - self.started_at)

    def idle_time(self, now: float) -> float | None:
        """Seconds since the agent's last output, when known."""
        return None if self.last_output_at is None else max(0.0, now - self.last_output_at)


def _row(location: str, record: SessionRecord, feed: LoopFeed | None, reachable: bool) -> LoopRow:
    state = feed.state if feed is not None else None
    status = record.status
    if state is not None and (state.status.is_terminal or not status.is_terminal):
        status = state.status
    return LoopRow(
        key=LoopKey(location, record.loop_id),
        task_name=record.task_name,
        task_dir=record.task_dir,
        status=status,
        reason=state.reason if state is not None else record.reason,
        iteration=state.iteration if state is not None else record.iteration,
        max_iterations=state.max_iterations if state is not None else record.max_iterations,
        story=state.story if state is not None else record.current_story,
        stories_done=state.stories_done if state is not None else record.stories_done,
        stories_total=state.stories_total if state is not None else record.stories_total,
        agent=(state.agent if state is not None else "") or record.agent,
        backend=state.backend if state is not None else record.backend,
        branch=record.branch,
        started_at=record.started_at,
        finished_at=record.finished_at,
        last_output_at=(feed.last_output_at if feed is not None else None)
        or record.last_output_at,
        interactive=state.interactive if state is not None else record.backend == "pty",
        holder=feed.holder if feed is not None else None,
        reachable=reachable,
        connection=feed.status.value if feed is not None and not feed.finished else "",
    )


def _journal_mtime(loop_id: str) -> float | None:
    """When a local loop's journal was last written: the last output before we watched."""
    folder = paths().loop_dir(loop_id) / "output.journal"
    try:
        return max((p.stat().st_mtime for p in folder.glob("*.seg")), default=None)
    except OSError:
        return None


# -------------------------------------------------------------------------------------- links


class _Link:
    """One location: its daemon connection, its loops' records and their feeds."""

    def __init__(self, source: LoopSource, location: Location) -> None:
        self.source = source
        self.location = location
        self.state = LocationState.CONNECTING
        self.error: str | None = None
        self.daemon: DaemonClient | None = None
        self.records: dict[str, SessionRecord] = {}
        self.feeds: dict[str, LoopFeed] = {}
        self.events_next: int | None = None
        self.first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._kick = asyncio.Event()

    @property
    def name(self) -> str:
        return self.location.name

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"location {self.name}")

    async def close(self) -> None:
        for task in (self._task, self._refresh_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._refresh_task) if t is not None),
            return_exceptions=True,
        )
        await asyncio.gather(*(feed.close() for feed in self.feeds.values()))
        self.feeds.clear()
        if self.daemon is not None:
            await self.daemon.close()
            self.daemon = None

    def require_daemon(self) -> DaemonClient:
        if self.daemon is None or self.daemon.endpoint.closed:
            raise TransportError(
                f"{self.name} is unreachable" + (f": {self.error}" if self.error else "")
                + "; the TUI reconnects by itself",
            )
        return self.daemon

    async def open_loop_stream(self, loop_id: str) -> Stream:
        return await self.require_daemon().connect_loop(loop_id)

    # ------------------------------------------------------------------------- connection

    async def _run(self) -> None:
        first = True
        delay = _LINK_FIRST_DELAY
        while True:
            try:
                daemon = await self.location.connect(first)
            except RalphError as exc:
                if first:
                    await self._load_registry()
                self._unreachable(exc.message)
            else:
                if await self._begin(daemon):
                    delay = _LINK_FIRST_DELAY
                    await daemon.endpoint.wait_closed()
                    self.daemon = None
                    self._unreachable(daemon.endpoint.close_reason or "connection lost")
            first = False
            self.first_attempt.set()
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            delay = min(delay * 2, _LINK_MAX_DELAY)

    async def _begin(self, daemon: DaemonClient) -> bool:
        self.daemon = daemon
        try:
            self.events_next = await daemon.subscribe_events(self.events_next, self._on_event)
            records = await daemon.list_loops(all=True)
        except RalphError as exc:
            self.daemon = None
            await daemon.close()
            self._unreachable(exc.message)
            return False
        self.state = LocationState.ONLINE
        self.error = None
        self._merge(records, complete=True)
        for feed in self.feeds.values():
            feed.kick()
        self.first_attempt.set()
        self.source.changed()
        return True

    def _unreachable(self, reason: str) -> None:
        log.info("location %s unreachable: %s", self.name, reason)
        self.state = LocationState.UNREACHABLE
        self.error = reason
        self.source.changed()

    async def _load_registry(self) -> None:
        """The last known state of this location's loops, before it answers."""

        def read() -> list[SessionRecord]:
            if not paths().registry.exists():
                return []
            with Registry.open() as registry:
                return registry.find(location=self.name)

        try:
            records = await asyncio.to_thread(read)
        except RalphError as exc:
            log.warning("registry not read: %s", exc.message)
            return
        for record in records:
            if record.remote_loop_id and record.remote_loop_id != record.loop_id:
                # A copy of a remote loop (``NAME:<id>``): shown by the id its ralphd uses.
                record = _replace_record(record, loop_id=record.remote_loop_id)
            self.records.setdefault(record.loop_id, record)

    # ------------------------------------------------------------------------- records

    def _merge(self, records: list[SessionRecord], *, complete: bool = False) -> None:
        """Take these records; with ``complete`` (a full ``list_loops``) the loops missing
        from it (cleaned away) are forgotten, unless someone is watching one."""
        if complete:
            listed = {record.loop_id for record in records}
            for loop_id in [i for i in self.records if i not in listed]:
                feed = self.feeds.get(loop_id)
                if feed is None or feed.watchers == 0:
                    del self.records[loop_id]
                if feed is not None and feed.watchers == 0:
                    del self.feeds[loop_id]
                    self.source.keep(asyncio.get_running_loop().create_task(feed.close()))
        for record in records:
            self.records[record.loop_id] = record
            if record.status.is_active and record.loop_id not in self.feeds:
                self._add_feed(record.loop_id)
        self.source.changed()

    def _add_feed(self, loop_id: str) -> LoopFeed:
        feed = LoopFeed(
            loop_id,
            self.open_loop_stream,
            client=self.source.client,
            on_change=self._feed_changed,
            on_notice=self.source.notice,
        )
        if self.location.is_local:
            feed.last_output_at = _journal_mtime(loop_id)
        self.feeds[loop_id] = feed
        feed.start()
        return feed

    def _feed_changed(self, feed: LoopFeed) -> None:
        if feed.finished and feed.watchers == 0 and self.feeds.get(feed.loop_id) is feed:
            self._retire(feed)
        self.source.changed()

    def _retire(self, feed: LoopFeed) -> None:
        """A loop that has ended and that nobody watches: keep its final state, drop the
        connection."""
        del self.feeds[feed.loop_id]
        record = self.records.get(feed.loop_id)
        if record is not None and feed.state is not None:
            state = feed.state
            self.records[feed.loop_id] = _record_from(record, state, feed.last_output_at)
        task = asyncio.get_running_loop().create_task(feed.close())
        self.source.keep(task)

    def _on_event(self, event: Event) -> None:
        self.events_next = event.seq + 1
        loop_id = event.data.get("loop_id")
        if event.type in ("loop_finished", "loop_crashed") and isinstance(loop_id, str):
            record = self.records.get(loop_id)
            if record is not None:
                status = LoopStatus.CRASHED if event.type == "loop_crashed" else record.status
                with contextlib.suppress(ValueError):
                    status = LoopStatus(str(event.data.get("status") or status.value))
                reason = event.data.get("reason")
                self.records[loop_id] = _replace_record(
                    record, status=status, reason=reason if isinstance(reason, str) else None,
                    finished_at=event.timestamp,
                )
                self.source.changed()
        if event.type.startswith("loop_"):
            self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            self._refresh_again = False
            daemon = self.daemon
            if daemon is None:
                return
            try:
                self._merge(await daemon.list_loops(all=True), complete=True)
            except RalphError as exc:
                log.info("location %s: list_loops failed: %s", self.name, exc.message)
                return
            if not self._refresh_again:
                return


def _replace_record(record: SessionRecord, **changes: Any) -> SessionRecord:
    data = record.to_dict()
    data.update({k: (v.value if isinstance(v, LoopStatus) else v) for k, v in changes.items()})
    return SessionRecord.from_dict(data)


def _record_from(
    record: SessionRecord, state: LoopState, last_output_at: float | None
) -> SessionRecord:
    return _replace_record(
        record,
        status=state.status,
        reason=state.reason,
        iteration=state.iteration,
        current_story=state.story,
        stories_done=state.stories_done,
        stories_total=state.stories_total,
        agent=state.agent or record.agent,
        last_output_at=last_output_at,
        finished_at=record.finished_at or (time.time() if state.status.is_terminal else None),
    )


# ------------------------------------------------------------------------------------ source


class LoopSource:
    """Every loop of every location, live. :meth:`start` it, :meth:`close` it."""

    def __init__(
        self,
        locations: Sequence[Location],
        *,
        client: str,
        on_change: Callable[[], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        names = [location.name for location in locations]
        if len(set(names)) != len(names):
            raise UserError(f"two locations share a name: {', '.join(names)}")
        self.client = client
        self.on_change = on_change
        self.on_notice = on_notice
        self.version = 0
        self._links = {loc.name: _Link(self, loc) for loc in locations}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------------- lifecycle

    async def start(self, wait: float = _FIRST_ATTEMPT_WAIT) -> None:
        """Connect to every location in the background; return once each has answered or
        failed once (at most ``wait`` seconds)."""
        for link in self._links.values():
            link.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.gather(*(link.first_attempt.wait() for link in self._links.values()))

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def changed(self) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def notice(self, message: str) -> None:
        if self.on_notice is not None:
            self.on_notice(message)

    # ------------------------------------------------------------------------- reading

    @property
    def locations(self) -> list[Location]:
        return [link.location for link in self._links.values()]

    def location(self, name: str) -> Location:
        return self._link(name).location

    def location_infos(self) -> list[LocationInfo]:
        return [
            LocationInfo(
                link.name, link.state, link.error, link.location.url,
                sum(1 for r in link.records.values() if r.status.is_active),
            )
            for link in self._links.values()
        ]

    def rows(self) -> list[LoopRow]:
        """Every loop known, newest first."""
        found: list[LoopRow] = []
        for link in self._links.values():
            reachable = link.state is LocationState.ONLINE
            for loop_id, record in link.records.items():
                found.append(_row(link.name, record, link.feeds.get(loop_id), reachable))
        found.sort(key=lambda r: r.started_at, reverse=True)
        return found

    def row(self, key: LoopKey) -> LoopRow | None:
        link = self._links.get(key.location)
        record = link.records.get(key.loop_id) if link else None
        if link is None or record is None:
            return None
        reachable = link.state is LocationState.ONLINE
        return _row(link.name, record, link.feeds.get(key.loop_id), reachable)

    def _link(self, name: str) -> _Link:
        try:
            return self._links[name]
        except KeyError:
            raise UserError(f"no location named {name!r}") from None

    # ------------------------------------------------------------------------- feeds

    def feed(self, key: LoopKey) -> LoopFeed | None:
        """The loop's feed if it is followed now (running loops, and loops on screen)."""
        link = self._links.get(key.location)
        return link.feeds.get(key.loop_id) if link is not None else None

    async def open_feed(self, key: LoopKey) -> LoopFeed:
        """The loop's feed, connected (opened for a loop that has ended, to read its journal);
        pair with :meth:`release_feed`."""
        link = self._link(key.location)
        feed = link.feeds.get(key.loop_id)
        if feed is None or feed.status is FeedState.CLOSED:
            feed = link._add_feed(key.loop_id)
        feed.watchers += 1
        try:
            await feed.wait_connected()
        except BaseException:
            await self.release_feed(key, feed)
            raise
        return feed

    async def release_feed(self, key: LoopKey, feed: LoopFeed) -> None:
        """One watcher less; a feed of an ended loop that nobody watches is closed."""
        feed.watchers = max(0, feed.watchers - 1)
        link = self._links.get(key.location)
        if link is None:
            return
        active = key.loop_id in link.records and link.records[key.loop_id].status.is_active
        if feed.watchers == 0 and (feed.finished or not active):
            if link.feeds.get(key.loop_id) is feed:
                link._retire(feed)
            else:
                await feed.close()
            self.changed()

    # ------------------------------------------------------------------------- actions

    def daemon(self, location: str) -> DaemonClient:
        """The location's daemon connection, or a :class:`TransportError` saying why not."""
        return self._link(location).require_daemon()

    async def start_loop(
        self, location: str, task_dir: str | Path, *, task_name: str | None, options: RunOptions
    ) -> LoopKey:
        """Start a loop at ``location``; its key (the loop appears in :meth:`rows` at once)."""
        link = self._link(location)
        record = await link.require_daemon().start_loop(
            task_dir, task_name=task_name, **options.params()
        )
        link._merge([record])
        return LoopKey(location, record.loop_id)

    async def stop(self, key: LoopKey, *, now: bool = False) -> SessionRecord:
        """Stop the loop after its iteration (or ``now``)."""
        daemon = self.daemon(key.location)
        return await daemon.stop_loop(key.loop_id, "now" if now else "after_iteration")

    async def checkpoint(self, key: LoopKey) -> SessionRecord:
        """Let the iteration finish, then stop as ``checkpointed``."""
        return await self.daemon(key.location).checkpoint_loop(key.loop_id)

    async def inject(self, key: LoopKey, text: str) -> None:
        """Queue ``text`` for the loop's next prompt."""
        if not text.strip():
            raise UserError("the prompt to inject is empty; type some text")
        feed = await self.open_feed(key)
        try:
            await feed.inject(text)
        finally:
            await self.release_feed(key, feed)

    async def agents(self, location: str) -> list[AgentInfo]:
        """The agents installed where ``location``'s ralphd runs."""
        return await self.daemon(location).get_agents()

    # ------------------------------------------------------------------------- task files

    async def read_task(self, key: LoopKey, current: str | None = None) -> TaskSnapshot:
        """The loop's task as it is now: read here when its folder is on this machine, else
        through its ralphd (``get_prd``, ``get_progress``). Never raises: a problem is the
        snapshot's ``error``. An unreadable prd.json is read once more half a second later:
        an agent may have been writing it."""
        snapshot = await self._read_task(key, current)
        if snapshot.prd is None and self.row(key) is not None:
            await asyncio.sleep(_REREAD_DELAY)
            snapshot = await self._read_task(key, current)
        return snapshot

    async def _read_task(self, key: LoopKey, current: str | None) -> TaskSnapshot:
        row = self.row(key)
        if row is None:
            return TaskSnapshot(Path("."), None, (), "", error=f"loop {key} is not known")
        if self.location(key.location).local_files:
            return await asyncio.to_thread(read_task, Path(row.task_dir), current)
        try:
            daemon = self.daemon(key.location)
            prd = await daemon.get_prd(key.loop_id)
        except RalphError as exc:
            return task_from_documents(row.task_dir, None, "", current, error=exc.message)
        try:
            progress = await daemon.get_progress(key.loop_id)
        except RalphError as exc:  # the stories are worth showing without it
            log.info("progress log of %s not read: %s", key, exc.message)
            progress = ""
        return task_from_documents(row.task_dir, prd, progress, current)

    async def save_notes(self, key: LoopKey, story_id: str, notes: str) -> None:
        """Write a story's notes into the loop's prd.json: here, or through its ralphd."""
        row = self.row(key)
        if row is None:
            raise UserError(f"loop {key} is not known", code=ErrorCode.LOOP_NOT_FOUND)
        if self.location(key.location).local_files:
            await asyncio.to_thread(save_notes, Path(row.task_dir), story_id, notes)
        else:
            await self.daemon(key.location).set_story_notes(key.loop_id, story_id, notes)

    # ------------------------------------------------------------------------- remote code

    async def start_remote_loop(
        self, plan: RemotePlan, options: RunOptions, *, on_notice: Callable[[str], None]
    ) -> LoopKey:
        """Send the code of ``plan`` to its remote and start the loop there (the remote is
        a location of this source); its key."""
        link = self._link(plan.remote.name)
        record = await start_remote_loop(link.require_daemon(), plan, options,
                                         on_notice=on_notice)
        link._merge([record])
        return LoopKey(link.name, record.loop_id)

    async def pull_branch(self, key: LoopKey, repo: Path,
                          *, on_notice: Callable[[str], None]) -> tuple[str, str]:
        """Bring the branch of a loop on another machine into the repository holding
        ``repo``; ``(branch, sha)``. Uncommitted work here is never touched."""
        if self.location(key.location).local_files:
            raise UserError(
                f"{key} runs on this machine: its commits are already in its repository; "
                "nothing to pull", code=ErrorCode.BAD_STATE)
        return await pull_remote_loop(self.daemon(key.location), repo, key.loop_id,
                                      on_notice=on_notice)
