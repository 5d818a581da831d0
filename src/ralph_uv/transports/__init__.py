"""Transports: a URL in, a connected :class:`~ralph_uv.transports.base.Stream` out.

Everything above a transport (the JSON-RPC endpoint, relays, attach) is the same on all of them:

- ``unix:///path`` (``unix://``: this machine's ralphd) — :mod:`~ralph_uv.transports.unix`;
- ``ssh://[user@]host[:port]`` — ralphd on that host, over a pooled SSH connection
  (:mod:`~ralph_uv.transports.ssh`; no listener needed);
- ``tcp://host:port`` / ``tcps://host:port`` (``?tls=1``) — :mod:`~ralph_uv.transports.tcp`;
- ``ziti://SERVICE?identity=FILE`` — OpenZiti, with the optional ``openziti`` SDK
  (:mod:`~ralph_uv.transports.ziti`).

:func:`connect` dials; :func:`listen` accepts (Unix, TCP/TLS, OpenZiti) and hands each connection
to a handler. Network listeners admit a connection only after its first message, ``hello``,
carried the right token (:mod:`~ralph_uv.transports.auth`), and mark the streams they hand over
with ``extra["authenticated"] = True``; Unix listeners do the same after the peer-uid check.
Bad URLs and unsafe listener settings raise :class:`~ralph_uv.errors.UserError`; connections
that fail raise :class:`~ralph_uv.errors.TransportError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from ralph_uv.config import paths
from ralph_uv.errors import UserError
from ralph_uv.transports.auth import check_token, generate_token
from ralph_uv.transports.base import Stream
from ralph_uv.transports.options import ConnectOptions, ListenOptions
from ralph_uv.transports.pump import PrefixedStream
from ralph_uv.transports.unix import UnixServer, open_unix, start_unix_server
from ralph_uv.transports.urls import (
    Address,
    SSHAddress,
    TCPAddress,
    UnixAddress,
    ZitiAddress,
    parse_url,
)

__all__ = [
    "Address",
    "ConnectOptions",
    "ListenOptions",
    "Listener",
    "OnConnect",
    "Stream",
    "check_token",
    "close_connections",
    "connect",
    "generate_token",
    "listen",
    "parse_url",
    "ssh_exec",
]

OnConnect = Callable[[Stream], Awaitable[None]]


class Listener(Protocol):
    """What :func:`listen` returns."""

    @property
    def url(self) -> str:
        """The address actually bound (a TCP port 0 replaced by the chosen port)."""
        ...

    def close(self) -> None:
        """Stop accepting; open connections go on."""
        ...

    def close_clients(self) -> None:
        """Abort every open connection."""
        ...

    async def wait_closed(self) -> None:
        """Wait until closed and every connection handler has returned."""
        ...


async def connect(url: str, *, options: ConnectOptions | None = None) -> Stream:
    """Connect to ``url`` (see the module docstring for the schemes).

    Raises :class:`~ralph_uv.errors.UserError` for a bad URL or unusable options and
    :class:`~ralph_uv.errors.TransportError` when the connection cannot be made.
    """
    address = parse_url(url)
    options = options or ConnectOptions()
    if isinstance(address, UnixAddress):
        return await open_unix(address.path or paths().daemon_socket)
    if isinstance(address, SSHAddress):
        from ralph_uv.transports.ssh import connect_ssh

        return await connect_ssh(address, options)
    if isinstance(address, TCPAddress):
        from ralph_uv.transports.tcp import open_tcp

        return await open_tcp(address, options)
    from ralph_uv.transports.ziti import open_ziti

    return await open_ziti(address, options)


class _UnixListener:
    def __init__(self, server: UnixServer, url: str) -> None:
        self._server = server
        self.url = url

    def close(self) -> None:
        self._server.close()

    def close_clients(self) -> None:
        self._server.close_clients()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def listen(url: str, on_connect: OnConnect, *, options: ListenOptions) -> Listener:
    """Accept connections on ``url`` and run ``on_connect(stream)`` for each admitted one.

    ``ssh://`` cannot be listened on (SSH clients reach ralphd's Unix socket through sshd).
    Raises :class:`~ralph_uv.errors.UserError` for a bad URL or an unsafe listener (a network
    listener without a token; a non-loopback TCP listener without TLS) and
    :class:`~ralph_uv.errors.TransportError` when the address cannot be bound.
    """
    address = parse_url(url)
    if isinstance(address, UnixAddress):
        path = address.path or paths().daemon_socket

        async def admitted(stream: Stream) -> None:
            await on_connect(PrefixedStream(stream, b"", {"authenticated": True}))

        server = await start_unix_server(path, admitted, allowed_uid=options.allowed_uid,
                                         max_connections=options.max_connections)
        return _UnixListener(server, UnixAddress(path).url)
    if isinstance(address, SSHAddress):
        raise UserError(f"cannot listen on {url}: SSH needs no listener; clients reach "
                        "ralphd's Unix socket through the machine's sshd")
    if isinstance(address, TCPAddress):
        from ralph_uv.transports.tcp import start_tcp_listener

        return await start_tcp_listener(address, on_connect, options)
    from ralph_uv.transports.ziti import start_ziti_listener

    assert isinstance(address, ZitiAddress)
    return await start_ziti_listener(address, on_connect, options)


async def ssh_exec(
    url: str, argv: list[str] | tuple[str, ...], *, options: ConnectOptions | None = None,
    input: bytes | None = None, timeout: float | None = None,  # noqa: ASYNC109
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` on the ``ssh://`` host over the pooled connection:
    ``(exit_status, stdout, stderr)`` (see :func:`ralph_uv.transports.ssh.ssh_exec`)."""
    from ralph_uv.transports.ssh import ssh_exec as _ssh_exec

    return await _ssh_exec(url, argv, options=options, input=input, timeout=timeout)


async def close_connections() -> None:
    """Close the pooled connections of the running event loop (SSH); call before it ends."""
    from ralph_uv.transports.ssh import close_ssh_connections

    await close_ssh_connections()
