"""Watching a loop: the per-loop methods that read its journal, for a live loop and an ended one.

A runner serves its loop's journal while it writes it (:mod:`ralph_uv.runner.service`); ralphd
serves the journal of a loop whose runner is gone, read-only (:mod:`ralph_uv.daemon.archive`).
Both speak the same protocol, so a client reads either the same way: ``subscribe``,
``unsubscribe`` and ``get_output`` are defined here once, on :class:`Watcher`, the connection
state both servers build on; ``hello`` and ``get_status`` replies take their shape from
:func:`hello_reply` and :func:`status_reply`.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from ralph_uv import __version__
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.journal import LoopJournal
from ralph_uv.protocol import Dispatcher
from ralph_uv.runner.subscription import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COALESCE,
    ChunkCache,
    EventEndpoint,
    Subscription,
)
from ralph_uv.status import LoopStatus
from ralph_uv.transports.base import Stream

__all__ = [
    "MAX_OUTPUT_READ",
    "PROTOCOL_VERSION",
    "SERVER_NAME",
    "Hello",
    "Watcher",
    "add_watch_methods",
    "check_protocol",
    "hello_reply",
    "status_reply",
]

PROTOCOL_VERSION = "1.0"
SERVER_NAME = "ralph-uv-runner"
MAX_OUTPUT_READ = 1024 * 1024  # raw bytes per get_output: 1.4 MB of base64, well under 4 MiB
_DEFAULT_OUTPUT_READ = 64 * 1024

W = TypeVar("W", bound="Watcher")


class Watcher:
    """One client connection reading a loop's journal: its endpoint and its subscriptions.

    Subclasses say how subscription ids look (:meth:`new_subscription_id`), and may bring the
    journal up to date before it is read (:meth:`refresh`) and word the ``since`` hints for
    their kind of loop.
    """

    #: The end of the error for a ``since.output`` outside the journal.
    output_since_hint: ClassVar[str] = (
        "pass an offset you were given, 0 to replay, or null for live output only"
    )
    #: The end of the error for a ``since.events`` outside the journal.
    events_since_hint: ClassVar[str] = (
        "pass a seq you were given, 0 to replay, or null for new events only"
    )
    #: Whether the error for an unknown subscription lists this connection's own.
    lists_subscriptions: ClassVar[bool] = True

    def __init__(
        self,
        stream: Stream,
        methods: Dispatcher[Any],
        journal: LoopJournal,
        *,
        max_message_size: int,
        max_concurrent_requests: int,
        slow_peer_timeout: float | None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        coalesce: float = DEFAULT_COALESCE,
        chunks: ChunkCache | None = None,
    ) -> None:
        self.journal = journal
        self.subscriptions: dict[str, Subscription] = {}
        self.chunk_size = chunk_size
        self.coalesce = coalesce
        self.chunks = chunks
        self.endpoint = EventEndpoint(
            stream,
            methods,
            context=self,
            max_message_size=max_message_size,
            max_concurrent_requests=max_concurrent_requests,
            slow_peer_timeout=slow_peer_timeout,
        )

    def new_subscription_id(self) -> str:
        """A subscription id unique where this connection is served."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Bring the journal's ends up to date before they are read (the writer's are)."""

    def forget(self, subscription: Subscription) -> None:
        """Drop a subscription whose task has ended."""
        self.subscriptions.pop(subscription.id, None)

    async def end_subscriptions(self, which: list[str] | None = None) -> list[str]:
        """End the given subscriptions (all when ``None``); return the ids that were ended."""
        ids = list(self.subscriptions) if which is None else which
        ended = [self.subscriptions.pop(sid) for sid in ids if sid in self.subscriptions]
        await asyncio.gather(*(sub.cancel() for sub in ended))
        return [sub.id for sub in ended]


def check_protocol(requested: str, speaker: str) -> None:
    """Refuse (``UNSUPPORTED_PROTOCOL``) a client whose major protocol version is not ours."""
    if requested.split(".", 1)[0] != PROTOCOL_VERSION.split(".", 1)[0]:
        raise RalphError(
            f"Unsupported protocol {requested!r}: {speaker} speaks {PROTOCOL_VERSION}; "
            "use a ralph-uv client of the same major version",
            code=ErrorCode.UNSUPPORTED_PROTOCOL,
        )


def hello_reply(loop_id: str, capabilities: frozenset[str] | set[str]) -> dict[str, Any]:
    """The ``hello`` reply for ``loop_id``, offering the methods in ``capabilities``."""
    return {
        "protocol": PROTOCOL_VERSION,
        "server": SERVER_NAME,
        "version": __version__,
        "host": socket.gethostname(),
        "capabilities": sorted(capabilities),
        "loop_id": loop_id,
    }


def status_reply(
    journal: LoopJournal,
    *,
    loop_id: str,
    task_name: str,
    task_dir: str,
    status: LoopStatus,
    reason: str,
    iteration: int,
    max_iterations: int,
    story: str | None,
    stories_done: int,
    stories_total: int,
    agent: str,
    backend: str,
    branch: str,
    interactive: bool,
    interactive_holder: str | None,
    started_at: float,
    **extra: Any,
) -> dict[str, Any]:
    """The ``get_status`` reply: the loop's fields, where its journal stands, then ``extra``."""
    return {
        "loop_id": loop_id,
        "task_name": task_name,
        "task_dir": task_dir,
        "status": status.value,
        "reason": reason,
        "iteration": iteration,
        "max_iterations": max_iterations,
        "story": story,
        "stories_done": stories_done,
        "stories_total": stories_total,
        "agent": agent,
        "backend": backend,
        "branch": branch,
        "interactive": interactive,
        "interactive_holder": interactive_holder,
        "output_start": journal.output.start,
        "output_end": journal.output.end,
        "events_next": journal.events.next_seq,
        "started_at": started_at,
        **extra,
    }


@dataclass(frozen=True, slots=True)
class Hello:
    """``hello``'s params."""

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


def add_watch_methods(methods: Dispatcher[W]) -> None:
    """Register ``subscribe``, ``unsubscribe`` and ``get_output`` on ``methods``."""
    methods.add("subscribe", _subscribe)
    methods.add("unsubscribe", _unsubscribe)
    methods.add("get_output", _get_output)


async def _subscribe(conn: Watcher, params: _Subscribe) -> dict[str, Any]:
    streams = set(params.streams) if params.streams is not None else {"output", "events"}
    if not streams:
        raise UserError("subscribe to at least one of the streams 'output' and 'events'")
    conn.refresh()
    journal = conn.journal
    since = params.since or _Since()
    output_end, events_next = journal.output.end, journal.events.next_seq
    output_since = events_since = None
    if "output" in streams:
        output_since = output_end if since.output is None else since.output
        if not 0 <= output_since <= output_end:
            raise UserError(
                f"since.output {output_since} is outside this loop's output (0..{output_end}); "
                + conn.output_since_hint
            )
    if "events" in streams:
        events_since = events_next if since.events is None else since.events
        if not 0 <= events_since <= events_next:
            raise UserError(
                f"since.events {events_since} is outside this loop's events (0..{events_next}); "
                + conn.events_since_hint
            )
    sid = conn.new_subscription_id()
    subscription = Subscription(
        sid,
        journal,
        conn.endpoint,
        output_since=output_since,
        events_since=events_since,
        chunk_size=conn.chunk_size,
        coalesce=conn.coalesce,
        cache=conn.chunks,
        on_end=conn.forget,
    )
    conn.subscriptions[sid] = subscription
    # Sending starts once this reply is on its way: the reply goes through the write queue
    # first, so the client learns the subscription id before its first event.
    asyncio.get_running_loop().call_soon(subscription.start)
    return {
        "subscription": sid,
        "output_start": journal.output.start,
        "output_end": output_end,
        "events_next": events_next,
    }


async def _unsubscribe(conn: Watcher, params: _Unsubscribe) -> dict[str, Any]:
    if params.subscription is not None and params.subscription not in conn.subscriptions:
        message = f"no subscription {params.subscription!r} on this connection"
        if conn.lists_subscriptions:
            message += f"; yours are: {', '.join(conn.subscriptions) or 'none'}"
        raise UserError(message)
    which = None if params.subscription is None else [params.subscription]
    return {"unsubscribed": await conn.end_subscriptions(which)}


async def _get_output(conn: Watcher, params: _GetOutput) -> dict[str, Any]:
    result = conn.journal.read_output(params.since, params.limit)
    return {
        "data": base64.b64encode(result.data).decode("ascii"),
        "start": result.start,
        "next": result.next,
        "end": result.end,
        "gap": None if result.gap is None else {"from": result.gap[0], "to": result.gap[1]},
    }
