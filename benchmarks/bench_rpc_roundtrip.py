"""Round-trip latency of a ``get_status``-style JSON-RPC call over a real Unix socket.

A server process (this script with ``--serve``) answers ``get_status`` with a small fixed
object; the client makes sequential calls and times each one. Prints p50/p99 in microseconds and
the machine, then the numbers as one JSON object on the last line.

    python benchmarks/bench_rpc_roundtrip.py [--calls 20000] [--warmup 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import AsyncioStream

_STATUS = {"loop_id": "bench", "status": "running", "iteration": 3, "stories": [2, 5]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def _serve(path: str) -> None:
    methods: Dispatcher[None] = Dispatcher()

    @methods.method("get_status")
    async def get_status(context: None) -> dict[str, Any]:
        return _STATUS

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Endpoint(AsyncioStream(reader, writer), methods).run()

    server = await asyncio.start_unix_server(on_connect, path)
    print("ready", flush=True)
    async with server:
        # The parent closes our stdin when it is done.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _measure(path: str, calls: int, warmup: int) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(path)
    samples: list[float] = []
    async with Endpoint(AsyncioStream(reader, writer)) as endpoint:
        for _ in range(warmup):
            await endpoint.call("get_status")
        clock = time.perf_counter_ns
        for _ in range(calls):
            start = clock()
            await endpoint.call("get_status")
            samples.append((clock() - start) / 1000)
    return samples


def _percentile(sorted_samples: list[float], fraction: float) -> float:
    index = min(len(sorted_samples) - 1, round(fraction * (len(sorted_samples) - 1)))
    return sorted_samples[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as folder:
        path = os.path.join(folder, "s.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            samples = sorted(asyncio.run(_measure(path, args.calls, args.warmup)))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    result = {
        "benchmark": "rpc_roundtrip_unix",
        "calls": len(samples),
        "p50_us": round(_percentile(samples, 0.50), 1),
        "p99_us": round(_percentile(samples, 0.99), 1),
        "mean_us": round(statistics.fmean(samples), 1),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }
    print(f"machine: {result['nproc']} CPUs, {result['cpu']}, Python {result['python']}")
    print(f"get_status round trip over a Unix socket, {result['calls']} sequential calls")
    print(f"p50 {result['p50_us']} µs   p99 {result['p99_us']} µs   mean {result['mean_us']} µs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
