"""Round-trip latency of a ``get_status``-style JSON-RPC call over a real Unix socket.

Three figures, each from sequential calls timed one by one:

- ``rpc`` — the client endpoint in this process, the server endpoint in another process (how the
  CLI talks to a runner): ``get_status`` answered with a small fixed object by an inline handler;
- ``rpc_same_process`` — both endpoints in one event loop over a Unix socket: the cost of the
  protocol stack itself, without waking a sleeping process;
- ``socket_floor`` — the same request bytes echoed between two processes with blocking sockets
  and no Python protocol code: what the machine itself costs for one round trip.

Prints p50/p99 in microseconds and the machine, then all numbers as one JSON object on the last
line.

    python benchmarks/bench_rpc_roundtrip.py [--calls 20000] [--warmup 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import cpu_model

from ralph_uv.protocol import Dispatcher
from ralph_uv.rpc import Endpoint
from ralph_uv.transports.base import AsyncioStream

_STATUS = {"loop_id": "bench", "status": "running", "iteration": 3, "stories": [2, 5]}
_REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"get_status"}\n'

methods: Dispatcher[None] = Dispatcher()


@methods.method("get_status", inline=True)
async def get_status(context: None) -> dict[str, Any]:
    return _STATUS


served: list[Endpoint] = []


async def _on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    endpoint = Endpoint(AsyncioStream(reader, writer), methods)
    served.append(endpoint)
    await endpoint.run()


async def _serve_rpc(path: str) -> None:
    server = await asyncio.start_unix_server(_on_connect, path)
    print("ready", flush=True)
    async with server:
        # The parent closes our stdin when it is done.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _serve_echo(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        print("ready", flush=True)
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


async def _time_calls(endpoint: Endpoint, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await endpoint.call("get_status")
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        start = clock()
        await endpoint.call("get_status")
        samples.append((clock() - start) / 1000)
    return samples


async def _rpc_client(path: str, calls: int, warmup: int) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(path)
    async with Endpoint(AsyncioStream(reader, writer)) as endpoint:
        return await _time_calls(endpoint, calls, warmup)


async def _rpc_same_process(path: str, calls: int, warmup: int) -> list[float]:
    server = await asyncio.start_unix_server(_on_connect, path)
    async with server:
        samples = await _rpc_client(path, calls, warmup)
        for endpoint in served:
            await endpoint.wait_closed()  # it sees our end close
        return samples


def _echo_client(path: str, calls: int, warmup: int) -> list[float]:
    samples = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        for i in range(warmup + calls):
            start = time.perf_counter_ns()
            sock.sendall(_REQUEST)
            sock.recv(65536)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def _with_server(mode: str, folder: str, measure: Any) -> list[float]:
    path = os.path.join(folder, f"{mode}.sock")
    server = subprocess.Popen(
        [sys.executable, __file__, f"--{mode}", path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        samples: list[float] = measure(path)
        return samples
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))], 1)

    return {"p50_us": at(0.50), "p99_us": at(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--serve-rpc", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_rpc:
        asyncio.run(_serve_rpc(args.serve_rpc))
        return
    if args.serve_echo:
        _serve_echo(args.serve_echo)
        return
    calls, warmup = args.calls, args.warmup
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as folder:
        rpc = _with_server(
            "serve-rpc", folder, lambda p: asyncio.run(_rpc_client(p, calls, warmup))
        )
        same = asyncio.run(_rpc_same_process(os.path.join(folder, "same.sock"), calls, warmup))
        floor = _with_server("serve-echo", folder, lambda p: _echo_client(p, calls, warmup))
    result: dict[str, Any] = {
        "benchmark": "rpc_roundtrip_unix",
        "calls": calls,
        "rpc": _summary(rpc),
        "rpc_same_process": _summary(same),
        "socket_floor": _summary(floor),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        # Other work on the machine skews every figure: the 1-minute load before and after.
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"machine: {result['nproc']} CPUs, {result['cpu']}, Python {result['python']}, "
        f"load average {result['loadavg'][0]} → {result['loadavg'][1]}"
    )
    print(f"get_status round trip over a Unix socket, {calls} sequential calls each:")
    for key, label in [
        ("rpc", "client and server in two processes"),
        ("rpc_same_process", "client and server in one event loop"),
        ("socket_floor", "blocking echo, two processes, no RPC"),
    ]:
        figures = result[key]
        print(f"  {label:40} p50 {figures['p50_us']:7.1f} µs   p99 {figures['p99_us']:7.1f} µs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
