"""Agents in tmux: a loop's terminal agent runs in a pane of the tmux session ``ralph-<task>``.

With the loop setting ``backend: "tmux"`` nothing changes for ralph-uv's own clients (output
goes to the journal, ``write_pty`` reaches the agent, the loop sees the exit status), and a
person can also reach the agent with plain tmux on that machine::

    tmux -L ralph-uv attach -t ralph-<task>         # or: ssh -t host tmux -L ralph-uv attach ...

How it works:

- ralph-uv uses a tmux server of its own (socket name ``ralph-uv``; ``$RALPH_TMUX_SOCKET`` sets
  another name, or a path when it holds a ``/``), so the user's default server is never touched.
- One session per loop, kept for the loop's lifetime (``ralph-<loop id>`` when ``ralph-<task>``
  is taken by a live session); each iteration respawns its single pane. ``remain-on-exit`` keeps
  a finished pane, and its exit status, until then, so tmux clients stay attached throughout.
- Output: ``pipe-pane`` copies the pane's raw output (the bytes the agent wrote, before tmux
  renders them) into a FIFO in the loop folder that the runner reads. It is set up in the same
  tmux command that creates the session, which tmux runs before it reads anything from the pane.
- The agent's command line and environment (API keys) reach the pane through a launch file
  (mode 0600) that a tiny launcher reads and deletes before it starts the agent: they are never
  on tmux's command line nor in the tmux server's environment.
- Keystrokes: ``send-keys -l`` for text, ``send-keys -H`` (raw bytes) for control characters and
  ``;`` (which tmux would read as a command separator).
- Size: ``resize-window``. End: the pane's process (the launcher) is watched with a pidfd, so
  its exit wakes the runner at once; the launcher writes the agent's exit status to a file
  first (``#{pane_dead_status}`` is only a fallback: tmux often leaves it empty while
  ``pipe-pane`` is on).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from ralph_uv.agents.base import AgentBackend
from ralph_uv.config import Config
from ralph_uv.errors import RalphError, UserError
from ralph_uv.runner.tmux_target import (
    TMUX_TIMEOUT,
    TmuxTarget,
    key_commands,
    run_tmux,
    server_env,
    session_name,
    tmux_arg,
    tmux_socket,
)

__all__ = [
    "FIFO_NAME",
    "LAUNCH_NAME",
    "TmuxProcess",
    "TmuxSession",
    "TmuxTarget",
    "session_name",
    "tmux_backends",
    "tmux_socket",
]

log = logging.getLogger("ralph_uv.runner.tmux")

FIFO_NAME = "tmux-output.fifo"
LAUNCH_NAME = "tmux-launch.json"

_QUIET = 0.05  # output silent this long after the pane died: everything has arrived
_STATUS_WAIT = 2.0
_READ_SIZE = 65536
# Run in the pane: read the launch file, delete it, run the agent with its environment (the
# terminal variables tmux set stay) and write its exit status where the runner reads it; tmux's
# own #{pane_dead_status} is not reliable while pipe-pane is on. The launcher ignores the
# terminal's signals (the agent, in the same process group, gets them) so that it outlives the
# agent. Like a PTY's agent, it is hung up when the runner dies (nobody would record its output
# any more). Standard library only, so it starts quickly.
_LAUNCHER = """\
import json, os, select, signal, sys
path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
finally:
    try:
        os.unlink(path)
    except OSError:
        pass
env = dict(spec["env"])
for name in ("TERM", "TMUX", "TMUX_PANE", "COLORTERM"):
    if name in os.environ:
        env[name] = os.environ[name]
caught = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
for sig in caught:
    signal.signal(sig, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    for sig in caught:
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], env)
    except OSError as exc:
        sys.stderr.write("ralph-uv: cannot start %s: %s\\n" % (spec["argv"][0], exc.strerror))
    os._exit(127)
try:
    child, runner = os.pidfd_open(pid), os.pidfd_open(spec["runner_pid"])
except (AttributeError, OSError):
    child = runner = None
while child is not None:
    ready = select.select([child, runner], [], [])[0]
    if child in ready:
        break
    os.killpg(0, signal.SIGHUP)
    os.close(runner)
    runner = child
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
temporary = spec["status_file"] + ".tmp"
with open(temporary, "w") as f:
    f.write(str(code))
os.replace(temporary, spec["status_file"])
sys.exit(code if code >= 0 else 128 - code)
"""


def _check_startable(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> None:
    """What PtyProcess.spawn reports at once; in a pane it would only be an exit status."""
    if shutil.which("tmux") is None:
        raise UserError("tmux is not installed; install it (Debian: apt install tmux) or "
                        "run the loop with backend pty")
    if not argv or shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
        program = argv[0] if argv else "(nothing)"
        raise UserError(f"cannot start {program!r}: no such program")
    if not cwd.is_dir():
        raise UserError(f"cannot start {argv[0]!r}: no folder {cwd}")


def _read_status(path: Path) -> int | None:
    """The exit status the launcher wrote (and remove the file), or ``None``."""
    try:
        text = path.read_text(encoding="ascii").strip()
        path.unlink()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


async def _process_gone(pid: int) -> None:
    """Return once process ``pid`` (not a child of ours) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class TmuxProcess:
    """The agent of one iteration, in the session's pane (the :class:`AgentTerminal` contract
    of :mod:`ralph_uv.runner.terminal`)."""

    def __init__(self, session: TmuxSession, pane: str, pid: int,
                 on_output: Callable[[bytes], None], status_file: Path) -> None:
        self._session = session
        self.pane = pane
        self._pid = pid
        self._status_file = status_file
        self._on_output = on_output
        self._closed = False
        self._keys = asyncio.Lock()
        self.bytes_read = 0
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch(), name=f"tmux pane {pane}")

    @property
    def pid(self) -> int:
        return self._pid

    def deliver(self, data: bytes) -> None:
        """Output read from the pane."""
        self.bytes_read += len(data)
        self._on_output(data)

    async def _watch(self) -> None:
        try:
            await _process_gone(self._pid)
            self.returncode = _read_status(self._status_file)
            if self.returncode is None:
                self.returncode = await self._session.exit_status(self.pane)
        except RalphError as exc:
            log.warning("cannot read the exit status of pane %s: %s", self.pane, exc.message)
            self.returncode = 1
        finally:
            if self.returncode is None:
                self.returncode = 1
            self._exited.set()

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the pane, byte for byte, in order."""
        if self._closed or self.returncode is not None:
            raise UserError("the agent's terminal is closed")
        async with self._keys:
            for command in key_commands(self.pane, data):
                try:
                    await run_tmux(self._session.target.socket_args, *command)
                except RalphError as exc:
                    raise UserError(f"the agent's terminal is closed ({exc.message})") from exc

    def resize(self, cols: int, rows: int) -> None:
        """Resize the pane's window (done in the background: tmux is another process)."""
        if not self._closed and self.returncode is None:
            self._session.later(self._session.resize(self.pane, cols, rows))

    async def wait(self, drain_timeout: float = 2.0) -> int:
        """Wait for the agent to exit and its output to arrive; its exit status."""
        await asyncio.shield(self._exited.wait())
        await self._session.drain(drain_timeout)
        self.close()
        assert self.returncode is not None
        return self.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)

    async def terminate(self, grace: float = 5.0) -> int:
        """SIGTERM to the agent's process group (tmux made it a session leader), SIGKILL after
        ``grace`` seconds."""
        if not self._exited.is_set():
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited.wait()), grace)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await asyncio.shield(self._exited.wait())
        return await self.wait(drain_timeout=0.5)

    def close(self) -> None:
        self._closed = True
        self._session.detach(self)


class TmuxSession:
    """One loop's tmux session: creates it on the first :meth:`spawn`, respawns its pane for
    every later one, and removes it in :meth:`aclose` (or :meth:`close`).

    :meth:`spawn` has the signature of a :class:`~ralph_uv.runner.terminal.TerminalSpawner`.
    """

    def __init__(self, target: TmuxTarget, loop_dir: Path, *, fallback: str | None = None) -> None:
        self.target = target
        self._loop_dir = loop_dir
        self._fallback = fallback
        self._pane: str | None = None
        self._fd = -1
        self._current: TmuxProcess | None = None
        self._lock = asyncio.Lock()
        self._output_seen = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._spawned = 0

    @property
    def fifo(self) -> Path:
        return self._loop_dir / FIFO_NAME

    @property
    def launch_file(self) -> Path:
        return self._loop_dir / LAUNCH_NAME

    # ---------------------------------------------------------------------------- spawning

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        cols: int = 120,
        rows: int = 40,
    ) -> TmuxProcess:
        """Start ``argv`` in the session's pane (creating the session the first time)."""
        _check_startable(argv, cwd, env)
        async with self._lock:
            if self._current is not None and self._current.returncode is None:
                raise RalphError("the tmux pane still runs the previous iteration's agent")
            self._open_fifo()
            self._spawned += 1
            status_file = self._loop_dir / f"tmux-exit-{self._spawned}"
            with contextlib.suppress(OSError):
                status_file.unlink()
            self._write_launch(argv, cwd, env, status_file)
            launcher = [sys.executable, "-c", _LAUNCHER, str(self.launch_file)]
            try:
                if self._pane is not None and await self._pane_exists(self._pane):
                    pid = await self._respawn(self._pane, cwd, cols, rows, launcher)
                else:
                    self._pane, pid = await self._create(cwd, cols, rows, launcher)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.launch_file.unlink()
                raise
            process = TmuxProcess(self, self._pane, pid, on_output, status_file)
            self._current = process
            log.info("started %s in tmux pane %s of %s (pid %d)", Path(argv[0]).name,
                     self._pane, self.target.session, pid)
            return process

    def _write_launch(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                      status_file: Path) -> None:
        payload = json.dumps({"argv": list(argv), "cwd": str(cwd), "env": dict(env),
                              "status_file": str(status_file), "runner_pid": os.getpid()})
        path = self.launch_file
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(payload)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc

    async def _create(self, cwd: Path, cols: int, rows: int,
                      launcher: list[str]) -> tuple[str, int]:
        socket_args = self.target.socket_args
        name = self.target.session
        if await self._session_state(name) == "alive" and self._fallback:
            log.info("tmux session %s is in use; this loop uses %s", name, self._fallback)
            name = self._fallback
            self.target = dataclasses.replace(self.target, session=name)
        state = await self._session_state(name)
        if state == "alive":
            raise RalphError(
                f"a tmux session {name} is already running on socket {self.target.socket}; "
                f"end it (`{shlex.join(self.target.command('kill-session', '-t', '=' + name))}`)"
            )
        if state == "dead":  # left behind by a runner that died
            await run_tmux(socket_args, "kill-session", "-t", f"={name}", check=False)
        pipe = f"exec cat >> {shlex.quote(str(self.fifo))}"
        out = await run_tmux(
            socket_args, "new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows),
            "-c", tmux_arg(str(cwd)), "-P", "-F", "#{pane_id} #{pane_pid}",
            *(tmux_arg(part) for part in launcher),
            ";", "set-option", "-w", "remain-on-exit", "on",
            ";", "pipe-pane", tmux_arg(pipe),
        )
        pane, _, pid = out.strip().partition(" ")
        if not pane.startswith("%") or not pid.isdigit():
            raise RalphError(f"tmux new-session answered {out.strip()!r}; expected a pane")
        return pane, int(pid)

    async def _respawn(self, pane: str, cwd: Path, cols: int, rows: int,
                       launcher: list[str]) -> int:
        out = await run_tmux(
            self.target.socket_args,
            "resize-window", "-t", pane, "-x", str(cols), "-y", str(rows),
            ";", "respawn-pane", "-t", pane, "-c", tmux_arg(str(cwd)),
            *(tmux_arg(part) for part in launcher),
            ";", "display-message", "-p", "-t", pane, "#{pane_pid}",
        )
        pid = out.strip().splitlines()[-1] if out.strip() else ""
        if not pid.isdigit():
            raise RalphError(f"tmux respawn-pane answered {out.strip()!r}; expected a pid")
        return int(pid)

    async def _session_state(self, name: str) -> str:
        """``"none"``, ``"dead"`` (every pane's process has exited) or ``"alive"``."""
        out = await run_tmux(self.target.socket_args, "list-panes", "-s", "-t", f"={name}",
                          "-F", "#{pane_dead}", check=False)
        flags = out.split()
        if not flags:
            return "none"
        return "dead" if all(flag == "1" for flag in flags) else "alive"

    async def _pane_exists(self, pane: str) -> bool:
        out = await run_tmux(self.target.socket_args, "display-message", "-p", "-t", pane,
                          "#{pane_id}", check=False)
        return out.strip() == pane

    # -------------------------------------------------------------------------- the pane

    async def exit_status(self, pane: str) -> int:
        """The exit status of ``pane``'s process once tmux has seen it die (negative: the
        signal that killed it)."""
        deadline = asyncio.get_running_loop().time() + _STATUS_WAIT
        while True:
            out = await run_tmux(self.target.socket_args, "display-message", "-p", "-t", pane,
                              "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}",
                              check=False)
            dead, _, rest = out.strip().partition(":")
            status, _, sig = rest.partition(":")
            if dead == "1" and status.isdigit():
                return int(status)
            if dead == "1" and sig.isdigit():
                return -int(sig)
            if not out.strip():
                raise RalphError(f"the tmux pane {pane} is gone (its session was killed)")
            if asyncio.get_running_loop().time() > deadline:
                raise RalphError(f"tmux did not report how pane {pane} ended ({out.strip()})")
            await asyncio.sleep(0.02)

    async def resize(self, pane: str, cols: int, rows: int) -> None:
        """Set the pane's window to ``cols`` x ``rows``."""
        try:
            await run_tmux(self.target.socket_args, "resize-window", "-t", pane, "-x", str(cols),
                        "-y", str(rows))
        except RalphError as exc:
            log.info("resize refused: %s", exc.message)

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def detach(self, process: TmuxProcess) -> None:
        """``process`` is over: later output is nobody's."""
        if self._current is process:
            self._current = None

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a bounded quiet wait
        """Wait until the pane's output has been quiet a moment (at most ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            self._output_seen.clear()
            try:
                await asyncio.wait_for(self._output_seen.wait(), min(_QUIET, left))
            except TimeoutError:
                return

    # ---------------------------------------------------------------------------- output

    def _open_fifo(self) -> None:
        if self._fd >= 0:
            return
        path = self.fifo
        try:
            self._loop_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.mkfifo(path, 0o600)
            # Opened for writing too, so the FIFO never reads as closed between iterations.
            self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError as exc:
            raise UserError(f"cannot make the output FIFO {path}: {exc.strerror or exc}") from exc
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading the tmux output FIFO failed: %s", exc)
            self._stop_reading()
            return
        if not data:
            return
        self._output_seen.set()
        if self._current is not None:
            self._current.deliver(data)

    def _stop_reading(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(RuntimeError):  # the event loop may already be closed
            asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    # ------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """End the agent if it still runs, kill the session, remove the FIFO."""
        current = self._current
        if current is not None and current.returncode is None:
            await current.terminate(1.0)
        if self._pane is not None:
            await run_tmux(self.target.socket_args, "kill-session", "-t", f"={self.target.session}",
                        check=False)
            self._pane = None
        for task in list(self._background):
            task.cancel()
        self._cleanup()

    def close(self) -> None:
        """The same without an event loop (the runner's last clean-up)."""
        if self._pane is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(self.target.command("kill-session", "-t", f"={self.target.session}"),
                               capture_output=True, timeout=TMUX_TIMEOUT, env=server_env(),
                               check=False)
            self._pane = None
        self._cleanup()

    def _cleanup(self) -> None:
        self._stop_reading()
        for path in (self.fifo, self.launch_file):
            with contextlib.suppress(OSError):
                path.unlink()


def tmux_backends(
    factory: Callable[[str, Config], AgentBackend], session: TmuxSession
) -> Callable[[str, Config], AgentBackend]:
    """``factory``, with every terminal-based backend starting its agent in ``session``
    (backends without a terminal, such as opencode's HTTP server, are left as they are)."""

    def make(name: str, config: Config) -> AgentBackend:
        backend = factory(name, config)
        if hasattr(backend, "spawn_terminal"):
            backend.spawn_terminal = session.spawn
        return backend

    return make
