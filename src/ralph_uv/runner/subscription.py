"""One subscriber of a loop: a pair of journal cursors and the task that sends what they read.

A subscription holds no copy of the output. Its task reads the journal from its own cursors in
bounded chunks and sends each chunk as an ``event`` notification, waiting on the connection's
write backpressure; when it has caught up it sleeps until the journal wakes it on an append.

Invariants:
- Output is sent in offset order, each byte once; a chunk's ``seq`` is the offset of its first
  byte and ``data.next`` the offset after its last, so a client that reconnects with
  ``since.output = next`` misses nothing and receives nothing twice.
- Bytes that retention dropped before the cursor reached them are announced as one ``gap``
  event ``{from, to}`` just before the bytes that follow it, never skipped silently.
- A loop event is sent once the output written before it has been sent (for a subscriber that
  cannot keep up: after at most ``_EVENT_EVERY`` output chunks), except ``loop_finished``, which
  always waits until the subscriber has every byte.
- Memory per subscriber is one chunk plus the connection's write buffer, however slow it is;
  it never holds up the agent, the journal or another subscriber. The shared
  :class:`ChunkCache` holds a fixed number of encoded chunks.

Two things keep throughput up without costing latency. Output chunks are encoded once for all
the subscribers at the same place (the cache), and written as bytes without a JSON pass over
the base64 text. And a subscriber that has just sent a partial chunk of at least 1 KiB waits
``coalesce`` seconds before its next read, so that fast output leaves in few large messages,
while small writes (a keystroke's echo) go out at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ralph_uv.errors import RalphError, TransportError
from ralph_uv.journal import EventCursor, LoopJournal, OutputCursor, Wakeup
from ralph_uv.rpc import Endpoint

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_COALESCE",
    "ChunkCache",
    "EventEndpoint",
    "Subscription",
    "output_line",
]

log = logging.getLogger("ralph_uv.runner.subscription")

DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_COALESCE = 0.002
_EVENT_BATCH = 64
_EVENT_EVERY = 8  # output chunks between two looks at the events of a subscriber that lags
_LAST_EVENT = "loop_finished"
_CACHED_CHUNKS = 8
_COALESCE_MIN = 1024
_LINE_HEAD = b'{"jsonrpc":"2.0","method":"event","params":{"type":"output","seq":'


def output_line(start: int, data: bytes, timestamp: float) -> bytes:
    """The NDJSON line of an ``output`` event for ``data`` at offset ``start``.

    Built as bytes: base64 text needs no JSON escaping, and skipping the encoder's pass over it
    doubles what one core can send. The result is exactly what the JSON encoder would give.
    """
    return b"".join(
        (
            _LINE_HEAD,
            str(start).encode(),
            b',"timestamp":',
            repr(timestamp).encode(),
            b',"data":{"data":"',
            base64.b64encode(data),
            b'","next":',
            str(start + len(data)).encode(),
            b"}}}\n",
        )
    )


class ChunkCache:
    """The last few encoded output chunks, by ``(start, stop)``, shared by the subscribers of
    one loop: subscribers that keep up read the same ranges, so each is read and encoded once."""

    def __init__(self, size: int = _CACHED_CHUNKS) -> None:
        self._lines: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._size = size

    def get(self, start: int, stop: int) -> bytes | None:
        return self._lines.get((start, stop))

    def put(self, start: int, stop: int, line: bytes) -> None:
        self._lines[(start, stop)] = line
        while len(self._lines) > self._size:
            self._lines.popitem(last=False)


class EventEndpoint(Endpoint):
    """An :class:`~ralph_uv.rpc.Endpoint` that can also send a notification encoded once for
    many connections, through the same write queue and backpressure as every other message."""

    async def send_line(self, line: bytes) -> None:
        """Send one complete NDJSON line (ending in a newline)."""
        await self._write(line)


class Subscription:
    """Sends ``journal``'s output and/or events from the given positions over ``endpoint``.

    ``output_since``/``events_since`` of ``None`` means that stream is not wanted. Call
    :meth:`start`, and :meth:`cancel` (or close the connection) to end it.
    """

    def __init__(
        self,
        subscription_id: str,
        journal: LoopJournal,
        endpoint: EventEndpoint,
        *,
        output_since: int | None,
        events_since: int | None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        coalesce: float = DEFAULT_COALESCE,
        cache: ChunkCache | None = None,
        on_end: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.id = subscription_id
        self._journal = journal
        self._endpoint = endpoint
        self._output = (
            None if output_since is None else OutputCursor(journal.output, output_since)
        )
        self._events = None if events_since is None else EventCursor(journal.events, events_since)
        self._chunk_size = chunk_size
        self._coalesce = coalesce
        self._cache = cache if cache is not None else ChunkCache()
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None
        self._partial = False  # the last output message suggests more output is coming
        self.bytes_sent = 0

    @property
    def output_position(self) -> int | None:
        """The offset of the next output byte this subscriber will be sent."""
        return None if self._output is None else self._output.position

    @property
    def events_position(self) -> int | None:
        """The seq of the next event this subscriber will be sent."""
        return None if self._events is None else self._events.position

    def start(self) -> None:
        """Start sending (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"subscription {self.id}")

    async def cancel(self) -> None:
        """Stop sending and wait until the task has ended."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        wakeup = Wakeup()
        remove = self._journal.add_listener(wakeup.notify)
        try:
            while True:
                if await self._pump():
                    if self._partial and self._coalesce > 0:
                        # Output is flowing: let more of it gather before the next read.
                        await asyncio.sleep(self._coalesce)
                    continue
                await wakeup.wait()
        except TransportError as exc:
            log.debug("subscription %s ended: %s", self.id, exc.message)
        except RalphError as exc:
            # The journal could not be read: tell this subscriber, then stop.
            log.warning("subscription %s failed: %s", self.id, exc.message)
            with contextlib.suppress(RalphError):
                await self._send("error", 0, {"message": f"subscription ended: {exc.message}"})
        finally:
            remove()
            if self._on_end is not None:
                self._on_end(self)

    async def _pump(self) -> bool:
        """Send what the cursors can read now; False when there was nothing."""
        sent = False
        caught_up = True
        self._partial = False
        if self._output is not None:
            for _ in range(_EVENT_EVERY):
                sent_now, caught_up = await self._send_output(self._output)
                sent = sent or sent_now
                if caught_up:
                    break
        if self._events is not None and (caught_up or sent):
            for event in self._events.log.read(self._events.position, _EVENT_BATCH):
                if event.type == _LAST_EVENT and not caught_up:
                    break  # the loop's last event waits for the loop's last bytes
                await self._endpoint.notify("event", event.to_dict())
                self._events.position = event.seq + 1
                sent = True
        return sent

    async def _send_output(self, cursor: OutputCursor) -> tuple[bool, bool]:
        """Send the next chunk; (whether anything was sent, whether the cursor caught up)."""
        start = cursor.position
        end = cursor.journal.end
        stop = min(end, start + self._chunk_size)
        line = self._cache.get(start, stop) if start < stop else None
        if line is None:
            result = cursor.read(self._chunk_size)
            if result.gap is not None:
                gap_from, gap_to = result.gap
                await self._send("gap", gap_from, {"from": gap_from, "to": gap_to})
            if not result.data:
                return result.gap is not None, True
            start, stop, end = result.start, result.next, result.end
            line = output_line(start, result.data, time.time())
            self._cache.put(start, stop, line)
        else:
            cursor.position = stop
        await self._endpoint.send_line(line)
        self.bytes_sent += stop - start
        # A partial chunk of some size means output is flowing (a keystroke's echo is tiny).
        self._partial = _COALESCE_MIN <= stop - start < self._chunk_size
        return True, stop >= end

    async def _send(self, kind: str, seq: int, data: dict[str, Any]) -> None:
        params = {"type": kind, "seq": seq, "timestamp": time.time(), "data": data}
        await self._endpoint.notify("event", params)
