"""The attach client on a real pseudo-terminal, against an in-memory loop service.

The terminal side is real (a PTY pair: the client runs on the slave, the test types into the
master and reads the screen from it through pyte); the loop side is :class:`FakeLoop`, a test
double of the runner's per-loop service. The real runner and ralphd are exercised by
tests/integration/test_cli_loops.py and tests/e2e/test_attach_tmux.py.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyte
import pytest
from tests.helpers import async_wait_until

from ralph_uv.client.attach import AttachResult, AttachSession
from ralph_uv.client.terminal import RESTORE_SEQUENCE, replay_start
from ralph_uv.errors import ErrorCode, RalphError, UserError
from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.status import LoopStatus
from ralph_uv.transports.base import Stream, memory_pair

pytestmark = pytest.mark.timeout(30)

COLS, ROWS = 80, 12
P = b"\x1d"


# ------------------------------------------------------------------------------- the test double


@dataclass
class FakeConn:
    loop: FakeLoop
    number: int
    endpoint: Endpoint | None = None
    client: str = ""
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.client} #{self.number}"


class FakeLoop:
    """Test double of a runner's loop service: an in-memory output journal and event log,
    and the per-loop methods the attach client uses, on the real Dispatcher and Endpoint over
    memory streams. It records what clients asked for."""

    def __init__(self, *, status: str = "running", interactive: bool = True) -> None:
        self.output = bytearray()
        self.events: list[dict[str, Any]] = []
        self.status = status
        self.interactive = interactive
        self.holder: FakeConn | None = None
        self.other_holder: str | None = None  # a client that is not connected here
        self.typed = bytearray()
        self.sizes: list[tuple[int, int]] = []
        self.injected: list[str] = []
        self.stops: list[str] = []
        self.checkpoints = 0
        self.conns: list[FakeConn] = []
        self.connect_ids: list[str | None] = []
        self._wakeups: list[asyncio.Event] = []
        self.methods: Dispatcher[FakeConn] = Dispatcher()
        self._register()

    def append_output(self, data: bytes) -> None:
        self.output += data
        self._wake()

    def append_event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append(
            {"type": kind, "seq": len(self.events), "timestamp": time.time(), "data": data}
        )
        self._wake()

    def _wake(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()

    async def connect(self, loop_id: str | None) -> Stream:
        self.connect_ids.append(loop_id)
        client, server = memory_pair()
        conn = FakeConn(self, len(self.conns) + 1)
        conn.endpoint = Endpoint(server, self.methods, context=conn)
        conn.endpoint.start()
        self.conns.append(conn)
        return client

    async def drop(self) -> None:
        """Close every connection from the server side, as a dying relay would."""
        for conn in self.conns:
            for pump in conn.pumps:
                pump.cancel()
            assert conn.endpoint is not None
            await conn.endpoint.close()
        self.holder = None

    def status_dict(self) -> dict[str, Any]:
        holder = self.holder.name if self.holder else self.other_holder
        return {
            "loop_id": "demo-abc123",
            "task_name": "demo",
            "task_dir": "/tmp/demo",
            "status": self.status,
            "reason": None,
            "iteration": 1,
            "max_iterations": 5,
            "story": "US-001",
            "stories_done": 0,
            "stories_total": 2,
            "agent": "cat",
            "backend": "pty",
            "interactive": self.interactive,
            "interactive_holder": holder,
            "output_end": len(self.output),
            "events_next": len(self.events),
            "started_at": time.time(),
            "pid": 1,
        }

    async def _pump(self, conn: FakeConn, out_pos: int, ev_pos: int) -> None:
        wakeup = asyncio.Event()
        self._wakeups.append(wakeup)
        assert conn.endpoint is not None
        try:
            while True:
                wakeup.clear()
                while out_pos < len(self.output):
                    chunk = bytes(self.output[out_pos : out_pos + 1000])
                    await conn.endpoint.notify(
                        "event",
                        {
                            "type": "output",
                            "seq": out_pos,
                            "timestamp": time.time(),
                            "data": {
                                "data": base64.b64encode(chunk).decode(),
                                "next": out_pos + len(chunk),
                            },
                        },
                    )
                    out_pos += len(chunk)
                while ev_pos < len(self.events):
                    await conn.endpoint.notify("event", self.events[ev_pos])
                    ev_pos += 1
                await wakeup.wait()
        finally:
            self._wakeups.remove(wakeup)

    def _register(self) -> None:
        m = self.methods

        @m.method("hello")
        async def hello(conn: FakeConn, params: Any) -> dict[str, Any]:
            conn.client = params["client"]
            return {"protocol": "1.0", "server": "fake", "loop_id": "demo-abc123"}

        @m.method("get_status")
        async def get_status(conn: FakeConn) -> dict[str, Any]:
            return self.status_dict()

        @m.method("get_output")
        async def get_output(conn: FakeConn, params: Any) -> dict[str, Any]:
            since, limit = params["since"], params.get("limit", 65536)
            data = bytes(self.output[since : since + limit])
            return {
                "data": base64.b64encode(data).decode(),
                "start": since,
                "next": since + len(data),
                "end": len(self.output),
                "gap": None,
            }

        @m.method("subscribe")
        async def subscribe(conn: FakeConn, params: Any) -> dict[str, Any]:
            since = params["since"]
            out = len(self.output) if since["output"] is None else since["output"]
            ev = len(self.events) if since["events"] is None else since["events"]
            task = asyncio.get_running_loop().create_task(self._pump(conn, out, ev))
            conn.pumps.append(task)
            return {"subscription": "1", "output_end": len(self.output)}

        @m.method("set_interactive_mode")
        async def set_interactive_mode(conn: FakeConn, params: Any) -> dict[str, Any]:
            holder = self.holder.name if self.holder else self.other_holder
            if params["enabled"]:
                if holder and holder != conn.name and not params.get("force"):
                    raise RalphError(
                        f"interactive mode is held by {holder}; wait",
                        code=ErrorCode.NOT_INTERACTIVE,
                    )
                self.holder, self.other_holder = conn, None
                self.append_event("interactive_mode", {"enabled": True, "holder": conn.name})
            elif self.holder is conn:
                self.holder = None
            return {"enabled": self.holder is conn, "holder": self.holder and self.holder.name}

        @m.method("write_pty")
        async def write_pty(conn: FakeConn, params: Any) -> dict[str, Any]:
            if self.holder is not conn:
                raise RalphError("not interactive", code=ErrorCode.NOT_INTERACTIVE)
            self.typed += base64.b64decode(params["data"])
            return {}

        @m.method("resize")
        async def resize(conn: FakeConn, params: Any) -> dict[str, Any]:
            self.sizes.append((params["cols"], params["rows"]))
            return {}

        @m.method("inject_prompt")
        async def inject_prompt(conn: FakeConn, params: Any) -> dict[str, Any]:
            self.injected.append(params["text"])
            return {}

        @m.method("stop")
        async def stop(conn: FakeConn, params: Any) -> dict[str, Any]:
            self.stops.append(params["when"])
            return {}

        @m.method("checkpoint")
        async def checkpoint(conn: FakeConn) -> dict[str, Any]:
            self.checkpoints += 1
            return {}


# ------------------------------------------------------------------------------- the terminal


class Screen:
    """The master side of the PTY: everything the client drew, and pyte's view of it."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.raw = bytearray()
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        self.raw += data
        self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    @property
    def status_line(self) -> str:
        return self.screen.display[-1]

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.fixture
def tty() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    _set_size(slave, COLS, ROWS)
    yield master, slave
    os.close(master)
    os.close(slave)


@dataclass
class Attached:
    fake: FakeLoop
    screen: Screen
    task: asyncio.Task[AttachResult]
    slave: int
    settings_before: list[Any]


@pytest.fixture
async def attached(tty: tuple[int, int]) -> AsyncIterator[Attached]:
    master, slave = tty
    fake = FakeLoop()
    fake.append_output(b"old line\r\n\x1b[2J\x1b[Hscreen start\r\nprompt> ")
    screen = Screen(master)
    before = termios.tcgetattr(slave)
    session = AttachSession(fake.connect, client="tester", in_fd=slave, out_fd=slave)
    task = asyncio.create_task(session.run())
    await async_wait_until(lambda: "prompt>" in screen.text() and "demo" in screen.status_line)
    yield Attached(fake, screen, task, slave, before)
    if not task.done():
        screen.type(P + b"d")
        await asyncio.wait_for(task, 5)
    screen.close()


# ------------------------------------------------------------------------------------ the tests


def test_replay_starts_at_the_last_full_clear() -> None:
    """The first screen is rebuilt from the last full-screen clear in the fetched output."""
    data = b"a\x1b[2Jb\x1b[?1049hc\x1b[2Jd"
    assert data[replay_start(data, 500) :] == b"\x1b[2Jd"


def test_replay_without_a_clear_starts_at_a_line_boundary() -> None:
    """Without a clear, a replay from the middle of the output starts after a line break;
    from the very beginning it starts at the beginning."""
    assert replay_start(b"tail of line\r\nnext", 100) == len(b"tail of line\r\n")
    assert replay_start(b"first\r\nnext", 0) == 0


async def test_attach_shows_recent_screen_status_bar_and_live_output(attached: Attached) -> None:
    """Attaching shows the last screenful at once (from the last clear, not before), the
    status bar on the last line, then live output; the agent is told rows - 1."""
    screen, fake = attached.screen, attached.fake
    assert "old line" not in screen.text()
    status = screen.status_line
    for part in ("demo", "running", "iter 1/5", "US-001", "cat", "observe"):
        assert part in status
    assert fake.sizes[0] == (COLS, ROWS - 1)
    assert fake.connect_ids == [None]
    fake.append_output(b"live output here\r\n")
    await async_wait_until(lambda: "live output here" in screen.text())
    assert "demo" in screen.status_line


async def test_observe_mode_does_not_forward_then_interactive_does(attached: Attached) -> None:
    """In observe mode typed keys stay local and the status bar hints; after prefix + i they
    reach the agent in order; prefix twice sends the prefix byte."""
    screen, fake = attached.screen, attached.fake
    screen.type(b"ignored")
    await async_wait_until(lambda: "observe mode" in screen.status_line)
    assert fake.typed == b""
    screen.type(P + b"i")
    await async_wait_until(lambda: "INTERACTIVE" in screen.status_line or "interactive mode"
                           in screen.status_line)
    screen.type(b"hello\r")
    screen.type(P + P)
    await async_wait_until(lambda: fake.typed == b"hello\r" + P)


async def test_detach_leaves_the_loop_and_restores_the_terminal(attached: Attached) -> None:
    """Prefix + d ends the attach as detached and gives interactive mode back; the terminal
    settings are back as they were and the restore sequence was written last."""
    attached.screen.type(P + b"i")
    await async_wait_until(lambda: attached.fake.holder is not None)
    attached.screen.type(P + b"d")
    result = await asyncio.wait_for(attached.task, 5)
    assert result.detached
    assert result.loop_id == "demo-abc123"
    assert attached.fake.holder is None
    assert termios.tcgetattr(attached.slave) == attached.settings_before
    await async_wait_until(lambda: attached.screen.raw.endswith(RESTORE_SEQUENCE))


async def test_loop_end_leaves_with_the_final_status(attached: Attached) -> None:
    """A loop_finished event ends the attach with the loop's final status and reason."""
    attached.fake.append_event("loop_finished", {"status": "completed", "reason": "all pass"})
    result = await asyncio.wait_for(attached.task, 5)
    assert result == AttachResult("demo-abc123", "demo", False, LoopStatus.COMPLETED, "all pass")
    assert termios.tcgetattr(attached.slave) == attached.settings_before


async def test_reconnect_resumes_without_gap_or_duplicate(attached: Attached) -> None:
    """When the connection drops, the client reconnects to the same loop id, takes
    interactive mode again, and every byte written meanwhile appears exactly once."""
    screen, fake = attached.screen, attached.fake
    screen.type(P + b"i")
    await async_wait_until(lambda: fake.holder is not None)
    fake.append_output(b"<before-drop>")
    await async_wait_until(lambda: b"<before-drop>" in screen.raw)
    await fake.drop()
    for i in range(5):
        fake.append_output(f"<while-away-{i}>".encode())
    fake.append_event("story_passed", {"story": "US-001"})
    await async_wait_until(lambda: b"<while-away-4>" in screen.raw)
    assert fake.connect_ids[-1] == "demo-abc123"
    for marker in [b"<before-drop>", *(f"<while-away-{i}>".encode() for i in range(5))]:
        assert screen.raw.count(marker) == 1
    await async_wait_until(lambda: fake.holder is not None and fake.holder.number > 1)
    screen.type(b"x")
    await async_wait_until(lambda: fake.typed == b"x")


async def test_commands_stop_checkpoint_inject(attached: Attached) -> None:
    """s asks and y stops after the iteration; c checkpoints; p reads a prompt on the status
    bar and Enter injects it."""
    screen, fake = attached.screen, attached.fake
    screen.type(P + b"s")
    await async_wait_until(lambda: "(y/n)" in screen.status_line)
    screen.type(b"y")
    await async_wait_until(lambda: fake.stops == ["after_iteration"])
    screen.type(P + b"c")
    await async_wait_until(lambda: fake.checkpoints == 1)
    screen.type(P + b"pfix the tests")
    await async_wait_until(lambda: "fix the tests" in screen.status_line)
    screen.type(b"\r")
    await async_wait_until(lambda: fake.injected == ["fix the tests"])


async def test_interactive_held_by_someone_else(attached: Attached) -> None:
    """Another holder is named on the status bar and refuses i; I takes over."""
    screen, fake = attached.screen, attached.fake
    fake.other_holder = "bob@laptop"
    screen.type(P + b"i")
    await async_wait_until(lambda: "bob@laptop" in screen.status_line)
    assert fake.holder is None
    screen.type(P + b"I")
    await async_wait_until(lambda: fake.holder is not None)
    screen.type(b"ok")
    await async_wait_until(lambda: fake.typed == b"ok")


async def test_window_resize_is_sent(attached: Attached) -> None:
    """After SIGWINCH the new size (rows - 1) goes to the loop."""
    _set_size(attached.slave, 100, 30)
    os.kill(os.getpid(), signal.SIGWINCH)
    await async_wait_until(lambda: attached.fake.sizes[-1] == (100, 29))


async def test_attach_to_a_finished_loop_says_to_read_logs(tty: tuple[int, int]) -> None:
    """A loop that has ended is not attached to; the message says where its output is, and
    the terminal is left alone."""
    master, slave = tty
    fake = FakeLoop(status="completed")
    session = AttachSession(fake.connect, client="tester", in_fd=slave, out_fd=slave)
    with pytest.raises(UserError, match="ralph-uv logs demo-abc123"):
        await session.run()
    assert fake.sizes == []
    assert select.select([master], [], [], 0.1)[0] == []  # nothing was drawn


async def test_losing_interactive_mode_to_another_client(attached: Attached) -> None:
    """When another client takes interactive mode over, the status bar says who and keys
    stop being sent."""
    screen, fake = attached.screen, attached.fake
    screen.type(P + b"i")
    await async_wait_until(lambda: fake.holder is not None)
    fake.holder, fake.other_holder = None, "bob@laptop"
    fake.append_event("interactive_mode", {"enabled": True, "holder": "bob@laptop"})
    await async_wait_until(lambda: "bob@laptop took interactive mode" in screen.status_line)
    screen.type(b"typed after")
    await async_wait_until(lambda: "observe mode" in screen.status_line)
    assert fake.typed == b""
