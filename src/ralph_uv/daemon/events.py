"""ralphd's daemon events: a persistent, numbered log of what happened to this machine's loops.

The log is ``<state>/daemon/events.ndjson``, an :class:`~ralph_uv.eventlog.EventLog`: seqs are
consecutive from 0 and survive restarts of ralphd, so a client (or another machine mirroring
this one) resumes with ``subscribe_events {since: <last seq + 1>}`` and misses nothing.

Subscribers are cursors over the file: a slow one only falls behind, and memory stays bounded.
Only ralphd writes the log, so every append wakes the subscribers in the same process; no
polling happens while nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from ralph_uv.config import Paths
from ralph_uv.eventlog import Event, EventCursor, EventLog
from ralph_uv.journal import Wakeup

__all__ = ["EVENTS_FILE", "DaemonEventType", "DaemonEvents", "daemon_dir"]

log = logging.getLogger("ralph_uv.daemon.events")

EVENTS_FILE = "events.ndjson"
_BATCH = 256


class DaemonEventType(StrEnum):
    """The daemon events ralphd records (each carries ``loop_id`` when about one loop)."""

    DAEMON_STARTED = "daemon_started"
    DAEMON_STOPPED = "daemon_stopped"
    LOOP_STARTED = "loop_started"
    LOOP_ADOPTED = "loop_adopted"
    LOOP_FINISHED = "loop_finished"
    LOOP_CRASHED = "loop_crashed"
    LOOP_STOP_REQUESTED = "loop_stop_requested"
    LOOP_CHECKPOINT_REQUESTED = "loop_checkpoint_requested"
    LOOP_TIME_LIMIT = "loop_time_limit"


def daemon_dir(dirs: Paths) -> Path:
    """``<state>/daemon``: ralphd's event log and its own log files."""
    return dirs.state / "daemon"


class DaemonEvents:
    """The daemon event log, open for writing by this ralphd (one writer, enforced by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._log = EventLog(path)

    @property
    def next_seq(self) -> int:
        """The seq the next event will get."""
        return self._log.next_seq

    def publish(self, type: DaemonEventType | str, data: Mapping[str, Any] | None = None) -> Event:
        """Record an event and wake every subscriber."""
        event = self._log.append(str(type), data)
        log.info("event %d %s %s", event.seq, event.type, dict(event.data))
        return event

    def read(self, since: int = 0, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events from ``since`` on, oldest first."""
        return self._log.read(since, limit)

    async def follow(self, since: int | None = None) -> AsyncIterator[Event]:
        """Every event from ``since`` on (``None``: from now), then each new one as it comes,
        for ever; the caller stops iterating."""
        wakeup = Wakeup()
        remove = self._log.add_listener(wakeup.notify)
        try:
            cursor = EventCursor(self._log, since)
            while True:
                events = cursor.read(_BATCH)
                for event in events:
                    yield event
                if len(events) < _BATCH:
                    await wakeup.wait()
        finally:
            remove()

    def close(self) -> None:
        """Release the file and its writer lock."""
        self._log.close()
