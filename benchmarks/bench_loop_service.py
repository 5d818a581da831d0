"""The per-loop service of a real runner process, measured over its real Unix socket.

Starts ``python -m ralph_uv.runner`` twice (in a throw-away RALPH_HOME), each running a loop
whose agent is a tiny program in the runner's PTY, and measures:

- ``get_status`` round trip (sequential calls, p50/p99) — target p50 <= 50 us;
- keystroke echo: ``write_pty`` of one byte until that byte comes back as an ``output`` event
  (the agent is ``cat``; the terminal echoes) — target p99 <= 2 ms;
- output throughput PTY -> one live subscriber (the agent writes N bytes as fast as it can)
  — target >= 50 MB/s;
- journal replay -> one subscriber (``since.output = 0``) — target >= 150 MB/s;
- fan-out: aggregate throughput to 1, 10 and 100 live subscribers, and 10 subscribers with and
  without an 11th that never reads — target: the stalled one costs the others <= 10 %.

Prints the figures with the machine and the date, then all of them as one JSON line.

    python benchmarks/bench_loop_service.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, git, percentile

MB = 1_000_000
_LIMIT = 32 * 1024 * 1024  # the benchmark's line buffer: far above any notification

# The flood agent: terminal echo off, then "N\n" makes it write N bytes as fast as it can.
_FLOOD_AGENT = textwrap.dedent(
    """
    import os, sys, termios
    attrs = termios.tcgetattr(0)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    block = bytes(range(33, 127)) * 1400
    print("flood agent ready", flush=True)
    for line in sys.stdin:
        left = int(line)
        view = memoryview(block)
        while left > 0:
            left -= os.write(1, view[: min(len(block), left)])
    """
)


class Bench:
    """The throw-away home, the task and the runner processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        os.environ["RALPH_HOME"] = str(root / "home")
        from ralph_uv.config import paths

        self.paths = paths()
        self.runners: list[subprocess.Popen[bytes]] = []
        self.task = self._make_task()
        agent_file = root / "flood_agent.py"
        agent_file.write_text(_FLOOD_AGENT)
        config = self.paths.config_file
        config.parent.mkdir(parents=True, exist_ok=True)
        cat = ["sh", "-c", "exec cat", "sh", "{prompt_file}"]
        flood = [sys.executable, str(agent_file), "{prompt_file}"]
        config.write_text(
            f"[agents.cat]\ncommand = {json.dumps(cat)}\n"
            f"[agents.flood]\ncommand = {json.dumps(flood)}\n"
        )

    def _make_task(self) -> Path:
        repo = self.root / "repo"
        task = repo / "tasks" / "bench"
        task.mkdir(parents=True)
        prd = {
            "schemaVersion": "2.5", "project": "bench", "branchName": "ralph/bench",
            "userStories": [{"id": "US-001", "title": "t", "priority": 1, "passes": False,
                             "acceptanceCriteria": [{"description": "d", "passes": False}]}],
        }
        (task / "prd.json").write_text(json.dumps(prd))
        git(repo, "init", "-q", "-b", "main")
        git(repo, "-c", "user.email=b@example.com", "-c", "user.name=b", "add", "-A")
        git(repo, "-c", "user.email=b@example.com", "-c", "user.name=b", "commit", "-qm", "i")
        return task

    def spawn_runner(self, loop_id: str, agent: str) -> Path:
        """Write the spec and start the runner detached, as ralphd does; its socket path."""
        from ralph_uv.runner.spec import write_spec

        loop_dir = self.paths.loop_dir(loop_id)
        loop_dir.mkdir(parents=True, mode=0o700)
        write_spec(
            loop_dir / "spec.json", loop_id=loop_id, task_dir=self.task, task_name="bench",
            agent=agent,
            config={"pause": 0, "iteration_timeout": 3600.0, "terminate_grace": 1.0,
                    "journal_retention": 4 * 1024 * MB},
        )
        with open(loop_dir / "runner.log", "ab") as log:
            self.runners.append(subprocess.Popen(
                [sys.executable, "-m", "ralph_uv.runner", "--spec",
                 str(loop_dir / "spec.json"), "--linger", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            ))
        return self.paths.loop_socket(loop_id)

    async def start_runner(self, loop_id: str, agent: str) -> Path:
        """Start a runner and wait for its socket."""
        socket_path = self.spawn_runner(loop_id, agent)
        for _ in range(500):
            if socket_path.exists():
                return socket_path
            await asyncio.sleep(0.02)
        raise SystemExit(f"runner did not start; see {self.paths.loop_dir(loop_id)}/runner.log")

    def stop(self) -> None:
        for process in self.runners:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if process.poll() is not None:
                    break
                process.send_signal(sig)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    continue


class Control:
    """A full JSON-RPC client (the library's own endpoint) that keeps output offsets."""

    def __init__(self) -> None:
        self.next_offset = 0
        self.arrived = asyncio.Event()
        self.last_data = b""

    async def open(self, socket_path: Path, name: str) -> Any:
        from ralph_uv.protocol import Dispatcher
        from ralph_uv.rpc import Endpoint
        from ralph_uv.transports.unix import open_unix

        methods: Dispatcher[Control] = Dispatcher()

        @methods.method("event")
        async def on_event(context: Control, params: Any) -> None:
            if params["type"] == "output":
                context.next_offset = params["data"]["next"]
                context.last_data = base64.b64decode(params["data"]["data"])
                context.arrived.set()

        self.endpoint = Endpoint(await open_unix(socket_path), methods, context=self)
        self.endpoint.start()
        await self.endpoint.call("hello", {"protocol": "1.0", "client": name})
        return self.endpoint


class RawSubscriber:
    """A lean subscriber: frames lines and reads offsets, without decoding the base64."""

    def __init__(self) -> None:
        self.next_offset = 0
        self.received = 0

    async def open(self, socket_path: Path, since: int | None, *, read: bool = True) -> int:
        self.reader, self.writer = await asyncio.open_unix_connection(
            str(socket_path), limit=_LIMIT
        )
        params = {"streams": ["output"], "since": {"output": since}}
        self.writer.write(
            b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":"1.0",'
            b'"client":"bench"}}\n'
            + json.dumps({"jsonrpc": "2.0", "id": 2, "method": "subscribe",
                          "params": params}).encode() + b"\n"
        )
        if not read:
            return -1
        while True:
            message = json.loads(await self.reader.readline())
            if message.get("id") == 2:
                self.next_offset = message["result"]["output_end"] if since is None else since
                return int(message["result"]["output_end"])

    async def read_until(self, target: int) -> float:
        readline = self.reader.readline
        loads = json.loads
        while self.next_offset < target:
            message = loads(await readline())
            params = message.get("params")
            if params and params["type"] == "output":
                new = params["data"]["next"]
                self.received += new - self.next_offset
                self.next_offset = new
        return time.perf_counter()

    def close(self) -> None:
        self.writer.close()


async def _get_status(socket_path: Path, calls: int) -> dict[str, float]:
    control = Control()
    endpoint = await control.open(socket_path, "status")
    for _ in range(calls // 10):
        await endpoint.call("get_status")
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        await endpoint.call("get_status")
        samples.append((clock() - start) / 1000)
    await endpoint.close()
    return {"p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99),
            "mean_us": statistics.fmean(samples), "calls": calls}


def _get_status_plain(socket_path: Path, calls: int) -> dict[str, float]:
    """The same round trip from a minimal blocking client: the service's share of the time."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        reader = sock.makefile("rb")
        request = b'{"jsonrpc":"2.0","id":1,"method":"get_status"}\n'
        samples = []
        clock = time.perf_counter_ns
        for index in range(calls + calls // 10):
            start = clock()
            sock.sendall(request)
            reader.readline()
            if index >= calls // 10:
                samples.append((clock() - start) / 1000)
    return {"p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99),
            "calls": calls}


async def _keystroke_echo(socket_path: Path, keys: int) -> dict[str, float]:
    control = Control()
    endpoint = await control.open(socket_path, "keys")
    await endpoint.call("set_interactive_mode", {"enabled": True})
    await endpoint.call("subscribe", {"streams": ["output"]})
    samples = []
    clock = time.perf_counter_ns
    key = base64.b64encode(b"k").decode()
    for index in range(keys):
        if index % 200 == 199:  # end the line, so cat's canonical buffer never fills
            control.arrived.clear()
            await endpoint.call("write_pty", {"data": base64.b64encode(b"\r").decode()})
            while not control.last_data.endswith(b"k\r\n"):
                control.arrived.clear()
                await control.arrived.wait()
            continue
        before = control.next_offset
        start = clock()
        await endpoint.call("write_pty", {"data": key})
        while control.next_offset <= before:
            control.arrived.clear()
            await control.arrived.wait()
        samples.append((clock() - start) / 1000)
    await endpoint.close()
    return {"p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99),
            "keys": len(samples)}


async def _flood(control: Any, size: int) -> None:
    await control.call("write_pty", {"data": base64.b64encode(f"{size}\r".encode()).decode()})


async def _fan_out(socket_path: Path, control: Any, subscribers: int, size: int,
                   stalled: int = 0) -> dict[str, float]:
    """``subscribers`` live subscribers (plus ``stalled`` that never read) while the agent
    writes ``size`` bytes; aggregate MB/s of the readers."""
    readers = [RawSubscriber() for _ in range(subscribers)]
    idle = [RawSubscriber() for _ in range(stalled)]
    end = 0
    for reader in readers:
        end = await reader.open(socket_path, None)
    for sub in idle:
        await sub.open(socket_path, 0, read=False)  # replays everything, reads nothing
    status = await control.call("get_status")
    start_offset = status["output_end"]
    for reader in readers:
        reader.next_offset = max(reader.next_offset, end)
    target = start_offset + size
    started = time.perf_counter()
    waits = [asyncio.create_task(r.read_until(target)) for r in readers]
    await _flood(control, size)
    finished = await asyncio.gather(*waits)
    elapsed = max(finished) - started
    for sub in [*readers, *idle]:
        sub.close()
    delivered = sum(r.received for r in readers)
    return {
        "subscribers": subscribers, "stalled": stalled, "bytes_each": size,
        "seconds": elapsed, "aggregate_mb_s": delivered / elapsed / MB,
        "per_subscriber_mb_s": delivered / subscribers / elapsed / MB,
    }


async def _replay(socket_path: Path) -> dict[str, float]:
    reader = RawSubscriber()
    started = time.perf_counter()
    end = await reader.open(socket_path, 0)
    finished = await reader.read_until(end)
    reader.close()
    return {"bytes": end, "seconds": finished - started,
            "mb_s": end / (finished - started) / MB}


async def _run(quick: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    bench = Bench(root)
    results: dict[str, Any] = {}
    try:
        cat_socket = await bench.start_runner("bench-cat", "cat")
        flood_socket = await bench.start_runner("bench-flood", "flood")
        await asyncio.sleep(1.0)  # both agents started
        results["get_status"] = await _get_status(cat_socket, 2000 if quick else 20000)
        results["get_status_plain_client"] = await asyncio.to_thread(
            _get_status_plain, cat_socket, 2000 if quick else 20000
        )
        results["keystroke_echo"] = await _keystroke_echo(cat_socket, 300 if quick else 3000)

        control = Control()
        endpoint = await control.open(flood_socket, "control")
        await endpoint.call("set_interactive_mode", {"enabled": True})
        live_size = (32 if quick else 200) * MB
        results["pty_to_subscriber"] = await _fan_out(flood_socket, endpoint, 1, live_size)
        results["replay"] = await _replay(flood_socket)
        fan_size = (8 if quick else 32) * MB
        fan: list[dict[str, float]] = []
        for count in (1, 10, 100):
            size = fan_size if count < 100 else fan_size // 4
            fan.append(await _fan_out(flood_socket, endpoint, count, size))
        results["fan_out"] = fan
        rounds = 1 if quick else 3
        without = [await _fan_out(flood_socket, endpoint, 10, fan_size) for _ in range(rounds)]
        with_stalled = [
            await _fan_out(flood_socket, endpoint, 10, fan_size, stalled=1) for _ in range(rounds)
        ]
        best = max(r["aggregate_mb_s"] for r in without)
        best_stalled = max(r["aggregate_mb_s"] for r in with_stalled)
        results["stalled_subscriber"] = {
            "ten_mb_s": best, "ten_plus_stalled_mb_s": best_stalled,
            "drop_percent": 100 * (best - best_stalled) / best,
        }
        await endpoint.call("stop", {"when": "now"})
        await endpoint.close()
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    args = parser.parse_args()
    results = asyncio.run(_run(args.quick))
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(),
        "load_1m": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    status, keys = results["get_status"], results["keystroke_echo"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
          f"load {machine['load_1m']:.2f}, {machine['date']}")
    print(f"get_status round trip: p50 {status['p50_us']:.0f} us, p99 {status['p99_us']:.0f} us "
          f"(target p50 <= 50 us)")
    plain = results["get_status_plain_client"]
    print(f"get_status from a minimal blocking client: p50 {plain['p50_us']:.0f} us, "
          f"p99 {plain['p99_us']:.0f} us")
    print(f"keystroke echo: p50 {keys['p50_us']:.0f} us, p99 {keys['p99_us']:.0f} us "
          f"(target p99 <= 2000 us)")
    live = results["pty_to_subscriber"]
    print(f"PTY -> 1 subscriber: {live['aggregate_mb_s']:.0f} MB/s over "
          f"{live['bytes_each'] / MB:.0f} MB (target >= 50 MB/s)")
    replay = results["replay"]
    print(f"journal replay -> 1 subscriber: {replay['mb_s']:.0f} MB/s over "
          f"{replay['bytes'] / MB:.0f} MB (target >= 150 MB/s)")
    for row in results["fan_out"]:
        print(f"fan-out to {row['subscribers']:3d}: aggregate {row['aggregate_mb_s']:.0f} MB/s, "
              f"{row['per_subscriber_mb_s']:.1f} MB/s each")
    stalled = results["stalled_subscriber"]
    print(f"10 subscribers: {stalled['ten_mb_s']:.0f} MB/s; with one stalled: "
          f"{stalled['ten_plus_stalled_mb_s']:.0f} MB/s (drop {stalled['drop_percent']:.1f} %, "
          "target <= 10 %)")
    print(json.dumps({"benchmark": "loop_service", "machine": machine, **results}))


if __name__ == "__main__":
    main()
