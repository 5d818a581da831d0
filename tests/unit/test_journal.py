"""The loop journal: offsets, retention gaps, recovery, events, readers in other processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import async_wait_until, wait_until

from ralph_uv.errors import ErrorCode, UserError
from ralph_uv.journal import (
    EVENTS_FILE,
    OUTPUT_DIR,
    EventCursor,
    EventLog,
    EventType,
    JournalError,
    LoopJournal,
    OutputCursor,
    OutputJournal,
    TextDecoder,
    Wakeup,
    follow_output,
    output_text,
)


def _pattern(start: int, length: int) -> bytes:
    """Bytes whose value depends on their absolute offset, so a misplaced byte shows."""
    return bytes((i * 7 + i // 251) % 256 for i in range(start, start + length))


def test_append_returns_offsets_and_reads_back(tmp_path: Path) -> None:
    """Each append returns the offset of its first byte; reads return exactly those bytes."""
    journal = OutputJournal(tmp_path / OUTPUT_DIR)
    assert journal.append(b"hello ") == 0
    assert journal.append(b"") == 6
    assert journal.append(b"world") == 6
    result = journal.read(0, 100)
    assert (result.data, result.start, result.next, result.gap) == (b"hello world", 0, 11, None)
    assert result.end == 11
    assert journal.read(6, 3).data == b"wor"
    assert journal.read(11, 10).data == b""
    journal.close()


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=30),
    segment_size=st.integers(min_value=1, max_value=500),
    reads=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 2000)), min_size=1, max_size=10),
)
def test_random_offsets_read_the_right_bytes(
    chunks: list[bytes], segment_size: int, reads: list[tuple[float, int]]
) -> None:
    """Whatever the chunking and segment size, a read from any offset returns the bytes written
    at exactly those offsets, across segment boundaries."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = OutputJournal(Path(tmp), retention=None, segment_size=segment_size)
        whole = b""
        for chunk in chunks:
            assert journal.append(chunk) == len(whole)
            whole += chunk
        reader = OutputJournal(Path(tmp), read_only=True)
        for fraction, limit in reads:
            since = int(fraction * len(whole))
            for source in (journal, reader):
                result = source.read(since, limit)
                assert result.gap is None
                assert result.start == since
                assert result.data == whole[since : since + limit]
                assert result.next == since + len(result.data)
        journal.close()


def test_retention_drops_old_segments_with_an_explicit_gap(tmp_path: Path) -> None:
    """Past the retention limit, old segments are deleted, at least ``retention`` bytes remain,
    and a read from a dropped offset reports the gap and then the right bytes."""
    journal = OutputJournal(tmp_path, retention=1000, segment_size=256)
    for start in range(0, 10_000, 100):
        journal.append(_pattern(start, 100))
    assert journal.end == 10_000
    assert 1000 <= journal.end - journal.start <= 1000 + 256 + 100
    assert len(list(tmp_path.glob("*.seg"))) <= 1000 // 256 + 2

    result = journal.read(0, 500)
    assert result.gap == (0, journal.start)
    assert result.start == journal.start
    assert result.data == _pattern(journal.start, 500)

    reader = OutputJournal(tmp_path, read_only=True)
    late = reader.read(1234, 50)
    assert late.gap == (1234, reader.start)
    assert late.data == _pattern(reader.start, 50)
    assert journal.read(9_990, 50).data == _pattern(9_990, 10)
    journal.close()


def test_a_lost_write_in_an_old_segment_is_a_gap(tmp_path: Path) -> None:
    """If an older segment came back shorter after a crash, the missing bytes are reported as a
    gap; the following bytes keep their offsets."""
    journal = OutputJournal(tmp_path, retention=None, segment_size=100)
    for start in range(0, 300, 100):
        journal.append(_pattern(start, 100))
    journal.close()
    first = sorted(tmp_path.glob("*.seg"))[0]
    os.truncate(first, 60)

    reader = OutputJournal(tmp_path, read_only=True)
    head = reader.read(0, 1000)
    assert (head.data, head.gap) == (_pattern(0, 60), None)
    after = reader.read(head.next, 1000)
    assert after.gap == (60, 100)
    assert after.start == 100
    assert after.data == _pattern(100, 200)


def test_reopen_recovers_the_end_and_continues(tmp_path: Path) -> None:
    """A writer reopened on an existing journal (a runner restart) continues at the old end."""
    journal = OutputJournal(tmp_path, retention=None, segment_size=64)
    journal.append(_pattern(0, 200))
    journal.close()

    reopened = OutputJournal(tmp_path, retention=None, segment_size=64)
    assert reopened.end == 200
    assert reopened.append(_pattern(200, 50)) == 200
    assert reopened.read(0, 1000).data == _pattern(0, 250)
    reopened.close()


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    """A second writer on the same output or event log is refused while the first is open."""
    journal = LoopJournal(tmp_path)
    with pytest.raises(JournalError) as output_error:
        OutputJournal(tmp_path / OUTPUT_DIR)
    assert output_error.value.code == ErrorCode.BAD_STATE
    with pytest.raises(JournalError):
        EventLog(tmp_path / EVENTS_FILE)
    journal.close()
    LoopJournal(tmp_path).close()


def test_bad_cursors_are_user_errors(tmp_path: Path) -> None:
    """An offset past the end or a negative one is refused with a UserError, not clamped."""
    journal = OutputJournal(tmp_path)
    journal.append(b"abc")
    with pytest.raises(UserError, match="beyond the end"):
        journal.read(4, 10)
    with pytest.raises(UserError):
        journal.read(-1, 10)
    with pytest.raises(UserError):
        journal.read(0, 0)
    journal.close()


def test_reader_of_a_journal_not_written_yet(tmp_path: Path) -> None:
    """A read-only journal on a folder that does not exist yet is empty and creates nothing."""
    reader = LoopJournal(tmp_path / "nope", read_only=True)
    assert reader.output.end == 0
    assert reader.read_output(0).data == b""
    assert reader.read_events(0) == []
    assert not (tmp_path / "nope").exists()


def test_events_are_numbered_and_survive_reopen(tmp_path: Path) -> None:
    """Events get seq 0, 1, 2, …; a reopened log continues the numbering; reads honour
    since and limit."""
    path = tmp_path / EVENTS_FILE
    log = EventLog(path)
    first = log.append(EventType.ITERATION_STARTED, {"iteration": 1})
    second = log.append(EventType.STORY_PASSED, {"story": "US-001"})
    assert (first.seq, second.seq) == (0, 1)
    assert first.type == "iteration_started"
    log.close()

    log = EventLog(path)
    assert log.next_seq == 2
    third = log.append("loop_finished", {"status": "completed"})
    assert third.seq == 2
    assert [e.seq for e in log.read(0)] == [0, 1, 2]
    assert [e.seq for e in log.read(1, limit=1)] == [1]
    assert log.read(1, limit=1)[0].data == {"story": "US-001"}
    assert log.read(3) == []
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[2]) == third.to_dict()
    log.close()


def test_a_torn_last_event_line_is_ignored_then_cut(tmp_path: Path) -> None:
    """A last line without its newline (a crash mid-write) is invisible to readers, and the next
    writer removes it and carries on with the right seq."""
    path = tmp_path / EVENTS_FILE
    log = EventLog(path)
    for i in range(3):
        log.append(EventType.STATE_CHANGE, {"i": i})
    log.close()
    with open(path, "ab") as file:
        file.write(b'{"seq":3,"type":"state_ch')

    reader = EventLog(path, read_only=True)
    assert [e.seq for e in reader.read(0)] == [0, 1, 2]

    log = EventLog(path)
    assert log.next_seq == 3
    log.append(EventType.ERROR, {"message": "after the crash"})
    assert path.read_bytes().count(b"state_ch\n") == 0
    assert [e.seq for e in reader.read(0)] == [0, 1, 2, 3]
    assert reader.read(3)[0].data == {"message": "after the crash"}
    log.close()


def test_a_garbled_event_line_is_skipped(tmp_path: Path) -> None:
    """A complete line that is not an event is skipped by readers and writers alike."""
    path = tmp_path / EVENTS_FILE
    log = EventLog(path)
    log.append(EventType.STALLED)
    log.close()
    with open(path, "ab") as file:
        file.write(b"not json at all\n")
    log = EventLog(path)
    assert log.append(EventType.STALLED).seq == 1
    assert [e.seq for e in EventLog(path, read_only=True).read(0)] == [0, 1]
    log.close()


def test_cursors_advance_and_report_lag(tmp_path: Path) -> None:
    """Cursors move past what they read; a cursor made without ``since`` starts at the end."""
    journal = LoopJournal(tmp_path)
    journal.append_output(b"0123456789")
    journal.append_event(EventType.ITERATION_STARTED)
    output = OutputCursor(journal.output, 0)
    assert output.lag == 10
    assert output.read(4).data == b"0123"
    assert output.read(100).data == b"456789"
    assert output.lag == 0
    late = OutputCursor(journal.output)
    journal.append_output(b"ab")
    assert late.read().data == b"ab"
    events = EventCursor(journal.events, 0)
    assert [e.seq for e in events.read()] == [0]
    journal.append_event(EventType.ITERATION_FINISHED)
    assert [e.type for e in events.read()] == ["iteration_finished"]
    assert events.read() == []
    journal.close()


_CHILD_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ralph_uv.journal import LoopJournal

    def pattern(start, length):
        return bytes((i * 7 + i // 251) % 256 for i in range(start, start + length))

    journal = LoopJournal(Path(sys.argv[1]), retention=None, segment_size=10_000)
    offset = 0
    for n in range(400):
        size = 37 + n * 13 % 900
        journal.append_output(pattern(offset, size))
        offset += size
        if n % 50 == 0:
            journal.append_event("iteration_started", {"n": n})
    journal.append_event("loop_finished", {"bytes": offset})
    journal.close()
    """
)


def test_reader_in_this_process_while_another_process_writes(tmp_path: Path) -> None:
    """A read-only journal follows a writer in another process: every byte arrives once, at its
    offset, and the events arrive in order."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD_WRITER, str(tmp_path)])
    try:
        reader = LoopJournal(tmp_path, read_only=True)
        output, events = OutputCursor(reader.output, 0), EventCursor(reader.events, 0)
        received = bytearray()
        seen: list[str] = []

        def finished() -> bool:
            chunk = output.read(4096)
            assert chunk.gap is None
            assert chunk.start == len(received)
            received.extend(chunk.data)
            seen.extend(e.type for e in events.read())
            return "loop_finished" in seen and output.lag == 0 and reader.output.end > 0

        wait_until(finished, timeout=30)
        assert child.wait(timeout=10) == 0
        final = reader.read_events(0)
        assert [e.seq for e in final] == list(range(len(final)))
        total = final[-1].data["bytes"]
        received.extend(output.read(total).data)
        assert len(received) == total
        assert bytes(received) == _pattern(0, total)
    finally:
        child.kill()
        child.wait()


async def test_follow_output_wakes_on_append(tmp_path: Path) -> None:
    """An in-process subscriber built on follow_output gets appended bytes without polling
    delay, including bytes appended before it started."""
    journal = OutputJournal(tmp_path)
    journal.append(b"before ")
    received = bytearray()

    async def subscriber() -> None:
        async for result in follow_output(journal, 0, poll_interval=30):
            received.extend(result.data)

    task = asyncio.create_task(subscriber())
    await async_wait_until(lambda: bytes(received) == b"before ", timeout=5)
    journal.append(b"after")
    await async_wait_until(lambda: bytes(received) == b"before after", timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    journal.close()


async def test_wakeup_from_another_thread(tmp_path: Path) -> None:
    """A Wakeup registered as a listener is woken by appends made in another thread."""
    journal = LoopJournal(tmp_path)
    wakeup = Wakeup()
    remove = journal.add_listener(wakeup.notify)
    waiter = asyncio.create_task(wakeup.wait())
    thread = threading.Thread(target=journal.append_event, args=(EventType.ERROR, {"x": 1}))
    thread.start()
    async with asyncio.timeout(5):
        await waiter
    thread.join()
    remove()
    journal.append_output(b"nobody listens")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wakeup.wait(), 0.05)
    journal.close()


def test_a_failing_listener_does_not_stop_the_writer(tmp_path: Path) -> None:
    """A listener that raises is logged; the append and later listeners still happen."""
    journal = OutputJournal(tmp_path)
    calls: list[int] = []

    def broken() -> None:
        raise RuntimeError("subscriber bug")

    journal.add_listener(broken)
    journal.add_listener(lambda: calls.append(journal.end))
    assert journal.append(b"xyz") == 0
    assert calls == [3]
    journal.close()


def test_text_view_decodes_split_characters() -> None:
    """Text decoding replaces invalid bytes, and the incremental decoder joins a character split
    across two reads."""
    assert output_text(b"ok \xff") == "ok \ufffd"
    snowman = "☃".encode()
    decoder = TextDecoder()
    assert decoder.feed(b"a" + snowman[:1]) == "a"
    assert decoder.feed(snowman[1:] + b"b") == "☃b"
    assert decoder.feed(b"\xe2") == ""
    assert decoder.finish() == "\ufffd"
