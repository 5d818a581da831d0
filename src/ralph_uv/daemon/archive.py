"""The read-only loop service for a loop whose runner is gone, served by ralphd from its files.

``connect_loop`` on a finished (or crashed) loop lands here: the client speaks the same per-loop
protocol as to a runner, so ``ralph-uv logs`` and ``attach`` work on old loops too. Status comes
from the registry row, output and events from the loop's journal (opened read-only), and
``subscribe`` replays through the runner's own :class:`~ralph_uv.runner.subscription.Subscription`
cursors, ending with the loop's ``loop_finished`` event. Methods that would change the loop are
refused with ``BAD_STATE``; ``stop`` and ``checkpoint`` answer as a runner does for an ended
loop (nothing to do).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from dataclasses import dataclass
from typing import Any, Literal

from ralph_uv import __version__
from ralph_uv.config import Paths
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.journal import LoopJournal
from ralph_uv.protocol import Dispatcher
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.runner.service import MAX_OUTPUT_READ, PROTOCOL_VERSION, SERVER_NAME
from ralph_uv.runner.subscription import EventEndpoint, Subscription
from ralph_uv.transports.base import Stream

__all__ = ["ArchiveConnection", "serve_archive"]

log = logging.getLogger("ralph_uv.daemon.archive")

_DEFAULT_OUTPUT_READ = 64 * 1024
_READ_ONLY_METHODS = ("resume", "inject_prompt", "set_interactive_mode", "write_pty")


class ArchiveConnection:
    """One client reading an ended loop."""

    def __init__(self, record: SessionRecord, registry: Registry, journal: LoopJournal) -> None:
        self.record = record
        self.registry = registry
        self.journal = journal
        self.subscriptions: dict[str, Subscription] = {}
        self._next = 1
        self.endpoint: EventEndpoint | None = None

    def current(self) -> SessionRecord:
        """The loop's row as it is now."""
        self.record = self.registry.get(self.record.loop_id) or self.record
        return self.record

    def new_id(self) -> str:
        sid = f"archive.{self._next}"
        self._next += 1
        return sid

    def forget(self, subscription: Subscription) -> None:
        self.subscriptions.pop(subscription.id, None)

    async def end_subscriptions(self, which: list[str] | None = None) -> list[str]:
        ids = list(self.subscriptions) if which is None else which
        ended = [self.subscriptions.pop(sid) for sid in ids if sid in self.subscriptions]
        await asyncio.gather(*(sub.cancel() for sub in ended))
        return [sub.id for sub in ended]


_methods: Dispatcher[ArchiveConnection] = Dispatcher()


@dataclass(frozen=True, slots=True)
class _Hello:
    protocol: str
    client: str = ""
    token: str | None = None


@dataclass(frozen=True, slots=True)
class _Since:
    output: int | None = None
    events: int | None = None


@dataclass(frozen=True, slots=True)
class _Subscribe:
    streams: list[Literal["output", "events"]] | None = None
    since: _Since | None = None


@dataclass(frozen=True, slots=True)
class _Unsubscribe:
    subscription: str | None = None


@dataclass(frozen=True, slots=True)
class _GetOutput:
    since: int
    limit: int = _DEFAULT_OUTPUT_READ

    def __post_init__(self) -> None:
        if self.since < 0:
            raise ValueError("since must be an output offset >= 0")
        if not 1 <= self.limit <= MAX_OUTPUT_READ:
            raise ValueError(f"limit must be between 1 and {MAX_OUTPUT_READ} bytes")


@_methods.method("hello", allow_extra=True)
async def _hello(conn: ArchiveConnection, params: _Hello) -> dict[str, Any]:
    if params.protocol.split(".", 1)[0] != PROTOCOL_VERSION.split(".", 1)[0]:
        raise RalphError(
            f"Unsupported protocol {params.protocol!r}: ralphd speaks {PROTOCOL_VERSION}; "
            "use a ralph-uv client of the same major version",
            code=ErrorCode.UNSUPPORTED_PROTOCOL,
        )
    return {
        "protocol": PROTOCOL_VERSION,
        "server": SERVER_NAME,
        "version": __version__,
        "host": socket.gethostname(),
        "capabilities": sorted(_methods.names - set(_READ_ONLY_METHODS)),
        "loop_id": conn.record.loop_id,
        "archived": True,
    }


@_methods.method("get_status")
async def _get_status(conn: ArchiveConnection) -> dict[str, Any]:
    record = conn.current()
    output = conn.journal.output
    conn.journal.read_events(max(0, conn.journal.events.next_seq), 1)  # refresh the index
    output.read(output.end, 1)  # refresh the end offset
    return {
        "loop_id": record.loop_id,
        "task_name": record.task_name,
        "task_dir": record.task_dir,
        "status": record.status.value,
        "reason": record.reason or "",
        "iteration": record.iteration,
        "max_iterations": record.max_iterations,
        "story": record.current_story,
        "stories_done": record.stories_done,
        "stories_total": record.stories_total,
        "agent": record.agent,
        "backend": record.backend,
        "branch": record.branch or "",
        "interactive": False,
        "interactive_holder": None,
        "output_start": output.start,
        "output_end": output.end,
        "events_next": conn.journal.events.next_seq,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "pid": record.pid,
        "archived": True,
    }


@_methods.method("subscribe")
async def _subscribe(conn: ArchiveConnection, params: _Subscribe) -> dict[str, Any]:
    streams = set(params.streams) if params.streams is not None else {"output", "events"}
    if not streams:
        raise UserError("subscribe to at least one of the streams 'output' and 'events'")
    journal = conn.journal
    journal.output.read(journal.output.end, 1)  # refresh the end offset
    journal.read_events(journal.events.next_seq, 1)
    since = params.since or _Since()
    output_end, events_next = journal.output.end, journal.events.next_seq
    output_since = events_since = None
    if "output" in streams:
        output_since = output_end if since.output is None else since.output
        if not 0 <= output_since <= output_end:
            raise UserError(
                f"since.output {output_since} is outside this loop's output (0..{output_end}); "
                "pass an offset you were given, 0 to replay, or null for nothing"
            )
    if "events" in streams:
        events_since = events_next if since.events is None else since.events
        if not 0 <= events_since <= events_next:
            raise UserError(
                f"since.events {events_since} is outside this loop's events (0..{events_next}); "
                "pass a seq you were given, or 0 to replay"
            )
    assert conn.endpoint is not None
    sid = conn.new_id()
    subscription = Subscription(
        sid, journal, conn.endpoint, output_since=output_since, events_since=events_since,
        on_end=conn.forget,
    )
    conn.subscriptions[sid] = subscription
    # The reply is queued for writing before this callback runs, so it arrives first.
    asyncio.get_running_loop().call_soon(subscription.start)
    return {
        "subscription": sid,
        "output_start": journal.output.start,
        "output_end": output_end,
        "events_next": events_next,
    }


@_methods.method("unsubscribe")
async def _unsubscribe(conn: ArchiveConnection, params: _Unsubscribe) -> dict[str, Any]:
    if params.subscription is not None and params.subscription not in conn.subscriptions:
        raise UserError(f"no subscription {params.subscription!r} on this connection")
    which = None if params.subscription is None else [params.subscription]
    return {"unsubscribed": await conn.end_subscriptions(which)}


@_methods.method("get_output")
async def _get_output(conn: ArchiveConnection, params: _GetOutput) -> dict[str, Any]:
    result = conn.journal.read_output(params.since, params.limit)
    return {
        "data": base64.b64encode(result.data).decode("ascii"),
        "start": result.start,
        "next": result.next,
        "end": result.end,
        "gap": None if result.gap is None else {"from": result.gap[0], "to": result.gap[1]},
    }


@_methods.method("stop", allow_extra=True)
async def _stop(conn: ArchiveConnection, params: Any) -> dict[str, Any]:
    when = params.get("when", "after_iteration") if isinstance(params, dict) else None
    return {"status": conn.current().status.value, "when": when}


@_methods.method("checkpoint")
async def _checkpoint(conn: ArchiveConnection) -> dict[str, Any]:
    return {"status": conn.current().status.value}


@_methods.method("resize", allow_extra=True)
async def _resize(conn: ArchiveConnection, params: Any) -> dict[str, Any]:
    return {"applied": False}


def _refuse(action: str) -> Any:
    async def refuse(conn: ArchiveConnection, params: Any) -> dict[str, Any]:
        record = conn.current()
        raise RalphError(
            f"cannot {action}: loop {record.loop_id} has ended ({record.status.value}) and its "
            "runner is gone; start a new loop to go on",
            code=ErrorCode.BAD_STATE,
        )

    return refuse


for _name in _READ_ONLY_METHODS:
    _methods.add(_name, _refuse(_name.replace("_", " ")), allow_extra=True)


async def serve_archive(
    stream: Stream,
    record: SessionRecord,
    dirs: Paths,
    registry: Registry,
    *,
    max_message_size: int,
    slow_peer_timeout: float | None,
) -> None:
    """Serve ``record``'s loop read-only on ``stream`` until the client leaves."""
    journal = LoopJournal(dirs.loop_dir(record.loop_id), retention=None, read_only=True)
    conn = ArchiveConnection(record, registry, journal)
    endpoint = EventEndpoint(
        stream, _methods, context=conn, max_message_size=max_message_size,
        max_concurrent_requests=8, slow_peer_timeout=slow_peer_timeout,
    )
    conn.endpoint = endpoint
    log.debug("serving the archive of %s to %s", record.loop_id, stream.peer)
    try:
        await endpoint.run()
    finally:
        await conn.end_subscriptions()
        journal.close()
