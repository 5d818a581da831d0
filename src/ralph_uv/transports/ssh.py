"""SSH: reach ralphd on another machine through its sshd, with no listener of ours there.

``ssh://[user@]host[:port]`` is resolved like ``ssh`` does it: ``~/.ssh/config`` (aliases,
HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile — asyncssh's config support),
the SSH agent, or an explicit identity file (:class:`~ralph_uv.transports.options.ConnectOptions`).
Host keys are checked strictly against known_hosts: an unknown or changed key is refused with
its fingerprint and the commands that trust it.

How a stream to the remote ralphd is made:

1. One SSH connection per (user, host, port, options) per process and event loop is kept in a
   pool, with keepalives; every stream is a channel on it, so only the first costs a handshake.
2. Once per connection, :data:`REMOTE_SOCKET_COMMAND` (``ralph-uv bridge --print-socket``) runs
   over an exec channel: it starts ralphd there if needed and prints its socket path.
3. Each stream is a direct-streamlocal channel to that socket (what ``ssh -L …:/path`` uses).
4. Where sshd refuses those channels (``AllowStreamLocalForwarding no``), the stream is an exec
   channel running :data:`REMOTE_BRIDGE_COMMAND` (``ralph-uv bridge``, stdio <-> the socket);
   the refusal is remembered per host for the life of the process.

A connection that dies (keepalives unanswered, sshd gone) leaves the pool; the next stream
connects again, retrying transient failures with backoff. :func:`ssh_exec` runs any command on
the pooled connection (``remote check``, code sync). Call :func:`close_ssh_connections` before
the event loop ends. Every asyncssh error becomes a
:class:`~ralph_uv.errors.TransportError` or :class:`~ralph_uv.errors.UserError` that says what
to do (see :mod:`ralph_uv.transports.ssh_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncssh

from ralph_uv.client.bridge import BRIDGE_READY
from ralph_uv.errors import TransportError, UserError
from ralph_uv.transports.base import DEFAULT_READ_SIZE, DEFAULT_WRITE_BUFFER_LIMIT, Stream
from ralph_uv.transports.options import ConnectOptions
from ralph_uv.transports.ssh_errors import (
    TRANSIENT,
    channel_error,
    connect_error,
    connection_kwargs,
)
from ralph_uv.transports.urls import SSHAddress, parse_url

__all__ = [
    "REMOTE_BRIDGE_COMMAND",
    "REMOTE_SOCKET_COMMAND",
    "ExecResult",
    "SSHStream",
    "close_ssh_connections",
    "connect_ssh",
    "open_remote_unix",
    "remote_command",
    "ssh_exec",
]

log = logging.getLogger("ralph_uv.transports.ssh")

REMOTE_SOCKET_COMMAND = ("ralph-uv", "bridge", "--print-socket")
"""Run on the remote machine: start ralphd if needed, print its socket path."""
REMOTE_BRIDGE_COMMAND = ("ralph-uv", "bridge")
"""Run on the remote machine when sshd refuses streamlocal channels: stdio <-> ralphd."""

_BACKOFF = (0.0, 0.25, 0.5, 1.0)
_KEEPALIVE_COUNT = 3
_STDERR_TAIL = 4096
# Hosts whose sshd refused a direct-streamlocal channel to a socket that answers.
_STREAMLOCAL_REFUSED: set[tuple[Any, ...]] = set()


class ExecResult(NamedTuple):
    """What a remote command did: ``exit_status`` (-1 when killed by a signal), its output."""

    exit_status: int
    stdout: bytes
    stderr: bytes


class SSHStream:
    """A :class:`~ralph_uv.transports.base.Stream` over one SSH channel (direct-streamlocal,
    or the stdio of a remote ``ralph-uv bridge``)."""

    def __init__(
        self,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        *,
        peer: str,
        extra: Mapping[str, Any],
        process: asyncssh.SSHClientProcess[bytes] | None = None,
        stderr_tail: bytearray | None = None,
        stderr_task: asyncio.Task[None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._channel = writer.channel
        self._process = process
        self._stderr_tail = stderr_tail
        self._stderr_task = stderr_task
        self.peer = peer
        self.extra: Mapping[str, Any] = dict(extra)
        self._channel.set_write_buffer_limits(high=DEFAULT_WRITE_BUFFER_LIMIT)

    async def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        try:
            data = await self._reader.read(max_bytes)
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(f"SSH channel to {self.peer} failed: {exc}") from exc
        if not data and self._process is not None:
            await self._raise_if_bridge_failed()
        return data

    async def _raise_if_bridge_failed(self) -> None:
        assert self._process is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._process.wait_closed()
        status = self._process.exit_status
        if status not in (None, 0):
            text = bytes(self._stderr_tail or b"").decode(errors="replace").strip()
            raise TransportError(f"the remote bridge on {self.peer} failed (exit status "
                                 f"{status}): {text or 'no message'}")

    def write(self, data: bytes) -> None:
        if self._channel.is_closing():
            raise TransportError(f"connection to {self.peer} is closed")
        try:
            self._writer.write(data)
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(f"connection to {self.peer} lost: {exc}") from exc

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(f"connection to {self.peer} lost: {exc}") from exc

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self._writer.write_eof()

    def is_closing(self) -> bool:
        return self._channel.is_closing()

    def close(self) -> None:
        self._channel.close()

    def abort(self) -> None:
        self._channel.abort()
        if self._stderr_task is not None:
            self._stderr_task.cancel()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            await self._channel.wait_closed()


def remote_command(options: ConnectOptions, argv: Sequence[str]) -> str:
    """The shell command line that runs ``argv`` (whose first word is ``ralph-uv``) on the
    remote machine, with ``remote_ralph`` and ``remote_command_prefix`` applied."""
    words = [*options.remote_command_prefix, options.remote_ralph, *argv[1:]]
    # A leading "~/" must stay outside the quotes for the remote shell to expand it.
    return " ".join(
        "~/" + shlex.quote(word[2:]) if word.startswith("~/") and len(word) > 2
        else shlex.quote(word)
        for word in words
    )


class _Client(asyncssh.SSHClient):
    """Remembers the host key it refused (for the message) and tells the pool when the
    connection is gone."""

    def __init__(self) -> None:
        self.refused_key: asyncssh.SSHKey | None = None
        self.lost = False

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.refused_key = key
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass(eq=False)
class _Link:
    """One pooled SSH connection."""

    conn: asyncssh.SSHClientConnection
    client: _Client
    label: str
    remote_socket: str | None = None
    socket_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return not self.client.lost and not self.conn.is_closed()


class _Pool:
    """The connections of one event loop."""

    def __init__(self) -> None:
        self.links: dict[tuple[Any, ...], _Link] = {}
        self.locks: dict[tuple[Any, ...], asyncio.Lock] = {}


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = (
    weakref.WeakKeyDictionary()
)


def _pool() -> _Pool:
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = _Pool()
    return pool


def _key(address: SSHAddress, options: ConnectOptions) -> tuple[Any, ...]:
    return (address.user, address.host, address.port, options)


async def _connect(address: SSHAddress, options: ConnectOptions) -> _Link:
    """A new SSH connection, retrying transient failures with backoff."""
    kwargs = connection_kwargs(address, options)
    clients: list[_Client] = []

    def factory() -> _Client:
        clients.append(_Client())
        return clients[-1]

    last: BaseException | None = None
    for delay in _BACKOFF:
        if delay:
            await asyncio.sleep(delay)
        try:
            async with asyncio.timeout(options.timeout):
                conn = await asyncssh.connect(
                    address.host, address.port or (), client_factory=factory, **kwargs
                )
        except TRANSIENT as exc:
            log.debug("ssh %s: %s; retrying", address.url, exc)
            last = exc
            continue
        except (OSError, asyncssh.Error, ValueError, TimeoutError) as exc:
            raise await connect_error(exc, address, options,
                                      clients[-1].refused_key if clients else None) from exc
        log.info("ssh connection to %s established", address.url)
        return _Link(conn, clients[-1], address.url)
    assert last is not None
    raise await connect_error(last, address, options, None) from last


async def _link(address: SSHAddress, options: ConnectOptions) -> _Link:
    pool = _pool()
    key = _key(address, options)
    lock = pool.locks.setdefault(key, asyncio.Lock())
    async with lock:
        link = pool.links.get(key)
        if link is not None and link.alive:
            return link
        if link is not None:
            log.info("ssh connection to %s was lost; connecting again", address.url)
            link.conn.abort()
        link = pool.links[key] = await _connect(address, options)
        return link


def _drop(address: SSHAddress, options: ConnectOptions, link: _Link) -> None:
    pool = _pool()
    key = _key(address, options)
    if pool.links.get(key) is link:
        del pool.links[key]
    link.conn.abort()


async def _run(link: _Link, command: str, *, input: bytes | None = None,
               timeout: float | None = None) -> ExecResult:  # noqa: ASYNC109
    try:
        result = await link.conn.run(command, check=False, encoding=None, input=input,
                                     timeout=timeout)
    except asyncssh.TimeoutError as exc:
        raise TransportError(f"`{command}` on {link.label} did not finish within "
                             f"{timeout:g} s") from exc
    except (OSError, asyncssh.Error) as exc:
        raise channel_error(exc, link.label, f"run `{command}`") from exc
    status = result.exit_status if result.exit_status is not None else -1
    stdout = result.stdout if isinstance(result.stdout, bytes) else b""
    stderr = result.stderr if isinstance(result.stderr, bytes) else b""
    return ExecResult(status, stdout, stderr)


def _remote_failure(link: _Link, what: str, command: str, result: ExecResult) -> TransportError:
    text = result.stderr.decode(errors="replace").strip()[-_STDERR_TAIL:]
    if result.exit_status == 127:
        return TransportError(
            f"ralph-uv was not found on {link.label} (`{command}`: {text or 'not found'}); "
            "install it there, or give the remote command's path (remote_ralph, e.g. "
            "~/.local/bin/ralph-uv, or remote_command_prefix)"
        )
    return TransportError(f"{what} on {link.label} failed (`{command}`, exit status "
                          f"{result.exit_status}): {text or 'no message'}")


async def _remote_socket(link: _Link, options: ConnectOptions, *, refresh: bool) -> str:
    """ralphd's socket path on the remote machine (starting ralphd there if needed)."""
    async with link.socket_lock:
        if link.remote_socket is not None and not refresh:
            return link.remote_socket
        command = remote_command(options, REMOTE_SOCKET_COMMAND)
        result = await _run(link, command, timeout=max(options.timeout, 90.0))
        lines = [line.strip() for line in result.stdout.decode(errors="replace").splitlines()]
        paths = [line for line in lines if line.startswith("/")]
        if result.exit_status != 0 or not paths:
            raise _remote_failure(link, "starting ralphd", command, result)
        link.remote_socket = paths[-1]
        log.debug("ralphd on %s listens on %s", link.label, link.remote_socket)
        return link.remote_socket


async def _open_streamlocal(link: _Link, path: str) -> SSHStream:
    reader, writer = await link.conn.open_unix_connection(path, encoding=None)
    return SSHStream(reader, writer, peer=f"{link.label}:{path}",
                     extra={"ssh": link.label, "ssh_channel": "direct-streamlocal",
                            "remote_socket": path})


async def _drain_stderr(reader: asyncssh.SSHReader[bytes], tail: bytearray) -> None:
    with contextlib.suppress(OSError, asyncssh.Error):
        while chunk := await reader.read(_STDERR_TAIL):
            tail += chunk
            del tail[:-_STDERR_TAIL]


async def _open_bridge(link: _Link, options: ConnectOptions,
                       argv: Sequence[str] = REMOTE_BRIDGE_COMMAND) -> SSHStream:
    """An exec channel running ``ralph-uv bridge``, once it says it is connected."""
    command = remote_command(options, argv)
    try:
        process = await link.conn.create_process(command, encoding=None)
    except (OSError, asyncssh.Error) as exc:
        raise channel_error(exc, link.label, f"run `{command}`") from exc
    tail = bytearray()
    ready = BRIDGE_READY.encode()
    try:
        async with asyncio.timeout(max(options.timeout, 90.0)):
            while ready not in tail:
                chunk = await process.stderr.read(_STDERR_TAIL)
                if not chunk:
                    break
                tail += chunk
    except TimeoutError:
        process.close()
        raise TransportError(f"`{command}` on {link.label} did not connect to ralphd") from None
    except (OSError, asyncssh.Error) as exc:
        process.close()
        raise channel_error(exc, link.label, f"run `{command}`") from exc
    if ready not in tail:
        with contextlib.suppress(OSError, asyncssh.Error):
            await process.wait_closed()
        status = process.exit_status if process.exit_status is not None else -1
        raise _remote_failure(link, "the bridge to ralphd", command,
                              ExecResult(status, b"", bytes(tail)))
    del tail[: tail.index(ready) + len(ready) + 1]
    drain = asyncio.create_task(_drain_stderr(process.stderr, tail))
    return SSHStream(process.stdout, process.stdin, peer=f"{link.label}:bridge",
                     extra={"ssh": link.label, "ssh_channel": "exec-bridge"},
                     process=process, stderr_tail=tail, stderr_task=drain)


async def open_remote_unix(url_or_address: str | SSHAddress, path: str,
                           options: ConnectOptions | None = None) -> Stream:
    """A direct-streamlocal channel to the Unix socket ``path`` on the SSH host."""
    address, options = _address(url_or_address), options or ConnectOptions()
    link = await _link(address, options)
    try:
        return await _open_streamlocal(link, path)
    except (OSError, asyncssh.Error) as exc:
        if not link.alive:
            _drop(address, options, link)
        raise channel_error(exc, link.label, f"open {path}") from exc


async def connect_ssh(address: SSHAddress, options: ConnectOptions | None = None) -> Stream:
    """A stream to ralphd on ``address``'s host (see the module docstring for how)."""
    options = options or ConnectOptions()
    link = await _link(address, options)
    try:
        return await _connect_on(link, address, options)
    except TransportError:
        if link.alive:
            raise
    # The pooled connection died under us (it was idle and sshd went away): once more.
    _drop(address, options, link)
    return await _connect_on(await _link(address, options), address, options)


async def _connect_on(link: _Link, address: SSHAddress, options: ConnectOptions) -> Stream:
    host_key = _key(address, options)
    if host_key in _STREAMLOCAL_REFUSED:
        return await _open_bridge(link, options)
    cached = link.remote_socket is not None
    path = await _remote_socket(link, options, refresh=False)
    try:
        return await _open_streamlocal(link, path)
    except asyncssh.ChannelOpenError as exc:
        first = exc
    except (OSError, asyncssh.Error) as exc:
        raise channel_error(exc, link.label, f"open {path}") from exc
    if cached:  # ralphd may have restarted (elsewhere): ask again, then try once more
        path = await _remote_socket(link, options, refresh=True)
        with contextlib.suppress(asyncssh.ChannelOpenError):
            return await _open_streamlocal(link, path)
    # ralphd answers on `path` (the command above just checked), yet sshd will not open a
    # channel to it: streamlocal forwarding is off. The bridge does the same over stdio.
    stream = await _open_bridge(link, options)
    log.info("sshd on %s refused a channel to %s (%s); using `ralph-uv bridge` from now on",
             link.label, path, first.reason)
    _STREAMLOCAL_REFUSED.add(host_key)
    return stream


def _address(url_or_address: str | SSHAddress) -> SSHAddress:
    if isinstance(url_or_address, SSHAddress):
        return url_or_address
    address = parse_url(url_or_address)
    if not isinstance(address, SSHAddress):
        raise UserError(f"{url_or_address!r} is not an ssh:// address")
    return address


async def ssh_exec(
    url_or_address: str | SSHAddress,
    argv: Sequence[str],
    *,
    options: ConnectOptions | None = None,
    input: bytes | None = None,
    timeout: float | None = None,  # noqa: ASYNC109
) -> ExecResult:
    """Run ``argv`` on the SSH host over the pooled connection; its exit status and output.

    The command is quoted for the remote shell word by word. Raises
    :class:`~ralph_uv.errors.TransportError` when the host cannot be reached or the command
    does not finish within ``timeout`` seconds; a failing command is not an error (look at
    ``exit_status``).
    """
    address, options = _address(url_or_address), options or ConnectOptions()
    if not argv:
        raise UserError("ssh_exec needs a command")
    command = shlex.join(argv)
    link = await _link(address, options)
    try:
        return await _run(link, command, input=input, timeout=timeout)
    except TransportError:
        if link.alive:
            raise
    _drop(address, options, link)
    return await _run(await _link(address, options), command, input=input, timeout=timeout)


async def close_ssh_connections() -> None:
    """Close this event loop's pooled SSH connections (call before the loop ends)."""
    pool = _POOLS.pop(asyncio.get_running_loop(), None)
    if pool is None:
        return
    links = list(pool.links.values())
    for link in links:
        link.conn.close()
    for link in links:
        with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
            async with asyncio.timeout(5.0):
                await link.conn.wait_closed()
