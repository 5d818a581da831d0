"""A numbered event log: one JSON object per line, each with its own ``seq`` (0, 1, 2, …).

A loop's ``events.ndjson`` is one (DESIGN §4); ralphd's log of daemon events can be another.

Invariants:
- One writer per file, enforced with an exclusive lock; any number of readers in any process.
- Seqs are consecutive from 0 and strictly increasing down the file; a reopened writer carries on
  from the last one.
- A line is written whole with one ``write``. A last line without its newline is a torn write
  from a crash: readers skip it and the next writer cuts it off. A complete line that is not an
  event is logged and skipped, never fatal.
- Readers keep only an index (seq → byte offset), never the events themselves.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ralph_uv.errors import ErrorCode, InternalError, RalphError, UserError

__all__ = [
    "Event",
    "EventCursor",
    "EventLog",
    "EventType",
    "JournalError",
    "Listener",
    "Listeners",
    "io_error",
    "lock_exclusive",
]

log = logging.getLogger("ralph_uv.eventlog")

Listener = Callable[[], None]


class JournalError(RalphError):
    """The journal's files could not be read or written."""


def io_error(action: str, path: Path, exc: OSError) -> JournalError:
    """Translate an ``OSError`` on a journal file; a full disk gets ``DISK_FULL``."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = ErrorCode.DISK_FULL if full else ErrorCode.INTERNAL_ERROR
    hint = "; free some disk space" if full else ""
    return JournalError(f"cannot {action} {path}: {exc.strerror or exc}{hint}", code=code)


def lock_exclusive(fd: int, path: Path) -> None:
    """Take the writer's lock on ``fd`` or close it and say who holds ``path``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise JournalError(
            f"{path} is already being written by another runner; stop that loop first",
            code=ErrorCode.BAD_STATE,
        ) from exc


class Listeners:
    """Callbacks run after every append; a failing one is logged and never stops the writer."""

    def __init__(self) -> None:
        self._items: list[Listener] = []

    def add(self, listener: Listener) -> Callable[[], None]:
        self._items.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._items.remove(listener)

        return remove

    def fire(self) -> None:
        for listener in tuple(self._items):
            try:
                listener()
            except Exception:
                log.exception("journal listener %r failed", listener)


class EventType(StrEnum):
    """The loop events the runner records (other logs may use their own type names)."""

    STATE_CHANGE = "state_change"
    ITERATION_STARTED = "iteration_started"
    ITERATION_FINISHED = "iteration_finished"
    STORY_PASSED = "story_passed"
    AGENT_FAILOVER = "agent_failover"
    RATE_LIMIT_WAIT = "rate_limit_wait"
    STALLED = "stalled"
    LOOP_FINISHED = "loop_finished"
    PROMPT_INJECTED = "prompt_injected"
    INTERACTIVE_MODE = "interactive_mode"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Event:
    """One numbered event. ``timestamp`` is seconds since the epoch."""

    seq: int
    type: str
    timestamp: float
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The wire and file form: ``{"seq", "type", "timestamp", "data"}``."""
        return {"seq": self.seq, "type": self.type, "timestamp": self.timestamp, "data": self.data}

    @classmethod
    def from_dict(cls, obj: object) -> Event:
        """Parse the form :meth:`to_dict` gives; ``ValueError`` when it is not one."""
        if not isinstance(obj, dict):
            raise ValueError("an event must be a JSON object")
        seq, kind, stamp, data = (
            obj.get("seq"),
            obj.get("type"),
            obj.get("timestamp"),
            obj.get("data", {}),
        )
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"bad event seq {seq!r}")
        if not isinstance(kind, str) or not isinstance(data, dict):
            raise ValueError("an event needs a string type and an object data")
        if not isinstance(stamp, int | float) or isinstance(stamp, bool):
            raise ValueError(f"bad event timestamp {stamp!r}")
        return cls(seq, kind, float(stamp), data)


def _parse_line(line: bytes) -> Event | None:
    try:
        return Event.from_dict(json.loads(line))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


class EventLog:
    """An NDJSON file of numbered events (``seq`` 0, 1, 2, …), written by one process and read
    by any. Readers keep a small index (seq → file offset), never the events themselves."""

    def __init__(
        self, path: Path, *, read_only: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.read_only = read_only
        self._clock = clock
        self._seqs: list[int] = []
        self._offsets: list[int] = []
        self._scanned = 0  # the file is indexed up to here, always just after a newline
        self._fd = -1
        self._lock = threading.Lock()
        self._listeners = Listeners()
        if not read_only:
            self._open_writer()

    def _open_writer(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error("open", self.path, exc) from exc
        lock_exclusive(fd, self.path)
        self._fd = fd
        self._scan()
        try:
            size = os.fstat(fd).st_size
            if size > self._scanned:
                log.warning(
                    "%s: dropping a torn last line (%d bytes)", self.path, size - self._scanned
                )
                os.ftruncate(fd, self._scanned)
        except OSError as exc:
            raise io_error("repair", self.path, exc) from exc

    def _scan(self) -> None:
        """Index the complete lines written since the last scan."""
        try:
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < self._scanned:  # replaced or cut below what we indexed: start over
                    self._seqs, self._offsets, self._scanned = [], [], 0
                if size == self._scanned:
                    return
                file.seek(self._scanned)
                chunk = file.read(size - self._scanned)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise io_error("read", self.path, exc) from exc
        complete = chunk.rfind(b"\n") + 1
        offset = self._scanned
        for line in chunk[:complete].splitlines(keepends=True):
            event = _parse_line(line)
            if event is None or (self._seqs and event.seq <= self._seqs[-1]):
                log.warning("%s: skipping a bad event line at byte %d", self.path, offset)
            else:
                self._seqs.append(event.seq)
                self._offsets.append(offset)
            offset += len(line)
        self._scanned += complete

    @property
    def next_seq(self) -> int:
        """The seq the next event will get (for a reader: as of its last read)."""
        return self._seqs[-1] + 1 if self._seqs else 0

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every append in this process; returns its remover."""
        return self._listeners.add(listener)

    def append(self, type: str, data: Mapping[str, Any] | None = None) -> Event:
        """Record an event now and return it with its seq."""
        if self.read_only or self._fd < 0:
            raise InternalError(f"{self.path} is not open for writing")
        with self._lock:
            event = Event(self.next_seq, str(type), self._clock(), dict(data or {}))
            try:
                line = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise InternalError(f"event {type} has data that is not JSON: {exc}") from exc
            encoded = line.encode("utf-8") + b"\n"
            try:
                written = os.write(self._fd, encoded)
            except OSError as exc:
                raise io_error("write to", self.path, exc) from exc
            if written != len(encoded):
                raise JournalError(
                    f"{self.path}: short write of an event", code=ErrorCode.DISK_FULL
                )
            self._seqs.append(event.seq)
            self._offsets.append(self._scanned)
            self._scanned += written
        self._listeners.fire()
        return event

    def read(self, since: int = 0, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events with ``seq >= since``, oldest first."""
        if since < 0 or limit <= 0:
            raise UserError(f"read events with since >= 0 and limit > 0 (got {since}, {limit})")
        with self._lock:
            if self.read_only:
                self._scan()
            first = bisect.bisect_left(self._seqs, since)
            if first >= len(self._seqs):
                return []
            last = min(first + limit, len(self._seqs))
            begin = self._offsets[first]
            stop = self._offsets[last] if last < len(self._offsets) else self._scanned
        try:
            with open(self.path, "rb") as file:
                file.seek(begin)
                chunk = file.read(stop - begin)
        except OSError as exc:
            raise io_error("read", self.path, exc) from exc
        events = [e for e in map(_parse_line, chunk.splitlines()) if e is not None]
        return [e for e in events if e.seq >= since][:limit]

    def close(self) -> None:
        """Release the file and the writer lock. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventCursor:
    """One subscriber's position in an event log: the seq of the next event it wants."""

    def __init__(self, log: EventLog, since: int | None = None) -> None:
        self.log = log
        self.position = log.next_seq if since is None else since

    def read(self, limit: int = 1000) -> list[Event]:
        """The next events, moving the cursor past them."""
        events = self.log.read(self.position, limit)
        if events:
            self.position = events[-1].seq + 1
        return events
