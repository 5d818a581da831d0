"""PtyProcess: a real child in a real pseudo-terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.helpers import async_wait_until, wait_until

from ralph_uv.errors import UserError
from ralph_uv.runner.pty import PtyProcess

WINSIZE = (
    "import fcntl, struct, sys, termios\n"
    "rows, cols, _, _ = struct.unpack('HHHH', fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))\n"
    "print(f'size={cols}x{rows} tty={sys.stdin.isatty()}', flush=True)\n"
)


async def test_child_sees_a_terminal_of_the_requested_size(tmp_path: Path) -> None:
    """The child's stdin is a terminal whose size (TIOCGWINSZ) is the one asked for, and what
    it prints arrives through the output callback."""
    out = bytearray()
    proc = await PtyProcess.spawn(
        [sys.executable, "-c", WINSIZE],
        cwd=tmp_path,
        env=dict(os.environ),
        on_output=out.extend,
        cols=91,
        rows=27,
    )
    assert await proc.wait() == 0
    assert b"size=91x27 tty=True" in out


async def test_resize_reaches_the_child_with_sigwinch(tmp_path: Path) -> None:
    """resize() changes the terminal size and the child is told with SIGWINCH."""
    script = textwrap.dedent(
        """
        import fcntl, signal, struct, sys, termios
        def report(*_):
            rows, cols, _, _ = struct.unpack('HHHH', fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))
            print(f'winch {cols}x{rows}', flush=True)
            sys.exit(0)
        signal.signal(signal.SIGWINCH, report)
        print('ready', flush=True)
        signal.pause()
        """
    )
    out = bytearray()
    proc = await PtyProcess.spawn(
        [sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ), on_output=out.extend
    )
    await async_wait_until(lambda: b"ready" in out)
    proc.resize(100, 30)
    assert await proc.wait() == 0
    assert b"winch 100x30" in out


async def test_keystrokes_are_echoed_by_the_terminal(tmp_path: Path) -> None:
    """Bytes written to the PTY reach the child's stdin (a line read and answered)."""
    out = bytearray()
    proc = await PtyProcess.spawn(
        [sys.executable, "-c", "print('got', input(), flush=True)"],
        cwd=tmp_path,
        env=dict(os.environ),
        on_output=out.extend,
    )
    await proc.write(b"hello\r")
    assert await proc.wait() == 0
    assert b"got hello" in out


async def test_terminate_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    """terminate() sends SIGTERM, then SIGKILL after the grace period."""
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    out = bytearray()
    proc = await PtyProcess.spawn(
        [sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ), on_output=out.extend
    )
    await async_wait_until(lambda: b"up" in out)
    assert await proc.terminate(grace=0.3) == -signal.SIGKILL


async def test_a_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    """Starting a program that does not exist raises UserError naming it."""
    with pytest.raises(UserError, match="cannot start '/nonexistent/agent'"):
        await PtyProcess.spawn(
            ["/nonexistent/agent"], cwd=tmp_path, env=dict(os.environ), on_output=print
        )


def test_the_agent_dies_with_its_runner(tmp_path: Path) -> None:
    """When the process that owns the PTY is killed with SIGKILL, its agent is hung up and
    exits too, instead of going on unobserved."""
    pid_file = tmp_path / "agent.pid"
    agent = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    owner = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from pathlib import Path
        from ralph_uv.runner.pty import PtyProcess
        async def main():
            proc = await PtyProcess.spawn([sys.executable, "-c", {agent!r}], cwd=Path("."),
                                          env=dict(os.environ), on_output=lambda b: None)
            await proc.wait()
        asyncio.run(main())
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", owner], cwd=tmp_path)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=15)
        agent_pid = int(pid_file.read_text())
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(10)

        def agent_gone() -> bool:
            try:
                os.kill(agent_pid, 0)
            except ProcessLookupError:
                return True
            # A zombie of an exited child counts as gone.
            return Path(f"/proc/{agent_pid}/stat").read_text().split()[2] == "Z"

        wait_until(agent_gone, timeout=10)
    finally:
        runner.kill()
