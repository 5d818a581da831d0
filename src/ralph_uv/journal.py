"""The loop journal: every byte of agent output and every loop event, on disk (DESIGN §4).

Layout in a loop's folder (``paths().loop_dir(loop_id)``)::

    output.journal/                   agent output, in segments named by their first offset
        00000000000000000000.seg
        00000000000033554432.seg
    events.ndjson                     one JSON event per line

Invariants:
- A byte's sequence number is its absolute offset since the loop began. It never changes, however
  much retention has dropped.
- Segments are append-only and only the newest one grows. Retention deletes whole old segments,
  so dropping data is one unlink, and at least the last ``retention`` bytes always remain.
- A reader asking for bytes that are gone gets an explicit ``gap``, never other bytes.
- One writer per journal, enforced with an exclusive lock; any number of readers in any process.
  Writes go straight to the OS (no user-space buffer), so readers elsewhere see them at once.
- Events live in :mod:`ralph_uv.eventlog` (re-exported here); this module adds the output.
- Nothing here uses asyncio except :class:`Wakeup` and :func:`follow_output`, the optional glue
  for subscribers that are coroutines.
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_uv.config import paths
from ralph_uv.errors import InternalError, UserError
from ralph_uv.eventlog import (
    Event,
    EventCursor,
    EventLog,
    EventType,
    JournalError,
    Listener,
    Listeners,
    io_error,
    lock_exclusive,
)

__all__ = [
    "DEFAULT_READ_LIMIT",
    "DEFAULT_RETENTION",
    "EVENTS_FILE",
    "OUTPUT_DIR",
    "Event",
    "EventCursor",
    "EventLog",
    "EventType",
    "JournalError",
    "LoopJournal",
    "OutputCursor",
    "OutputJournal",
    "ReadResult",
    "TextDecoder",
    "Wakeup",
    "follow_output",
    "output_text",
]

log = logging.getLogger("ralph_uv.journal")

DEFAULT_RETENTION = 256 * 1024 * 1024
DEFAULT_READ_LIMIT = 1024 * 1024
MAX_SEGMENT_SIZE = 32 * 1024 * 1024
OUTPUT_DIR = "output.journal"
EVENTS_FILE = "events.ndjson"
_SUFFIX = ".seg"
_DIGITS = 20
_LOCK_NAME = ".writer.lock"


# --------------------------------------------------------------------------------------- output


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Bytes ``[start, next)`` of the output. ``gap`` is the range the reader asked for that
    retention (or a lost write) has dropped; it always lies just before ``start``. ``end`` is
    the journal's end when the read was made: ``next == end`` means the reader is caught up."""

    data: bytes
    start: int
    next: int
    gap: tuple[int, int] | None = None
    end: int = 0


@dataclass(frozen=True, slots=True)
class _Segment:
    base: int
    path: Path


def _segment_path(directory: Path, base: int) -> Path:
    return directory / f"{base:0{_DIGITS}d}{_SUFFIX}"


def _list_segments(directory: Path) -> tuple[_Segment, ...]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise io_error("list", directory, exc) from exc
    found = []
    for name in names:
        stem = name[: -len(_SUFFIX)]
        if name.endswith(_SUFFIX) and len(stem) == _DIGITS and stem.isdigit():
            found.append(_Segment(int(stem), directory / name))
    return tuple(sorted(found, key=lambda s: s.base))


class OutputJournal:
    """The agent's output as one append-only byte stream, kept in segment files.

    Open it for writing in the runner (``read_only=False``, the default; one writer at a time)
    and read-only anywhere else. Both can :meth:`read` from any offset.
    """

    def __init__(
        self,
        directory: Path,
        *,
        retention: int | None = DEFAULT_RETENTION,
        segment_size: int | None = None,
        read_only: bool = False,
    ) -> None:
        if retention is not None and retention <= 0:
            raise UserError(
                f"journal retention must be a positive number of bytes, not {retention}"
            )
        if segment_size is None:
            segment_size = MAX_SEGMENT_SIZE if retention is None else retention // 8
        self.directory = directory
        self.retention = retention
        self.segment_size = max(1, min(segment_size, MAX_SEGMENT_SIZE))
        self.read_only = read_only
        self._segments: tuple[_Segment, ...] = ()
        self._end = 0
        self._fd = -1
        self._lock_fd = -1
        self._lock = threading.Lock()
        self._listeners = Listeners()
        if read_only:
            self._refresh()
        else:
            self._open_writer()

    def _open_writer(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_path = self.directory / _LOCK_NAME
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error("create", self.directory, exc) from exc
        lock_exclusive(self._lock_fd, self.directory)
        self._segments = _list_segments(self.directory)
        if not self._segments:
            self._start_segment(0)
            return
        last = self._segments[-1]
        try:
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._end = last.base + os.fstat(self._fd).st_size
        except OSError as exc:
            raise io_error("open", last.path, exc) from exc
        self._prune()

    def _refresh(self) -> None:
        """Re-read the segment list and the end offset from disk (read-only journals)."""
        for _ in range(5):
            segments = _list_segments(self.directory)
            if not segments:
                self._segments = ()
                return
            try:
                size = os.stat(segments[-1].path).st_size
            except FileNotFoundError:
                continue  # the folder was cleaned meanwhile; look again
            except OSError as exc:
                raise io_error("read", segments[-1].path, exc) from exc
            self._segments = segments
            self._end = max(self._end, segments[-1].base + size)
            return
        self._segments = ()

    @property
    def end(self) -> int:
        """The offset the next appended byte will get (for a reader: as of its last read)."""
        return self._end

    @property
    def start(self) -> int:
        """The oldest offset still kept."""
        segments = self._segments
        return segments[0].base if segments else self._end

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every append in this process; returns its remover."""
        return self._listeners.add(listener)

    def append(self, data: bytes) -> int:
        """Append ``data`` and return the offset of its first byte."""
        if self.read_only or self._fd < 0:
            raise InternalError(f"{self.directory} is not open for writing")
        with self._lock:
            start = self._end
            if not data:
                return start
            written = 0
            try:
                written = os.write(self._fd, data)
                if written < len(data):
                    view = memoryview(data)
                    while written < len(data):
                        written += os.write(self._fd, view[written:])
            except OSError as exc:
                raise io_error("write to", self._segments[-1].path, exc) from exc
            finally:
                self._end = start + written
            if self._end - self._segments[-1].base >= self.segment_size:
                self._roll()
        self._listeners.fire()
        return start

    def _start_segment(self, base: int) -> None:
        path = _segment_path(self.directory, base)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise io_error("create", path, exc) from exc
        self._segments = (*self._segments, _Segment(base, path))

    def _roll(self) -> None:
        os.close(self._fd)
        self._fd = -1
        self._start_segment(self._end)
        self._prune()

    def _prune(self) -> None:
        if self.retention is None:
            return
        while len(self._segments) > 1 and self._end - self._segments[1].base >= self.retention:
            oldest = self._segments[0]
            # Publish the shorter list before unlinking, so readers never pick a removed file.
            self._segments = self._segments[1:]
            try:
                oldest.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove old output segment %s: %s", oldest.path, exc)

    def read(self, since: int, limit: int = DEFAULT_READ_LIMIT) -> ReadResult:
        """Up to ``limit`` bytes from offset ``since``.

        Bytes that retention dropped are reported as ``gap`` and skipped; reading past the end
        returns no data. An offset beyond the end is an error: the reader's cursor is not from
        this journal.
        """
        if since < 0 or limit <= 0:
            raise UserError(f"read the output with since >= 0 and limit > 0 (got {since}, {limit})")
        for _ in range(5):
            if self.read_only:
                self._refresh()
            segments, end = self._segments, self._end
            if since > end:
                raise UserError(
                    f"output offset {since} is beyond the end of the journal ({end}); "
                    "read again from an offset you were given"
                )
            try:
                return _read_segments(segments, end, since, limit)
            except FileNotFoundError:
                continue  # retention removed a segment while we read; the next list is newer
            except OSError as exc:
                raise io_error("read", self.directory, exc) from exc
        raise JournalError(f"{self.directory}: segments keep disappearing while being read")

    def sync(self) -> None:
        """Make what was appended durable (``fsync``); appends themselves never wait for disk."""
        if self._fd >= 0:
            with self._lock:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise io_error("sync", self.directory, exc) from exc

    def close(self) -> None:
        """Release the file and the writer lock. Idempotent."""
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    def __enter__(self) -> OutputJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_segments(segments: tuple[_Segment, ...], end: int, since: int, limit: int) -> ReadResult:
    pos = since
    gap: tuple[int, int] | None = None
    first = segments[0].base if segments else end
    if pos < first:
        gap, pos = (pos, first), first
    start = pos
    chunks: list[bytes] = []
    remaining = limit
    index = bisect.bisect_right(segments, pos, key=lambda s: s.base) - 1
    while remaining > 0 and pos < end and 0 <= index < len(segments):
        segment = segments[index]
        stop = segments[index + 1].base if index + 1 < len(segments) else end
        data = b""
        if pos < stop:
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, min(remaining, stop - pos), pos - segment.base)
            finally:
                os.close(fd)
        if not data:
            if chunks or index + 1 >= len(segments):
                break
            # The segment is shorter than its neighbours say (a write lost in a crash).
            gap = (gap[0] if gap else pos, stop)
            start = pos = stop
            index += 1
            continue
        chunks.append(data)
        pos += len(data)
        remaining -= len(data)
        if pos >= stop:
            index += 1
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return ReadResult(data, start, start + len(data), gap, end)


class OutputCursor:
    """One subscriber's position in the output. Reading advances it; nothing is buffered, so a
    slow subscriber only falls behind on its own cursor."""

    def __init__(self, journal: OutputJournal, since: int | None = None) -> None:
        self.journal = journal
        self.position = journal.end if since is None else since

    def read(self, limit: int = DEFAULT_READ_LIMIT) -> ReadResult:
        """The next bytes (possibly after a gap), moving the cursor past them."""
        result = self.journal.read(self.position, limit)
        self.position = result.next
        return result

    @property
    def lag(self) -> int:
        """Bytes appended that this cursor has not read yet."""
        return max(0, self.journal.end - self.position)


# ----------------------------------------------------------------------------------- the facade


class LoopJournal:
    """A loop's output journal and event log together, in its folder."""

    def __init__(
        self,
        loop_dir: Path,
        *,
        retention: int | None = DEFAULT_RETENTION,
        segment_size: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.loop_dir = loop_dir
        self.output = OutputJournal(
            loop_dir / OUTPUT_DIR,
            retention=retention,
            segment_size=segment_size,
            read_only=read_only,
        )
        try:
            self.events = EventLog(loop_dir / EVENTS_FILE, read_only=read_only)
        except BaseException:
            self.output.close()
            raise

    @classmethod
    def for_loop(
        cls, loop_id: str, *, retention: int | None = DEFAULT_RETENTION, read_only: bool = False
    ) -> LoopJournal:
        """The journal of ``loop_id`` in this machine's state folder."""
        return cls(paths().loop_dir(loop_id), retention=retention, read_only=read_only)

    def append_output(self, data: bytes) -> int:
        """See :meth:`OutputJournal.append`."""
        return self.output.append(data)

    def append_event(self, type: str, data: Mapping[str, Any] | None = None) -> Event:
        """See :meth:`EventLog.append`."""
        return self.events.append(type, data)

    def read_output(self, since: int, limit: int = DEFAULT_READ_LIMIT) -> ReadResult:
        """See :meth:`OutputJournal.read`."""
        return self.output.read(since, limit)

    def read_events(self, since: int = 0, limit: int = 1000) -> list[Event]:
        """See :meth:`EventLog.read`."""
        return self.events.read(since, limit)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener()`` after every output or event append; returns its remover."""
        removers = (self.output.add_listener(listener), self.events.add_listener(listener))

        def remove() -> None:
            for remover in removers:
                remover()

        return remove

    def sync(self) -> None:
        """``fsync`` the output (event lines are small and written whole)."""
        self.output.sync()

    def close(self) -> None:
        self.output.close()
        self.events.close()

    def __enter__(self) -> LoopJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- async and text


class Wakeup:
    """A flag a coroutine can sleep on until a journal is appended to.

    Register :meth:`notify` with ``add_listener``; a subscriber then loops "read its cursor until
    caught up, ``await wakeup.wait()``". No append is missed: :meth:`notify` sets a flag that the
    next :meth:`wait` consumes. Safe to notify from another thread.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def notify(self) -> None:
        """Wake the waiter (now, or at its next :meth:`wait`)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self._loop.call_soon_threadsafe(self._event.set)
        else:
            self._event.set()

    async def wait(self) -> None:
        """Return once notified, clearing the flag. Bound it with ``asyncio.timeout``."""
        self._loop = asyncio.get_running_loop()
        await self._event.wait()
        self._event.clear()


async def follow_output(
    journal: OutputJournal,
    since: int,
    *,
    limit: int = DEFAULT_READ_LIMIT,
    poll_interval: float = 0.25,
) -> AsyncIterator[ReadResult]:
    """Yield the output from ``since`` on, forever (the caller stops iterating).

    Appends in this process wake it at once; appends by another process are picked up within
    ``poll_interval`` seconds.
    """
    wakeup = Wakeup()
    remove = journal.add_listener(wakeup.notify)
    try:
        cursor = OutputCursor(journal, since)
        while True:
            result = cursor.read(limit)
            if result.data or result.gap:
                yield result
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await wakeup.wait()
    finally:
        remove()


def output_text(data: bytes) -> str:
    """Output bytes as text for ``ralph-uv logs``: UTF-8, undecodable bytes replaced."""
    return data.decode("utf-8", errors="replace")


class TextDecoder:
    """Incremental form of :func:`output_text`: a character split across two reads decodes
    whole. Call :meth:`reset` after a gap."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)

    def reset(self) -> None:
        self._decoder.reset()
