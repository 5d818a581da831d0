"""TCP, with or without TLS: LANs, and the intercept addresses of OpenZiti tunnelers.

Client: :func:`open_tcp` connects (TLS when the URL says ``tcps://`` or ``?tls=1``, checking the
server's certificate against ``tls_ca`` or the system's CAs, and presenting a client
certificate for mutual TLS when one is configured) and, when a token is configured, wraps the
stream in :class:`~ralph_uv.transports.auth.TokenStream` so the first ``hello`` carries it.

Listener: :func:`start_tcp_listener` accepts connections, lets each one through
:func:`~ralph_uv.transports.auth.gate` (first message: ``hello`` with the token) and only then
runs the connection handler. Its rules, checked before anything is bound:

- every TCP listener needs a token: any local user can reach a loopback port;
- a listener on a non-loopback address also needs TLS (``tcps://`` or ``?tls=1`` with
  ``tls_cert`` and ``tls_key``): a token sent in clear text on a network is no secret;
- ``tls_client_ca`` makes TLS mutual: clients without a certificate signed by it are refused
  during the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from ralph_uv.errors import TransportError, UserError
from ralph_uv.transports.auth import TokenStream, gate, resolve_token
from ralph_uv.transports.base import AsyncioStream, Stream
from ralph_uv.transports.options import ConnectOptions, ListenOptions
from ralph_uv.transports.urls import TCPAddress

__all__ = [
    "TCPListener",
    "client_tls_context",
    "open_tcp",
    "server_tls_context",
    "start_tcp_listener",
]

log = logging.getLogger("ralph_uv.transports.tcp")

OnConnect = Callable[[Stream], Awaitable[None]]
_HANDSHAKE_TIMEOUT = 15.0


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    try:
        context.load_cert_chain(str(cert), str(key) if key else None)
    except FileNotFoundError as exc:
        raise UserError(f"the {what} certificate or key file does not exist: "
                        f"{exc.filename or cert}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the {what} certificate {cert} and key {key}: {exc}; "
                        "they must be PEM files that belong together") from exc


def _load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except FileNotFoundError as exc:
        raise UserError(f"the {what} CA file {ca} does not exist") from exc
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the {what} CA file {ca}: {exc}; it must hold PEM "
                        "certificates") from exc


def client_tls_context(options: ConnectOptions) -> ssl.SSLContext:
    """The client's TLS settings: the server's certificate is always checked (host name
    included); a client certificate is presented when ``tls_cert`` is set."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls_ca is not None:
        _load_ca(context, options.tls_ca, "server")
    if options.tls_cert is not None:
        _load_chain(context, options.tls_cert, options.tls_key, "client")
    elif options.tls_key is not None:
        raise UserError("a client key was given without its certificate (tls_cert)")
    return context


def server_tls_context(options: ListenOptions) -> ssl.SSLContext:
    """The listener's TLS settings; with ``tls_client_ca``, client certificates are required."""
    if options.tls_cert is None:
        raise UserError("a TLS listener needs a certificate and key (tls_cert, tls_key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, options.tls_cert, options.tls_key, "server")
    if options.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, options.tls_client_ca, "client")
    return context


def _keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def open_tcp(address: TCPAddress, options: ConnectOptions | None = None) -> Stream:
    """Connect to ``address``; with a token configured, the first ``hello`` carries it.

    Raises :class:`~ralph_uv.errors.TransportError` saying what failed: nothing listening, an
    unknown host, no answer in time, an untrusted certificate, a refused handshake.
    """
    options = options or ConnectOptions()
    if address.port == 0:
        raise UserError(f"{address.url}: port 0 only makes sense for a listener")
    token = resolve_token(options.token, options.token_file)
    context = client_tls_context(options) if address.tls else None
    where = f"{address.host}:{address.port}"
    try:
        async with asyncio.timeout(options.timeout):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, ssl=context,
                server_hostname=(options.tls_server_name or address.host) if context else None,
                ssl_handshake_timeout=options.timeout if context else None,
            )
    except TimeoutError as exc:
        raise TransportError(f"no answer from {where} within {options.timeout:g} s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TransportError(
            f"the TLS certificate of {where} is not trusted ({exc.verify_message}); check it, "
            "then pass the CA certificate that signed it (tls_ca)"
        ) from exc
    except ssl.SSLError as exc:
        raise TransportError(
            f"the TLS handshake with {where} failed ({exc.reason or exc}); if the server "
            "requires client certificates, configure tls_cert and tls_key"
        ) from exc
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {address.host}: {exc.strerror}") from exc
    except ConnectionRefusedError as exc:
        raise TransportError(f"nothing listens on {where} (connection refused)") from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    _keepalive(writer)
    stream: Stream = AsyncioStream(
        reader, writer, peer=f"{'tcps' if context else 'tcp'}:{where}",
        extra={"tls": context is not None},
    )
    if token:
        stream = TokenStream(stream, token)
    return stream


class TCPListener:
    """A listening TCP (or TLS) socket started by :func:`start_tcp_listener`."""

    def __init__(self, server: asyncio.Server, address: TCPAddress) -> None:
        self._server = server
        self._streams: set[Stream] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        port = int(server.sockets[0].getsockname()[1]) if server.sockets else address.port
        self.address = TCPAddress(address.host, port, address.tls)

    @property
    def url(self) -> str:
        """The bound address (with the port the system picked for port 0)."""
        return self.address.url

    @property
    def connection_count(self) -> int:
        """Authenticated connections being served now."""
        return len(self._streams)

    def close(self) -> None:
        """Stop accepting; open connections go on."""
        self._server.close()

    def close_clients(self) -> None:
        """Abort every open connection."""
        for stream in list(self._streams):
            stream.abort()

    async def wait_closed(self) -> None:
        """Wait until closed and every connection handler has returned."""
        await self._server.wait_closed()
        await self._idle.wait()

    def _add(self, stream: Stream) -> None:
        self._streams.add(stream)
        self._idle.clear()

    def _discard(self, stream: Stream) -> None:
        self._streams.discard(stream)
        if not self._streams:
            self._idle.set()


async def _is_loopback(address: TCPAddress) -> bool:
    if address.is_loopback:
        return True
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM
        )
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


async def start_tcp_listener(
    address: TCPAddress, on_connect: OnConnect, options: ListenOptions
) -> TCPListener:
    """Listen on ``address``; each connection that opens with ``hello`` and the right token
    is handed to ``on_connect`` (its ``extra["authenticated"]`` is ``True``).

    Raises :class:`~ralph_uv.errors.UserError` when the listener is not safe to run (no token;
    a non-loopback address without TLS) or its TLS files cannot be used, and
    :class:`~ralph_uv.errors.TransportError` when the address cannot be bound.
    """
    token = resolve_token(options.token, options.token_file)
    loopback = await _is_loopback(address)
    if not token:
        raise UserError(
            f"refusing to listen on {address.url} without a token: any local user (or, off "
            "loopback, anyone on the network) could drive your loops; configure a token file "
            "(mode 0600) for this listener and give the same token to clients"
        )
    if not loopback and not address.tls:
        raise UserError(
            f"refusing to listen on {address.url} without TLS: on a network the token would "
            "travel in clear text; use tcps://HOST:PORT (or ?tls=1) with a certificate and "
            "key (tls_cert, tls_key), or listen on 127.0.0.1"
        )
    context = server_tls_context(options) if address.tls else None
    listener: TCPListener | None = None

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _keepalive(writer)
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        extra = {"tls": context is not None,
                 "tls_peer_cert": writer.get_extra_info("peercert") if context else None}
        raw = AsyncioStream(reader, writer, peer=f"{'tcps' if context else 'tcp'}:{where}",
                            extra=extra)
        stream = await gate(raw, token, timeout=options.auth_timeout)
        if stream is None or listener is None:
            return
        if options.max_connections is not None and \
                listener.connection_count >= options.max_connections:
            log.warning("refused %s: %d connections already", raw.peer,
                        listener.connection_count)
            stream.abort()
            return
        listener._add(stream)
        try:
            await on_connect(stream)
        except Exception:
            log.exception("connection handler for %s failed", stream.peer)
            stream.abort()
        finally:
            stream.close()
            listener._discard(stream)

    try:
        server = await asyncio.start_server(
            accept, address.host, address.port, ssl=context,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT if context else None,
            reuse_address=True,
        )
    except OSError as exc:
        raise TransportError(f"cannot listen on {address.url}: {exc.strerror or exc}") from exc
    listener = TCPListener(server, address)
    log.info("listening on %s%s", listener.url, " (mutual TLS)" if options.tls_client_ca else "")
    return listener
