"""Time to the first screen of ``ralph-uv attach``, locally.

In a throw-away RALPH_HOME and git repository, ``ralph-uv run --detach`` starts a loop (under a
real ralphd) whose agent prints ``--output-mb`` of numbered lines and then waits. Then, ``--runs``
times, ``ralph-uv attach TASK`` runs in a fresh pseudo-terminal (120x40) and the clock stops
when the screen shows both the agent's last line (replayed from the journal) and the status
bar; the client is then detached (Ctrl-] d). Two figures, medians and worst:

- process start -> first screen (what a person waits for, Python's start-up included);
- terminal set up -> first screen: from the client's first byte on the terminal (the
  alternate-screen switch, written once ralphd has relayed it to the loop and hello and
  get_status are answered) to the screen: the journal replay, the subscription, the drawing.

Targets: first screen within 1 s of pressing Enter, and within 200 ms of the terminal set-up.

Usage: python benchmarks/bench_attach.py [--runs 10] [--output-mb 2]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import pty
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from _common import cpu_model, git

RALPH = [sys.executable, "-m", "ralph_uv.cli.__main__"]
TARGET_TOTAL = 1.0
TARGET_CLIENT = 0.2
_AGENT = (
    "import sys, time\n"
    "out = sys.stdout\n"
    "total = int(sys.argv[1])\n"
    "i = 0\n"
    "written = 0\n"
    "while written < total:\n"
    "    line = f'line {i:08d} ' + 'x' * 60 + '\\n'\n"
    "    out.write(line)\n"
    "    written += len(line)\n"
    "    i += 1\n"
    "out.write('LAST-LINE-OF-OUTPUT\\n')\n"
    "out.flush()\n"
    "time.sleep(3600)\n"
)


def _setup(root: Path, output_bytes: int) -> Path:
    repo = root / "repo"
    task = repo / "tasks" / "bench"
    task.mkdir(parents=True)
    story = {"id": "US-001", "title": "t", "description": "d", "priority": 1, "passes": False,
             "acceptanceCriteria": [{"description": "ok", "passes": False}]}
    prd = {"schemaVersion": "2.5", "project": "bench", "branchName": "ralph/bench",
           "description": "bench", "userStories": [story]}
    (task / "prd.json").write_text(json.dumps(prd, indent=2) + "\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "b@example.com")
    git(repo, "config", "user.name", "Bench")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    agent = root / "agent.py"
    agent.write_text(_AGENT)
    config = root / "home" / "config"
    config.mkdir(parents=True)
    command = [sys.executable, str(agent), str(output_bytes), "{prompt_file}"]
    (config / "config.toml").write_text(
        "pause = 0\nterminate_grace = 1.0\n\n[agents.flood]\n"
        f"command = {json.dumps(command)}\n"
    )
    return repo


def _attach_once(repo: Path, env: dict[str, str]) -> tuple[float, float]:
    """One attach in a new PTY; (process start -> first screen, connected -> first screen)."""
    started = time.perf_counter()
    pid, master = pty.fork()
    if pid == 0:  # the child: a terminal of 120x40, then the CLI
        os.chdir(repo)
        os.execve(RALPH[0], [*RALPH, "attach", "bench"], env)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    seen = b""
    entered: float | None = None
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                raise RuntimeError(f"no first screen within 30 s; saw {seen[-500:]!r}")
            chunk = os.read(master, 65536)
            if not chunk:
                raise RuntimeError(f"attach exited early: {seen[-2000:]!r}")
            seen += chunk
            if entered is None and b"\x1b[?1049h" in seen:
                entered = time.perf_counter()
            if b"LAST-LINE-OF-OUTPUT" in seen and b"iter 1/" in seen:
                done = time.perf_counter()
                break
        os.write(master, b"\x1d" + b"d")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    if not os.read(master, 65536):
                        break
                except OSError:
                    break
    finally:
        os.waitpid(pid, 0)
        os.close(master)
    assert entered is not None
    return done - started, done - entered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--output-mb", type=float, default=2.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ba-", dir="/tmp"))
    env = {**os.environ, "RALPH_HOME": str(root / "home"), "TERM": "xterm-256color"}
    env = {k: v for k, v in env.items() if not k.startswith("RALPH_") or k == "RALPH_HOME"}
    try:
        repo = _setup(root, int(args.output_mb * 1024 * 1024))
        subprocess.run([*RALPH, "run", "bench", "--detach", "--agent", "flood"], cwd=repo,
                       env=env, check=True, capture_output=True, timeout=120)
        journal = root / "home" / "state" / "loops"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(b"LAST-LINE-OF-OUTPUT" in p.read_bytes()[-4096:]
                   for p in journal.glob("*/output.journal/*.seg")):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the agent's output never reached the journal")
        _attach_once(repo, env)  # warm-up: the page cache, ralphd's first connection
        totals, clients = [], []
        for _ in range(args.runs):
            total, client = _attach_once(repo, env)
            totals.append(total)
            clients.append(client)
        subprocess.run([*RALPH, "stop", "bench", "--now"], cwd=repo, env=env,
                       capture_output=True, timeout=60, check=False)
    finally:
        subprocess.run([sys.executable, "-m", "ralph_uv.daemon", "stop"], env=env,
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "runs": args.runs,
        "output_mb": args.output_mb,
        "first_screen_total_p50_ms": round(statistics.median(totals) * 1000, 1),
        "first_screen_total_max_ms": round(max(totals) * 1000, 1),
        "first_screen_client_p50_ms": round(statistics.median(clients) * 1000, 1),
        "first_screen_client_max_ms": round(max(clients) * 1000, 1),
        "target_total_ms": TARGET_TOTAL * 1000,
        "target_client_ms": TARGET_CLIENT * 1000,
    }
    print(f"attach, process start -> first screen: p50 {figures['first_screen_total_p50_ms']} ms,"
          f" max {figures['first_screen_total_max_ms']} ms (target < {TARGET_TOTAL * 1000:g} ms)")
    print(f"attach, terminal set up -> first screen: p50 "
          f"{figures['first_screen_client_p50_ms']} ms, max {figures['first_screen_client_max_ms']}"
          f" ms (target < {TARGET_CLIENT * 1000:g} ms)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
