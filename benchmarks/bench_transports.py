"""Transports compared: JSON-RPC round trips over a Unix socket and over SSH, SSH connect cost,
raw throughput over SSH, and 100 remote commands with three ways of using ssh.

A server process (this script with ``--serve``) answers a hello-like ``echo`` call on the
"remote" ralphd socket of a real sshd started on 127.0.0.1 (tests/fixtures/sshd.py), and sends
raw bytes on a second socket. Measured:

- round trip p50/p99 of ``echo`` over the Unix socket, over SSH direct-streamlocal (warm
  pooled connection), and over the ``ralph-uv bridge`` fallback;
- one-time SSH cost: a cold ``connect()`` (handshake, ``ralph-uv bridge --print-socket`` over
  exec, channel), and a further channel on the warm connection;
- raw throughput from the remote socket to the client over direct-streamlocal (MB/s; target
  >= 50), with the Unix socket for reference;
- 100 ``true`` commands: one ``ssh host true`` each, the same with ControlMaster, and
  :func:`~ralph_uv.transports.ssh_exec` on the pooled connection.

Prints the machine and date, a table, then one JSON object on the last line.

    python benchmarks/bench_transports.py [--calls 3000] [--megabytes 256] [--ops 100]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, percentile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.sshd import SSHServer, start_sshd  # noqa: E402

from ralph_uv.protocol import Dispatcher  # noqa: E402
from ralph_uv.rpc import Endpoint  # noqa: E402
from ralph_uv.transports import Stream, close_connections, connect, ssh_exec  # noqa: E402
from ralph_uv.transports.ssh import open_remote_unix  # noqa: E402
from ralph_uv.transports.unix import open_unix, start_unix_server  # noqa: E402

_HELLO = {"protocol": "1.0", "client": "bench", "capabilities": ["x", "y"]}
_CHUNK = 256 * 1024


# ------------------------------------------------------------------------------ the server


async def _serve(path: str) -> None:
    methods: Dispatcher[None] = Dispatcher()

    @methods.method("echo")
    async def echo(context: None, params: Any) -> Any:
        return {"protocol": "1.0", "server": "bench", "echo": params}

    @methods.method("hello")  # `ralph-uv bridge --print-socket` checks that "ralphd" answers
    async def hello(context: None, params: Any) -> Any:
        return {"protocol": "1.0", "server": "bench"}

    async def rpc(stream: Stream) -> None:
        await Endpoint(stream, methods).run()

    async def blast(stream: Stream) -> None:
        header = b""
        while len(header) < 8:
            chunk = await stream.read(8 - len(header))
            if not chunk:
                return
            header += chunk
        (remaining,) = struct.unpack("!Q", header)
        block = b"x" * _CHUNK
        while remaining > 0:
            stream.write(block[: min(remaining, _CHUNK)])
            remaining -= min(remaining, _CHUNK)
            await stream.drain()
        stream.close()

    servers = [await start_unix_server(Path(path), rpc),
               await start_unix_server(Path(path + ".raw"), blast)]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        server.close()


# ---------------------------------------------------------------------------- measurements


async def _round_trips(stream: Stream, calls: int, warmup: int) -> dict[str, float]:
    samples: list[float] = []
    async with Endpoint(stream) as endpoint:
        for _ in range(warmup):
            await endpoint.call("echo", _HELLO)
        for _ in range(calls):
            start = time.perf_counter_ns()
            await endpoint.call("echo", _HELLO)
            samples.append((time.perf_counter_ns() - start) / 1000)
    return {"p50_us": round(percentile(samples, 0.5), 1),
            "p99_us": round(percentile(samples, 0.99), 1)}


async def _throughput(stream: Stream, size: int) -> float:
    stream.write(struct.pack("!Q", size))
    await stream.drain()
    received = 0
    start = time.perf_counter()
    while chunk := await stream.read(_CHUNK):
        received += len(chunk)
    elapsed = time.perf_counter() - start
    stream.close()
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    return round(size / elapsed / 1e6, 1)


async def _ssh_figures(server: SSHServer, args: argparse.Namespace) -> dict[str, Any]:
    options = server.options()
    result: dict[str, Any] = {}
    start = time.perf_counter()
    first = await connect(server.url, options=options)
    result["ssh_cold_connect_ms"] = round((time.perf_counter() - start) * 1000, 1)
    assert first.extra["ssh_channel"] == "direct-streamlocal"
    start = time.perf_counter()
    second = await connect(server.url, options=options)
    result["ssh_warm_channel_ms"] = round((time.perf_counter() - start) * 1000, 2)
    second.close()
    result["ssh_streamlocal"] = await _round_trips(first, args.calls, args.calls // 10)
    raw = await open_remote_unix(server.url, str(server.remote_socket) + ".raw", options)
    result["ssh_throughput_mb_s"] = await _throughput(raw, args.megabytes * 1024 * 1024)
    await close_connections()
    start = time.perf_counter()
    status = await ssh_exec(server.url, ["true"], options=options)
    result["ssh_cold_exec_true_ms"] = round((time.perf_counter() - start) * 1000, 1)
    assert status.exit_status == 0
    await close_connections()
    return result


async def _bridge_figures(server: SSHServer, args: argparse.Namespace) -> dict[str, Any]:
    options = server.options()
    start = time.perf_counter()
    stream = await connect(server.url, options=options)  # learns that streamlocal is refused
    cold = (time.perf_counter() - start) * 1000
    assert stream.extra["ssh_channel"] == "exec-bridge"
    start = time.perf_counter()
    warm = await connect(server.url, options=options)
    warm_ms = (time.perf_counter() - start) * 1000
    warm.close()
    figures = await _round_trips(stream, args.calls // 3, args.calls // 30)
    await close_connections()
    return {"bridge_cold_connect_ms": round(cold, 1), "bridge_warm_channel_ms": round(warm_ms, 1),
            "ssh_bridge": figures}


async def _local_figures(socket_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    rpc = await _round_trips(await open_unix(socket_path), args.calls, args.calls // 10)
    raw = await open_unix(Path(str(socket_path) + ".raw"))
    return {"unix": rpc,
            "unix_throughput_mb_s": await _throughput(raw, args.megabytes * 1024 * 1024)}


def _time_commands(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return time.perf_counter() - start


async def _pooled_commands(server: SSHServer, ops: int) -> float:
    options = server.options()
    start = time.perf_counter()
    for _ in range(ops):
        result = await ssh_exec(server.url, ["true"], options=options)
        assert result.exit_status == 0
    elapsed = time.perf_counter() - start
    await close_connections()
    return elapsed


def _hundred_ops(server: SSHServer, ops: int, folder: Path) -> dict[str, float]:
    plain = _time_commands([server.ssh_argv("true") for _ in range(ops)])
    control = ("-o", "ControlMaster=auto", "-o", f"ControlPath={folder}/cm-%C",
               "-o", "ControlPersist=60")
    shared = _time_commands([server.ssh_argv("true", extra=control) for _ in range(ops)])
    subprocess.run(server.ssh_argv(extra=(*control, "-O", "exit")), capture_output=True)
    pooled = asyncio.run(_pooled_commands(server, ops))
    return {"ssh_each_s": round(plain, 2), "ssh_controlmaster_s": round(shared, 2),
            "ralph_pooled_s": round(pooled, 2)}


# ------------------------------------------------------------------------------------ main


def _run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    os.environ["HOME"] = str(root)  # ssh and asyncssh must not read the real ~/.ssh
    os.environ.pop("SSH_AUTH_SOCK", None)
    os.environ["RALPH_HOME"] = str(root / "local")
    servers: list[SSHServer] = []
    serve: subprocess.Popen[str] | None = None
    try:
        sshd = start_sshd(root / "sshd", streamlocal=True)
        servers.append(sshd)
        serve = subprocess.Popen([sys.executable, __file__, "--serve", str(sshd.remote_socket)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert serve.stdout is not None
        if serve.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark server did not start")
        result: dict[str, Any] = {}
        result.update(asyncio.run(_local_figures(sshd.remote_socket, args)))
        result.update(asyncio.run(_ssh_figures(sshd, args)))
        no_streamlocal = start_sshd(root / "sshd-bridge", streamlocal=False)
        servers.append(no_streamlocal)
        # Same socket, reached through the second server (the same machine and RALPH_HOME).
        os.symlink(sshd.remote_home / "run", no_streamlocal.remote_home / "run")
        result.update(asyncio.run(_bridge_figures(no_streamlocal, args)))
        result["hundred_ops"] = _hundred_ops(sshd, args.ops, root)
        result["ssh_logins"] = sshd.accepted_logins()
        return result
    finally:
        if serve is not None and serve.stdin is not None:
            serve.stdin.close()
            serve.wait(10)
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    result = {"benchmark": "transports", **_run(args)}
    result.update({
        "date": datetime.date.today().isoformat(), "nproc": os.cpu_count(),
        "cpu": cpu_model(), "python": platform.python_version(),
        "openssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                  text=True).stderr.strip(),
    })
    ops = result["hundred_ops"]
    print(f"machine: {result['nproc']} CPUs, {result['cpu']}, Python {result['python']}, "
          f"{result['openssh']}; {result['date']}")
    print(f"echo round trip, {args.calls} sequential calls (p50 / p99 µs):")
    for name in ("unix", "ssh_streamlocal", "ssh_bridge"):
        print(f"  {name:16} {result[name]['p50_us']:>9} / {result[name]['p99_us']}")
    print(f"SSH cold connect (handshake + bridge --print-socket + channel): "
          f"{result['ssh_cold_connect_ms']} ms; further channel: "
          f"{result['ssh_warm_channel_ms']} ms; cold `true`: {result['ssh_cold_exec_true_ms']} ms")
    print(f"bridge fallback: cold connect {result['bridge_cold_connect_ms']} ms, "
          f"further stream {result['bridge_warm_channel_ms']} ms")
    print(f"throughput, remote socket -> client: SSH {result['ssh_throughput_mb_s']} MB/s "
          f"(target >= 50), Unix socket {result['unix_throughput_mb_s']} MB/s")
    print(f"{args.ops} x `true`: ssh each {ops['ssh_each_s']} s, ControlMaster "
          f"{ops['ssh_controlmaster_s']} s, pooled connection {ops['ralph_pooled_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
