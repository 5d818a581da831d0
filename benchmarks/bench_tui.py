"""Key-press response time of ``ralph-uv tui`` with 50 loops across 3 remotes while one loop
writes 10 MB/s.

In throw-away RALPH_HOMEs, real ralphds run ``--loops`` loops (each in its own small git
repository): ``--loops - 1`` agents that wait quietly and one that writes numbered lines at
``--rate-mb`` MB/s into its PTY. The loops are spread over this machine's ralphd and
``--remotes`` more ralphds, each in a RALPH_HOME of its own: the dashboard lists them as remote
locations, each with its own connection, reached over their Unix sockets (what a network
transport adds per message is measured by bench_transports.py and bench_remote.py). The
flooding loop runs on the local one. The dashboard runs in this process (Textual's headless
driver: everything but writing to a terminal), connected to those ralphds like any client, and
keys are posted to it as a terminal's keys would be, at random intervals of 30-120 ms.

A key press's response time runs from posting the key to the first screen update drawn after
the key took effect (the table's cursor moved; the focus moved; the view scrolled). Scenes:

- the loops table (all loops live), keys: down/up;
- the detail of the loop that floods (its terminal parses and redraws the flood, coalesced to
  at most 30 frames a second, fewer when frames are dear), keys: ``/`` (to the search box)
  and Escape (back): focus changes, the dearest keys there are;
- the same detail, scrolling the terminal's scrollback while the flood goes on: up/down.

Target: p99 <= 100 ms in each. The output rate reaching the dashboard is printed too.

Usage: python benchmarks/bench_tui.py [--loops 50] [--remotes 3] [--rate-mb 10] [--presses 150]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import cpu_model, git

TARGET_P99_MS = 100.0
_FLOOD = (
    "import sys, time\n"
    "rate = float(sys.argv[1]) * 1024 * 1024\n"
    "out = sys.stdout.buffer\n"
    "line = 0\n"
    "start = time.monotonic()\n"
    "sent = 0\n"
    "while True:\n"
    "    chunk = b''.join(b'line %09d ' % (line + i) + b'x' * 60 + b'\\n' for i in range(512))\n"
    "    line += 512\n"
    "    out.write(chunk)\n"
    "    out.flush()\n"
    "    sent += len(chunk)\n"
    "    ahead = sent / rate - (time.monotonic() - start)\n"
    "    if ahead > 0:\n"
    "        time.sleep(ahead)\n"
)
_IDLE = "import time\nprint('waiting', flush=True)\ntime.sleep(36000)\n"


def _task(root: Path, number: int) -> Path:
    repo = root / f"repo{number:02d}"
    task = repo / "tasks" / f"t{number:02d}"
    task.mkdir(parents=True)
    story = {"id": "US-001", "title": "t", "description": "d", "priority": 1, "passes": False,
             "acceptanceCriteria": [{"description": "ok", "passes": False}]}
    prd = {"schemaVersion": "2.5", "project": "bench", "branchName": f"ralph/t{number:02d}",
           "description": "bench", "userStories": [story]}
    (task / "prd.json").write_text(json.dumps(prd, indent=2) + "\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "user.email=b@example.com", "-c", "user.name=Bench", "add", "-A")
    git(repo, "-c", "user.email=b@example.com", "-c", "user.name=Bench", "commit", "-qm", "i")
    return task


def _setup(root: Path, homes: list[Path], loops: int, rate_mb: float) -> list[Path]:
    (root / "flood.py").write_text(_FLOOD)
    (root / "idle.py").write_text(_IDLE)
    for home in homes:
        _configure(root, home, loops, rate_mb)
    return [_task(root, n) for n in range(loops)]


def _configure(root: Path, home: Path, loops: int, rate_mb: float) -> None:
    config = home / "config"
    config.mkdir(parents=True)
    flood = [sys.executable, str(root / "flood.py"), str(rate_mb), "{prompt_file}"]
    idle = [sys.executable, str(root / "idle.py"), "{prompt_file}"]
    (config / "config.toml").write_text(
        "pause = 0\nterminate_grace = 1.0\niteration_timeout = 36000\n\n"
        f"[agents.flood]\ncommand = {json.dumps(flood)}\n\n"
        f"[agents.idle]\ncommand = {json.dumps(idle)}\n"
    )
    (config / "daemon.toml").write_text(f"max_concurrent_loops = {loops + 10}\n")


def _start_ralphd(home: Path) -> subprocess.Popen[bytes]:
    log = open(home / "ralphd.out", "ab")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(
        [sys.executable, "-m", "ralph_uv.daemon", "start", "--foreground"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        env={**os.environ, "RALPH_HOME": str(home)},
    )
    sock = home / "run" / "ralphd.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return process
            except OSError:
                time.sleep(0.05)
    raise SystemExit("ralphd did not start")


class _Probe:
    """Times key presses: posted -> took effect -> next screen update drawn."""

    def __init__(self) -> None:
        self.posted = 0.0
        self.effect: float | None = None
        self.done: asyncio.Future[float] | None = None

    def start(self) -> asyncio.Future[float]:
        self.posted = time.perf_counter()
        self.effect = None
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def took_effect(self) -> None:
        if self.done is not None and self.effect is None:
            self.effect = time.perf_counter()

    def drawn(self) -> None:
        if self.done is not None and self.effect is not None and not self.done.done():
            self.done.set_result(time.perf_counter() - self.posted)


async def _run(args: argparse.Namespace, tasks: list[Path],
               remotes: list[Path]) -> dict[str, Any]:
    from textual import events

    from ralph_uv.client.daemon import DaemonClient, connect_daemon
    from ralph_uv.transports.unix import open_unix
    from ralph_uv.tui.app import RalphTui
    from ralph_uv.tui.locations import local_location, unix_location
    from ralph_uv.tui.screens.detail import DetailScreen
    from ralph_uv.tui.source import LoopKey
    from ralph_uv.tui.widgets.loops_table import LoopsTable

    probe = _Probe()

    class _TimedTui(RalphTui):
        # Every compositor update ends here (the headless driver then skips the write).
        def _display(self, screen: Any, renderable: Any) -> None:
            if renderable is not None:
                probe.drawn()
            super()._display(screen, renderable)

    sockets = [home / "run" / "ralphd.sock" for home in remotes]

    async def remote_daemon(sock: Path) -> DaemonClient:
        return await DaemonClient.open(lambda: open_unix(sock), client="bench")

    daemons = [await connect_daemon(autostart=False, client="bench"),
               *[await remote_daemon(sock) for sock in sockets]]
    flood_id = ""
    for number, task in enumerate(tasks):  # round robin; loop 0 (the flood) on the local one
        agent = "flood" if number == 0 else "idle"
        record = await daemons[number % len(daemons)].start_loop(
            task, task_name=task.name, agent=agent, max_iterations=1)
        flood_id = flood_id or record.loop_id
    for daemon in daemons:
        await daemon.close()

    app = _TimedTui([local_location("bench", autostart=False),
                     *[unix_location(f"remote{n}", sock, "bench")
                       for n, sock in enumerate(sockets, start=1)]], client="bench")
    figures: dict[str, Any] = {}
    async with app.run_test(size=(140, 40)) as pilot:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await pilot.pause(0.2)
            rows = app.source.rows()
            if len(rows) == len(tasks) and all(r.connection == "live" for r in rows):
                break
        else:
            raise SystemExit("the dashboard did not see every loop live within 120 s")
        await asyncio.sleep(args.warmup)

        async def measure(keys: list[str], watch: Callable[[], None]) -> list[float]:
            watch()
            times: list[float] = []
            for index in range(args.presses):
                key = keys[index % len(keys)]
                done = probe.start()
                app.post_message(events.Key(key, None))
                try:
                    times.append(await asyncio.wait_for(done, 10.0))
                except TimeoutError:
                    times.append(10.0)
                await asyncio.sleep(random.uniform(0.03, 0.12))
            return times

        def summary(name: str, times: list[float], seconds: float, received: int) -> None:
            ordered = sorted(times)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            figures[f"{name}_p50_ms"] = round(statistics.median(times) * 1000, 1)
            figures[f"{name}_p99_ms"] = round(p99 * 1000, 1)
            figures[f"{name}_max_ms"] = round(max(times) * 1000, 1)
            figures[f"{name}_output_mb_s"] = round(received / seconds / 1024 / 1024, 2)

        feed_of_flood = app.source.feed(LoopKey("local", flood_id))
        assert feed_of_flood is not None

        table = app.screen.query_one(LoopsTable)
        table.focus()
        start, received = time.monotonic(), feed_of_flood.output_next or 0
        loops_times = await measure(
            ["down", "up"],
            lambda: app.watch(table, "cursor_row",
                              lambda *_: probe.took_effect(), init=False),
        )
        summary("loops_screen", loops_times, time.monotonic() - start,
                (feed_of_flood.output_next or 0) - received)

        app.open_detail(LoopKey("local", flood_id))
        while not isinstance(app.screen, DetailScreen) or app.screen.feed is None:
            await pilot.pause(0.1)
        detail = app.screen
        await asyncio.sleep(args.warmup)
        frames = detail.terminal.frames
        start, received = time.monotonic(), feed_of_flood.output_next or 0
        detail_times = await measure(
            ["slash", "escape"],
            lambda: app.watch(detail, "focused", lambda *_: probe.took_effect(), init=False),
        )
        seconds = time.monotonic() - start
        summary("detail_screen", detail_times, seconds,
                (feed_of_flood.output_next or 0) - received)
        figures["detail_terminal_fps"] = round((detail.terminal.frames - frames) / seconds, 1)
        figures["detail_bytes_skipped_mb"] = round(
            detail.terminal.emulator.skipped / 1024 / 1024, 1)

        terminal = detail.terminal
        terminal.focus()
        await pilot.pause(0.2)
        app.post_message(events.Key("pageup", None))  # leave the bottom: scrollback browsing
        await pilot.pause(0.3)
        start, received = time.monotonic(), feed_of_flood.output_next or 0
        scroll_times = await measure(
            ["up", "down"],
            lambda: app.watch(terminal, "scroll_y", lambda *_: probe.took_effect(), init=False),
        )
        summary("detail_scroll", scroll_times, time.monotonic() - start,
                (feed_of_flood.output_next or 0) - received)
        await app.action_quit()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=50)
    parser.add_argument("--remotes", type=int, default=3)
    parser.add_argument("--rate-mb", type=float, default=10.0)
    parser.add_argument("--presses", type=int, default=150)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    home = root / "h"
    os.environ["RALPH_HOME"] = str(home)
    for name in list(os.environ):
        if name.startswith("RALPH_") and name != "RALPH_HOME":
            del os.environ[name]
    remotes = [root / f"r{n}" for n in range(1, args.remotes + 1)]
    ralphds: list[subprocess.Popen[bytes]] = []
    try:
        tasks = _setup(root, [home, *remotes], args.loops, args.rate_mb)
        ralphds = [_start_ralphd(h) for h in (home, *remotes)]
        figures = asyncio.run(_run(args, tasks, remotes))
    finally:
        _cleanup(root, ralphds)
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loops": args.loops,
        "remotes": args.remotes,
        "rate_mb_s": args.rate_mb,
        "presses": args.presses,
        **figures,
        "target_p99_ms": TARGET_P99_MS,
    }
    print(f"machine: {result['cpu']}, {result['cores']} cores, Python {result['python']}; "
          f"{result['date']}; {args.loops} loops across this ralphd and {args.remotes} remote ones")
    for scene in ("loops_screen", "detail_screen", "detail_scroll"):
        print(f"{scene}: key press -> screen p50 {figures[scene + '_p50_ms']} ms, p99 "
              f"{figures[scene + '_p99_ms']} ms, max {figures[scene + '_max_ms']} ms "
              f"(target p99 <= {TARGET_P99_MS:g} ms); output reaching the dashboard "
              f"{figures[scene + '_output_mb_s']} MB/s")
    print(f"detail terminal: {figures['detail_terminal_fps']} frames/s, "
          f"{figures['detail_bytes_skipped_mb']} MB not drawn (faster than the view)")
    print(json.dumps(result))


def _cleanup(root: Path, ralphds: list[subprocess.Popen[bytes]]) -> None:
    """Stop the ralphds, then every process of this run (runners and agents: their command
    lines name the run's temporary folder), so none outlives the benchmark."""
    for ralphd in ralphds:
        if ralphd.poll() is None:
            ralphd.send_signal(signal.SIGTERM)
    for ralphd in ralphds:
        try:
            ralphd.wait(15)
        except subprocess.TimeoutExpired:
            ralphd.kill()
    marker = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


if __name__ == "__main__":
    main()
