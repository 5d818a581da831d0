"""A child process in a pseudo-terminal, driven from asyncio.

The child gets its own session with the PTY as controlling terminal, so terminal-aware agents
(Claude Code's TUI, Codex, Aider) behave as they do for a person, and stopping it signals its
whole process group. Output is read as it arrives and handed to a callback; nothing is buffered
here, so the journal behind the callback is the only copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import struct
import sys
import termios
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ralph_uv.errors import UserError

__all__ = ["PtyProcess"]

log = logging.getLogger("ralph_uv.runner.pty")

_READ_SIZE = 65536


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = (
        ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    )
except OSError:
    _libc = None


def _prepare_child() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # If the runner is killed outright, the agent must not go on editing the repository with
    # nobody recording its output: the kernel hangs it up when its parent dies.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)


class PtyProcess:
    """A running child attached to a PTY. Create with :meth:`spawn`."""

    def __init__(
        self, proc: asyncio.subprocess.Process, master: int, on_output: Callable[[bytes], None]
    ) -> None:
        self._proc = proc
        self._master = master
        self._on_output = on_output
        self._eof = asyncio.Event()
        self._closed = False
        self.bytes_read = 0
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._on_readable)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        cols: int = 120,
        rows: int = 40,
    ) -> PtyProcess:
        """Start ``argv`` in a new PTY of the given size; raise :class:`UserError` if it cannot
        be started (program missing, folder missing)."""
        master, slave = os.openpty()
        try:
            _set_winsize(slave, cols, rows)
            os.set_blocking(master, False)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=str(cwd),
                    env=dict(env),
                    start_new_session=True,
                    preexec_fn=_prepare_child,
                )
            except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
                os.close(master)
                raise UserError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(slave)
        return cls(proc, master, on_output)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave descriptor is closed
                log.warning("reading the PTY failed: %s", exc)
            data = b""
        if not data:
            self._stop_reading()
            return
        self.bytes_read += len(data)
        self._on_output(data)

    def _stop_reading(self) -> None:
        if not self._eof.is_set():
            asyncio.get_running_loop().remove_reader(self._master)
            self._eof.set()

    async def write(self, data: bytes) -> None:
        """Write keystrokes to the child's terminal, waiting while the PTY buffer is full."""
        view = memoryview(data)
        while view:
            if self._closed:
                raise UserError("the agent's terminal is closed")
            try:
                written = os.write(self._master, view)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            except OSError as exc:
                raise UserError(f"the agent's terminal is closed ({exc.strerror})") from exc
            view = view[written:]

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the kernel sends SIGWINCH to the child."""
        if not self._closed:
            _set_winsize(self._master, cols, rows)

    async def wait(self, drain_timeout: float = 2.0) -> int:
        """Wait for the child to exit and its output to drain; return its exit status.

        Grandchildren that keep the terminal open after the child exits do not hold the loop:
        output is drained for at most ``drain_timeout`` seconds after the exit.
        """
        code = await self._proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._eof.wait(), drain_timeout)
        self.close()
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def terminate(self, grace: float = 5.0) -> int:
        """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds."""
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self._proc.wait()
        # Whatever the group left running (a shell's children) goes too.
        self._signal_group(signal.SIGKILL)
        return await self.wait(drain_timeout=0.5)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._eof.is_set():
            self._stop_reading()
        os.close(self._master)
