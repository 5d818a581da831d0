"""``ralph-uv bridge``: this machine's ralphd socket on stdin and stdout.

Over SSH, a client normally opens a direct-streamlocal channel straight to the remote
``ralphd.sock``. Where sshd forbids that (``AllowStreamLocalForwarding no``), the client runs
``ralph-uv bridge`` over an exec channel instead: the bridge connects to the socket (starting
ralphd first if none answers) and copies bytes both ways until either side ends. It prints
:data:`BRIDGE_READY` on stderr once connected, so the client knows the channel carries ralphd
and not an error message; stdout carries the relayed bytes and nothing else.

``ralph-uv bridge --print-socket`` (:func:`ensure_daemon_socket`) makes sure ralphd runs and
prints its socket path: the client runs it once per connection to learn where to open its
channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ralph_uv.config import paths
from ralph_uv.errors import TransportError
from ralph_uv.transports.pump import Sink, Source, pump

__all__ = ["BRIDGE_READY", "ensure_daemon_socket", "run_bridge"]

log = logging.getLogger("ralph_uv.client.bridge")

BRIDGE_READY = "ralph-uv bridge: connected"
"""The line the bridge writes on stderr once it is connected to the socket."""
_CHUNK = 256 * 1024


class _Sink(Sink, Protocol):
    def close(self) -> None: ...


async def ensure_daemon_socket() -> Path:
    """Make sure this machine's ralphd answers (starting it if needed); its socket path.

    Raises :class:`~ralph_uv.errors.TransportError` when ralphd cannot be started or reached.
    """
    from ralph_uv.client.daemon import connect_daemon

    daemon = await connect_daemon(autostart=True, client="ralph-uv bridge")
    await daemon.close()
    return paths().daemon_socket


def _pollable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


class _FileReader:
    """stdin that is a regular file (``< file``): read in a thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def read(self, n: int) -> bytes:
        return await asyncio.to_thread(os.read, self._fd, n)


class _FileWriter:
    """stdout that is a regular file (``> file``): written in a thread, in order."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    async def drain(self) -> None:
        data, self._pending = b"".join(self._pending), []
        view = memoryview(data)
        while view:
            written = await asyncio.to_thread(os.write, self._fd, view)
            view = view[written:]

    def close(self) -> None:
        self._pending.clear()


async def _stdio(stdin_fd: int, stdout_fd: int) -> tuple[Source, _Sink]:
    loop = asyncio.get_running_loop()
    reader: Source
    writer: _Sink
    if _pollable(stdin_fd):
        reader = asyncio.StreamReader(limit=_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        await loop.connect_read_pipe(lambda: protocol, os.fdopen(stdin_fd, "rb", buffering=0))
    else:
        reader = _FileReader(stdin_fd)
    if _pollable(stdout_fd):
        transport, out_protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(stdout_fd, "wb", buffering=0),
        )
        writer = asyncio.StreamWriter(transport, out_protocol, None, loop)
    else:
        writer = _FileWriter(stdout_fd)
    return reader, writer


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(path), limit=_CHUNK)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise TransportError(f"nothing listens on {path}: is ralphd running?") from exc
    except PermissionError as exc:
        raise TransportError(
            f"permission denied on {path}: the socket belongs to another user"
        ) from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {path}: {exc.strerror or exc}") from exc


async def _upstream(source: Source, target: asyncio.StreamWriter) -> None:
    """stdin -> socket; at the end of stdin, half-close the socket so ralphd can finish."""
    await pump(source, target, chunk=_CHUNK)
    if target.can_write_eof():
        target.write_eof()


async def run_bridge(
    socket_path: Path | None = None,
    *,
    announce: Callable[[str], None] | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> int:
    """Relay ``stdin_fd``/``stdout_fd`` to ``socket_path`` (default: ralphd's socket, started
    on demand) until the socket's side ends; the exit status (0, or 1 after an error).

    ``announce`` receives :data:`BRIDGE_READY` once the socket is connected.
    """
    path = socket_path or paths().daemon_socket
    try:
        sock_reader, sock_writer = await _open(path)
    except TransportError:
        if socket_path is not None:
            raise
        await ensure_daemon_socket()
        sock_reader, sock_writer = await _open(path)
    if announce is not None:
        announce(BRIDGE_READY)
    reader, writer = await _stdio(stdin_fd, stdout_fd)
    up = asyncio.create_task(_upstream(reader, sock_writer))
    # socket -> stdout, until ralphd ends the connection
    down = asyncio.create_task(pump(sock_reader, writer, chunk=_CHUNK))
    status = 0
    try:
        # ralphd ending its side ends the bridge; the client ending its side only half-closes.
        await down
    except OSError as exc:
        log.warning("bridge to %s ended: %s", path, exc)
        status = 1
    finally:
        up.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await up
        sock_writer.close()
        writer.close()
        with contextlib.suppress(OSError):
            await sock_writer.wait_closed()
    if up.done() and not up.cancelled() and up.exception() is not None:
        log.warning("bridge from stdin ended: %s", up.exception())
    return status
