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

import logging
from typing import Any

from ralph_uv.config import Paths
from ralph_uv.errors import ErrorCode, RalphError
from ralph_uv.journal import LoopJournal
from ralph_uv.protocol import Dispatcher
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.runner.watch import (
    Hello,
    Watcher,
    add_watch_methods,
    check_protocol,
    hello_reply,
    status_reply,
)
from ralph_uv.transports.base import Stream

__all__ = ["ArchiveConnection", "serve_archive"]

log = logging.getLogger("ralph_uv.daemon.archive")

_MAX_CONCURRENT_REQUESTS = 8
_READ_ONLY_METHODS = ("resume", "inject_prompt", "set_interactive_mode", "write_pty")


class ArchiveConnection(Watcher):
    """One client reading an ended loop."""

    # Nothing is appended to an ended loop, so ``null`` (from now on) brings nothing.
    output_since_hint = "pass an offset you were given, 0 to replay, or null for nothing"
    events_since_hint = "pass a seq you were given, or 0 to replay"
    lists_subscriptions = False

    def __init__(
        self,
        stream: Stream,
        record: SessionRecord,
        registry: Registry,
        journal: LoopJournal,
        *,
        max_message_size: int,
        slow_peer_timeout: float | None,
    ) -> None:
        self.record = record
        self.registry = registry
        self._next = 1
        super().__init__(
            stream,
            _methods,
            journal,
            max_message_size=max_message_size,
            max_concurrent_requests=_MAX_CONCURRENT_REQUESTS,
            slow_peer_timeout=slow_peer_timeout,
        )

    def current(self) -> SessionRecord:
        """The loop's row as it is now."""
        self.record = self.registry.get(self.record.loop_id) or self.record
        return self.record

    def new_subscription_id(self) -> str:
        sid = f"archive.{self._next}"
        self._next += 1
        return sid

    def refresh(self) -> None:
        # A read-only journal learns where the files end by reading there.
        self.journal.output.read(self.journal.output.end, 1)
        self.journal.read_events(self.journal.events.next_seq, 1)


_methods: Dispatcher[ArchiveConnection] = Dispatcher()
add_watch_methods(_methods)


@_methods.method("hello", allow_extra=True)
async def _hello(conn: ArchiveConnection, params: Hello) -> dict[str, Any]:
    check_protocol(params.protocol, "ralphd")
    capabilities = _methods.names - set(_READ_ONLY_METHODS)
    return {**hello_reply(conn.record.loop_id, capabilities), "archived": True}


@_methods.method("get_status")
async def _get_status(conn: ArchiveConnection) -> dict[str, Any]:
    record = conn.current()
    conn.refresh()
    return status_reply(
        conn.journal,
        loop_id=record.loop_id,
        task_name=record.task_name,
        task_dir=record.task_dir,
        status=record.status,
        reason=record.reason or "",
        iteration=record.iteration,
        max_iterations=record.max_iterations,
        story=record.current_story,
        stories_done=record.stories_done,
        stories_total=record.stories_total,
        agent=record.agent,
        backend=record.backend,
        branch=record.branch or "",
        interactive=False,
        interactive_holder=None,
        started_at=record.started_at,
        finished_at=record.finished_at,
        pid=record.pid,
        archived=True,
    )


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
    conn = ArchiveConnection(
        stream, record, registry, journal,
        max_message_size=max_message_size, slow_peer_timeout=slow_peer_timeout,
    )
    log.debug("serving the archive of %s to %s", record.loop_id, stream.peer)
    try:
        await conn.endpoint.run()
    finally:
        await conn.end_subscriptions()
        journal.close()
