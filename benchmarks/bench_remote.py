"""Remote loops: a real ralphd and real runners reached over SSH, compared with the same ones
reached over their Unix socket, in one run.

The script starts an OpenSSH sshd on 127.0.0.1 (tests/fixtures/sshd.py), a ralphd in the
"remote" RALPH_HOME behind it, and loops whose agent is tests/fixtures/interactive_agent.py
(``cat``: it echoes what is typed; ``flood:N``: N bytes of output first). Measured:

1. ``get_status`` round trip and keystroke echo (``write_pty`` of one byte -> the ``output``
   event carrying the terminal's echo of it), over SSH (warm pooled connection,
   ``connect_loop`` through ralphd) and over the Unix socket. Target: SSH echo p99 <= 5 ms.
2. 100 operations alternating "send input" and "read output" on a remote agent: ralph-uv on
   its persistent connection (``write_pty`` / ``get_output``), versus one ``ssh host tmux
   send-keys`` / ``ssh host tmux capture-pane`` per operation, versus the same through an
   OpenSSH ControlMaster (its first connection included). Target for ralph-uv: < 0.5 s.
3. Output throughput through the loop service over SSH (a subscription from offset 0 over a
   finished flood of ``--flood-mb``; the Unix socket for reference). Target: >= 50 MB/s.
4. With 50 ms of round-trip time added (a network namespace joined by a veth pair, netem
   delaying 25 ms each way, sshd listening inside on an address only these namespaces have):
   echo p50. Target <= 60 ms. Where the namespace or netem cannot be had (a kernel without
   CONFIG_NET_SCH_NETEM), the reason is printed and the same figure is taken through a
   userspace TCP relay in front of sshd that holds every chunk 25 ms in each direction.
5. ``ralph-uv attach`` from process start to the first screen (the agent's text and the
   status bar), locally and over SSH with a fresh connection each time.

Prints the machine and the date, the figures, and one JSON object on the last line.

    python benchmarks/bench_remote.py [--calls 1000] [--echoes 300] [--flood-mb 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import pty
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from pathlib import Path
from typing import Any

from _common import cpu_model, git, percentile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.sshd import SSHD, SSHServer, start_sshd  # noqa: E402

from ralph_uv.client.daemon import DaemonClient  # noqa: E402
from ralph_uv.client.loops import LoopConnection, LoopEvent  # noqa: E402
from ralph_uv.config import paths  # noqa: E402
from ralph_uv.transports import close_connections, connect  # noqa: E402
from ralph_uv.transports.unix import open_unix  # noqa: E402

RALPH = [sys.executable, "-m", "ralph_uv.cli"]
AGENT = ROOT / "tests" / "fixtures" / "interactive_agent.py"
NS = f"rbench{os.getpid() % 10000}"
NS_HOST, NS_PEER = "10.213.47.1", "10.213.47.2"
TARGET_ECHO_P99_MS = 5.0
TARGET_OPS_S = 0.5
TARGET_MB_S = 50.0
TARGET_NETEM_P50_MS = 60.0


# ------------------------------------------------------------------------------------ set-up


def _task(root: Path, name: str) -> Path:
    repo = root / f"{name}-repo"
    task = repo / "tasks" / name
    task.mkdir(parents=True)
    story = {"id": "US-001", "title": "t", "description": "d", "priority": 1, "passes": False,
             "acceptanceCriteria": [{"description": "ok", "passes": False}]}
    prd = {"schemaVersion": "2.5", "project": name, "branchName": f"ralph/{name}",
           "description": "bench", "userStories": [story]}
    (task / "prd.json").write_text(json.dumps(prd, indent=2) + "\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "b@example.com")
    git(repo, "config", "user.name", "Bench")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    return task


def _configure_remote(home: Path, flood_bytes: int) -> None:
    config = paths({"RALPH_HOME": str(home)}).config_file
    config.parent.mkdir(parents=True, exist_ok=True)
    agents = {"cat": [sys.executable, str(AGENT), "cat", "{prompt_file}"],
              "flood": [sys.executable, str(AGENT), f"flood:{flood_bytes}", "{prompt_file}"]}
    lines = ["pause = 0", "terminate_grace = 1.0", "iteration_timeout = 3600", ""]
    for name, command in agents.items():
        lines += [f"[agents.{name}]", f"command = {json.dumps(command)}"]
    config.write_text("\n".join(lines) + "\n")


def _ralphd(home: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "ralph_uv.daemon", *args],
                   env={**os.environ, "RALPH_HOME": str(home)}, capture_output=True,
                   timeout=60, check=False)


async def _unix_daemon(home: Path) -> DaemonClient:
    socket_path = paths({"RALPH_HOME": str(home)}).daemon_socket
    return await DaemonClient.open(lambda: open_unix(socket_path), client="bench")


async def _ssh_daemon(server: SSHServer) -> DaemonClient:
    options = server.options()
    return await DaemonClient.open(lambda: connect(server.url, options=options), client="bench")


class Watcher:
    """A loop connection that keeps the output it is sent."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.changed = asyncio.Event()
        self.conn: LoopConnection | None = None

    async def on_event(self, event: LoopEvent) -> None:
        if event.type == "output":
            self.output += event.output
            self.changed.set()

    async def open(self, daemon: DaemonClient, loop: str) -> LoopConnection:
        stream = await daemon.connect_loop(loop)
        self.conn = await LoopConnection.open(stream, client="bench", on_event=self.on_event)
        return self.conn

    async def wait_for(self, needle: bytes, start: int = 0, timeout: float = 30) -> None:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                while needle not in self.output[start:]:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise RuntimeError(f"{needle!r} not seen; got {bytes(self.output[-300:])!r}") from None


# ------------------------------------------------------------------------------ measurements


async def _status_rtt(conn: LoopConnection, calls: int) -> list[float]:
    for _ in range(calls // 10):
        await conn.status()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await conn.status()
        samples.append(time.perf_counter() - start)
    return samples


async def _echo(watcher: Watcher, echoes: int) -> list[float]:
    """One keystroke at a time; the clock stops at the event carrying its echo."""
    conn = watcher.conn
    assert conn is not None
    await conn.set_interactive(True, force=True)
    samples = []
    typed = ""
    for number in range(echoes):
        char = "abcdefghijklmnopqrstuvwxyz"[number % 26]
        mark = len(watcher.output)
        start = time.perf_counter()
        await conn.write_pty(char.encode())
        await watcher.wait_for(char.encode(), mark)
        samples.append(time.perf_counter() - start)
        typed += char
        if len(typed) >= 60 or number == echoes - 1:  # end the line (untimed)
            mark = len(watcher.output)
            await conn.write_pty(b"\r")
            await watcher.wait_for(f"got: {typed}\r\n".encode(), mark)
            typed = ""
    await conn.set_interactive(False)
    return samples


async def _ops_ralph(conn: LoopConnection, ops: int) -> float:
    await conn.set_interactive(True, force=True)
    start = time.perf_counter()
    for number in range(ops):
        if number % 2 == 0:
            await conn.write_pty(b"x")
        else:
            end = (await conn.status()).output_end if number == 1 else None
            await conn.get_output(max(0, (end or 0) - 4096), 4096)
    elapsed = time.perf_counter() - start
    await conn.write_pty(b"\r")
    await conn.set_interactive(False)
    return elapsed


def _ops_ssh(server: SSHServer, socket: str, ops: int, extra: tuple[str, ...] = ()) -> float:
    start = time.perf_counter()
    for number in range(ops):
        command = ("send-keys", "-t", "=ops:", "x") if number % 2 == 0 else \
            ("capture-pane", "-p", "-t", "=ops:")
        subprocess.run(server.ssh_argv("tmux", "-L", socket, *command, extra=extra),
                       check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return time.perf_counter() - start


async def _throughput(daemon: DaemonClient, loop: str) -> float:
    watcher = Watcher()
    received = 0
    done = asyncio.Event()
    conn = await watcher.open(daemon, loop)
    end = (await conn.status()).output_end

    async def count(event: LoopEvent) -> None:
        nonlocal received
        if event.type == "output":
            received += len(event.output)
            if received >= end:
                done.set()

    conn.on_event = count
    start = time.perf_counter()
    await conn.subscribe(output=0, events=None, streams=("output",))
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - start
    await conn.close()
    return received / elapsed / 1e6


def _ms(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(samples, 0.5) * 1000, 3),
            "p99_ms": round(percentile(samples, 0.99) * 1000, 3)}


# ------------------------------------------------------------------------- 50 ms round trip


def _sh(*argv: str, ns: bool = False) -> None:
    prefix = ["ip", "netns", "exec", NS] if ns else []
    subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=30)


def _netns_up() -> str | None:
    """Make the namespace, the veth pair and the delays; the reason when it cannot."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    try:
        _sh("ip", "netns", "add", NS)
        _sh("ip", "link", "add", f"{NS}a", "type", "veth", "peer", "name", f"{NS}b")
        _sh("ip", "link", "set", f"{NS}b", "netns", NS)
        _sh("ip", "addr", "add", f"{NS_HOST}/30", "dev", f"{NS}a")
        _sh("ip", "link", "set", f"{NS}a", "up")
        _sh("ip", "addr", "add", f"{NS_PEER}/30", "dev", f"{NS}b", ns=True)
        _sh("ip", "link", "set", f"{NS}b", "up", ns=True)
        _sh("ip", "link", "set", "lo", "up", ns=True)
        _sh("tc", "qdisc", "add", "dev", f"{NS}a", "root", "netem", "delay", "25ms")
        _sh("tc", "qdisc", "add", "dev", f"{NS}b", "root", "netem", "delay", "25ms", ns=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _netns_down()
        return f"cannot set up the namespace: {detail.decode(errors='replace').strip() or exc}"
    return None


def _netns_down() -> None:
    for argv in (["ip", "link", "del", f"{NS}a"], ["ip", "netns", "del", NS]):
        subprocess.run(argv, capture_output=True, timeout=30, check=False)


def _netns_sshd(root: Path, remote_home: Path) -> SSHServer:
    """An sshd inside the namespace on NS_PEER, with the loopback one's keys and home."""
    staged = start_sshd(root)  # keys and config; its loopback process is not the one wanted
    staged.process.kill()
    staged.process.wait(5)
    config = root / "sshd_config"
    config.write_text(config.read_text().replace("ListenAddress 127.0.0.1",
                                                 f"ListenAddress {NS_PEER}"))
    authorized = root / "authorized_keys"
    authorized.write_text(authorized.read_text().replace(str(staged.remote_home),
                                                         str(remote_home)))
    staged.log_path.write_text("")
    process = subprocess.Popen(
        ["ip", "netns", "exec", NS, str(SSHD), "-D", "-f", str(config), "-E",
         str(staged.log_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "Server listening" not in staged.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"sshd in the namespace did not start: {staged.log()}")
        time.sleep(0.02)
    key_type, key_data = staged.host_public_key.split()[:2]
    staged.known_hosts.write_text(f"[{NS_PEER}]:{staged.port} {key_type} {key_data}\n")
    return dataclasses.replace(staged, host=NS_PEER, process=process, remote_home=remote_home)


# ------------------------------------------------------------------------ attach first screen


def _first_screen(argv: list[str], env: dict[str, str], cwd: Path, needle: bytes) -> float:
    """Process start -> the screen shows ``needle`` and the status bar; then detach."""
    started = time.perf_counter()
    pid, master = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                raise RuntimeError(f"no first screen within 60 s; saw {seen[-500:]!r}")
            chunk = os.read(master, 65536)
            if not chunk:
                raise RuntimeError(f"attach exited early: {seen[-2000:]!r}")
            seen += chunk
            if needle in seen and b"iter " in seen:
                done = time.perf_counter()
                break
        os.write(master, b"\x1dd")
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
    return done - started


# ------------------------------------------------------------------------------------- main


async def _loop_figures(server: SSHServer, args: argparse.Namespace, cat_loop: str,
                        flood_loop: str) -> dict[str, Any]:
    home = server.remote_home
    figures: dict[str, Any] = {}
    unix_daemon = await _unix_daemon(home)
    ssh_daemon = await _ssh_daemon(server)
    try:
        for name, daemon in (("unix", unix_daemon), ("ssh", ssh_daemon)):
            watcher = Watcher()
            conn = await watcher.open(daemon, cat_loop)
            await conn.subscribe(output=None, events=None)
            figures[f"{name}_get_status"] = _ms(await _status_rtt(conn, args.calls))
            figures[f"{name}_echo"] = _ms(await _echo(watcher, args.echoes))
            if name == "ssh":
                figures["ops_ralph_s"] = round(await _ops_ralph(conn, args.ops), 3)
            await conn.close()
        for name, daemon in (("unix", unix_daemon), ("ssh", ssh_daemon)):
            figures[f"{name}_throughput_mb_s"] = round(await _throughput(daemon, flood_loop), 1)
    finally:
        await unix_daemon.close()
        await ssh_daemon.close()
        await close_connections()
    return figures


def _ssh_tmux_figures(server: SSHServer, socket: str, ops: int) -> dict[str, float]:
    control = ("-o", "ControlMaster=auto", "-o", f"ControlPath={server.root}/cm-%C",
               "-o", "ControlPersist=60")
    figures = {"ops_ssh_each_s": round(_ops_ssh(server, socket, ops), 3),
               "ops_ssh_controlmaster_s": round(_ops_ssh(server, socket, ops, control), 3)}
    subprocess.run(server.ssh_argv(extra=(*control, "-O", "exit")), capture_output=True,
                   check=False)
    return figures


# A userspace stand-in for netem: ``--delay-relay PORT MS`` (run as a child process so that its
# timers do not share an event loop with the measurements).


async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))
        await sender
    except OSError:
        sender.cancel()


async def _serve_delay_relay(target_port: int, delay: float) -> None:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_delayed_copy(reader, up_writer, delay),
                             _delayed_copy(up_reader, writer, delay), return_exceptions=True)
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


def _delayed_sshd(server: SSHServer, delay_ms: int) -> tuple[SSHServer, subprocess.Popen[str]]:
    """``server`` reached through the delay relay (its own port in known_hosts)."""
    relay = subprocess.Popen(
        [sys.executable, __file__, "--delay-relay", str(server.port), str(delay_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert relay.stdout is not None
    port = int(relay.stdout.readline().split()[1])
    known = server.root / "known_hosts_relay"
    key_type, key_data = server.host_public_key.split()[:2]
    known.write_text(f"[127.0.0.1]:{port} {key_type} {key_data}\n")
    return dataclasses.replace(server, port=port, known_hosts=known), relay


async def _netem_figures(server: SSHServer, cat_loop: str, echoes: int) -> dict[str, Any]:
    daemon = await _ssh_daemon(server)
    try:
        watcher = Watcher()
        conn = await watcher.open(daemon, cat_loop)
        await conn.subscribe(output=None, events=None)
        figures = {"netem_get_status": _ms(await _status_rtt(conn, echoes)),
                   "netem_echo": _ms(await _echo(watcher, echoes))}
        await conn.close()
        return figures
    finally:
        await daemon.close()
        await close_connections()


async def _start_loops(home: Path, root: Path) -> tuple[str, str]:
    daemon = await _unix_daemon(home)
    try:
        cat = await daemon.start_loop(_task(root, "bench"), agent="cat")
        flood = await daemon.start_loop(_task(root, "flood"), agent="flood")
        watcher = Watcher()
        conn = await watcher.open(daemon, flood.loop_id)
        await conn.subscribe(output=0, events=None)
        await watcher.wait_for(b"FLOOD-END", timeout=300)
        await conn.close()
        watcher = Watcher()
        conn = await watcher.open(daemon, cat.loop_id)
        await conn.subscribe(output=0, events=None)
        await watcher.wait_for(b"agent ready", timeout=60)
        await conn.close()
        return cat.loop_id, flood.loop_id
    finally:
        await daemon.close()


def _progress(label: str) -> None:
    print(f"... {label}", file=sys.stderr, flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--delay-relay"]:
        asyncio.run(_serve_delay_relay(int(sys.argv[2]), int(sys.argv[3]) / 1000))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--echoes", type=int, default=300)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--flood-mb", type=float, default=64.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--netem-echoes", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="br-", dir="/tmp"))
    os.environ["HOME"] = str(root / "home")  # ssh and asyncssh must not read the real ~/.ssh
    (root / "home" / ".ssh").mkdir(parents=True)
    os.environ.pop("SSH_AUTH_SOCK", None)
    for name in [n for n in os.environ if n.startswith("RALPH_")]:
        del os.environ[name]
    os.environ["RALPH_HOME"] = str(root / "client")
    tmux_socket = f"bench-{uuid.uuid4().hex[:8]}"
    server = start_sshd(root / "sshd")
    remote_home = server.remote_home
    figures: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "load": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
    }
    print(f"{figures['date']}  {figures['cpu']} ({figures['cores']} cores), load "
          f"{figures['load']}, Python {figures['python']}, {figures['openssh']}")
    netns_server: SSHServer | None = None
    try:
        _configure_remote(remote_home, int(args.flood_mb * 1024 * 1024))
        _ralphd(remote_home, "start")
        _progress(f"starting the loops (a flood of {args.flood_mb:g} MB)")
        cat_loop, flood_loop = asyncio.run(_start_loops(remote_home, root))
        subprocess.run(["tmux", "-L", tmux_socket, "-f", "/dev/null", "new-session", "-d",
                        "-s", "ops", "cat"], check=True, capture_output=True)
        _progress("round trips, echo, 100 operations, throughput")
        figures.update(asyncio.run(_loop_figures(server, args, cat_loop, flood_loop)))
        figures.update(_ssh_tmux_figures(server, tmux_socket, args.ops))

        _progress("50 ms round-trip time")
        reason = _netns_up()
        if reason is None:
            try:
                netns_server = _netns_sshd(root / "sshd-ns", remote_home)
                figures.update(asyncio.run(_netem_figures(netns_server, cat_loop,
                                                          args.netem_echoes)))
                figures["rtt_method"] = "netem in a network namespace, 25 ms each way"
            except (RuntimeError, OSError) as exc:
                reason = f"the namespace's sshd failed: {exc}"
        if reason is not None:
            figures["netem_skipped"] = reason
            delayed, relay = _delayed_sshd(server, 25)
            try:
                figures.update(asyncio.run(_netem_figures(delayed, cat_loop,
                                                          args.netem_echoes)))
                figures["rtt_method"] = "userspace TCP relay before sshd, 25 ms each way"
            finally:
                relay.kill()
                relay.wait()

        _progress("attach to first screen")
        shutil.copy(server.known_hosts, root / "home" / ".ssh" / "known_hosts")
        added = subprocess.run([*RALPH, "remote", "add", "bench", server.url, "--identity",
                                str(server.identity)], capture_output=True, text=True,
                               timeout=120, check=False)
        if added.returncode != 0:
            raise RuntimeError(f"ralph-uv remote add failed: {added.stderr.strip()}")
        base = {**os.environ, "TERM": "xterm-256color"}
        local_env = {**base, "RALPH_HOME": str(remote_home)}
        local = [_first_screen([*RALPH, "attach", cat_loop], local_env, root, b"agent ready")
                 for _ in range(args.runs + 1)][1:]
        remote = [_first_screen([*RALPH, "attach", cat_loop, "--on", "bench"], base, root,
                                b"agent ready") for _ in range(args.runs)]
        figures["attach_local_first_screen_ms"] = {
            "p50": round(statistics.median(local) * 1000, 1), "max": round(max(local) * 1000, 1)}
        figures["attach_ssh_first_screen_ms"] = {
            "p50": round(statistics.median(remote) * 1000, 1),
            "max": round(max(remote) * 1000, 1)}
    finally:
        subprocess.run(["tmux", "-L", tmux_socket, "kill-server"], capture_output=True,
                       check=False)
        if netns_server is not None:
            netns_server.process.kill()
        _netns_down()
        _ralphd(remote_home, "stop")
        server.stop()
        _kill_runners(remote_home)
        shutil.rmtree(root, ignore_errors=True)
    _report(figures, args)


def _kill_runners(home: Path) -> None:
    from ralph_uv.registry import Registry

    registry_path = paths({"RALPH_HOME": str(home)}).registry
    if not registry_path.exists():
        return
    with Registry.open(registry_path) as registry:
        for record in registry.find():
            if record.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(record.pid, signal.SIGKILL)


def _report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    def line(label: str, value: str, target: str = "") -> None:
        print(f"{label:<58} {value:<28} {target}")

    for kind in ("unix", "ssh"):
        status, echo = figures[f"{kind}_get_status"], figures[f"{kind}_echo"]
        line(f"get_status round trip, {kind}", f"p50 {status['p50_ms']} ms, p99 "
             f"{status['p99_ms']} ms")
        target = f"(target p99 <= {TARGET_ECHO_P99_MS:g} ms)" if kind == "ssh" else ""
        line(f"keystroke echo, {kind}", f"p50 {echo['p50_ms']} ms, p99 {echo['p99_ms']} ms",
             target)
    line(f"{args.ops} send/read operations: ralph-uv, one SSH connection",
         f"{figures['ops_ralph_s']} s", f"(target < {TARGET_OPS_S:g} s)")
    line(f"{args.ops} send/read operations: ssh host tmux ... each",
         f"{figures['ops_ssh_each_s']} s")
    line(f"{args.ops} send/read operations: the same with ControlMaster",
         f"{figures['ops_ssh_controlmaster_s']} s")
    for kind in ("ssh", "unix"):
        target = f"(target >= {TARGET_MB_S:g} MB/s)" if kind == "ssh" else ""
        line(f"output through the loop service, {kind}",
             f"{figures[f'{kind}_throughput_mb_s']} MB/s", target)
    if figures.get("netem_skipped"):
        print(f"netem not used: {figures['netem_skipped']}")
    if "netem_echo" in figures:
        print(f"50 ms RTT by: {figures['rtt_method']}")
        echo, status = figures["netem_echo"], figures["netem_get_status"]
        line("keystroke echo over SSH with 50 ms RTT", f"p50 {echo['p50_ms']} ms, p99 "
             f"{echo['p99_ms']} ms", f"(target p50 <= {TARGET_NETEM_P50_MS:g} ms)")
        line("get_status over SSH with 50 ms RTT", f"p50 {status['p50_ms']} ms")
    for kind in ("local", "ssh"):
        first = figures[f"attach_{kind}_first_screen_ms"]
        line(f"attach, process start -> first screen, {kind}",
             f"p50 {first['p50']} ms, max {first['max']} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
