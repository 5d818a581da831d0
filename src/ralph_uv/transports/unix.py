"""Unix domain sockets: the local transport of ralphd and of every loop's runner.

A server socket is private to its user: its folder is 0700, the socket 0600, and each accepted
connection's peer is checked with ``SO_PEERCRED`` (file permissions alone are not trusted: a
folder may have been opened up, or root may have created the socket). A refused peer receives one
JSON-RPC error line (-32010, ``UNAUTHORIZED``) saying why, then the connection is closed.

A socket left behind by a process that died is replaced; one that still answers is not, so two
servers never fight over one path. Closing the returned server removes its socket file (only if
the file is still the one it bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ralph_uv.errors import ErrorCode, TransportError
from ralph_uv.protocol.framing import encode
from ralph_uv.protocol.messages import ErrorResponse
from ralph_uv.transports.base import AsyncioStream, Stream

__all__ = [
    "MAX_SOCKET_PATH",
    "UnixServer",
    "open_unix",
    "peer_credentials",
    "start_unix_server",
]

log = logging.getLogger("ralph_uv.transports.unix")

# Many clients may connect at once (a dashboard, attach clients, scripts): a deep accept queue
# keeps a burst of connections from being refused while the loop is busy.
_BACKLOG = 1024

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
_PROBE_TIMEOUT = 1.0
_REFUSE_TIMEOUT = 1.0

OnConnect = Callable[[Stream], Awaitable[None]]


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket.

    Raises :class:`~ralph_uv.errors.TransportError` when the kernel cannot tell (not Linux, not
    a Unix socket, or the socket is already closed).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError) as exc:
        raise TransportError(f"cannot read the peer's credentials: {exc}") from exc
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise TransportError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes, the limit of Unix "
            "sockets; set RALPH_HOME or XDG_RUNTIME_DIR to a shorter folder",
            code=ErrorCode.INVALID_PARAMS,
        )


def _make_private_folder(folder: Path, *, own: bool = False) -> None:
    """Create ``folder`` (and missing parents) 0700. An existing folder is tightened to 0700
    only when ``own`` says it is ralph-uv's own (its runtime folders), never a shared one."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for part in reversed(missing):
        with contextlib.suppress(FileExistsError):
            part.mkdir(mode=0o700)
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise TransportError(f"{folder} is not a folder; remove it and try again")
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    # A shared folder (/tmp, a home folder given in a unix:// URL) is never changed: the socket
    # itself stays 0600 and every peer's uid is checked, so a wider folder lets nobody in.
    shared = bool(mode & stat.S_ISVTX) or info.st_uid != os.getuid()
    if own and not shared:
        os.chmod(folder, 0o700)
    else:
        log.info("socket folder %s is not private (mode %o); the socket is 0600 and peers are "
                 "checked by uid", folder, mode)


async def _remove_if_stale(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise TransportError(f"{path} exists and is not a socket; move it away and try again")
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except (TimeoutError, OSError) as exc:
        raise TransportError(
            f"{path} exists and does not answer cleanly ({exc or 'timed out'}); "
            "if no server uses it, remove it"
        ) from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise TransportError(f"another server is already listening on {path}; stop it first")


async def _refuse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, code: ErrorCode, message: str
) -> None:
    """Send one error line, then end the connection so that the client can read it.

    Closing with the client's request still unread would make the kernel reset the connection
    and the client would see the reset instead of the reason: so the refusal is followed by
    end-of-stream, and what the client sent is read and dropped until it closes (bounded).
    """
    try:
        writer.write(encode(ErrorResponse(None, code, message).to_json()))
        writer.write_eof()
        async with asyncio.timeout(_REFUSE_TIMEOUT):
            while await reader.read(65536):
                pass
    except (OSError, TimeoutError):
        pass
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_REFUSE_TIMEOUT):
            await writer.wait_closed()
    if not writer.is_closing():
        writer.transport.abort()


class _Clients:
    """The connections a server is serving, and who waits for them to end."""

    def __init__(self) -> None:
        self.streams: set[AsyncioStream] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, stream: AsyncioStream) -> None:
        self.streams.add(stream)
        self.idle.clear()

    def discard(self, stream: AsyncioStream) -> None:
        self.streams.discard(stream)
        if not self.streams:
            self.idle.set()


class UnixServer(asyncio.AbstractServer):
    """The listening socket returned by :func:`start_unix_server`.

    It behaves as an asyncio server, with two additions: :meth:`close` also removes the socket
    file if it is still the one this server bound, and :meth:`wait_closed` also waits until
    every connection's handler has returned (:meth:`close_clients` ends them at once).
    """

    def __init__(self, server: asyncio.AbstractServer, path: Path, clients: _Clients) -> None:
        self._server = server
        self._clients = clients
        self.path = path
        self._inode = path.stat().st_ino

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets."""
        return tuple(getattr(self._server, "sockets", ()))

    @property
    def connection_count(self) -> int:
        """Connections being served now."""
        return len(self._clients.streams)

    def close(self) -> None:
        """Stop accepting and remove the socket file; open connections go on."""
        self._server.close()
        with contextlib.suppress(OSError):
            if self.path.lstat().st_ino == self._inode:
                self.path.unlink()

    def close_clients(self) -> None:
        """Abort every open connection (their handlers see the end of their stream)."""
        for stream in list(self._clients.streams):
            stream.abort()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection handler has returned."""
        await self._server.wait_closed()
        await self._clients.idle.wait()


async def start_unix_server(
    path: Path,
    on_connect: OnConnect,
    *,
    allowed_uid: int | None = os.getuid(),
    max_connections: int | None = None,
    own_folder: bool = False,
) -> UnixServer:
    """Listen on ``path`` and run ``on_connect(stream)`` for each accepted, authorised peer.

    ``allowed_uid`` is the only uid let in (``None`` lets every uid in; the socket is still
    0600, so only root or a changed mode would let them reach it). Past ``max_connections``
    open connections, new ones are refused with an error line. Errors in ``on_connect`` are
    logged and close that connection only. Raises :class:`~ralph_uv.errors.TransportError` when
    the path is unusable or another server already answers on it.
    """
    path = Path(path)
    _check_path(path)
    try:
        _make_private_folder(path.parent, own=own_folder)
        await _remove_if_stale(path)
    except OSError as exc:
        raise TransportError(f"cannot prepare socket {path}: {exc}") from exc

    clients = _Clients()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
        except TransportError as exc:
            log.warning("refused a connection on %s: %s", path, exc.message)
            await _refuse(reader, writer, ErrorCode.UNAUTHORIZED, f"Unauthorized: {exc.message}")
            return
        if allowed_uid is not None and uid != allowed_uid:
            log.warning("refused pid %d uid %d on %s: only uid %d may connect",
                        pid, uid, path, allowed_uid)
            await _refuse(
                reader,
                writer,
                ErrorCode.UNAUTHORIZED,
                f"Unauthorized: uid {uid} may not use {path}; only uid {allowed_uid} may "
                "(run the client as that user, or connect through ralphd over SSH)",
            )
            return
        if max_connections is not None and len(clients.streams) >= max_connections:
            log.warning("refused pid %d on %s: %d connections already", pid, path,
                        len(clients.streams))
            await _refuse(
                reader,
                writer,
                ErrorCode.BAD_STATE,
                f"{path} already serves {max_connections} connections; close some and retry",
            )
            return
        stream = AsyncioStream(reader, writer)
        clients.add(stream)
        try:
            await on_connect(stream)
        except Exception:
            log.exception("connection handler on %s failed", path)
            stream.abort()
        finally:
            stream.close()
            clients.discard(stream)

    try:
        server = await asyncio.start_unix_server(accept, path=str(path), backlog=_BACKLOG)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise TransportError(f"cannot listen on {path}: {exc}") from exc
    log.debug("listening on %s", path)
    return UnixServer(server, path, clients)


async def open_unix(path: Path) -> Stream:
    """Connect to the Unix socket at ``path``.

    Raises :class:`~ralph_uv.errors.TransportError` with a message that says whether nothing
    listens there or the path does not exist.
    """
    path = Path(path)
    _check_path(path)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except FileNotFoundError as exc:
        raise TransportError(f"no socket at {path}: is the server running?") from exc
    except ConnectionRefusedError as exc:
        raise TransportError(f"nothing listens on {path}: the server has stopped") from exc
    except PermissionError as exc:
        raise TransportError(
            f"permission denied on {path}: the socket belongs to another user"
        ) from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {path}: {exc}") from exc
    return AsyncioStream(reader, writer, peer=f"unix:{path}")
