"""ralphd at rest: CPU and memory of a daemon supervising idle loops.

Starts a real ralphd (``python -m ralph_uv.daemon start --foreground``) in a temporary
RALPH_HOME and ``--loops`` loops (default 20) whose agent is a real process that sleeps, each
in its own git repository. Once every loop runs, it samples ralphd's utime+stime from
``/proc/PID/stat`` over ``--seconds`` (default 10) and its RSS; the runners' CPU over the same
window is reported beside it. Then it stops the loops and ralphd.

Usage: python benchmarks/bench_daemon_idle.py [--loops 20] [--seconds 10]
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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, git

ROOT = Path(tempfile.mkdtemp(prefix="bench-rd-", dir="/tmp"))
os.environ["RALPH_HOME"] = str(ROOT / "home")

from ralph_uv.client.daemon import DaemonClient, connect_daemon  # noqa: E402
from ralph_uv.config import paths  # noqa: E402

AGENT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "long_agent.py"
TICKS = os.sysconf("SC_CLK_TCK")
TARGET_CPU_PERCENT = 0.5


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _task(number: int) -> Path:
    repo = ROOT / f"repo{number}"
    task = repo / "tasks" / "idle"
    task.mkdir(parents=True)
    prd = {
        "schemaVersion": "2.5", "project": "idle", "branchName": "ralph/idle",
        "description": "idle benchmark",
        "userStories": [{"id": "US-001", "title": "wait", "description": "wait",
                         "acceptanceCriteria": [{"description": "never", "passes": False}],
                         "priority": 1, "passes": False}],
    }
    (task / "prd.json").write_text(json.dumps(prd))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "user.email=b@example.com", "-c", "user.name=B", "add", "-A")
    git(repo, "-c", "user.email=b@example.com", "-c", "user.name=B", "commit", "-qm", "init")
    return task


def _configure(loops: int) -> None:
    config = paths().config
    config.mkdir(parents=True)
    command = json.dumps([sys.executable, str(AGENT), "sleep", "{prompt_file}"])
    (config / "config.toml").write_text(
        f"pause = 0\niteration_timeout = 86400\n[agents.sleep]\ncommand = {command}\n"
    )
    (config / "daemon.toml").write_text(f"max_concurrent_loops = {loops + 1}\n")


async def _start_loops(loops: int) -> list[int]:
    tasks = [_task(i) for i in range(loops)]
    daemon = await connect_daemon(autostart=False, client="bench")
    try:
        records = [await daemon.start_loop(task, agent="sleep") for task in tasks]
        await _wait_started(daemon, [r.loop_id for r in records])
    finally:
        await daemon.close()
    return [r.pid or 0 for r in records]


async def _wait_started(daemon: DaemonClient, loop_ids: list[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = {r.loop_id for r in await daemon.list_loops() if r.status.value == "running"}
        started = all(
            b"started" in b"".join(
                p.read_bytes() for p in (paths().loop_dir(i) / "output.journal").glob("*.seg")
            )
            for i in loop_ids
        )
        if running >= set(loop_ids) and started:
            return
        await asyncio.sleep(0.2)
    raise SystemExit("the loops did not all start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    machine = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    print(f"machine: {machine}")
    _configure(args.loops)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ralph_uv.daemon", "start", "--foreground"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    runners: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not paths().daemon_socket.exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("ralphd did not start")
            time.sleep(0.05)
        print(f"starting {args.loops} loops with a sleeping agent ...")
        runners = asyncio.run(_start_loops(args.loops))
        time.sleep(1.0)  # let start-up work settle before measuring rest
        print(f"measuring ralphd (pid {daemon.pid}) for {args.seconds:g} s ...")
        cpu_before = _cpu_seconds(daemon.pid)
        runners_before = sum(_cpu_seconds(pid) for pid in runners)
        started = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - started
        cpu = _cpu_seconds(daemon.pid) - cpu_before
        runners_cpu = sum(_cpu_seconds(pid) for pid in runners) - runners_before
        rss = _rss(daemon.pid)
        runner_rss = [_rss(pid) for pid in runners]
    finally:
        for pid in runners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(ROOT, ignore_errors=True)
    results = {
        "loops": args.loops,
        "seconds": round(elapsed, 2),
        "ralphd_cpu_seconds": round(cpu, 3),
        "ralphd_cpu_percent": round(100 * cpu / elapsed, 3),
        "ralphd_rss_mib": round(rss / 2**20, 1),
        "runners_cpu_percent_total": round(100 * runners_cpu / elapsed, 3),
        "runner_rss_mib_median": round(sorted(runner_rss)[len(runner_rss) // 2] / 2**20, 1),
        "cpu_target_percent": TARGET_CPU_PERCENT,
    }
    results["cpu_ok"] = results["ralphd_cpu_percent"] <= TARGET_CPU_PERCENT
    print(
        f"ralphd with {args.loops} idle loops: {results['ralphd_cpu_seconds']} s of CPU in "
        f"{results['seconds']} s ({results['ralphd_cpu_percent']} % of a core), RSS "
        f"{results['ralphd_rss_mib']} MiB; runners together "
        f"{results['runners_cpu_percent_total']} % of a core, median RSS "
        f"{results['runner_rss_mib_median']} MiB each"
    )
    print(json.dumps({"benchmark": "daemon_idle", **machine, **results}))


if __name__ == "__main__":
    main()
