"""What the TUI tests share: a repository with tasks, ralphd processes (also in other
RALPH_HOMEs, standing in for remote machines), loops started through them, and a reader of the
text in Textual's SVG screenshots."""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers import wait_until

from ralph_uv.client.daemon import DaemonClient
from ralph_uv.daemon.supervisor import process_alive
from ralph_uv.registry import Registry, SessionRecord
from ralph_uv.transports.base import Stream
from ralph_uv.transports.unix import open_unix

FIXTURES = Path(__file__).parent.parent / "fixtures"
PY = sys.executable

AGENTS: dict[str, list[str]] = {
    "tick": [PY, str(FIXTURES / "long_agent.py"), "tick", "{prompt_file}"],
    "sleep": [PY, str(FIXTURES / "long_agent.py"), "sleep", "{prompt_file}"],
    "tui": [PY, str(FIXTURES / "tui_agent.py"), "{prompt_file}"],
    "sleepwork": [PY, str(FIXTURES / "scripted_agent.py"), "sleepwork", "{prompt_file}"],
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _story(number: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"US-{number:03d}",
        "title": f"Story {number}",
        "description": f"As a tester, I want story {number} done.",
        "acceptanceCriteria": [
            {"description": f"criterion {number}.1", "passes": False},
            {"description": f"criterion {number}.2", "passes": False},
        ],
        "priority": number,
        "passes": False,
        "notes": "",
        **extra,
    }


def make_repo(root: Path) -> Path:
    """A git repository with tasks ``alpha`` (3 stories, US-003 blocked by US-002) and
    ``beta`` (1 story); its path."""
    repo = root / "repo"
    tasks = {
        "alpha": [_story(1), _story(2), _story(3, blockedBy=["US-002"])],
        "beta": [_story(1)],
    }
    for name, stories in tasks.items():
        folder = repo / "tasks" / name
        folder.mkdir(parents=True)
        prd = {
            "schemaVersion": "2.5",
            "project": name,
            "branchName": f"ralph/{name}",
            "description": f"TUI test task {name}",
            "userStories": stories,
        }
        (folder / "prd.json").write_text(json.dumps(prd, indent=2) + "\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    return repo


def write_config(home: Path, max_loops: int = 60) -> None:
    """config.toml with the test agents (no pause) and daemon.toml, under RALPH_HOME ``home``."""
    folder = home / "config"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["pause = 0", "terminate_grace = 1.0", ""]
    for name, command in AGENTS.items():
        lines.append(f"[agents.{name}]")
        lines.append("command = [" + ", ".join(json.dumps(part) for part in command) + "]")
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    (folder / "daemon.toml").write_text(f"max_concurrent_loops = {max_loops}\n")


class Daemon:
    """``ralphd start --foreground`` in RALPH_HOME ``home`` as a child process of the test."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "state" / "test-ralphd.out"

    @property
    def socket(self) -> Path:
        return self.home / "run" / "ralphd.sock"

    def start(self) -> Daemon:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RALPH_HOME": str(self.home)}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [PY, "-m", "ralph_uv.daemon", "start", "--foreground"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
            )
        wait_until(self._ready, timeout=30)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"ralphd exited: {self.log.read_text()[-3000:]}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    async def client(self) -> DaemonClient:
        async def opener() -> Stream:
            return await open_unix(self.socket)

        return await DaemonClient.open(opener, client="tui-test-driver")

    async def start_loop(self, task_dir: Path, agent: str, **options: Any) -> SessionRecord:
        async with await self.client() as daemon:
            return await daemon.start_loop(task_dir, task_name=task_dir.name, agent=agent,
                                           **options)

    def kill_runners(self) -> None:
        """Kill every runner this home's ralphd started."""
        registry_path = self.home / "data" / "sessions.db"
        if not registry_path.exists():
            return
        with Registry.open(registry_path) as registry:
            pids = [r.pid for r in registry.find() if r.pid and process_alive(r.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def journal_bytes(home: Path, loop_id: str) -> bytes:
    folder = home / "state" / "loops" / loop_id / "output.journal"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.seg")))


# ----------------------------------------------------------------------------- screenshots

_TEXT = re.compile(
    r'<text class="[^"]*" x="([\d.]+)" y="[\d.]+" textLength="[\d.]+" '
    r'clip-path="url\(#[^)]*-line-(\d+)\)">(.*?)</text>'
)
_CELL = 12.2  # the width of one cell in Textual's SVG export
_VOLATILE = (
    (re.compile(r"\b(alpha|beta|demo)-[0-9a-f]{6}\b"), r"\1-<id>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<clock>"),
    (re.compile(r"\b\d+[smhd](\d\d[smh])?( ago)?\b"), "<time>"),
    (re.compile(r"/tmp/[\w./-]+"), "<path>"),
    (re.compile(r"pid \d+"), "pid <n>"),
)


def svg_lines(svg: str) -> list[str]:
    """The screen's text, one string per row, rebuilt from an SVG screenshot."""
    rows: dict[int, dict[int, str]] = {}
    for x, line, text in _TEXT.findall(svg):
        rows.setdefault(int(line), {})[round(float(x) / _CELL)] = html.unescape(text)
    lines: list[str] = []
    for number in range(max(rows, default=-1) + 1):
        cells = rows.get(number, {})
        line = ""
        for column in sorted(cells):
            line = line.ljust(column) + cells[column]
        lines.append(line.replace("\xa0", " ").rstrip())
    return lines


def stable_lines(svg: str) -> list[str]:
    """:func:`svg_lines` with what changes from run to run (loop ids, times, clocks, paths)
    masked and runs of blanks made one, so two screenshots compare by layout and words."""
    result: list[str] = []
    for line in svg_lines(svg):
        for pattern, replacement in _VOLATILE:
            line = pattern.sub(replacement, line)
        result.append(re.sub(r" {2,}", "  ", line))
    return result


# ------------------------------------------------------------------------ a real terminal


class PtyApp:
    """A command run in a real pseudo-terminal of ``cols`` x ``rows``, its screen emulated
    with pyte so a test can read what a person would see."""

    def __init__(self, argv: list[str], *, cwd: Path, cols: int = 120, rows: int = 40) -> None:
        import fcntl
        import pty
        import struct
        import termios

        import pyte

        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols),
               "LINES": str(rows)}
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = bytearray()

    def pump(self) -> None:
        """Read what the program has written so far into the screen."""
        import select

        while True:
            ready, _, _ = select.select([self.master], [], [], 0)
            if not ready:
                return
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.raw += data
            self._stream.feed(data)

    def text(self) -> str:
        self.pump()
        return "\n".join(self.screen.display)

    def wait_for(self, *words: str, timeout: float = 30.0) -> str:
        """Wait until the screen shows every one of ``words``; the screen's text."""
        last = ""

        def shown() -> bool:
            nonlocal last
            last = self.text()
            if self.process.poll() is not None:
                raise AssertionError(f"the program exited ({self.process.returncode}):\n{last}")
            return all(word in last for word in words)

        try:
            wait_until(shown, timeout=timeout, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nscreen:\n{last}") from None
        return last

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        os.close(self.master)
