"""ralphd's life as a process: one per user, its pid file, running in the background, stopping.

The pid file ``<runtime>/ralphd.pid`` holds the daemon's pid and is locked (``flock``) for as
long as it runs, so "is ralphd running?" never trusts a stale file: the lock vanishes with the
process, however it ends.

``ralphd start`` daemonizes with the classic double fork and ``setsid``, then waits until the
daemon reports that it listens (or why it could not) through a pipe, so the command's exit
status and message are the truth. ``--foreground`` runs it in the calling process (systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import logging.handlers
import os
import resource
import select
import signal
import sys
import time
from pathlib import Path

from ralph_uv.config import Paths, load_config, paths
from ralph_uv.daemon.config import DaemonConfig, load_daemon_config
from ralph_uv.daemon.events import daemon_dir
from ralph_uv.errors import RalphError, UserError

__all__ = [
    "LOG_FILE",
    "PidFile",
    "daemon_settings",
    "pid_file_path",
    "run_daemon",
    "running_pid",
    "start_background",
    "stop_daemon",
]

log = logging.getLogger("ralph_uv.daemon")

LOG_FILE = "ralphd.log"
_STDERR_FILE = "ralphd.stderr"
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_MAX_OPEN_FILES = 65536


def pid_file_path(dirs: Paths | None = None) -> Path:
    """``<runtime>/ralphd.pid``."""
    return (dirs or paths()).runtime / "ralphd.pid"


def daemon_settings(dirs: Paths | None = None) -> DaemonConfig:
    """daemon.toml over config.toml over the defaults."""
    dirs = dirs or paths()
    return load_daemon_config(dirs.daemon_config_file, load_config(dirs.config_file))


class PidFile:
    """The running daemon's claim on its pid file (see the module docstring)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> PidFile:
        """Lock and fill the pid file; :class:`UserError` if a ralphd already holds it."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UserError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _read_pid(path)
            raise UserError(
                f"ralphd is already running (pid {pid if pid else '?'}); "
                "`ralphd status` shows it, `ralphd stop` stops it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file and drop the lock."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == self.path.stat().st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = -1


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(dirs: Paths | None = None) -> int | None:
    """The pid of the running ralphd, or ``None`` when none runs."""
    path = pid_file_path(dirs)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path)  # locked: its owner is alive
    finally:
        os.close(fd)
    return None


# -------------------------------------------------------------------------------- running


def _setup_logging(dirs: Paths, settings: DaemonConfig, *, to_stderr: bool) -> None:
    folder = daemon_dir(dirs)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = logging.handlers.RotatingFileHandler(
        folder / LOG_FILE, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups,
        encoding="utf-8",
    )
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    package = logging.getLogger("ralph_uv")
    package.setLevel(settings.log_level_number)
    package.addHandler(handler)
    if to_stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        package.addHandler(console)
    package.propagate = False


def _raise_open_files_limit() -> None:
    # Every client, relay and watched runner holds descriptors; the default soft limit is low.
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard,
                                                                              _MAX_OPEN_FILES)
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, message.encode("utf-8", errors="replace") + b"\n")
        os.close(ready_fd)


async def _serve(dirs: Paths, settings: DaemonConfig, ready_fd: int | None) -> None:
    from ralph_uv.daemon.server import DaemonServer  # the heavy part, only in the daemon

    server = DaemonServer(settings, dirs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a closed terminal is no reason to go
    try:
        await server.start()
        _report(ready_fd, f"ready {os.getpid()}")
        await stop.wait()
        log.info("ralphd stopping; loops keep running")
    finally:
        await server.close()


def run_daemon(dirs: Paths | None = None, *, foreground: bool = True,
               ready_fd: int | None = None) -> int:
    """Run ralphd in this process until SIGTERM/SIGINT; the exit status.

    ``ready_fd`` receives ``ready <pid>`` once the daemon listens, or ``error <message>``.
    """
    dirs = dirs or paths()
    try:
        settings = daemon_settings(dirs)
        pid_file = PidFile.acquire(pid_file_path(dirs))
    except RalphError as exc:
        _report(ready_fd, f"error {exc.message}")
        if ready_fd is None:
            raise
        return 1
    try:
        _setup_logging(dirs, settings, to_stderr=foreground)
        _raise_open_files_limit()
        asyncio.run(_serve(dirs, settings, ready_fd))
    except RalphError as exc:
        log.error("ralphd cannot run: %s", exc.message)
        _report(ready_fd, f"error {exc.message}")
        if ready_fd is None:
            raise
        return 1
    except Exception as exc:
        log.exception("ralphd failed")
        _report(ready_fd, f"error {type(exc).__name__}: {exc}")
        return 1
    finally:
        pid_file.release()
    return 0


def _detach(dirs: Paths) -> None:
    """The daemon's side of daemonizing: no terminal, no inherited stdio, its own folder."""
    os.chdir("/")
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    folder = daemon_dir(dirs)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        err = os.open(folder / _STDERR_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        err = null
    os.dup2(err, 2)
    for fd in {null, err}:
        if fd > 2:
            os.close(fd)


def start_background(dirs: Paths | None = None) -> int:
    """Start ralphd as a daemon and return its pid once it listens.

    :class:`UserError` when one already runs, :class:`RalphError` with the daemon's own words
    when it could not start.
    """
    dirs = dirs or paths()
    pid = running_pid(dirs)
    if pid is not None:
        raise UserError(
            f"ralphd is already running (pid {pid}); `ralphd status` shows it, "
            "`ralphd stop` stops it"
        )
    daemon_settings(dirs)  # a broken daemon.toml is reported here, on the terminal
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked processes
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach(dirs)
            code = run_daemon(dirs, foreground=False, ready_fd=write_end)
        except BaseException:  # a forked child must never return into the caller's code
            code = 1
        os._exit(code)
    os.close(write_end)
    os.waitpid(child, 0)
    message = _read_report(read_end)
    if message.startswith("ready "):
        return int(message.split()[1])
    if message.startswith("error "):
        raise RalphError(f"ralphd could not start: {message[6:]}")
    log_file = daemon_dir(dirs) / _STDERR_FILE
    raise RalphError(f"ralphd did not report that it started; see {log_file} and "
                     f"{daemon_dir(dirs) / LOG_FILE}")


def _read_report(fd: int) -> str:
    chunks: list[bytes] = []
    deadline = time.monotonic() + _READY_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace").strip()


def stop_daemon(dirs: Paths | None = None, *, wait: float = _STOP_TIMEOUT) -> int | None:
    """Ask the running ralphd to stop (SIGTERM) and wait until it has; its pid, or ``None``
    when none was running. Loops keep running."""
    dirs = dirs or paths()
    pid = running_pid(dirs)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    deadline = time.monotonic() + wait
    while running_pid(dirs) is not None:
        if time.monotonic() > deadline:
            raise RalphError(f"ralphd (pid {pid}) did not stop within {wait:g} s; "
                             f"`kill -9 {pid}` ends it (its loops keep running)")
        time.sleep(0.05)
    return pid
