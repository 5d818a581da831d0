"""Remote loops in the local registry: mirroring, catching up, status across machines, and
finding where a TASK runs.

A loop that runs on a remote has a row of its own in this machine's registry: its loop id is
``<remote>:<remote loop id>``, ``location`` is the remote's name, ``remote_loop_id`` the id the
remote knows it by and ``remote_seen_at`` when its state was last read from there. The row is a
copy: the remote's ralphd is the truth, and every :func:`refresh_remote` brings the copies up to
date.

Catching up: every ralphd keeps a numbered log of daemon events (``loop_started``,
``loop_finished``, ``loop_crashed``, ...). :func:`refresh_remote` asks for the events since the
remote's ``events_cursor`` (``subscribe_events {since}``), reads them up to the end the remote
announced, re-reads the loops they name, and only then moves the cursor. So a loop that ended
while nobody watched is recorded as completed (or failed, stopped, ...) the next time any
command talks to its remote, and no event is skipped however long the client was away.

:func:`gather_remotes` does that for every remote at once, each within a short timeout: a
remote that does not answer is shown with its loops as they were last seen, and how long ago.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ralph_uv.client.daemon import DaemonClient
from ralph_uv.client.remotes import STATUS_TIMEOUT, connect_remote, get_remote, list_remotes
from ralph_uv.config import paths
from ralph_uv.errors import ErrorCode, RalphError, RemoteError, UserError
from ralph_uv.eventlog import Event
from ralph_uv.registry import LOCAL, Registry, RemoteRecord, SessionRecord
from ralph_uv.transports import parse_url

__all__ = [
    "LOOP_EVENTS",
    "LoopTarget",
    "RemoteView",
    "gather_remotes",
    "mirror_id",
    "mirror_records",
    "refresh_remote",
    "resolve_loop",
]

log = logging.getLogger("ralph_uv.client.mirror")

LOOP_EVENTS = frozenset({"loop_started", "loop_adopted", "loop_finished", "loop_crashed",
                         "loop_stop_requested", "loop_checkpoint_requested", "loop_time_limit"})
"""Daemon events about one loop (their data carries ``loop_id``)."""
_CATCH_UP_TIMEOUT = 30.0


def mirror_id(remote: str, remote_loop_id: str) -> str:
    """The local registry's id for a loop running on ``remote``."""
    return f"{remote}:{remote_loop_id}"


def _mirror(remote: RemoteRecord, record: SessionRecord, seen_at: float) -> SessionRecord:
    return dataclasses.replace(
        record,
        loop_id=mirror_id(remote.name, record.loop_id),
        location=remote.name,
        remote_loop_id=record.loop_id,
        remote_seen_at=seen_at,
        transport=parse_url(remote.url).url.partition(":")[0],
        endpoint=remote.url,
        # The pid and socket are the remote machine's: meaningless here.
        pid=None,
        socket_path=None,
    )


def mirror_records(remote: RemoteRecord, records: Iterable[SessionRecord],
                   seen_at: float | None = None) -> list[SessionRecord]:
    """Store copies of ``remote``'s loop records in the local registry; the stored rows."""
    seen_at = time.time() if seen_at is None else seen_at
    stored: list[SessionRecord] = []
    with Registry.open() as registry:
        for record in records:
            if not record.is_local:  # the remote's own mirrors of a third machine: not ours
                continue
            stored.append(registry.upsert(_mirror(remote, record, seen_at)))
    return stored


# -------------------------------------------------------------------------------- refreshing


async def _events_since(daemon: DaemonClient, since: int) -> tuple[list[Event], int]:
    """The remote's daemon events from ``since`` to the end it has now, and that end."""
    received: list[Event] = []
    arrived = asyncio.Event()

    def take(event: Event) -> None:
        received.append(event)
        arrived.set()

    try:
        end = await daemon.subscribe_events(since, take)
    except RemoteError as exc:
        if exc.code != ErrorCode.INVALID_PARAMS or since == 0:
            raise
        # Its event log is younger than our cursor (reinstalled, or its state was wiped):
        # read it all again.
        log.info("%s: events since %d are gone (%s); reading from 0", daemon.endpoint.peer,
                 since, exc.message)
        return await _events_since(daemon, 0)
    async with asyncio.timeout(_CATCH_UP_TIMEOUT):
        while end > since and max((e.seq for e in received), default=-1) < end - 1:
            arrived.clear()
            await arrived.wait()
    return sorted((e for e in received if since <= e.seq < end), key=lambda e: e.seq), end


async def refresh_remote(daemon: DaemonClient, remote: RemoteRecord, *,
                         include_finished: bool = False) -> list[SessionRecord]:
    """Bring the local copies of ``remote``'s loops up to date (see the module docstring);
    the remote's loops as now mirrored: active ones, or every one with ``include_finished``.

    ``daemon`` must be a connection of its own: it is left subscribed to daemon events.
    """
    seen_at = time.time()
    records = {r.loop_id: r for r in await daemon.list_loops(all=include_finished)}
    events, cursor = await _events_since(daemon, remote.events_cursor)
    named = {str(e.data["loop_id"]) for e in events
             if e.type in LOOP_EVENTS and isinstance(e.data.get("loop_id"), str)}
    with Registry.open() as registry:
        stale = {r.remote_loop_id for r in registry.find(location=remote.name, active_only=True)
                 if r.remote_loop_id}
    missing = (named | stale) - records.keys()
    if missing:
        # Ended since we last looked (or never seen here): their final records.
        every = {r.loop_id: r for r in await daemon.list_loops(all=True)}
        records.update({loop_id: every[loop_id] for loop_id in missing if loop_id in every})
        lost = missing - every.keys()
        if lost:
            log.info("%s: %d mirrored loop(s) unknown there now: %s", remote.name, len(lost),
                     ", ".join(sorted(lost)))
    stored = mirror_records(remote, records.values(), seen_at)
    with Registry.open() as registry:
        version = daemon.info.get("version")
        registry.update_remote(remote.name, events_cursor=cursor, last_seen_at=seen_at,
                               version=version if isinstance(version, str) else remote.version)
    if include_finished:
        return stored
    return [r for r in stored if r.is_active]


# ------------------------------------------------------------------------------------ status


@dataclass(frozen=True, slots=True)
class RemoteView:
    """One remote in ``status``: its loops, fresh when ``reachable``, else as last seen."""

    remote: RemoteRecord
    reachable: bool
    loops: tuple[SessionRecord, ...]
    error: str | None = None

    @property
    def seen_at(self) -> float | None:
        """When this client last heard from the remote."""
        return self.remote.last_seen_at


def _last_known(remote: RemoteRecord, include_finished: bool) -> tuple[SessionRecord, ...]:
    with Registry.open() as registry:
        return tuple(registry.find(location=remote.name, active_only=not include_finished))


async def _view(remote: RemoteRecord, include_finished: bool, timeout: float,  # noqa: ASYNC109
                client: str) -> RemoteView:
    try:
        async with asyncio.timeout(timeout):
            daemon = await connect_remote(remote, client=client)
            try:
                loops = await refresh_remote(daemon, remote, include_finished=include_finished)
            finally:
                await daemon.close()
    except TimeoutError:
        error = f"no answer within {timeout:g} s"
    except RalphError as exc:
        error = exc.message
    else:
        return RemoteView(get_remote(remote.name), True, tuple(loops))
    log.info("remote %s unreachable: %s", remote.name, error)
    return RemoteView(remote, False, _last_known(remote, include_finished), error)


async def gather_remotes(*, include_finished: bool = False, timeout: float = STATUS_TIMEOUT,  # noqa: ASYNC109
                         client: str = "ralph-uv status") -> list[RemoteView]:
    """Every remote's loops, asked in parallel, each within ``timeout`` seconds."""
    remotes = list_remotes()
    if not remotes:
        return []
    return list(await asyncio.gather(
        *(_view(remote, include_finished, timeout, client) for remote in remotes)))


# ----------------------------------------------------------------------------------- resolving


@dataclass(frozen=True, slots=True)
class LoopTarget:
    """Where a TASK argument points: ``remote`` ``None`` is this machine's ralphd; ``loop`` is
    what to ask that ralphd for (a loop id or a task name); ``record`` the registry row it was
    found by (``None``: not in the registry, the ralphd asked will say whether it knows it)."""

    remote: str | None
    loop: str
    record: SessionRecord | None = None


def resolve_loop(task: str, on: str | None = None) -> LoopTarget:
    """Where the loop ``task`` (a loop id, a remote loop id, a mirrored id or a task name)
    runs.

    With ``on``, that remote (``"local"`` means this machine). Otherwise: an exact loop id;
    else, among the loops of that task name, the active ones first, and among them one on
    this machine first; when none is active, the most recently started. A name nobody knows
    goes to this machine's ralphd, which says so.
    """
    if on is not None and on != LOCAL:
        get_remote(on)
    if not paths().registry.exists():
        return LoopTarget(None if on in (None, LOCAL) else on, task)
    with Registry.open() as registry:
        exact = registry.get(task)
        rows = registry.find(task_name=task)
        every = registry.find() if exact is None and not rows else []
    if exact is not None and on in (None, exact.location):
        return _target(exact)
    by_remote_id = [r for r in every if r.remote_loop_id == task]
    if on is not None:
        by_remote_id = [r for r in by_remote_id if r.location == on]
        rows = [r for r in rows if r.location == on]
        if not by_remote_id and not rows:
            return LoopTarget(None if on == LOCAL else on, task)
    if by_remote_id:
        return _target(by_remote_id[0])
    if not rows:
        return LoopTarget(None, task)
    active = [r for r in rows if r.is_active]
    chosen = next((r for r in active if r.is_local), active[0]) if active else rows[0]
    return _target(chosen)


def _target(record: SessionRecord) -> LoopTarget:
    if record.is_local:
        return LoopTarget(None, record.loop_id, record)
    if record.remote_loop_id is None:
        raise UserError(f"loop {record.loop_id} on {record.location} has no remote id in the "
                        "registry; run `ralph-uv status --all` to refresh it")
    return LoopTarget(record.location, record.remote_loop_id, record)
